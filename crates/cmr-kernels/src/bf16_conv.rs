//! The forward convolution in bf16 on AMX tiles (or, where the CPU has no
//! AMX, on AVX512-BF16 dot products), f32 sums: stride 1, "same" padding,
//! odd kernels, the epilogue (bias, inference BatchNorm's affine, ReLU)
//! applied in f32 as the sums leave the unit.
//!
//! The batch is copied once into bf16, each image zero-padded by `k / 2` on
//! every side and the images stacked (`[pixel]` over `b·hp·wp` padded
//! pixels), in the tiles' right-operand layout: input channels in pairs,
//! each pair a plane of pixels with its two values side by side
//! (`[cp/2, pixels, 2]`, channels padded to a multiple of 32). Outputs are
//! numbered as padded pixels (`q = (i·hp + y)·wp + x`; those in padding rows
//! and columns are not outputs and are dropped), so tap `(dy, dx)` of output
//! `q` reads padded pixel `q + dy·wp + dx`: every tap is a constant shift,
//! and 16 consecutive outputs read 16 consecutive pixels of each pair plane,
//! one 64-byte row of a tile. The products are then `sums [cout, q] +=
//! Σ_tap W_tap [cout, cin] · copy [cin, q + shift]`, the weights packed once
//! per call (`[cout, tap, cp]` bf16). No im2col: all `k²` taps read the one
//! copy in place, and the images share each tile multiply (at 6×6 one
//! image has 64 numbered outputs, two blocks).
//!
//! The work is a grid of jobs, one per 32 output channels and run of output
//! blocks: the run's share of the copy and the 32 channels' weights stay in
//! cache while its blocks go through the tiles.
//!
//! The dot products (`vdpbf16ps`: 16 lanes, each adding the two products
//! of a channel pair into f32) read the same copy, with channels padded to
//! a pair only: a block is 8 output channels × 48 numbered outputs (three
//! vectors of one pair plane, each multiplied by one broadcast weight pair
//! per channel), 24 sums in registers through 32 input channels and every
//! tap, the weights packed as `[cout/8, cp/2, tap, 8]` pairs.

use rayon::prelude::*;

use crate::amx::{MatrixUnit, Steps, Tiles, to_bf16};
use crate::cpu::{SendPtr, Simd, simd_fn};
use crate::gemm::Epilogue;

/// Output channels (tile rows) of one block of sums.
const M: usize = 32;
/// Numbered outputs (tile columns) of one block of sums.
const N: usize = 32;
/// Output channels of one block of sums on the dot products.
const DOT_M: usize = 8;
/// Numbered outputs of one block of sums on the dot products: three
/// 16-lane vectors.
const DOT_N: usize = 48;
/// Input channel pairs per pass over a run on the dot products: their
/// weights (for a job's 32 output channels) and pixels stay in the first
/// cache while the run's blocks go through them.
const DOT_PAIRS: usize = 16;
/// The most blocks of outputs in one job's run.
const MAX_RUN: usize = 16;
/// The bytes of the copy that one job's run may read (its blocks, all input
/// channels), so that it stays in the core's cache.
const RUN_BYTES: usize = 256 << 10;

/// The layer's sizes in the layout of the tiles.
#[derive(Clone, Copy, Debug)]
struct Layout {
    b: usize,
    cin: usize,
    h: usize,
    w: usize,
    k: usize,
    /// Input channels, padded to a multiple of 32 (tiles) or 2 (dots).
    cp: usize,
    /// Output channels, padded to a multiple of [`M`] (tiles) or [`DOT_M`].
    np: usize,
    /// The padded height and width.
    hp: usize,
    wp: usize,
    /// Blocks of [`N`] (or [`DOT_N`]) numbered outputs over the batch's
    /// `b·hp·wp`.
    blocks: usize,
    /// Pixels of each pair plane: the stacked padded images and what the
    /// last block's taps read beyond them (zeros).
    pixels: usize,
}

/// How one algorithm cuts the products: numbered outputs per block, output
/// channels per block, and the multiple the input channels are padded to.
#[derive(Clone, Copy, Debug)]
struct Geometry {
    n: usize,
    m: usize,
    c: usize,
}

