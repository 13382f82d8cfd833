//! k-fold cross-validation: `k` runs of one recipe in one folder, trained and
//! resumed fold by fold, and their cross-validated scores.
//!
//! ```text
//! CV/cv.json        the recipe and the folds (validation ids of each), written first
//! CV/fold-0/ …      one run folder per fold (see RunDir)
//! CV/summary.json   each finished fold's best validation score, and their mean ± SD
//! CV/postprocess.json  the clean-up each class gets, decided out of fold (optional)
//! ```
//! A CV folder is also an ensemble: its fold models, averaged.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use candle_core::Device;
use cmr_data::{DirLock, Folds, Sample};
use cmr_loss::{Clean, LabelMap, MetricsAccumulator, MetricsReport, PostProcess, dice};
use serde::{Deserialize, Serialize};

use crate::config::{ConfigChanges, TrainConfig};
use crate::error::{Result, TrainError};
use crate::predict::{PredictOptions, Predictor, Tta};
use crate::pseudo::{PSEUDO_DIR, check_teacher, pseudo_labelled};
use crate::run::{RunDir, lock_and_sweep, read_json_if_there};
use crate::trainer::{Observer, Outcome, Trainer};

/// What `cv.json` holds: the recipe every fold trains with and the folds.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CvSpec {
    pub config: TrainConfig,
    pub folds: Folds,
}

/// A cross-validation folder.
#[derive(Clone, Debug)]
pub struct CvDir {
    root: PathBuf,
    /// The folder's lock, when this process trains it.
    lock: Option<Arc<DirLock>>,
}

/// Where a fold stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FoldStatus {
    NotStarted,
    /// Started, with this many epochs done.
    InProgress(usize),
    Finished,
}

impl CvDir {
    pub const SPEC: &'static str = "cv.json";
    pub const SUMMARY: &'static str = "summary.json";

