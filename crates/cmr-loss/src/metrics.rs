//! Hard metrics on label masks: Dice, IoU, HD95 and the noise number, per
//! image and foreground class, accumulated over a whole split.
//!
//! Definitions (the competition's and the report's):
//! - Dice of class c: `2|P∩G| / (|P| + |G|)`, and 1 when both are empty.
//! - IoU: `|P∩G| / |P∪G|`, and 1 when both are empty.
//! - HD95: the 95th percentile (linear interpolation, as numpy's default) of
//!   the distances, in pixels, from each boundary pixel of P to the nearest
//!   boundary pixel of G and from each boundary pixel of G to the nearest of
//!   P, pooled (as medpy's `hd95`). A boundary pixel is a class pixel with a
//!   4-neighbour outside the class or on the image edge. Both empty: 0. One
//!   empty and the other not: the image diagonal, the largest distance
//!   possible, so a missed or hallucinated structure is penalised rather than
//!   skipped.
//! - Noise number: 8-connected components of the class in the prediction
//!   beyond the largest one.
//!
//! Means are over all images and classes with equal weight, as the
//! competition scores; nothing is averaged per batch.

use serde::Serialize;

use crate::components::extra_components;
use crate::error::{LossError, Result};

/// The definitions behind every column, as one text for `--help`, table
/// footers and JSON (`definitions`).
pub const DEFINITIONS: &str = "Dice, IoU: per image and class; 1 when prediction and truth are both empty.
HD95: 95th percentile of the boundary distances both ways, in pixels;
  0 when both are empty, the image diagonal when only one is.
noise: 8-connected components of the class in the prediction beyond the
  largest, per image; the noise number sums it over the classes.
Means: over images, and over the three classes with equal weight.";

/// Names of the foreground classes 1, 2, 3.
pub const CLASS_NAMES: [&str; 3] = ["RV", "Myo", "LV"];

/// A borrowed row-major label map.
#[derive(Clone, Copy, Debug)]
pub struct LabelMap<'a> {
    pub data: &'a [u8],
    pub height: usize,
    pub width: usize,
}

impl<'a> LabelMap<'a> {
    /// Wrap `data`; an error when its length is not `height · width`.
    pub fn new(data: &'a [u8], height: usize, width: usize) -> Result<Self> {
        if data.len() != height * width {
            return Err(LossError::Shape(format!(
                "{} labels for a {height}×{width} map",
                data.len()
            )));
        }
        Ok(Self { data, height, width })
    }
}

fn counts(pred: LabelMap, gt: LabelMap, class: u8) -> (usize, usize, usize) {
    let (mut p, mut g, mut both) = (0, 0, 0);
    for (&a, &b) in pred.data.iter().zip(gt.data) {
        let (ia, ib) = (a == class, b == class);
        p += usize::from(ia);
        g += usize::from(ib);
        both += usize::from(ia && ib);
    }
    (p, g, both)
}

/// Dice of `class`; 1 when the class is absent from both.
pub fn dice(pred: LabelMap, gt: LabelMap, class: u8) -> f64 {
    let (p, g, both) = counts(pred, gt, class);
    if p + g == 0 {
        1.0
    } else {
        2.0 * both as f64 / (p + g) as f64
    }
}

/// Intersection over union of `class`; 1 when the class is absent from both.
pub fn iou(pred: LabelMap, gt: LabelMap, class: u8) -> f64 {
    let (p, g, both) = counts(pred, gt, class);
    let union = p + g - both;
    if union == 0 { 1.0 } else { both as f64 / union as f64 }
}

fn boundary(map: LabelMap, class: u8) -> Vec<(i64, i64)> {
    let (h, w) = (map.height, map.width);
    let at = |y: isize, x: isize| {
        y >= 0 && x >= 0 && (y as usize) < h && (x as usize) < w && map.data[y as usize * w + x as usize] == class
    };
    let mut out = Vec::new();
    for y in 0..h as isize {
        for x in 0..w as isize {
            if at(y, x) && !(at(y - 1, x) && at(y + 1, x) && at(y, x - 1) && at(y, x + 1)) {
                out.push((y as i64, x as i64));
            }
        }
    }
    out
}

fn nearest(from: &[(i64, i64)], to: &[(i64, i64)]) -> Vec<f64> {
    from.iter()
        .map(|&(y, x)| {
            let d2 = to
                .iter()
                .map(|&(v, u)| (y - v).pow(2) + (x - u).pow(2))
                .min()
                .unwrap_or(0);
            (d2 as f64).sqrt()
        })
        .collect()
}

