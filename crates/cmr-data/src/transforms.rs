//! The pixel-level transforms behind augmentation: exact flips and quarter
//! turns, one combined warp (affine plus a smooth elastic displacement field,
//! bilinear for images and nearest for masks, zero outside), smooth random
//! fields, Gaussian blur and bilinear resizing.
//!
//! Everything here is deterministic: randomness comes in as drawn values
//! (knots of a field, an angle), so each transform can be tested by hand.

use crate::plane::{Mask, Plane};

/// Mirror left-right.
pub fn flip_h<T: Copy>(p: &Plane<T>) -> Plane<T> {
    let w = p.width();
    Plane::from_fn(p.height(), w, |y, x| p.get(y, w - 1 - x))
}

/// Mirror up-down.
pub fn flip_v<T: Copy>(p: &Plane<T>) -> Plane<T> {
    let h = p.height();
    Plane::from_fn(h, p.width(), |y, x| p.get(h - 1 - y, x))
}

/// Rotate by `k` quarter turns counter-clockwise (as `numpy.rot90`).
pub fn rot90<T: Copy>(p: &Plane<T>, k: u32) -> Plane<T> {
    let (h, w) = (p.height(), p.width());
    match k % 4 {
        0 => p.clone(),
        // out[y][x] = in[x][w-1-y], shape w×h
        1 => Plane::from_fn(w, h, |y, x| p.get(x, w - 1 - y)),
        2 => Plane::from_fn(h, w, |y, x| p.get(h - 1 - y, w - 1 - x)),
        _ => Plane::from_fn(w, h, |y, x| p.get(h - 1 - x, y)),
    }
}

/// Rotation (degrees, counter-clockwise), isotropic scale and shift (pixels)
/// about the plane's centre.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AffineParams {
    pub angle_deg: f64,
    pub scale: f64,
    pub translate_y: f64,
    pub translate_x: f64,
}

impl AffineParams {
    pub const IDENTITY: Self = Self {
        angle_deg: 0.0,
        scale: 1.0,
        translate_y: 0.0,
        translate_x: 0.0,
    };
}

/// A geometric warp: for each output pixel, where in the source to sample.
/// The output pixel `p` is first displaced by the elastic field `d(p)`, then
/// mapped through the inverse of the affine transform.
#[derive(Clone, Debug)]
pub struct Warp {
    affine: AffineParams,
    /// Displacements `(dy, dx)` in pixels per output pixel, row-major.
    field: Option<(Vec<f32>, Vec<f32>)>,
}

impl Warp {
    pub fn affine(affine: AffineParams) -> Self {
        Self { affine, field: None }
    }

    /// `affine` after an elastic displacement field `(dy, dx)` (each `h × w`).
    pub fn with_field(affine: AffineParams, dy: Plane<f32>, dx: Plane<f32>) -> Self {
        Self {
            affine,
            field: Some((dy.into_vec(), dx.into_vec())),
        }
    }

    /// The source positions `(y, x)` of every output pixel of an `h × w` plane.
    fn sources(&self, h: usize, w: usize) -> Vec<(f64, f64)> {
        let t = self.affine;
        let (cy, cx) = ((h as f64 - 1.0) / 2.0, (w as f64 - 1.0) / 2.0);
        let (s, c) = t.angle_deg.to_radians().sin_cos();
        let mut out = Vec::with_capacity(h * w);
        for y in 0..h {
            for x in 0..w {
                let (mut py, mut px) = (y as f64, x as f64);
                if let Some((dy, dx)) = &self.field {
                    py += f64::from(dy[y * w + x]);
                    px += f64::from(dx[y * w + x]);
                }
                let dy = py - cy - t.translate_y;
                let dx = px - cx - t.translate_x;
                // inverse rotation by the angle, then inverse scale
                let sx = (c * dx - s * dy) / t.scale;
                let sy = (s * dx + c * dy) / t.scale;
                out.push((sy + cy, sx + cx));
            }
        }
        out
    }

    /// Warp an image with bilinear interpolation; zero outside the source.
    pub fn image(&self, p: &Plane<f32>) -> Plane<f32> {
        let (h, w) = (p.height(), p.width());
        let at = |y: isize, x: isize| -> f32 {
            if y < 0 || x < 0 || y >= h as isize || x >= w as isize {
                0.0
            } else {
                p.get(y as usize, x as usize)
            }
        };
        let data = self
            .sources(h, w)
            .into_iter()
            .map(|(sy, sx)| {
                let (y0, x0) = (sy.floor(), sx.floor());
                let (fy, fx) = ((sy - y0) as f32, (sx - x0) as f32);
                let (y0, x0) = (y0 as isize, x0 as isize);
                let top = at(y0, x0) * (1.0 - fx) + at(y0, x0 + 1) * fx;
                let bottom = at(y0 + 1, x0) * (1.0 - fx) + at(y0 + 1, x0 + 1) * fx;
                top * (1.0 - fy) + bottom * fy
            })
            .collect();
        Plane::from_vec(h, w, data).expect("one source per pixel")
    }