    /// Whether `path` is a cross-validation folder (holds `cv.json`).
    pub fn is_cv(path: &Path) -> bool {
        path.join(Self::SPEC).is_file()
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Start a cross-validation in the new folder `root`: validate the recipe
    /// and write `cv.json`. A folder that already holds a run or a CV is
    /// refused. The new folder is locked for this process.
    pub fn create(root: &Path, spec: &CvSpec) -> Result<Self> {
        spec.config.validate()?;
        let taken = || root.join(Self::SPEC).exists() || root.join(RunDir::CONFIG).exists();
        let refuse = || TrainError::Run {
            path: root.to_path_buf(),
            message: "already holds a run (resume it, or choose another output folder)".into(),
        };
        if taken() {
            return Err(refuse());
        }
        std::fs::create_dir_all(root).map_err(|e| TrainError::io(root, e))?;
        let lock = lock_and_sweep(root)?;
        // checked again under the lock: another process may have been first
        if taken() {
            return Err(refuse());
        }
        let text = serde_json::to_string_pretty(spec).expect("a CvSpec always serialises");
        cmr_data::write_atomic(&root.join(Self::SPEC), text.as_bytes())?;
        Ok(Self {
            root: root.to_path_buf(),
            lock: Some(Arc::new(lock)),
        })
    }

    /// Take the folder's lock for this process (a second writer fails at
    /// once, naming the holder). Does nothing when this `CvDir` holds it.
    pub fn lock(&mut self) -> Result<()> {
        if self.lock.is_none() {
            self.lock = Some(Arc::new(lock_and_sweep(&self.root)?));
        }
        Ok(())
    }

    /// Open a cross-validation folder and read `cv.json`.
    pub fn open(root: &Path) -> Result<(Self, CvSpec)> {
        let path = root.join(Self::SPEC);
        if !path.is_file() {
            return Err(TrainError::Run {
                path: root.to_path_buf(),
                message: format!("not a cross-validation folder (no {})", Self::SPEC),
            });
        }
        let text = std::fs::read_to_string(&path).map_err(|e| TrainError::io(&path, e))?;
        let spec: CvSpec = serde_json::from_str(&text).map_err(|e| TrainError::ConfigFile {
            path: path.clone(),
            message: e.to_string(),
        })?;
        if spec.folds.val.len() != spec.folds.k {
            return Err(TrainError::ConfigFile {
                path,
                message: format!("{} folds listed for k = {}", spec.folds.val.len(), spec.folds.k),
            });
        }
        Ok((
            Self {
                root: root.to_path_buf(),
                lock: None,
            },
            spec,
        ))
    }

    /// The run folder of fold `fold` (0-based).
    pub fn fold_dir(&self, fold: usize) -> PathBuf {
        self.root.join(format!("fold-{fold}"))
    }

    /// The run folders of the `k` folds, in order.
    pub fn fold_dirs(&self, k: usize) -> Vec<PathBuf> {
        (0..k).map(|f| self.fold_dir(f)).collect()
    }

    pub fn fold_status(&self, fold: usize) -> Result<FoldStatus> {
        let dir = self.fold_dir(fold);
        if !dir.join(RunDir::CONFIG).is_file() {
            return Ok(FoldStatus::NotStarted);
        }
        Ok(match RunDir::at(&dir).read_state()? {
            None => FoldStatus::NotStarted,
            Some(s) if s.finished => FoldStatus::Finished,
            Some(s) => FoldStatus::InProgress(s.epochs_done),
        })
    }

    /// Whether fold `fold` has a model to score: it finished training, or it
    /// is a shipped fold (its model and config, without the files training
    /// and resuming use).
    pub fn fold_ready(&self, fold: usize) -> Result<bool> {
        let dir = self.fold_dir(fold);
        Ok(match self.fold_status(fold)? {
            FoldStatus::Finished => true,
            FoldStatus::InProgress(_) => false,
            FoldStatus::NotStarted => {
                dir.join(RunDir::BEST).is_file()
                    && dir.join(RunDir::CONFIG).is_file()
                    && !dir.join(RunDir::STATE).exists()
                    && !dir.join(RunDir::CHECKPOINT).exists()
                    && !dir.join(RunDir::LAST).exists()
            }
        })
    }

    /// Write `summary.json` from the folds' states.
    fn write_summary(&self, spec: &CvSpec) -> Result<CvSummary> {
        let mut folds = Vec::new();
        for f in 0..spec.folds.k {
            let state = RunDir::at(&self.fold_dir(f)).read_state()?;
            folds.push(FoldSummary {
                fold: f,
                validation_images: spec.folds.val[f].len(),
                finished: state.as_ref().is_some_and(|s| s.finished),
                epochs_done: state.as_ref().map_or(0, |s| s.epochs_done),
                best_epoch: state.as_ref().and_then(|s| s.best.as_ref()).map(|b| b.epoch),
                best_mean_dice: state.as_ref().and_then(|s| s.best.as_ref()).map(|b| b.mean_dice),
            });
        }
        let scores: Vec<f64> = folds
            .iter()
            .filter(|f| f.finished)
            .filter_map(|f| f.best_mean_dice)
            .collect();
        let summary = CvSummary {
            k: spec.folds.k,
            folds_finished: folds.iter().filter(|f| f.finished).count(),
            best_mean_dice: MeanSd::of(&scores),
            folds,
        };
        let text = serde_json::to_string_pretty(&summary).expect("a summary serialises");
        cmr_data::write_atomic(&self.root.join(Self::SUMMARY), text.as_bytes())?;
        Ok(summary)
    }
}

/// One fold in `summary.json`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct FoldSummary {
    pub fold: usize,
    pub validation_images: usize,
    pub finished: bool,
    pub epochs_done: usize,
    pub best_epoch: Option<usize>,
    /// Best mean foreground Dice on the fold's validation images during
    /// training (no TTA). Optimistic: the epoch is chosen on those images;
    /// [`evaluate_folds`] scores the model the fold keeps.
    pub best_mean_dice: Option<f64>,
}

/// `summary.json`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct CvSummary {
    pub k: usize,
    pub folds_finished: usize,
    /// Over the finished folds.
    pub best_mean_dice: Option<MeanSd>,
    pub folds: Vec<FoldSummary>,
}

/// Mean and sample standard deviation (n − 1; 0 for one value).
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct MeanSd {
    pub mean: f64,
    pub sd: f64,
    pub n: usize,
}

impl MeanSd {
    /// `None` for no values.
    pub fn of(values: &[f64]) -> Option<Self> {
        let n = values.len();
        if n == 0 {
            return None;
        }
        let mean = values.iter().sum::<f64>() / n as f64;
        let sd = if n > 1 {
            (values.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / (n - 1) as f64).sqrt()
        } else {
            0.0
        };
        Some(Self { mean, sd, n })
    }
}

