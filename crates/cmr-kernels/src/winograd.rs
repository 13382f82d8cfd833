//! 3×3 convolution by Winograd's minimal filtering, F(2×2, 3×3) and
//! F(4×4, 3×3), for layers with many channels.
//!
//! Each `m × m` block of outputs is `Aᵀ [(G g Gᵀ) ⊙ (Bᵀ d B)] A`, `d` the
//! `(m + 2)²` input patch around it and `g` the 3×3 kernel: `(m + 2)²`
//! products per input and output channel instead of the `9m²` that the
//! outputs take directly (16 for 4 outputs, 36 for 16). Over the channels
//! the products are sums, so the layer is `(m + 2)²` GEMMs, `M[ξ] = U[ξ] ·
//! V[ξ]` with `U[ξ] [cout, cin]` the transformed kernels and `V[ξ] [cin,
//! tiles]` the transformed patches (`ξ` one of the positions), between an
//! input and an output transform: additions only for F(2×2), additions and
//! small multiples for F(4×4). The arithmetic falls by 2.25× or 4×; the
//! transforms cost a pass over the input and one over the output, 4× or
//! 2.25× the size of each, and the transformed weights are 1.8× or 4× the
//! kernels' size.
//!
//! [`crate::plan`] runs it for 3×3 layers with many channels, instead of
//! im2col under 32×32 and of the direct kernel from there up, with F(4×4)
//! tiles where the batch has at least 144 of them (from 48×48 at batch 1,
//! 24×24 at batch 4, 12×12 at batch 16); `KernelConfig::winograd` turns it
//! off or fixes one tile everywhere it runs.
//! Large images go through in bands of tile rows, so that the transformed
//! patches of one round stay a few MB. The results equal the direct sum's
//! to rounding: F(2×2)'s transforms add and subtract values of the input's
//! magnitude, so the error is a few units in the last place of the largest
//! of them; F(4×4)'s scale by up to 8 and by fractions, about ten times
//! that.

use gemm::Parallelism;
use rayon::prelude::*;

use crate::cpu::{Fresh, SendPtr, Simd, block_sum, fresh, simd_fn};
use crate::gemm::{Epilogue, View, matmul, rows};
use crate::plan::Tile;

impl Tile {
    /// Outputs per tile side.
    fn m(self) -> usize {
        match self {
            Tile::F2x2 => 2,
            Tile::F4x4 => 4,
        }
    }

    /// Input patch side, `m + 2`.
    fn n(self) -> usize {
        self.m() + 2
    }

    /// Positions `ξ` of a transformed tile (the number of GEMMs), `(m + 2)²`.
    fn positions(self) -> usize {
        self.n() * self.n()
    }

    /// Tiles per round of GEMMs: the transformed patches of a chunk of
    /// images, `positions·cin·tiles` values, stay within a few MB (1152
    /// tiles of F(2×2), 512 of F(4×4)).
    fn chunk_tiles(self) -> usize {
        16 * 1152 / self.positions()
    }
}

/// `G` of F(2×2, 3×3) (4×3).
const G2: [[f32; 3]; 4] = [[1.0, 0.0, 0.0], [0.5, 0.5, 0.5], [0.5, -0.5, 0.5], [0.0, 0.0, 1.0]];

/// `G` of F(4×4, 3×3) (6×3).
const G4: [[f32; 3]; 6] = [
    [0.25, 0.0, 0.0],
    [-1.0 / 6.0, -1.0 / 6.0, -1.0 / 6.0],
    [-1.0 / 6.0, 1.0 / 6.0, -1.0 / 6.0],
    [1.0 / 24.0, 1.0 / 12.0, 1.0 / 6.0],
    [1.0 / 24.0, -1.0 / 12.0, 1.0 / 6.0],
    [0.0, 0.0, 1.0],
];

/// Kernels per step of the transforms of [`transform_weights`] and
/// [`weight_grad`]'s last step, side by side in SIMD lanes.
const KERNEL_BLOCK: usize = 64;

/// `weight [cout, cin, 3, 3]` transformed: `U [positions, cout, cin]`, `G g
/// Gᵀ` of each kernel; output channels on the threads, input channels in
/// the SIMD lanes ([`kernels_forward`]).
fn transform_weights(simd: Simd, tile: Tile, weight: &[f32], cout: usize, cin: usize) -> Vec<f32> {
    let n = cout * cin;
    let p = tile.positions();
    let mut u = Fresh::new(p * n);
    let up = SendPtr(u.as_mut_ptr());
    weight.par_chunks(cin * 9).enumerate().for_each_init(
        || (vec![0f32; 9 * cin], vec![0f32; 18 * KERNEL_BLOCK]),
        |(taps, tmp), (co, kernels)| {
            // [cin, 9] → [9, cin]
            for (ci, g) in kernels.chunks_exact(9).enumerate() {
                for (k, &v) in g.iter().enumerate() {
                    taps[k * cin + ci] = v;
                }
            }
            for c0 in (0..cin).step_by(KERNEL_BLOCK) {
                let len = KERNEL_BLOCK.min(cin - c0);
                let g: [&[f32]; 9] = std::array::from_fn(|k| &taps[k * cin + c0..][..len]);
                // SAFETY: this job alone writes row `co` of each U[ξ]:
                // `(ξ·cout + co)·cin + c0 + len ≤ positions·n`.
                let mut out = unsafe { rows_at(&up, p, len, |xi| (xi * cout + co) * cin + c0) };
                match tile {
                    Tile::F2x2 => kernels_forward2(simd, g, len, tmp, &mut out[..p]),
                    Tile::F4x4 => kernels_forward4(simd, g, len, tmp, &mut out[..p]),
                }
            }
        },
    );
    // SAFETY: every (ξ, co, ci) value was written above.
    unsafe { u.written() }
}

