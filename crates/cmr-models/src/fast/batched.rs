//! A convolution on small images (under [`super::conv`]'s
//! `SHIFTED_MIN_PIXELS`; by default only where [`applies`] says it was
//! measured faster: the 6×6 layers at the report's widths) as GEMMs over the
//! whole batch, forward and backward.
//!
//! Image by image, the weight gradient is one GEMM per image of depth `h·w`
//! (36 at 6×6) into the whole `[cout, cin·k·k]` gradient, per thread, and
//! the threads' partial gradients are then added: at 512 channels that is
//! 9.4 MB read and written per image for 36 multiply-adds per value, plus
//! the partials' allocation and their sum. The input gradient needed the
//! kernel flipped and transposed first (2.4 M values at 512 channels, a
//! scalar pass over memory on every step).
//!
//! Here the images of a run (up to [`RUN_COLUMNS`] pixels in all) are laid
//! side by side, `dY` as `[cout, r·h·w]` and the unfolded inputs as
//! `[cin·k·k, r·h·w]`, and each gradient is one GEMM that `gemm` splits
//! across the threads:
//! - `dW (+)= dY · colsᵀ`, depth `r·h·w`, written in place (no partials);
//! - `dcols = Wᵀ · dY` reads the weight through a transposed view (no
//!   flipped copy), and `dX` is `dcols` folded back onto the planes, the
//!   adjoint of the unfolding ([`fold_plane`]);
//! - the forward pass, [`forward`], is `Y = W · cols` on the same runs.

use std::cell::Cell;
use std::sync::atomic::{AtomicU8, Ordering};

use gemm::Parallelism;
use rayon::prelude::*;

use super::conv::{
    Epilogue, SHIFTED_MIN_PIXELS, View, add_plane_sums, copy_out, copy_out_affine, im2col, matmul, rows, with_scratch,
};
use super::{output_buffer, threads};

/// Pixels (`images × h·w`) per run of images: the run's unfolded input and
/// column gradient, `[cin·k·k, run]` each, are the GEMMs' operands.
const RUN_COLUMNS: usize = 1024;

/// The three gradients of a convolution on small images from its output
/// gradient `g [b, cout, h·w]`: input (when `want_dx`), weight `[cout,
/// cin·k·k]` and bias.
pub(super) fn backward(
    x: &[f32],
    weight: &[f32],
    g: &[f32],
    (b, cin, h, w, cout, k): (usize, usize, usize, usize, usize, usize),
    want_dx: bool,
) -> (Option<Vec<f32>>, Vec<f32>, Vec<f32>) {
    let hw = h * w;
    let taps = k * k;
    let kk = cin * taps;
    let per_run = run_images(hw, b);
    let par = Parallelism::Rayon(threads());
    // SAFETY: the first run's GEMM writes every value (`accumulate` false).
    let mut dw = unsafe { output_buffer(cout * kk) };
    // SAFETY: each run folds a value into every pixel of its images.
    let mut dx = want_dx.then(|| unsafe { output_buffer(b * cin * hw) });
    let mut db = vec![0f64; cout];
    if b == 0 {
        dw.fill(0.0);
    }
    with_scratch(|scratch| {
        for (run, first) in (0..b).step_by(per_run).enumerate() {
            let r = per_run.min(b - first);
            let ld = r * hw;
            // dY of the run side by side: row co is channel co of each image.
            let gcat = &mut scratch.wide;
            gcat.resize(cout * ld, 0.0);
            gcat.par_chunks_mut(ld).enumerate().for_each(|(co, row)| {
                for (bi, dst) in row.chunks_mut(hw).enumerate() {
                    dst.copy_from_slice(&g[((first + bi) * cout + co) * hw..][..hw]);
                }
            });
            add_plane_sums(&mut db, gcat, ld);
            // The run's inputs unfolded: rows ci·k·k + tap, image bi at
            // column bi·h·w.
            let cols = &mut scratch.cols;
            cols.resize(kk * ld, 0.0);
            im2col(&x[first * cin * hw..], (r, cin, h, w, k), cols, true);
            // dW (+)= dY · colsᵀ; colsᵀ's element (p, j) is cols[j·ld + p].
            let cols_t = View {
                data: cols,
                rs: 1,
                cs: ld,
            };
            matmul(&mut dw, kk, 1, run > 0, rows(gcat, ld), cols_t, (cout, kk, ld), par);
            let Some(dx) = dx.as_mut() else { continue };
            // dcols = Wᵀ · dY, over the unfolded inputs (no longer needed);
            // Wᵀ's element (j, co) is weight[co·kk + j].
            let w_t = View {
                data: weight,
                rs: 1,
                cs: kk,
            };
            matmul(cols, ld, 1, false, w_t, rows(gcat, ld), (kk, ld, cout), par);
            let dcols: &[f32] = cols;
            dx[first * cin * hw..(first + r) * cin * hw]
                .par_chunks_mut(hw)
                .enumerate()
                .for_each(|(i, plane)| {
                    let (bi, ci) = (i / cin, i % cin);
                    fold_plane(&dcols[ci * taps * ld + bi * hw..], ld, h, w, k, plane);
                });
        }
    });
    (dx, dw, db.into_iter().map(|v| v as f32).collect())
}

