//! A convolution of a bilinearly up-sampled input, computed at the input's
//! resolution.
//!
//! U-Net 3+'s decoder convolves feature maps up-sampled 2, 4 and 8 times:
//! at the report's widths, 12 of the 33 GFLOP of one image's forward pass
//! (a 512-channel 12×12 map up-sampled to 96×96 and convolved to 64
//! channels is 5.4 GFLOP). Both steps are linear and the up-sampling acts on
//! each channel alone, so they can be taken in the other order.
//!
//! Up-sampling one channel's plane is `U(X) = A_h · X · A_wᵀ` (`A` the
//! two-tap interpolation matrices, [`crate::upsample`]). Tap `(dy, dx)` of a
//! `k × k` convolution with zero padding `p = k / 2` reads that plane shifted
//! by `(dy − p, dx − p)`, zeros outside: `S_dy · U(X) · S_dxᵀ`. So output
//! channel `co` is
//!
//! `Σ_dy Σ_dx (S_dy A_h) · Z[co, dy, dx] · (S_dx A_w)ᵀ`, with
//! `Z[co, t] = Σ_ci W[co, ci, t] · X_ci`
//!
//! `Z` is one GEMM at the input's resolution (`[k²·Cout, Cin] × [Cin, h·w]`,
//! `f²` times fewer multiply-adds than the convolution at the output's), and
//! the rest is two-tap interpolation: along W, each of the `k²` planes
//! up-sampled row by row and added into `k` row sums at its shift `dx`;
//! along H, each output row the sum of the `k` row sums' interpolated rows at
//! shift `dy`. The backward pass is the adjoint of each step in the reverse
//! order, and both gradient GEMMs are at the input's resolution too.
//!
//! The results equal the convolution of the up-sampled input up to rounding
//! (the sums are taken in another order).

use gemm::Parallelism;
use rayon::prelude::*;

use crate::cpu::{Fresh, Simd, block_sum, simd_fn, threads};
use crate::gemm::{Epilogue, View, matmul, rows};
use crate::upsample::{Taps, taps};

/// The shape of one call: `b` images `[cin, h, w]` up-sampled `f` times,
/// convolved by a `k × k` kernel to `cout` channels `[h·f, w·f]`.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Dims {
    pub(crate) b: usize,
    pub(crate) cin: usize,
    pub(crate) h: usize,
    pub(crate) w: usize,
    pub(crate) cout: usize,
    pub(crate) k: usize,
    pub(crate) f: usize,
}

impl Dims {
    fn out_plane(&self) -> usize {
        self.h * self.f * self.w * self.f
    }
}

/// `weight [cout, cin, kk]` as `[cout, kk, cin]`: the rows of the mixing
/// GEMM, output channel by output channel, tap by tap.
fn tap_major(weight: &[f32], cout: usize, cin: usize, kk: usize) -> Vec<f32> {
    let mut wr = vec![0f32; cout * kk * cin];
    for (co, block) in wr.chunks_mut(kk * cin).enumerate() {
        for ci in 0..cin {
            for t in 0..kk {
                block[t * cin + ci] = weight[(co * cin + ci) * kk + t];
            }
        }
    }
    wr
}

/// The inverse of [`tap_major`]: `[cout, kk, cin]` → `[cout, cin, kk]`.
fn weight_major(wr: &[f32], cout: usize, cin: usize, kk: usize) -> Vec<f32> {
    let mut w = vec![0f32; cout * cin * kk];
    for (co, block) in wr.chunks(kk * cin).enumerate() {
        for t in 0..kk {
            for ci in 0..cin {
                w[(co * cin + ci) * kk + t] = block[t * cin + ci];
            }
        }
    }
    w
}

/// The interpolation along both axes, and each thread's row buffers.
struct Interp<'a> {
    d: Dims,
    th: &'a Taps,
    tw: &'a Taps,
}

/// Per-thread buffers: the `k` row sums `[k, h, w·f]` and one extended row
/// (`w·f + 2p`, zeros at both ends).
#[derive(Default)]
struct Rows {
    sums: Vec<f32>,
    ext: Vec<f32>,
}

