//! The training loop on a tiny network and synthetic slices: determinism,
//! exact resume (after whole epochs and after an interruption), the run
//! folder's files, a non-finite loss.

#![allow(clippy::unwrap_used)]

use std::sync::atomic::{AtomicBool, Ordering};

use candle_core::Device;
use cmr_data::{AugmentConfig, Plane, Sample, Size, Splits, ValSource};
use cmr_models::{ModelConfig, UNetConfig};
use cmr_train::{
    Checkpoint, ConfigChanges, EpochRecord, Observer, OptimConfig, Outcome, Quiet, RunDir, Schedule, TrainConfig,
    TrainState, Trainer, save_tensors, varmap_tensors,
};

/// A disc of class 3 in a ring of class 2 with a box of class 1, moved per id.
fn sample(i: usize) -> Sample {
    let n = 32;
    let (cy, cx) = (12.0 + (i % 5) as f64, 14.0 + (i % 3) as f64);
    let mask = Plane::from_fn(n, n, |y, x| {
        let r2 = (y as f64 - cy).powi(2) + (x as f64 - cx).powi(2);
        if r2 < 16.0 {
            3
        } else if r2 < 36.0 {
            2
        } else if (20..26).contains(&y) && (4..10).contains(&x) {
            1
        } else {
            0
        }
    });
    let image = mask.map(|c| 30 + 50 * c + (i as u8 % 7));
    Sample {
        id: format!("s{i}"),
        image,
        mask: Some(mask),
        original: Size { height: n, width: n },
        path: format!("s{i}.png").into(),
    }
}

fn splits() -> Splits {
    Splits {
        train: (0..10).map(sample).collect(),
        val: (10..13).map(sample).collect(),
        source: ValSource::Folder,
    }
}

fn config(epochs: usize) -> TrainConfig {
    TrainConfig {
        model: ModelConfig::UNet(UNetConfig {
            in_channels: 1,
            num_classes: 4,
            filters: vec![4, 8, 8, 8],
        }),
        data: cmr_train::DataConfig {
            size: 32,
            augment: AugmentConfig::strong(),
            ..Default::default()
        },
        loss: cmr_loss::Loss::dice_ce(1.0, 1.0),
        optim: OptimConfig::adam(5e-3),
        schedule: Schedule::Cosine {
            warmup_epochs: 1,
            min_lr: 1e-4,
        },
        epochs,
        batch_size: 4,
        seed: 11,
        device: cmr_train::DeviceSpec::Cpu,
        val_every: 1,
        early_stopping: None,
        keep: cmr_train::Keep::Best,
        kernels: Default::default(),
        ema: None,
    }
}

/// Tensors by name, flattened, in name order (comparable with `assert_eq!`).
fn tensors_sorted(map: std::collections::HashMap<String, candle_core::Tensor>) -> Vec<(String, Vec<f32>)> {
    let mut w: Vec<(String, Vec<f32>)> = map
        .into_iter()
        .map(|(k, v)| (k, v.flatten_all().unwrap().to_vec1::<f32>().unwrap()))
        .collect();
    w.sort_by(|a, b| a.0.cmp(&b.0));
    w
}

/// The live weights.
fn weights(t: &Trainer) -> Vec<(String, Vec<f32>)> {
    tensors_sorted(varmap_tensors(t.varmap()))
}

fn train(dir: &std::path::Path, epochs: usize) -> Trainer {
    let mut t = Trainer::create(config(epochs), dir, Device::Cpu).unwrap();
    let out = t.fit(&splits(), &mut Quiet, &AtomicBool::new(false)).unwrap();
    assert!(matches!(out, Outcome::Finished { .. }), "{out:?}");
    t
}

#[test]
fn same_seed_same_weights_and_the_run_folder_is_complete() {
    let dir = tempfile::tempdir().unwrap();
    let a = train(&dir.path().join("a"), 2);
    let b = train(&dir.path().join("b"), 2);
    assert_eq!(weights(&a), weights(&b));
    let run = a.run();
    for f in [
        RunDir::CONFIG,
        RunDir::BEST,
        RunDir::CHECKPOINT,
        RunDir::STATE,
        RunDir::METRICS,
        RunDir::CURVES,
    ] {
        assert!(run.file(f).is_file(), "{f}");
    }
    // the checkpoint is one file; the old three-file layout is gone
    for old in [RunDir::LAST, RunDir::OPTIMIZER] {
        assert!(!run.file(old).exists(), "{old}");
    }
    // state.json is a readable copy of the checkpoint's progress
    let copy: TrainState = serde_json::from_str(&std::fs::read_to_string(run.file(RunDir::STATE)).unwrap()).unwrap();
    assert_eq!(run.read_state().unwrap(), Some(copy));
    let csv = std::fs::read_to_string(run.file(RunDir::METRICS)).unwrap();
    assert_eq!(csv.lines().count(), 3, "{csv}");
    assert!(a.state().finished && a.state().epochs_done == 2);
    assert!(a.state().best.is_some());
    // a different seed trains differently
    let mut c = config(2);
    c.seed = 12;
    let mut t = Trainer::create(c, &dir.path().join("c"), Device::Cpu).unwrap();
    t.fit(&splits(), &mut Quiet, &AtomicBool::new(false)).unwrap();
    assert_ne!(weights(&t), weights(&a));
}

