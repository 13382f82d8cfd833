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
//! The kernel exists for AVX-512 only; elsewhere (or with `CMR_DIRECT=0`)
//! the convolution runs as shifted-view GEMMs. Like `gemm`'s own kernels it
//! is chosen by what the CPU has, not by `CMR_SIMD` (its fused multiply-adds
//! round differently from the baseline build's loops).

use std::cell::Cell;
use std::sync::atomic::{AtomicU8, Ordering};

use rayon::prelude::*;

/// Output positions per micro-kernel tile: three 16-float vectors.
pub(super) const MR: usize = 48;
/// Output channels per micro-kernel tile.
pub(super) const NR: usize = 8;
/// Tiles per block of work: a block's input rows stay in L2 while every
/// output-channel group passes over them.
const TILES_PER_BLOCK: usize = 4;
/// Input channels per pass over a block: their rows stay in L1 while every
/// output-channel group reads them. Wider inputs take several passes, each
/// adding to the last one's result.
const CI_BLOCK: usize = 32;

/// 0: not yet decided, 1: on, 2: off.
static DIRECT: AtomicU8 = AtomicU8::new(0);

thread_local! {
    /// Set by [`without_direct`]: this thread's convolutions use GEMMs.
    static OFF_HERE: Cell<bool> = const { Cell::new(false) };
}

/// Run `f` with the direct kernel off for the convolutions this thread
/// starts (tests of the GEMM path, which run alongside others).
#[cfg(test)]
pub(super) fn without_direct<R>(f: impl FnOnce() -> R) -> R {
    OFF_HERE.with(|c| c.set(true));
    let r = f();
    OFF_HERE.with(|c| c.set(false));
    r
}

/// Whether the direct kernel runs: the CPU has AVX-512 and `CMR_DIRECT=0`
/// (or [`set_direct`]) did not turn it off.
pub(super) fn enabled() -> bool {
    if OFF_HERE.with(Cell::get) {
        return false;
    }
    match DIRECT.load(Ordering::Relaxed) {
        1 => true,
        2 => false,
        _ => {
            let on = std::env::var("CMR_DIRECT").map(|v| v != "0").unwrap_or(true) && has_avx512();
            DIRECT.store(if on { 1 } else { 2 }, Ordering::Relaxed);
            on
        }
    }
}

/// Use the direct convolution kernel where the CPU has it (`true`, the
/// default) or the shifted-view GEMMs everywhere (`false`).
pub fn set_direct(on: bool) {
    DIRECT.store(if on && has_avx512() { 1 } else { 2 }, Ordering::Relaxed);
}

#[cfg(target_arch = "x86_64")]
fn has_avx512() -> bool {
    std::is_x86_feature_detected!("avx512f")
}

#[cfg(not(target_arch = "x86_64"))]
fn has_avx512() -> bool {
    false
}

/// `n` rounded up to a multiple of `m`.
pub(super) fn round_up(n: usize, m: usize) -> usize {
    n.div_ceil(m) * m
}

/// `weight [cout, cin, kk]` (row-major) as the kernel reads it: groups of
/// [`NR`] output channels, each `[cin][kk][NR]`, zeros for the channels past
/// `cout` in the last group.
pub(super) fn pack_weights(weight: &[f32], cout: usize, cin: usize, kk: usize) -> Vec<f32> {
    let groups = cout.div_ceil(NR);
    let mut packed = vec![0f32; groups * cin * kk * NR];
    for (co, w) in weight.chunks(cin * kk).take(cout).enumerate() {
        let group = &mut packed[(co / NR) * cin * kk * NR..][..cin * kk * NR];
        for (d, &v) in w.iter().enumerate() {
            group[d * NR + co % NR] = v;
        }
    }
    packed
}

/// The shape of one image's direct convolution.
#[derive(Clone, Copy)]
pub(super) struct Shape {
    pub(super) cin: usize,
    /// Distance between two channels' planes in the padded input.
    pub(super) plane: usize,
    /// Output channels, rounded up to [`NR`]: the rows of `out`.
    pub(super) cout_r: usize,
    /// Output positions, rounded up to [`MR`]: the row length of `out`.
    pub(super) n_r: usize,
}