simd_fn! {
    /// `out[s] = x[lo[s]]·(1 − λ[s]) + x[hi[s]]·λ[s]`: one row up-sampled
    /// (the formula of `upsample::up_plane`).
    fn up_row(simd: Simd, x: &[f32], t: &Taps, out: &mut [f32]) {
        for (o, ((&a, &b), &l)) in out.iter_mut().zip(t.lo.iter().zip(&t.hi).zip(&t.lambda)) {
            *o = x[a] * (1.0 - l) + x[b] * l;
        }
    }

    /// The adjoint of [`up_row`]: `dx[lo[s]] += g[s]·(1 − λ[s])`, `dx[hi[s]]
    /// += g[s]·λ[s]` (`dx` zeroed first).
    fn up_row_adjoint(simd: Simd, g: &[f32], t: &Taps, dx: &mut [f32]) {
        dx.fill(0.0);
        for (&g, ((&a, &b), &l)) in g.iter().zip(t.lo.iter().zip(&t.hi).zip(&t.lambda)) {
            dx[a] += g * (1.0 - l);
            dx[b] += g * l;
        }
    }

    /// `acc += a·u + b·v`, elementwise.
    fn add_two(simd: Simd, acc: &mut [f32], u: &[f32], a: f32, v: &[f32], b: f32) {
        for ((o, &x), &y) in acc.iter_mut().zip(u).zip(v) {
            *o += x * a + y * b;
        }
    }

    /// `acc += a·u`, elementwise.
    fn axpy(simd: Simd, acc: &mut [f32], u: &[f32], a: f32) {
        for (o, &x) in acc.iter_mut().zip(u) {
            *o += x * a;
        }
    }

    /// `acc += u`, elementwise.
    fn add(simd: Simd, acc: &mut [f32], u: &[f32]) {
        for (o, &x) in acc.iter_mut().zip(u) {
            *o += x;
        }
    }

    /// `v = (v + bias)·scale + shift`, each optional, then ReLU: one plane's
    /// epilogue, in `conv::copy_out`'s order.
    fn epilogue_plane(simd: Simd, v: &mut [f32], bias: Option<f32>, affine: Option<(f32, f32)>, relu: bool) {
        if let Some(b) = bias {
            for x in v.iter_mut() {
                *x += b;
            }
        }
        if let Some((a, t)) = affine {
            for x in v.iter_mut() {
                *x = *x * a + t;
            }
        }
        if relu {
            for x in v.iter_mut() {
                *x = x.max(0.0);
            }
        }
    }
}

