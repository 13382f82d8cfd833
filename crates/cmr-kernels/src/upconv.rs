//! 2×2 stride-2 transposed convolution (U-Net's up-sampling) with bias.
//!
//! Per image, with `x [Cin, H·W]` and the weight `[Cin, Cout, 2, 2]` read as
//! `W [Cin, Cout·4]`: `T = Wᵀ·x [Cout·4, H·W]` is one GEMM, and output pixel
//! `(2i + dy, 2j + dx)` of channel `co` is `T[co·4 + dy·2 + dx, i·W + j]` plus
//! the bias (an interleaving copy). Backward, with `dT` the same
//! de-interleaving of `dY`: `dx = W·dT`, `dW = Σ_b x·dTᵀ`, `db = Σ dY`.
//!
//! The composite candle path (matmul, reshape, permute, broadcast add) copies
//! the result through a permutation and sums the bias gradient over three
//! axes with a strided reduction; here each is one pass.

use candle_core::{CpuStorage, CustomOp3, Layout, Result, Shape, Tensor};
use gemm::Parallelism;
use rayon::prelude::*;

use crate::cpu::{block_sum, fresh, simd_fn, threads};
use crate::gemm::{View, matmul, rows, with_scratch};
use crate::{KernelConfig, slice, with_data};

simd_fn! {
    /// `y [Cout, 2H, 2W]` from `t [Cout·4, H·W]`, plus the bias.
    fn interleave(simd: Simd, y: &mut [f32], t: &[f32], bias: &[f32], h: usize, w: usize) {
        let hw = h * w;
        for (co, (plane, taps)) in y.chunks_mut(4 * hw).zip(t.chunks(4 * hw)).enumerate() {
            let b = bias[co];
            for (i, rows2) in plane.chunks_mut(4 * w).enumerate() {
                let (top, bottom) = rows2.split_at_mut(2 * w);
                for (dy, out) in [top, bottom].into_iter().enumerate() {
                    let t0 = &taps[(dy * 2) * hw + i * w..][..w];
                    let t1 = &taps[(dy * 2 + 1) * hw + i * w..][..w];
                    for ((o, &a), &c) in out.chunks_exact_mut(2).zip(t0).zip(t1) {
                        o[0] = a + b;
                        o[1] = c + b;
                    }
                }
            }
        }
    }

    /// The inverse rearrangement: `dt [Cout·4, H·W]` from `dy [Cout, 2H, 2W]`.
    fn deinterleave(simd: Simd, dt: &mut [f32], dy: &[f32], h: usize, w: usize) {
        let hw = h * w;
        for (plane, taps) in dy.chunks(4 * hw).zip(dt.chunks_mut(4 * hw)) {
            let (t01, t23) = taps.split_at_mut(2 * hw);
            let (t0, t1) = t01.split_at_mut(hw);
            let (t2, t3) = t23.split_at_mut(hw);
            for (i, rows2) in plane.chunks(4 * w).enumerate() {
                let (top, bottom) = rows2.split_at(2 * w);
                for (src, (a, c)) in [(top, (&mut *t0, &mut *t1)), (bottom, (&mut *t2, &mut *t3))] {
                    let (a, c) = (&mut a[i * w..][..w], &mut c[i * w..][..w]);
                    for ((s, a), c) in src.chunks_exact(2).zip(a.iter_mut()).zip(c.iter_mut()) {
                        *a = s[0];
                        *c = s[1];
                    }
                }
            }
        }
    }
}

struct UpConvOp {
    cfg: KernelConfig,
}

