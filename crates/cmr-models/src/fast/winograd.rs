//! 3×3 convolution by Winograd's minimal filtering, F(2×2, 3×3), for layers
//! with many channels.
//!
//! Each 2×2 block of outputs is `Aᵀ [(G g Gᵀ) ⊙ (Bᵀ d B)] A`, `d` the 4×4
//! input patch around it and `g` the 3×3 kernel: 16 products per input and
//! output channel instead of the 36 that the four outputs take directly.
//! Over the channels the products are sums, so the layer is 16 GEMMs,
//! `M[ξ] = U[ξ] · V[ξ]` with `U[ξ] [cout, cin]` the transformed kernels and
//! `V[ξ] [cin, tiles]` the transformed patches (`ξ` one of the 4×4
//! positions), between an input and an output transform that are additions
//! only. The arithmetic falls by 16/36; the transforms cost a pass over the
//! input and one over the output, 4× the size of each.
//!
//! It runs for 3×3 layers with many channels ([`applies`]), instead of
//! im2col under 32×32 and of the direct kernel from there up;
//! `CMR_WINOGRAD=0` or [`set_winograd`] turns it off. Large images go
//! through in bands of tile rows, so that the transformed patches of one
//! round stay a few MB. The results equal the
//! direct sum's to rounding (the transforms add and subtract values of the
//! input's magnitude, so the error is a few units in the last place of the
//! largest of them).

use std::sync::atomic::{AtomicU8, Ordering};

use gemm::Parallelism;
use rayon::prelude::*;

use super::conv::{Epilogue, matmul, rows};
use super::{SendPtr, output_buffer};

/// 0: not yet decided, 1: on, 2: off.
static ON: AtomicU8 = AtomicU8::new(0);

fn enabled() -> bool {
    match ON.load(Ordering::Relaxed) {
        1 => true,
        2 => false,
        _ => {
            let on = std::env::var("CMR_WINOGRAD").map_or(true, |v| v != "0");
            ON.store(if on { 1 } else { 2 }, Ordering::Relaxed);
            on
        }
    }
}

/// Convolve 3×3 layers with many channels by Winograd's F(2×2, 3×3)
/// (`true`, the default) or by the direct kernel or GEMMs (`false`; for
/// comparison).
pub fn set_winograd(on: bool) {
    ON.store(if on { 1 } else { 2 }, Ordering::Relaxed);
}

/// Tiles (2×2 output blocks) per GEMM: the transformed patches of a chunk
/// of images, `16·cin·TILES` values, stay within a few MB.
const TILES: usize = 1152;

/// Whether a `k × k` convolution of `b` images `[cin, h, w]` to `cout`
/// channels runs here: 3×3 kernels on images from 8×8 up with enough
/// channels and tiles for the GEMMs' savings to pay for the transforms.
/// Measured layer by layer (`benches/conv_layer.rs`'s third table and a
/// scratch comparison, two threads), forward and forward+backward against
/// the default otherwise:
/// - under 32×32 (against im2col and one GEMM): 512 → 512 at 12×12 0.76–0.81×
///   at batch 4 and 8, but 1.21× at batch 1 (36 tiles: transforming the
///   weights, 1.8× their size, costs more than the GEMMs save); 256 → 256 at
///   24×24 0.74–0.80×; 128 → 128 at 24×24 0.96–1.06×, 64 → 64 1.3×; at
///   6×6 and batch 20 1.01× (the batch-wide GEMMs of `batched.rs` run those);
/// - from 32×32 (against the direct kernel): 256 → 256 at 96×96 and 48×48
///   0.64–0.73×, 256 → 128 at 48×48 0.71×, 128 → 128 0.77–0.87×, but 128 →
///   64 0.91–1.14×, 64 → 128 1.02–1.04×, 64 → 64 1.1–1.3×.
pub(super) fn applies(b: usize, cin: usize, h: usize, w: usize, cout: usize, k: usize) -> bool {
    let min_weights = if h * w < super::conv::SHIFTED_MIN_PIXELS {
        256 * 256
    } else {
        128 * 128
    };
    k == 3
        && h >= 8
        && w >= 8
        && cin * cout >= min_weights
        && b * h.div_ceil(2) * w.div_ceil(2) >= MIN_TILES
        && enabled()
}