/// The `q`-th percentile (0..=100) with linear interpolation between order
/// statistics (numpy's default). `values` must not be empty.
pub fn percentile(values: &mut [f64], q: f64) -> f64 {
    values.sort_by(f64::total_cmp);
    let pos = q / 100.0 * (values.len() - 1) as f64;
    let lo = pos.floor() as usize;
    let hi = pos.ceil() as usize;
    values[lo] + (values[hi] - values[lo]) * (pos - lo as f64)
}

/// Symmetric 95th-percentile Hausdorff distance of `class` in pixels (see the
/// module doc for empty classes).
pub fn hd95(pred: LabelMap, gt: LabelMap, class: u8) -> f64 {
    let (bp, bg) = (boundary(pred, class), boundary(gt, class));
    match (bp.is_empty(), bg.is_empty()) {
        (true, true) => 0.0,
        (true, false) | (false, true) => ((pred.height.pow(2) + pred.width.pow(2)) as f64).sqrt(),
        (false, false) => {
            let mut d = nearest(&bp, &bg);
            d.extend(nearest(&bg, &bp));
            percentile(&mut d, 95.0)
        }
    }
}

/// Every metric of one image, per foreground class (index 0 is RV).
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct ImageMetrics {
    pub id: String,
    pub dice: [f64; 3],
    pub iou: [f64; 3],
    pub hd95: [f64; 3],
    pub noise: [usize; 3],
}

impl ImageMetrics {
    /// All metrics of `pred` against `gt`; an error when their sizes differ.
    pub fn compute(id: &str, pred: LabelMap, gt: LabelMap) -> Result<Self> {
        if (pred.height, pred.width) != (gt.height, gt.width) {
            return Err(LossError::Shape(format!(
                "{id}: prediction {}×{} against ground truth {}×{}",
                pred.height, pred.width, gt.height, gt.width
            )));
        }
        let per = |f: &dyn Fn(u8) -> f64| [f(1), f(2), f(3)];
        Ok(Self {
            id: id.to_string(),
            dice: per(&|c| dice(pred, gt, c)),
            iou: per(&|c| iou(pred, gt, c)),
            hd95: per(&|c| hd95(pred, gt, c)),
            noise: [1, 2, 3].map(|c| extra_components(pred.data, pred.height, pred.width, c)),
        })
    }

    /// Mean Dice over the three classes.
    pub fn mean_dice(&self) -> f64 {
        self.dice.iter().sum::<f64>() / 3.0
    }
}

/// Metrics of every image of a split, accumulated one image at a time.
#[derive(Clone, Debug, Default)]
pub struct MetricsAccumulator {
    images: Vec<ImageMetrics>,
}

impl MetricsAccumulator {
    pub fn new() -> Self {
        Self::default()
    }

    /// Add one image's prediction and ground truth.
    pub fn add(&mut self, id: &str, pred: LabelMap, gt: LabelMap) -> Result<&ImageMetrics> {
        self.images.push(ImageMetrics::compute(id, pred, gt)?);
        Ok(self.images.last().expect("just pushed"))
    }

    pub fn images(&self) -> &[ImageMetrics] {
        &self.images
    }

    /// Append the images of `other` (to pool folds into one out-of-fold score).
    pub fn extend(&mut self, other: &Self) {
        self.images.extend_from_slice(&other.images);
    }

    pub fn len(&self) -> usize {
        self.images.len()
    }

    pub fn is_empty(&self) -> bool {
        self.images.is_empty()
    }

    /// Per-class means and overall means over all images.
    pub fn report(&self) -> MetricsReport {
        let n = self.images.len().max(1) as f64;
        let mean = |f: &dyn Fn(&ImageMetrics) -> f64| self.images.iter().map(f).sum::<f64>() / n;
        let classes = (0..3)
            .map(|c| ClassMetrics {
                class: CLASS_NAMES[c].to_string(),
                dice: mean(&|m| m.dice[c]),
                iou: mean(&|m| m.iou[c]),
                hd95: mean(&|m| m.hd95[c]),
                noise: mean(&|m| m.noise[c] as f64),
            })
            .collect::<Vec<_>>();
        let avg = |f: &dyn Fn(&ClassMetrics) -> f64| classes.iter().map(f).sum::<f64>() / 3.0;
        MetricsReport {
            images: self.images.len(),
            mean_dice: avg(&|c| c.dice),
            mean_iou: avg(&|c| c.iou),
            mean_hd95: avg(&|c| c.hd95),
            noise_number: classes.iter().map(|c| c.noise).sum(),
            classes,
        }
    }
}

