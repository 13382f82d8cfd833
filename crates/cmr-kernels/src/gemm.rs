//! The leaf layer's products: a strided matrix view and `gemm`'s packed
//! product on it, the epilogue a convolution applies to its output while it
//! is in cache (bias, inference BatchNorm's affine, ReLU) and the per-thread
//! work buffers. No candle here: slices in, slices out.

use std::cell::RefCell;

use gemm::Parallelism;

use crate::cpu::{block_sum, simd_fn};
/// Each thread's work buffers, kept between calls: fresh buffers of tens of
/// MB per image would cost page faults on every call.
#[derive(Default)]
pub(crate) struct Scratch {
    /// The im2col matrix, or the zero-padded input (channels first, or
    /// channels last for the weight gradient).
    pub(crate) cols: Vec<f32>,
    /// A padded-width result: the output of [`conv_shifted`], the direct
    /// kernel's partial sums, the output gradient of the weight gradient.
    pub(crate) wide: Vec<f32>,
}

thread_local! {
    static SCRATCH: RefCell<Scratch> = RefCell::new(Scratch::default());
}

/// Run `f` with this thread's work buffers.
pub(crate) fn with_scratch<R>(f: impl FnOnce(&mut Scratch) -> R) -> R {
    SCRATCH.with(|c| f(&mut c.borrow_mut()))
}

/// A matrix view on a slice: element `(i, j)` is `data[i·rs + j·cs]`.
#[derive(Clone, Copy)]
pub(crate) struct View<'a> {
    pub(crate) data: &'a [f32],
    pub(crate) rs: usize,
    pub(crate) cs: usize,
}

/// The row-major view of a `[rows, cols]` slice, and its transpose.
pub(crate) fn rows(data: &[f32], cols: usize) -> View<'_> {
    View { data, rs: cols, cs: 1 }
}
pub(crate) fn transposed(data: &[f32], cols: usize) -> View<'_> {
    View { data, rs: 1, cs: cols }
}

/// Whether an `m × n` matrix with these strides stays inside `len` elements.
pub(crate) fn fits(len: usize, m: usize, n: usize, rs: usize, cs: usize) -> bool {
    m == 0 || n == 0 || (m - 1) * rs + (n - 1) * cs < len
}

/// `dst [m, n] (+)= lhs [m, k] · rhs [k, n]` on strided views (`dst`'s
/// strides `dst_rs`, `dst_cs`), with `gemm`'s packed kernels.
#[allow(clippy::too_many_arguments)]
pub(crate) fn matmul(
    dst: &mut [f32],
    dst_rs: usize,
    dst_cs: usize,
    accumulate: bool,
    lhs: View,
    rhs: View,
    (m, n, k): (usize, usize, usize),
    par: Parallelism,
) {
    assert!(
        fits(dst.len(), m, n, dst_rs, dst_cs)
            && fits(lhs.data.len(), m, k, lhs.rs, lhs.cs)
            && fits(rhs.data.len(), k, n, rhs.rs, rhs.cs),
        "matmul views out of bounds"
    );
    // SAFETY: the assertion above keeps every addressed element inside its
    // slice, and `dst` (a unique borrow) cannot alias `lhs` or `rhs`.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.as_mut_ptr(),
            dst_cs as isize,
            dst_rs as isize,
            accumulate,
            lhs.data.as_ptr(),
            lhs.cs as isize,
            lhs.rs as isize,
            rhs.data.as_ptr(),
            rhs.cs as isize,
            rhs.rs as isize,
            1.0,
            1.0,
            false,
            false,
            false,
            par,
        )
    }
}

/// What happens to each output value `v` of a convolution while it is still
/// in cache: `((v + bias)·scale + shift)`, each part optional, then a ReLU.
#[derive(Clone, Copy, Default)]
pub(crate) struct Epilogue<'a> {
    pub(crate) bias: Option<&'a [f32]>,
    /// Per-channel `(scale, shift)`: inference-mode BatchNorm.
    pub(crate) affine: Option<(&'a [f32], &'a [f32])>,
    pub(crate) relu: bool,
}

impl<'a> Epilogue<'a> {
    pub(crate) fn bias(bias: &'a [f32]) -> Self {
        Self {
            bias: Some(bias),
            ..Self::default()
        }
    }
}

simd_fn! {
    /// `out [cout, h·w]` from the padded-width result `wide [cout, h·wp]`
    /// (`sizes`: `h·w`, `h·wp`, `w`, `wp`), plus the bias, clamped at zero
    /// with `relu`.
    pub(crate) fn copy_out(simd: Simd, out: &mut [f32], wide: &[f32], sizes: [usize; 4], bias: Option<&[f32]>, relu: bool) {
        let [hw, n, w, wp] = sizes;
        for (co, (dst, src)) in out.chunks_mut(hw).zip(wide.chunks(n)).enumerate() {
            let b = bias.map_or(0.0, |b| b[co]);
            for (d, s) in dst.chunks_mut(w).zip(src.chunks(wp)) {
                for (d, &v) in d.iter_mut().zip(&s[..w]) {
                    let v = v + b;
                    *d = if relu { v.max(0.0) } else { v };
                }
            }
        }
    }

    /// As [`copy_out`], with `(v + bias)·scale + shift` per channel.
    pub(crate) fn copy_out_affine(simd: Simd, out: &mut [f32],
        wide: &[f32],
        sizes: [usize; 4],
        bias: Option<&[f32]>,
        scale: &[f32],
        shift: &[f32],
        relu: bool,
    ) {
        let [hw, n, w, wp] = sizes;
        for (co, (dst, src)) in out.chunks_mut(hw).zip(wide.chunks(n)).enumerate() {
            let (b, a, t) = (bias.map_or(0.0, |b| b[co]), scale[co], shift[co]);
            for (d, s) in dst.chunks_mut(w).zip(src.chunks(wp)) {
                for (d, &v) in d.iter_mut().zip(&s[..w]) {
                    let v = (v + b) * a + t;
                    *d = if relu { v.max(0.0) } else { v };
                }
            }
        }
    }

    /// `v = v·scale + shift` per channel of `v [c, hw]` (the bias is already
    /// in `v`), clamped at zero with `relu`.
    pub(crate) fn affine_in_place(simd: Simd, v: &mut [f32], hw: usize, scale: &[f32], shift: &[f32], relu: bool) {
        for (co, plane) in v.chunks_mut(hw).enumerate() {
            let (a, t) = (scale[co], shift[co]);
            for v in plane.iter_mut() {
                let u = *v * a + t;
                *v = if relu { u.max(0.0) } else { u };
            }
        }
    }

    /// `v = max(v, 0)`.
    pub(crate) fn relu_in_place(simd: Simd, v: &mut [f32]) {
        v.iter_mut().for_each(|v| *v = v.max(0.0));
    }

    /// `db[c] += Σ plane c of g [c, hw]`, in f64.
    pub(crate) fn add_plane_sums(simd: Simd, db: &mut [f64], g: &[f32], hw: usize) {
        for (co, plane) in g.chunks(hw).enumerate() {
            db[co] += block_sum(plane, |v| v);
        }
    }

    /// `dy` where `y > 0`, else 0.
    pub(crate) fn relu_mask(simd: Simd, y: &[f32], dy: &[f32]) -> Vec<f32> {
        y.iter().zip(dy).map(|(&y, &g)| if y > 0.0 { g } else { 0.0 }).collect()
    }
}
