//! Direct convolution with its own AVX-512 micro-kernel: no GEMM, no
//! packing of the input.
//!
//! With the input zero-padded (`[cin, plane]`, see `conv::pad`), output
//! position `q` of channel `co` is `Σ_ci Σ_tap W[co, ci, tap] · Xpad[ci, q +
//! offset(tap)]`. The `k·k` shifted-view GEMMs of `conv::conv_shifted`
//! compute that as nine products of depth `cin` (16–80 at the narrow widths),
//! each reading and writing the whole `[cout, q]` result again and each
//! packing its operands. Here one micro-kernel call keeps a tile of 48
//! positions × 8 output channels in 24 vector registers through the whole
//! depth `cin·k·k`, reading the input in place: for each `(ci, tap)`, three
//! contiguous 16-float loads at `q + offset(tap)` and 8 broadcast weights.
//! The only data rearranged is the weight, once per call: `[cout/8][cin][k·k][8]`.
//!
//! The kernel exists for AVX-512 only; elsewhere (or with
//! `KernelConfig::direct` off) [`crate::plan`] picks shifted-view GEMMs. Like
//! `gemm`'s own kernels it runs by what the CPU has, whatever
//! `KernelConfig::simd` says (its fused multiply-adds round differently from
//! the baseline build's loops).

use rayon::prelude::*;

use crate::cpu::{SendPtr, has_avx512};
use crate::gemm::{Epilogue, Scratch};
use crate::shifted::{Padded, pad};

/// Output positions per micro-kernel tile: three 16-float vectors.
pub(crate) const MR: usize = 48;
/// Output channels per micro-kernel tile.
pub(crate) const NR: usize = 8;
/// Tiles per block of work: a block's input rows stay in L2 while every
/// output-channel group passes over them.
const TILES_PER_BLOCK: usize = 4;
/// Input channels per pass over a block: their rows stay in L1 while every
/// output-channel group reads them. Wider inputs take several passes, each
/// adding to the last one's result.
pub(crate) const CI_BLOCK: usize = 32;

/// `n` rounded up to a multiple of `m`.
pub(crate) fn round_up(n: usize, m: usize) -> usize {
    n.div_ceil(m) * m
}

/// `weight [cout, cin, kk]` (row-major) as the kernel reads it: groups of
/// [`NR`] output channels, each `[cin][kk][NR]`, zeros for the channels past
/// `cout` in the last group. Groups in parallel when `parallel` (one image
/// convolved on all threads, so no other work to overlap with).
pub(crate) fn pack_weights(weight: &[f32], cout: usize, cin: usize, kk: usize, parallel: bool) -> Vec<f32> {
    let groups = cout.div_ceil(NR);
    let mut packed = vec![0f32; groups * cin * kk * NR];
    let fill = |(g, group): (usize, &mut [f32])| {
        for co in g * NR..((g + 1) * NR).min(cout) {
            for (d, &v) in weight[co * cin * kk..][..cin * kk].iter().enumerate() {
                group[d * NR + co % NR] = v;
            }
        }
    };
    if parallel {
        packed.par_chunks_mut(cin * kk * NR).enumerate().for_each(fill);
    } else {
        packed.chunks_mut(cin * kk * NR).enumerate().for_each(fill);
    }
    packed
}

/// The shape of one image's direct convolution.
#[derive(Clone, Copy)]
pub(crate) struct Shape {
    pub(crate) cin: usize,
    /// Distance between two channels' planes in the padded input.
    pub(crate) plane: usize,
    /// Output channels, rounded up to [`NR`]: the rows of `out`.
    pub(crate) cout_r: usize,
    /// Output positions, rounded up to [`MR`]: the row length of `out`.
    pub(crate) n_r: usize,
}

/// Where the last pass over the input channels writes, instead of the
/// padded-width result: the output planes `[cout, h·w]` of one image, the
/// epilogue applied to each value on the way (bias, then scale and shift,
/// then ReLU, the same operations in the same order as `conv::copy_out`,
/// so the same bits).
pub(crate) struct Planes<'a> {
    pub(crate) out: &'a mut [f32],
    pub(crate) shape: PlaneShape<'a>,
}