/// The fewest 2×2 output tiles (over the batch) that [`applies`] takes.
const MIN_TILES: usize = 128;

/// `weight [cout, cin, 3, 3]` transformed: `U [16, cout, cin]`, `G g Gᵀ` of
/// each kernel with `G = [[1, 0, 0], [½, ½, ½], [½, −½, ½], [0, 0, 1]]`;
/// output channels on the threads.
fn transform_weights(weight: &[f32], cout: usize, cin: usize) -> Vec<f32> {
    let n = cout * cin;
    // SAFETY: every (ξ, co, ci) value is written below.
    let mut u = unsafe { output_buffer(16 * n) };
    let up = SendPtr(u.as_mut_ptr());
    weight.par_chunks(cin * 9).enumerate().for_each_init(
        || vec![0f32; 16 * cin],
        |tmp, (co, kernels)| {
            for (ci, g) in kernels.chunks_exact(9).enumerate() {
                kernel_transform(g, tmp, ci, cin);
            }
            for (xi, row) in tmp.chunks(cin).enumerate() {
                // SAFETY: this job alone writes row `co` of U[ξ]:
                // `(ξ·cout + co)·cin + cin ≤ 16·n`.
                unsafe { std::ptr::copy_nonoverlapping(row.as_ptr(), up.get().add((xi * cout + co) * cin), cin) };
            }
        },
    );
    u
}

/// `G g Gᵀ` of one 3×3 kernel `g`, value `ξ` to `out[ξ·stride + at]`.
fn kernel_transform(g: &[f32], out: &mut [f32], at: usize, stride: usize) {
    // G g: 4 rows of 3
    let mut gg = [[0f32; 3]; 4];
    for c in 0..3 {
        let (a, b, d) = (g[c], g[3 + c], g[6 + c]);
        gg[0][c] = a;
        gg[1][c] = 0.5 * (a + b + d);
        gg[2][c] = 0.5 * (a - b + d);
        gg[3][c] = d;
    }
    for (r, row) in gg.iter().enumerate() {
        let (a, b, d) = (row[0], row[1], row[2]);
        let vals = [a, 0.5 * (a + b + d), 0.5 * (a - b + d), d];
        for (c, v) in vals.into_iter().enumerate() {
            out[(r * 4 + c) * stride + at] = v;
        }
    }
}