    /// Warp a mask with nearest-neighbour sampling; background outside.
    pub fn mask(&self, p: &Mask) -> Mask {
        let (h, w) = (p.height(), p.width());
        let data = self
            .sources(h, w)
            .into_iter()
            .map(|(sy, sx)| {
                let (ry, rx) = (sy.round(), sx.round());
                if ry < 0.0 || rx < 0.0 || ry >= h as f64 || rx >= w as f64 {
                    0
                } else {
                    p.get(ry as usize, rx as usize)
                }
            })
            .collect();
        Plane::from_vec(h, w, data).expect("one source per pixel")
    }
}

/// Affine warp with bilinear interpolation; zero outside the source.
pub fn affine_bilinear(p: &Plane<f32>, t: AffineParams) -> Plane<f32> {
    Warp::affine(t).image(p)
}

/// Affine warp with nearest-neighbour sampling (for masks); zero outside.
pub fn affine_nearest(p: &Mask, t: AffineParams) -> Mask {
    Warp::affine(t).mask(p)
}

/// Catmull-Rom weights of the four knots around fractional position `t`.
fn catmull_rom(t: f64) -> [f64; 4] {
    let (t2, t3) = (t * t, t * t * t);
    [
        0.5 * (-t3 + 2.0 * t2 - t),
        0.5 * (3.0 * t3 - 5.0 * t2 + 2.0),
        0.5 * (-3.0 * t3 + 4.0 * t2 + t),
        0.5 * (t3 - t2),
    ]
}

/// Interpolation matrix `[n × knots]`: row `i` holds the Catmull-Rom weights
/// of output sample `i` when `knots` knots span `0..n−1` evenly (knots
/// beyond the ends extrapolated linearly, so that linear knots give a linear
/// field).
fn knot_weights(n: usize, knots: usize) -> Vec<f64> {
    let mut m = vec![0.0; n * knots];
    for i in 0..n {
        let u = if n > 1 {
            i as f64 * (knots - 1) as f64 / (n - 1) as f64
        } else {
            0.0
        };
        let k0 = (u.floor() as usize).min(knots - 2);
        let wts = catmull_rom(u - k0 as f64);
        for (j, wt) in wts.iter().enumerate() {
            // a knot beyond either end is extrapolated linearly from the last two
            match k0 as isize + j as isize - 1 {
                -1 => {
                    m[i * knots] += 2.0 * wt;
                    m[i * knots + 1] -= wt;
                }
                k if k == knots as isize => {
                    m[i * knots + knots - 1] += 2.0 * wt;
                    m[i * knots + knots - 2] -= wt;
                }
                k => m[i * knots + k as usize] += wt,
            }
        }
    }
    m
}

/// A smooth `h × w` field through a `knots × knots` grid of values (row-major),
/// interpolated by Catmull-Rom splines along each axis (continuous with a
/// continuous first derivative; equal to the knot values at the knots).
pub fn smooth_field(values: &[f64], knots: usize, h: usize, w: usize) -> Plane<f32> {
    assert!(
        knots >= 2 && values.len() == knots * knots,
        "need knots >= 2 and knots² values"
    );
    let (wy, wx) = (knot_weights(h, knots), knot_weights(w, knots));
    // along x first: [knots × w]
    let mut rows = vec![0.0f64; knots * w];
    for ky in 0..knots {
        for x in 0..w {
            rows[ky * w + x] = (0..knots).map(|kx| values[ky * knots + kx] * wx[x * knots + kx]).sum();
        }
    }
    Plane::from_fn(h, w, |y, x| {
        (0..knots).map(|ky| rows[ky * w + x] * wy[y * knots + ky]).sum::<f64>() as f32
    })
}

/// Separable Gaussian blur with standard deviation `sigma` pixels (edges
/// repeated). `sigma <= 0` returns the plane unchanged.
pub fn gaussian_blur(p: &Plane<f32>, sigma: f64) -> Plane<f32> {
    if sigma <= 0.0 {
        return p.clone();
    }
    let r = (3.0 * sigma).ceil() as isize;
    let mut kernel: Vec<f32> = (-r..=r)
        .map(|i| (-(i * i) as f64 / (2.0 * sigma * sigma)).exp() as f32)
        .collect();
    let total: f32 = kernel.iter().sum();
    kernel.iter_mut().for_each(|k| *k /= total);
    let (h, w) = (p.height() as isize, p.width() as isize);
    let conv =
        |get: &dyn Fn(isize) -> f32| -> f32 { kernel.iter().enumerate().map(|(j, k)| k * get(j as isize - r)).sum() };
    let across = Plane::from_fn(p.height(), p.width(), |y, x| {
        conv(&|d| p.get(y, (x as isize + d).clamp(0, w - 1) as usize))
    });
    Plane::from_fn(p.height(), p.width(), |y, x| {
        conv(&|d| across.get((y as isize + d).clamp(0, h - 1) as usize, x))
    })
}