/// `G g Gᵀ` (`N × N`) of `len` kernels side by side, `g[i·3 + j]` tap `(i,
/// j)` of each: value `ξ` of kernel `l` to `out[ξ·KERNEL_BLOCK + l]`, `tmp`
/// (`3N` rows) holding `G g`.
#[inline(always)]
fn kernels_forward<const N: usize>(
    gm: &[[f32; 3]; N],
    g: [&[f32]; 9],
    len: usize,
    tmp: &mut [f32],
    out: &mut [&mut [f32]],
) {
    // tmp[r·3 + j] = Σᵢ G[r][i]·g[i][j]
    for (r, &[ga, gb, gc]) in gm.iter().enumerate() {
        for j in 0..3 {
            let t = &mut tmp[(r * 3 + j) * KERNEL_BLOCK..][..len];
            let (a, b, c) = (&g[j][..len], &g[3 + j][..len], &g[6 + j][..len]);
            for l in 0..len {
                t[l] = ga * a[l] + gb * b[l] + gc * c[l];
            }
        }
    }
    // out[r·N + c] = Σⱼ tmp[r·3 + j]·G[c][j]
    for r in 0..N {
        let (a, b, c) = (
            &tmp[r * 3 * KERNEL_BLOCK..][..len],
            &tmp[(r * 3 + 1) * KERNEL_BLOCK..][..len],
            &tmp[(r * 3 + 2) * KERNEL_BLOCK..][..len],
        );
        for (cc, &[ga, gb, gc]) in gm.iter().enumerate() {
            let o = &mut out[r * N + cc][..len];
            for l in 0..len {
                o[l] = ga * a[l] + gb * b[l] + gc * c[l];
            }
        }
    }
}

/// `Gᵀ D G` (3×3) of `len` matrices `D` (`N × N`) side by side, `d[ξ]`
/// value `ξ` of each: tap `i·3 + j` of kernel `l` to `g[(i·3 + j)·KERNEL_BLOCK
/// + l]`, `tmp` (`3N` rows) holding `D G`. The adjoint of [`kernels_forward`].
#[inline(always)]
fn kernels_adjoint<const N: usize>(gm: &[[f32; 3]; N], d: &[&[f32]], len: usize, tmp: &mut [f32], g: &mut [f32]) {
    // tmp[r·3 + j] = Σ_c D[r][c]·G[c][j]
    for r in 0..N {
        for j in 0..3 {
            let t = &mut tmp[(r * 3 + j) * KERNEL_BLOCK..][..len];
            t.fill(0.0);
            for (c, gc) in gm.iter().enumerate() {
                let (x, row) = (gc[j], &d[r * N + c][..len]);
                if x != 0.0 {
                    for l in 0..len {
                        t[l] += x * row[l];
                    }
                }
            }
        }
    }
    // g[i·3 + j] = Σ_r G[r][i]·tmp[r·3 + j]
    for i in 0..3 {
        for j in 0..3 {
            let o = &mut g[(i * 3 + j) * KERNEL_BLOCK..][..len];
            o.fill(0.0);
            for (r, gr) in gm.iter().enumerate() {
                let (x, row) = (gr[i], &tmp[(r * 3 + j) * KERNEL_BLOCK..][..len]);
                if x != 0.0 {
                    for l in 0..len {
                        o[l] += x * row[l];
                    }
                }
            }
        }
    }
}

