//! Cross-validation folders (training, interruption and exact resume in a
//! later fold, out-of-fold scores) and ensembles with test-time augmentation
//! (averaging checked by hand, the eight views on a model that is
//! equivariant by construction), and self-training on pseudo-labels.

#![allow(clippy::unwrap_used)]

use std::sync::atomic::{AtomicBool, Ordering};

use candle_core::{DType, Device, Tensor};
use candle_nn::VarMap;
use cmr_data::{AugmentConfig, Folds, Grouping, Plane, Sample, Size};
use cmr_models::{Model, ModelConfig, UNetConfig, build};
use cmr_train::{
    CvDir, CvOutcome, CvSpec, EpochRecord, FoldStatus, Keep, Observer, OptimConfig, PSEUDO_DIR, PredictOptions,
    Predictor, PseudoLabels, Quiet, Schedule, TrainConfig, Tta, check_teacher, decide_clean_up, evaluate_folds,
    seeded_var_builder, train_folds, varmap_tensors,
};

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
    Sample {
        id: format!("cmr{}", i + 1),
        image: mask.map(|c| 30 + 50 * c + (i as u8 % 7)),
        mask: Some(mask),
        original: Size { height: n, width: n },
        path: format!("cmr{}.png", i + 1).into(),
    }
}

fn model_config() -> ModelConfig {
    ModelConfig::UNet(UNetConfig {
        in_channels: 1,
        num_classes: 4,
        filters: vec![4, 8, 8, 8],
    })
}

fn config(epochs: usize) -> TrainConfig {
    TrainConfig {
        model: model_config(),
        data: cmr_train::DataConfig {
            size: 32,
            augment: AugmentConfig::robust(),
            grouping: Grouping::Consecutive { size: 2 },
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
        keep: Keep::Last,
        kernels: Default::default(),
        ema: None,
    }
}

fn spec(samples: &[Sample]) -> CvSpec {
    let cfg = config(2);
    CvSpec {
        folds: Folds::new(samples, 2, cfg.seed, cfg.data.grouping).unwrap(),
        config: cfg,
    }
}

fn weights(dir: &std::path::Path) -> Vec<(String, Vec<f32>)> {
    let tensors = cmr_train::Checkpoint::load(&dir.join(cmr_train::RunDir::CHECKPOINT), &Device::Cpu)
        .unwrap()
        .weights;
    let mut w: Vec<(String, Vec<f32>)> = tensors
        .into_iter()
        .map(|(k, v)| (k, v.flatten_all().unwrap().to_vec1::<f32>().unwrap()))
        .collect();
    w.sort_by(|a, b| a.0.cmp(&b.0));
    w
}

/// Raises the stop flag after the first batch of fold `fold`.
struct StopInFold<'a> {
    stop: &'a AtomicBool,
    fold: usize,
    current: usize,
    started: Vec<(usize, usize)>,
}

impl Observer for StopInFold<'_> {
    fn fold_start(&mut self, fold: usize, _k: usize, epochs_done: usize) {
        self.current = fold;
        self.started.push((fold, epochs_done));
    }
    fn batch_end(&mut self, _batch: usize, _loss: f64) {
        if self.current == self.fold {
            self.stop.store(true, Ordering::SeqCst);
        }
    }
    fn epoch_end(&mut self, _r: &EpochRecord, _i: bool) {}
}