#[test]
fn learning_happens() {
    let dir = tempfile::tempdir().unwrap();
    let mut c = config(8);
    c.data.augment = AugmentConfig::none();
    let mut t = Trainer::create(c, dir.path(), Device::Cpu).unwrap();
    t.fit(&splits(), &mut Quiet, &AtomicBool::new(false)).unwrap();
    let r = t.records();
    assert!(
        r[7].train_loss < r[0].train_loss * 0.85,
        "{:?}",
        r.iter().map(|r| r.train_loss).collect::<Vec<_>>()
    );
}

#[test]
fn resume_after_an_epoch_is_exact() {
    let dir = tempfile::tempdir().unwrap();
    let straight = train(&dir.path().join("straight"), 2);
    let path = dir.path().join("resumed");
    let first = train(&path, 1);
    drop(first);
    let mut t = Trainer::resume(&path, Device::Cpu, &ConfigChanges::epochs(Some(2))).unwrap();
    t.fit(&splits(), &mut Quiet, &AtomicBool::new(false)).unwrap();
    assert_eq!(weights(&t), weights(&straight));
    let a: Vec<f64> = straight.records().iter().map(|r| r.train_loss).collect();
    let b: Vec<f64> = t.records().iter().map(|r| r.train_loss).collect();
    assert_eq!(a, b);
}

/// Raises the stop flag after the first batch, like Ctrl-C.
struct StopAfterOne<'a>(&'a AtomicBool);

impl Observer for StopAfterOne<'_> {
    fn batch_end(&mut self, _batch: usize, _loss: f64) {
        self.0.store(true, Ordering::SeqCst);
    }
    fn epoch_end(&mut self, _r: &EpochRecord, _i: bool) {}
}

#[test]
fn an_interrupted_epoch_resumes_exactly() {
    let dir = tempfile::tempdir().unwrap();
    let straight = train(&dir.path().join("straight"), 2);
    let path = dir.path().join("interrupted");
    let mut t = Trainer::create(config(2), &path, Device::Cpu).unwrap();
    let stop = AtomicBool::new(false);
    let out = t.fit(&splits(), &mut StopAfterOne(&stop), &stop).unwrap();
    assert_eq!(
        out,
        Outcome::Interrupted {
            epoch: 1,
            batches_done: 1
        }
    );
    drop(t);
    let mut t = Trainer::resume(&path, Device::Cpu, &ConfigChanges::default()).unwrap();
    assert_eq!(t.state().batches_done, 1);
    t.fit(&splits(), &mut Quiet, &AtomicBool::new(false)).unwrap();
    assert_eq!(weights(&t), weights(&straight));
}

#[test]
fn an_existing_run_is_not_overwritten_and_resume_needs_a_run() {
    let dir = tempfile::tempdir().unwrap();
    let _ = train(dir.path(), 1);
    assert!(Trainer::create(config(1), dir.path(), Device::Cpu).is_err());
    let empty = tempfile::tempdir().unwrap();
    let err = Trainer::resume(empty.path(), Device::Cpu, &ConfigChanges::default())
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("not a run folder"), "{err}");
}

#[test]
fn a_non_finite_loss_stops_with_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let mut c = config(2);
    c.optim = OptimConfig::Sgd {
        lr: 1e38,
        momentum: 0.0,
        nesterov: false,
        weight_decay: 0.0,
    };
    c.schedule = Schedule::Constant;
    let mut t = Trainer::create(c, dir.path(), Device::Cpu).unwrap();
    let err = t.fit(&splits(), &mut Quiet, &AtomicBool::new(false)).err().unwrap();
    assert!(matches!(err, cmr_train::TrainError::NonFinite { .. }), "{err}");
    assert!(err.to_string().contains("last good checkpoint"));
}