simd_fn! {
    /// [`kernels_forward`] with F(2×2)'s `G`.
    fn kernels_forward2(simd: Simd, g: [&[f32]; 9], len: usize, tmp: &mut [f32], out: &mut [&mut [f32]]) {
        kernels_forward(&G2, g, len, tmp, out);
    }

    /// [`kernels_forward`] with F(4×4)'s `G`.
    fn kernels_forward4(simd: Simd, g: [&[f32]; 9], len: usize, tmp: &mut [f32], out: &mut [&mut [f32]]) {
        kernels_forward(&G4, g, len, tmp, out);
    }

    /// [`kernels_adjoint`] with F(2×2)'s `G`.
    fn kernels_gradient2(simd: Simd, d: &[&[f32]], len: usize, tmp: &mut [f32], g: &mut [f32]) {
        kernels_adjoint(&G2, d, len, tmp, g);
    }

    /// [`kernels_adjoint`] with F(4×4)'s `G`.
    fn kernels_gradient4(simd: Simd, d: &[&[f32]], len: usize, tmp: &mut [f32], g: &mut [f32]) {
        kernels_adjoint(&G4, d, len, tmp, g);
    }

    /// An input row into its padded row of column phases (see
    /// [`transform_input`]), for F(2×2) tiles; `row` is zero.
    fn split_phases2(simd: Simd, src: &[f32], row: &mut [f32], q: usize) {
        split_phases::<2>(src, row, q);
    }

    /// As [`split_phases2`] for F(4×4) tiles.
    fn split_phases4(simd: Simd, src: &[f32], row: &mut [f32], q: usize) {
        split_phases::<4>(src, row, q);
    }

    /// One channel's patches of one row of F(2×2) tiles, `Bᵀ d B` with `Bᵀ =
    /// [[1, 0, −1, 0], [0, 1, 1, 0], [0, −1, 1, 0], [0, 1, 0, −1]]`: `rows`
    /// are the four input rows the tiles cover, in the layout of
    /// [`transform_input`] (each column phase contiguous, `tw + 1` values
    /// per phase); tile `tx`'s value at position `ξ` goes to `v[ξ][off +
    /// tx]`.
    fn input_row2(simd: Simd, rows: &[&[f32]], tw: usize, e: &mut [f32], v: &mut [&mut [f32]], off: usize) {
        let q = tw + 1;
        let n = 2 * q;
        let (d0, d1, d2, d3) = (&rows[0][..n], &rows[1][..n], &rows[2][..n], &rows[3][..n]);
        // Bᵀ d: the four row combinations, over the whole row
        let (e0, rest) = e.split_at_mut(n);
        let (e1, rest) = rest.split_at_mut(n);
        let (e2, e3) = rest.split_at_mut(n);
        let e3 = &mut e3[..n];
        for x in 0..n {
            let (a, b, c, d) = (d0[x], d1[x], d2[x], d3[x]);
            e0[x] = a - c;
            e1[x] = b + c;
            e2[x] = c - b;
            e3[x] = b - d;
        }
        // (·) B along each row: columns 2tx .. 2tx + 3 are phase 0 and 1
        // at tx, then at tx + 1
        for (r, er) in [&*e0, &*e1, &*e2, &*e3].into_iter().enumerate() {
            let (p0, p1) = er.split_at(q);
            let (a, b, c, d) = (&p0[..tw], &p1[..tw], &p0[1..=tw], &p1[1..=tw]);
            let [o0, o1, o2, o3] = &mut v[r * 4..][..4] else {
                unreachable!()
            };
            let (o0, o1) = (&mut o0[off..][..tw], &mut o1[off..][..tw]);
            let (o2, o3) = (&mut o2[off..][..tw], &mut o3[off..][..tw]);
            for x in 0..tw {
                o0[x] = a[x] - c[x];
                o1[x] = b[x] + c[x];
                o2[x] = c[x] - b[x];
                o3[x] = b[x] - d[x];
            }
        }
    }

    /// One channel's patches of one row of F(4×4) tiles, `Bᵀ d B` with `Bᵀ =
    /// [[4, 0, −5, 0, 1, 0], [0, −4, −4, 1, 1, 0], [0, 4, −4, −1, 1, 0],
    /// [0, −2, −1, 2, 1, 0], [0, 2, −1, −2, 1, 0], [0, 4, 0, −5, 0, 1]]`:
    /// as [`input_row2`], with six input rows and four column phases.
    fn input_row4(simd: Simd, rows: &[&[f32]], tw: usize, e: &mut [f32], v: &mut [&mut [f32]], off: usize) {
        let q = tw + 1;
        let n = 4 * q;
        let d: [&[f32]; 6] = std::array::from_fn(|i| &rows[i][..n]);
        let (e0, rest) = e.split_at_mut(n);
        let (e1, rest) = rest.split_at_mut(n);
        let (e2, rest) = rest.split_at_mut(n);
        let (e3, rest) = rest.split_at_mut(n);
        let (e4, e5) = rest.split_at_mut(n);
        let e5 = &mut e5[..n];
        for x in 0..n {
            let (a, b, c, f, g, h) = (d[0][x], d[1][x], d[2][x], d[3][x], d[4][x], d[5][x]);
            e0[x] = 4.0 * a - 5.0 * c + g;
            e1[x] = (f + g) - 4.0 * (b + c);
            e2[x] = (g - f) + 4.0 * (b - c);
            e3[x] = (g - c) + 2.0 * (f - b);
            e4[x] = (g - c) - 2.0 * (f - b);
            e5[x] = 4.0 * b - 5.0 * f + h;
        }
        // columns 4tx .. 4tx + 5 are phases 0–3 at tx, then 0 and 1 at tx + 1
        for (r, er) in [&*e0, &*e1, &*e2, &*e3, &*e4, &*e5].into_iter().enumerate() {
            let p: [&[f32]; 4] = std::array::from_fn(|k| &er[k * q..][..q]);
            let (a, b, c, f) = (&p[0][..tw], &p[1][..tw], &p[2][..tw], &p[3][..tw]);
            let (g, h) = (&p[0][1..=tw], &p[1][1..=tw]);
            let [o0, o1, o2, o3, o4, o5] = &mut v[r * 6..][..6] else {
                unreachable!()
            };
            let (o0, o1, o2) = (&mut o0[off..][..tw], &mut o1[off..][..tw], &mut o2[off..][..tw]);
            let (o3, o4, o5) = (&mut o3[off..][..tw], &mut o4[off..][..tw], &mut o5[off..][..tw]);
            for x in 0..tw {
                o0[x] = 4.0 * a[x] - 5.0 * c[x] + g[x];
                o1[x] = (f[x] + g[x]) - 4.0 * (b[x] + c[x]);
                o2[x] = (g[x] - f[x]) + 4.0 * (b[x] - c[x]);
                o3[x] = (g[x] - c[x]) + 2.0 * (f[x] - b[x]);
                o4[x] = (g[x] - c[x]) - 2.0 * (f[x] - b[x]);
                o5[x] = 4.0 * b[x] - 5.0 * f[x] + h[x];
            }
        }
    }

    /// One output channel's F(2×2) output-gradient tiles transformed, `A
    /// dY Aᵀ` of each 2×2 block with `A = [[1, 0], [1, 1], [1, −1], [0,
    /// −1]]`: see [`gradient_tiles`].
    fn gradient_tiles2(simd: Simd, dy: &[f32], w: usize, nty: usize, tw: usize, out: &mut [&mut [f32]], scratch: &mut [f32]) {
        let a = |u: [f32; 2]| [u[0], u[0] + u[1], u[0] - u[1], -u[1]];
        gradient_tiles::<2, 4, 4, 8>(dy, w, nty, tw, out, scratch, a);
    }

    /// As [`gradient_tiles2`] for F(4×4) tiles: `A dY Aᵀ` (6×6) of each 4×4
    /// block, `A = [[1, 0, 0, 0], [1, 1, 1, 1], [1, −1, 1, −1], [1, 2, 4, 8],
    /// [1, −2, 4, −8], [0, 0, 0, 1]]`.
    fn gradient_tiles4(simd: Simd, dy: &[f32], w: usize, nty: usize, tw: usize, out: &mut [&mut [f32]], scratch: &mut [f32]) {
        let a = |u: [f32; 4]| {
            let (even, odd) = (u[0] + u[2], u[1] + u[3]);
            let (even2, odd2) = (u[0] + 4.0 * u[2], 2.0 * u[1] + 8.0 * u[3]);
            [u[0], even + odd, even - odd, even2 + odd2, even2 - odd2, u[3]]
        };
        gradient_tiles::<4, 6, 16, 24>(dy, w, nty, tw, out, scratch, a);
    }

    /// One output channel's F(2×2) tiles back to outputs, `Aᵀ m A` with `Aᵀ
    /// = [[1, 1, 1, 0], [0, 1, −1, −1]]`, and the epilogue `(v + bias)·a +
    /// t`, then ReLU: see [`output_tiles`].
    fn output_tiles2(simd: Simd, m: &[&[f32]],
        nty: usize,
        tw: usize,
        plane: &mut [f32],
        w: usize,
        epi: (f32, f32, f32, bool),
        scratch: &mut [f32],
    ) {
        let at = |s: [f32; 4]| [s[0] + s[1] + s[2], s[1] - s[2] - s[3]];
        output_tiles::<2, 4, 8, 4>(m, nty, tw, plane, w, epi, scratch, at);
    }

    /// As [`output_tiles2`] for F(4×4) tiles: `Aᵀ = [[1, 1, 1, 1, 1, 0], [0,
    /// 1, −1, 2, −2, 0], [0, 1, 1, 4, 4, 0], [0, 1, −1, 8, −8, 1]]`.
    fn output_tiles4(simd: Simd, m: &[&[f32]],
        nty: usize,
        tw: usize,
        plane: &mut [f32],
        w: usize,
        epi: (f32, f32, f32, bool),
        scratch: &mut [f32],
    ) {
        let at = |s: [f32; 6]| {
            let (p1, m1) = (s[1] + s[2], s[1] - s[2]);
            let (p2, m2) = (s[3] + s[4], s[3] - s[4]);
            [s[0] + p1 + p2, m1 + 2.0 * m2, p1 + 4.0 * p2, m1 + 8.0 * m2 + s[5]]
        };
        output_tiles::<4, 6, 24, 16>(m, nty, tw, plane, w, epi, scratch, at);
    }
}

