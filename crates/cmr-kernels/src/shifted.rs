//! Convolution by shifted views of the zero-padded input: `k·k` GEMMs of
//! depth `cin` that read the padded planes in place (images from 32×32 up
//! where the direct kernel does not run), and the weight gradient the same
//! way with the input channels last.

use gemm::Parallelism;
use rayon::prelude::*;

use crate::cpu::{Simd, simd_fn};
use crate::gemm::{Epilogue, Scratch, View, copy_out, copy_out_affine, matmul, rows};

/// The layout [`pad`] makes: padded row width and plane stride.
pub(crate) struct Padded {
    pub(crate) wp: usize,
    pub(crate) plane: usize,
}

impl Padded {
    /// Where tap `tap` of a `k × k` kernel reads, relative to the output
    /// position, in the padded plane.
    pub(crate) fn tap_offset(&self, tap: usize, k: usize) -> usize {
        (tap / k) * self.wp + tap % k
    }
}

/// Copy `x [c, h, w]` into `buf` zero-padded by `k / 2` on each side, planes
/// `(h + 2p)·(w + 2p) + k − 1` apart (the spare zeros keep the last tap's
/// shifted view inside the plane); channels split among the threads when
/// `parallel` (one image convolved on all threads: serial, the padding was
/// 4 % of U-Net 3+'s single-image inference samples, the other core idle).
pub(crate) fn pad(x: &[f32], c: usize, h: usize, w: usize, k: usize, buf: &mut Vec<f32>, parallel: bool) -> Padded {
    let p = k / 2;
    let (hp, wp) = (h + 2 * p, w + 2 * p);
    let plane = hp * wp + k - 1;
    // Every element is written below (the buffer keeps an earlier call's
    // values): no zero-fill of the whole buffer first.
    buf.resize(c * plane, 0.0);
    let one = |dst: &mut [f32], src: &[f32]| {
        let (rows, spare) = dst.split_at_mut(hp * wp);
        for (r, out) in rows.chunks_mut(wp).enumerate() {
            match r.checked_sub(p).filter(|&y| y < h) {
                Some(y) => {
                    out[..p].fill(0.0);
                    out[p..p + w].copy_from_slice(&src[y * w..][..w]);
                    out[p + w..].fill(0.0);
                }
                None => out.fill(0.0),
            }
        }
        spare.fill(0.0);
    };
    if parallel {
        buf.par_chunks_mut(plane)
            .zip(x.par_chunks(h * w))
            .for_each(|(d, s)| one(d, s));
    } else {
        buf.chunks_mut(plane).zip(x.chunks(h * w)).for_each(|(d, s)| one(d, s));
    }
    Padded { wp, plane }
}

/// One image's convolution by shifted views, without im2col. With the input
/// zero-padded to `[cin, h + 2p, w + 2p]` (`p = k / 2`; planes flattened, `k − 1`
/// spare zeros after each), the output at padded position `q = y·wp + x` is
/// `Σ_tap W_tap · Xpad[:, q + offset(tap)]`: `k·k` GEMMs of depth `cin`, each
/// reading the padded input in place through a shifted view, accumulated
/// into a `[cout, h·wp]` result whose last `2p` columns per row are dropped.
/// The epilogue is applied while copying the result out.
#[allow(clippy::too_many_arguments)]
pub(crate) fn conv_shifted(
    simd: Simd,
    xi: &[f32],
    (cin, h, w, cout, k): (usize, usize, usize, usize, usize),
    weight: &[f32],
    epi: Epilogue,
    out: &mut [f32],
    scratch: &mut Scratch,
    par: Parallelism,
) {
    let layout = pad(
        xi,
        cin,
        h,
        w,
        k,
        &mut scratch.cols,
        matches!(par, Parallelism::Rayon(_)),
    );
    let Padded { wp, plane } = layout;
    let padded = &scratch.cols;
    let n = h * wp;
    let hw = h * w;
    let wide = &mut scratch.wide;
    wide.resize(cout * n, 0.0);
    for tap in 0..k * k {
        let offset = layout.tap_offset(tap, k);
        // W_tap [cout, cin]: weight[co, ci, tap], read in place.
        let lhs = View {
            data: &weight[tap..],
            rs: cin * k * k,
            cs: k * k,
        };
        let rhs = View {
            data: &padded[offset..],
            rs: plane,
            cs: 1,
        };
        matmul(wide, n, 1, tap > 0, lhs, rhs, (cout, n, cin), par);
    }
    match epi.affine {
        Some((scale, shift)) => copy_out_affine(simd, out, wide, [hw, n, w, wp], epi.bias, scale, shift, epi.relu),
        None => copy_out(simd, out, wide, [hw, n, w, wp], epi.bias, epi.relu),
    }
}