#[test]
fn a_diverging_run_stops_though_its_loss_stays_finite() {
    let dir = tempfile::tempdir().unwrap();
    let mut c = config(3);
    c.optim = OptimConfig::adam(1e9);
    c.schedule = Schedule::Constant;
    let mut t = Trainer::create(c, dir.path(), Device::Cpu).unwrap();
    let err = t.fit(&splits(), &mut Quiet, &AtomicBool::new(false)).err().unwrap();
    // caught while still finite (a NaN guard alone would train on)
    assert!(
        matches!(err, cmr_train::TrainError::NonFinite { value, .. } if value.is_finite()),
        "{err}"
    );
    assert!(err.to_string().contains("diverged"), "{err}");
}

#[test]
fn a_resume_on_other_data_is_refused_unless_allowed() {
    let dir = tempfile::tempdir().unwrap();
    let first = train(dir.path(), 1);
    assert!(first.run().file(RunDir::SPLITS).is_file());
    drop(first);
    let mut other = splits();
    other.val = (13..16).map(sample).collect();
    let mut t = Trainer::resume(dir.path(), Device::Cpu, &ConfigChanges::epochs(Some(2))).unwrap();
    let err = t
        .fit(&other, &mut Quiet, &AtomicBool::new(false))
        .err()
        .unwrap()
        .to_string();
    assert!(
        err.contains("other data") && err.contains("0 training and 3 validation ids of the record"),
        "{err}"
    );
    drop(t);
    // the same data resumes; other data when allowed, forgetting the best score
    let mut t = Trainer::resume(dir.path(), Device::Cpu, &ConfigChanges::epochs(Some(2))).unwrap();
    assert!(t.state().best.is_some());
    t.set_other_data(cmr_train::OtherData::Allow);
    t.fit(&other, &mut Quiet, &AtomicBool::new(false)).unwrap();
    assert_eq!(t.state().best.as_ref().map(|b| b.epoch), Some(2));
    let record = cmr_data::SplitRecord::read(&t.run().file(RunDir::SPLITS))
        .unwrap()
        .unwrap();
    assert_eq!(record.val, vec!["s13", "s14", "s15"]);
}

#[test]
fn a_run_stopped_before_its_first_checkpoint_resumes_from_the_start() {
    let dir = tempfile::tempdir().unwrap();
    let straight = train(&dir.path().join("straight"), 2);
    // killed during epoch 1: config.json, and a temporary file of a write
    let path = dir.path().join("killed");
    drop(Trainer::create(config(2), &path, Device::Cpu).unwrap());
    let stale = path.join(".checkpoint.safetensors.4000000.0.tmp");
    std::fs::write(&stale, b"half a checkpoint").unwrap();
    assert_eq!(RunDir::at(&path).read_state().unwrap(), None);
    let mut t = Trainer::resume(&path, Device::Cpu, &ConfigChanges::default()).unwrap();
    assert!(!stale.exists(), "the killed write's temporary file is removed");
    assert_eq!(t.state().epochs_done, 0);
    t.fit(&splits(), &mut Quiet, &AtomicBool::new(false)).unwrap();
    assert_eq!(weights(&t), weights(&straight));
}

#[test]
fn one_writer_per_run() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("run");
    let first = train(&path, 1);
    // while `first` holds the run, neither a resume nor a new run may write it
    let err = Trainer::resume(&path, Device::Cpu, &ConfigChanges::epochs(Some(2)))
        .err()
        .unwrap()
        .to_string();
    assert!(
        err.contains("in use by another process") && err.contains("pid"),
        "{err}"
    );
    assert!(Trainer::create(config(1), &path, Device::Cpu).is_err());
    drop(first);
    let t = Trainer::resume(&path, Device::Cpu, &ConfigChanges::epochs(Some(2))).unwrap();
    assert_eq!(t.state().epochs_done, 1);
}

#[test]
fn metrics_rows_past_the_checkpoint_are_trimmed_on_resume() {
    let dir = tempfile::tempdir().unwrap();
    let straight = train(&dir.path().join("straight"), 3);
    let path = dir.path().join("run");
    drop(train(&path, 2));
    // as if killed after epoch 2's metrics row was written but before its
    // checkpoint: the checkpoint of epoch 1 with the rows of epochs 1 and 2
    let dir1 = dir.path().join("one");
    let one = train(&dir1, 1);
    std::fs::copy(one.run().file(RunDir::CHECKPOINT), path.join(RunDir::CHECKPOINT)).unwrap();
    drop(one);
    let mut t = Trainer::resume(&path, Device::Cpu, &ConfigChanges::epochs(Some(3))).unwrap();
    assert_eq!(t.state().epochs_done, 1);
    let csv = std::fs::read_to_string(path.join(RunDir::METRICS)).unwrap();
    assert_eq!(csv.lines().count(), 2, "{csv}");
    t.fit(&splits(), &mut Quiet, &AtomicBool::new(false)).unwrap();
    assert_eq!(weights(&t), weights(&straight));
    let a: Vec<f64> = straight.records().iter().map(|r| r.train_loss).collect();
    let b: Vec<f64> = t.records().iter().map(|r| r.train_loss).collect();
    assert_eq!(a, b);
}

