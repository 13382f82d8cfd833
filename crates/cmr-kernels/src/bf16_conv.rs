//! The forward convolution in bf16 on AMX tiles, f32 sums: stride 1, "same"
//! padding, odd kernels, the epilogue (bias, inference BatchNorm's affine,
//! ReLU) applied in f32 as the sums leave the tiles.
//!
//! Each image is copied once into bf16, zero-padded by `k / 2` on every
//! side and channels last (`[pixel, channel]`, channels padded to a multiple
//! of 32). Output pixels are numbered in the padded width (`q = y·wp + x`,
//! the last `k − 1` columns of each row are not outputs and are dropped),
//! so tap `(dy, dx)` of output `q` reads padded pixel `q + dy·wp + dx`: every
//! tap is a constant shift, and 16 consecutive outputs read 16 consecutive
//! pixel rows of the copy, one tile load (rows `channels·2` bytes apart). The
//! products are then `sums [q, cout] += Σ_tap copy[q + shift, cin] ·
//! W_tap [cin, cout]`, the weights packed once per call as the tiles' right
//! operand (pairs of input channels side by side, 16 output channels per
//! slice). No im2col: the copy is `(h + k − 1)·(w + k − 1)` pixels, read in
//! place by all `k²` taps.

use rayon::prelude::*;

use crate::amx::{Block, Steps, Tiles, to_bf16};
use crate::cpu::SendPtr;
use crate::gemm::Epilogue;

/// Output rows (pixels in the padded width) of one block of sums.
const M: usize = 32;
/// Output channels of one block of sums.
const N: usize = 32;
/// Blocks of output pixels that go through every block of output channels
/// before the next ones: their share of the padded copy and one block of
/// output channels' weights stay in cache together.
const CHUNK: usize = 4;

/// The layer's sizes in the layout of the tiles.
#[derive(Clone, Copy, Debug)]
struct Layout {
    cin: usize,
    h: usize,
    w: usize,
    cout: usize,
    k: usize,
    /// Input channels, padded to a multiple of 32.
    cp: usize,
    /// Output channels, padded to a multiple of 32.
    np: usize,
    /// The padded width.
    wp: usize,
    /// Blocks of [`M`] outputs per image (over `h·wp` numbered outputs).
    blocks: usize,
    /// Pixels of an image's padded copy: the padded image, and what the
    /// last block's taps read beyond it (zeros).
    pixels: usize,
}

impl Layout {
    fn new(cin: usize, h: usize, w: usize, cout: usize, k: usize) -> Self {
        let wp = w + k - 1;
        let blocks = (h * wp).div_ceil(M);
        let pixels = blocks * M + (k - 1) * (wp + 1);
        Self {
            cin,
            h,
            w,
            cout,
            k,
            cp: cin.next_multiple_of(32),
            np: cout.next_multiple_of(N),
            wp,
            blocks,
            pixels,
        }
    }
}

/// `weight [cout, cin, k, k]` as the tiles' right operand: for tap `t`,
/// slice `s` of 16 output channels and input-channel pair `p`, the 16
/// channels' two weights side by side, at `((t·slices + s)·cp/2 + p)·32 + 2j + e`
/// for output channel `16s + j` and input channel `2p + e`; zero where the
/// channels are padding.
fn pack_weights(weight: &[f32], l: Layout) -> Vec<u16> {
    let kk = l.k * l.k;
    let slices = l.np / 16;
    let pairs = l.cp / 2;
    let mut packed = vec![0u16; kk * slices * pairs * 32];
    packed.par_chunks_mut(pairs * 32).enumerate().for_each(|(ts, part)| {
        let (t, s) = (ts / slices, ts % slices);
        for j in 0..16 {
            let co = 16 * s + j;
            if co >= l.cout {
                break;
            }
            for ci in 0..l.cin {
                part[(ci / 2) * 32 + 2 * j + ci % 2] = to_bf16(weight[(co * l.cin + ci) * kk + t]);
            }
        }
    });
    packed
}

/// Image `x [cin, h, w]` as its padded channels-last bf16 copy
/// `[pixels, cp]`, zero outside the image and in the padding channels.
fn pad_channels_last(x: &[f32], l: Layout, copy: &mut [u16]) {
    let pad = l.k / 2;
    copy.fill(0);
    for y in 0..l.h {
        let row = &mut copy[((y + pad) * l.wp + pad) * l.cp..][..l.w * l.cp];
        for c in 0..l.cin {
            let src = &x[(c * l.h + y) * l.w..][..l.w];
            for (px, &v) in src.iter().enumerate() {
                row[px * l.cp + c] = to_bf16(v);
            }
        }
    }
}