simd_fn! {
    /// One channel's patches of one row of tiles, `Bᵀ d B` with `Bᵀ = [[1, 0,
    /// −1, 0], [0, 1, 1, 0], [0, −1, 1, 0], [0, 1, 0, −1]]`: `rows` are the
    /// four input rows the tiles cover, zero-padded by one column on the left
    /// and enough on the right to `2·tw + 2` columns, each stored as its even
    /// columns then its odd ones (`tw + 1` each), so that every step below
    /// reads contiguous values; tile `tx`'s value at position `ξ` goes to
    /// `v[ξ·stride + tx]`.
    fn input_row(rows: [&[f32]; 4], tw: usize, e: &mut [f32], v: &mut [f32], stride: usize) {
        let n = 2 * tw + 2;
        // Bᵀ d: the four row combinations, over the whole (deinterleaved) row
        let (e0, rest) = e.split_at_mut(n);
        let (e1, rest) = rest.split_at_mut(n);
        let (e2, e3) = rest.split_at_mut(n);
        for x in 0..n {
            let (d0, d1, d2, d3) = (rows[0][x], rows[1][x], rows[2][x], rows[3][x]);
            e0[x] = d0 - d2;
            e1[x] = d1 + d2;
            e2[x] = d2 - d1;
            e3[x] = d1 - d3;
        }
        // (·) B along each row: with a, b, c, d = columns 2tx .. 2tx + 3,
        // a = even[tx], b = odd[tx], c = even[tx + 1], d = odd[tx + 1]
        let h1 = tw + 1;
        for (r, er) in [&*e0, &*e1, &*e2, &*e3].into_iter().enumerate() {
            let (ev, od) = er.split_at(h1);
            let (a, c) = (&ev[..tw], &ev[1..=tw]);
            let (b, d) = (&od[..tw], &od[1..=tw]);
            let base = r * 4 * stride;
            for (o, (&a, &c)) in v[base..][..tw].iter_mut().zip(a.iter().zip(c)) {
                *o = a - c;
            }
            for (o, (&b, &c)) in v[base + stride..][..tw].iter_mut().zip(b.iter().zip(c)) {
                *o = b + c;
            }
            for (o, (&b, &c)) in v[base + 2 * stride..][..tw].iter_mut().zip(b.iter().zip(c)) {
                *o = c - b;
            }
            for (o, (&b, &d)) in v[base + 3 * stride..][..tw].iter_mut().zip(b.iter().zip(d)) {
                *o = b - d;
            }
        }
    }

    /// One output channel's row of output-gradient tiles transformed, `A dY
    /// Aᵀ` of each 2×2 block (`top` and `bottom` rows, `bottom` `None` past
    /// the image; columns past the row are zero): tile `tx`'s value at `ξ` to
    /// `out[ξ·tw + tx]`.
    fn gradient_row(top: &[f32], bottom: Option<&[f32]>, tw: usize, out: &mut [f32]) {
        let w = top.len();
        let at = |row: &[f32], x: usize| if x < w { row[x] } else { 0.0 };
        for tx in 0..tw {
            let x = 2 * tx;
            let (p, q) = (at(top, x), at(top, x + 1));
            let (r, s) = bottom.map_or((0.0, 0.0), |b| (at(b, x), at(b, x + 1)));
            // A dY (A = [[1, 0], [1, 1], [1, −1], [0, −1]]): 4 rows of 2
            let rows = [[p, q], [p + r, q + s], [p - r, q - s], [-r, -s]];
            for (i, [u, v]) in rows.into_iter().enumerate() {
                let vals = [u, u + v, u - v, -v];
                for (j, val) in vals.into_iter().enumerate() {
                    out[(i * 4 + j) * tw + tx] = val;
                }
            }
        }
    }

    /// One output channel's row of tiles back to outputs, `Aᵀ m A` with `Aᵀ =
    /// [[1, 1, 1, 0], [0, 1, −1, −1]]`: `m(ξ)` the tiles' values at position
    /// `ξ`, the 2×2 results written to `out0` / `out1` (output rows `2ty`
    /// and `2ty + 1`; `out1` empty past the image) at columns `2tx`, `2tx +
    /// 1` up to the row's length, with the epilogue `(v + bias)·a + t`, then
    /// ReLU.
    // `tx` indexes the 16 rows of `m` at once
    #[allow(clippy::needless_range_loop)]
    fn output_row(m: [&[f32]; 16], tw: usize, out0: &mut [f32], out1: &mut [f32], epi: (f32, f32, f32, bool)) {
        let (bias, a, t, relu) = epi;
        let finish = |v: f32| {
            let v = (v + bias) * a + t;
            if relu { v.max(0.0) } else { v }
        };
        let w = out0.len();
        for tx in 0..tw {
            let g = |i: usize, j: usize| m[i * 4 + j][tx];
            let mut s0 = [0f32; 4];
            let mut s1 = [0f32; 4];
            for j in 0..4 {
                s0[j] = g(0, j) + g(1, j) + g(2, j);
                s1[j] = g(1, j) - g(2, j) - g(3, j);
            }
            let y = [
                [s0[0] + s0[1] + s0[2], s0[1] - s0[2] - s0[3]],
                [s1[0] + s1[1] + s1[2], s1[1] - s1[2] - s1[3]],
            ];
            let x = 2 * tx;
            out0[x] = finish(y[0][0]);
            if x + 1 < w {
                out0[x + 1] = finish(y[0][1]);
            }
            if !out1.is_empty() {
                out1[x] = finish(y[1][0]);
                if x + 1 < w {
                    out1[x + 1] = finish(y[1][1]);
                }
            }
        }
    }
}