#[test]
fn a_run_in_the_old_three_file_layout_resumes_exactly() {
    let dir = tempfile::tempdir().unwrap();
    let straight = train(&dir.path().join("straight"), 2);
    let path = dir.path().join("old");
    drop(train(&path, 1));
    // rewrite its checkpoint as runs before checkpoint.safetensors kept it
    let ckpt = Checkpoint::load(&path.join(RunDir::CHECKPOINT), &Device::Cpu).unwrap();
    save_tensors(&path.join(RunDir::LAST), &ckpt.weights, Some(ckpt.steps)).unwrap();
    save_tensors(&path.join(RunDir::OPTIMIZER), &ckpt.optimizer, Some(ckpt.steps)).unwrap();
    std::fs::write(path.join(RunDir::STATE), &ckpt.state).unwrap();
    std::fs::remove_file(path.join(RunDir::CHECKPOINT)).unwrap();
    assert_eq!(RunDir::at(&path).read_state().unwrap().unwrap().epochs_done, 1);

    let mut t = Trainer::resume(&path, Device::Cpu, &ConfigChanges::epochs(Some(2))).unwrap();
    t.fit(&splits(), &mut Quiet, &AtomicBool::new(false)).unwrap();
    assert_eq!(weights(&t), weights(&straight));
    assert!(path.join(RunDir::CHECKPOINT).is_file());
    assert!(!path.join(RunDir::LAST).exists() && !path.join(RunDir::OPTIMIZER).exists());
}

#[test]
fn an_old_layout_saved_half_way_is_an_error_naming_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("old");
    drop(train(&path, 1));
    let ckpt = Checkpoint::load(&path.join(RunDir::CHECKPOINT), &Device::Cpu).unwrap();
    save_tensors(&path.join(RunDir::LAST), &ckpt.weights, Some(ckpt.steps + 3)).unwrap();
    save_tensors(&path.join(RunDir::OPTIMIZER), &ckpt.optimizer, Some(ckpt.steps)).unwrap();
    std::fs::write(path.join(RunDir::STATE), &ckpt.state).unwrap();
    std::fs::remove_file(path.join(RunDir::CHECKPOINT)).unwrap();
    let err = Trainer::resume(&path, Device::Cpu, &ConfigChanges::default())
        .err()
        .unwrap()
        .to_string();
    assert!(
        err.contains("last.safetensors") && err.contains("saved after step"),
        "{err}"
    );
    assert!(!err.contains("Some("), "{err}");
}

#[test]
fn a_truncated_checkpoint_is_an_error_naming_it() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("run");
    drop(train(&path, 1));
    let file = path.join(RunDir::CHECKPOINT);
    let bytes = std::fs::read(&file).unwrap();
    std::fs::write(&file, &bytes[..bytes.len() / 2]).unwrap();
    let err = Trainer::resume(&path, Device::Cpu, &ConfigChanges::default())
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("checkpoint.safetensors"), "{err}");
}

fn with_ema(epochs: usize, decay: f64) -> TrainConfig {
    TrainConfig {
        ema: Some(cmr_train::EmaConfig { decay }),
        ..config(epochs)
    }
}