/// Convolve one padded image into `out [cout_r, n_r]`: every position `q <
/// n_r` of every row, `out[co, q] = Σ W[co, ci, tap]·padded[ci·plane + q +
/// offsets[tap]]` (positions that read past the image's meaningful values
/// are computed all the same and dropped by the caller). `padded` must hold
/// `(cin − 1)·plane + n_r + max(offsets)` values; threads split the
/// positions when `parallel`.
pub(super) fn convolve(padded: &[f32], packed: &[f32], offsets: &[usize], s: Shape, out: &mut [f32], parallel: bool) {
    let kk = offsets.len();
    let max_off = offsets.iter().copied().max().unwrap_or(0);
    assert!(has_avx512(), "the direct convolution needs AVX-512");
    assert!(
        s.n_r.is_multiple_of(MR)
            && s.cout_r.is_multiple_of(NR)
            && s.cin > 0
            && padded.len() >= (s.cin - 1) * s.plane + s.n_r + max_off
            && packed.len() >= s.cout_r * s.cin * kk
            && out.len() >= s.cout_r * s.n_r,
        "direct convolution: buffers too small"
    );
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
                    // SAFETY: the CPU has AVX-512 (asserted above); the
                    // other assertion keeps every read inside `padded` and
                    // `w` (the largest input index is `(cin −
                    // 1)·plane + n_r − 1 + max_off`) and every write inside
                    // `out` (`(g·NR + NR − 1)·n_r + n_r − 1`). Blocks write
                    // disjoint positions, so the threads never write the
                    // same element.
                    unsafe {
                        tile(
                            padded.as_ptr().add(c0 * s.plane + q0),
                            s.plane,
                            offsets,
                            cn,
                            w.as_ptr(),
                            out_ptr.get().add(g * NR * s.n_r + q0),
                            s.n_r,
                            c0 > 0,
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

/// A raw pointer the threads of [`convolve`] share (each writes its own
/// positions).
#[derive(Clone, Copy)]
struct SendPtr(*mut f32);
// SAFETY: see `convolve`: the threads write disjoint elements.
unsafe impl Send for SendPtr {}
unsafe impl Sync for SendPtr {}
impl SendPtr {
    fn get(self) -> *mut f32 {
        self.0
    }
}

/// One tile: positions `x[..MR]` (relative to `x`) × channels `w`'s group,
/// through the depth `cin × offsets`, added to what `out` holds when
/// `accumulate`.
///
/// # Safety
/// The CPU has AVX-512F; `x + ci·plane + offsets[t] + MR` stays inside one
/// allocation for every `ci < cin` and tap `t`, `w` holds `cin·kk·NR`
/// values and `out + j·out_rs + MR` is writable for `j < NR`.
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
    out: *mut f32,
    out_rs: usize,
    accumulate: bool,
) {
    use std::arch::x86_64::*;
    let mut acc = [[_mm512_setzero_ps(); NR]; 3];
    if accumulate {
        for j in 0..NR {
            for i in 0..3 {
                acc[i][j] = unsafe { _mm512_loadu_ps(out.add(j * out_rs + 16 * i)) };
            }
        }
    }
    let mut wp = w;
    for ci in 0..cin {
        let base = unsafe { x.add(ci * plane) };
        for &off in offsets {
            let p = unsafe { base.add(off) };
            let v = unsafe {
                [
                    _mm512_loadu_ps(p),
                    _mm512_loadu_ps(p.add(16)),
                    _mm512_loadu_ps(p.add(32)),
                ]
            };
            for j in 0..NR {
                let b = _mm512_set1_ps(unsafe { *wp.add(j) });
                for i in 0..3 {
                    acc[i][j] = _mm512_fmadd_ps(v[i], b, acc[i][j]);
                }
            }
            wp = unsafe { wp.add(NR) };
        }
    }
    for j in 0..NR {
        for i in 0..3 {
            unsafe { _mm512_storeu_ps(out.add(j * out_rs + 16 * i), acc[i][j]) };
        }
    }
}

#[cfg(not(target_arch = "x86_64"))]
#[allow(clippy::too_many_arguments)]
unsafe fn tile(_: *const f32, _: usize, _: &[usize], _: usize, _: *const f32, _: *mut f32, _: usize, _: bool) {
    unreachable!("the direct convolution runs on x86-64 with AVX-512 only")
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
        let packed = pack_weights(&weight, cout, cin, kk);
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
            let packed = pack_weights(&weight, cout, cin, k * k);
            let mut out = vec![f32::NAN; cout_r * n_r];
            let shape = Shape {
                cin,
                plane,
                cout_r,
                n_r,
            };
            convolve(&padded, &packed, &offsets, shape, &mut out, parallel);
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
}