/// The layout of [`Planes`] and the epilogue.
#[derive(Clone, Copy)]
pub(crate) struct PlaneShape<'a> {
    pub(crate) cout: usize,
    pub(crate) h: usize,
    pub(crate) w: usize,
    /// The padded row width: output position `q` is row `q / wp`, column
    /// `q % wp` (columns from `w` on are padding).
    pub(crate) wp: usize,
    pub(crate) epi: Epilogue<'a>,
}

/// Convolve one padded image: every position `q < n_r` of every output
/// channel, `Σ W[co, ci, tap]·padded[ci·plane + q + offsets[tap]]`, into
/// `out [cout_r, n_r]`, or, with `planes`, straight into its output planes
/// (`out` then holds only the partial sums of the passes before the last,
/// when `cin` needs several). Positions past the image's meaningful values
/// are computed all the same and dropped. `padded` must hold `(cin −
/// 1)·plane + n_r + max(offsets)` values; threads split the positions when
/// `parallel`.
pub(crate) fn convolve(
    padded: &[f32],
    packed: &[f32],
    offsets: &[usize],
    s: Shape,
    out: &mut [f32],
    planes: Option<Planes>,
    parallel: bool,
) {
    let kk = offsets.len();
    let max_off = offsets.iter().copied().max().unwrap_or(0);
    assert!(has_avx512(), "the direct convolution needs AVX-512");
    assert!(
        s.n_r.is_multiple_of(MR)
            && s.cout_r.is_multiple_of(NR)
            && s.cin > 0
            && padded.len() >= (s.cin - 1) * s.plane + s.n_r + max_off
            && packed.len() >= s.cout_r * s.cin * kk
            && (out.len() >= s.cout_r * s.n_r || (planes.is_some() && s.cin <= CI_BLOCK)),
        "direct convolution: buffers too small"
    );
    if let Some(Planes { out, shape: p }) = &planes {
        assert!(
            p.w >= 16
                && p.wp >= p.w
                && p.h * p.wp <= s.n_r
                && p.cout <= s.cout_r
                && out.len() >= p.cout * p.h * p.w
                && p.epi.bias.is_none_or(|b| b.len() >= p.cout)
                && p.epi.affine.is_none_or(|(a, t)| a.len() >= p.cout && t.len() >= p.cout),
            "direct convolution: output planes do not match"
        );
    }
    // the threads write disjoint elements of the planes through this pointer
    let planes_ptr = planes.map(|Planes { out, shape }| (SendPtr(out.as_mut_ptr()), shape));
    let blocks = s.n_r.div_ceil(MR * TILES_PER_BLOCK);
    let out_ptr = SendPtr(out.as_mut_ptr());
    let block = |bi: usize| {
        let q_start = bi * MR * TILES_PER_BLOCK;
        let q_end = (q_start + MR * TILES_PER_BLOCK).min(s.n_r);
        for c0 in (0..s.cin).step_by(CI_BLOCK) {
            let cn = CI_BLOCK.min(s.cin - c0);
            for g in 0..s.cout_r / NR {
                let w = &packed[(g * s.cin + c0) * kk * NR..][..cn * kk * NR];
                for q0 in (q_start..q_end).step_by(MR) {
                    let last = c0 + cn == s.cin;
                    let sink = match planes_ptr {
                        Some((ptr, p)) if last => Sink::Planes {
                            ptr: ptr.get(),
                            p,
                            g,
                            q0,
                        },
                        _ => Sink::Wide(out_ptr.get().wrapping_add(g * NR * s.n_r + q0), s.n_r),
                    };
                    // SAFETY: the CPU has AVX-512 (asserted above); the
                    // other assertion keeps every read inside `padded` and
                    // `w` (the largest input index is `(cin −
                    // 1)·plane + n_r − 1 + max_off`) and every access to
                    // `out` inside it (`(g·NR + NR − 1)·n_r + n_r − 1`;
                    // `out` is only read or written when it has that many
                    // values, asserted above); writes to the planes stay
                    // inside `cout·h·w` ([`store_planes`]). Blocks write
                    // disjoint positions, so the threads never write the
                    // same element.
                    unsafe {
                        tile(
                            padded.as_ptr().add(c0 * s.plane + q0),
                            s.plane,
                            offsets,
                            cn,
                            w.as_ptr(),
                            (c0 > 0).then(|| out_ptr.get().wrapping_add(g * NR * s.n_r + q0).cast_const()),
                            s.n_r,
                            sink,
                        )
                    };
                }
            }
        }
    };
    if parallel {
        (0..blocks).into_par_iter().for_each(block);
    } else {
        (0..blocks).for_each(block);
    }
}