impl Interp<'_> {
    /// One output channel's plane `out [h·f, w·f]` from its mixed planes
    /// `z [k², h·w]`.
    fn expand(&self, simd: Simd, z: &[f32], buf: &mut Rows, out: &mut [f32]) {
        let Dims { h, w, k, f, .. } = self.d;
        let (ho, wo, p) = (h * f, w * f, k / 2);
        let Rows { sums, ext } = buf;
        sums.clear();
        sums.resize(k * h * wo, 0.0);
        ext.clear();
        ext.resize(wo + 2 * p, 0.0);
        // Along W: sums[dy][r][x] = Σ_dx U(z[dy, dx])[r][x + dx − p].
        for dy in 0..k {
            for dx in 0..k {
                let plane = &z[(dy * k + dx) * h * w..][..h * w];
                for (r, row) in plane.chunks(w).enumerate() {
                    up_row(simd, row, self.tw, &mut ext[p..p + wo]);
                    add(simd, &mut sums[(dy * h + r) * wo..][..wo], &ext[dx..dx + wo]);
                }
            }
        }
        // Along H: out[y] = Σ_dy U(sums[dy])[y + dy − p], zero rows outside.
        for (y, orow) in out.chunks_mut(wo).enumerate() {
            orow.fill(0.0);
            for dy in 0..k {
                let Some(s) = (y + dy).checked_sub(p).filter(|&s| s < ho) else {
                    continue;
                };
                let (a, b, l) = (self.th.lo[s], self.th.hi[s], self.th.lambda[s]);
                let ra = &sums[(dy * h + a) * wo..][..wo];
                let rb = &sums[(dy * h + b) * wo..][..wo];
                add_two(simd, orow, ra, 1.0 - l, rb, l);
            }
        }
    }

    /// The adjoint of [`Self::expand`]: `dz [k², h·w]` from one output
    /// channel's gradient `g [h·f, w·f]`.
    fn expand_adjoint(&self, simd: Simd, g: &[f32], buf: &mut Rows, dz: &mut [f32]) {
        let Dims { h, w, k, f, .. } = self.d;
        let (ho, wo, p) = (h * f, w * f, k / 2);
        let Rows { sums, ext } = buf;
        sums.clear();
        sums.resize(k * h * wo, 0.0);
        ext.clear();
        ext.resize(wo + 2 * p, 0.0);
        for (y, grow) in g.chunks(wo).enumerate() {
            for dy in 0..k {
                let Some(s) = (y + dy).checked_sub(p).filter(|&s| s < ho) else {
                    continue;
                };
                let (a, b, l) = (self.th.lo[s], self.th.hi[s], self.th.lambda[s]);
                // a and b may be the same row (at the edges): one at a time
                axpy(simd, &mut sums[(dy * h + a) * wo..][..wo], grow, 1.0 - l);
                axpy(simd, &mut sums[(dy * h + b) * wo..][..wo], grow, l);
            }
        }
        for dy in 0..k {
            for dx in 0..k {
                let plane = &mut dz[(dy * k + dx) * h * w..][..h * w];
                for (r, row) in plane.chunks_mut(w).enumerate() {
                    // the forward pass added ext[dx..dx + wo] into this row
                    // sum; ext[p..p + wo] was the up-sampled row
                    ext.fill(0.0);
                    ext[dx..dx + wo].copy_from_slice(&sums[(dy * h + r) * wo..][..wo]);
                    up_row_adjoint(simd, &ext[p..p + wo], self.tw, row);
                }
            }
        }
    }
}

fn inner() -> Parallelism {
    Parallelism::Rayon(threads())
}

/// The convolution of `x [b, cin, h, w]` up-sampled `f` times, `weight [cout,
/// cin, k, k]`, into `out [b, cout, h·f, w·f]` with `epi` applied. Image by
/// image, each on all threads.
pub(crate) fn forward(simd: Simd, x: &[f32], weight: &[f32], d: Dims, epi: Epilogue, out: &mut [f32]) {
    let Dims {
        cin, h, w, cout, k, f, ..
    } = d;
    let (kk, hw) = (k * k, h * w);
    let wr = tap_major(weight, cout, cin, kk);
    let (th, tw) = (taps(h, f), taps(w, f));
    let interp = Interp { d, th: &th, tw: &tw };
    let mut z = Fresh::new(cout * kk * hw);
    // SAFETY: scratch that each image's GEMM writes in full (no accumulation)
    // before the expansion reads it.
    let z = unsafe { z.slots() };
    for (xi, oi) in x.chunks(cin * hw).zip(out.chunks_mut(cout * d.out_plane())) {
        matmul(
            z,
            hw,
            1,
            false,
            rows(&wr, cin),
            rows(xi, hw),
            (cout * kk, hw, cin),
            inner(),
        );
        oi.par_chunks_mut(d.out_plane())
            .zip(z.par_chunks(kk * hw))
            .enumerate()
            .for_each_init(Rows::default, |buf, (co, (plane, zc))| {
                interp.expand(simd, zc, buf, plane);
                epilogue_plane(
                    simd,
                    plane,
                    epi.bias.map(|b| b[co]),
                    epi.affine.map(|(a, t)| (a[co], t[co])),
                    epi.relu,
                );
            });
    }
}