/// Bilinear resize to `h × w` (pixel centres aligned, as `align_corners =
/// false`; edges repeated).
pub fn resize_bilinear(p: &Plane<f32>, h: usize, w: usize) -> Plane<f32> {
    let (sh, sw) = (p.height(), p.width());
    let coord = |i: usize, from: usize, to: usize| -> (usize, usize, f32) {
        let s = ((i as f64 + 0.5) * from as f64 / to as f64 - 0.5).clamp(0.0, (from - 1) as f64);
        let i0 = s.floor() as usize;
        (i0, (i0 + 1).min(from - 1), (s - i0 as f64) as f32)
    };
    Plane::from_fn(h, w, |y, x| {
        let (y0, y1, fy) = coord(y, sh, h);
        let (x0, x1, fx) = coord(x, sw, w);
        let top = p.get(y0, x0) * (1.0 - fx) + p.get(y0, x1) * fx;
        let bottom = p.get(y1, x0) * (1.0 - fx) + p.get(y1, x1) * fx;
        top * (1.0 - fy) + bottom * fy
    })
}

/// The source index whose pixel centre is nearest to target pixel `i`'s (the
/// same alignment as [`resize_bilinear`]).
fn nearest_index(i: usize, from: usize, to: usize) -> usize {
    let s = (i as f64 + 0.5) * from as f64 / to as f64 - 0.5;
    (s.round().max(0.0) as usize).min(from - 1)
}

/// Nearest-neighbour resize to `h × w` (for masks: labels stay labels).
pub fn resize_nearest<T: Copy>(p: &Plane<T>, h: usize, w: usize) -> Plane<T> {
    let (sh, sw) = (p.height(), p.width());
    Plane::from_fn(h, w, |y, x| p.get(nearest_index(y, sh, h), nearest_index(x, sw, w)))
}

/// [`resize_bilinear`] of an 8-bit image, rounded back to 8 bits.
pub fn resize_u8_bilinear(p: &Plane<u8>, h: usize, w: usize) -> Plane<u8> {
    if (h, w) == (p.height(), p.width()) {
        return p.clone();
    }
    let f = Plane::from_fn(p.height(), p.width(), |y, x| f32::from(p.get(y, x)));
    let r = resize_bilinear(&f, h, w);
    Plane::from_fn(h, w, |y, x| r.get(y, x).round().clamp(0.0, 255.0) as u8)
}