/// The forward pass on the same runs: the run's inputs unfolded side by
/// side, `Y = W · cols` as one GEMM of `r·h·w` columns (one image's 6×6 is a
/// GEMM 36 columns wide, a quarter of `gemm`'s speed at 512 channels), then
/// each image's planes copied out with the epilogue applied (by the copies
/// the other paths use, so the same operations in the same order).
pub(super) fn forward(
    x: &[f32],
    weight: &[f32],
    (b, cin, h, w, cout, k): (usize, usize, usize, usize, usize, usize),
    epi: Epilogue,
    out: &mut [f32],
) {
    let hw = h * w;
    let taps = k * k;
    let kk = cin * taps;
    let per_run = run_images(hw, b);
    let par = Parallelism::Rayon(threads());
    with_scratch(|scratch| {
        for first in (0..b).step_by(per_run) {
            let r = per_run.min(b - first);
            let ld = r * hw;
            let cols = &mut scratch.cols;
            cols.resize(kk * ld, 0.0);
            im2col(&x[first * cin * hw..], (r, cin, h, w, k), cols, true);
            let ycat = &mut scratch.wide;
            ycat.resize(cout * ld, 0.0);
            matmul(
                ycat,
                ld,
                1,
                false,
                rows(weight, kk),
                rows(cols, ld),
                (cout, ld, kk),
                par,
            );
            let ycat: &[f32] = ycat;
            // Image bi's channel co is ycat[co·ld + bi·h·w..][..h·w]: the
            // padded-width copy with rows of h·w values, ld apart.
            let sizes = [hw, ld, hw, ld];
            out[first * cout * hw..(first + r) * cout * hw]
                .par_chunks_mut(cout * hw)
                .enumerate()
                .for_each(|(bi, oi)| {
                    let src = &ycat[bi * hw..];
                    match epi.affine {
                        Some((a, t)) => copy_out_affine(oi, src, sizes, epi.bias, a, t, epi.relu),
                        None => copy_out(oi, src, sizes, epi.bias, epi.relu),
                    }
                });
        }
    });
}

/// Images per run: as many as fit in [`RUN_COLUMNS`] pixels, at least one.
fn run_images(hw: usize, b: usize) -> usize {
    let run_columns = FORCED.with(Cell::get).unwrap_or(RUN_COLUMNS);
    (run_columns / hw).clamp(1, b.max(1))
}

