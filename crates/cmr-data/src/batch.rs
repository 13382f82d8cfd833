//! Batching samples into candle tensors, shuffled and augmented per epoch.

use candle_core::{Device, Tensor};
use rand::seq::SliceRandom;

use crate::augment::AugmentConfig;
use crate::dataset::Sample;
use crate::error::{DataError, Result};
use crate::normalize::{Normalization, to_unit};
use crate::rng::{purpose, stream};

/// A batch on a device: `images` `[B, 1, H, W]` f32, `masks` `[B, H, W]` u32
/// (when the samples are labelled), and the sample ids in batch order.
#[derive(Clone, Debug)]
pub struct Batch {
    pub images: Tensor,
    pub masks: Option<Tensor>,
    pub ids: Vec<String>,
}

impl Batch {
    /// The masks; an error for a batch of unlabelled samples.
    pub fn masks(&self) -> Result<&Tensor> {
        self.masks
            .as_ref()
            .ok_or_else(|| DataError::Config(format!("batch {:?} has no masks", self.ids)))
    }

    pub fn len(&self) -> usize {
        self.ids.len()
    }

    pub fn is_empty(&self) -> bool {
        self.ids.is_empty()
    }
}

/// How an epoch's batches are made.
#[derive(Clone, Debug)]
pub struct BatchPlan {
    pub batch_size: usize,
    /// Shuffle the order per epoch (training) or keep it (evaluation).
    pub shuffle: bool,
    /// Augmentation, if any.
    pub augment: Option<AugmentConfig>,
    pub normalization: Normalization,
    pub seed: u64,
}

impl BatchPlan {
    /// Evaluation order: no shuffling, no augmentation.
    pub fn eval(batch_size: usize, normalization: Normalization) -> Self {
        Self {
            batch_size,
            shuffle: false,
            augment: None,
            normalization,
            seed: 0,
        }
    }

    /// The sample order of `epoch` over `n` samples.
    pub fn order(&self, n: usize, epoch: u64) -> Vec<usize> {
        let mut order: Vec<usize> = (0..n).collect();
        if self.shuffle {
            order.shuffle(&mut stream(self.seed, &[purpose::SHUFFLE, epoch]));
        }
        order
    }

    /// Number of batches per epoch over `n` samples (the last partial batch
    /// counts).
    pub fn num_batches(&self, n: usize) -> usize {
        n.div_ceil(self.batch_size.max(1))
    }