/// The tiles: 32 × 32 sums per block, input channels in steps of 32.
const TILES: Geometry = Geometry { n: N, m: M, c: 32 };
/// The dot products: 8 output channels × 48 outputs (three vectors) per
/// block, input channels in pairs.
const DOTS: Geometry = Geometry {
    n: DOT_N,
    m: DOT_M,
    c: 2,
};

impl Layout {
    fn new((b, cin, h, w): (usize, usize, usize, usize), cout: usize, k: usize, g: Geometry) -> Self {
        let (hp, wp) = (h + k - 1, w + k - 1);
        let blocks = (b * hp * wp).div_ceil(g.n);
        Self {
            b,
            cin,
            h,
            w,
            k,
            cp: cin.next_multiple_of(g.c),
            np: cout.next_multiple_of(g.m),
            hp,
            wp,
            blocks,
            pixels: blocks * g.n + (k - 1) * (wp + 1),
        }
    }
}

simd_fn! {
    /// `dst[i] = bf16(src[i·stride])`.
    fn convert_strided(simd: Simd, dst: &mut [u16], src: &[f32], stride: usize) {
        for (i, d) in dst.iter_mut().enumerate() {
            *d = to_bf16(src[i * stride]);
        }
    }

    /// `dst[i] = bf16(a[i]) | bf16(b[i]) << 16`: two channels' values side by
    /// side.
    fn convert_pairs(simd: Simd, dst: &mut [u32], a: &[f32], b: &[f32]) {
        for (d, (&a, &b)) in dst.iter_mut().zip(a.iter().zip(b)) {
            *d = u32::from(to_bf16(a)) | (u32::from(to_bf16(b)) << 16);
        }
    }

    /// As [`convert_pairs`] with the second channel zero (padding).
    fn convert_single(simd: Simd, dst: &mut [u32], a: &[f32]) {
        for (d, &a) in dst.iter_mut().zip(a) {
            *d = u32::from(to_bf16(a));
        }
    }
}

/// `weight [cout, cin, k, k]` as the tiles' left operand: output channel
/// `co`, tap `t`, input channel `ci` at `(co·k² + t)·cp + ci`; zero where the
/// channels are padding.
fn pack_weights(simd: Simd, weight: &[f32], l: Layout) -> Vec<u16> {
    let kk = l.k * l.k;
    let n = l.np * kk * l.cp;
    let mut packed = Vec::with_capacity(n);
    // Each output channel's rows written in full by one task (zeros, then
    // the channel's weights): no serial zero fill of the whole buffer first.
    packed.spare_capacity_mut()[..n]
        .par_chunks_mut(kk * l.cp)
        .enumerate()
        .for_each(|(co, rows)| {
            for v in rows.iter_mut() {
                v.write(0);
            }
            // SAFETY: every value of `rows` was written just above, and
            // `MaybeUninit<u16>` has `u16`'s layout.
            let rows = unsafe { std::slice::from_raw_parts_mut(rows.as_mut_ptr().cast::<u16>(), rows.len()) };
            if co < weight.len() / (l.cin * kk) {
                let kernels = &weight[co * l.cin * kk..][..l.cin * kk];
                for (t, row) in rows.chunks_exact_mut(l.cp).enumerate() {
                    convert_strided(simd, &mut row[..l.cin], &kernels[t..], kk);
                }
            }
        });
    // SAFETY: the tasks above wrote all `n` values.
    unsafe { packed.set_len(n) };
    packed
}

