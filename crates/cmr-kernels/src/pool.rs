//! `k×k` max-pooling with stride `k`; the backward pass sends each window's
//! gradient to its first maximum (row-major), as PyTorch does.

use std::sync::{Arc, Mutex};

use candle_core::{CpuStorage, CustomOp1, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use crate::cpu::{fresh, simd_fn};
use crate::{KernelConfig, slice, with_data};

simd_fn! {
    /// One plane `[ho·k, wo·k]` (rows `w` apart): each window's maximum into
    /// `o`, its flat position into `a` (the first maximum, NaN winning).
    fn pool_plane(simd: Simd, o: &mut [f32], a: &mut [u32], plane: &[f32], k: usize, w: usize, ho: usize, wo: usize) {
        for oy in 0..ho {
            for ox in 0..wo {
                let (mut best, mut at) = (f32::NEG_INFINITY, oy * k * w + ox * k);
                for dy in 0..k {
                    let row = (oy * k + dy) * w + ox * k;
                    for (dx, &v) in plane[row..row + k].iter().enumerate() {
                        if v > best || v.is_nan() {
                            best = v;
                            at = row + dx;
                        }
                    }
                }
                o[oy * wo + ox] = best;
                a[oy * wo + ox] = at as u32;
            }
        }
    }
}

struct MaxPoolOp {
    k: usize,
    /// For every output, the flat index of its maximum in the input plane.
    argmax: Arc<Mutex<Vec<u32>>>,
    cfg: KernelConfig,
}

impl CustomOp1 for MaxPoolOp {
    fn name(&self) -> &'static str {
        "cmr-max-pool"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let simd = self.cfg.simd;
        let (b, c, h, w) = l.shape().dims4()?;
        let k = self.k;
        if h % k != 0 || w % k != 0 {
            candle_core::bail!("{k}×{k} max-pool needs a height and width divisible by {k}, got {h}×{w}");
        }
        let (ho, wo) = (h / k, w / k);
        let x = slice(s, l)?;
        let mut arg = vec![0u32; b * c * ho * wo];
        // SAFETY: `pool_plane` writes every output of its plane, reading none.
        let out = unsafe {
            fresh(arg.len(), |out| {
                out.par_chunks_mut(ho * wo)
                    .zip(arg.par_chunks_mut(ho * wo))
                    .zip(x.par_chunks(h * w))
                    .for_each(|((o, a), plane)| pool_plane(simd, o, a, plane, k, w, ho, wo))
            })
        };
        *self.argmax.lock().expect("argmax lock") = arg;
        Ok((CpuStorage::F32(out), Shape::from((b, c, ho, wo))))
    }

    fn bwd(&self, arg: &Tensor, _res: &Tensor, dy: &Tensor) -> Result<Option<Tensor>> {
        let (b, c, h, w) = arg.dims4()?;
        let (ho, wo) = (h / self.k, w / self.k);
        let argmax = self.argmax.lock().expect("argmax lock");
        let dx = with_data(dy, |g| {
            let mut dx = vec![0f32; b * c * h * w];
            dx.par_chunks_mut(h * w)
                .zip(g.par_chunks(ho * wo))
                .zip(argmax.par_chunks(ho * wo))
                .for_each(|((d, gp), ap)| {
                    for (&gv, &i) in gp.iter().zip(ap) {
                        d[i as usize] += gv;
                    }
                });
            dx
        })?;
        Ok(Some(Tensor::from_vec(dx, (b, c, h, w), arg.device())?))
    }
}

/// `k×k` max-pooling, stride `k`, of `x [B, C, H, W]`. CPU and f32 only; see
/// [`KernelConfig::applies`].
pub fn max_pool(x: &Tensor, k: usize, cfg: &KernelConfig) -> Result<Tensor> {
    Ok(max_pool_with_argmax(x, k, cfg)?.0)
}

