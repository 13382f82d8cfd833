//! im2col: a plane unfolded into its `k·k` shifted copies, so that a
//! convolution is one deep GEMM (small images, where the GEMM's depth pays
//! for the copies).

use rayon::prelude::*;

/// Unfold `r` images `x [r, cin, h, w]` side by side into `cols [cin·k·k,
/// r·h·w]` (zero padding): row `ci·k·k + tap`, image `bi` at column `bi·h·w`;
/// channels split among the threads when `parallel`.
pub(crate) fn im2col(
    x: &[f32],
    (r, cin, h, w, k): (usize, usize, usize, usize, usize),
    cols: &mut [f32],
    parallel: bool,
) {
    let hw = h * w;
    let ld = r * hw;
    let block = k * k * ld;
    let one = |(ci, rows): (usize, &mut [f32])| {
        for bi in 0..r {
            let plane = &x[(bi * cin + ci) * hw..][..hw];
            unfold_plane(plane, h, w, k, &mut rows[bi * hw..], ld);
        }
    };
    let cols = &mut cols[..cin * block];
    if parallel {
        cols.par_chunks_mut(block).enumerate().for_each(one);
    } else {
        cols.chunks_mut(block).enumerate().for_each(one);
    }
}

/// The `k·k` shifted copies of one plane `[h, w]`, as rows of `rows`: tap
/// `t`'s `h·w` values at `rows[t·ld..]`.
///
/// Tap `(dy, dx)` reads the plane shifted by `dy·w + dx` in row-major order:
/// one contiguous copy per tap, zeros where the shift leaves the plane, then
/// the `|dx|` columns per row that wrapped around to the neighbouring row
/// are zeroed (one copy per row instead was a library call per row: 10 % of
/// a SegNet step at the narrow widths, whose images go down to 6×6).
pub(crate) fn unfold_plane(plane: &[f32], h: usize, w: usize, k: usize, rows: &mut [f32], ld: usize) {
    let pad = (k / 2) as isize;
    let hw = h * w;
    let (wi, hwi) = (w as isize, hw as isize);
    for tap in 0..k * k {
        let row = &mut rows[tap * ld..][..hw];
        let dy = (tap / k) as isize - pad;
        let dx = (tap % k) as isize - pad;
        // row[i] = plane[i + shift] for lo <= i < hi
        let shift = dy * wi + dx;
        let lo = (-shift).clamp(0, hwi) as usize;
        let hi = (hwi - shift).clamp(0, hwi) as usize;
        if lo < hi {
            row[..lo].fill(0.0);
            let from = (lo as isize + shift) as usize;
            row[lo..hi].copy_from_slice(&plane[from..from + (hi - lo)]);
            row[hi..].fill(0.0);
        } else {
            row.fill(0.0);
            continue;
        }
        // the columns whose source x + dx is outside 0..w
        let cols = dx.unsigned_abs().min(w);
        if cols == 0 {
            continue;
        }
        let first = if dx > 0 { w - cols } else { 0 };
        for y in 0..h {
            for v in &mut row[y * w + first..y * w + first + cols] {
                *v = 0.0;
            }
        }
    }
}