/// The gradients of [`forward`] (without epilogue) given the gradient `g` of
/// its output: the input's (when `need_dx`), the weight's `[cout, cin, k,
/// k]` and the bias's.
pub(crate) fn backward(
    simd: Simd,
    x: &[f32],
    weight: &[f32],
    g: &[f32],
    d: Dims,
    need_dx: bool,
) -> (Option<Vec<f32>>, Vec<f32>, Vec<f32>) {
    let Dims {
        b,
        cin,
        h,
        w,
        cout,
        k,
        f,
    } = d;
    let (kk, hw, plane) = (k * k, h * w, d.out_plane());
    let wr = tap_major(weight, cout, cin, kk);
    let (th, tw) = (taps(h, f), taps(w, f));
    let interp = Interp { d, th: &th, tw: &tw };
    let mut dz = Fresh::new(cout * kk * hw);
    // SAFETY: scratch in which `expand_adjoint` writes every value of each
    // channel's block, for each image, before the GEMMs read it.
    let dz = unsafe { dz.slots() };
    let mut dwr = vec![0f32; cout * kk * cin];
    let mut db = vec![0f64; cout];
    let mut dx_fresh = need_dx.then(|| Fresh::new(b * cin * hw));
    // SAFETY: each image's slice is written by a GEMM without accumulation,
    // and nothing reads it here.
    let mut dx = dx_fresh.as_mut().map(|f| unsafe { f.slots() });
    for (i, (xi, gi)) in x.chunks(cin * hw).zip(g.chunks(cout * plane)).enumerate() {
        for (co, gp) in gi.chunks(plane).enumerate() {
            db[co] += block_sum(gp, |v| v);
        }
        dz.par_chunks_mut(kk * hw)
            .zip(gi.par_chunks(plane))
            .for_each_init(Rows::default, |buf, (dzc, gc)| {
                interp.expand_adjoint(simd, gc, buf, dzc)
            });
        // dWr (+)= dZ · Xᵀ: [cout·kk, hw] × [hw, cin]
        let xt = View {
            data: xi,
            rs: 1,
            cs: hw,
        };
        matmul(&mut dwr, cin, 1, i > 0, rows(dz, hw), xt, (cout * kk, cin, hw), inner());
        if let Some(dx) = dx.as_mut() {
            // dX = Wrᵀ · dZ: [cin, cout·kk] × [cout·kk, hw]
            let wt = View {
                data: &wr,
                rs: 1,
                cs: cin,
            };
            let dxi = &mut dx[i * cin * hw..][..cin * hw];
            matmul(dxi, hw, 1, false, wt, rows(dz, hw), (cin, hw, cout * kk), inner());
        }
    }
    (
        // SAFETY: every image's slice was written above.
        dx_fresh.map(|f| unsafe { f.written() }),
        weight_major(&dwr, cout, cin, kk),
        db.into_iter().map(|v| v as f32).collect(),
    )
}

#[cfg(test)]
mod tests {
    use candle_core::{Device, Tensor, Var};

    use crate::KernelConfig;
    use crate::testing::{
        FiniteDiff, assert_gradient, fixed_tensor, fixed_values, max_rel, narrow, off_the_kink, widen,
    };
    use crate::{upsampled_conv_bn_relu_train, upsampled_conv2d_affine_relu};

    const CFG: &KernelConfig = &KernelConfig::DEFAULT;

    /// The up-sampling kernel (tested on its own against candle's matrix
    /// products in cmr-models, and by finite differences), then candle's
    /// conv2d + bias.
    fn reference(x: &Tensor, f: usize, w: &Tensor, b: &Tensor) -> Tensor {
        let k = w.dim(2).unwrap();
        crate::upsample_bilinear(x, f, CFG)
            .unwrap()
            .conv2d(w, k / 2, 1, 1, 1)
            .unwrap()
            .broadcast_add(&b.reshape((1, (), 1, 1)).unwrap())
            .unwrap()
    }

    fn var(t: Tensor) -> Var {
        Var::from_tensor(&t).unwrap()
    }

    /// (batch, cin, cout, h, w, k, factor): the decoder's factors, kernels 1
    /// to 5, one-pixel and non-square inputs, one input channel. (One image
    /// of one pixel would leave training-mode BatchNorm nothing to normalise
    /// but the sign: its input gradient is zero up to rounding.)
    const SHAPES: &[(usize, usize, usize, usize, usize, usize, usize)] = &[
        (1, 3, 5, 3, 4, 3, 2),
        (2, 4, 3, 5, 3, 3, 4),
        (1, 2, 3, 2, 2, 3, 8),
        (3, 5, 2, 6, 7, 1, 2),
        (2, 3, 4, 4, 3, 5, 2),
        (2, 1, 2, 1, 1, 3, 4),
        (2, 16, 8, 12, 12, 3, 8),
    ];