impl CustomOp3 for UpConvOp {
    fn name(&self) -> &'static str {
        "cmr-upconv2x2"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let simd = self.cfg.simd;
        let (b, cin, h, w) = l1.shape().dims4()?;
        let (_, cout, _, _) = l2.shape().dims4()?;
        let (x, weight, bias) = (slice(s1, l1)?, slice(s2, l2)?, slice(s3, l3)?);
        let (hw, c4) = (h * w, cout * 4);
        // Wᵀ [Cout·4, Cin]: element (r, ci) at weight[ci·Cout·4 + r].
        let wt = View {
            data: weight,
            rs: 1,
            cs: c4,
        };
        let one = |xi: &[f32], yi: &mut [f32], par| {
            with_scratch(|scratch| {
                // Every element is written by the GEMM (no accumulation).
                let t = &mut scratch.wide;
                t.resize(c4 * hw, 0.0);
                matmul(t, hw, 1, false, wt, rows(xi, hw), (c4, hw, cin), par);
                interleave(simd, yi, t, bias, h, w);
            });
        };
        // SAFETY: `interleave` writes both values of every pair, of every
        // image, and reads none.
        let out = unsafe {
            fresh(b * c4 * hw, |out| {
                if b < threads() {
                    for (xi, yi) in x.chunks(cin * hw).zip(out.chunks_mut(c4 * hw)) {
                        one(xi, yi, Parallelism::Rayon(threads()));
                    }
                } else {
                    out.par_chunks_mut(c4 * hw)
                        .zip(x.par_chunks(cin * hw))
                        .for_each(|(yi, xi)| one(xi, yi, Parallelism::None));
                }
            })
        };
        Ok((CpuStorage::F32(out), Shape::from((b, cout, 2 * h, 2 * w))))
    }

    fn bwd(
        &self,
        x: &Tensor,
        weight: &Tensor,
        _bias: &Tensor,
        _res: &Tensor,
        dy: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let simd = self.cfg.simd;
        let (b, cin, h, w) = x.dims4()?;
        let (_, cout, _, _) = weight.dims4()?;
        let (hw, c4) = (h * w, cout * 4);
        let need_dx = x.track_op();
        let (dx, dw, db) = with_data(x, |xs| {
            with_data(weight, |wv| {
                with_data(dy, |g| {
                    // Per image: dT, then dx = W·dT, dW += x·dTᵀ, db += Σ dY.
                    let one = |xi: &[f32], gi: &[f32], dxi: Option<&mut [f32]>, dw: &mut [f32], db: &mut [f64], par| {
                        with_scratch(|scratch| {
                            // Every element is written by the de-interleaving.
                            let dt = &mut scratch.wide;
                            dt.resize(c4 * hw, 0.0);
                            deinterleave(simd, dt, gi, h, w);
                            let dt = &scratch.wide;
                            if let Some(dxi) = dxi {
                                matmul(dxi, hw, 1, false, rows(wv, c4), rows(dt, hw), (cin, hw, c4), par);
                            }
                            let dtt = View {
                                data: dt,
                                rs: 1,
                                cs: hw,
                            };
                            matmul(dw, c4, 1, true, rows(xi, hw), dtt, (cin, c4, hw), par);
                            for (co, plane) in gi.chunks(4 * hw).enumerate() {
                                db[co] += block_sum(plane, |v| v);
                            }
                        });
                    };
                    let mut dx = if need_dx { vec![0f32; b * cin * hw] } else { Vec::new() };
                    let images = x_chunks(xs, g, &mut dx, cin * hw, c4 * hw);
                    let (dw, db) = if b < threads() {
                        let (mut dw, mut db) = (vec![0f32; cin * c4], vec![0f64; cout]);
                        for (xi, gi, dxi) in images {
                            one(xi, gi, dxi, &mut dw, &mut db, Parallelism::Rayon(threads()));
                        }
                        (dw, db)
                    } else {
                        // One contiguous run of images per thread, partial
                        // sums added in a fixed order (deterministic).
                        let per = b.div_ceil(threads());
                        let mut images = images;
                        let mut runs = Vec::new();
                        while !images.is_empty() {
                            let rest = images.split_off(per.min(images.len()));
                            runs.push(images);
                            images = rest;
                        }
                        let partials: Vec<(Vec<f32>, Vec<f64>)> = runs
                            .into_par_iter()
                            .map(|run| {
                                let (mut dw, mut db) = (vec![0f32; cin * c4], vec![0f64; cout]);
                                for (xi, gi, dxi) in run {
                                    one(xi, gi, dxi, &mut dw, &mut db, Parallelism::None);
                                }
                                (dw, db)
                            })
                            .collect();
                        let (mut dw, mut db) = (vec![0f32; cin * c4], vec![0f64; cout]);
                        for (pw, pb) in partials {
                            dw.iter_mut().zip(pw).for_each(|(a, v)| *a += v);
                            db.iter_mut().zip(pb).for_each(|(a, v)| *a += v);
                        }
                        (dw, db)
                    };
                    (dx, dw, db)
                })
            })
        })???;
        let dev = x.device();
        let dx = if need_dx {
            Some(Tensor::from_vec(dx, (b, cin, h, w), dev)?)
        } else {
            None
        };
        let db: Vec<f32> = db.into_iter().map(|v| v as f32).collect();
        Ok((
            dx,
            Some(Tensor::from_vec(dw, (cin, cout, 2, 2), dev)?),
            Some(Tensor::from_vec(db, cout, dev)?),
        ))
    }
}

