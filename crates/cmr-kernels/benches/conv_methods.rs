//! The two ways the fast kernels compute a 3×3 convolution, timed as bare
//! GEMM calls at the networks' shapes on one thread: im2col then one deep GEMM
//! (the unfolding written as the kernels write it), and shifted views of the
//! zero-padded input (nine GEMMs of depth `cin`, no unfolding). Forward pass
//! and weight gradient, mean of 5 after a warm-up. This is what set
//! `SHIFTED_MIN_PIXELS` in `src/plan.rs`.
//!
//! `cargo bench -p cmr-kernels --bench conv_methods`

#![allow(clippy::print_stdout)]

use std::time::Instant;

use gemm::Parallelism;

/// A matrix on a slice: element `(i, j)` at `offset + i·rs + j·cs`.
#[derive(Clone, Copy)]
struct M {
    offset: usize,
    rs: usize,
    cs: usize,
}

/// `dst (+)= lhs · rhs`, `m × n`, depth `k`, one thread.
fn gemm(dims: (usize, usize, usize), dst: (&mut [f32], M), acc: bool, lhs: (&[f32], M), rhs: (&[f32], M)) {
    let (m, n, k) = dims;
    let last = |v: M, r: usize, c: usize| v.offset + (r - 1) * v.rs + (c - 1) * v.cs;
    assert!(last(dst.1, m, n) < dst.0.len() && last(lhs.1, m, k) < lhs.0.len() && last(rhs.1, k, n) < rhs.0.len());
    // SAFETY: the assertion keeps every addressed element in its slice.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.0.as_mut_ptr().add(dst.1.offset),
            dst.1.cs as isize,
            dst.1.rs as isize,
            acc,
            lhs.0.as_ptr().add(lhs.1.offset),
            lhs.1.cs as isize,
            lhs.1.rs as isize,
            rhs.0.as_ptr().add(rhs.1.offset),
            rhs.1.cs as isize,
            rhs.1.rs as isize,
            1.0,
            1.0,
            false,
            false,
            false,
            Parallelism::None,
        );
    }
}

fn rows(cols: usize) -> M {
    M {
        offset: 0,
        rs: cols,
        cs: 1,
    }
}

/// im2col of `x [cin, h, w]`, 3×3, zero padding: row copies, as the kernels do.
fn im2col(x: &[f32], cin: usize, h: usize, w: usize, cols: &mut [f32]) {
    let hw = h * w;
    for ci in 0..cin {
        let plane = &x[ci * hw..][..hw];
        for tap in 0..9 {
            let (dy, dx) = (tap as isize / 3 - 1, tap as isize % 3 - 1);
            let row = &mut cols[(ci * 9 + tap) * hw..][..hw];
            for y in 0..h {
                let out = &mut row[y * w..(y + 1) * w];
                let sy = y as isize + dy;
                if sy < 0 || sy >= h as isize {
                    out.fill(0.0);
                    continue;
                }
                let src = &plane[sy as usize * w..(sy as usize + 1) * w];
                let (lo, hi) = ((-dx).max(0) as usize, (w as isize - dx).min(w as isize) as usize);
                out[..lo].fill(0.0);
                let s0 = (lo as isize + dx) as usize;
                out[lo..hi].copy_from_slice(&src[s0..s0 + (hi - lo)]);
                out[hi..].fill(0.0);
            }
        }
    }
}

/// `x [c, h, w]` into `xp` padded by 1, planes `(h + 2)(w + 2) + 2` apart.
fn pad(x: &[f32], c: usize, h: usize, w: usize, xp: &mut [f32]) {
    let (wp, plane) = (w + 2, (h + 2) * (w + 2) + 2);
    for ci in 0..c {
        for y in 0..h {
            xp[ci * plane + (y + 1) * wp + 1..][..w].copy_from_slice(&x[ci * h * w + y * w..][..w]);
        }
    }
}

fn time(mut f: impl FnMut()) -> f64 {
    f();
    let t = Instant::now();
    for _ in 0..5 {
        f();
    }
    t.elapsed().as_secs_f64() * 1e3 / 5.0
}

fn main() {
    println!("# 3×3 convolution, one thread, ms (GFLOP/s)");
    let shapes = [
        (16, 16, 96),
        (32, 32, 96),
        (64, 64, 96),
        (64, 320, 96),
        (80, 80, 96),
        (32, 32, 48),
        (64, 64, 48),
        (128, 128, 48),
        (320, 320, 48),
        (256, 256, 24),
        (512, 512, 12),
    ];
    for (cout, cin, h) in shapes {
        let w = h;
        let (hw, kk) = (h * w, cin * 9);
        let (wp, plane) = (w + 2, (h + 2) * (w + 2) + 2);
        let n = h * wp;
        let x = vec![0.25f32; cin * hw];
        let weight = vec![0.5f32; cout * kk];
        let dy = vec![0.5f32; cout * hw];
        let mut cols = vec![0f32; kk * hw];
        let mut out = vec![0f32; cout * hw];
        let mut dw = vec![0f32; cout * kk];
        let mut xp = vec![0f32; cin * plane];
        let mut wide = vec![0f32; cout * n];
        let flop = 2.0 * (cout * kk * hw) as f64 / 1e6;

        let fwd_im2col = time(|| {
            im2col(&x, cin, h, w, &mut cols);
            gemm(
                (cout, hw, kk),
                (&mut out, rows(hw)),
                false,
                (&weight, rows(kk)),
                (&cols, rows(hw)),
            );
        });
        let fwd_shifted = time(|| {
            pad(&x, cin, h, w, &mut xp);
            for tap in 0..9 {
                let lhs = M {
                    offset: tap,
                    rs: kk,
                    cs: 9,
                };
                let rhs = M {
                    offset: (tap / 3) * wp + tap % 3,
                    rs: plane,
                    cs: 1,
                };
                gemm(
                    (cout, n, cin),
                    (&mut wide, rows(n)),
                    tap > 0,
                    (&weight, lhs),
                    (&xp, rhs),
                );
            }
            for (d, s) in out.chunks_mut(w).zip(wide.chunks(wp)) {
                d.copy_from_slice(&s[..w]);
            }
        });
        let dw_im2col = time(|| {
            im2col(&x, cin, h, w, &mut cols);
            let cols_t = M {
                offset: 0,
                rs: 1,
                cs: hw,
            };
            gemm(
                (cout, kk, hw),
                (&mut dw, rows(kk)),
                true,
                (&dy, rows(hw)),
                (&cols, cols_t),
            );
        });
        let dw_shifted = time(|| {
            pad(&x, cin, h, w, &mut xp);
            for (d, s) in wide.chunks_mut(wp).zip(dy.chunks(w)) {
                d[..w].copy_from_slice(s);
            }
            for tap in 0..9 {
                let dst = M {
                    offset: tap,
                    rs: kk,
                    cs: 9,
                };
                let rhs = M {
                    offset: (tap / 3) * wp + tap % 3,
                    rs: 1,
                    cs: plane,
                };
                gemm((cout, cin, n), (&mut dw, dst), true, (&wide, rows(n)), (&xp, rhs));
            }
        });
        let r = |ms: f64| format!("{ms:7.2} ({:5.1})", flop / ms);
        println!(
            "cout {cout:4} cin {cin:4} {h:3}×{h:<3} forward: im2col {} shifted {} | weight grad: im2col {} shifted {}",
            r(fwd_im2col),
            r(fwd_shifted),
            r(dw_im2col),
            r(dw_shifted)
        );
    }
}