/// The body of `split_phases2` and `split_phases4`: input column `x` is
/// padded column `p = x + 1`, stored at `(p mod M)·q + p div M`.
#[inline(always)]
fn split_phases<const M: usize>(src: &[f32], row: &mut [f32], q: usize) {
    let full = src.len() / M;
    let mut parts = row.chunks_mut(q);
    let mut phases: [&mut [f32]; M] = std::array::from_fn(|_| parts.next().unwrap_or_default());
    // whole groups of M columns: columns M·k .. M·k + M − 2 to phases 1 ..
    // M at k, column M·k + M − 1 to phase 0 at k + 1
    let (first, rest) = phases.split_at_mut(1);
    let first = &mut first[0][1..=full];
    for (k, group) in src.chunks_exact(M).enumerate() {
        for j in 0..M - 1 {
            rest[j][k] = group[j];
        }
        first[k] = group[M - 1];
    }
    for (j, &v) in src[full * M..].iter().enumerate() {
        rest[j][full] = v;
    }
}

/// Rows of scratch, each as long as a job's tiles, that the output and
/// gradient transforms need (F(4×4): `(6 + 4)·4`).
const SCRATCH_ROWS: usize = 40;

/// `out[k][x] = a(rows[0][x], …, rows[M − 1][x])[k]` for `x < len`: a small
/// matrix applied across `M` rows, element by element, 16 elements at a
/// time through local arrays (so that it vectorises whatever the rows'
/// addresses).
#[inline(always)]
fn across<const M: usize, const N: usize>(
    rows: [&[f32]; M],
    mut out: [&mut [f32]; N],
    len: usize,
    a: &impl Fn([f32; M]) -> [f32; N],
) {
    const L: usize = 16;
    let blocks = len / L;
    for blk in 0..blocks {
        let at = blk * L;
        let x: [[f32; L]; M] = std::array::from_fn(|i| {
            let mut v = [0f32; L];
            v.copy_from_slice(&rows[i][at..at + L]);
            v
        });
        let mut y = [[0f32; L]; N];
        for l in 0..L {
            let v = a(std::array::from_fn(|i| x[i][l]));
            for (yk, v) in y.iter_mut().zip(v) {
                yk[l] = v;
            }
        }
        for (o, yk) in out.iter_mut().zip(&y) {
            o[at..at + L].copy_from_slice(yk);
        }
    }
    for x in blocks * L..len {
        let v = a(std::array::from_fn(|i| rows[i][x]));
        for (o, v) in out.iter_mut().zip(v) {
            o[x] = v;
        }
    }
}

/// `K` rows of `len` from the front of `buf`, and what is left of it.
#[inline(always)]
fn take_rows<const K: usize>(buf: &mut [f32], len: usize) -> ([&mut [f32]; K], &mut [f32]) {
    let (head, rest) = buf.split_at_mut(K * len);
    let mut parts = head.chunks_mut(len);
    (std::array::from_fn(|_| parts.next().unwrap_or_default()), rest)
}

/// `N` of `rows`, `rows[first + k·step]` for `k < N`, reborrowed.
#[inline(always)]
fn pick<'a, const N: usize>(rows: &'a mut [&mut [f32]], first: usize, step: usize) -> [&'a mut [f32]; N] {
    let mut it = rows.iter_mut().skip(first).step_by(step);
    std::array::from_fn(|_| it.next().map(|r| &mut **r).unwrap_or_default())
}