/// One tile: positions `x[..MR]` (relative to `x`) × channels `w`'s group,
/// through the depth `cin × offsets`, added to the partial sums at
/// `partial` (row stride `partial_rs`) when there are some, put where `sink`
/// says.
///
/// # Safety
/// The CPU has AVX-512F; `x + ci·plane + offsets[t] + MR` stays inside one
/// allocation for every `ci < cin` and tap `t`, `w` holds `cin·kk·NR`
/// values, `partial + j·partial_rs + MR` is readable and a `Sink::Wide`
/// pointer `+ j·row stride + MR` writable for `j < NR`; see [`store_planes`]
/// for `Sink::Planes`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
#[allow(clippy::too_many_arguments)]
// Constant indices only (no iterators over `acc`): the accumulators must stay
// in registers, not be spilled to memory on every step.
#[allow(clippy::needless_range_loop)]
unsafe fn tile(
    x: *const f32,
    plane: usize,
    offsets: &[usize],
    cin: usize,
    w: *const f32,
    partial: Option<*const f32>,
    partial_rs: usize,
    sink: Sink,
) {
    use std::arch::x86_64::*;
    let mut acc = [[_mm512_setzero_ps(); NR]; 3];
    if let Some(from) = partial {
        for j in 0..NR {
            for i in 0..3 {
                // SAFETY: inside the bounds this function's contract gives (see its `# Safety`).
                acc[i][j] = unsafe { _mm512_loadu_ps(from.add(j * partial_rs + 16 * i)) };
            }
        }
    }
    let mut wp = w;
    for ci in 0..cin {
        // SAFETY: inside the bounds this function's contract gives (see its `# Safety`).
        let base = unsafe { x.add(ci * plane) };
        for &off in offsets {
            // SAFETY: inside the bounds this function's contract gives (see its `# Safety`).
            let p = unsafe { base.add(off) };
            // SAFETY: inside the bounds this function's contract gives (see its `# Safety`).
            let v = unsafe {
                [
                    _mm512_loadu_ps(p),
                    _mm512_loadu_ps(p.add(16)),
                    _mm512_loadu_ps(p.add(32)),
                ]
            };
            for j in 0..NR {
                // SAFETY: inside the bounds this function's contract gives (see its `# Safety`).
                let b = _mm512_set1_ps(unsafe { *wp.add(j) });
                for i in 0..3 {
                    acc[i][j] = _mm512_fmadd_ps(v[i], b, acc[i][j]);
                }
            }
            // SAFETY: inside the bounds this function's contract gives (see its `# Safety`).
            wp = unsafe { wp.add(NR) };
        }
    }
    match sink {
        Sink::Wide(out, out_rs) => {
            for j in 0..NR {
                for i in 0..3 {
                    // SAFETY: inside the bounds this function's contract gives (see its `# Safety`).
                    unsafe { _mm512_storeu_ps(out.add(j * out_rs + 16 * i), acc[i][j]) };
                }
            }
        }
        Sink::Planes { ptr, p, g, q0 } => {
            // Written out for each `i`: with a loop here LLVM kept `acc` in
            // memory for the whole kernel.
            macro_rules! store {
                ($i:literal) => {{
                    let a = &acc[$i];
                    let v = [a[0], a[1], a[2], a[3], a[4], a[5], a[6], a[7]];
                    // SAFETY: a `Sink::Planes` holds planes as `store_planes` needs them (this function's contract).
                    unsafe { store_planes(ptr, &p, g * NR, q0 + 16 * $i, &v) };
                }};
            }
            store!(0);
            store!(1);
            store!(2);
        }
    }
}