/// A piece of the batch that one round of the 16 GEMMs takes: tile rows
/// `ty0 .. ty1` of images `first .. first + r` (whole images when several
/// fit in [`TILES`], else bands of tile rows of one image).
#[derive(Clone, Copy, Debug)]
struct Chunk {
    first: usize,
    r: usize,
    ty0: usize,
    ty1: usize,
}

impl Chunk {
    /// The chunks of `b` images of `th × tw` tiles, in order.
    fn all(b: usize, th: usize, tw: usize) -> Vec<Chunk> {
        let per_image = th * tw;
        if per_image <= TILES {
            let images = TILES / per_image;
            (0..b)
                .step_by(images)
                .map(|first| Chunk {
                    first,
                    r: images.min(b - first),
                    ty0: 0,
                    ty1: th,
                })
                .collect()
        } else {
            let band = (TILES / tw).max(1);
            (0..b)
                .flat_map(|first| {
                    (0..th).step_by(band).map(move |ty0| Chunk {
                        first,
                        r: 1,
                        ty0,
                        ty1: (ty0 + band).min(th),
                    })
                })
                .collect()
        }
    }

    /// Tiles in the chunk: the columns of its GEMMs.
    fn tiles(&self, tw: usize) -> usize {
        self.r * (self.ty1 - self.ty0) * tw
    }

    /// The column of the first tile of tile row `ty` of the chunk's image `i`.
    fn col(&self, i: usize, ty: usize, tw: usize) -> usize {
        (i * (self.ty1 - self.ty0) + ty - self.ty0) * tw
    }
}

/// The transformed input patches of a chunk of `x [b, cin, h, w]`: `V [16,
/// cin, tiles]`, `Bᵀ d B` of each 4×4 patch, tiles image by image, row by
/// row ([`Chunk::col`]); one task per (image, channel).
fn transform_input(x: &[f32], (cin, h, w): (usize, usize, usize), c: Chunk) -> Vec<f32> {
    let tw = w.div_ceil(2);
    let (first, r) = (c.first, c.r);
    let t = c.tiles(tw);
    // padded rows: one zero column on the left, the rest on the right
    let wp = 2 * tw + 2;
    // SAFETY: every (ξ, channel, tile) value is written below.
    let mut v = unsafe { output_buffer(16 * cin * t) };
    let vp = SendPtr(v.as_mut_ptr());
    // the band's input rows, 2·ty0 − 1 ..= 2·ty1, zero-padded
    let band_rows = 2 * (c.ty1 - c.ty0) + 2;
    (0..r * cin).into_par_iter().for_each_init(
        || (Vec::new(), vec![0f32; 4 * wp], vec![0f32; 16 * tw]),
        |(padded, e, tile_row): &mut (Vec<f32>, Vec<f32>, Vec<f32>), job| {
            let (i, ci) = (job / cin, job % cin);
            let plane = &x[((first + i) * cin + ci) * h * w..][..h * w];
            // each input row copied once (the tiles' rows overlap by two)
            padded.resize(band_rows * wp, 0.0);
            // (stored as [even columns | odd columns], see `input_row`)
            let half = tw + 1;
            for (k, row) in padded.chunks_mut(wp).enumerate() {
                row.fill(0.0);
                if let Some(y) = (2 * c.ty0 + k).checked_sub(1).filter(|&y| y < h) {
                    let (even, odd) = row.split_at_mut(half);
                    // padded column x + 1 holds input column x: odd padded
                    // columns the even input ones, even padded columns from
                    // 2 on the odd input ones
                    let src = &plane[y * w..][..w];
                    for (o, &val) in odd.iter_mut().zip(src.iter().step_by(2)) {
                        *o = val;
                    }
                    for (o, &val) in even[1..].iter_mut().zip(src.iter().skip(1).step_by(2)) {
                        *o = val;
                    }
                }
            }
            for ty in c.ty0..c.ty1 {
                // input rows 2ty − 1 .. 2ty + 3
                let k0 = 2 * (ty - c.ty0) * wp;
                let rows: [&[f32]; 4] = std::array::from_fn(|k| &padded[k0 + k * wp..][..wp]);
                input_row(rows, tw, e, tile_row, tw);
                let col = c.col(i, ty, tw);
                for (xi, vals) in tile_row.chunks(tw).enumerate() {
                    // SAFETY: this job alone writes columns `col .. col + tw`
                    // of row `ci` of V[ξ]; `(ξ·cin + ci)·t + col + tw ≤
                    // 16·cin·t`, inside `v`.
                    unsafe {
                        let dst = vp.get().add((xi * cin + ci) * t + col);
                        std::ptr::copy_nonoverlapping(vals.as_ptr(), dst, tw);
                    }
                }
            }
        },
    );
    v
}

