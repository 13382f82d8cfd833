//! Augmentation: the report's five transforms (horizontal and vertical flip,
//! rotation by 90°, brightness, contrast) plus random affine, gamma and
//! Gaussian noise.
//!
//! Each sample draws from its own stream keyed by (seed, epoch, sample id), so
//! an epoch's augmented batch is the same whatever ran before it. Geometric
//! transforms move image and mask together (bilinear for the image, nearest for
//! the mask, zero outside); intensity transforms act on `[0, 1]` values and the
//! result is clamped to `[0, 1]`.

use rand::Rng;
use rand_distr::{Distribution, StandardNormal};
use serde::{Deserialize, Serialize};

use crate::error::{DataError, Result};
use crate::plane::{Mask, Plane};
use crate::rng::{StreamRng, hash_str, purpose, stream};

/// A transform applied with probability `p`, with a value drawn uniformly from
/// `[min, max]`.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Ranged {
    pub p: f64,
    pub min: f64,
    pub max: f64,
}

impl Ranged {
    const fn off(min: f64, max: f64) -> Self {
        Self { p: 0.0, min, max }
    }
}

/// Random affine transform about the image centre.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Affine {
    pub p: f64,
    /// Rotation drawn from `[-max_rotation_deg, max_rotation_deg]`.
    pub max_rotation_deg: f64,
    /// Isotropic scale drawn from `[min_scale, max_scale]`.
    pub min_scale: f64,
    pub max_scale: f64,
    /// Shift along each axis drawn from `[-max_translate, max_translate]`, as a
    /// fraction of the side.
    pub max_translate: f64,
}

/// Which transforms run, how often, and how strongly.
///
/// The default applies nothing. [`AugmentConfig::report`] is the report's
/// recipe; [`AugmentConfig::strong`] adds affine, gamma and noise.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AugmentConfig {
    /// Probability of a left-right flip.
    pub hflip: f64,
    /// Probability of an up-down flip.
    pub vflip: f64,
    /// Probability of a rotation by 90°, 180° or 270° (equally likely).
    pub rot90: f64,
    /// Add a value from `[min, max]` to every pixel.
    pub brightness: Ranged,
    /// Scale the deviation from the image mean by a factor from `[min, max]`.
    pub contrast: Ranged,
    pub affine: Affine,
    /// Raise intensities to a power from `[min, max]`.
    pub gamma: Ranged,
    /// Add Gaussian noise with a standard deviation from `[min, max]`.
    pub noise: Ranged,
}

impl Default for AugmentConfig {
    fn default() -> Self {
        Self::none()
    }
}

impl AugmentConfig {
    /// No augmentation.
    pub const fn none() -> Self {
        Self {
            hflip: 0.0,
            vflip: 0.0,
            rot90: 0.0,
            brightness: Ranged::off(-0.1, 0.1),
            contrast: Ranged::off(0.8, 1.2),
            affine: Affine {
                p: 0.0,
                max_rotation_deg: 15.0,
                min_scale: 0.9,
                max_scale: 1.1,
                max_translate: 0.05,
            },
            gamma: Ranged::off(0.7, 1.5),
            noise: Ranged::off(0.0, 0.03),
        }
    }

    /// The report's five: flips, rotation by 90°, brightness and contrast.
    pub const fn report() -> Self {
        let mut c = Self::none();
        c.hflip = 0.5;
        c.vflip = 0.5;
        c.rot90 = 0.5;
        c.brightness.p = 0.5;
        c.contrast.p = 0.5;
        c
    }

    /// The report's five plus affine, gamma and noise.
    pub const fn strong() -> Self {
        let mut c = Self::report();
        c.affine.p = 0.5;
        c.gamma.p = 0.3;
        c.noise.p = 0.2;
        c
    }

    /// Whether any transform can fire.
    pub fn is_active(&self) -> bool {
        [
            self.hflip,
            self.vflip,
            self.rot90,
            self.brightness.p,
            self.contrast.p,
            self.affine.p,
            self.gamma.p,
            self.noise.p,
        ]
        .iter()
        .any(|&p| p > 0.0)
    }