simd_fn! {
    /// The adjoint of the unfolding ([`im2col`]): `plane [h, w]` from the `k·k` rows
    /// of column gradients at `rows[t·ld..]`, each value added to the input
    /// pixel its tap read (none for taps that read the zero padding).
    fn fold_plane(rows: &[f32], ld: usize, h: usize, w: usize, k: usize, plane: &mut [f32]) {
        let hw = h * w;
        let pad = k / 2;
        // The centre tap reads every pixel once, in place: it sets the plane.
        let centre = (k * k) / 2;
        plane.copy_from_slice(&rows[centre * ld..][..hw]);
        for tap in (0..k * k).filter(|&t| t != centre) {
            let row = &rows[tap * ld..][..hw];
            // Output (y, x) read input (y + dy, x + dx), dy = tap / k − pad.
            let (ty, tx) = (tap / k, tap % k);
            // Output rows and columns whose input is inside the plane.
            let ys = pad.saturating_sub(ty)..(h + pad).saturating_sub(ty).min(h);
            let xs = pad.saturating_sub(tx)..(w + pad).saturating_sub(tx).min(w);
            if xs.is_empty() {
                continue;
            }
            for y in ys {
                let src = &row[y * w + xs.start..y * w + xs.end];
                let to = (y + ty - pad) * w + xs.start + tx - pad;
                for (d, &v) in plane[to..to + src.len()].iter_mut().zip(src) {
                    *d += v;
                }
            }
        }
    }
}

/// The largest images (pixels) whose convolution runs batch-wide by
/// default, and the fewest weights (`cout·cin·k·k`). Measured with the
/// `conv_layer` bench (fwd+bwd, batch 8, two threads, two runs of it):
/// batch-wide is faster at 6×6 from 256 → 256 channels up (512 → 512: 1.2×,
/// 1024 → 1024: 1.4–1.5×), within noise at 128 → 256, slower at 128 → 128
/// and at 12×12 and 24×24 (up to 1.4× at 64 → 64, 24×24): there one image's
/// GEMM is already deep enough, and images on separate threads need no
/// synchronisation inside the GEMMs.
const MAX_PIXELS: usize = 8 * 8;
const MIN_WEIGHTS: usize = 256 * 256 * 9;

/// Whether [`backward`] is the way to differentiate this convolution.
pub(super) fn applies(cin: usize, h: usize, w: usize, cout: usize, k: usize) -> bool {
    let small = k > 1 && h * w < SHIFTED_MIN_PIXELS;
    if FORCED.with(Cell::get).is_some() {
        return small;
    }
    match mode() {
        Batched::Off => false,
        Batched::Always => small,
        Batched::Auto => small && h * w <= MAX_PIXELS && cout * cin * k * k >= MIN_WEIGHTS,
    }
}

thread_local! {
    /// Set by [`forced`]: on this thread every small image's backward pass
    /// runs batch-wide, in runs of this many pixels.
    static FORCED: Cell<Option<usize>> = const { Cell::new(None) };
}

/// Run `f` with every small image's backward pass on this thread batch-wide,
/// in runs of at most `run_columns` pixels (for tests on small shapes).
#[cfg(test)]
pub(super) fn forced<R>(run_columns: usize, f: impl FnOnce() -> R) -> R {
    FORCED.with(|c| c.set(Some(run_columns)));
    let r = f();
    FORCED.with(|c| c.set(None));
    r
}

/// How small images' convolution backward passes run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Batched {
    /// Image by image, as the forward pass.
    Off,
    /// Batch-wide where it was measured faster (the default): see
    /// `MAX_PIXELS` and `MIN_WEIGHTS` in `fast/batched.rs`.
    Auto,
    /// Batch-wide for every image under 32×32 (for comparisons).
    Always,
}

/// 0: not yet read from the environment, else 1 + the [`Batched`] index.
static MODE: AtomicU8 = AtomicU8::new(0);

/// The mode in force: [`set_batched`]'s, else `CMR_BATCHED=0` (off) or the
/// default ([`Batched::Auto`]).
fn mode() -> Batched {
    match MODE.load(Ordering::Relaxed) {
        1 => Batched::Off,
        2 => Batched::Auto,
        3 => Batched::Always,
        _ => {
            let off = std::env::var("CMR_BATCHED").is_ok_and(|v| v == "0");
            let mode = if off { Batched::Off } else { Batched::Auto };
            set_batched(mode);
            mode
        }
    }
}

/// Choose how small images' convolution backward passes run, for the whole
/// process.
pub fn set_batched(mode: Batched) {
    let v = match mode {
        Batched::Off => 1,
        Batched::Auto => 2,
        Batched::Always => 3,
    };
    MODE.store(v, Ordering::Relaxed);
}
