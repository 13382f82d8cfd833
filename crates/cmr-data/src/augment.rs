//! Augmentation: the report's five transforms (horizontal and vertical flip,
//! rotation by 90°, brightness, contrast) and the ones that cover what
//! scanners and hearts do: rotation by any angle, scaling and shift, elastic
//! deformation, a smooth multiplicative bias field, Gaussian blur,
//! low-resolution simulation, gamma and Gaussian noise.
//!
//! Each sample draws from its own stream keyed by (seed, epoch, sample id), so
//! an epoch's augmented batch is the same whatever ran before it. Geometric
//! transforms move image and mask together through one warp (bilinear for the
//! image, nearest for the mask, zero outside); intensity transforms act on
//! `[0, 1]` values and the result is clamped to `[0, 1]`.
//!
//! [`AugmentConfig::deformed_test`] is the fixed, strong deformation used to
//! build deformed copies of validation data ([`deform_sample`]).

use rand::Rng;
use rand_distr::{Distribution, StandardNormal};
use serde::{Deserialize, Serialize};

use crate::dataset::Sample;
use crate::error::{DataError, Result};
use crate::normalize::to_unit;
use crate::plane::{Mask, Plane};
use crate::rng::{StreamRng, hash_str, purpose, stream};
use crate::transforms::{AffineParams, Warp, flip_h, flip_v, gaussian_blur, low_resolution, rot90, smooth_field};

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

    const fn on(p: f64, min: f64, max: f64) -> Self {
        Self { p, min, max }
    }
}

/// Random affine transform about the image centre.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Affine {
    pub p: f64,
    /// Rotation drawn from `[-max_rotation_deg, max_rotation_deg]` (up to 180:
    /// any angle).
    pub max_rotation_deg: f64,
    /// Isotropic scale drawn from `[min_scale, max_scale]`.
    pub min_scale: f64,
    pub max_scale: f64,
    /// Shift along each axis drawn from `[-max_translate, max_translate]`, as a
    /// fraction of the side.
    pub max_translate: f64,
}

/// Elastic deformation: a smooth random displacement field through a
/// `grid × grid` lattice of knots spanning the image, each knot displaced by
/// Gaussian values (per axis) whose standard deviation in pixels is drawn from
/// `[min, max]`.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Elastic {
    pub p: f64,
    pub min: f64,
    pub max: f64,
    /// Knots per side (at least 2; 5 on a 96-pixel image puts one every 24
    /// pixels).
    pub grid: usize,
}

/// Knots per side of the bias field (a slow variation across the image).
const BIAS_KNOTS: usize = 3;

