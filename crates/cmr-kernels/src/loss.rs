//! The losses as one CPU op each way: soft Dice, cross-entropy and their
//! weighted sum in one pass over the logits (softmax per pixel, the sums per
//! image and class, the negative log-likelihood), with a backward pass that
//! writes the logits' gradient in one more.
//!
//! cmr-loss's candle expressions compute the same functions on every
//! device; on the CPU in f32 they are a dozen ops, each a pass over the
//! `[B, C, H, W]` logits with a fresh tensor (about 6 % of a narrow
//! network's training step), and their backward as many again. cmr-loss
//! takes this op where [`crate::KernelConfig::applies`] says the kernels
//! run, and its tests compare the two.

use std::sync::Mutex;

use candle_core::{CpuStorage, CustomOp2, DType, Layout, Shape, Tensor};
use rayon::prelude::*;

/// What the fused op computes: `dice.0 · (1 − mean soft Dice)` and `ce.0 ·
/// (weighted) cross-entropy`, either or both.
#[derive(Clone, Debug)]
pub struct LossSpec {
    /// `(weight, include_background, eps)`.
    pub dice: Option<(f64, bool, f64)>,
    /// `(weight, class weights)`.
    pub ce: Option<(f64, Option<Vec<f32>>)>,
}

/// Per image: the softmax sums `(Σ p·t, Σ p, Σ t)` per class and the
/// cross-entropy's `(Σ w[y]·(−log p[y]), Σ w[y])`, in f64.
struct ImageSums {
    inter: Vec<f64>,
    prob: Vec<f64>,
    count: Vec<f64>,
    nll: f64,
    weight: f64,
}

/// Softmax over the `c` planes of one image at pixel `x`, into `p`; returns
/// the largest logit `m` and `Σ exp(logit − m)` (the log-sum-exp is `m` plus
/// its logarithm).
#[inline(always)]
fn softmax_at(logits: &[f32], hw: usize, x: usize, p: &mut [f32]) -> (f32, f32) {
    let mut m = f32::NEG_INFINITY;
    for (ci, v) in p.iter_mut().enumerate() {
        *v = logits[ci * hw + x];
        m = m.max(*v);
    }
    let mut s = 0f32;
    for v in p.iter_mut() {
        *v = (*v - m).exp();
        s += *v;
    }
    for v in p.iter_mut() {
        *v /= s;
    }
    (m, s)
}

fn class_of(t: u32, c: usize) -> candle_core::Result<usize> {
    let t = t as usize;
    if t >= c {
        candle_core::bail!("target class {t} for {c} classes");
    }
    Ok(t)
}

/// One image's sums, its softmax written into `probs [c, hw]`.
fn image_sums(
    logits: &[f32],
    targets: &[u32],
    c: usize,
    weights: Option<&[f32]>,
    probs: &mut [f32],
) -> candle_core::Result<ImageSums> {
    let hw = targets.len();
    let mut s = ImageSums {
        inter: vec![0.0; c],
        prob: vec![0.0; c],
        count: vec![0.0; c],
        nll: 0.0,
        weight: 0.0,
    };
    let mut p = vec![0f32; c];
    for (x, &t) in targets.iter().enumerate() {
        let t = class_of(t, c)?;
        let (m, sum) = softmax_at(logits, hw, x, &mut p);
        for (ci, &pv) in p.iter().enumerate() {
            s.prob[ci] += f64::from(pv);
            probs[ci * hw + x] = pv;
        }
        s.inter[t] += f64::from(p[t]);
        s.count[t] += 1.0;
        // −log p[t] from the logits (log-sum-exp), not from the rounded p
        let lse = f64::from(m) + f64::from(sum).ln();
        let w = weights.map_or(1.0, |w| f64::from(w[t]));
        s.nll += w * (lse - f64::from(logits[t * hw + x]));
        s.weight += w;
    }
    Ok(s)
}

/// The classes the Dice term averages over.
fn dice_classes(c: usize, include_background: bool) -> std::ops::Range<usize> {
    if include_background { 0..c } else { 1..c }
}

struct FusedLoss {
    spec: LossSpec,
    /// The forward pass's sums and softmax `[B, C, H, W]`, for the backward
    /// one.
    saved: Mutex<Option<(Vec<ImageSums>, Vec<f32>)>>,
}

impl FusedLoss {
    /// Every image's sums, and the softmax.
    fn sums(
        &self,
        logits: &[f32],
        targets: &[u32],
        b: usize,
        c: usize,
    ) -> candle_core::Result<(Vec<ImageSums>, Vec<f32>)> {
        let hw = targets.len() / b.max(1);
        let weights = self.spec.ce.as_ref().and_then(|(_, w)| w.as_deref());
        let mut probs = vec![0f32; logits.len()];
        let sums = probs
            .par_chunks_mut(c * hw)
            .zip(logits.par_chunks(c * hw).zip(targets.par_chunks(hw)))
            .map(|(p, (l, t))| image_sums(l, t, c, weights, p))
            .collect::<candle_core::Result<Vec<_>>>()?;
        Ok((sums, probs))
    }
}

fn data<'a, T: candle_core::WithDType>(s: &'a CpuStorage, l: &Layout) -> candle_core::Result<&'a [T]> {
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(&s.as_slice::<T>()?[a..b]),
        None => candle_core::bail!("fused loss: inputs must be contiguous"),
    }
}