    /// Inference variant: values and all five gradients against candle.
    #[test]
    fn affine_relu_matches_candle() {
        let dev = Device::Cpu;
        for &(b, cin, cout, h, w, k, f) in SHAPES {
            let shape = (b, cin, cout, h, w, k, f);
            let x = var(Tensor::randn(0f32, 1.0, (b, cin, h, w), &dev).unwrap());
            let wt = var(Tensor::randn(0f32, 0.3, (cout, cin, k, k), &dev).unwrap());
            let bias = var(Tensor::randn(0f32, 0.3, cout, &dev).unwrap());
            let scale = var(Tensor::randn(1f32, 0.3, cout, &dev).unwrap());
            let shift = var(Tensor::randn(0f32, 0.3, cout, &dev).unwrap());
            let probe = Tensor::randn(0f32, 1.0, (b, cout, h * f, w * f), &dev).unwrap();
            let fast = upsampled_conv2d_affine_relu(&x, f, &wt, &bias, &scale, &shift, CFG).unwrap();
            let pre = reference(&x, f, &wt, &bias)
                .broadcast_mul(&scale.reshape((1, (), 1, 1)).unwrap())
                .unwrap()
                .broadcast_add(&shift.reshape((1, (), 1, 1)).unwrap())
                .unwrap();
            let slow = pre.relu().unwrap();
            let probe = off_the_kink(&pre, &probe);
            assert_eq!(fast.dims(), slow.dims(), "{shape:?}");
            let e = max_rel(&fast, &slow);
            assert!(e < 1e-5, "{shape:?} forward {e}");
            let gf = (&fast * &probe).unwrap().sum_all().unwrap().backward().unwrap();
            let gs = (&slow * &probe).unwrap().sum_all().unwrap().backward().unwrap();
            for (name, v) in [
                ("x", &x),
                ("w", &wt),
                ("b", &bias),
                ("scale", &scale),
                ("shift", &shift),
            ] {
                let e = max_rel(gf.get(v.as_tensor()).unwrap(), gs.get(v.as_tensor()).unwrap());
                assert!(e < 1e-4, "{shape:?} d{name}: {e}");
            }
        }
    }

    /// Training variant: values, batch statistics and gradients against
    /// candle's up-sampling, conv2d, BatchNorm and ReLU. Fixed inputs: with
    /// random ones a normalised value now and then lands within rounding of
    /// the ReLU's kink, and the two sides' gradients differ there (seen
    /// once in about ten runs at the smallest shape).
    #[test]
    fn train_matches_candle() {
        let dev = Device::Cpu;
        let fixed = fixed_tensor;
        for (i, &(b, cin, cout, h, w, k, f)) in SHAPES.iter().enumerate() {
            let shape = (b, cin, cout, h, w, k, f);
            let seed = 10 * i as u64;
            let x = var(fixed(&[b, cin, h, w], seed, 0.0, 1.7));
            let wt = var(fixed(&[cout, cin, k, k], seed + 1, 0.0, 0.5));
            let bias = var(fixed(&[cout], seed + 2, 0.0, 0.5));
            let gamma = var(fixed(&[cout], seed + 3, 1.0, 0.5));
            let beta = var(fixed(&[cout], seed + 4, 0.0, 0.5));
            let probe = fixed(&[b, cout, h * f, w * f], seed + 5, 0.0, 1.7);
            let (fast, stats) = upsampled_conv_bn_relu_train(&x, f, &wt, &bias, &gamma, &beta, 1e-5, CFG).unwrap();
            let bn = candle_nn::BatchNorm::new_with_momentum(
                cout,
                Tensor::zeros(cout, candle_core::DType::F32, &dev).unwrap(),
                Tensor::ones(cout, candle_core::DType::F32, &dev).unwrap(),
                gamma.as_tensor().clone(),
                beta.as_tensor().clone(),
                1e-5,
                0.1,
            )
            .unwrap();
            let z = reference(&x, f, &wt, &bias);
            let slow = candle_core::ModuleT::forward_t(&bn, &z, true).unwrap().relu().unwrap();
            let e = max_rel(&fast, &slow);
            assert!(e < 1e-4, "{shape:?} forward {e}");
            let mean = z
                .mean_keepdim(0)
                .unwrap()
                .mean_keepdim(2)
                .unwrap()
                .mean_keepdim(3)
                .unwrap();
            let mean = mean.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            for (c, (m, r)) in stats.mean.iter().zip(&mean).enumerate() {
                assert!(
                    (m - r).abs() < 1e-4 * r.abs().max(1.0),
                    "{shape:?} mean {c}: {m} vs {r}"
                );
            }
            let gf = (&fast * &probe).unwrap().sum_all().unwrap().backward().unwrap();
            let gs = (&slow * &probe).unwrap().sum_all().unwrap().backward().unwrap();
            for (name, v) in [("x", &x), ("w", &wt), ("b", &bias), ("gamma", &gamma), ("beta", &beta)] {
                let (a, r) = (gf.get(v.as_tensor()).unwrap(), gs.get(v.as_tensor()).unwrap());
                // the bias gradient through training-mode BatchNorm is zero
                // up to rounding: compare it on the scale of the weight's
                let e = if name == "b" {
                    let d = (a - r)
                        .unwrap()
                        .abs()
                        .unwrap()
                        .max_all()
                        .unwrap()
                        .to_scalar::<f32>()
                        .unwrap();
                    let scale = gs.get(wt.as_tensor()).unwrap().abs().unwrap().max_all().unwrap();
                    d / scale.to_scalar::<f32>().unwrap()
                } else {
                    max_rel(a, r)
                };
                assert!(e < 1e-4, "{shape:?} d{name}: {e}");
            }
        }
    }