/// The weight and bias gradients of the convolution (`[cout, cin, 3, 3]`,
/// `[cout]`) given the output gradient `dy [b, cout, h, w]`: the adjoint of
/// [`forward`]. Each 2×2 block of `dy` becomes `A dY Aᵀ` (4×4), the 16 GEMMs
/// `dU[ξ] = dM[ξ] · V[ξ]ᵀ` (`[cout, tiles] × [tiles, cin]`) sum over the
/// tiles, and each kernel's gradient is `Gᵀ dU G`.
pub(super) fn weight_grad(
    x: &[f32],
    dy: &[f32],
    (b, cin, h, w, cout): (usize, usize, usize, usize, usize),
) -> (Vec<f32>, Vec<f32>) {
    let (th, tw) = (h.div_ceil(2), w.div_ceil(2));
    let hw = h * w;
    let db: Vec<f32> = (0..cout)
        .into_par_iter()
        .map(|co| {
            (0..b)
                .map(|i| super::block_sum(&dy[(i * cout + co) * hw..][..hw], |v| v))
                .sum::<f64>() as f32
        })
        .collect();
    // SAFETY: the first chunk's GEMMs write every value (no accumulation).
    let mut du = unsafe { output_buffer(16 * cout * cin) };
    for (ci_, c) in Chunk::all(b, th, tw).into_iter().enumerate() {
        let (first, r) = (c.first, c.r);
        let t = c.tiles(tw);
        let v = transform_input(x, (cin, h, w), c);
        // dM [16, cout, t]
        // SAFETY: every (ξ, channel, tile) value is written below.
        let mut dm = unsafe { output_buffer(16 * cout * t) };
        let dp = SendPtr(dm.as_mut_ptr());
        (0..r * cout).into_par_iter().for_each_init(
            || vec![0f32; 16 * tw],
            |tile_row, job| {
                let (i, co) = (job / cout, job % cout);
                let plane = &dy[((first + i) * cout + co) * hw..][..hw];
                for ty in c.ty0..c.ty1 {
                    let top = &plane[2 * ty * w..][..w];
                    let bottom = (2 * ty + 1 < h).then(|| &plane[(2 * ty + 1) * w..][..w]);
                    gradient_row(top, bottom, tw, tile_row);
                    let col = c.col(i, ty, tw);
                    for (xi, vals) in tile_row.chunks(tw).enumerate() {
                        // SAFETY: this job alone writes columns `col .. col
                        // + tw` of row `co` of dM[ξ], inside `dm`.
                        unsafe {
                            let dst = dp.get().add((xi * cout + co) * t + col);
                            std::ptr::copy_nonoverlapping(vals.as_ptr(), dst, tw);
                        }
                    }
                }
            },
        );
        // dU[ξ] (+)= dM[ξ] · V[ξ]ᵀ: [cout, t] × [t, cin]
        let accumulate = ci_ > 0;
        du.par_chunks_mut(cout * cin)
            .zip(dm.par_chunks(cout * t).zip(v.par_chunks(cin * t)))
            .for_each(|(dux, (dmx, vx))| {
                let vt = super::conv::View { data: vx, rs: 1, cs: t };
                matmul(
                    dux,
                    cin,
                    1,
                    accumulate,
                    rows(dmx, t),
                    vt,
                    (cout, cin, t),
                    Parallelism::None,
                );
            });
    }
    // dW = Gᵀ dU G per kernel, output channels on the threads
    let n = cout * cin;
    let mut dw = vec![0f32; n * 9];
    dw.par_chunks_mut(cin * 9).enumerate().for_each(|(co, block)| {
        for (ci, g) in block.chunks_exact_mut(9).enumerate() {
            let d = |xi: usize| du[xi * n + co * cin + ci];
            kernel_gradient(d, g);
        }
    });
    (dw, db)
}