impl std::fmt::Display for MeanSd {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:.4} ± {:.4}", self.mean, self.sd)
    }
}

/// How [`train_folds`] ended.
#[derive(Clone, Debug, PartialEq)]
pub enum CvOutcome {
    /// Every fold is trained.
    Finished(CvSummary),
    /// The stop flag was raised in fold `fold`; it is saved and resumes there.
    Interrupted { fold: usize },
}

/// Train every fold that is not finished, in order: a fold never started is
/// created (one started but stopped before its first checkpoint is started
/// again), one in progress is resumed, a finished one is skipped. `samples`
/// must be the data the folds were made from. With `data.pseudo_labels` in
/// the recipe, `unlabelled` (the dataset's `test/` images) join each fold's
/// training slices with the masks its teacher fold gives them
/// ([`pseudo_labelled`]); without, they are not used. `summary.json` is
/// rewritten after each fold. The folder's lock is taken first (if `cv` does
/// not hold it): a CV another process trains is refused.
pub fn train_folds(
    cv: &mut CvDir,
    spec: &CvSpec,
    samples: &[Sample],
    unlabelled: &[Sample],
    device: &Device,
    observer: &mut dyn Observer,
    stop: &AtomicBool,
) -> Result<CvOutcome> {
    cv.lock()?;
    if let Some(p) = &spec.config.data.pseudo_labels {
        check_pseudo_data(samples, unlabelled, &p.teacher)?;
    }
    // each fold's teacher (the same fold of the teacher cross-validation),
    // checked when a fold's labels are still to be written
    let mut teachers: Option<Vec<PathBuf>> = None;
    for fold in 0..spec.folds.k {
        let mut splits = spec.folds.split(samples, fold)?;
        let dir = cv.fold_dir(fold);
        let mut trainer = match cv.fold_status(fold)? {
            FoldStatus::Finished => continue,
            FoldStatus::InProgress(_) => Trainer::resume(&dir, device.clone(), &ConfigChanges::default())?,
            FoldStatus::NotStarted => {
                if dir.exists() {
                    std::fs::remove_dir_all(&dir).map_err(|e| TrainError::io(&dir, e))?;
                }
                Trainer::create(spec.config.clone(), &dir, device.clone())?
            }
        };
        if *trainer.config() != spec.config {
            // `resume` keeps the fold's own config; a CV's folds share one recipe
            return Err(TrainError::Run {
                path: dir,
                message: format!("its {} differs from the recipe in {}", RunDir::CONFIG, CvDir::SPEC),
            });
        }
        if let Some(p) = &spec.config.data.pseudo_labels {
            if teachers.is_none() && !dir.join(PSEUDO_DIR).exists() {
                teachers = Some(check_teacher(&p.teacher, &spec.folds)?);
            }
            // (with its labels written, a fold does not read its teacher)
            let teacher = match &teachers {
                Some(t) => t[fold].clone(),
                None => p.teacher.join(format!("fold-{fold}")),
            };
            splits.train.extend(pseudo_labelled(
                &dir,
                &teacher,
                p.tta,
                unlabelled,
                device,
                spec.config.kernels,
            )?);
        }
        observer.fold_start(fold, spec.folds.k, trainer.state().epochs_done);
        let outcome = trainer.fit(&splits, observer, stop)?;
        cv.write_summary(spec)?;
        if matches!(outcome, Outcome::Interrupted { .. }) || stop.load(Ordering::SeqCst) {
            if cv.fold_status(fold)? != FoldStatus::Finished {
                return Ok(CvOutcome::Interrupted { fold });
            }
            if fold + 1 < spec.folds.k {
                return Ok(CvOutcome::Interrupted { fold: fold + 1 });
            }
        }
    }
    Ok(CvOutcome::Finished(cv.write_summary(spec)?))
}

/// Pseudo-labels need unlabelled images, none of which may share an id with
/// a labelled slice (the split records and batches go by id).
fn check_pseudo_data(samples: &[Sample], unlabelled: &[Sample], teacher: &Path) -> Result<()> {
    if unlabelled.is_empty() {
        return Err(TrainError::Config(format!(
            "pseudo-labels from {} need unlabelled images (the dataset's test/), and there are none",
            teacher.display()
        )));
    }
    let labelled: std::collections::BTreeSet<&str> = samples.iter().map(|s| s.id.as_str()).collect();
    if let Some(s) = unlabelled.iter().find(|s| labelled.contains(s.id.as_str())) {
        return Err(TrainError::Run {
            path: s.path.clone(),
            message: format!("an unlabelled image with the id {} of a labelled slice", s.id),
        });
    }
    Ok(())
}