    /// Reject probabilities outside `[0, 1]` and empty or non-finite ranges.
    pub fn validate(&self) -> Result<()> {
        let bad = |what: &str, why: String| Err(DataError::Config(format!("augment.{what}: {why}")));
        for (name, p) in [
            ("hflip", self.hflip),
            ("vflip", self.vflip),
            ("rot90", self.rot90),
            ("brightness.p", self.brightness.p),
            ("contrast.p", self.contrast.p),
            ("affine.p", self.affine.p),
            ("gamma.p", self.gamma.p),
            ("noise.p", self.noise.p),
        ] {
            if !(0.0..=1.0).contains(&p) {
                return bad(name, format!("probability {p} is not in [0, 1]"));
            }
        }
        for (name, r) in [
            ("brightness", self.brightness),
            ("contrast", self.contrast),
            ("gamma", self.gamma),
            ("noise", self.noise),
        ] {
            if !(r.min.is_finite() && r.max.is_finite() && r.min <= r.max) {
                return bad(name, format!("range [{}, {}] is empty or not finite", r.min, r.max));
            }
        }
        if self.contrast.min < 0.0 || self.gamma.min <= 0.0 || self.noise.min < 0.0 {
            return bad(
                "ranges",
                "contrast and noise must be non-negative and gamma positive".into(),
            );
        }
        let a = self.affine;
        if !(a.min_scale > 0.0 && a.min_scale <= a.max_scale && a.max_translate >= 0.0 && a.max_rotation_deg >= 0.0) {
            return bad(
                "affine",
                "need 0 < min_scale <= max_scale, max_translate >= 0, max_rotation_deg >= 0".into(),
            );
        }
        Ok(())
    }

    /// Augment one sample: its `[0, 1]` image and optional mask, with the stream
    /// of (seed, epoch, id).
    pub fn apply(
        &self,
        image: Plane<f32>,
        mask: Option<Mask>,
        seed: u64,
        epoch: u64,
        id: &str,
    ) -> (Plane<f32>, Option<Mask>) {
        let mut rng = stream(seed, &[purpose::AUGMENT, epoch, hash_str(id)]);
        self.apply_with(image, mask, &mut rng)
    }

    fn apply_with(
        &self,
        mut image: Plane<f32>,
        mut mask: Option<Mask>,
        rng: &mut StreamRng,
    ) -> (Plane<f32>, Option<Mask>) {
        // Every decision is drawn whether or not it fires, so that turning one
        // transform off does not change what the others do.
        let hflip = rng.random::<f64>() < self.hflip;
        let vflip = rng.random::<f64>() < self.vflip;
        let rot = rng.random::<f64>() < self.rot90;
        let quarter_turns = rng.random_range(1..=3u32);
        let affine = rng.random::<f64>() < self.affine.p;
        let angle = uniform(rng, -self.affine.max_rotation_deg, self.affine.max_rotation_deg);
        let scale = uniform(rng, self.affine.min_scale, self.affine.max_scale);
        let ty = uniform(rng, -self.affine.max_translate, self.affine.max_translate);
        let tx = uniform(rng, -self.affine.max_translate, self.affine.max_translate);
        let (bright, bright_v) = draw(rng, &self.brightness);
        let (contrast, contrast_v) = draw(rng, &self.contrast);
        let (gamma, gamma_v) = draw(rng, &self.gamma);
        let (noise, noise_v) = draw(rng, &self.noise);

        if hflip {
            image = flip_h(&image);
            mask = mask.map(|m| flip_h(&m));
        }
        if vflip {
            image = flip_v(&image);
            mask = mask.map(|m| flip_v(&m));
        }
        if rot {
            image = rot90(&image, quarter_turns);
            mask = mask.map(|m| rot90(&m, quarter_turns));
        }
        if affine {
            let t = AffineParams {
                angle_deg: angle,
                scale,
                translate_y: ty * image.height() as f64,
                translate_x: tx * image.width() as f64,
            };
            image = affine_bilinear(&image, t);
            mask = mask.map(|m| affine_nearest(&m, t));
        }
        let intensity = bright || contrast || gamma || noise;
        if bright {
            for v in image.data_mut() {
                *v += bright_v as f32;
            }
        }
        if contrast {
            let n = image.data().len().max(1) as f32;
            let mean = image.data().iter().sum::<f32>() / n;
            for v in image.data_mut() {
                *v = (*v - mean) * contrast_v as f32 + mean;
            }
        }
        if gamma {
            for v in image.data_mut() {
                *v = v.clamp(0.0, 1.0).powf(gamma_v as f32);
            }
        }
        if noise {
            for v in image.data_mut() {
                let z: f64 = StandardNormal.sample(rng);
                *v += (z * noise_v) as f32;
            }
        }
        if intensity {
            for v in image.data_mut() {
                *v = v.clamp(0.0, 1.0);
            }
        }
        (image, mask)
    }
}

