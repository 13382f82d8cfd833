//! Bilinear up-sampling by an integer factor (`align_corners = false`) as a
//! direct two-tap kernel: along W into a row buffer, then along H. The
//! backward pass is the adjoint, in the reverse order. Same function as
//! [`crate::ops::upsample_bilinear`] (two matrix products with candle's ops),
//! without its transposed copies.

use candle_core::{CpuStorage, CustomOp1, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use crate::cpu::{fresh, simd_fn};
use crate::{KernelConfig, slice, with_data};

/// For each output index along one axis: the two input indices it reads and
/// the weight of the second.
pub(crate) struct Taps {
    pub(crate) lo: Vec<usize>,
    pub(crate) hi: Vec<usize>,
    pub(crate) lambda: Vec<f32>,
}

/// The taps of `n` inputs up-sampled `factor` times, by the formula of
/// [`crate::ops::bilinear_matrix`].
pub(crate) fn taps(n: usize, factor: usize) -> Taps {
    let m = n * factor;
    let mut t = Taps {
        lo: Vec::with_capacity(m),
        hi: Vec::with_capacity(m),
        lambda: Vec::with_capacity(m),
    };
    for i in 0..m {
        let src = ((i as f64 + 0.5) / factor as f64 - 0.5).max(0.0);
        let lo = (src.floor() as usize).min(n - 1);
        t.lo.push(lo);
        t.hi.push((lo + 1).min(n - 1));
        t.lambda.push((src - lo as f64) as f32);
    }
    t
}

simd_fn! {
    /// One plane `[h, w]` → `[h·f, w·f]`.
    fn up_plane(simd: Simd, x: &[f32], w: usize, th: &Taps, tw: &Taps, rows: &mut Vec<f32>, y: &mut [f32]) {
        let wo = tw.lo.len();
        let h = x.len() / w;
        rows.resize(h * wo, 0.0);
        for (xr, tr) in x.chunks(w).zip(rows.chunks_mut(wo)) {
            for (o, ((&a, &b), &l)) in tr.iter_mut().zip(tw.lo.iter().zip(&tw.hi).zip(&tw.lambda)) {
                *o = xr[a] * (1.0 - l) + xr[b] * l;
            }
        }
        for (yr, ((&a, &b), &l)) in y.chunks_mut(wo).zip(th.lo.iter().zip(&th.hi).zip(&th.lambda)) {
            let (ra, rb) = (&rows[a * wo..][..wo], &rows[b * wo..][..wo]);
            for ((o, &va), &vb) in yr.iter_mut().zip(ra).zip(rb) {
                *o = va * (1.0 - l) + vb * l;
            }
        }
    }

    /// The adjoint of [`up_plane`]: `dy [h·f, w·f]` → `dx [h, w]`.
    fn up_plane_adjoint(simd: Simd, dy: &[f32], w: usize, th: &Taps, tw: &Taps, rows: &mut Vec<f32>, dx: &mut [f32]) {
        let wo = tw.lo.len();
        let h = dx.len() / w;
        rows.clear();
        rows.resize(h * wo, 0.0);
        for (gr, ((&a, &b), &l)) in dy.chunks(wo).zip(th.lo.iter().zip(&th.hi).zip(&th.lambda)) {
            for (o, &g) in rows[a * wo..][..wo].iter_mut().zip(gr) {
                *o += g * (1.0 - l);
            }
            for (o, &g) in rows[b * wo..][..wo].iter_mut().zip(gr) {
                *o += g * l;
            }
        }
        dx.fill(0.0);
        for (dr, tr) in dx.chunks_mut(w).zip(rows.chunks(wo)) {
            for (&g, ((&a, &b), &l)) in tr.iter().zip(tw.lo.iter().zip(&tw.hi).zip(&tw.lambda)) {
                dr[a] += g * (1.0 - l);
                dr[b] += g * l;
            }
        }
    }
}

struct UpsampleOp {
    factor: usize,
    cfg: KernelConfig,
}

impl CustomOp1 for UpsampleOp {
    fn name(&self) -> &'static str {
        "cmr-upsample-bilinear"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let simd = self.cfg.simd;
        let (b, c, h, w) = l.shape().dims4()?;
        let f = self.factor;
        let (th, tw) = (taps(h, f), taps(w, f));
        let x = slice(s, l)?;
        // SAFETY: `up_plane` writes every row of its output plane, reading none.
        let out = unsafe {
            fresh(b * c * h * f * w * f, |out| {
                out.par_chunks_mut(h * f * w * f)
                    .zip(x.par_chunks(h * w))
                    .for_each_init(Vec::new, |rows, (y, xp)| up_plane(simd, xp, w, &th, &tw, rows, y))
            })
        };
        Ok((CpuStorage::F32(out), Shape::from((b, c, h * f, w * f))))
    }

    fn bwd(&self, arg: &Tensor, _res: &Tensor, dy: &Tensor) -> Result<Option<Tensor>> {
        let simd = self.cfg.simd;
        let (b, c, h, w) = arg.dims4()?;
        let f = self.factor;
        let (th, tw) = (taps(h, f), taps(w, f));
        let dx = with_data(dy, |g| {
            let mut dx = vec![0f32; b * c * h * w];
            dx.par_chunks_mut(h * w)
                .zip(g.par_chunks(h * f * w * f))
                .for_each_init(Vec::new, |rows, (d, gp)| {
                    up_plane_adjoint(simd, gp, w, &th, &tw, rows, d)
                });
            dx
        })?;
        Ok(Some(Tensor::from_vec(dx, (b, c, h, w), arg.device())?))
    }
}

/// Bilinear up-sampling of `x [B, C, H, W]` by `factor ≥ 1`
/// (`align_corners = false`). CPU and f32 only; see [`KernelConfig::applies`].
pub fn upsample_bilinear(x: &Tensor, factor: usize, cfg: &KernelConfig) -> Result<Tensor> {
    if factor == 0 {
        candle_core::bail!("up-sampling factor must be at least 1");
    }
    crate::tape::apply1(x, &x.contiguous()?, UpsampleOp { factor, cfg: *cfg })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::KernelConfig;

    const CFG: &KernelConfig = &KernelConfig::DEFAULT;
    use crate::testing::{FiniteDiff, assert_gradient, narrow, widen};
    use candle_core::{Device, Var};

    /// Finite differences of the op's own backward (the adjoint).
    #[test]
    fn gradient_matches_finite_differences() {
        let dev = Device::Cpu;
        let (h, w, f) = (3, 4, 2);
        let x0: Vec<f32> = (0..2 * h * w).map(|i| ((i * 7 % 11) as f32 - 5.0) / 3.0).collect();
        let probe = Tensor::randn(0f32, 1.0, (1, 2, h * f, w * f), &dev).unwrap();
        let f_of = |v: &[f32]| -> f64 {
            let x = Tensor::from_slice(v, (1, 2, h, w), &dev).unwrap();
            let y = upsample_bilinear(&x, f, CFG).unwrap();
            f64::from((y * &probe).unwrap().sum_all().unwrap().to_scalar::<f32>().unwrap())
        };
        let xv = Var::from_tensor(&Tensor::from_slice(&x0, (1, 2, h, w), &dev).unwrap()).unwrap();
        let g = (upsample_bilinear(&xv, f, CFG).unwrap() * &probe)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        let gx = g.get(&xv).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
        assert_gradient(
            "dx",
            |v: &[f64]| f_of(&narrow(v)),
            &widen(&x0),
            &widen(&gx),
            FiniteDiff {
                eps: 1e-2,
                tol: 1e-3,
                floor: 1.0,
            },
            0..x0.len(),
        );
    }
}
