//! Differentiable losses on logits `[B, C, H, W]` and targets `[B, H, W]`
//! (u32 class ids), on any device.

use candle_core::{D, DType, Tensor};
use cmr_kernels::{KernelConfig, LossSpec, fused_loss};
use serde::{Deserialize, Serialize};

use crate::error::{LossError, Result};

fn default_eps() -> f64 {
    1e-6
}

fn one() -> f64 {
    1.0
}

/// The loss a training run minimises. In JSON/TOML: `{"kind": "soft_dice"}`,
/// `{"kind": "cross_entropy", "class_weights": [..]}`,
/// `{"kind": "dice_ce", "dice_weight": 1.0, "ce_weight": 1.0}`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum Loss {
    /// Cross-entropy, mean over pixels, optionally class-weighted.
    CrossEntropy {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        class_weights: Option<Vec<f32>>,
    },
    /// The report's soft Dice ("our dice"): 1 − mean soft Dice.
    SoftDice {
        #[serde(default)]
        include_background: bool,
        #[serde(default = "default_eps")]
        eps: f64,
    },
    /// `dice_weight · soft Dice + ce_weight · cross-entropy`.
    DiceCe {
        #[serde(default = "one")]
        dice_weight: f64,
        #[serde(default = "one")]
        ce_weight: f64,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        class_weights: Option<Vec<f32>>,
        #[serde(default)]
        include_background: bool,
        #[serde(default = "default_eps")]
        eps: f64,
    },
}

impl Default for Loss {
    /// The report's best loss: soft Dice over the foreground classes.
    fn default() -> Self {
        Self::soft_dice()
    }
}

impl Loss {
    pub fn soft_dice() -> Self {
        Self::SoftDice {
            include_background: false,
            eps: default_eps(),
        }
    }

    pub fn cross_entropy() -> Self {
        Self::CrossEntropy { class_weights: None }
    }

    pub fn dice_ce(dice_weight: f64, ce_weight: f64) -> Self {
        Self::DiceCe {
            dice_weight,
            ce_weight,
            class_weights: None,
            include_background: false,
            eps: default_eps(),
        }
    }

    /// A short name for tables and logs.
    pub fn name(&self) -> &'static str {
        match self {
            Self::CrossEntropy { .. } => "cross-entropy",
            Self::SoftDice { .. } => "soft Dice",
            Self::DiceCe { .. } => "Dice + CE",
        }
    }

    /// Reject weights that are negative or not finite.
    pub fn validate(&self, num_classes: usize) -> Result<()> {
        let check_weights = |w: &Option<Vec<f32>>| match w {
            Some(w) if w.len() != num_classes => Err(LossError::Config(format!(
                "class_weights has {} entries for {num_classes} classes",
                w.len()
            ))),
            Some(w) if w.iter().any(|v| !v.is_finite() || *v < 0.0) || w.iter().all(|v| *v == 0.0) => {
                Err(LossError::Config(format!(
                    "class_weights {w:?} must be finite, non-negative and not all zero"
                )))
            }
            _ => Ok(()),
        };
        match self {
            Self::CrossEntropy { class_weights } => check_weights(class_weights),
            Self::SoftDice { eps, .. } if !(*eps >= 0.0 && eps.is_finite()) => {
                Err(LossError::Config(format!("eps {eps} must be finite and non-negative")))
            }
            Self::SoftDice { .. } => Ok(()),
            Self::DiceCe {
                dice_weight,
                ce_weight,
                class_weights,
                eps,
                ..
            } => {
                if !(dice_weight.is_finite() && ce_weight.is_finite() && *dice_weight >= 0.0 && *ce_weight >= 0.0) {
                    return Err(LossError::Config(format!(
                        "weights {dice_weight} and {ce_weight} must be finite and non-negative"
                    )));
                }
                if !(*eps >= 0.0 && eps.is_finite()) {
                    return Err(LossError::Config(format!("eps {eps} must be finite and non-negative")));
                }
                check_weights(class_weights)
            }
        }
    }

    /// The scalar loss of `logits` `[B, C, H, W]` against `targets` `[B, H,
    /// W]`: one fused op where `kernels` says the fast kernels run
    /// ([`KernelConfig::applies`]), else the candle expressions.
    pub fn compute(&self, logits: &Tensor, targets: &Tensor, kernels: &KernelConfig) -> Result<Tensor> {
        if kernels.applies(logits) {
            return self.compute_fused(logits, targets);
        }
        self.compute_expression(logits, targets)
    }

    /// [`Loss::compute`] as candle expressions (every device).
    pub fn compute_expression(&self, logits: &Tensor, targets: &Tensor) -> Result<Tensor> {
        match self {
            Self::CrossEntropy { class_weights } => cross_entropy(logits, targets, class_weights.as_deref()),
            Self::SoftDice {
                include_background,
                eps,
            } => soft_dice_loss(logits, targets, *include_background, *eps),
            Self::DiceCe {
                dice_weight,
                ce_weight,
                class_weights,
                include_background,
                eps,
            } => {
                let dice = soft_dice_loss(logits, targets, *include_background, *eps)?;
                let ce = cross_entropy(logits, targets, class_weights.as_deref())?;
                Ok(((dice * *dice_weight)? + (ce * *ce_weight)?)?)
            }
        }
    }
}