#[test]
fn a_cross_validation_interrupted_in_its_second_fold_resumes_there_exactly() {
    let samples: Vec<Sample> = (0..12).map(sample).collect();
    let spec = spec(&samples);
    let dir = tempfile::tempdir().unwrap();

    let mut straight = CvDir::create(&dir.path().join("straight"), &spec).unwrap();
    let out = train_folds(
        &mut straight,
        &spec,
        &samples,
        &[],
        &Device::Cpu,
        &mut Quiet,
        &AtomicBool::new(false),
    )
    .unwrap();
    let CvOutcome::Finished(summary) = out else {
        panic!("{out:?}")
    };
    assert_eq!(summary.folds_finished, 2);
    assert!(summary.best_mean_dice.is_some());
    assert!(straight.root().join(CvDir::SUMMARY).is_file());

    let mut first = CvDir::create(&dir.path().join("cv"), &spec).unwrap();
    assert!(
        CvDir::create(first.root(), &spec).is_err(),
        "a CV folder is not overwritten"
    );
    let stop = AtomicBool::new(false);
    let mut obs = StopInFold {
        stop: &stop,
        fold: 1,
        current: 0,
        started: Vec::new(),
    };
    let out = train_folds(&mut first, &spec, &samples, &[], &Device::Cpu, &mut obs, &stop).unwrap();
    assert_eq!(out, CvOutcome::Interrupted { fold: 1 });
    assert_eq!(first.fold_status(0).unwrap(), FoldStatus::Finished);
    assert_eq!(first.fold_status(1).unwrap(), FoldStatus::InProgress(0));

    let (mut cv, read_back) = CvDir::open(first.root()).unwrap();
    assert_eq!(read_back, spec);
    // one writer: while `first` holds the folder, it cannot be trained
    let err = train_folds(
        &mut cv,
        &spec,
        &samples,
        &[],
        &Device::Cpu,
        &mut Quiet,
        &AtomicBool::new(false),
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("in use by another process"), "{err}");
    drop(first);
    let stop = AtomicBool::new(false);
    let mut obs = StopInFold {
        stop: &stop,
        fold: usize::MAX,
        current: 0,
        started: Vec::new(),
    };
    let out = train_folds(&mut cv, &spec, &samples, &[], &Device::Cpu, &mut obs, &stop).unwrap();
    assert!(matches!(out, CvOutcome::Finished(_)), "{out:?}");
    // fold 0 was skipped, fold 1 picked up where it stopped
    assert_eq!(obs.started, vec![(1, 0)]);
    for f in 0..2 {
        assert_eq!(weights(&cv.fold_dir(f)), weights(&straight.fold_dir(f)), "fold {f}");
        // a fold keeps its last weights as its model
        let best = cmr_train::load_tensors(&cv.fold_dir(f).join(cmr_train::RunDir::BEST), &Device::Cpu)
            .unwrap()
            .0;
        let last = cmr_train::Checkpoint::load(&cv.fold_dir(f).join(cmr_train::RunDir::CHECKPOINT), &Device::Cpu)
            .unwrap()
            .weights;
        for (name, t) in &last {
            let b = best[name].flatten_all().unwrap().to_vec1::<f32>().unwrap();
            assert_eq!(b, t.flatten_all().unwrap().to_vec1::<f32>().unwrap(), "{name}");
        }
    }

    // out of fold: every slice scored once, by the fold that validates on it
    let report = evaluate_folds(
        &cv,
        &spec,
        &samples,
        &Device::Cpu,
        PredictOptions::default(),
        &|s| s.clone(),
        |_| {},
    )
    .unwrap();
    assert_eq!(report.folds.len(), 2);
    let mut ids: Vec<String> = report.out_of_fold.images().iter().map(|m| m.id.clone()).collect();
    ids.sort();
    let mut all: Vec<String> = samples.iter().map(|s| s.id.clone()).collect();
    all.sort();
    assert_eq!(ids, all);
    let [_, _, _, mean] = report.fold_dice();
    let by_fold = (report.folds[0].mean_dice + report.folds[1].mean_dice) / 2.0;
    assert!((mean.mean - by_fold).abs() < 1e-12);
    // the clean-up decided per class, out of fold: never worse than keeping all
    let decision = decide_clean_up(
        &[(cv.clone(), spec.clone())],
        &samples,
        &Device::Cpu,
        PredictOptions::default(),
        |_| {},
    )
    .unwrap();
    assert_eq!(decision.images, 12);
    assert_eq!(decision.dice.len(), 3 + 2 + 3);
    for class in 1..=3u8 {
        let of = |rule| {
            decision
                .dice
                .iter()
                .find(|(c, r, _)| *c == class && *r == rule)
                .unwrap()
                .2
        };
        let chosen = decision.chosen.rule(class);
        assert!(of(chosen) >= of(cmr_loss::Clean::Keep), "class {class}");
        if chosen != cmr_loss::Clean::Keep {
            assert!(of(chosen) > of(cmr_loss::Clean::Keep));
        }
    }
    cv.write_clean(&decision).unwrap();
    // a shipped copy (models, configs, cv.json; no training state) scores alike
    let shipped = dir.path().join("shipped");
    std::fs::create_dir_all(&shipped).unwrap();
    std::fs::copy(cv.root().join(CvDir::SPEC), shipped.join(CvDir::SPEC)).unwrap();
    for f in 0..2 {
        let to = shipped.join(format!("fold-{f}"));
        std::fs::create_dir_all(&to).unwrap();
        for file in [cmr_train::RunDir::BEST, cmr_train::RunDir::CONFIG] {
            std::fs::copy(cv.fold_dir(f).join(file), to.join(file)).unwrap();
        }
    }
    let (shipped_cv, _) = CvDir::open(&shipped).unwrap();
    let again = evaluate_folds(
        &shipped_cv,
        &spec,
        &samples,
        &Device::Cpu,
        PredictOptions::default(),
        &|s| s.clone(),
        |_| {},
    )
    .unwrap();
    assert_eq!(again.out_of_fold.report(), report.out_of_fold.report());
    // a fold in progress is not scored
    std::fs::copy(
        cv.fold_dir(1).join(cmr_train::RunDir::STATE),
        shipped.join("fold-1").join(cmr_train::RunDir::STATE),
    )
    .unwrap();
    let mut state: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(shipped.join("fold-1/state.json")).unwrap()).unwrap();
    state["finished"] = false.into();
    std::fs::write(shipped.join("fold-1/state.json"), state.to_string()).unwrap();
    assert!(
        evaluate_folds(
            &shipped_cv,
            &spec,
            &samples,
            &Device::Cpu,
            PredictOptions::default(),
            &|s| s.clone(),
            |_| {}
        )
        .is_err()
    );
    assert_eq!(cv.read_clean().unwrap(), Some(decision));
    // other data than the folds were made from is refused
    assert!(
        evaluate_folds(
            &cv,
            &spec,
            &samples[..10],
            &Device::Cpu,
            PredictOptions::default(),
            &|s| s.clone(),
            |_| {}
        )
        .is_err()
    );
}