/// `x [b, cin, h, w]` as the tiles' right operand: pair plane `p` holds
/// input channels `2p` and `2p + 1`, pixel `(i·hp + y + k/2)·wp + x + k/2`
/// of image `i` at `(p·pixels + pixel)·2 + e`; zero in the padding and in
/// the padding channels.
fn pair_planes(simd: Simd, x: &[f32], l: Layout) -> Vec<u32> {
    let pad = l.k / 2;
    let hw = l.h * l.w;
    let mut copy = vec![0u32; l.cp / 2 * l.pixels];
    copy.par_chunks_mut(l.pixels)
        .enumerate()
        .take(l.cin.div_ceil(2))
        .for_each(|(p, dst)| {
            for i in 0..l.b {
                let plane = |c: usize| &x[(i * l.cin + c) * hw..][..hw];
                for y in 0..l.h {
                    let at = (i * l.hp + y + pad) * l.wp + pad;
                    let d = &mut dst[at..at + l.w];
                    let a = &plane(2 * p)[y * l.w..][..l.w];
                    if 2 * p + 1 < l.cin {
                        convert_pairs(simd, d, a, &plane(2 * p + 1)[y * l.w..][..l.w]);
                    } else {
                        convert_single(simd, d, a);
                    }
                }
            }
        });
    copy
}

/// A job's numbered outputs that are outputs: `len` of them from `at` in
/// its run, image `i`'s plane offset `offset`.
#[derive(Clone, Copy, Debug)]
struct Segment {
    at: usize,
    i: usize,
    offset: usize,
    len: usize,
}

/// The outputs among numbered outputs `q0 .. q0 + len`, row by row.
fn segments(l: Layout, q0: usize, len: usize) -> Vec<Segment> {
    let mut out = Vec::new();
    // padded rows `q0 / wp ..` that hold outputs (output row y is padded row
    // y of its image: the taps reach k − 1 rows and columns further)
    let (first, last) = (q0 / l.wp, (q0 + len).div_ceil(l.wp));
    for row in first..last.min(l.b * l.hp) {
        let (i, y) = (row / l.hp, row % l.hp);
        if y >= l.h {
            continue;
        }
        let start = (row * l.wp).max(q0);
        let end = (row * l.wp + l.w).min(q0 + len);
        if start < end {
            out.push(Segment {
                at: start - q0,
                i,
                offset: y * l.w + (start - row * l.wp),
                len: end - start,
            });
        }
    }
    out
}

/// `x [b, cin, h, w]` convolved with `weight [cout, cin, k, k]` (odd `k`,
/// padding `k / 2`) into `out [b, cout, h, w]`, `epi` applied; the products
/// in bf16 on `unit` (AMX tiles or AVX512-BF16 dot products), summed in
/// f32. Returns `false`, having written nothing, where this CPU lacks
/// `unit`.
#[allow(clippy::too_many_arguments)]
pub(crate) fn forward(
    simd: Simd,
    unit: MatrixUnit,
    x: &[f32],
    dims: (usize, usize, usize, usize),
    weight: &[f32],
    (cout, k): (usize, usize),
    epi: Epilogue,
    out: &mut [f32],
) -> bool {
    let (b, cin, h, w) = dims;
    assert!(k % 2 == 1, "bf16 convolution: odd kernels only, not {k}");
    assert!(
        x.len() == b * cin * h * w && weight.len() == cout * cin * k * k && out.len() == b * cout * h * w,
        "bf16 convolution: sizes"
    );
    let available = match unit {
        MatrixUnit::Amx => crate::amx::has_amx(),
        MatrixUnit::Avx512Bf16 => crate::amx::has_avx512_bf16(),
        MatrixUnit::None => false,
    };
    if !available {
        return false;
    }
    if out.is_empty() {
        return true;
    }
    let geometry = if unit == MatrixUnit::Amx { TILES } else { DOTS };
    let l = Layout::new(dims, cout, k, geometry);
    let copy = pair_planes(simd, x, l);
    let n = geometry.n;
    let run = (RUN_BYTES / (l.cp * 2 * n)).clamp(1, MAX_RUN);
    let runs = l.blocks.div_ceil(run);
    let outp = SendPtr(out.as_mut_ptr());
    let hw = h * w;
    // One job: output channels `n0 .. n0 + M` over the blocks of run `r`,
    // summed into `sums [M, len]` and written out with the epilogue.
    let finish = |sums: &[f32], n0: usize, q0: usize, len: usize| {
        for seg in segments(l, q0, len) {
            for j in 0..M.min(cout.saturating_sub(n0)) {
                let co = n0 + j;
                // SAFETY: one job alone writes channels `n0 .. n0 + M` of the
                // outputs numbered `q0 .. q0 + len` (each output has one
                // number); `seg` lies inside image `seg.i`'s plane `co`, and
                // `out` holds `b·cout·h·w` values (asserted above).
                let dst = unsafe {
                    std::slice::from_raw_parts_mut(outp.get().add((seg.i * cout + co) * hw + seg.offset), seg.len)
                };
                let src = &sums[j * len + seg.at..][..seg.len];
                epilogue_row(dst, src, epi, co);
            }
        }
    };
    let jobs = l.np.div_ceil(M) * runs;
    let packed = if unit == MatrixUnit::Amx {
        Packed::Tiles(pack_weights(simd, weight, l))
    } else {
        Packed::Dots(pack_dot_weights(weight, l))
    };
    (0..jobs).into_par_iter().for_each_init(Vec::new, |sums, job| {
        let (n0, r) = ((job / runs) * M, job % runs);
        let blocks = r * run..((r + 1) * run).min(l.blocks);
        let len = blocks.len() * n;
        sums.resize(M * len, 0f32);
        match &packed {
            Packed::Tiles(packed) => tiles_job(l, packed, &copy, n0, blocks.clone(), sums),
            Packed::Dots(packed) => dots_job(l, packed, &copy, n0, blocks.clone(), sums),
        }
        finish(sums, n0, blocks.start * n, len);
    });
    true
}