impl Loss {
    /// [`Loss::compute`] as one fused CPU op (f32 logits on the CPU).
    fn compute_fused(&self, logits: &Tensor, targets: &Tensor) -> Result<Tensor> {
        let (b, c, h, w) = logits.dims4()?;
        check_targets(targets, logits, (b, h, w))?;
        let weights = |cw: &Option<Vec<f32>>| -> Result<Option<Vec<f32>>> {
            if let Some(w) = cw {
                check_class_weights(w, c)?;
            }
            Ok(cw.clone())
        };
        let spec = match self {
            Self::CrossEntropy { class_weights } => LossSpec {
                dice: None,
                ce: Some((1.0, weights(class_weights)?)),
            },
            Self::SoftDice {
                include_background,
                eps,
            } => LossSpec {
                dice: Some((1.0, *include_background, *eps)),
                ce: None,
            },
            Self::DiceCe {
                dice_weight,
                ce_weight,
                class_weights,
                include_background,
                eps,
            } => LossSpec {
                dice: Some((*dice_weight, *include_background, *eps)),
                ce: Some((*ce_weight, weights(class_weights)?)),
            },
        };
        Ok(fused_loss(logits, targets, spec)?)
    }
}

fn check_class_weights(w: &[f32], c: usize) -> Result<()> {
    if w.len() != c {
        return Err(LossError::Shape(format!("{} class weights for {c} classes", w.len())));
    }
    Ok(())
}

fn check_targets(targets: &Tensor, logits: &Tensor, (b, h, w): (usize, usize, usize)) -> Result<()> {
    if targets.dims() != [b, h, w] {
        return Err(LossError::Shape(format!(
            "logits {:?} need targets [{b}, {h}, {w}], got {:?}",
            logits.dims(),
            targets.dims()
        )));
    }
    Ok(())
}

/// One-hot encoding of `targets` `[B, H, W]` (u32) as `[B, C, H, W]` in the
/// logits' dtype. Errors when the shapes do not fit.
pub fn one_hot(targets: &Tensor, logits: &Tensor) -> Result<Tensor> {
    let (b, c, h, w) = logits.dims4()?;
    check_targets(targets, logits, (b, h, w))?;
    let classes = Tensor::arange(0u32, c as u32, targets.device())?.reshape((1, c, 1, 1))?;
    let targets = targets.to_dtype(DType::U32)?.unsqueeze(1)?;
    Ok(targets.broadcast_eq(&classes)?.to_dtype(logits.dtype())?)
}