/// Means of one class over the images.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct ClassMetrics {
    pub class: String,
    pub dice: f64,
    pub iou: f64,
    pub hd95: f64,
    /// Mean extra components per image.
    pub noise: f64,
}

/// The summary of a split: per-class means and overall means. Prints as a
/// table; serialises to JSON with `mean_dice` and a `classes` list.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct MetricsReport {
    pub images: usize,
    /// Mean Dice over images and the three classes: the competition's score.
    pub mean_dice: f64,
    pub mean_iou: f64,
    pub mean_hd95: f64,
    /// Mean extra components per image, summed over the classes.
    pub noise_number: f64,
    pub classes: Vec<ClassMetrics>,
}

impl MetricsReport {
    /// Dice of a class by name (`RV`, `Myo`, `LV`).
    pub fn class_dice(&self, name: &str) -> Option<f64> {
        self.classes.iter().find(|c| c.class == name).map(|c| c.dice)
    }
}

impl std::fmt::Display for MetricsReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(
            f,
            "{:<6} {:>8} {:>8} {:>9} {:>8}",
            "class", "Dice", "IoU", "HD95 (px)", "noise"
        )?;
        for c in &self.classes {
            writeln!(
                f,
                "{:<6} {:>8.4} {:>8.4} {:>9.2} {:>8.2}",
                c.class, c.dice, c.iou, c.hd95, c.noise
            )?;
        }
        writeln!(
            f,
            "{:<6} {:>8.4} {:>8.4} {:>9.2} {:>8.2}   ({} image{})",
            "mean",
            self.mean_dice,
            self.mean_iou,
            self.mean_hd95,
            self.noise_number / 3.0,
            self.images,
            if self.images == 1 { "" } else { "s" }
        )?;
        write!(
            f,
            "noise number (the classes' noise summed) {:.2}\n{DEFINITIONS}",
            self.noise_number
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map(data: &[u8], h: usize, w: usize) -> LabelMap<'_> {
        LabelMap::new(data, h, w).unwrap()
    }

    #[test]
    fn dice_and_iou_of_two_2x2_masks() {
        let p = [1, 1, 0, 2];
        let g = [1, 0, 0, 2];
        let (p, g) = (map(&p, 2, 2), map(&g, 2, 2));
        assert_eq!(dice(p, g, 1), 2.0 / 3.0);
        assert_eq!(iou(p, g, 1), 0.5);
        assert_eq!(dice(p, g, 2), 1.0);
        // class 3 absent from both: 1 by definition
        assert_eq!(dice(p, g, 3), 1.0);
        assert_eq!(iou(p, g, 3), 1.0);
    }

    #[test]
    fn dice_when_one_side_is_empty_is_zero() {
        let p = [0, 0, 0, 0];
        let g = [3, 0, 0, 0];
        assert_eq!(dice(map(&p, 2, 2), map(&g, 2, 2), 3), 0.0);
        assert_eq!(iou(map(&p, 2, 2), map(&g, 2, 2), 3), 0.0);
    }

    #[test]
    fn percentile_interpolates_like_numpy() {
        // numpy.percentile([1, 2, 3, 4], 95) == 3.85
        assert!((percentile(&mut [4.0, 1.0, 3.0, 2.0], 95.0) - 3.85).abs() < 1e-12);
        assert_eq!(percentile(&mut [7.0], 95.0), 7.0);
    }

    #[test]
    fn hd95_by_hand() {
        // 5×5: gt is a single pixel at (2,2); pred is (2,2) and (2,4).
        let mut g = [0u8; 25];
        g[12] = 1;
        let mut p = g;
        p[14] = 1;
        // boundaries: pred {(2,2),(2,4)}, gt {(2,2)}
        // pred→gt: 0, 2; gt→pred: 0. Pooled [0, 0, 2]: 95th pct = 0 + 2·(0.9) = 1.8
        let d = hd95(map(&p, 5, 5), map(&g, 5, 5), 1);
        assert!((d - 1.8).abs() < 1e-12, "{d}");
        // identical masks: 0
        assert_eq!(hd95(map(&g, 5, 5), map(&g, 5, 5), 1), 0.0);
        // both empty: 0; one empty: the diagonal
        assert_eq!(hd95(map(&g, 5, 5), map(&g, 5, 5), 2), 0.0);
        let empty = [0u8; 25];
        assert!((hd95(map(&empty, 5, 5), map(&g, 5, 5), 1) - 50f64.sqrt()).abs() < 1e-12);
    }

    #[test]
    fn hd95_uses_boundaries_only() {
        // a filled 3×3 square in both, pred shifted right by one on a 3×5 map
        #[rustfmt::skip]
        let g = [1, 1, 1, 0, 0,
                 1, 1, 1, 0, 0,
                 1, 1, 1, 0, 0];
        #[rustfmt::skip]
        let p = [0, 1, 1, 1, 0,
                 0, 1, 1, 1, 0,
                 0, 1, 1, 1, 0];
        // Boundaries: all of each square but its centre, (1,1) in gt and (1,2) in pred.
        // pred→gt: (0,1),(0,2),(2,1),(2,2) → 0; (0,3),(1,1),(1,3),(2,3) → 1
        // gt→pred: (0,1),(0,2),(2,1),(2,2) → 0; (0,0),(1,0),(1,2),(2,0) → 1
        // Pooled: 8 zeros, 8 ones; pos = 0.95·15 = 14.25 falls among the ones.
        assert_eq!(hd95(map(&p, 3, 5), map(&g, 3, 5), 1), 1.0);
    }

    #[test]
    fn accumulator_means_over_images_and_classes() {
        let mut acc = MetricsAccumulator::new();
        let a = [1u8, 2, 3, 0];
        let b = [1u8, 1, 3, 0];
        acc.add("a", map(&a, 2, 2), map(&a, 2, 2)).unwrap(); // all 1
        let m = acc.add("b", map(&b, 2, 2), map(&a, 2, 2)).unwrap().clone();
        // image b: class 1: pred {0,1}, gt {0} → 2/3; class 2: pred {}, gt {1} → 0; class 3: 1
        assert_eq!(m.dice, [2.0 / 3.0, 0.0, 1.0]);
        let r = acc.report();
        assert_eq!(r.images, 2);
        assert!((r.classes[0].dice - (1.0 + 2.0 / 3.0) / 2.0).abs() < 1e-12);
        assert!((r.mean_dice - (3.0 + 2.0 / 3.0 + 1.0) / 6.0).abs() < 1e-12);
        assert_eq!(r.class_dice("Myo"), Some(0.5));
        let json = serde_json::to_value(&r).unwrap();
        assert!((json["mean_dice"].as_f64().unwrap() - r.mean_dice).abs() < 1e-15);
        assert_eq!(json["classes"][2]["class"], "LV");
        let table = r.to_string();
        assert!(table.contains("Myo") && table.contains("mean"), "{table}");
    }

    #[test]
    fn noise_counts_extra_components_of_the_prediction() {
        #[rustfmt::skip]
        let p = [1, 0, 1,
                 0, 0, 0,
                 2, 0, 1];
        let g = [0u8; 9];
        let m = ImageMetrics::compute("x", map(&p, 3, 3), map(&g, 3, 3)).unwrap();
        assert_eq!(m.noise, [2, 0, 0]);
    }

    #[test]
    fn mismatched_sizes_are_an_error() {
        let a = [0u8; 4];
        let b = [0u8; 6];
        assert!(ImageMetrics::compute("x", map(&a, 2, 2), map(&b, 2, 3)).is_err());
        assert!(LabelMap::new(&a, 3, 3).is_err());
    }

    #[test]
    fn the_table_names_its_units_and_its_noise_row_is_a_mean() {
        // RV predicted as two components (one extra), truth one component
        let p = [1, 0, 1, 0];
        let g = [1, 0, 0, 0];
        let mut acc = MetricsAccumulator::new();
        acc.add("a", map(&p, 1, 4), map(&g, 1, 4)).unwrap();
        let r = acc.report();
        assert_eq!(r.noise_number, 1.0);
        let text = r.to_string();
        assert!(text.contains("HD95 (px)"), "{text}");
        let mean_row = text.lines().find(|l| l.starts_with("mean")).unwrap();
        assert!(mean_row.contains(" 0.33 "), "{mean_row}");
        assert!(text.contains("noise number (the classes' noise summed) 1.00"), "{text}");
        assert!(text.contains("both empty"), "{text}");
        assert!(text.contains("(1 image)"), "{text}");
    }
}