    /// The input and weight gradients by central differences, with the
    /// shift large enough that no ReLU switches (the map is then bilinear
    /// in input and weight).
    #[test]
    fn gradients_match_finite_differences() {
        let dev = Device::Cpu;
        for &(b, cin, cout, h, w, k, f) in &[(2, 2, 3, 3, 2, 3, 2), (1, 3, 2, 2, 3, 3, 4)] {
            let x0 = fixed_values(b * cin * h * w, 3);
            let w0 = fixed_values(cout * cin * k * k, 5);
            let bias = Tensor::new(&fixed_values(cout, 7)[..], &dev).unwrap();
            let scale = Tensor::new(&fixed_values(cout, 9)[..], &dev).unwrap();
            let shift = Tensor::from_vec(vec![100f32; cout], cout, &dev).unwrap();
            let probe = Tensor::from_vec(
                fixed_values(b * cout * h * f * w * f, 11),
                (b, cout, h * f, w * f),
                &dev,
            )
            .unwrap();
            let run = |xv: &Tensor, wv: &Tensor| {
                let y = upsampled_conv2d_affine_relu(xv, f, wv, &bias, &scale, &shift, CFG).unwrap();
                (y * &probe).unwrap().sum_all().unwrap()
            };
            let value = |xv: &[f32], wv: &[f32]| -> f64 {
                let x = Tensor::from_slice(xv, (b, cin, h, w), &dev).unwrap();
                let wt = Tensor::from_slice(wv, (cout, cin, k, k), &dev).unwrap();
                f64::from(run(&x, &wt).to_scalar::<f32>().unwrap())
            };
            let xv = var(Tensor::from_slice(&x0, (b, cin, h, w), &dev).unwrap());
            let wv = var(Tensor::from_slice(&w0, (cout, cin, k, k), &dev).unwrap());
            let g = run(&xv, &wv).backward().unwrap();
            let grad = |v: &Var| widen(&g.get(v).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap());
            // linear in each argument: no truncation error, a large step
            // keeps the rounding error of the f32 sums small
            let check = FiniteDiff {
                eps: 0.25,
                tol: 1e-3,
                floor: 1.0,
            };
            let (gx, gw) = (grad(&xv), grad(&wv));
            assert_gradient("dx", |v| value(&narrow(v), &w0), &widen(&x0), &gx, check, 0..x0.len());
            assert_gradient("dw", |v| value(&x0, &narrow(v)), &widen(&w0), &gw, check, 0..w0.len());
        }
    }
}