/// Cross-entropy over classes, averaged over pixels.
///
/// With `class_weights` it is PyTorch's weighted mean:
/// `Σ w[y]·(−log p[y]) / Σ w[y]` over all pixels.
pub fn cross_entropy(logits: &Tensor, targets: &Tensor, class_weights: Option<&[f32]>) -> Result<Tensor> {
    let onehot = one_hot(targets, logits)?;
    let logp = candle_nn::ops::log_softmax(logits, 1)?;
    // −log p of the target class, per pixel: [B, H, W]
    let nll = (logp * &onehot)?.sum(1)?.neg()?;
    match class_weights {
        None => Ok(nll.mean_all()?),
        Some(w) => {
            let c = logits.dim(1)?;
            check_class_weights(w, c)?;
            let w = Tensor::from_slice(w, (1, c, 1, 1), logits.device())?.to_dtype(logits.dtype())?;
            let pixel_w = onehot.broadcast_mul(&w)?.sum(1)?;
            Ok(((nll * &pixel_w)?.sum_all()? / pixel_w.sum_all()?)?)
        }
    }
}

/// Soft Dice per image and class, `[B, C]`: with `p = softmax(logits)` and `t`
/// one-hot, `(2·Σ p·t + eps) / (Σ p + Σ t + eps)` over the pixels.
pub fn soft_dice_per_class(logits: &Tensor, targets: &Tensor, eps: f64) -> Result<Tensor> {
    let t = one_hot(targets, logits)?;
    let p = candle_nn::ops::softmax(logits, 1)?;
    let inter = (&p * &t)?.flatten_from(2)?.sum(D::Minus1)?;
    let denom = (p.flatten_from(2)?.sum(D::Minus1)? + t.flatten_from(2)?.sum(D::Minus1)?)?;
    Ok((((inter * 2.0)? + eps)? / (denom + eps)?)?)
}