/// Which transforms run, how often, and how strongly.
///
/// The default applies nothing. [`AugmentConfig::report`] is the report's
/// recipe; [`AugmentConfig::strong`] adds affine, gamma and noise;
/// [`AugmentConfig::robust`] adds rotation by any angle, elastic deformation,
/// bias field, blur and low resolution.
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
    pub elastic: Elastic,
    /// Multiply by `exp(a · f)`, `f` a smooth field through 3×3 standard
    /// normal knots and `a` from `[min, max]`.
    pub bias_field: Ranged,
    /// Gaussian blur with a standard deviation in pixels from `[min, max]`.
    pub blur: Ranged,
    /// Down-sample by a factor from `[min, max]` (at least 1) and back up.
    pub low_res: Ranged,
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
            elastic: Elastic {
                p: 0.0,
                min: 0.0,
                max: 2.0,
                grid: 5,
            },
            bias_field: Ranged::off(0.0, 0.3),
            blur: Ranged::off(0.5, 1.0),
            low_res: Ranged::off(1.0, 2.0),
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

    /// What scanners and hearts do, in ranges a little wider than
    /// [`Self::deformed_test`] reaches: rotation by any angle, scale
    /// 0.75–1.25, elastic deformation, bias field, blur, low resolution,
    /// gamma, noise, on top of the report's five.
    pub const fn robust() -> Self {
        let mut c = Self::report();
        c.affine = Affine {
            p: 0.8,
            max_rotation_deg: 180.0,
            min_scale: 0.75,
            max_scale: 1.25,
            max_translate: 0.08,
        };
        c.elastic = Elastic {
            p: 0.5,
            min: 0.0,
            max: 3.0,
            grid: 5,
        };
        c.bias_field = Ranged::on(0.4, 0.0, 0.4);
        c.blur = Ranged::on(0.15, 0.3, 1.2);
        c.low_res = Ranged::on(0.15, 1.0, 2.0);
        c.gamma = Ranged::on(0.4, 0.6, 1.6);
        c.noise = Ranged::on(0.3, 0.0, 0.06);
        c
    }

    /// The deformation of the deformed test copies: every image elastically
    /// warped (knot SD 2.5 px), rotated by up to ±30°, scaled by 0.8–1.2,
    /// gamma 0.7–1.5, noise SD up to 0.05 and a bias field of strength up to
    /// 0.3, all at once.
    pub const fn deformed_test() -> Self {
        let mut c = Self::none();
        c.affine = Affine {
            p: 1.0,
            max_rotation_deg: 30.0,
            min_scale: 0.8,
            max_scale: 1.2,
            max_translate: 0.0,
        };
        c.elastic = Elastic {
            p: 1.0,
            min: 2.5,
            max: 2.5,
            grid: 5,
        };
        c.gamma = Ranged::on(1.0, 0.7, 1.5);
        c.noise = Ranged::on(1.0, 0.0, 0.05);
        c.bias_field = Ranged::on(1.0, 0.0, 0.3);
        c
    }

    fn probabilities(&self) -> [(&'static str, f64); 12] {
        [
            ("hflip", self.hflip),
            ("vflip", self.vflip),
            ("rot90", self.rot90),
            ("brightness.p", self.brightness.p),
            ("contrast.p", self.contrast.p),
            ("affine.p", self.affine.p),
            ("gamma.p", self.gamma.p),
            ("noise.p", self.noise.p),
            ("elastic.p", self.elastic.p),
            ("bias_field.p", self.bias_field.p),
            ("blur.p", self.blur.p),
            ("low_res.p", self.low_res.p),
        ]
    }

    /// Whether any transform can fire.
    pub fn is_active(&self) -> bool {
        self.probabilities().iter().any(|&(_, p)| p > 0.0)
    }

    /// Reject probabilities outside `[0, 1]` and empty or non-finite ranges.
    pub fn validate(&self) -> Result<()> {
        let bad = |what: &str, why: String| Err(DataError::Config(format!("augment.{what}: {why}")));
        for (name, p) in self.probabilities() {
            if !(0.0..=1.0).contains(&p) {
                return bad(name, format!("probability {p} is not in [0, 1]"));
            }
        }
        let e = self.elastic;
        for (name, (min, max)) in [
            ("brightness", (self.brightness.min, self.brightness.max)),
            ("contrast", (self.contrast.min, self.contrast.max)),
            ("gamma", (self.gamma.min, self.gamma.max)),
            ("noise", (self.noise.min, self.noise.max)),
            ("elastic", (e.min, e.max)),
            ("bias_field", (self.bias_field.min, self.bias_field.max)),
            ("blur", (self.blur.min, self.blur.max)),
            ("low_res", (self.low_res.min, self.low_res.max)),
        ] {
            if !(min.is_finite() && max.is_finite() && min <= max) {
                return bad(name, format!("range [{min}, {max}] is empty or not finite"));
            }
        }
        if self.contrast.min < 0.0 || self.gamma.min <= 0.0 || self.noise.min < 0.0 {
            return bad(
                "ranges",
                "contrast and noise must be non-negative and gamma positive".into(),
            );
        }
        if e.min < 0.0 || e.max > 20.0 || !(2..=32).contains(&e.grid) {
            return bad(
                "elastic",
                format!(
                    "need 0 <= min <= max <= 20 pixels and 2 <= grid <= 32, got [{}, {}], grid {}",
                    e.min, e.max, e.grid
                ),
            );
        }
        if self.bias_field.min < 0.0 || self.bias_field.max > 2.0 {
            return bad("bias_field", "strength must be in [0, 2]".into());
        }
        if self.blur.min < 0.0 || self.blur.max > 5.0 {
            return bad("blur", "sigma must be in [0, 5] pixels".into());
        }
        if self.low_res.min < 1.0 || self.low_res.max > 8.0 {
            return bad("low_res", "factor must be in [1, 8]".into());
        }
        let a = self.affine;
        if !(a.min_scale > 0.0
            && a.min_scale <= a.max_scale
            && a.max_translate >= 0.0
            && (0.0..=180.0).contains(&a.max_rotation_deg))
        {
            return bad(
                "affine",
                "need 0 < min_scale <= max_scale, max_translate >= 0, 0 <= max_rotation_deg <= 180".into(),
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
        // transform off does not change what the others do (the report's
        // transforms and affine, gamma and noise draw as they did before the
        // others existed).
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
        let e = self.elastic;
        let (elastic, elastic_v) = draw(rng, &Ranged::on(e.p, e.min, e.max));
        let (bias, bias_v) = draw(rng, &self.bias_field);
        let (blur, blur_v) = draw(rng, &self.blur);
        let (low, low_v) = draw(rng, &self.low_res);
        let knots = e.grid.max(2);
        let elastic_knots = normals(rng, 2 * knots * knots);
        let bias_knots = normals(rng, BIAS_KNOTS * BIAS_KNOTS);

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
        let (h, w) = (image.height(), image.width());
        let t = if affine {
            AffineParams {
                angle_deg: angle,
                scale,
                translate_y: ty * h as f64,
                translate_x: tx * w as f64,
            }
        } else {
            AffineParams::IDENTITY
        };
        let warp = if elastic && elastic_v > 0.0 {
            let (ky, kx) = elastic_knots.split_at(knots * knots);
            let scaled = |k: &[f64]| k.iter().map(|v| v * elastic_v).collect::<Vec<_>>();
            Some(Warp::with_field(
                t,
                smooth_field(&scaled(ky), knots, h, w),
                smooth_field(&scaled(kx), knots, h, w),
            ))
        } else {
            affine.then(|| Warp::affine(t))
        };
        if let Some(warp) = warp {
            image = warp.image(&image);
            mask = mask.map(|m| warp.mask(&m));
        }
        let intensity = bright || contrast || gamma || noise || bias || blur || low;
        if bias && bias_v > 0.0 {
            let field = smooth_field(&bias_knots, BIAS_KNOTS, h, w);
            for (v, f) in image.data_mut().iter_mut().zip(field.data()) {
                *v *= (bias_v as f32 * f).exp();
            }
        }
        if blur {
            image = gaussian_blur(&image, blur_v);
        }
        if low {
            image = low_resolution(&image, low_v);
        }
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

/// A deformed copy of `sample` (image and mask warped together) by `config`,
/// drawn from the stream of (seed, id) kept for deformed copies: the same
/// seed gives the same copy on every machine. The image is quantised back to
/// 8 bits, as a PNG of the copy would be.
pub fn deform_sample(sample: &Sample, config: &AugmentConfig, seed: u64) -> Sample {
    let mut rng = stream(seed, &[purpose::DEFORM, hash_str(&sample.id)]);
    let (image, mask) = config.apply_with(to_unit(&sample.image), sample.mask.clone(), &mut rng);
    Sample {
        image: image.map(|v| (v * 255.0).round().clamp(0.0, 255.0) as u8),
        mask,
        ..sample.clone()
    }
}

fn uniform(rng: &mut StreamRng, lo: f64, hi: f64) -> f64 {
    lo + (hi - lo) * rng.random::<f64>()
}

fn draw(rng: &mut StreamRng, r: &Ranged) -> (bool, f64) {
    let fire = rng.random::<f64>() < r.p;
    (fire, uniform(rng, r.min, r.max))
}

/// `n` standard normal values.
fn normals(rng: &mut StreamRng, n: usize) -> Vec<f64> {
    (0..n).map(|_| StandardNormal.sample(rng)).collect()
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

    /// Every transform at full probability, one at a time and all together.
    fn each_transform() -> Vec<(&'static str, AugmentConfig)> {
        let full = AugmentConfig::robust();
        let mut out = Vec::new();
        let mut one = |name: &'static str, f: &dyn Fn(&mut AugmentConfig)| {
            let mut c = AugmentConfig::none();
            f(&mut c);
            out.push((name, c));
        };
        one("affine", &|c| c.affine = Affine { p: 1.0, ..full.affine });
        one("elastic", &|c| c.elastic = Elastic { p: 1.0, ..full.elastic });
        one("bias_field", &|c| {
            c.bias_field = Ranged {
                p: 1.0,
                ..full.bias_field
            }
        });
        one("blur", &|c| c.blur = Ranged { p: 1.0, ..full.blur });
        one("low_res", &|c| c.low_res = Ranged { p: 1.0, ..full.low_res });
        one("gamma", &|c| c.gamma = Ranged { p: 1.0, ..full.gamma });
        one("noise", &|c| c.noise = Ranged { p: 1.0, ..full.noise });
        out.push(("robust", full));
        out.push(("deformed_test", AugmentConfig::deformed_test()));
        out
    }

    #[test]
    fn every_transform_keeps_mask_and_image_aligned_in_range_and_repeats() {
        let (img, mask) = pair(48);
        for (name, cfg) in each_transform() {
            cfg.validate().unwrap();
            let geometric = cfg.affine.p > 0.0 || cfg.elastic.p > 0.0;
            for epoch in 0..6 {
                let (ai, am) = cfg.apply(img.clone(), Some(mask.clone()), 9, epoch, "cmr3");
                let am = am.unwrap();
                assert!(ai.data().iter().all(|v| (0.0..=1.0).contains(v)), "{name}");
                assert!(am.data().iter().all(|&c| c <= 3), "{name}");
                if !geometric {
                    assert_eq!(am, mask, "{name}: an intensity transform moved the mask");
                }
                let again = cfg.apply(img.clone(), Some(mask.clone()), 9, epoch, "cmr3");
                assert_eq!((ai.clone(), Some(am.clone())), again, "{name}: not deterministic");
                assert_ne!(ai, img, "{name}: changed nothing");
            }
            // geometry only: the warped encoded image decodes to the warped mask
            // wherever the mask is locally uniform
            if geometric {
                let mut only_geometry = cfg;
                for r in [
                    &mut only_geometry.gamma,
                    &mut only_geometry.noise,
                    &mut only_geometry.bias_field,
                    &mut only_geometry.blur,
                    &mut only_geometry.low_res,
                    &mut only_geometry.brightness,
                    &mut only_geometry.contrast,
                ] {
                    r.p = 0.0;
                }
                let mut checked = 0;
                for epoch in 0..6 {
                    let (ai, am) = only_geometry.apply(img.clone(), Some(mask.clone()), 9, epoch, "cmr3");
                    let am = am.unwrap();
                    assert_ne!(am, mask, "{name}: the mask did not move");
                    for y in 2..46 {
                        for x in 2..46 {
                            let c = am.get(y, x);
                            if (0..5).all(|dy| (0..5).all(|dx| am.get(y + dy - 2, x + dx - 2) == c)) {
                                assert_eq!((ai.get(y, x) / 0.25).round() as u8, c, "{name} at ({y},{x})");
                                checked += 1;
                            }
                        }
                    }
                }
                assert!(checked > 6 * 1000, "{name}: {checked}");
            }
        }
    }

    #[test]
    fn zero_strength_is_the_identity() {
        let (img, mask) = pair(32);
        let mut cfg = AugmentConfig::none();
        cfg.affine = Affine {
            p: 1.0,
            max_rotation_deg: 0.0,
            min_scale: 1.0,
            max_scale: 1.0,
            max_translate: 0.0,
        };
        cfg.elastic = Elastic {
            p: 1.0,
            min: 0.0,
            max: 0.0,
            grid: 4,
        };
        cfg.bias_field = Ranged::on(1.0, 0.0, 0.0);
        cfg.blur = Ranged::on(1.0, 0.0, 0.0);
        cfg.low_res = Ranged::on(1.0, 1.0, 1.0);
        cfg.gamma = Ranged::on(1.0, 1.0, 1.0);
        cfg.noise = Ranged::on(1.0, 0.0, 0.0);
        let (ai, am) = cfg.apply(img.clone(), Some(mask.clone()), 4, 2, "cmr9");
        assert_eq!(am.unwrap(), mask);
        for (a, b) in ai.data().iter().zip(img.data()) {
            assert!((a - b).abs() < 1e-6, "{a} {b}");
        }
    }

    #[test]
    fn turning_a_new_transform_on_leaves_the_old_draws_alone() {
        let (img, mask) = pair(24);
        let base = AugmentConfig::report();
        let mut more = base;
        more.blur = Ranged::on(0.0, 0.5, 1.0); // drawn, never fires
        assert_eq!(
            base.apply(img.clone(), Some(mask.clone()), 1, 3, "a"),
            more.apply(img, Some(mask), 1, 3, "a")
        );
    }

    #[test]
    fn deformed_copies_are_seeded_and_keep_their_id() {
        let (img, mask) = pair(40);
        let sample = Sample {
            id: "cmr5".into(),
            image: img.map(|v| (v * 255.0) as u8),
            mask: Some(mask.clone()),
            original: crate::plane::Size { height: 40, width: 40 },
            path: "cmr5.png".into(),
        };
        let cfg = AugmentConfig::deformed_test();
        let a = deform_sample(&sample, &cfg, 7);
        let b = deform_sample(&sample, &cfg, 7);
        let c = deform_sample(&sample, &cfg, 8);
        assert_eq!((a.image.clone(), a.mask.clone()), (b.image.clone(), b.mask.clone()));
        assert_ne!(a.image, c.image);
        assert_eq!(a.id, "cmr5");
        assert_ne!(a.mask, Some(mask));
    }

    #[test]
    fn validation_rejects_bad_new_values() {
        let mut cfg = AugmentConfig::robust();
        cfg.elastic.grid = 1;
        assert!(cfg.validate().is_err());
        let mut cfg = AugmentConfig::robust();
        cfg.low_res.min = 0.5;
        assert!(cfg.validate().is_err());
        let mut cfg = AugmentConfig::robust();
        cfg.affine.max_rotation_deg = 200.0;
        assert!(cfg.validate().is_err());
        let mut cfg = AugmentConfig::robust();
        cfg.blur.p = -0.1;
        assert!(cfg.validate().is_err());
    }
}