type Image<'a> = (&'a [f32], &'a [f32], Option<&'a mut [f32]>);

/// Per image: its input, its output gradient and (when wanted) its slot of
/// the input gradient.
fn x_chunks<'a>(xs: &'a [f32], g: &'a [f32], dx: &'a mut [f32], xn: usize, gn: usize) -> Vec<Image<'a>> {
    let mut slots: Vec<Option<&mut [f32]>> = dx.chunks_mut(xn).map(Some).collect();
    xs.chunks(xn)
        .zip(g.chunks(gn))
        .enumerate()
        .map(|(i, (xi, gi))| (xi, gi, slots.get_mut(i).and_then(Option::take)))
        .collect()
}

/// `ConvTranspose2d(kernel 2, stride 2)` with bias: `x [B, Cin, H, W]`,
/// `weight [Cin, Cout, 2, 2]` (PyTorch's layout), `bias [Cout]` →
/// `[B, Cout, 2H, 2W]`. CPU and f32 only; see [`KernelConfig::applies`].
pub fn upconv2x2(x: &Tensor, weight: &Tensor, bias: &Tensor, cfg: &KernelConfig) -> Result<Tensor> {
    let (_, cin, _, _) = x.dims4()?;
    let (wcin, cout, k1, k2) = weight.dims4()?;
    if wcin != cin || (k1, k2) != (2, 2) || bias.dims() != [cout] {
        candle_core::bail!(
            "fast upconv2x2: input {:?}, weight {:?} and bias {:?} do not fit",
            x.dims(),
            weight.dims(),
            bias.dims()
        );
    }
    crate::tape::apply3(
        [x, weight, bias],
        [&x.contiguous()?, &weight.contiguous()?, &bias.contiguous()?],
        UpConvOp { cfg: *cfg },
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::KernelConfig;

    const CFG: &KernelConfig = &KernelConfig::DEFAULT;
    use crate::testing::{FiniteDiff, assert_gradient, max_rel, narrow, widen};
    use candle_core::{Device, Var};

    fn reference(x: &Tensor, w: &Tensor, b: &Tensor) -> Tensor {
        x.conv_transpose2d(w, 0, 0, 2, 1)
            .unwrap()
            .broadcast_add(&b.reshape((1, (), 1, 1)).unwrap())
            .unwrap()
    }

    /// Values and gradients against candle's transposed convolution, batches
    /// below and above the thread count, odd sizes, and a constant input (no
    /// input gradient).
    #[test]
    fn matches_candle_values_and_gradients() {
        let dev = Device::Cpu;
        for &(b, cin, cout, h, w, input_var) in &[
            (1, 3, 5, 4, 6, true),
            (4, 8, 4, 12, 12, true),
            (3, 16, 8, 5, 7, true),
            (2, 2, 3, 3, 3, false),
        ] {
            let shape = (b, cin, cout, h, w);
            let x0 = Tensor::randn(0f32, 1.0, (b, cin, h, w), &dev).unwrap();
            let xv = Var::from_tensor(&x0).unwrap();
            let x = if input_var { xv.as_tensor().clone() } else { x0 };
            let wt = Var::from_tensor(&Tensor::randn(0f32, 0.3, (cin, cout, 2, 2), &dev).unwrap()).unwrap();
            let bias = Var::from_tensor(&Tensor::randn(0f32, 0.3, cout, &dev).unwrap()).unwrap();
            let probe = Tensor::randn(0f32, 1.0, (b, cout, 2 * h, 2 * w), &dev).unwrap();
            let fast = upconv2x2(&x, &wt, &bias, CFG).unwrap();
            let slow = reference(&x, &wt, &bias);
            assert!(max_rel(&fast, &slow) < 1e-5, "{shape:?} forward");
            let gf = (&fast * &probe).unwrap().sum_all().unwrap().backward().unwrap();
            let gs = (&slow * &probe).unwrap().sum_all().unwrap().backward().unwrap();
            for (name, v) in [("w", wt.as_tensor()), ("b", bias.as_tensor())] {
                let e = max_rel(gf.get(v).unwrap(), gs.get(v).unwrap());
                assert!(e < 1e-4, "{shape:?} d{name}: {e}");
            }
            if input_var {
                let e = max_rel(gf.get(&x).unwrap(), gs.get(&x).unwrap());
                assert!(e < 1e-4, "{shape:?} dx: {e}");
            } else {
                assert!(gf.get(&x).is_none(), "{shape:?}: gradient for a constant input");
            }
        }
    }

    /// Finite differences in f32 of the op's own backward (input and weight).
    #[test]
    fn gradient_matches_finite_differences() {
        let dev = Device::Cpu;
        let (b, cin, cout, h, w) = (2, 3, 2, 3, 4);
        let x0: Vec<f32> = (0..b * cin * h * w)
            .map(|i| ((i * 37 % 23) as f32 - 11.0) / 7.0)
            .collect();
        let w0: Vec<f32> = (0..cin * cout * 4)
            .map(|i| ((i * 17 % 13) as f32 - 6.0) / 9.0)
            .collect();
        let bias = Tensor::new(&[0.1f32, -0.2], &dev).unwrap();
        let probe = Tensor::randn(0f32, 1.0, (b, cout, 2 * h, 2 * w), &dev).unwrap();
        let f = |xv: &[f32], wv: &[f32]| -> f64 {
            let x = Tensor::from_slice(xv, (b, cin, h, w), &dev).unwrap();
            let wt = Tensor::from_slice(wv, (cin, cout, 2, 2), &dev).unwrap();
            let y = upconv2x2(&x, &wt, &bias, CFG).unwrap();
            f64::from((y * &probe).unwrap().sum_all().unwrap().to_scalar::<f32>().unwrap())
        };
        let xv = Var::from_tensor(&Tensor::from_slice(&x0, (b, cin, h, w), &dev).unwrap()).unwrap();
        let wv = Var::from_tensor(&Tensor::from_slice(&w0, (cin, cout, 2, 2), &dev).unwrap()).unwrap();
        let g = (upconv2x2(&xv, &wv, &bias, CFG).unwrap() * &probe)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        let grad = |v: &Var| widen(&g.get(v).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap());
        let check = FiniteDiff {
            eps: 1e-2,
            tol: 1e-3,
            floor: 1.0,
        };
        assert_gradient(
            "dx",
            |v| f(&narrow(v), &w0),
            &widen(&x0),
            &grad(&xv),
            check,
            0..x0.len(),
        );
        assert_gradient(
            "dw",
            |v| f(&x0, &narrow(v)),
            &widen(&w0),
            &grad(&wv),
            check,
            0..w0.len(),
        );
    }
}