/// `Gᵀ D G` (3×3) of the 4×4 matrix `D` (`d(ξ)`, row-major), into `g`: the
/// adjoint of [`kernel_transform`].
fn kernel_gradient(d: impl Fn(usize) -> f32, g: &mut [f32]) {
    // Gᵀ D: 3 rows of 4; Gᵀ = [[1, ½, ½, 0], [0, ½, −½, 0], [0, ½, ½, 1]]
    // column c of Gᵀ D
    let cols: [[f32; 3]; 4] = std::array::from_fn(|c| {
        let (a, b, e, f) = (d(c), d(4 + c), d(8 + c), d(12 + c));
        [a + 0.5 * (b + e), 0.5 * (b - e), 0.5 * (b + e) + f]
    });
    for r in 0..3 {
        let (a, b, e, f) = (cols[0][r], cols[1][r], cols[2][r], cols[3][r]);
        g[r * 3] = a + 0.5 * (b + e);
        g[r * 3 + 1] = 0.5 * (b - e);
        g[r * 3 + 2] = 0.5 * (b + e) + f;
    }
}

/// `x [b, cin, h, w]` convolved with `weight [cout, cin, 3, 3]` (padding 1)
/// into `out [b, cout, h, w]`, `epi` applied.
pub(super) fn forward(
    x: &[f32],
    weight: &[f32],
    (b, cin, h, w, cout): (usize, usize, usize, usize, usize),
    epi: Epilogue,
    out: &mut [f32],
) {
    let (th, tw) = (h.div_ceil(2), w.div_ceil(2));
    let u = transform_weights(weight, cout, cin);
    let hw = h * w;
    for c in Chunk::all(b, th, tw) {
        let (first, r) = (c.first, c.r);
        let t = c.tiles(tw);
        let v = transform_input(x, (cin, h, w), c);
        // M[ξ] = U[ξ] · V[ξ]: [cout, cin] × [cin, t], the 16 products on the threads
        // SAFETY: every M[ξ] is written by its GEMM (no accumulation).
        let mut m = unsafe { output_buffer(16 * cout * t) };
        m.par_chunks_mut(cout * t)
            .zip(u.par_chunks(cout * cin).zip(v.par_chunks(cin * t)))
            .for_each(|(mx, (ux, vx))| {
                matmul(
                    mx,
                    t,
                    1,
                    false,
                    rows(ux, cin),
                    rows(vx, t),
                    (cout, t, cin),
                    Parallelism::None,
                );
            });
        // outputs, one task per (image, output channel): output rows 2·ty0
        // .. 2·ty1 of each plane
        let (y0, y1) = (2 * c.ty0, (2 * c.ty1).min(h));
        out[first * cout * hw..(first + r) * cout * hw]
            .par_chunks_mut(hw)
            .enumerate()
            .for_each(|(job, plane)| {
                let plane = &mut plane[y0 * w..y1 * w];
                let (i, co) = (job / cout, job % cout);
                let e = (
                    epi.bias.map_or(0.0, |b| b[co]),
                    epi.affine.map_or(1.0, |(a, _)| a[co]),
                    epi.affine.map_or(0.0, |(_, s)| s[co]),
                    epi.relu,
                );
                for ty in c.ty0..c.ty1 {
                    let col = c.col(i, ty, tw);
                    let mrows: [&[f32]; 16] = std::array::from_fn(|xi| &m[(xi * cout + co) * t + col..][..tw]);
                    let (top, bottom) = plane[(2 * ty - y0) * w..].split_at_mut(w);
                    let bottom = if 2 * ty + 1 < h {
                        &mut bottom[..w]
                    } else {
                        &mut bottom[..0]
                    };
                    output_row(mrows, tw, top, bottom, e);
                }
            });
    }
}