/// The report's soft Dice loss: 1 − the mean soft Dice over the foreground
/// classes 1.. (and class 0 too with `include_background`), then over the
/// batch.
pub fn soft_dice_loss(logits: &Tensor, targets: &Tensor, include_background: bool, eps: f64) -> Result<Tensor> {
    let dice = soft_dice_per_class(logits, targets, eps)?;
    let c = dice.dim(1)?;
    let dice = if include_background {
        dice
    } else {
        dice.narrow(1, 1, c - 1)?
    };
    Ok(dice.mean_all()?.affine(-1.0, 1.0)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    fn data(seed: u64) -> (Tensor, Tensor) {
        let dev = Device::Cpu;
        let n = 2 * 4 * 3 * 5;
        // a fixed pseudo-random pattern, no RNG needed
        let logits: Vec<f64> = (0..n)
            .map(|i| (((i as u64 * 7919 + seed * 104729) % 1000) as f64 / 250.0) - 2.0)
            .collect();
        let targets: Vec<u32> = (0..30).map(|i| ((i as u64 * 31 + seed) % 4) as u32).collect();
        (
            Tensor::from_vec(logits, (2, 4, 3, 5), &dev).unwrap(),
            Tensor::from_vec(targets, (2, 3, 5), &dev).unwrap(),
        )
    }

    fn scalar(t: &Tensor) -> f64 {
        t.to_dtype(DType::F64).unwrap().to_scalar::<f64>().unwrap()
    }

    #[test]
    fn cross_entropy_equals_candle_nn_on_reshaped_input() {
        let (logits, targets) = data(1);
        let ours = scalar(&cross_entropy(&logits, &targets, None).unwrap());
        let flat = logits.permute((0, 2, 3, 1)).unwrap().reshape((30, 4)).unwrap();
        let theirs = scalar(&candle_nn::loss::cross_entropy(&flat, &targets.flatten_all().unwrap()).unwrap());
        assert!((ours - theirs).abs() < 1e-12, "{ours} vs {theirs}");
    }

    #[test]
    fn class_weights_by_hand() {
        // one image, two pixels, two classes: logits give p = softmax
        let dev = Device::Cpu;
        let logits = Tensor::from_vec(vec![0f64, 1.0, 0.0, -1.0], (1, 2, 1, 2), &dev).unwrap();
        // pixel 0: logits (0, 0) -> p = (0.5, 0.5); pixel 1: logits (1, -1)
        let targets = Tensor::from_vec(vec![1u32, 0], (1, 1, 2), &dev).unwrap();
        let nll0 = 2f64.ln();
        let nll1 = -(1f64.exp() / (1f64.exp() + (-1f64).exp())).ln();
        let plain = scalar(&cross_entropy(&logits, &targets, None).unwrap());
        assert!((plain - (nll0 + nll1) / 2.0).abs() < 1e-12);
        let weighted = scalar(&cross_entropy(&logits, &targets, Some(&[1.0, 3.0])).unwrap());
        // pixel 0 is class 1 (weight 3), pixel 1 class 0 (weight 1)
        let expected = (3.0 * nll0 + nll1) / 4.0;
        assert!((weighted - expected).abs() < 1e-6, "{weighted} vs {expected}");
        assert!((weighted - plain).abs() > 0.05);
    }

    #[test]
    fn soft_dice_equals_hard_dice_for_one_hot_probabilities() {
        // very large logits make softmax one-hot
        let dev = Device::Cpu;
        #[rustfmt::skip]
        let pred: Vec<u32> = vec![0, 1, 1, 2,
                                  3, 3, 0, 0];
        #[rustfmt::skip]
        let gt: Vec<u32> = vec![0, 1, 2, 2,
                                3, 0, 0, 1];
        let mut logits = vec![0f64; 4 * 8];
        for (i, &c) in pred.iter().enumerate() {
            logits[c as usize * 8 + i] = 100.0;
        }
        let logits = Tensor::from_vec(logits, (1, 4, 2, 4), &dev).unwrap();
        let targets = Tensor::from_vec(gt, (1, 2, 4), &dev).unwrap();
        let d = soft_dice_per_class(&logits, &targets, 0.0)
            .unwrap()
            .to_vec2::<f64>()
            .unwrap();
        // class 1: pred {1,2}, gt {1,7}: 2·1/4; class 2: pred {3}, gt {2,3}: 2/3; class 3: pred {4,5}, gt {4}: 2/3
        let hard = [0.5, 2.0 / 3.0, 2.0 / 3.0];
        for c in 0..3 {
            assert!((d[0][c + 1] - hard[c]).abs() < 1e-9, "class {}: {}", c + 1, d[0][c + 1]);
        }
        let loss = scalar(&soft_dice_loss(&logits, &targets, false, 0.0).unwrap());
        assert!((loss - (1.0 - (0.5 + 4.0 / 3.0) / 3.0)).abs() < 1e-9);
    }

    #[test]
    fn soft_dice_gradient_matches_finite_differences() {
        let (logits, targets) = data(3);
        let x = Var::from_tensor(&logits).unwrap();
        let f = |t: &Tensor| soft_dice_loss(t, &targets, false, 1e-6).unwrap();
        let g = f(x.as_tensor()).backward().unwrap();
        let g = g
            .get(x.as_tensor())
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f64>()
            .unwrap();
        let base = logits.flatten_all().unwrap().to_vec1::<f64>().unwrap();
        let eps = 1e-6;
        for i in 0..base.len() {
            let mut p = base.clone();
            p[i] += eps;
            let mut m = base.clone();
            m[i] -= eps;
            let fp = scalar(&f(&Tensor::from_vec(p, logits.dims(), &Device::Cpu).unwrap()));
            let fm = scalar(&f(&Tensor::from_vec(m, logits.dims(), &Device::Cpu).unwrap()));
            let numeric = (fp - fm) / (2.0 * eps);
            assert!(
                (numeric - g[i]).abs() <= 1e-6 * numeric.abs().max(1e-2),
                "{i}: {numeric} vs {}",
                g[i]
            );
        }
    }

    #[test]
    fn cross_entropy_gradient_matches_finite_differences() {
        let (logits, targets) = data(5);
        let x = Var::from_tensor(&logits).unwrap();
        let w = [0.5f32, 1.0, 2.0, 1.5];
        let f = |t: &Tensor| {
            Loss::DiceCe {
                dice_weight: 0.7,
                ce_weight: 1.3,
                class_weights: Some(w.to_vec()),
                include_background: true,
                eps: 1e-6,
            }
            .compute(t, &targets, &KernelConfig::DEFAULT)
            .unwrap()
        };
        let g = f(x.as_tensor()).backward().unwrap();
        let g = g
            .get(x.as_tensor())
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f64>()
            .unwrap();
        let base = logits.flatten_all().unwrap().to_vec1::<f64>().unwrap();
        let eps = 1e-6;
        for i in (0..base.len()).step_by(7) {
            let mut p = base.clone();
            p[i] += eps;
            let mut m = base.clone();
            m[i] -= eps;
            let fp = scalar(&f(&Tensor::from_vec(p, logits.dims(), &Device::Cpu).unwrap()));
            let fm = scalar(&f(&Tensor::from_vec(m, logits.dims(), &Device::Cpu).unwrap()));
            let numeric = (fp - fm) / (2.0 * eps);
            assert!(
                (numeric - g[i]).abs() <= 1e-5 * numeric.abs().max(1e-2),
                "{i}: {numeric} vs {}",
                g[i]
            );
        }
    }

    #[test]
    fn dice_ce_is_the_weighted_sum() {
        let (logits, targets) = data(2);
        let d = scalar(
            &Loss::soft_dice()
                .compute(&logits, &targets, &KernelConfig::DEFAULT)
                .unwrap(),
        );
        let c = scalar(
            &Loss::cross_entropy()
                .compute(&logits, &targets, &KernelConfig::DEFAULT)
                .unwrap(),
        );
        let both = scalar(
            &Loss::dice_ce(0.25, 2.0)
                .compute(&logits, &targets, &KernelConfig::DEFAULT)
                .unwrap(),
        );
        assert!((both - (0.25 * d + 2.0 * c)).abs() < 1e-9);
    }

    #[test]
    fn shapes_and_configs_are_checked() {
        let (logits, _) = data(1);
        let wrong = Tensor::zeros((2, 3, 4), DType::U32, &Device::Cpu).unwrap();
        assert!(matches!(
            Loss::soft_dice().compute(&logits, &wrong, &KernelConfig::DEFAULT),
            Err(LossError::Shape(_))
        ));
        let bad = Loss::CrossEntropy {
            class_weights: Some(vec![1.0, 2.0]),
        };
        assert!(bad.validate(4).is_err());
        assert!(Loss::dice_ce(-1.0, 1.0).validate(4).is_err());
        assert!(Loss::default().validate(4).is_ok());
        let json = r#"{"kind":"dice_ce","ce_weight":0.5}"#;
        let l: Loss = serde_json::from_str(json).unwrap();
        assert_eq!(l, Loss::dice_ce(1.0, 0.5));
        assert!(serde_json::from_str::<Loss>(r#"{"kind":"soft_dice","epsilon":1}"#).is_err());
    }
}

/// The fused op against the candle expressions.
#[cfg(test)]
mod fused_tests {
    use super::*;
    use candle_core::{DType, Device, Tensor, Var};

    fn data(b: usize, c: usize, h: usize, w: usize, seed: u64) -> (Vec<f32>, Tensor) {
        let n = b * c * h * w;
        let logits: Vec<f32> = (0..n)
            .map(|i| (((i as u64 * 7919 + seed * 104729) % 1000) as f32 / 200.0) - 2.5)
            .collect();
        let t: Vec<u32> = (0..b * h * w)
            .map(|i| ((i as u64 * 31 + seed * 17) % c as u64) as u32)
            .collect();
        (logits, Tensor::from_vec(t, (b, h, w), &Device::Cpu).unwrap())
    }

    fn losses() -> Vec<Loss> {
        vec![
            Loss::soft_dice(),
            Loss::SoftDice {
                include_background: true,
                eps: 1e-3,
            },
            Loss::cross_entropy(),
            Loss::CrossEntropy {
                class_weights: Some(vec![0.5, 2.0, 1.0, 3.0]),
            },
            Loss::dice_ce(1.0, 1.0),
            Loss::DiceCe {
                dice_weight: 0.7,
                ce_weight: 1.3,
                class_weights: Some(vec![1.0, 2.0, 0.5, 1.5]),
                include_background: true,
                eps: 1e-6,
            },
        ]
    }

    /// Value and logits gradient of the fused op against the candle
    /// expressions, for every loss and its options.
    #[test]
    fn fused_matches_the_expressions() {
        let (b, c, h, w) = (3, 4, 7, 6);
        for loss in losses() {
            let (lv, targets) = data(b, c, h, w, 3);
            let logits = Var::from_vec(lv, (b, c, h, w), &Device::Cpu).unwrap();
            let fused = loss
                .compute(logits.as_tensor(), &targets, &KernelConfig::DEFAULT)
                .unwrap();
            let expr = loss.compute_expression(logits.as_tensor(), &targets).unwrap();
            let (f, e) = (fused.to_scalar::<f32>().unwrap(), expr.to_scalar::<f32>().unwrap());
            assert!((f - e).abs() <= 1e-5 * e.abs().max(1.0), "{loss:?}: {f} vs {e}");
            let gf = fused.backward().unwrap().get(logits.as_tensor()).unwrap().clone();
            let ge = expr.backward().unwrap().get(logits.as_tensor()).unwrap().clone();
            let scale = ge.abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
            let diff = (&gf - &ge)
                .unwrap()
                .abs()
                .unwrap()
                .max_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap();
            assert!(
                scale > 0.0 && diff <= 1e-4 * scale,
                "{loss:?}: gradient off by {diff} of {scale}"
            );
        }
    }

    /// The fused backward against central differences of the fused forward.
    #[test]
    fn fused_gradient_matches_finite_differences() {
        let (b, c, h, w) = (2, 4, 3, 4);
        let dev = Device::Cpu;
        for loss in [losses()[4].clone(), losses()[5].clone()] {
            let (lv, targets) = data(b, c, h, w, 5);
            let f = |v: &[f32]| -> f64 {
                let t = Tensor::from_slice(v, (b, c, h, w), &dev).unwrap();
                f64::from(
                    loss.compute(&t, &targets, &KernelConfig::DEFAULT)
                        .unwrap()
                        .to_scalar::<f32>()
                        .unwrap(),
                )
            };
            let var = Var::from_slice(&lv, (b, c, h, w), &dev).unwrap();
            let g = loss
                .compute(var.as_tensor(), &targets, &KernelConfig::DEFAULT)
                .unwrap()
                .backward()
                .unwrap();
            let g = g
                .get(var.as_tensor())
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap();
            let eps = 1e-2f32;
            for i in (0..lv.len()).step_by(3) {
                let (mut up, mut down) = (lv.clone(), lv.clone());
                up[i] += eps;
                down[i] -= eps;
                let numeric = (f(&up) - f(&down)) / f64::from(2.0 * eps);
                let analytic = f64::from(g[i]);
                assert!(
                    (numeric - analytic).abs() <= 2e-3 * numeric.abs().max(0.01),
                    "{loss:?} [{i}]: {numeric} vs {analytic}"
                );
            }
        }
    }

    /// Off the CPU's f32 (here f64), `compute` takes the expressions; a
    /// target class past the logits' classes is an error that says so.
    #[test]
    fn other_dtypes_use_the_expressions_and_bad_targets_are_named() {
        let (lv, targets) = data(1, 4, 3, 3, 1);
        let l32 = Tensor::from_vec(lv, (1, 4, 3, 3), &Device::Cpu).unwrap();
        let l64 = l32.to_dtype(DType::F64).unwrap();
        let loss = Loss::dice_ce(1.0, 1.0);
        let a = loss
            .compute(&l32, &targets, &KernelConfig::DEFAULT)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        let b = loss
            .compute(&l64, &targets, &KernelConfig::DEFAULT)
            .unwrap()
            .to_scalar::<f64>()
            .unwrap();
        assert!((f64::from(a) - b).abs() < 1e-5, "{a} vs {b}");
        let bad = Tensor::from_vec(vec![5u32; 9], (1, 3, 3), &Device::Cpu).unwrap();
        let err = loss
            .compute(&l32, &bad, &KernelConfig::DEFAULT)
            .unwrap_err()
            .to_string();
        assert!(err.contains("target class 5 for 4 classes"), "{err}");
    }
}