impl CustomOp2 for FusedLoss {
    fn name(&self) -> &'static str {
        "cmr-fused-loss"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (b, c, _, _) = l1.shape().dims4()?;
        let (sums, probs) = self.sums(data::<f32>(s1, l1)?, data::<u32>(s2, l2)?, b, c)?;
        let mut loss = 0f64;
        if let Some((dw, bg, eps)) = self.spec.dice {
            let classes = dice_classes(c, bg);
            let n = (b * classes.len()) as f64;
            let mean: f64 = sums
                .iter()
                .flat_map(|s| {
                    classes
                        .clone()
                        .map(move |ci| (2.0 * s.inter[ci] + eps) / (s.prob[ci] + s.count[ci] + eps))
                })
                .sum::<f64>()
                / n;
            loss += dw * (1.0 - mean);
        }
        if let Some((cw, _)) = &self.spec.ce {
            let (nll, w): (f64, f64) = sums.iter().fold((0.0, 0.0), |(a, b), s| (a + s.nll, b + s.weight));
            loss += cw * nll / w;
        }
        *self.saved.lock().expect("saved lock") = Some((sums, probs));
        Ok((CpuStorage::F32(vec![loss as f32]), Shape::from(())))
    }

    fn bwd(
        &self,
        logits: &Tensor,
        targets: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let (b, c, h, w) = logits.dims4()?;
        let hw = h * w;
        let g = f64::from(grad.to_dtype(DType::F32)?.to_scalar::<f32>()?);
        let tv = targets.contiguous()?.flatten_all()?.to_vec1::<u32>()?;
        let saved = self.saved.lock().expect("saved lock").take();
        let (sums, probs) = match saved {
            Some(s) => s,
            None => self.sums(&logits.contiguous()?.flatten_all()?.to_vec1::<f32>()?, &tv, b, c)?,
        };
        // dLoss/dp for the Dice term, per image and class: −dw/n·(2t − D)/den,
        // as (coefficient of t, constant) = (−2k/den, k·D/den).
        let dice: Option<Vec<(f32, f32)>> = self.spec.dice.map(|(dw, bg, eps)| {
            let classes = dice_classes(c, bg);
            let k = g * dw / (b * classes.len()) as f64;
            sums.iter()
                .flat_map(|s| {
                    let classes = classes.clone();
                    (0..c).map(move |ci| {
                        if !classes.contains(&ci) {
                            return (0.0, 0.0);
                        }
                        let den = s.prob[ci] + s.count[ci] + eps;
                        let d = (2.0 * s.inter[ci] + eps) / den;
                        ((-2.0 * k / den) as f32, (k * d / den) as f32)
                    })
                })
                .collect()
        });
        // The cross-entropy term: g·cw·w[y]/W·(p − t).
        let ce: Option<(f32, Option<Vec<f32>>)> = self.spec.ce.as_ref().map(|(cw, weights)| {
            let total: f64 = sums.iter().map(|s| s.weight).sum();
            ((g * cw / total) as f32, weights.clone())
        });
        let mut out = vec![0f32; probs.len()];
        out.par_chunks_mut(c * hw)
            .zip(probs.par_chunks(c * hw).zip(tv.par_chunks(hw)))
            .enumerate()
            .for_each(|(bi, (d, (pr, t)))| {
                let mut p = vec![0f32; c];
                let mut dp = vec![0f32; c];
                for (x, &ty) in t.iter().enumerate() {
                    let ty = ty as usize;
                    // the cross-entropy's factor at this pixel: g·cw/W·w[y]
                    let ce_y = ce
                        .as_ref()
                        .map(|(s, weights)| s * weights.as_ref().map_or(1.0, |w| w[ty.min(c - 1)]));
                    for (ci, v) in p.iter_mut().enumerate() {
                        *v = pr[ci * hw + x];
                    }
                    // through the softmax: dlogit = p·(dp − Σ p·dp)
                    let mut dot = 0f32;
                    for ci in 0..c {
                        let tc = if ci == ty { 1.0 } else { 0.0 };
                        dp[ci] = dice.as_ref().map_or(0.0, |v| {
                            let (a, k) = v[bi * c + ci];
                            a * tc + k
                        });
                        dot += p[ci] * dp[ci];
                    }
                    for ci in 0..c {
                        let mut v = p[ci] * (dp[ci] - dot);
                        if let Some(sw) = ce_y {
                            let tc = if ci == ty { 1.0 } else { 0.0 };
                            v += sw * (p[ci] - tc);
                        }
                        d[ci * hw + x] = v;
                    }
                }
            });
        Ok((Some(Tensor::from_vec(out, (b, c, h, w), logits.device())?), None))
    }
}

/// The loss `spec` of `logits [B, C, H, W]` (f32, CPU) against `targets [B, H,
/// W]` (shapes checked by the caller), as one op.
pub fn fused_loss(logits: &Tensor, targets: &Tensor, spec: LossSpec) -> candle_core::Result<Tensor> {
    let targets = targets.to_dtype(DType::U32)?.contiguous()?;
    logits.contiguous()?.apply_op2(
        &targets,
        FusedLoss {
            spec,
            saved: Mutex::new(None),
        },
    )
}