/// The body of `gradient_tiles2` and `gradient_tiles4`: one output
/// channel's gradient rows `dy` (`w` wide; the job's tile rows start at its
/// first row, and rows past `dy` are zero) split into `nty` rows of `tw`
/// tiles, `ph[i·M + j][ty·tw + tx]` row `M·ty + i`, column `M·tx + j` (zero
/// past the image); then `a` down the columns of every block (`M` values to
/// `N`) and along its rows into the `N × N` rows `out[ξ][..nty·tw]`.
/// `scratch` holds `(M + N)·M·nty·tw` values.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn gradient_tiles<const M: usize, const N: usize, const MM: usize, const NM: usize>(
    dy: &[f32],
    w: usize,
    nty: usize,
    tw: usize,
    out: &mut [&mut [f32]],
    scratch: &mut [f32],
    a: impl Fn([f32; M]) -> [f32; N],
) {
    let len = nty * tw;
    let (mut ph, rest) = take_rows::<MM>(scratch, len);
    let (mut cols, _) = take_rows::<NM>(rest, len);
    let rows = dy.len() / w;
    let full = w / M;
    for ty in 0..nty {
        for i in 0..M {
            let y = M * ty + i;
            let phases = &mut ph[i * M..(i + 1) * M];
            let seg = ty * tw..(ty + 1) * tw;
            if y >= rows {
                phases.iter_mut().for_each(|p| p[seg.clone()].fill(0.0));
                continue;
            }
            let r = &dy[y * w..][..w];
            for (tx, group) in r.chunks_exact(M).enumerate() {
                for (p, &v) in phases.iter_mut().zip(group) {
                    p[ty * tw + tx] = v;
                }
            }
            // the last, partial block: zeros past the row
            for (j, p) in phases.iter_mut().enumerate() {
                for tx in full..tw {
                    let x = M * tx + j;
                    p[ty * tw + tx] = if x < w { r[x] } else { 0.0 };
                }
            }
        }
    }
    // down the columns: cols[k·M + j] = a(ph[0·M + j], …)[k]
    for j in 0..M {
        let input: [&[f32]; M] = std::array::from_fn(|i| &*ph[i * M + j]);
        across(input, pick::<N>(&mut cols, j, M), len, &a);
    }
    // along the rows: out[k·N + l] = a(cols[k·M + 0], …)[l]
    for k in 0..N {
        let input: [&[f32]; M] = std::array::from_fn(|j| &*cols[k * M + j]);
        across(input, pick::<N>(out, k * N, 1), len, &a);
    }
}

/// The body of `output_tiles2` and `output_tiles4`: one output channel's
/// `N × N` rows `m[ξ][..nty·tw]` (its tiles, `nty` rows of `tw`) through
/// `at` (Aᵀ, `N` values to `M`) down the columns of every tile, then along
/// its rows, the epilogue, and each `M × M` block to its place in `plane`
/// (the tile rows' output rows, `w` wide, as many as lie inside the image).
/// `scratch` holds `(N + M)·M·nty·tw` values.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn output_tiles<const M: usize, const N: usize, const NM: usize, const MM: usize>(
    m: &[&[f32]],
    nty: usize,
    tw: usize,
    plane: &mut [f32],
    w: usize,
    epi: (f32, f32, f32, bool),
    scratch: &mut [f32],
    at: impl Fn([f32; N]) -> [f32; M],
) {
    let (bias, a, t, relu) = epi;
    let finish = |v: f32| {
        let v = (v + bias) * a + t;
        if relu { v.max(0.0) } else { v }
    };
    let len = nty * tw;
    let (mut s, rest) = take_rows::<NM>(scratch, len);
    let (mut y, _) = take_rows::<MM>(rest, len);
    // down the columns: s[r·N + j] = at(m[0·N + j], …)[r]
    for j in 0..N {
        let input: [&[f32]; N] = std::array::from_fn(|i| m[i * N + j]);
        across(input, pick::<M>(&mut s, j, N), len, &at);
    }
    // along the rows: y[r·M + c] = at(s[r·N + 0], …)[c], then the epilogue
    for r in 0..M {
        let input: [&[f32]; N] = std::array::from_fn(|j| &*s[r * N + j]);
        across(input, pick::<M>(&mut y, r * M, 1), len, &|v| at(v).map(finish));
    }
    // output row M·ty + r, column M·tx + c is y[r·M + c][ty·tw + tx]
    let full = w / M;
    for (k, row) in plane.chunks_exact_mut(w).enumerate() {
        let (ty, r) = (k / M, k % M);
        let blocks = &y[r * M..(r + 1) * M];
        let base = ty * tw;
        for (tx, group) in row.chunks_exact_mut(M).enumerate() {
            for (o, b) in group.iter_mut().zip(blocks) {
                *o = b[base + tx];
            }
        }
        for (c, o) in row[full * M..].iter_mut().enumerate() {
            *o = blocks[c][base + full];
        }
    }
}

/// Rows `at(ξ) .. at(ξ) + len` of the buffer `base` points into, for the
/// first `n` positions `ξ` (the rest empty): where a job writes its values
/// of each transformed matrix.
///
/// # Safety
/// The rows lie inside the buffer, do not overlap, and no other thread
/// reads or writes them while the slices live.
#[allow(clippy::mut_from_ref)]
unsafe fn rows_at<'a>(base: &SendPtr, n: usize, len: usize, at: impl Fn(usize) -> usize) -> [&'a mut [f32]; 36] {
    std::array::from_fn(|xi| {
        if xi < n {
            // SAFETY: the caller's promise.
            unsafe { std::slice::from_raw_parts_mut(base.get().add(at(xi)), len) }
        } else {
            &mut []
        }
    })
}

/// A piece of the batch that one round of the GEMMs takes: tile rows `ty0
/// .. ty1` of images `first .. first + r` (whole images when several fit in
/// the tile's [`Tile::chunk_tiles`], else bands of tile rows of one image).
#[derive(Clone, Copy, Debug)]
struct Chunk {
    first: usize,
    r: usize,
    ty0: usize,
    ty1: usize,
}

