//! A convolution on small images (under 32×32; by default only where
//! [`crate::plan`] says it was measured faster: the 6×6 layers at the
//! report's widths) as GEMMs over the whole batch, forward and backward.
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

use gemm::Parallelism;
use rayon::prelude::*;

use crate::cpu::{Fresh, Simd, simd_fn, threads};
use crate::gemm::{Epilogue, View, add_plane_sums, copy_out, copy_out_affine, matmul, rows, with_scratch};
use crate::im2col::im2col;

/// Pixels (`images × h·w`) per run of images: the run's unfolded input and
/// column gradient, `[cin·k·k, run]` each, are the GEMMs' operands.
pub(crate) const RUN_COLUMNS: usize = 1024;

/// The three gradients of a convolution on small images from its output
/// gradient `g [b, cout, h·w]`: input (when `want_dx`), weight `[cout,
/// cin·k·k]` and bias; the images in runs of at most `run_columns` pixels
/// ([`RUN_COLUMNS`]; smaller in tests, to make several runs).
pub(crate) fn backward(
    simd: Simd,
    x: &[f32],
    weight: &[f32],
    g: &[f32],
    (b, cin, h, w, cout, k): (usize, usize, usize, usize, usize, usize),
    want_dx: bool,
    run_columns: usize,
) -> (Option<Vec<f32>>, Vec<f32>, Vec<f32>) {
    let hw = h * w;
    let taps = k * k;
    let kk = cin * taps;
    let per_run = run_images(hw, b, run_columns);
    let par = Parallelism::Rayon(threads());
    let mut dw_fresh = Fresh::new(cout * kk);
    // SAFETY: the first run's GEMM writes every value (`accumulate` false)
    // before the later runs read them; without images they are zeroed here.
    let dw = unsafe { dw_fresh.slots() };
    if b == 0 {
        dw.fill(0.0);
    }
    let mut dx_fresh = want_dx.then(|| Fresh::new(b * cin * hw));
    // SAFETY: each run writes (folds) a value into every pixel of its
    // images, reading none.
    let mut dx = dx_fresh.as_mut().map(|f| unsafe { f.slots() });
    let mut db = vec![0f64; cout];
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
            add_plane_sums(simd, &mut db, gcat, ld);
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
            matmul(dw, kk, 1, run > 0, rows(gcat, ld), cols_t, (cout, kk, ld), par);
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
                    fold_plane(simd, &dcols[ci * taps * ld + bi * hw..], ld, h, w, k, plane);
                });
        }
    });
    // SAFETY: every value of both was written above.
    let (dx, dw) = unsafe { (dx_fresh.map(|f| f.written()), dw_fresh.written()) };
    (dx, dw, db.into_iter().map(|v| v as f32).collect())
}

/// The forward pass on the same runs: the run's inputs unfolded side by
/// side, `Y = W · cols` as one GEMM of `r·h·w` columns (one image's 6×6 is a
/// GEMM 36 columns wide, a quarter of `gemm`'s speed at 512 channels), then
/// each image's planes copied out with the epilogue applied (by the copies
/// the other paths use, so the same operations in the same order).
#[allow(clippy::too_many_arguments)]
pub(crate) fn forward(
    simd: Simd,
    x: &[f32],
    weight: &[f32],
    (b, cin, h, w, cout, k): (usize, usize, usize, usize, usize, usize),
    epi: Epilogue,
    out: &mut [f32],
    run_columns: usize,
) {
    let hw = h * w;
    let taps = k * k;
    let kk = cin * taps;
    let per_run = run_images(hw, b, run_columns);
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
                        Some((a, t)) => copy_out_affine(simd, oi, src, sizes, epi.bias, a, t, epi.relu),
                        None => copy_out(simd, oi, src, sizes, epi.bias, epi.relu),
                    }
                });
        }
    });
}

/// Images per run: as many as fit in [`RUN_COLUMNS`] pixels, at least one.
fn run_images(hw: usize, b: usize, run_columns: usize) -> usize {
    (run_columns / hw).clamp(1, b.max(1))
}

simd_fn! {
    /// The adjoint of the unfolding ([`im2col`]): `plane [h, w]` from the `k·k` rows
    /// of column gradients at `rows[t·ld..]`, each value added to the input
    /// pixel its tap read (none for taps that read the zero padding).
    fn fold_plane(simd: Simd, rows: &[f32], ld: usize, h: usize, w: usize, k: usize, plane: &mut [f32]) {
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::fixed_values;

    fn close(a: &[f32], b: &[f32], what: &str) {
        let scale = b.iter().fold(0f32, |m, v| m.max(v.abs())).max(1e-6);
        let err = a.iter().zip(b).fold(0f32, |m, (x, y)| m.max((x - y).abs()));
        assert!(a.len() == b.len() && err <= 1e-5 * scale, "{what}: {err} of {scale}");
    }

    /// Runs of one to six images (40 pixels a run) give what one run of the
    /// whole batch gives, forward and all three gradients, the last run
    /// shorter than the others.
    #[test]
    fn runs_of_images_add_up_to_the_whole_batch() {
        let simd = Simd::Widest;
        for &(b, cin, h, w, cout, k) in &[(5, 3, 3, 4, 4, 3), (7, 2, 2, 3, 3, 5), (3, 4, 6, 6, 2, 3)] {
            let dims = (b, cin, h, w, cout, k);
            let x = fixed_values(b * cin * h * w, 1);
            let wt = fixed_values(cout * cin * k * k, 2);
            let bias = fixed_values(cout, 3);
            let g = fixed_values(b * cout * h * w, 4);
            let epi = Epilogue::bias(&bias);
            let mut one = vec![0f32; b * cout * h * w];
            let mut runs = one.clone();
            forward(simd, &x, &wt, dims, epi, &mut one, usize::MAX);
            forward(simd, &x, &wt, dims, epi, &mut runs, 40);
            close(&runs, &one, "forward");
            let (dx1, dw1, db1) = backward(simd, &x, &wt, &g, dims, true, usize::MAX);
            let (dxr, dwr, dbr) = backward(simd, &x, &wt, &g, dims, true, 40);
            close(&dxr.unwrap(), &dx1.unwrap(), "dx");
            close(&dwr, &dw1, "dw");
            close(&dbr, &db1, "db");
        }
    }
}