/// Simulate a scan acquired at `factor` times coarser resolution: resize down
/// to `round(side / factor)` (at least 2) and back up, both bilinear.
pub fn low_resolution(p: &Plane<f32>, factor: f64) -> Plane<f32> {
    if factor <= 1.0 {
        return p.clone();
    }
    let (h, w) = (p.height(), p.width());
    let small = |n: usize| ((n as f64 / factor).round() as usize).clamp(2.min(n), n);
    let down = resize_bilinear(p, small(h), small(w));
    resize_bilinear(&down, h, w)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn two_flips_are_the_identity() {
        let p = Plane::from_fn(3, 5, |y, x| (y * 5 + x) as u8);
        assert_eq!(flip_h(&flip_h(&p)), p);
        assert_eq!(flip_v(&flip_v(&p)), p);
        assert_ne!(flip_h(&p), p);
    }

    #[test]
    fn four_quarter_turns_are_the_identity() {
        let p = Plane::from_fn(3, 5, |y, x| (y * 5 + x) as u8);
        let mut q = p.clone();
        for _ in 0..4 {
            q = rot90(&q, 1);
        }
        assert_eq!(q, p);
        assert_eq!(rot90(&rot90(&p, 1), 3), p);
        assert_eq!(rot90(&p, 2), rot90(&rot90(&p, 1), 1));
        // counter-clockwise: the top-right corner goes to the top-left
        assert_eq!(rot90(&p, 1).get(0, 0), p.get(0, 4));
    }

    #[test]
    fn quarter_turn_by_hand() {
        // [[1,2],[3,4]] turned counter-clockwise is [[2,4],[1,3]]
        let p = Plane::from_vec(2, 2, vec![1u8, 2, 3, 4]).unwrap();
        assert_eq!(rot90(&p, 1).data(), &[2, 4, 1, 3]);
        assert_eq!(rot90(&p, 3).data(), &[3, 1, 4, 2]);
    }

    #[test]
    fn identity_warp_and_a_quarter_turn_by_affine() {
        let p = Plane::from_fn(6, 6, |y, x| (y * 6 + x) as f32);
        assert_eq!(affine_bilinear(&p, AffineParams::IDENTITY), p);
        let zero = Plane::zeros(6, 6);
        assert_eq!(
            Warp::with_field(AffineParams::IDENTITY, zero.clone(), zero).image(&p),
            p
        );
        // 90° counter-clockwise about the centre is rot90 exactly
        let t = AffineParams {
            angle_deg: 90.0,
            ..AffineParams::IDENTITY
        };
        let m = p.map(|v| v as u8);
        assert_eq!(affine_nearest(&m, t), rot90(&m, 1));
        let turned = affine_bilinear(&p, t);
        for (a, b) in turned.data().iter().zip(rot90(&p, 1).data()) {
            assert!((a - b).abs() < 1e-4, "{a} {b}");
        }
    }

    #[test]
    fn a_constant_field_shifts_by_its_value() {
        let p = Plane::from_fn(5, 5, |y, x| (y * 5 + x) as u8);
        // every output pixel samples one pixel to the right
        let w = Warp::with_field(
            AffineParams::IDENTITY,
            Plane::zeros(5, 5),
            Plane::from_fn(5, 5, |_, _| 1.0),
        );
        let out = w.mask(&p);
        assert_eq!(out.get(2, 1), p.get(2, 2));
        assert_eq!(out.get(2, 4), 0);
    }

    #[test]
    fn smooth_field_passes_through_its_knots() {
        let v = [0.0, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0];
        let f = smooth_field(&v, 3, 9, 9);
        assert!((f.get(0, 0) - 0.0).abs() < 1e-6);
        assert!((f.get(0, 8) - 2.0).abs() < 1e-6);
        assert!((f.get(4, 4) - 4.0).abs() < 1e-6);
        assert!((f.get(8, 8) - 8.0).abs() < 1e-6);
        // a linear ramp of knots stays linear in between
        assert!((f.get(2, 0) - 1.5).abs() < 1e-6, "{}", f.get(2, 0));
        let c = smooth_field(&[0.7; 16], 4, 5, 7);
        assert!(c.data().iter().all(|&x| (x - 0.7).abs() < 1e-6));
    }

    #[test]
    fn blur_keeps_constants_and_the_mean_spreads_a_spike() {
        let c = Plane::from_fn(9, 9, |_, _| 0.3f32);
        assert!(gaussian_blur(&c, 1.5).data().iter().all(|&x| (x - 0.3).abs() < 1e-6));
        let spike = Plane::from_fn(15, 15, |y, x| if (y, x) == (7, 7) { 1.0f32 } else { 0.0 });
        let b = gaussian_blur(&spike, 1.0);
        let total: f32 = b.data().iter().sum();
        assert!((total - 1.0).abs() < 1e-5);
        assert!(b.get(7, 7) < 0.2 && b.get(7, 8) > 0.05 && (b.get(7, 8) - b.get(8, 7)).abs() < 1e-6);
        assert_eq!(gaussian_blur(&spike, 0.0), spike);
    }

    #[test]
    fn nearest_resize_keeps_labels_and_inverts_an_integer_upscale() {
        let m = Plane::from_fn(3, 4, |y, x| (y * 4 + x) as u8);
        let up = resize_nearest(&m, 6, 8);
        assert_eq!(up.get(0, 0), 0);
        assert_eq!(up.get(1, 1), 0);
        assert_eq!(up.get(5, 7), 11);
        assert_eq!(resize_nearest(&up, 3, 4), m);
        assert_eq!(resize_nearest(&m, 3, 4), m);
        let i = resize_u8_bilinear(&m, 3, 4);
        assert_eq!(i, m);
        let flat = Plane::from_fn(5, 5, |_, _| 200u8);
        assert!(resize_u8_bilinear(&flat, 9, 3).data().iter().all(|&v| v == 200));
    }

    #[test]
    fn resize_by_hand_and_low_resolution_keeps_constants() {
        // [0, 1] widened to four pixels: centres at −0.25, 0.25, 0.75, 1.25 of the source
        let p = Plane::from_vec(1, 2, vec![0.0f32, 1.0]).unwrap();
        let r = resize_bilinear(&p, 1, 4);
        assert_eq!(r.data(), &[0.0, 0.25, 0.75, 1.0]);
        let c = Plane::from_fn(12, 12, |_, _| 0.6f32);
        assert!(low_resolution(&c, 2.0).data().iter().all(|&x| (x - 0.6).abs() < 1e-6));
        let ramp = Plane::from_fn(12, 12, |y, x| ((y + x) % 2) as f32);
        assert_eq!(low_resolution(&ramp, 1.0), ramp);
        assert_ne!(low_resolution(&ramp, 2.0), ramp);
    }
}