/// `x [b, cin, h, w]` convolved with `weight [cout, cin, k, k]` (odd `k`,
/// padding `k / 2`) into `out [b, cout, h, w]`, `epi` applied; the products
/// in bf16 on AMX tiles, summed in f32. Returns `false`, having written
/// nothing, where this CPU has no AMX.
#[allow(clippy::too_many_arguments)]
pub(crate) fn forward(
    x: &[f32],
    (b, cin, h, w): (usize, usize, usize, usize),
    weight: &[f32],
    (cout, k): (usize, usize),
    epi: Epilogue,
    out: &mut [f32],
) -> bool {
    assert!(k % 2 == 1, "bf16 convolution: odd kernels only, not {k}");
    assert!(
        x.len() == b * cin * h * w && weight.len() == cout * cin * k * k && out.len() == b * cout * h * w,
        "bf16 convolution: sizes"
    );
    if !crate::amx::has_amx() {
        return false;
    }
    let l = Layout::new(cin, h, w, cout, k);
    let packed = pack_weights(weight, l);
    let mut copies = vec![0u16; b * l.pixels * l.cp];
    copies
        .par_chunks_mut(l.pixels * l.cp)
        .zip(x.par_chunks(cin * h * w))
        .for_each(|(copy, xi)| pad_channels_last(xi, l, copy));
    let chunks = l.blocks.div_ceil(CHUNK);
    let outp = SendPtr(out.as_mut_ptr());
    (0..b * chunks).into_par_iter().for_each(|job| {
        let (i, chunk) = (job / chunks, job % chunks);
        let copy = &copies[i * l.pixels * l.cp..][..l.pixels * l.cp];
        // SAFETY: this job alone writes image `i`'s outputs of blocks
        // `chunk·CHUNK ..`: pixels `q` of those blocks, every channel; other
        // jobs write other images or other pixels, and `out` holds `b·cout·h·w`
        // values (asserted above).
        let out_i = unsafe { std::slice::from_raw_parts_mut(outp.get().add(i * cout * h * w), cout * h * w) };
        let Some(mut tiles) = Tiles::new() else {
            unreachable!("AMX was found above")
        };
        let mut sums: Block = [0.0; M * N];
        let blocks = chunk * CHUNK..((chunk + 1) * CHUNK).min(l.blocks);
        for n0 in (0..l.np).step_by(N) {
            for block in blocks.clone() {
                let q0 = block * M;
                tiles.zero();
                for t in 0..k * k {
                    let shift = (t / k) * l.wp + t % k;
                    let a = &copy[(q0 + shift) * l.cp..];
                    let slice = |s: usize| &packed[((t * (l.np / 16) + s) * (l.cp / 2)) * 32..];
                    // SAFETY: rows `q0 + shift + r`, `r < 32`, of the copy
                    // lie below `blocks·M + (k − 1)·(wp + 1)` pixels (the
                    // copy's length), each `cp` values of which a step reads
                    // 32 at offsets `0, 32, .. cp − 32`; each slice of the
                    // packed weights holds `cp/2` pair rows of 64 bytes, read
                    // 16 rows a step.
                    unsafe {
                        tiles.steps(Steps {
                            a: [a.as_ptr(), a[16 * l.cp..].as_ptr()],
                            a_stride: l.cp * 2,
                            a_step: 64,
                            b: [slice(n0 / 16).as_ptr(), slice(n0 / 16 + 1).as_ptr()],
                            b_stride: 64,
                            b_step: 16 * 64,
                            count: l.cp / 32,
                        });
                    }
                }
                tiles.store(&mut sums);
                write_block(&sums, q0, n0, l, epi, out_i);
            }
        }
    });
    true
}

/// Block `sums [M, N]` (outputs `q0 ..`, channels `n0 ..`) into the image's
/// output planes, the epilogue applied; numbered outputs in the padding
/// columns, or past the image, are dropped.
fn write_block(sums: &Block, q0: usize, n0: usize, l: Layout, epi: Epilogue, out: &mut [f32]) {
    let hw = l.h * l.w;
    let mut at = [usize::MAX; M];
    for (r, at) in at.iter_mut().enumerate() {
        let (y, x) = ((q0 + r) / l.wp, (q0 + r) % l.wp);
        if y < l.h && x < l.w {
            *at = y * l.w + x;
        }
    }
    for j in 0..N.min(l.cout.saturating_sub(n0)) {
        let co = n0 + j;
        let bias = epi.bias.map_or(0.0, |b| b[co]);
        let (scale, shift) = epi.affine.map_or((1.0, 0.0), |(a, t)| (a[co], t[co]));
        let plane = &mut out[co * hw..][..hw];
        for (r, &p) in at.iter().enumerate() {
            if p == usize::MAX {
                continue;
            }
            let v = sums[r * N + j] + bias;
            let v = if epi.affine.is_some() { v * scale + shift } else { v };
            plane[p] = if epi.relu { v.max(0.0) } else { v };
        }
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
        if !crate::amx::has_amx() {
            eprintln!("no AMX-BF16 here: the bf16 convolution is not tested (the f32 kernels run instead)");
            return;
        }
        for &(b, cin, h, w, cout, k) in &[
            (1, 1, 5, 7, 3, 3),
            (2, 33, 6, 6, 17, 3),
            (1, 64, 12, 12, 64, 3),
            (3, 40, 9, 13, 50, 5),
            (2, 32, 8, 3, 32, 1),
            (1, 70, 24, 24, 96, 3),
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
                assert!(forward(&x, (b, cin, h, w), &wt, (cout, k), epi, &mut out));
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
                        "{:?} {name} at {idx}: {got} vs {v}",
                        (b, cin, h, w, cout, k)
                    );
                }
            }
        }
    }
}
