//! The weight and bias gradients of a convolution, `Σ_b dY_b · colsᵀ(X_b)`
//! and `Σ dY`, image by image (by shifted views from 32×32 up, else by
//! im2col), images split among the threads with partial sums added in a
//! fixed order.

use gemm::Parallelism;
use rayon::prelude::*;

use crate::cpu::{Simd, fresh, simd_fn, threads};
use crate::gemm::{Scratch, add_plane_sums, matmul, rows, transposed, with_scratch};
use crate::im2col::im2col;
use crate::shifted::{tap_major_to_weight, weight_grad_shifted};

/// `Σ_b dY_b [cout, hw] · cols(X_b)ᵀ [hw, cin·k·k]` and `Σ dY` per channel.
#[allow(clippy::too_many_arguments)]
pub(crate) fn conv_weight_grad(
    simd: Simd,
    x: &[f32],
    dy: &[f32],
    (b, cin, h, w): (usize, usize, usize, usize),
    (cout, k): (usize, usize),
    shifted: bool,
) -> (Vec<f32>, Vec<f32>) {
    let hw = h * w;
    let kk = cin * k * k;
    // The shifted views accumulate the weight gradient tap-major.
    let finish = |dw: Vec<f32>, db: Vec<f64>| {
        let dw = if shifted {
            tap_major_to_weight(&dw, cout, cin, k * k)
        } else {
            dw
        };
        (dw, db.into_iter().map(|v| v as f32).collect())
    };
    // One image's share, added to `dw` (or written, the first image of a
    // sum: `acc` false).
    let one = |xi: &[f32], gi: &[f32], dw: &mut [f32], db: &mut Vec<f64>, scratch: &mut Scratch, par, acc| {
        add_plane_sums(simd, db, gi, hw);
        if shifted {
            weight_grad_shifted(simd, xi, gi, (cin, h, w, cout, k), dw, scratch, par, acc);
            return;
        }
        let cols = &mut scratch.cols;
        let cols_ref: &[f32] = if k == 1 {
            xi
        } else {
            cols.resize(kk * hw, 0.0);
            im2col(xi, (1, cin, h, w, k), cols, matches!(par, Parallelism::Rayon(_)));
            cols
        };
        // colsᵀ: element (p, j) is cols[j·hw + p]
        matmul(
            dw,
            kk,
            1,
            acc,
            rows(gi, hw),
            transposed(cols_ref, hw),
            (cout, kk, hw),
            par,
        );
    };
    if b == 0 {
        return finish(vec![0f32; cout * kk], vec![0f64; cout]);
    }
    if b < threads() {
        let mut db = vec![0f64; cout];
        // SAFETY: a fresh sum: the first image (there is one) passes `acc`
        // false, so its GEMMs write every value before any is read.
        let dw = unsafe {
            fresh(cout * kk, |dw| {
                with_scratch(|scratch| {
                    for (i, (xi, gi)) in x.chunks(cin * hw).zip(dy.chunks(cout * hw)).enumerate() {
                        one(xi, gi, dw, &mut db, scratch, Parallelism::Rayon(threads()), i > 0);
                    }
                })
            })
        };
        return finish(dw, db);
    }
    // Images split into one contiguous run per thread, partial sums added in
    // a fixed order so the result does not depend on scheduling.
    let per = b.div_ceil(threads());
    let partials: Vec<(Vec<f32>, Vec<f64>)> = (0..b.div_ceil(per))
        .into_par_iter()
        .map(|t| {
            let mut db = vec![0f64; cout];
            // SAFETY: a fresh sum: the run's first image (`t·per < b`, so
            // there is one) passes `acc` false, so its GEMMs write every
            // value before any is read.
            let dw = unsafe {
                fresh(cout * kk, |dw| {
                    with_scratch(|scratch| {
                        for i in t * per..((t + 1) * per).min(b) {
                            let xi = &x[i * cin * hw..(i + 1) * cin * hw];
                            let gi = &dy[i * cout * hw..(i + 1) * cout * hw];
                            one(xi, gi, dw, &mut db, scratch, Parallelism::None, i > t * per);
                        }
                    })
                })
            };
            (dw, db)
        })
        .collect();
    let mut it = partials.into_iter();
    let Some((mut dw, mut db)) = it.next() else {
        return finish(vec![0f32; cout * kk], vec![0f64; cout]);
    };
    // The partial sums added in parallel (at 512 channels each is 2.4 M
    // values: a serial pass over memory).
    for (pw, pb) in it {
        dw.par_chunks_mut(ADD_CHUNK)
            .zip(pw.par_chunks(ADD_CHUNK))
            .for_each(|(a, v)| add_into(simd, a, v));
        db.iter_mut().zip(pb).for_each(|(a, v)| *a += v);
    }
    finish(dw, db)
}

/// Values per task when partial weight gradients are added.
pub(crate) const ADD_CHUNK: usize = 1 << 16;

simd_fn! {
    /// `a += v`, element by element.
    pub(crate) fn add_into(simd: Simd, a: &mut [f32], v: &[f32]) {
        a.iter_mut().zip(v).for_each(|(a, &v)| *a += v);
    }
}