impl Chunk {
    /// The chunks of `b` images of `th × tw` tiles, at most `most` tiles
    /// each (or one tile row), in order.
    fn all(b: usize, th: usize, tw: usize, most: usize) -> Vec<Chunk> {
        let per_image = th * tw;
        if per_image <= most {
            let images = most / per_image;
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
            let band = (most / tw).max(1);
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

/// The transformed input patches of a chunk of `x [b, cin, h, w]`: `V
/// [positions, cin, tiles]`, `Bᵀ d B` of each patch, tiles image by image,
/// row by row ([`Chunk::col`]); one task per (image, channel).
///
/// The chunk's input rows are first copied once each (the tiles' rows
/// overlap by two), zero-padded by one column on the left and to `m·(tw +
/// 1)` columns on the right, and stored by column phase: padded column `p`
/// at `(p mod m)·(tw + 1) + p div m`. A tile's `m + 2` columns are then
/// phases `0 .. m` at its index and phases 0 and 1 at the next, so every
/// step of the transform reads contiguous values.
fn transform_input(simd: Simd, tile: Tile, x: &[f32], (cin, h, w): (usize, usize, usize), c: Chunk) -> Vec<f32> {
    let (m, n, p) = (tile.m(), tile.n(), tile.positions());
    let tw = w.div_ceil(m);
    let q = tw + 1;
    let (first, r) = (c.first, c.r);
    let t = c.tiles(tw);
    let wp = m * q;
    let mut v = Fresh::new(p * cin * t);
    let vp = SendPtr(v.as_mut_ptr());
    // the band's input rows, m·ty0 − 1 ..= m·ty1, zero-padded
    let band_rows = m * (c.ty1 - c.ty0) + 2;
    (0..r * cin).into_par_iter().for_each_init(
        || (vec![0f32; band_rows * wp], vec![0f32; n * wp]),
        |(padded, e): &mut (Vec<f32>, Vec<f32>), job| {
            let (i, ci) = (job / cin, job % cin);
            let plane = &x[((first + i) * cin + ci) * h * w..][..h * w];
            for (k, row) in padded.chunks_mut(wp).enumerate() {
                row.fill(0.0);
                if let Some(y) = (m * c.ty0 + k).checked_sub(1).filter(|&y| y < h) {
                    let src = &plane[y * w..][..w];
                    match tile {
                        Tile::F2x2 => split_phases2(simd, src, row, q),
                        Tile::F4x4 => split_phases4(simd, src, row, q),
                    }
                }
            }
            // the image's tile rows are side by side in the columns of V:
            // this job alone writes columns `col .. col + (ty1 − ty0)·tw` of
            // row `ci` of each V[ξ], `(ξ·cin + ci)·t + col + (ty1 − ty0)·tw ≤
            // positions·cin·t`
            let col = c.col(i, c.ty0, tw);
            // SAFETY: as said above; inside `v`.
            let mut out = unsafe { rows_at(&vp, p, (c.ty1 - c.ty0) * tw, |xi| (xi * cin + ci) * t + col) };
            for ty in c.ty0..c.ty1 {
                // input rows m·ty − 1 .. m·ty + m + 1
                let k0 = m * (ty - c.ty0) * wp;
                let mut rows: [&[f32]; 6] = [&[]; 6];
                for (k, row) in rows.iter_mut().enumerate().take(n) {
                    *row = &padded[k0 + k * wp..][..wp];
                }
                let off = (ty - c.ty0) * tw;
                match tile {
                    Tile::F2x2 => input_row2(simd, &rows[..n], tw, e, &mut out[..p], off),
                    Tile::F4x4 => input_row4(simd, &rows[..n], tw, e, &mut out[..p], off),
                }
            }
        },
    );
    // SAFETY: every (ξ, channel, tile) value was written above.
    unsafe { v.written() }
}

/// The weight and bias gradients of the convolution (`[cout, cin, 3, 3]`,
/// `[cout]`) given the output gradient `dy [b, cout, h, w]`: the adjoint of
/// [`forward`]. Each block of `dy` becomes `A dY Aᵀ`, the GEMMs `dU[ξ] =
/// dM[ξ] · V[ξ]ᵀ` (`[cout, tiles] × [tiles, cin]`) sum over the tiles, and
/// each kernel's gradient is `Gᵀ dU G`.
pub(crate) fn weight_grad(
    simd: Simd,
    tile: Tile,
    x: &[f32],
    dy: &[f32],
    (b, cin, h, w, cout): (usize, usize, usize, usize, usize),
) -> (Vec<f32>, Vec<f32>) {
    let (m, p) = (tile.m(), tile.positions());
    let (th, tw) = (h.div_ceil(m), w.div_ceil(m));
    let hw = h * w;
    let db: Vec<f32> = (0..cout)
        .into_par_iter()
        .map(|co| {
            (0..b)
                .map(|i| block_sum(&dy[(i * cout + co) * hw..][..hw], |v| v))
                .sum::<f64>() as f32
        })
        .collect();
    if b == 0 {
        return (vec![0f32; cout * cin * 9], db);
    }
    let mut du = Fresh::new(p * cout * cin);
    // SAFETY: scratch whose every value the first chunk's GEMMs write (no
    // accumulation; with an image there is a first chunk) before the later
    // chunks and the last step read it.
    let du = unsafe { du.slots() };
    for (ci_, c) in Chunk::all(b, th, tw, tile.chunk_tiles()).into_iter().enumerate() {
        let (first, r) = (c.first, c.r);
        let t = c.tiles(tw);
        let v = transform_input(simd, tile, x, (cin, h, w), c);
        // dM [positions, cout, t]
        let mut dm = Fresh::new(p * cout * t);
        let dp = SendPtr(dm.as_mut_ptr());
        let nty = c.ty1 - c.ty0;
        // the chunk's rows of each plane of dy
        let (y0, y1) = (m * c.ty0, (m * c.ty1).min(h));
        (0..r * cout).into_par_iter().for_each_init(
            || vec![0f32; SCRATCH_ROWS * nty * tw],
            |scratch, job| {
                let (i, co) = (job / cout, job % cout);
                let plane = &dy[((first + i) * cout + co) * hw..][y0 * w..y1 * w];
                let col = c.col(i, c.ty0, tw);
                // SAFETY: this job alone writes columns `col .. col + (ty1 −
                // ty0)·tw` of row `co` of each dM[ξ], inside `dm`.
                let mut out = unsafe { rows_at(&dp, p, nty * tw, |xi| (xi * cout + co) * t + col) };
                match tile {
                    Tile::F2x2 => gradient_tiles2(simd, plane, w, nty, tw, &mut out[..p], scratch),
                    Tile::F4x4 => gradient_tiles4(simd, plane, w, nty, tw, &mut out[..p], scratch),
                }
            },
        );
        // SAFETY: every (ξ, channel, tile) value was written above.
        let dm = unsafe { dm.written() };
        // dU[ξ] (+)= dM[ξ] · V[ξ]ᵀ: [cout, t] × [t, cin]
        let accumulate = ci_ > 0;
        du.par_chunks_mut(cout * cin)
            .zip(dm.par_chunks(cout * t).zip(v.par_chunks(cin * t)))
            .for_each(|(dux, (dmx, vx))| {
                let vt = View { data: vx, rs: 1, cs: t };
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
    // dW = Gᵀ dU G per kernel, output channels on the threads, input
    // channels in the SIMD lanes
    let n = cout * cin;
    let mut dw = vec![0f32; n * 9];
    dw.par_chunks_mut(cin * 9).enumerate().for_each_init(
        || (vec![0f32; 18 * KERNEL_BLOCK], vec![0f32; 9 * KERNEL_BLOCK]),
        |(tmp, g), (co, block)| {
            for c0 in (0..cin).step_by(KERNEL_BLOCK) {
                let len = KERNEL_BLOCK.min(cin - c0);
                let mut d: [&[f32]; 36] = [&[]; 36];
                for (xi, row) in d.iter_mut().enumerate().take(p) {
                    *row = &du[xi * n + co * cin + c0..][..len];
                }
                match tile {
                    Tile::F2x2 => kernels_gradient2(simd, &d[..p], len, tmp, g),
                    Tile::F4x4 => kernels_gradient4(simd, &d[..p], len, tmp, g),
                }
                // [9, len] → [len, 9]
                for (l, taps) in block[c0 * 9..][..len * 9].chunks_exact_mut(9).enumerate() {
                    for (k, v) in taps.iter_mut().enumerate() {
                        *v = g[k * KERNEL_BLOCK + l];
                    }
                }
            }
        },
    );
    (dw, db)
}

/// `x [b, cin, h, w]` convolved with `weight [cout, cin, 3, 3]` (padding 1)
/// into `out [b, cout, h, w]`, `epi` applied.
pub(crate) fn forward(
    simd: Simd,
    tile: Tile,
    x: &[f32],
    weight: &[f32],
    (b, cin, h, w, cout): (usize, usize, usize, usize, usize),
    epi: Epilogue,
    out: &mut [f32],
) {
    let (m, p) = (tile.m(), tile.positions());
    let (th, tw) = (h.div_ceil(m), w.div_ceil(m));
    let u = transform_weights(simd, tile, weight, cout, cin);
    let hw = h * w;
    for c in Chunk::all(b, th, tw, tile.chunk_tiles()) {
        let (first, r) = (c.first, c.r);
        let t = c.tiles(tw);
        let v = transform_input(simd, tile, x, (cin, h, w), c);
        // M[ξ] = U[ξ] · V[ξ]: [cout, cin] × [cin, t], the products on the threads
        // SAFETY: every M[ξ] is written by its GEMM (no accumulation), and
        // none read.
        let mm = unsafe {
            fresh(p * cout * t, |mm| {
                mm.par_chunks_mut(cout * t)
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
                    })
            })
        };
        // outputs, one task per (image, output channel): output rows m·ty0
        // .. m·ty1 of each plane
        let (y0, y1) = (m * c.ty0, (m * c.ty1).min(h));
        out[first * cout * hw..(first + r) * cout * hw]
            .par_chunks_mut(hw)
            .enumerate()
            .for_each_init(
                || vec![0f32; SCRATCH_ROWS * (c.ty1 - c.ty0) * tw],
                |scratch, (job, plane)| {
                    let plane = &mut plane[y0 * w..y1 * w];
                    let (i, co) = (job / cout, job % cout);
                    let e = (
                        epi.bias.map_or(0.0, |b| b[co]),
                        epi.affine.map_or(1.0, |(a, _)| a[co]),
                        epi.affine.map_or(0.0, |(_, s)| s[co]),
                        epi.relu,
                    );
                    // the job's tiles, side by side in the columns of M
                    let (nty, col) = (c.ty1 - c.ty0, c.col(i, c.ty0, tw));
                    let mut mrows: [&[f32]; 36] = [&[]; 36];
                    for (xi, row) in mrows.iter_mut().enumerate().take(p) {
                        *row = &mm[(xi * cout + co) * t + col..][..nty * tw];
                    }
                    match tile {
                        Tile::F2x2 => output_tiles2(simd, &mrows[..p], nty, tw, plane, w, e, scratch),
                        Tile::F4x4 => output_tiles4(simd, &mrows[..p], nty, tw, plane, w, e, scratch),
                    }
                },
            );
    }
}

#[cfg(test)]
mod tests {
    use candle_core::{Device, Tensor, Var};

    use super::*;
    use crate::KernelConfig;

    const CFG: &KernelConfig = &KernelConfig::DEFAULT;
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

    /// The largest relative error allowed against candle: F(2×2)'s
    /// transforms add and subtract, F(4×4)'s scale by up to 8 and by
    /// fractions (¼, ⅙, 1⁄12, 1⁄24) that f32 rounds; measured up to 1.0e-5
    /// at 256 channels.
    fn tolerance(tile: Tile) -> f32 {
        match tile {
            Tile::F2x2 => 1e-5,
            Tile::F4x4 => 4e-5,
        }
    }

    /// (batch, cin, cout, h, w) for the tests of [`forward`] and
    /// [`weight_grad`] themselves (whatever the plan says): odd and even
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
        // F(4×4): 64 tiles per image, chunks of 8 images and of 1
        (9, 2, 2, 30, 30),
        // F(4×4): 25 × 26 tiles, bands of 19 tile rows and of 6
        (1, 2, 3, 98, 101),
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
                for tile in [Tile::F2x2, Tile::F4x4] {
                    // NaN-filled (`Fresh` in tests): a value not written fails
                    // SAFETY: `forward` writes every value (what the test checks).
                    let out = unsafe {
                        fresh(b * cout * h * w, |out| {
                            forward(CFG.simd, tile, &data(&x), &data(&wt), (b, cin, h, w, cout), epi, out)
                        })
                    };
                    let got = Tensor::from_vec(out, (b, cout, h, w), &dev).unwrap();
                    let e = max_rel(&got, &expected);
                    assert!(e < tolerance(tile), "{tile:?} {shape:?} {name}: {e}");
                }
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
            // the bias gradient summed in f64 (candle's f32 sum of up to
            // 8100 values is off by up to 1e-5 of the largest), on the scale
            // of the sum of magnitudes (what bounds a float sum's rounding;
            // the sum itself may cancel to near zero)
            let dys = data(&dy);
            let ds = &dys;
            let plane = |co: usize| (0..b).flat_map(move |i| &ds[(i * cout + co) * h * w..][..h * w]);
            let exact: Vec<f64> = (0..cout).map(|co| plane(co).map(|&v| f64::from(v)).sum()).collect();
            let largest = (0..cout)
                .map(|co| plane(co).map(|&v| f64::from(v.abs())).sum::<f64>())
                .fold(0f64, f64::max);
            for tile in [Tile::F2x2, Tile::F4x4] {
                let (dw, db) = weight_grad(CFG.simd, tile, &data(&x), &dys, (b, cin, h, w, cout));
                let dw = Tensor::from_vec(dw, (cout, cin, 3, 3), &dev).unwrap();
                let e = max_rel(&dw, g.get(wt.as_tensor()).unwrap());
                assert!(e < tolerance(tile), "{tile:?} {shape:?} dw: {e}");
                let e = db
                    .iter()
                    .zip(&exact)
                    .fold(0f64, |m, (&v, &r)| m.max((f64::from(v) - r).abs()))
                    / largest;
                assert!(e < 1e-6, "{tile:?} {shape:?} db: {e}");
            }
        }
    }

    /// Through the convolution op at a shape where it applies: values and
    /// the three gradients against candle (the input gradient is the same
    /// convolution of the output gradient, so it runs here too), and central
    /// differences at sampled coordinates.
    #[test]
    fn convolution_op_matches_candle_and_finite_differences() {
        // F(2×2) at 16×16, F(4×4) at 48×48 (as the plan takes them)
        op_check((2, 256, 256, 16, 16), Tile::F2x2);
        op_check((1, 128, 128, 48, 48), Tile::F4x4);
    }

    fn op_check((b, cin, cout, h, w): (usize, usize, usize, usize, usize), tile: Tile) {
        let dev = Device::Cpu;
        let shape = crate::plan::ConvShape {
            batch: b,
            cin,
            h,
            w,
            cout,
            k: 3,
            upsample: 1,
        };
        assert_eq!(crate::plan::winograd_tile(&shape, CFG), Some(tile));
        let x0 = fixed_values(b * cin * h * w, 1);
        let w0: Vec<f32> = fixed_values(cout * cin * 9, 2).into_iter().map(|v| v * 0.05).collect();
        let b0 = fixed_values(cout, 3);
        let probe = Tensor::from_vec(fixed_values(b * cout * h * w, 4), (b, cout, h, w), &dev).unwrap();
        let x = Var::from_tensor(&Tensor::from_slice(&x0, (b, cin, h, w), &dev).unwrap()).unwrap();
        let wt = Var::from_tensor(&Tensor::from_slice(&w0, (cout, cin, 3, 3), &dev).unwrap()).unwrap();
        let bias = Var::from_tensor(&Tensor::from_slice(&b0, cout, &dev).unwrap()).unwrap();
        let fast = crate::conv2d(&x, &wt, &bias, CFG).unwrap();
        let slow = reference(&x, &wt, &bias);
        let e = max_rel(&fast, &slow);
        assert!(e < tolerance(tile), "{tile:?} forward {e}");
        let gf = (&fast * &probe).unwrap().sum_all().unwrap().backward().unwrap();
        let gs = (&slow * &probe).unwrap().sum_all().unwrap().backward().unwrap();
        for (name, v) in [("x", &x), ("w", &wt), ("b", &bias)] {
            let e = max_rel(gf.get(v.as_tensor()).unwrap(), gs.get(v.as_tensor()).unwrap());
            assert!(e < 1e-4, "{tile:?} d{name}: {e}");
        }
        let value = |xv: &[f32], wv: &[f32]| -> f64 {
            let xt = Tensor::from_slice(xv, (b, cin, h, w), &dev).unwrap();
            let wt = Tensor::from_slice(wv, (cout, cin, 3, 3), &dev).unwrap();
            let y = crate::conv2d(&xt, &wt, bias.as_tensor(), CFG).unwrap();
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