#[cfg(test)]
mod tests {
    use candle_core::{Device, Tensor, Var};

    use super::*;
    use crate::testing::{FiniteDiff, assert_gradient, fixed_values, max_rel, narrow, widen};

    /// candle's conv2d (padding 1) + bias.
    fn reference(x: &Tensor, w: &Tensor, b: &Tensor) -> Tensor {
        x.conv2d(w, 1, 1, 1, 1)
            .unwrap()
            .broadcast_add(&b.reshape((1, (), 1, 1)).unwrap())
            .unwrap()
    }

    fn data(t: &Tensor) -> Vec<f32> {
        t.flatten_all().unwrap().to_vec1::<f32>().unwrap()
    }

    /// (batch, cin, cout, h, w) for the tests of [`forward`] and
    /// [`weight_grad`] themselves (whatever [`applies`] says): odd and even
    /// sizes, the smallest image, several chunks of images, an image in bands
    /// of tile rows.
    const SHAPES: &[(usize, usize, usize, usize, usize)] = &[
        (1, 3, 5, 4, 4),
        (2, 4, 3, 5, 7),
        (3, 2, 2, 6, 9),
        (1, 1, 1, 4, 5),
        // 225 tiles per image: chunks of 5 images, the last one of 2
        (7, 3, 4, 30, 30),
        // 35 × 35 tiles per image: bands of 32 tile rows and of 3
        (2, 2, 3, 69, 70),
    ];

    /// [`forward`] against candle, with each epilogue.
    #[test]
    fn forward_matches_candle() {
        let dev = Device::Cpu;
        for &(b, cin, cout, h, w) in SHAPES {
            let shape = (b, cin, cout, h, w);
            let x = Tensor::randn(0f32, 1.0, (b, cin, h, w), &dev).unwrap();
            let wt = Tensor::randn(0f32, 0.5, (cout, cin, 3, 3), &dev).unwrap();
            let bias = Tensor::randn(0f32, 0.5, cout, &dev).unwrap();
            let scale = Tensor::randn(1f32, 0.3, cout, &dev).unwrap();
            let shift = Tensor::randn(0f32, 0.3, cout, &dev).unwrap();
            let z = reference(&x, &wt, &bias);
            let (bv, sv, tv) = (data(&bias), data(&scale), data(&shift));
            for (name, epi, expected) in [
                (
                    "plain",
                    Epilogue::default(),
                    (&z - bias.reshape((1, (), 1, 1)).unwrap().broadcast_as(z.shape()).unwrap()).unwrap(),
                ),
                ("bias", Epilogue::bias(&bv), z.clone()),
                (
                    "affine relu",
                    Epilogue {
                        bias: Some(&bv),
                        affine: Some((&sv, &tv)),
                        relu: true,
                    },
                    z.broadcast_mul(&scale.reshape((1, (), 1, 1)).unwrap())
                        .unwrap()
                        .broadcast_add(&shift.reshape((1, (), 1, 1)).unwrap())
                        .unwrap()
                        .relu()
                        .unwrap(),
                ),
            ] {
                // NaN-filled (`output_buffer` in tests): a value not written fails
                let mut out = unsafe { output_buffer(b * cout * h * w) };
                forward(&data(&x), &data(&wt), (b, cin, h, w, cout), epi, &mut out);
                let got = Tensor::from_vec(out, (b, cout, h, w), &dev).unwrap();
                let e = max_rel(&got, &expected);
                assert!(e < 1e-5, "{shape:?} {name}: {e}");
            }
        }
    }