/// The weights as one unit reads them.
enum Packed {
    /// [`pack_weights`]'s layout.
    Tiles(Vec<u16>),
    /// [`pack_dot_weights`]'s layout.
    Dots(Vec<u32>),
}

/// One job on the tiles: `sums [M, len]` = output channels `n0 .. n0 + M`
/// of the numbered outputs in `blocks`.
fn tiles_job(l: Layout, packed: &[u16], copy: &[u32], n0: usize, blocks: std::ops::Range<usize>, sums: &mut [f32]) {
    let (k, kk) = (l.k, l.k * l.k);
    let len = blocks.len() * N;
    let Some(mut tiles) = Tiles::new() else {
        unreachable!("AMX was found by the caller")
    };
    // Channel blocks outermost: one block's weights for all taps (32
    // output channels × k² × 32 values) stay in the core's first cache
    // while every output block of the run goes through them, and the
    // sums go back to `sums` in between. The k² taps of one output block
    // read pixels at most `(k − 1)·(wp + 1)` apart in the same pair
    // planes, in cache after the first.
    for c in 0..l.cp / 32 {
        for (bi, block) in blocks.clone().enumerate() {
            if c == 0 {
                tiles.zero();
            } else {
                tiles.load(&sums[bi * N..], len);
            }
            for t in 0..kk {
                let q = block * N + (t / k) * l.wp + t % k;
                let (a, p) = (c * 32 + t * l.cp, 16 * c * l.pixels + q);
                // SAFETY: the left operand's rows `n0 + r`, `r < 32`, are
                // rows of `packed` (`np` of them, `k²·cp` values each), read
                // at values `t·cp + 32c ..`, 32 of them, inside the row;
                // the right operand's pair planes `16c + j`, `j < 16`, of
                // `cp/2`, are read at pixels `q .. q + 32`, below
                // `blocks·N + (k − 1)·(wp + 1)` = `pixels`.
                unsafe {
                    tiles.steps(Steps {
                        a: [
                            packed[n0 * kk * l.cp + a..].as_ptr(),
                            packed[(n0 + 16) * kk * l.cp + a..].as_ptr(),
                        ],
                        a_stride: kk * l.cp * 2,
                        a_step: 0,
                        b: [copy[p..].as_ptr().cast(), copy[p + 16..].as_ptr().cast()],
                        b_stride: l.pixels * 4,
                        b_step: 0,
                        count: 1,
                    });
                }
            }
            tiles.store(&mut sums[bi * N..], len);
        }
    }
}