/// Cross-validated scores: each fold's model on its own validation images.
#[derive(Clone, Debug)]
pub struct CvReport {
    /// Per fold, in order.
    pub folds: Vec<MetricsReport>,
    /// Every image scored by the model of the fold that validates on it.
    pub out_of_fold: MetricsAccumulator,
}

impl CvReport {
    /// Mean ± SD over folds of the Dice of RV, Myo, LV and their mean.
    pub fn fold_dice(&self) -> [MeanSd; 4] {
        let of = |f: &dyn Fn(&MetricsReport) -> f64| {
            MeanSd::of(&self.folds.iter().map(f).collect::<Vec<_>>()).unwrap_or(MeanSd {
                mean: f64::NAN,
                sd: f64::NAN,
                n: 0,
            })
        };
        [
            of(&|r| r.classes[0].dice),
            of(&|r| r.classes[1].dice),
            of(&|r| r.classes[2].dice),
            of(&|r| r.mean_dice),
        ]
    }
}

/// Score each finished fold's model on its validation images of `samples`
/// (the data the folds were made from), after `transform` (the identity, or
/// a deformed copy). Refuses a CV with unfinished folds.
pub fn evaluate_folds(
    cv: &CvDir,
    spec: &CvSpec,
    samples: &[Sample],
    device: &Device,
    options: PredictOptions,
    transform: &dyn Fn(&Sample) -> Sample,
    progress: impl FnMut(usize),
) -> Result<CvReport> {
    evaluate_fold_ensembles(
        &[(cv.clone(), spec.clone())],
        samples,
        device,
        options,
        transform,
        progress,
    )
}

/// Cross-validated scores of ensembles: several cross-validations with the
/// same folds (other seeds or recipes, e.g. `cmr train --folds-from`), fold
/// `f` scored by the ensemble of every CV's fold-`f` model, none of which
/// trained on it. Refuses CVs whose folds differ, and unfinished folds.
pub fn evaluate_fold_ensembles(
    cvs: &[(CvDir, CvSpec)],
    samples: &[Sample],
    device: &Device,
    options: PredictOptions,
    transform: &dyn Fn(&Sample) -> Sample,
    mut progress: impl FnMut(usize),
) -> Result<CvReport> {
    let Some((first_cv, first)) = cvs.first() else {
        return Err(TrainError::Config("no cross-validation to evaluate".into()));
    };
    if let Some((cv, _)) = cvs.iter().find(|(_, s)| s.folds != first.folds) {
        return Err(TrainError::Run {
            path: cv.root().to_path_buf(),
            message: format!(
                "its folds differ from those of {}: an ensemble of cross-validations needs the same folds (train it with --folds-from)",
                first_cv.root().display()
            ),
        });
    }
    let folds = &first.folds;
    let mut reports = Vec::new();
    let mut out_of_fold = MetricsAccumulator::new();
    let mut done = 0;
    for fold in 0..folds.k {
        for (cv, _) in cvs {
            if !cv.fold_ready(fold)? {
                return Err(TrainError::Run {
                    path: cv.fold_dir(fold),
                    message: format!(
                        "fold {fold} of {} is not trained yet (resume the cross-validation first)",
                        folds.k
                    ),
                });
            }
        }
        let splits = folds.split(samples, fold)?;
        let val: Vec<Sample> = splits.val.iter().map(transform).collect();
        let members: Vec<PathBuf> = cvs.iter().map(|(cv, _)| cv.fold_dir(fold)).collect();
        let predictor = Predictor::load_ensemble(&members, device, options)?;
        let eval = predictor.evaluate(&val, None)?;
        done += val.len();
        progress(done);
        reports.push(eval.metrics.report());
        out_of_fold.extend(&eval.metrics);
    }
    Ok(CvReport {
        folds: reports,
        out_of_fold,
    })
}

/// The out-of-fold Dice of each class under each clean-up rule, and the
/// rules chosen from them.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct CleanDecision {
    /// Per class and rule: `(class, rule, out-of-fold mean Dice)`.
    pub dice: Vec<(u8, Clean, f64)>,
    /// For each class the rule with the best out-of-fold Dice, where it beats
    /// keeping everything (strictly); keep everything otherwise.
    pub chosen: PostProcess,
    /// The test-time augmentation the predictions were made with.
    pub tta: Tta,
    /// Images scored.
    pub images: usize,
}