    /// [`weight_grad`] against candle's gradients of conv2d.
    #[test]
    fn weight_grad_matches_candle() {
        let dev = Device::Cpu;
        for &(b, cin, cout, h, w) in SHAPES {
            let shape = (b, cin, cout, h, w);
            let x = Tensor::randn(0f32, 1.0, (b, cin, h, w), &dev).unwrap();
            let wt = Var::from_tensor(&Tensor::randn(0f32, 0.5, (cout, cin, 3, 3), &dev).unwrap()).unwrap();
            let bias = Var::from_tensor(&Tensor::randn(0f32, 0.5, cout, &dev).unwrap()).unwrap();
            let dy = Tensor::randn(0f32, 1.0, (b, cout, h, w), &dev).unwrap();
            let g = (reference(&x, &wt, &bias) * &dy)
                .unwrap()
                .sum_all()
                .unwrap()
                .backward()
                .unwrap();
            let (dw, db) = weight_grad(&data(&x), &data(&dy), (b, cin, h, w, cout));
            let dw = Tensor::from_vec(dw, (cout, cin, 3, 3), &dev).unwrap();
            let db = Tensor::from_vec(db, cout, &dev).unwrap();
            let e = max_rel(&dw, g.get(wt.as_tensor()).unwrap());
            assert!(e < 1e-5, "{shape:?} dw: {e}");
            let e = max_rel(&db, g.get(bias.as_tensor()).unwrap());
            assert!(e < 1e-5, "{shape:?} db: {e}");
        }
    }

    /// Through the convolution op at a shape where it applies: values and
    /// the three gradients against candle (the input gradient is the same
    /// convolution of the output gradient, so it runs here too), and central
    /// differences at sampled coordinates.
    #[test]
    fn convolution_op_matches_candle_and_finite_differences() {
        let dev = Device::Cpu;
        let (b, cin, cout, h, w) = (2, 256, 256, 16, 16);
        assert!(applies(b, cin, h, w, cout, 3));
        let x0 = fixed_values(b * cin * h * w, 1);
        let w0: Vec<f32> = fixed_values(cout * cin * 9, 2).into_iter().map(|v| v * 0.05).collect();
        let b0 = fixed_values(cout, 3);
        let probe = Tensor::from_vec(fixed_values(b * cout * h * w, 4), (b, cout, h, w), &dev).unwrap();
        let x = Var::from_tensor(&Tensor::from_slice(&x0, (b, cin, h, w), &dev).unwrap()).unwrap();
        let wt = Var::from_tensor(&Tensor::from_slice(&w0, (cout, cin, 3, 3), &dev).unwrap()).unwrap();
        let bias = Var::from_tensor(&Tensor::from_slice(&b0, cout, &dev).unwrap()).unwrap();
        let fast = crate::fast::conv2d(&x, &wt, &bias).unwrap();
        let slow = reference(&x, &wt, &bias);
        assert!(max_rel(&fast, &slow) < 1e-5, "forward {}", max_rel(&fast, &slow));
        let gf = (&fast * &probe).unwrap().sum_all().unwrap().backward().unwrap();
        let gs = (&slow * &probe).unwrap().sum_all().unwrap().backward().unwrap();
        for (name, v) in [("x", &x), ("w", &wt), ("b", &bias)] {
            let e = max_rel(gf.get(v.as_tensor()).unwrap(), gs.get(v.as_tensor()).unwrap());
            assert!(e < 1e-4, "d{name}: {e}");
        }
        let value = |xv: &[f32], wv: &[f32]| -> f64 {
            let xt = Tensor::from_slice(xv, (b, cin, h, w), &dev).unwrap();
            let wt = Tensor::from_slice(wv, (cout, cin, 3, 3), &dev).unwrap();
            let y = crate::fast::conv2d(&xt, &wt, bias.as_tensor()).unwrap();
            f64::from((y * &probe).unwrap().sum_all().unwrap().to_scalar::<f32>().unwrap())
        };
        let grad = |v: &Var| widen(&data(gf.get(v.as_tensor()).unwrap()));
        // linear in each argument: a large step, no truncation error
        let check = FiniteDiff {
            eps: 0.5,
            tol: 2e-3,
            floor: 1.0,
        };
        let xs = (0..x0.len()).step_by(4099);
        let ws = (0..w0.len()).step_by(30011);
        assert_gradient("dx", |v| value(&narrow(v), &w0), &widen(&x0), &grad(&x), check, xs);
        assert_gradient("dw", |v| value(&x0, &narrow(v)), &widen(&w0), &grad(&wt), check, ws);
    }
}