fn uniform(rng: &mut StreamRng, lo: f64, hi: f64) -> f64 {
    lo + (hi - lo) * rng.random::<f64>()
}

fn draw(rng: &mut StreamRng, r: &Ranged) -> (bool, f64) {
    let fire = rng.random::<f64>() < r.p;
    (fire, uniform(rng, r.min, r.max))
}

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
#[derive(Clone, Copy, Debug)]
pub struct AffineParams {
    pub angle_deg: f64,
    pub scale: f64,
    pub translate_y: f64,
    pub translate_x: f64,
}

/// For each output pixel, the source position: the inverse transform.
fn inverse_map(t: AffineParams, h: usize, w: usize) -> impl Fn(usize, usize) -> (f64, f64) {
    let (cy, cx) = ((h as f64 - 1.0) / 2.0, (w as f64 - 1.0) / 2.0);
    let (s, c) = t.angle_deg.to_radians().sin_cos();
    move |y, x| {
        let dy = y as f64 - cy - t.translate_y;
        let dx = x as f64 - cx - t.translate_x;
        // inverse rotation by angle, then inverse scale
        let sx = (c * dx - s * dy) / t.scale;
        let sy = (s * dx + c * dy) / t.scale;
        (sy + cy, sx + cx)
    }
}

/// Affine warp with bilinear interpolation; zero outside the source.
pub fn affine_bilinear(p: &Plane<f32>, t: AffineParams) -> Plane<f32> {
    let (h, w) = (p.height(), p.width());
    let map = inverse_map(t, h, w);
    let at = |y: isize, x: isize| -> f32 {
        if y < 0 || x < 0 || y >= h as isize || x >= w as isize {
            0.0
        } else {
            p.get(y as usize, x as usize)
        }
    };
    Plane::from_fn(h, w, |y, x| {
        let (sy, sx) = map(y, x);
        let (y0, x0) = (sy.floor(), sx.floor());
        let (fy, fx) = ((sy - y0) as f32, (sx - x0) as f32);
        let (y0, x0) = (y0 as isize, x0 as isize);
        let top = at(y0, x0) * (1.0 - fx) + at(y0, x0 + 1) * fx;
        let bottom = at(y0 + 1, x0) * (1.0 - fx) + at(y0 + 1, x0 + 1) * fx;
        top * (1.0 - fy) + bottom * fy
    })
}