/// `weight [cout, cin, k, k]` as the dot products read it: groups of
/// [`DOT_M`] output channels, each `[cp/2][k²][DOT_M]` channel pairs (the
/// bf16 of channels `2p` and `2p + 1` side by side); zero where the channels
/// are padding.
fn pack_dot_weights(weight: &[f32], l: Layout) -> Vec<u32> {
    let kk = l.k * l.k;
    let pairs = l.cp / 2;
    let mut packed = vec![0u32; l.np * pairs * kk];
    let cout = weight.len() / (l.cin * kk);
    packed
        .par_chunks_mut(pairs * kk * DOT_M)
        .enumerate()
        .for_each(|(g, group)| {
            for j in 0..DOT_M.min(cout.saturating_sub(g * DOT_M)) {
                let kernels = &weight[(g * DOT_M + j) * l.cin * kk..][..l.cin * kk];
                for ci in 0..l.cin {
                    let half = 16 * (ci % 2);
                    for t in 0..kk {
                        group[((ci / 2) * kk + t) * DOT_M + j] |= u32::from(to_bf16(kernels[ci * kk + t])) << half;
                    }
                }
            }
        });
    packed
}

/// One job on the dot products: `sums [M, len]` = output channels `n0 ..
/// n0 + M` (those below `np`) of the numbered outputs in `blocks`.
fn dots_job(l: Layout, packed: &[u32], copy: &[u32], n0: usize, blocks: std::ops::Range<usize>, sums: &mut [f32]) {
    let kk = l.k * l.k;
    let pairs = l.cp / 2;
    let len = blocks.len() * DOT_N;
    let offsets: Vec<usize> = (0..kk).map(|t| (t / l.k) * l.wp + t % l.k).collect();
    let groups = (l.np - n0).min(M) / DOT_M;
    // Channel pairs in passes of DOT_PAIRS, outermost: a pass's weights for
    // the job's groups and its pixels of the run stay in cache while every
    // block goes through them; the sums go back to `sums` in between.
    for p0 in (0..pairs).step_by(DOT_PAIRS) {
        let pn = DOT_PAIRS.min(pairs - p0);
        for (bi, block) in blocks.clone().enumerate() {
            for g in 0..groups {
                let group = (n0 / DOT_M + g) * pairs * kk * DOT_M;
                let w = &packed[group + p0 * kk * DOT_M..][..pn * kk * DOT_M];
                let x = &copy[p0 * l.pixels + block * DOT_N..];
                let s = &mut sums[g * DOT_M * len + bi * DOT_N..];
                assert!(
                    x.len() >= (pn - 1) * l.pixels + DOT_N + offsets[kk - 1] && s.len() >= (DOT_M - 1) * len + DOT_N,
                    "bf16 dot products: buffers too small"
                );
                // SAFETY: the CPU has AVX512-BF16 (the caller checked); the
                // assertion above keeps every read of `x` (pair `p < pn` at
                // pixels `p·pixels + offset .. + 48`) and every access to `s`
                // (rows `j < 8` of stride `len`, 48 values) inside them, and
                // `w` holds `pn·k²·8` values.
                unsafe {
                    dot_block(
                        x.as_ptr(),
                        l.pixels,
                        &offsets,
                        pn,
                        w.as_ptr(),
                        s.as_mut_ptr(),
                        len,
                        p0 > 0,
                    )
                };
            }
        }
    }
}