fn untrained(seed: u64) -> (Model, VarMap) {
    let varmap = VarMap::new();
    let model = build(
        &model_config(),
        &Default::default(),
        seeded_var_builder(&varmap, seed, DType::F32, &Device::Cpu),
    )
    .unwrap();
    (model, varmap)
}

fn images() -> Tensor {
    let data: Vec<f32> = (0..2 * 32 * 32).map(|i| ((i * 7919) % 101) as f32 / 101.0).collect();
    Tensor::from_vec(data, (2, 1, 32, 32), &Device::Cpu).unwrap()
}

fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar()
        .unwrap()
}

fn options(tta: Tta) -> PredictOptions {
    PredictOptions {
        tta,
        ..PredictOptions::default()
    }
}

#[test]
fn an_ensemble_averages_its_members_softmax() {
    let cfg = config(1);
    let ((a, _), (b, _)) = (untrained(1), untrained(2));
    let x = images();
    let pa = Predictor::new(a.clone(), cfg.clone(), Device::Cpu, options(Tta::None))
        .probabilities(&x)
        .unwrap();
    let pb = Predictor::new(b.clone(), cfg.clone(), Device::Cpu, options(Tta::None))
        .probabilities(&x)
        .unwrap();
    assert!(max_abs_diff(&pa, &pb) > 1e-3, "two seeds should differ");
    let one = Predictor::from_members(vec![a.clone()], cfg.clone(), Device::Cpu, options(Tta::None));
    assert_eq!(max_abs_diff(&one.probabilities(&x).unwrap(), &pa), 0.0);
    let both = Predictor::from_members(vec![a, b], cfg, Device::Cpu, options(Tta::None));
    let expected = ((pa + pb).unwrap() / 2.0).unwrap();
    assert!(max_abs_diff(&both.probabilities(&x).unwrap(), &expected) < 1e-6);
}

/// Replace every 3×3 and 2×2 kernel by its mean: convolutions with constant
/// kernels, zero padding, 2×2 pooling and up-sampling on even sizes commute
/// with every flip and transpose, so the network is equivariant.
fn make_equivariant(varmap: &VarMap) {
    let data = varmap.data().lock().unwrap();
    for var in data.values() {
        let t = var.as_tensor();
        if t.rank() == 4 && t.dim(2).unwrap() > 1 {
            let mean = t.mean_keepdim(3).unwrap().mean_keepdim(2).unwrap();
            var.set(&mean.broadcast_as(t.shape()).unwrap().contiguous().unwrap())
                .unwrap();
        }
    }
}

#[test]
fn eight_view_tta_leaves_an_equivariant_model_unchanged_and_not_a_random_one() {
    let cfg = config(1);
    let x = images();
    let (model, varmap) = untrained(3);
    let plain = Predictor::new(model.clone(), cfg.clone(), Device::Cpu, options(Tta::None));
    let eight = Predictor::new(model, cfg.clone(), Device::Cpu, options(Tta::Dihedral));
    assert!(max_abs_diff(&plain.probabilities(&x).unwrap(), &eight.probabilities(&x).unwrap()) > 1e-3);
    make_equivariant(&varmap);
    assert!(!varmap_tensors(&varmap).is_empty());
    let p = plain.probabilities(&x).unwrap();
    for tta in [Tta::Flips, Tta::Dihedral] {
        let q = Predictor::new(plain_model(&plain), cfg.clone(), Device::Cpu, options(tta));
        let d = max_abs_diff(&p, &q.probabilities(&x).unwrap());
        assert!(d < 1e-5, "{tta}: {d}");
    }
    assert_eq!(Tta::Dihedral.num_views(), 8);
    assert_eq!(Tta::Flips.num_views(), 4);
}