/// Where [`tile`] puts its result: the padded-width rows (`out`, row stride)
/// or, with the epilogue, the output planes (group `g`, first position `q0`).
#[derive(Clone, Copy)]
enum Sink<'a> {
    Wide(*mut f32, usize),
    Planes {
        ptr: *mut f32,
        p: PlaneShape<'a>,
        g: usize,
        q0: usize,
    },
}

/// Store 16 positions from `q` of channels `co0..co0 + NR` (`v[j]` for channel
/// `co0 + j`) into the output planes at `ptr` with the epilogue: the lanes
/// in row `q / wp` up to column `w`, and those that run into the next row.
///
/// # Safety
/// The CPU has AVX-512F; `ptr` is writable for `p.cout·p.h·p.w` values, `w ≥
/// 16` (16 positions span at most two rows) and the epilogue's vectors hold
/// `p.cout` values.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn store_planes(ptr: *mut f32, p: &PlaneShape, co0: usize, q: usize, v: &[std::arch::x86_64::__m512; NR]) {
    use std::arch::x86_64::*;
    let (y, x) = (q / p.wp, q % p.wp);
    // lanes of row y (columns x.. below w), and of row y + 1 (from wp − x on)
    let here: u16 = if y < p.h && x < p.w {
        let n = (p.w - x).min(16);
        if n == 16 { u16::MAX } else { (1u16 << n) - 1 }
    } else {
        0
    };
    let next: u16 = if y + 1 < p.h && x + 16 > p.wp {
        u16::MAX << (p.wp - x)
    } else {
        0
    };
    let hw = p.h * p.w;
    for (j, &acc) in v.iter().enumerate() {
        let co = co0 + j;
        if co >= p.cout {
            break;
        }
        let mut r = acc;
        if let Some(b) = p.epi.bias {
            r = _mm512_add_ps(r, _mm512_set1_ps(b[co]));
        }
        if let Some((a, t)) = p.epi.affine {
            r = _mm512_add_ps(_mm512_mul_ps(r, _mm512_set1_ps(a[co])), _mm512_set1_ps(t[co]));
        }
        if p.epi.relu {
            r = _mm512_max_ps(r, _mm512_setzero_ps());
        }
        // Lane l goes to y·w + x + l in row y, to (y + 1)·w + x + l − wp in
        // row y + 1; masked-off lanes are not touched.
        let plane = ptr.wrapping_add(co * hw);
        if here != 0 {
            // SAFETY: the lane mask keeps every store inside the planes (`store_planes`'s contract).
            unsafe { _mm512_mask_storeu_ps(plane.wrapping_add(y * p.w + x), here, r) };
        }
        if next != 0 {
            let base = plane.wrapping_add((y + 1) * p.w + x).wrapping_sub(p.wp);
            // SAFETY: the lane mask keeps every store inside the planes (`store_planes`'s contract).
            unsafe { _mm512_mask_storeu_ps(base, next, r) };
        }
    }
}

#[cfg(not(target_arch = "x86_64"))]
unsafe fn store_planes(_: *mut f32, _: &PlaneShape, _: usize, _: usize, _: &[f32; NR]) {
    unreachable!("the direct convolution runs on x86-64 with AVX-512 only")
}

#[cfg(not(target_arch = "x86_64"))]
#[allow(clippy::too_many_arguments)]
unsafe fn tile(
    _: *const f32,
    _: usize,
    _: &[usize],
    _: usize,
    _: *const f32,
    _: Option<*const f32>,
    _: usize,
    _: Sink,
) {
    unreachable!("the direct convolution runs on x86-64 with AVX-512 only")
}