/// One block of sums on the dot products: outputs `x[..48]` (relative to
/// `x`) × the 8 output channels of `w`, through `pairs` channel pairs and
/// every tap, added to what `sums` holds when `add` (row stride `stride`),
/// stored there.
///
/// # Safety
/// The CPU has AVX512-BF16 and AVX-512F; `x + p·pixels + offsets[t] + 48`
/// stays inside one allocation for every `p < pairs` and tap `t`; `w` holds
/// `pairs·offsets.len()·8` values; `sums + j·stride + 48` is readable and
/// writable for `j < 8`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bf16")]
#[allow(clippy::too_many_arguments)]
// Constant indices only: the 24 accumulators must stay in registers.
#[allow(clippy::needless_range_loop)]
unsafe fn dot_block(
    x: *const u32,
    pixels: usize,
    offsets: &[usize],
    pairs: usize,
    w: *const u32,
    sums: *mut f32,
    stride: usize,
    add: bool,
) {
    use std::arch::x86_64::*;
    let mut acc = [[_mm512_setzero_ps(); DOT_M]; 3];
    if add {
        for j in 0..DOT_M {
            for i in 0..3 {
                // SAFETY: inside the bounds of this function's contract.
                acc[i][j] = unsafe { _mm512_loadu_ps(sums.add(j * stride + 16 * i)) };
            }
        }
    }
    let mut wp = w;
    for p in 0..pairs {
        // SAFETY: inside the bounds of this function's contract.
        let base = unsafe { x.add(p * pixels) };
        for &off in offsets {
            // SAFETY: inside the bounds of this function's contract.
            let v: [__m512bh; 3] = unsafe {
                let at = base.add(off);
                [
                    std::mem::transmute::<__m512i, __m512bh>(_mm512_loadu_si512(at.cast())),
                    std::mem::transmute::<__m512i, __m512bh>(_mm512_loadu_si512(at.add(16).cast())),
                    std::mem::transmute::<__m512i, __m512bh>(_mm512_loadu_si512(at.add(32).cast())),
                ]
            };
            for j in 0..DOT_M {
                // SAFETY: inside the bounds of this function's contract; a
                // pair of bf16 is 32 bits, as `__m512bh`'s lanes in pairs.
                let b = unsafe { std::mem::transmute::<__m512i, __m512bh>(_mm512_set1_epi32(*wp.add(j) as i32)) };
                for i in 0..3 {
                    acc[i][j] = _mm512_dpbf16_ps(acc[i][j], v[i], b);
                }
            }
            // SAFETY: inside the bounds of this function's contract.
            wp = unsafe { wp.add(DOT_M) };
        }
    }
    for j in 0..DOT_M {
        for i in 0..3 {
            // SAFETY: inside the bounds of this function's contract.
            unsafe { _mm512_storeu_ps(sums.add(j * stride + 16 * i), acc[i][j]) };
        }
    }
}

#[cfg(not(target_arch = "x86_64"))]
#[allow(clippy::too_many_arguments)]
unsafe fn dot_block(_: *const u32, _: usize, _: &[usize], _: usize, _: *const u32, _: *mut f32, _: usize, _: bool) {
    unreachable!("AVX512-BF16 on a CPU that is not x86-64")
}