/// Affine warp with nearest-neighbour sampling (for masks); zero outside.
pub fn affine_nearest(p: &Mask, t: AffineParams) -> Mask {
    let (h, w) = (p.height(), p.width());
    let map = inverse_map(t, h, w);
    Plane::from_fn(h, w, |y, x| {
        let (sy, sx) = map(y, x);
        let (ry, rx) = (sy.round(), sx.round());
        if ry < 0.0 || rx < 0.0 || ry >= h as f64 || rx >= w as f64 {
            0
        } else {
            p.get(ry as usize, rx as usize)
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A mask with blobs of each class, and an image that encodes the mask.
    fn pair(n: usize) -> (Plane<f32>, Mask) {
        let mask = Plane::from_fn(n, n, |y, x| {
            let (fy, fx) = (y as f64 / n as f64, x as f64 / n as f64);
            if (fy - 0.5).powi(2) + (fx - 0.45).powi(2) < 0.02 {
                3
            } else if (fy - 0.5).powi(2) + (fx - 0.45).powi(2) < 0.05 {
                2
            } else if fy > 0.2 && fy < 0.45 && fx > 0.7 && fx < 0.9 {
                1
            } else {
                0
            }
        });
        (image_of(&mask), mask)
    }

    fn image_of(mask: &Mask) -> Plane<f32> {
        mask.map(|c| f32::from(c) * 0.25)
    }

    #[test]
    fn two_flips_are_the_identity() {
        let (img, mask) = pair(12);
        assert_eq!(flip_h(&flip_h(&img)), img);
        assert_eq!(flip_v(&flip_v(&mask)), mask);
        assert_ne!(flip_h(&mask), mask);
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
    fn geometric_transforms_keep_mask_and_image_aligned() {
        let mut cfg = AugmentConfig::none();
        cfg.hflip = 0.5;
        cfg.vflip = 0.5;
        cfg.rot90 = 0.5;
        cfg.affine.p = 1.0;
        cfg.affine.max_rotation_deg = 30.0;
        let (img, mask) = pair(48);
        let mut checked = 0;
        for epoch in 0..20 {
            let (ai, am) = cfg.apply(img.clone(), Some(mask.clone()), 5, epoch, "cmr1");
            let am = am.unwrap();
            assert!(am.data().iter().all(|&c| c <= 3));
            // Where the mask's 5×5 neighbourhood is uniform, bilinear sampling of
            // the encoded image must give back the same class.
            for y in 2..46 {
                for x in 2..46 {
                    let c = am.get(y, x);
                    let uniform = (0..5).all(|dy| (0..5).all(|dx| am.get(y + dy - 2, x + dx - 2) == c));
                    if uniform {
                        let decoded = (ai.get(y, x) / 0.25).round() as u8;
                        assert_eq!(decoded, c, "epoch {epoch} at ({y},{x})");
                        checked += 1;
                    }
                }
            }
        }
        assert!(checked > 20 * 1200, "{checked}");
    }

    #[test]
    fn exact_geometric_transforms_move_pixels_together() {
        let mut cfg = AugmentConfig::none();
        cfg.hflip = 0.5;
        cfg.vflip = 0.5;
        cfg.rot90 = 0.7;
        let (img, mask) = pair(20);
        let mut changed = 0;
        for epoch in 0..16 {
            let (ai, am) = cfg.apply(img.clone(), Some(mask.clone()), 1, epoch, "x");
            let am = am.unwrap();
            assert_eq!(ai, image_of(&am));
            changed += usize::from(am != mask);
        }
        assert!(changed >= 8, "{changed}");
    }

    #[test]
    fn same_seed_same_result_other_seed_other_result() {
        let cfg = AugmentConfig::strong();
        let (img, mask) = pair(24);
        let a = cfg.apply(img.clone(), Some(mask.clone()), 3, 1, "cmr7");
        let b = cfg.apply(img.clone(), Some(mask.clone()), 3, 1, "cmr7");
        assert_eq!(a, b);
        let differs = (0..8).any(|s| cfg.apply(img.clone(), Some(mask.clone()), 100 + s, 1, "cmr7") != a);
        assert!(differs);
    }

    #[test]
    fn intensities_stay_in_unit_range() {
        let mut cfg = AugmentConfig::none();
        cfg.brightness = Ranged {
            p: 1.0,
            min: 0.5,
            max: 0.6,
        };
        cfg.noise = Ranged {
            p: 1.0,
            min: 0.2,
            max: 0.3,
        };
        let (img, mask) = pair(16);
        let (ai, am) = cfg.apply(img, Some(mask.clone()), 0, 0, "a");
        assert_eq!(am.unwrap(), mask);
        assert!(ai.data().iter().all(|v| (0.0..=1.0).contains(v)));
        assert!(ai.data().contains(&1.0));
    }

    #[test]
    fn brightness_and_contrast_by_hand() {
        let img = Plane::from_vec(1, 2, vec![0.2f32, 0.6]).unwrap();
        let mut cfg = AugmentConfig::none();
        cfg.brightness = Ranged {
            p: 1.0,
            min: 0.1,
            max: 0.1,
        };
        let (b, _) = cfg.apply(img.clone(), None, 0, 0, "a");
        assert!((b.get(0, 0) - 0.3).abs() < 1e-6 && (b.get(0, 1) - 0.7).abs() < 1e-6);
        let mut cfg = AugmentConfig::none();
        cfg.contrast = Ranged {
            p: 1.0,
            min: 2.0,
            max: 2.0,
        };
        let (c, _) = cfg.apply(img, None, 0, 0, "a");
        // mean 0.4: 0.4 + 2·(−0.2) = 0.0 and 0.4 + 2·0.2 = 0.8
        assert!(c.get(0, 0).abs() < 1e-6 && (c.get(0, 1) - 0.8).abs() < 1e-6);
    }

    #[test]
    fn validation_rejects_bad_values() {
        let mut cfg = AugmentConfig::report();
        assert!(cfg.validate().is_ok());
        cfg.hflip = 1.5;
        assert!(cfg.validate().is_err());
        let mut cfg = AugmentConfig::report();
        cfg.contrast.min = 2.0;
        assert!(cfg.validate().is_err());
    }
}
