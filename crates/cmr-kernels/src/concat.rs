//! Concatenation along the channels of `[B, C, H, W]` images, and its
//! inverse, with the copies split among the threads (candle's `cat` copies
//! on one thread, and a `narrow` of its gradient is a strided view that
//! each consumer copies again).

use candle_core::{CpuStorage, CustomOp2, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use crate::cpu::fresh;
use crate::{slice, tape, with_data};

/// `[a; b]` along the channels, as one op.
struct Cat2;

impl CustomOp2 for Cat2 {
    fn name(&self) -> &'static str {
        "cmr-cat-channels"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
        let (b, c1, h, w) = l1.shape().dims4()?;
        let (b2, c2, h2, w2) = l2.shape().dims4()?;
        if (b, h, w) != (b2, h2, w2) {
            candle_core::bail!("cat: {:?} and {:?} differ beyond the channels", l1.dims(), l2.dims());
        }
        let (x1, x2) = (slice(s1, l1)?, slice(s2, l2)?);
        let hw = h * w;
        // SAFETY: each image's block is written in full by its two copies,
        // and none read.
        let out = unsafe {
            fresh(b * (c1 + c2) * hw, |out| {
                out.par_chunks_mut((c1 + c2) * hw)
                    .zip(x1.par_chunks(c1 * hw).zip(x2.par_chunks(c2 * hw)))
                    .for_each(|(o, (a, bb))| {
                        o[..c1 * hw].copy_from_slice(a);
                        o[c1 * hw..].copy_from_slice(bb);
                    })
            })
        };
        Ok((CpuStorage::F32(out), Shape::from((b, c1 + c2, h, w))))
    }

    fn bwd(&self, a: &Tensor, b: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let mut parts = split_channels(grad, &[a.dim(1)?, b.dim(1)?])?.into_iter();
        Ok((parts.next(), parts.next()))
    }
}

/// `Tensor::cat(&[a, b], 1)` for f32 CPU images, as one op (on the tape when
/// recording).
pub(crate) fn cat2(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    tape::apply2([a, b], [&a.contiguous()?, &b.contiguous()?], Cat2)
}

/// `g [B, Σ sizes, H, W]` cut along the channels into `[B, sizes[i], H, W]`
/// contiguous tensors.
pub(crate) fn split_channels(g: &Tensor, sizes: &[usize]) -> Result<Vec<Tensor>> {
    let (b, c, h, w) = g.dims4()?;
    if sizes.iter().sum::<usize>() != c {
        candle_core::bail!("split: {sizes:?} channels out of {c}");
    }
    let hw = h * w;
    with_data(g, |gs| {
        let mut start = 0;
        sizes
            .iter()
            .map(|&n| {
                // SAFETY: each image's block of the part is copied in full,
                // and none read.
                let part = unsafe {
                    fresh(b * n * hw, |part| {
                        part.par_chunks_mut(n * hw)
                            .zip(gs.par_chunks(c * hw))
                            .for_each(|(p, gi)| p.copy_from_slice(&gi[start * hw..(start + n) * hw]))
                    })
                };
                start += n;
                Tensor::from_vec(part, (b, n, h, w), g.device())
            })
            .collect()
    })?
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::KernelConfig;

    const CFG: &KernelConfig = &KernelConfig::DEFAULT;
    use crate::{Tape, record};
    use candle_core::{Device, Var};

    /// Two and four parts along the channels, values and gradients through
    /// candle's backward and through the tape, against candle's `cat`.
    #[test]
    fn matches_candle_cat_both_ways() {
        let dev = Device::Cpu;
        let max_diff =
            |a: &Tensor, b: &Tensor| -> f32 { (a - b).and_then(|d| d.abs()?.max_all()?.to_scalar()).unwrap() };
        for sizes in [vec![3usize, 5], vec![2, 1, 4, 3]] {
            let vars: Vec<Var> = sizes
                .iter()
                .map(|&c| Var::from_tensor(&Tensor::randn(0f32, 1.0, (2, c, 3, 4), &dev).unwrap()).unwrap())
                .collect();
            let parts: Vec<&Tensor> = vars.iter().map(|v| v.as_tensor()).collect();
            let total: usize = sizes.iter().sum();
            let probe = Tensor::randn(0f32, 1.0, (2, total, 3, 4), &dev).unwrap();
            let want = Tensor::cat(&parts, 1).unwrap();
            let ours = tape::cat(&parts, 1, CFG).unwrap();
            assert_eq!(max_diff(&ours, &want), 0.0, "{sizes:?}");
            let gw = (&want * &probe).unwrap().sum_all().unwrap().backward().unwrap();
            let gc = (&ours * &probe).unwrap().sum_all().unwrap().backward().unwrap();
            let (y, t): (Tensor, Tape) = record(|| tape::cat(&parts, 1, CFG)).unwrap();
            let gt = t.backward(&y, probe.clone()).unwrap();
            for v in &vars {
                let w = gw.get(v.as_tensor()).unwrap();
                for g in [gc.get(v.as_tensor()).unwrap(), gt.get(v.as_tensor()).unwrap()] {
                    assert_eq!(max_diff(g, w), 0.0, "{sizes:?}");
                }
            }
        }
    }
}