/// `dst = epi(src)` for output channel `co`.
fn epilogue_row(dst: &mut [f32], src: &[f32], epi: Epilogue, co: usize) {
    let bias = epi.bias.map_or(0.0, |b| b[co]);
    match (epi.affine, epi.relu) {
        (Some((a, t)), relu) => {
            let (a, t) = (a[co], t[co]);
            for (d, &v) in dst.iter_mut().zip(src) {
                let v = (v + bias) * a + t;
                *d = if relu { v.max(0.0) } else { v };
            }
        }
        (None, true) => dst.iter_mut().zip(src).for_each(|(d, &v)| *d = (v + bias).max(0.0)),
        (None, false) => dst.iter_mut().zip(src).for_each(|(d, &v)| *d = v + bias),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::amx::from_bf16;

    /// The convolution of the bf16-rounded operands in f64: what the tiles
    /// compute, up to the order of the f32 additions.
    fn reference(
        x: &[f32],
        (b, cin, h, w): (usize, usize, usize, usize),
        weight: &[f32],
        (cout, k): (usize, usize),
    ) -> Vec<f64> {
        let r = |v: f32| f64::from(from_bf16(to_bf16(v)));
        let pad = (k / 2) as isize;
        let mut out = vec![0f64; b * cout * h * w];
        for i in 0..b {
            for co in 0..cout {
                for y in 0..h {
                    for xx in 0..w {
                        let mut s = 0f64;
                        for ci in 0..cin {
                            for dy in 0..k {
                                for dx in 0..k {
                                    let (yy, xs) = (y as isize + dy as isize - pad, xx as isize + dx as isize - pad);
                                    if yy < 0 || xs < 0 || yy >= h as isize || xs >= w as isize {
                                        continue;
                                    }
                                    let xv = x[((i * cin + ci) * h + yy as usize) * w + xs as usize];
                                    s += r(xv) * r(weight[((co * cin + ci) * k + dy) * k + dx]);
                                }
                            }
                        }
                        out[((i * cout + co) * h + y) * w + xx] = s;
                    }
                }
            }
        }
        out
    }

    /// Odd shapes: channels that are not multiples of 32 (and one), widths
    /// that leave a partial block, 1×1, 3×3 and 5×5 kernels, several images;
    /// with each part of the epilogue.
    #[test]
    fn matches_the_rounded_operands_convolved() {
        let units: Vec<MatrixUnit> = [MatrixUnit::Amx, MatrixUnit::Avx512Bf16]
            .into_iter()
            .filter(|&u| match u {
                MatrixUnit::Amx => crate::amx::has_amx(),
                _ => crate::amx::has_avx512_bf16(),
            })
            .collect();
        if units.is_empty() {
            eprintln!("no AMX-BF16 nor AVX512-BF16 here: the bf16 convolution is not tested (the f32 kernels run)");
            return;
        }
        for &unit in &units {
            assert!(
                !forward(
                    Simd::Widest,
                    MatrixUnit::None,
                    &[0.0],
                    (1, 1, 1, 1),
                    &[0.0],
                    (1, 1),
                    Epilogue::default(),
                    &mut [0.0]
                ),
                "no unit: nothing done"
            );
            check_unit(unit);
        }
    }

    fn check_unit(unit: MatrixUnit) {
        for &(b, cin, h, w, cout, k) in &[
            (1, 1, 5, 7, 3, 3),
            (2, 33, 6, 6, 17, 3),
            (1, 64, 12, 12, 64, 3),
            (3, 40, 9, 13, 50, 5),
            (2, 32, 8, 3, 32, 1),
            (1, 70, 24, 24, 96, 3),
            (2, 24, 10, 17, 24, 3),
            (1, 100, 7, 9, 40, 3),
        ] {
            let x: Vec<f32> = (0..b * cin * h * w).map(|i| ((i as f32) * 0.173).sin()).collect();
            let wt: Vec<f32> = (0..cout * cin * k * k)
                .map(|i| ((i as f32) * 0.291).cos() * 0.1)
                .collect();
            let bias: Vec<f32> = (0..cout).map(|c| c as f32 * 0.01 - 0.1).collect();
            let scale: Vec<f32> = (0..cout).map(|c| 1.0 + c as f32 * 0.02).collect();
            let shift: Vec<f32> = (0..cout).map(|c| 0.05 - c as f32 * 0.003).collect();
            let want = reference(&x, (b, cin, h, w), &wt, (cout, k));
            let largest = want.iter().fold(0f64, |m, v| m.max(v.abs()));
            for (name, epi) in [
                ("none", Epilogue::default()),
                ("bias", Epilogue::bias(&bias)),
                (
                    "bias, affine, relu",
                    Epilogue {
                        bias: Some(&bias),
                        affine: Some((&scale, &shift)),
                        relu: true,
                    },
                ),
            ] {
                let mut out = vec![f32::NAN; b * cout * h * w];
                assert!(forward(
                    Simd::Widest,
                    unit,
                    &x,
                    (b, cin, h, w),
                    &wt,
                    (cout, k),
                    epi,
                    &mut out
                ));
                for (idx, (&got, &s)) in out.iter().zip(&want).enumerate() {
                    let co = (idx / (h * w)) % cout;
                    let mut v = s + epi.bias.map_or(0.0, |b| f64::from(b[co]));
                    if let Some((a, t)) = epi.affine {
                        v = v * f64::from(a[co]) + f64::from(t[co]);
                    }
                    if epi.relu {
                        v = v.max(0.0);
                    }
                    let tol = 1e-5 * (largest * 2.0 + 1.0);
                    assert!(
                        (f64::from(got) - v).abs() <= tol,
                        "{unit} {:?} {name} at {idx}: {got} vs {v}",
                        (b, cin, h, w, cout, k)
                    );
                }
            }
        }
    }
}