#[test]
fn the_moving_average_over_two_steps_is_by_hand_and_is_the_kept_model() {
    let dir = tempfile::tempdir().unwrap();
    // one batch of the ten training slices: one optimiser step an epoch
    let mut c = with_ema(1, 0.25);
    c.batch_size = 10;
    c.keep = cmr_train::Keep::Last;
    let mut t = Trainer::create(c, dir.path(), Device::Cpu).unwrap();
    let w0 = weights(&t);
    t.fit(&splits(), &mut Quiet, &AtomicBool::new(false)).unwrap();
    // after the first step the normalised average is that step's weights
    let w1 = weights(&t);
    assert_ne!(w1, w0);
    assert_eq!(tensors_sorted(varmap_tensors(t.kept_varmap())), w1);
    drop(t);
    let mut t = Trainer::resume(dir.path(), Device::Cpu, &ConfigChanges::epochs(Some(2))).unwrap();
    t.fit(&splits(), &mut Quiet, &AtomicBool::new(false)).unwrap();
    assert_eq!(t.state().optimizer_steps, 2);
    // (0.25·w1 + w2) / 1.25 = 0.2·w1 + 0.8·w2
    let w2 = weights(&t);
    let kept = tensors_sorted(varmap_tensors(t.kept_varmap()));
    let mut moved = 0;
    for (((name, a), (_, b)), (_, avg)) in w1.iter().zip(&w2).zip(&kept) {
        for ((a, b), e) in a.iter().zip(b).zip(avg) {
            let want = 0.2 * a + 0.8 * b;
            assert!((e - want).abs() <= 1e-6 * (1.0 + want.abs()), "{name}: {e} vs {want}");
            moved += usize::from(a != b);
        }
    }
    assert!(
        moved > 100,
        "the step changed {moved} values: the hand case would test nothing"
    );
    // model.safetensors (the last) is the average, not the live weights
    let (saved, _) = cmr_train::load_tensors(&t.run().file(RunDir::BEST), &Device::Cpu).unwrap();
    assert_eq!(tensors_sorted(saved), kept);
    assert_ne!(kept, w2);
}

#[test]
fn a_run_with_a_moving_average_resumes_exactly() {
    let dir = tempfile::tempdir().unwrap();
    let mut straight = Trainer::create(with_ema(2, 0.9), &dir.path().join("straight"), Device::Cpu).unwrap();
    straight.fit(&splits(), &mut Quiet, &AtomicBool::new(false)).unwrap();
    let path = dir.path().join("interrupted");
    let mut t = Trainer::create(with_ema(2, 0.9), &path, Device::Cpu).unwrap();
    let stop = AtomicBool::new(false);
    let out = t.fit(&splits(), &mut StopAfterOne(&stop), &stop).unwrap();
    assert!(matches!(out, Outcome::Interrupted { .. }), "{out:?}");
    drop(t);
    let mut t = Trainer::resume(&path, Device::Cpu, &ConfigChanges::default()).unwrap();
    t.fit(&splits(), &mut Quiet, &AtomicBool::new(false)).unwrap();
    assert_eq!(weights(&t), weights(&straight));
    let kept = tensors_sorted(varmap_tensors(t.kept_varmap()));
    assert_eq!(kept, tensors_sorted(varmap_tensors(straight.kept_varmap())));
    assert_ne!(kept, weights(&t));
    // validation scored the average: the records agree as well
    let a: Vec<Option<f64>> = straight.records().iter().map(|r| r.val_mean_dice).collect();
    let b: Vec<Option<f64>> = t.records().iter().map(|r| r.val_mean_dice).collect();
    assert_eq!(a, b);
}

#[test]
fn a_decay_outside_zero_to_one_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    for decay in [0.0, 1.0, -0.5, f64::NAN] {
        let err = Trainer::create(with_ema(1, decay), &dir.path().join("x"), Device::Cpu)
            .err()
            .unwrap()
            .to_string();
        assert!(err.contains("ema.decay"), "{err}");
    }
}

#[test]
fn a_checkpoint_whose_average_does_not_match_the_recipe_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    // config.json edited by hand after training: the checkpoint no longer fits
    let rewrite = |path: &std::path::Path, ema: Option<f64>| {
        let file = path.join(RunDir::CONFIG);
        let mut c: TrainConfig = serde_json::from_str(&std::fs::read_to_string(&file).unwrap()).unwrap();
        c.ema = ema.map(|decay| cmr_train::EmaConfig { decay });
        std::fs::write(&file, c.to_json()).unwrap();
    };
    let averaged = dir.path().join("averaged");
    let mut t = Trainer::create(with_ema(1, 0.9), &averaged, Device::Cpu).unwrap();
    t.fit(&splits(), &mut Quiet, &AtomicBool::new(false)).unwrap();
    drop(t);
    rewrite(&averaged, None);
    let err = Trainer::resume(&averaged, Device::Cpu, &ConfigChanges::epochs(Some(2)))
        .err()
        .unwrap()
        .to_string();
    assert!(
        err.contains("checkpoint.safetensors") && err.contains("holds averaged weights"),
        "{err}"
    );
    let plain = dir.path().join("plain");
    drop(train(&plain, 1));
    rewrite(&plain, Some(0.9));
    let err = Trainer::resume(&plain, Device::Cpu, &ConfigChanges::epochs(Some(2)))
        .err()
        .unwrap()
        .to_string();
    assert!(
        err.contains("checkpoint.safetensors") && err.contains("holds no average"),
        "{err}"
    );
}
