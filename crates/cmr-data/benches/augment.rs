//! The cost of augmentation per 96×96 sample, recipe by recipe, and of one
//! augmented batch of 8 (augment, normalise, to a tensor): one thread, the
//! median of 15 rounds of 200 samples after a warm-up. Set against a training
//! step (BENCHMARKS.md) this says whether augmentation can dominate an epoch.
//!
//! `cargo bench -p cmr-data --bench augment`

#![allow(clippy::print_stdout, clippy::unwrap_used)]

use std::time::Instant;

use candle_core::Device;
use cmr_data::{AugmentConfig, BatchPlan, Normalization, Plane, Sample, Size, to_unit};

/// A 96×96 slice-like sample: a ring, a disc and a crescent on a noisy field.
fn sample(i: usize) -> Sample {
    let n = 96;
    let mask = Plane::from_fn(n, n, |y, x| {
        let r2 = (y as f64 - 48.0).powi(2) + (x as f64 - 44.0).powi(2);
        if r2 < 150.0 {
            3
        } else if r2 < 320.0 {
            2
        } else if (y as f64 - 46.0).powi(2) + (x as f64 - 66.0).powi(2) < 200.0 {
            1
        } else {
            0
        }
    });
    let image = Plane::from_fn(n, n, |y, x| {
        (40 + 50 * u32::from(mask.get(y, x)) + ((y * 31 + x * 17 + i) % 23) as u32) as u8
    });
    Sample {
        id: format!("cmr{}", i + 1),
        image,
        mask: Some(mask),
        original: Size { height: n, width: n },
        path: format!("cmr{}.png", i + 1).into(),
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() {
    let samples: Vec<Sample> = (0..200).map(sample).collect();
    println!("{:<16} {:>14} {:>16}", "recipe", "µs / sample", "ms / batch of 8");
    for (name, cfg) in [
        ("none", AugmentConfig::none()),
        ("report", AugmentConfig::report()),
        ("strong", AugmentConfig::strong()),
        ("robust", AugmentConfig::robust()),
        ("deformed_test", AugmentConfig::deformed_test()),
    ] {
        let mut per_sample = Vec::new();
        for round in 0..16u64 {
            let t = Instant::now();
            for s in &samples {
                let out = cfg.apply(to_unit(&s.image), s.mask.clone(), 42, round, &s.id);
                std::hint::black_box(out);
            }
            if round > 0 {
                per_sample.push(t.elapsed().as_secs_f64() * 1e6 / samples.len() as f64);
            }
        }
        let plan = BatchPlan {
            batch_size: 8,
            shuffle: true,
            augment: cfg.is_active().then_some(cfg),
            normalization: Normalization::UnitRange,
            seed: 42,
        };
        let refs: Vec<&Sample> = samples[..8].iter().collect();
        let mut per_batch = Vec::new();
        for round in 0..16u64 {
            let t = Instant::now();
            std::hint::black_box(plan.make_batch(&refs, round, &Device::Cpu).unwrap());
            if round > 0 {
                per_batch.push(t.elapsed().as_secs_f64() * 1e3);
            }
        }
        println!("{name:<16} {:>14.1} {:>16.2}", median(per_sample), median(per_batch));
    }
}