/// As [`pad`], channels last: `buf [plane][c]` with `plane = (h + 2p)·(w + 2p)
/// + k − 1` positions, channel `ci` of padded position `q` at `q·c + ci`.
/// The transposition is done once per image, so that the weight gradient's
/// `k·k` GEMMs read the input as `gemm` wants it (depth-major, the channels
/// contiguous) instead of each packing the same `[c, plane]` input again.
pub(crate) fn pad_channels_last(
    simd: Simd,
    x: &[f32],
    c: usize,
    h: usize,
    w: usize,
    k: usize,
    buf: &mut Vec<f32>,
) -> Padded {
    let p = k / 2;
    let (hp, wp) = (h + 2 * p, w + 2 * p);
    let plane = hp * wp + k - 1;
    buf.resize(plane * c, 0.0);
    let hw = h * w;
    for (r, row) in buf[..hp * wp * c].chunks_mut(wp * c).enumerate() {
        let Some(y) = r.checked_sub(p).filter(|&y| y < h) else {
            row.fill(0.0);
            continue;
        };
        row[..p * c].fill(0.0);
        row[(p + w) * c..].fill(0.0);
        transpose_row(simd, &mut row[p * c..(p + w) * c], &x[y * w..], c, hw);
    }
    buf[hp * wp * c..].fill(0.0);
    Padded { wp, plane }
}

/// Pixels transposed per block by [`transpose_row`]: one cache line of each
/// channel's row.
pub(crate) const TRANSPOSE_BLOCK: usize = 16;

simd_fn! {
    /// `dst [w][c]` from the rows `src[ci·stride..][..w]` of `c` planes.
    pub(crate) fn transpose_row(simd: Simd, dst: &mut [f32], src: &[f32], c: usize, stride: usize) {
        let w = dst.len() / c;
        for x0 in (0..w).step_by(TRANSPOSE_BLOCK) {
            let n = TRANSPOSE_BLOCK.min(w - x0);
            let block = &mut dst[x0 * c..(x0 + n) * c];
            for ci in 0..c {
                let s = &src[ci * stride + x0..][..n];
                for (j, &v) in s.iter().enumerate() {
                    block[j * c + ci] = v;
                }
            }
        }
    }
}

/// One image's weight gradient by shifted views (see [`conv_shifted`]),
/// accumulated tap-major: `dw [cout, k, k, cin]` (see [`tap_major_to_weight`]).
/// With `dY` laid out at the padded row width (zeros in the extra columns)
/// and the padded input channels last ([`pad_channels_last`]), the `k` taps
/// of kernel row `r` read the input at `k` consecutive padded positions, so
/// their `k·cin` input values at output position `q` are contiguous:
/// `padded[(q + r·wp)·cin ..][.. k·cin]`. One GEMM per kernel row, `dW[:, r]
/// += dYwide · X_rᵀ`, depth `h·wp`, reads the input in place through a view
/// whose rows overlap (`k` times fewer GEMMs, each `k` times wider, and the
/// output gradient packed `k` times per image instead of `k·k`).
#[allow(clippy::too_many_arguments)]
pub(crate) fn weight_grad_shifted(
    simd: Simd,
    xi: &[f32],
    gi: &[f32],
    (cin, h, w, cout, k): (usize, usize, usize, usize, usize),
    dw: &mut [f32],
    scratch: &mut Scratch,
    par: Parallelism,
    acc: bool,
) {
    let layout = pad_channels_last(simd, xi, cin, h, w, k, &mut scratch.cols);
    let wp = layout.wp;
    let padded = &scratch.cols;
    let n = h * wp;
    let wide = &mut scratch.wide;
    // Every element is written: each row's values, then zeros in its extra
    // columns.
    wide.resize(cout * n, 0.0);
    for (dst, src) in wide.chunks_mut(n).zip(gi.chunks(h * w)) {
        for (d, s) in dst.chunks_mut(wp).zip(src.chunks(w)) {
            d[..w].copy_from_slice(s);
            d[w..].fill(0.0);
        }
    }
    let row = k * cin;
    for r in 0..k {
        // Element (q, j) of kernel row r's input: padded[(q + r·wp)·cin + j],
        // j = dx·cin + ci.
        let rhs = View {
            data: &padded[layout.tap_offset(r * k, k) * cin..],
            rs: cin,
            cs: 1,
        };
        matmul(
            &mut dw[r * row..],
            k * row,
            1,
            acc,
            rows(wide, n),
            rhs,
            (cout, row, n),
            par,
        );
    }
}

/// `[cout, k·k, cin]` (tap-major, as [`weight_grad_shifted`] accumulates)
/// → `[cout, cin, k·k]` (the weight's layout).
pub(crate) fn tap_major_to_weight(tm: &[f32], cout: usize, cin: usize, kk: usize) -> Vec<f32> {
    let mut out = vec![0f32; tm.len()];
    for (o, t) in out.chunks_mut(cin * kk).zip(tm.chunks(cin * kk)) {
        for (tap, vals) in t.chunks(cin).enumerate() {
            for (ci, &v) in vals.iter().enumerate() {
                o[ci * kk + tap] = v;
            }
        }
    }
    debug_assert_eq!(cout * cin * kk, out.len());
    out
}