/// Decide, class by class, which clean-up helps (as nnU-Net does): predict
/// every fold's validation slices once (by the ensemble of the CVs' fold
/// models, with `options`' TTA), apply each rule of [`Clean::candidates`] and
/// compare the out-of-fold Dice. The choice is made on the same slices it is
/// scored on, so its gain is slightly optimistic.
pub fn decide_clean_up(
    cvs: &[(CvDir, CvSpec)],
    samples: &[Sample],
    device: &Device,
    options: PredictOptions,
    mut progress: impl FnMut(usize),
) -> Result<CleanDecision> {
    let Some((_, first)) = cvs.first() else {
        return Err(TrainError::Config("no cross-validation to decide on".into()));
    };
    let folds = &first.folds;
    let options = PredictOptions {
        clean: PostProcess::NONE,
        ..options
    };
    let mut sums: Vec<(u8, Clean, f64)> = (1..=3u8)
        .flat_map(|c| Clean::candidates(c).iter().map(move |&r| (c, r, 0.0)))
        .collect();
    let mut images = 0;
    for fold in 0..folds.k {
        let val = folds.split(samples, fold)?.val;
        let members: Vec<PathBuf> = cvs.iter().map(|(cv, _)| cv.fold_dir(fold)).collect();
        let predictor = Predictor::load_ensemble(&members, device, options)?;
        let preds = predictor.predict(&val, |_| {})?;
        for (pred, sample) in preds.iter().zip(&val) {
            let gt = sample.mask.as_ref().ok_or_else(|| TrainError::Run {
                path: sample.path.clone(),
                message: "cannot score an image without its mask".into(),
            })?;
            let (h, w) = (pred.height(), pred.width());
            let truth = LabelMap::new(gt.data(), h, w)?;
            for (class, rule, sum) in &mut sums {
                let mut cleaned = pred.data().to_vec();
                rule.apply(&mut cleaned, h, w, *class);
                *sum += dice(LabelMap::new(&cleaned, h, w)?, truth, *class);
            }
        }
        images += val.len();
        progress(images);
    }
    let dice_of: Vec<(u8, Clean, f64)> = sums
        .into_iter()
        .map(|(c, r, s)| (c, r, s / images.max(1) as f64))
        .collect();
    let mut chosen = PostProcess::NONE;
    for class in 1..=3u8 {
        let keep = dice_of
            .iter()
            .find(|(c, r, _)| *c == class && *r == Clean::Keep)
            .map_or(0.0, |x| x.2);
        if let Some(&(_, rule, d)) = dice_of
            .iter()
            .filter(|(c, _, _)| *c == class)
            .max_by(|a, b| a.2.total_cmp(&b.2))
            && d > keep
        {
            chosen.set(class, rule);
        }
    }
    Ok(CleanDecision {
        dice: dice_of,
        chosen,
        tta: options.tta,
        images,
    })
}

impl CvDir {
    pub const CLEAN: &'static str = "postprocess.json";

    /// The clean-up decision recorded in the folder, if any.
    pub fn read_clean(&self) -> Result<Option<CleanDecision>> {
        read_json_if_there(&self.root.join(Self::CLEAN))
    }

    pub fn write_clean(&self, decision: &CleanDecision) -> Result<()> {
        let text = serde_json::to_string_pretty(decision).expect("a decision serialises");
        Ok(cmr_data::write_atomic(&self.root.join(Self::CLEAN), text.as_bytes())?)
    }
}

/// The models a `--model` path stands for: the fold models of a CV folder, or
/// the path itself.
pub fn ensemble_members(path: &Path) -> Result<Vec<PathBuf>> {
    if CvDir::is_cv(path) {
        let (cv, spec) = CvDir::open(path)?;
        Ok(cv.fold_dirs(spec.folds.k))
    } else {
        Ok(vec![path.to_path_buf()])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mean_and_sd_by_hand() {
        let m = MeanSd::of(&[0.8, 0.9, 1.0]).unwrap();
        assert!((m.mean - 0.9).abs() < 1e-12);
        assert!((m.sd - 0.1).abs() < 1e-12);
        assert_eq!(MeanSd::of(&[0.5]).unwrap().sd, 0.0);
        assert!(MeanSd::of(&[]).is_none());
    }
}