    /// The batches of `epoch`, built lazily; the last partial batch is kept.
    pub fn batches<'a>(
        &'a self,
        samples: &'a [Sample],
        epoch: u64,
        device: &'a Device,
    ) -> Result<impl Iterator<Item = Result<Batch>> + 'a> {
        self.batches_from(samples, epoch, 0, device)
    }

    /// The batches of `epoch` from batch index `first` on (the earlier ones
    /// are not built): how an interrupted epoch continues.
    pub fn batches_from<'a>(
        &'a self,
        samples: &'a [Sample],
        epoch: u64,
        first: usize,
        device: &'a Device,
    ) -> Result<impl Iterator<Item = Result<Batch>> + 'a> {
        if self.batch_size == 0 {
            return Err(DataError::Config("batch size must be at least 1".into()));
        }
        let order = self.order(samples.len(), epoch);
        let chunks: Vec<Vec<usize>> = order
            .chunks(self.batch_size)
            .skip(first)
            .map(<[usize]>::to_vec)
            .collect();
        Ok(chunks.into_iter().map(move |idx| {
            let chosen: Vec<&Sample> = idx.iter().map(|&i| &samples[i]).collect();
            self.make_batch(&chosen, epoch, device)
        }))
    }

    /// One batch from `samples`, augmented for `epoch` when the plan says so.
    /// All samples must have the same size (they do once fitted at load).
    pub fn make_batch(&self, samples: &[&Sample], epoch: u64, device: &Device) -> Result<Batch> {
        let Some(first) = samples.first() else {
            return Err(DataError::Config("cannot make an empty batch".into()));
        };
        let size = first.image.size();
        let labelled = samples.iter().all(|s| s.mask.is_some());
        let (h, w) = (size.height, size.width);
        let mut images = Vec::with_capacity(samples.len() * h * w);
        let mut masks = Vec::with_capacity(if labelled { samples.len() * h * w } else { 0 });
        for s in samples {
            if s.image.size() != size {
                return Err(DataError::SizeMismatch {
                    image: first.path.clone(),
                    mask: s.path.clone(),
                    image_size: (w, h),
                    mask_size: (s.image.width(), s.image.height()),
                });
            }
            let unit = to_unit(&s.image);
            let mask = if labelled { s.mask.clone() } else { None };
            let (mut image, mask) = match &self.augment {
                Some(aug) => aug.apply(unit, mask, self.seed, epoch, &s.id),
                None => (unit, mask),
            };
            self.normalization.apply(&mut image);
            images.extend_from_slice(image.data());
            if let Some(m) = mask {
                masks.extend(m.data().iter().map(|&c| u32::from(c)));
            }
        }
        let b = samples.len();
        let images = Tensor::from_vec(images, (b, 1, h, w), device)?;
        let masks = if labelled {
            Some(Tensor::from_vec(masks, (b, h, w), device)?)
        } else {
            None
        };
        Ok(Batch {
            images,
            masks,
            ids: samples.iter().map(|s| s.id.clone()).collect(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::plane::{Plane, Size};

    fn samples(n: usize) -> Vec<Sample> {
        (0..n)
            .map(|i| Sample {
                id: format!("cmr{i}"),
                image: Plane::from_fn(6, 6, |y, x| (i * 7 + y * 6 + x) as u8),
                mask: Some(Plane::from_fn(6, 6, |y, x| ((i + y + x) % 4) as u8)),
                original: Size { height: 6, width: 6 },
                path: format!("cmr{i}.png").into(),
            })
            .collect()
    }

    fn plan(seed: u64) -> BatchPlan {
        BatchPlan {
            batch_size: 4,
            shuffle: true,
            augment: Some(AugmentConfig::strong()),
            normalization: Normalization::UnitRange,
            seed,
        }
    }

    fn collect(plan: &BatchPlan, s: &[Sample], epoch: u64) -> Vec<(Vec<String>, Vec<f32>, Vec<u32>)> {
        plan.batches(s, epoch, &Device::Cpu)
            .unwrap()
            .map(|b| {
                let b = b.unwrap();
                let img = b.images.flatten_all().unwrap().to_vec1::<f32>().unwrap();
                let m = b.masks.unwrap().flatten_all().unwrap().to_vec1::<u32>().unwrap();
                (b.ids, img, m)
            })
            .collect()
    }

    #[test]
    fn shapes_and_the_last_partial_batch() {
        let s = samples(10);
        let p = plan(1);
        let batches: Vec<Batch> = p.batches(&s, 0, &Device::Cpu).unwrap().map(|b| b.unwrap()).collect();
        assert_eq!(batches.len(), 3);
        assert_eq!(p.num_batches(10), 3);
        assert_eq!(batches[0].images.dims(), &[4, 1, 6, 6]);
        assert_eq!(batches[0].masks().unwrap().dims(), &[4, 6, 6]);
        assert_eq!(batches[2].images.dims(), &[2, 1, 6, 6]);
        let mut all: Vec<String> = batches.iter().flat_map(|b| b.ids.clone()).collect();
        all.sort();
        assert_eq!(all.len(), 10);
        all.dedup();
        assert_eq!(all.len(), 10);
    }

    #[test]
    fn same_seed_same_batches_other_seed_or_epoch_other_batches() {
        let s = samples(10);
        let a = collect(&plan(7), &s, 3);
        assert_eq!(a, collect(&plan(7), &s, 3));
        assert_ne!(a, collect(&plan(8), &s, 3));
        assert_ne!(a, collect(&plan(7), &s, 4));
    }

    #[test]
    fn batches_from_skips_without_changing_the_rest() {
        let s = samples(10);
        let all = collect(&plan(3), &s, 2);
        let p = plan(3);
        let tail: Vec<Vec<String>> = p
            .batches_from(&s, 2, 1, &Device::Cpu)
            .unwrap()
            .map(|b| b.unwrap().ids)
            .collect();
        assert_eq!(tail, all[1..].iter().map(|b| b.0.clone()).collect::<Vec<_>>());
    }

    #[test]
    fn eval_plan_keeps_order_and_pixels() {
        let s = samples(5);
        let p = BatchPlan::eval(2, Normalization::UnitRange);
        let b = collect(&p, &s, 9);
        assert_eq!(b[0].0, vec!["cmr0", "cmr1"]);
        assert_eq!(b[0].1[1], 1.0 / 255.0);
        assert_eq!(b[0].2[..3], [0, 1, 2]);
    }

    #[test]
    fn unlabelled_samples_batch_without_masks() {
        let mut s = samples(3);
        for x in &mut s {
            x.mask = None;
        }
        let p = BatchPlan::eval(8, Normalization::UnitRange);
        let b = p.batches(&s, 0, &Device::Cpu).unwrap().next().unwrap().unwrap();
        assert!(b.masks.is_none());
        assert!(b.masks().is_err());
        assert!(
            BatchPlan::eval(0, Normalization::UnitRange)
                .batches(&s, 0, &Device::Cpu)
                .is_err()
        );
    }
}