/// One image's convolution by the direct kernel ([`convolve`]) on
/// the padded input, `weight` packed by [`pack_weights`]; the kernel
/// applies the epilogue as it writes the output.
pub(crate) fn conv_direct(
    xi: &[f32],
    (cin, h, w, cout, k): (usize, usize, usize, usize, usize),
    packed: &[f32],
    epi: Epilogue,
    out: &mut [f32],
    scratch: &mut Scratch,
    parallel: bool,
) {
    let layout = pad(xi, cin, h, w, k, &mut scratch.cols, parallel);
    let Padded { wp, plane } = layout;
    let n = h * wp;
    let n_r = round_up(n, MR);
    let cout_r = round_up(cout, NR);
    let offsets: Vec<usize> = (0..k * k).map(|tap| layout.tap_offset(tap, k)).collect();
    // The last tile reads up to `n_r − n` values past the last plane: their
    // results are dropped, but the reads must stay inside the buffer.
    scratch.cols.resize(cin * plane + (n_r - n), 0.0);
    // Partial sums only when the input channels take several passes; the
    // last pass writes the output planes with the epilogue.
    if cin > CI_BLOCK {
        scratch.wide.resize(cout_r * n_r, 0.0);
    }
    let shape = Shape {
        cin,
        plane,
        cout_r,
        n_r,
    };
    let planes = Planes {
        out,
        shape: PlaneShape { cout, h, w, wp, epi },
    };
    convolve(
        &scratch.cols,
        packed,
        &offsets,
        shape,
        &mut scratch.wide,
        Some(planes),
        parallel,
    );
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::fixed_values;

    /// Weights land at `[group][ci][tap][channel in group]`, zeros after
    /// the last channel.
    #[test]
    fn packs_weights_by_groups_of_output_channels() {
        let (cout, cin, kk) = (9, 2, 3);
        let weight: Vec<f32> = (0..cout * cin * kk).map(|i| i as f32 + 1.0).collect();
        let packed = pack_weights(&weight, cout, cin, kk, false);
        assert_eq!(
            packed,
            pack_weights(&weight, cout, cin, kk, true),
            "packed on all threads"
        );
        assert_eq!(packed.len(), 2 * cin * kk * NR);
        // W[co = 3, ci = 1, tap = 2] is weight[3·6 + 1·3 + 2] = 24.
        assert_eq!(packed[(3 + 2) * NR + 3], 24.0);
        // W[co = 8, ci = 0, tap = 1]: group 1, channel 0.
        assert_eq!(packed[(cin * kk) * NR + NR], weight[8 * 6 + 1]);
        // channel 9 of group 1 does not exist: zeros.
        assert!((0..cin * kk).all(|d| {
            packed[cin * kk * NR + d * NR + 1..cin * kk * NR + (d + 1) * NR]
                .iter()
                .all(|&v| v == 0.0)
        }));
    }

    /// Every output of the kernel against the sum written out, in f64:
    /// one pass over the input channels and several (more than
    /// [`CI_BLOCK`]), output channels filling their groups or not, 3×3 and
    /// 5×5 taps, serial and split among threads.
    #[test]
    fn tiles_match_the_plain_sum() {
        if !has_avx512() {
            eprintln!("no AVX-512 on this CPU: the direct kernel is never used here");
            return;
        }
        for &(cin, cout, k, n_r, parallel) in &[
            (1, 3, 3, 48, false),
            (5, 8, 3, 240, true),
            (33, 13, 3, 480, false),
            (70, 16, 5, 288, true),
        ] {
            let wp = 13;
            let offsets: Vec<usize> = (0..k * k).map(|t| (t / k) * wp + t % k).collect();
            let max_off = (k - 1) * wp + k - 1;
            let plane = n_r + max_off + 3;
            let padded = fixed_values(cin * plane, 1);
            let weight = fixed_values(cout * cin * k * k, 2);
            let cout_r = round_up(cout, NR);
            let packed = pack_weights(&weight, cout, cin, k * k, true);
            let mut out = vec![f32::NAN; cout_r * n_r];
            let shape = Shape {
                cin,
                plane,
                cout_r,
                n_r,
            };
            convolve(&padded, &packed, &offsets, shape, &mut out, None, parallel);
            for co in 0..cout {
                for q in 0..n_r {
                    let mut want = 0f64;
                    for ci in 0..cin {
                        for (t, &off) in offsets.iter().enumerate() {
                            let wv = weight[(co * cin + ci) * k * k + t];
                            want += f64::from(wv) * f64::from(padded[ci * plane + q + off]);
                        }
                    }
                    let got = f64::from(out[co * n_r + q]);
                    let scale = (cin * k * k) as f64;
                    assert!(
                        (got - want).abs() <= 1e-6 * scale,
                        "{:?} channel {co} position {q}: {got} vs {want}",
                        (cin, cout, k, n_r, parallel)
                    );
                }
            }
            // the padding channels of the last group are computed from zero
            // weights
            assert!(out[cout * n_r..].iter().all(|&v| v == 0.0));
        }
    }

    /// Written straight into the output planes with the epilogue, the
    /// values are the bits of the padded-width result with the epilogue
    /// applied afterwards (one pass and several; rows that end inside a
    /// 16-position vector; output channels not filling their group), and
    /// nothing outside the planes is touched.
    #[test]
    fn planes_get_the_padded_result_with_the_epilogue() {
        if !has_avx512() {
            eprintln!("no AVX-512 on this CPU: the direct kernel is never used here");
            return;
        }
        for &(cin, cout, h, w, relu, affine, parallel) in &[
            (3, 5, 7, 17, true, false, false),
            (40, 11, 6, 30, false, true, true),
            (2, 8, 5, 16, true, true, false),
        ] {
            let wp = w + 2;
            let offsets: Vec<usize> = (0..9).map(|t| (t / 3) * wp + t % 3).collect();
            let n_r = round_up(h * wp, MR);
            let plane = n_r + 2 * wp + 2;
            let padded = fixed_values(cin * plane, 3);
            let weight = fixed_values(cout * cin * 9, 4);
            let bias = fixed_values(cout, 5);
            let (scale, shift) = (fixed_values(cout, 6), fixed_values(cout, 7));
            let packed = pack_weights(&weight, cout, cin, 9, false);
            let cout_r = round_up(cout, NR);
            let shape = Shape {
                cin,
                plane,
                cout_r,
                n_r,
            };
            let epi = Epilogue {
                bias: Some(&bias),
                affine: affine.then_some((&scale[..], &shift[..])),
                relu,
            };
            let mut wide = vec![0f32; cout_r * n_r];
            convolve(&padded, &packed, &offsets, shape, &mut wide, None, parallel);
            // a sentinel after the planes: must stay as it is
            let mut out = vec![f32::NAN; cout * h * w + 37];
            let mut partial = vec![0f32; cout_r * n_r];
            let planes = Planes {
                out: &mut out[..cout * h * w],
                shape: PlaneShape { cout, h, w, wp, epi },
            };
            convolve(&padded, &packed, &offsets, shape, &mut partial, Some(planes), parallel);
            for co in 0..cout {
                for y in 0..h {
                    for x in 0..w {
                        let mut v = wide[co * n_r + y * wp + x] + bias[co];
                        if affine {
                            v = v * scale[co] + shift[co];
                        }
                        if relu {
                            v = v.max(0.0);
                        }
                        let got = out[(co * h + y) * w + x];
                        assert_eq!(
                            got.to_bits(),
                            v.to_bits(),
                            "{:?} channel {co} at ({y}, {x})",
                            (cin, cout, h, w)
                        );
                    }
                }
            }
            assert!(
                out[cout * h * w..].iter().all(|v| v.is_nan()),
                "written past the planes"
            );
        }
    }
}