/// The (shared) model of a single-member predictor.
fn plain_model(p: &Predictor) -> Model {
    p.members()[0].clone()
}

/// Unlabelled images `cmr121` … like the labelled ones.
fn unlabelled(n: usize) -> Vec<Sample> {
    (0..n)
        .map(|i| Sample {
            id: format!("cmr{}", 121 + i),
            mask: None,
            ..sample(i + 3)
        })
        .collect()
}

#[test]
fn pseudo_labels_come_from_the_teacher_fold_and_stay_with_the_run() {
    let samples: Vec<Sample> = (0..12).map(sample).collect();
    let teacher_spec = spec(&samples);
    let dir = tempfile::tempdir().unwrap();
    let teacher = dir.path().join("teacher");
    let mut cv = CvDir::create(&teacher, &teacher_spec).unwrap();
    let quiet = AtomicBool::new(false);
    train_folds(&mut cv, &teacher_spec, &samples, &[], &Device::Cpu, &mut Quiet, &quiet).unwrap();
    drop(cv);

    let mut student_spec = spec(&samples);
    student_spec.config.data.pseudo_labels = Some(PseudoLabels {
        teacher: teacher.clone(),
        tta: Tta::Flips,
    });
    let images = unlabelled(4);
    // stopped in its second fold, after its labels are written
    let student = dir.path().join("student");
    let mut first = CvDir::create(&student, &student_spec).unwrap();
    let stop = AtomicBool::new(false);
    let mut obs = StopInFold {
        stop: &stop,
        fold: 1,
        current: 0,
        started: Vec::new(),
    };
    let out = train_folds(
        &mut first,
        &student_spec,
        &samples,
        &images,
        &Device::Cpu,
        &mut obs,
        &stop,
    )
    .unwrap();
    assert_eq!(out, CvOutcome::Interrupted { fold: 1 });
    drop(first);
    for fold in 0..2 {
        // the labels are the teacher fold's prediction with the recipe's TTA
        let predictor =
            Predictor::load(&teacher.join(format!("fold-{fold}")), &Device::Cpu, options(Tta::Flips)).unwrap();
        let expected = predictor.predict(&images, |_| {}).unwrap();
        let labels = student.join(format!("fold-{fold}")).join(PSEUDO_DIR);
        for (s, want) in images.iter().zip(&expected) {
            let got = cmr_data::read_mask(&labels.join(format!("{}_mask.png", s.id))).unwrap();
            assert_eq!(&got, want, "fold {fold}, {}", s.id);
        }
    }
    // resumed on other unlabelled images: refused, the labels kept
    let (mut cv, _) = CvDir::open(&student).unwrap();
    let err = train_folds(
        &mut cv,
        &student_spec,
        &samples,
        &images[..3],
        &Device::Cpu,
        &mut Quiet,
        &quiet,
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("not the data this run started with"), "{err}");
    // with its labels written, a fold resumes without its teacher
    let away = dir.path().join("teacher-moved");
    std::fs::rename(&teacher, &away).unwrap();
    let out = train_folds(
        &mut cv,
        &student_spec,
        &samples,
        &images,
        &Device::Cpu,
        &mut Quiet,
        &quiet,
    )
    .unwrap();
    assert!(matches!(out, CvOutcome::Finished(_)), "{out:?}");
    std::fs::rename(&away, &teacher).unwrap();
    for fold in 0..2 {
        let record = cmr_data::SplitRecord::read(&cv.fold_dir(fold).join("splits.json"))
            .unwrap()
            .unwrap();
        assert_eq!(record.train.len(), 12 - student_spec.folds.val[fold].len() + 4);
        assert!(images.iter().all(|s| record.train.contains(&s.id)));
        assert_eq!(record.val, student_spec.folds.val[fold]);
    }
    drop(cv);

    // no unlabelled images, or one with a labelled slice's id: refused
    let other = |name: &str| CvDir::create(&dir.path().join(name), &student_spec).unwrap();
    let err = train_folds(
        &mut other("none"),
        &student_spec,
        &samples,
        &[],
        &Device::Cpu,
        &mut Quiet,
        &quiet,
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("need unlabelled images"), "{err}");
    let mut clash = unlabelled(1);
    clash[0].id = "cmr3".into();
    let err = train_folds(
        &mut other("clash"),
        &student_spec,
        &samples,
        &clash,
        &Device::Cpu,
        &mut Quiet,
        &quiet,
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("id cmr3 of a labelled slice"), "{err}");
    // a teacher on other folds trained on slices a student fold is scored on
    let three = Folds::new(&samples, 3, 11, Grouping::Consecutive { size: 2 }).unwrap();
    let err = check_teacher(&teacher, &three).unwrap_err().to_string();
    assert!(err.contains("not this cross-validation's"), "{err}");
}