/// Where each window's maximum was, from [`max_pool_with_argmax`]: for every
/// pooled value, the flat `y·W + x` index in its input plane.
#[derive(Clone)]
pub struct Argmax {
    positions: Arc<Mutex<Vec<u32>>>,
    /// The pooled input's `[B, C, H, W]`.
    input: (usize, usize, usize, usize),
}

impl std::fmt::Debug for Argmax {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Argmax {{ input: {:?} }}", self.input)
    }
}

impl Argmax {
    /// The pooled input's `[B, C, H, W]`.
    pub fn input_dims(&self) -> (usize, usize, usize, usize) {
        self.input
    }

    /// Run `f` on the flat positions, one per pooled value.
    pub fn with_positions<R>(&self, f: impl FnOnce(&[u32]) -> R) -> R {
        f(&self.positions.lock().expect("argmax lock"))
    }
}

/// [`max_pool`], also returning where each maximum was (for un-pooling).
pub fn max_pool_with_argmax(x: &Tensor, k: usize, cfg: &KernelConfig) -> Result<(Tensor, Argmax)> {
    let positions = Arc::new(Mutex::new(Vec::new()));
    let op = MaxPoolOp {
        k,
        argmax: positions.clone(),
        cfg: *cfg,
    };
    let y = crate::tape::apply1(x, &x.contiguous()?, op)?;
    Ok((
        y,
        Argmax {
            positions,
            input: x.dims4()?,
        },
    ))
}

/// Max-unpooling: each value of `x [B, C, H/k, W/k]` goes to its stored
/// position in a zero `[B, C, H, W]`; the gradient is read back from there.
struct UnpoolOp {
    argmax: Argmax,
}

impl CustomOp1 for UnpoolOp {
    fn name(&self) -> &'static str {
        "cmr-max-unpool"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let (b, c, h, w) = self.argmax.input;
        let x = slice(s, l)?;
        let per = x.len() / (b * c).max(1);
        let mut out = vec![0f32; b * c * h * w];
        self.argmax.with_positions(|pos| {
            out.par_chunks_mut(h * w)
                .zip(x.par_chunks(per))
                .zip(pos.par_chunks(per))
                .for_each(|((o, xp), pp)| {
                    for (&v, &i) in xp.iter().zip(pp) {
                        o[i as usize] = v;
                    }
                });
        });
        Ok((CpuStorage::F32(out), Shape::from((b, c, h, w))))
    }

    fn bwd(&self, arg: &Tensor, _res: &Tensor, dy: &Tensor) -> Result<Option<Tensor>> {
        let (b, c, h, w) = self.argmax.input;
        let per = arg.elem_count() / (b * c).max(1);
        let dx = with_data(dy, |g| {
            // SAFETY: every element is written below, from its position,
            // and none is read.
            unsafe {
                fresh(arg.elem_count(), |dx| {
                    self.argmax.with_positions(|pos| {
                        dx.par_chunks_mut(per)
                            .zip(g.par_chunks(h * w))
                            .zip(pos.par_chunks(per))
                            .for_each(|((d, gp), pp)| {
                                for (d, &i) in d.iter_mut().zip(pp) {
                                    *d = gp[i as usize];
                                }
                            });
                    })
                })
            }
        })?;
        Ok(Some(Tensor::from_vec(dx, arg.shape(), arg.device())?))
    }
}

/// Max-unpooling of `x` (the shape [`max_pool_with_argmax`] returned) at
/// `argmax`. CPU and f32 only; see [`KernelConfig::applies`].
pub fn max_unpool(x: &Tensor, argmax: &Argmax, _cfg: &KernelConfig) -> Result<Tensor> {
    let (b, c, _, _) = argmax.input;
    let pooled = argmax.with_positions(|p| p.len());
    let (xb, xc, _, _) = x.dims4()?;
    if (xb, xc) != (b, c) || x.elem_count() != pooled {
        candle_core::bail!(
            "max-unpool: values {:?} do not match pool indices of {:?}",
            x.dims(),
            argmax.input
        );
    }
    crate::tape::apply1(x, &x.contiguous()?, UnpoolOp { argmax: argmax.clone() })
}
