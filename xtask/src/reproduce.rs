//! `cargo xtask reproduce`: data → a k-fold cross-validation of each network
//! → cross-validated scores (clean, with TTA, on deformed copies) → the test
//! images predicted by each network's fold ensemble → `submission.csv` →
//! `REPORT.md`.
//!
//! Everything is built in `<out>.partial/` and moved to `<out>` only when
//! complete. An interrupted reproduction picks up where it stopped: finished
//! folds are kept, an unfinished one resumed, as long as the recipe and the
//! folds are the ones asked for.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::time::Instant;

use anyhow::{Context, bail};
use cmr_data::{AugmentConfig, Dataset, Folds, Sample, deform_sample, write_submission};
use cmr_loss::{MetricsReport, PostProcess};
use cmr_models::{Architecture, KernelConfig, model_stats};
use cmr_train::{
    CvDir, CvReport, CvSpec, DeviceSpec, EpochRecord, Keep, MeanSd, Observer, PredictOptions, Predictor, RunDir,
    TrainConfig, TrainPreset, Tta, decide_clean_up, device_name, ensemble_members, evaluate_folds, train_folds,
};

/// The seed of the deformed copies scored in the report.
pub const DEFORM_SEED: u64 = 1;

/// What to reproduce.
#[derive(Clone, Debug)]
pub struct ReproduceOptions {
    pub preset: TrainPreset,
    pub archs: Vec<Architecture>,
    /// The installed dataset root.
    pub data: PathBuf,
    pub out: PathBuf,
    /// Folds of the cross-validation.
    pub folds: usize,
    /// Override the preset's epochs (short runs, CI).
    pub epochs: Option<usize>,
    /// Use only the first N training slices / test images (short runs, CI).
    pub train_limit: Option<usize>,
    pub test_limit: Option<usize>,
    pub device: DeviceSpec,
    /// Which CPU kernels run (saved in each run's config.json).
    pub kernels: KernelConfig,
}

/// Cross-validated scores of one way of predicting.
#[derive(Clone, Debug)]
pub struct CvScores {
    /// Mean ± SD over folds of RV, Myo, LV and their mean.
    pub folds: [MeanSd; 4],
    /// Every slice once, by the fold model that did not train on it.
    pub out_of_fold: MetricsReport,
}

impl From<&CvReport> for CvScores {
    fn from(r: &CvReport) -> Self {
        Self {
            folds: r.fold_dice(),
            out_of_fold: r.out_of_fold.report(),
        }
    }
}

/// What one network reached.
#[derive(Clone, Debug)]
pub struct NetworkResult {
    pub arch: Architecture,
    pub config: TrainConfig,
    pub parameters: usize,
    pub size_mb: f64,
    pub gflops: f64,
    pub folds: usize,
    pub epochs: usize,
    pub mean_epoch_seconds: f64,
    pub train_seconds: f64,
    pub plain: CvScores,
    /// Eight-view TTA.
    pub tta: CvScores,
    /// Eight-view TTA and the clean-up decided per class out of fold.
    pub tta_clean: CvScores,
    /// Eight-view TTA on deformed copies of each validation fold.
    pub deformed: CvScores,
    /// The clean-up chosen per class out of fold (used for the test set).
    pub clean: PostProcess,
}

impl NetworkResult {
    /// The scores of the way the test set is predicted.
    pub fn chosen(&self) -> &CvScores {
        if self.clean.is_none() {
            &self.tta
        } else {
            &self.tta_clean
        }
    }
}

/// Logs one line per epoch.
struct EpochLog {
    arch: Architecture,
    epochs: usize,
    fold: (usize, usize),
}

impl Observer for EpochLog {
    fn fold_start(&mut self, fold: usize, k: usize, _epochs_done: usize) {
        self.fold = (fold, k);
    }

    fn epoch_end(&mut self, r: &EpochRecord, improved: bool) {
        tracing::info!(
            "{} fold {}/{} epoch {}/{}: train loss {:.4}, val Dice {}, {:.1} s{}",
            self.arch,
            self.fold.0 + 1,
            self.fold.1,
            r.epoch,
            self.epochs,
            r.train_loss,
            r.val_mean_dice.map_or("-".into(), |d| format!("{d:.4}")),
            r.seconds,
            if improved { " *best*" } else { "" }
        );
    }
}

fn config_for(opts: &ReproduceOptions, arch: Architecture) -> TrainConfig {
    let mut cfg = TrainConfig::preset(opts.preset, arch);
    if let Some(e) = opts.epochs {
        cfg.epochs = e;
    }
    cfg.device = opts.device;
    cfg.kernels = opts.kernels;
    // each fold is scored on its validation slices: they must choose nothing
    cfg.keep = Keep::Last;
    cfg
}

/// Train (or resume, or reuse) the cross-validation of `spec` in `dir`.
fn train(spec: &CvSpec, samples: &[Sample], dir: &Path) -> anyhow::Result<f64> {
    let started = Instant::now();
    let arch = spec.config.model.architecture();
    let existing = if CvDir::is_cv(dir) {
        Some(CvDir::open(dir)?)
    } else {
        None
    };
    let mut cv = match existing {
        Some((cv, recorded)) if recorded == *spec => cv,
        other => {
            if other.is_some() {
                tracing::info!("{}: another recipe or other folds; starting again", dir.display());
            }
            if dir.exists() {
                std::fs::remove_dir_all(dir).with_context(|| format!("removing {}", dir.display()))?;
            }
            CvDir::create(dir, spec)?
        }
    };
    let device = spec.config.device.open()?;
    tracing::info!(
        "training {} ({} folds of {} epochs) on {}",
        arch.display_name(),
        spec.folds.k,
        spec.config.epochs,
        device_name(&device)
    );
    let mut log = EpochLog {
        arch,
        epochs: spec.config.epochs,
        fold: (0, spec.folds.k),
    };
    train_folds(&mut cv, spec, samples, &[], &device, &mut log, &AtomicBool::new(false))?;
    Ok(started.elapsed().as_secs_f64())
}

fn fmt_sd(m: &MeanSd) -> String {
    format!("{:.3} ± {:.3}", m.mean, m.sd)
}

/// The report's own figures (validation Dice), for the side-by-side table.
const REPORT_FIGURES: [(&str, &str); 6] = [
    ("SegNet, cross-entropy", "0.71"),
    ("U-Net, cross-entropy", "0.84"),
    ("U-Net 3+, cross-entropy", "0.86"),
    ("U-Net 3+, soft Dice", "0.88"),
    ("U-Net 3+, soft Dice + augmentation", "0.903"),
    ("U-Net 3+, hidden test set", "0.8998"),
];

fn report_md(
    opts: &ReproduceOptions,
    samples: usize,
    folds: &Folds,
    results: &[NetworkResult],
    best: Architecture,
) -> String {
    let mut s = String::new();
    let _ = writeln!(s, "# cmr reproduction: `{}` preset\n", opts.preset);
    let _ = writeln!(
        s,
        "Made by `cargo xtask reproduce --preset {}{}{}{}{}` on {}, {} threads. Accuracy: {}-fold cross-validation over {} labelled training slices, folds {} (seed {}); every figure comes from slices the scoring model did not train on.\n",
        opts.preset,
        if opts.archs.len() == 3 {
            String::new()
        } else {
            format!(
                " --archs {}",
                opts.archs.iter().map(|a| a.name()).collect::<Vec<_>>().join(",")
            )
        },
        if opts.folds == 5 {
            String::new()
        } else {
            format!(" --folds {}", opts.folds)
        },
        opts.epochs.map(|e| format!(" --epochs {e}")).unwrap_or_default(),
        opts.train_limit
            .map(|n| format!(" --train-limit {n}"))
            .unwrap_or_default(),
        std::env::consts::ARCH,
        candle_core::utils::get_num_threads(),
        opts.folds,
        samples,
        folds.grouping,
        folds.seed
    );
    let _ = writeln!(
        s,
        "| network | parameters | GFLOPs | epochs | epoch (s) | training (min) | Dice RV | Dice Myo | Dice LV | **mean Dice** | out of fold | + TTA | + TTA, clean | deformed, TTA |"
    );
    let _ = writeln!(s, "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|");
    for r in results {
        let _ = writeln!(
            s,
            "| {} | {} | {:.2} | {} × {} | {:.1} | {:.1} | {} | {} | {} | **{}** | {:.3} | {} | {} | {} |",
            r.arch.display_name(),
            r.parameters,
            r.gflops,
            r.folds,
            r.epochs,
            r.mean_epoch_seconds,
            r.train_seconds / 60.0,
            fmt_sd(&r.plain.folds[0]),
            fmt_sd(&r.plain.folds[1]),
            fmt_sd(&r.plain.folds[2]),
            fmt_sd(&r.plain.folds[3]),
            r.plain.out_of_fold.mean_dice,
            fmt_sd(&r.tta.folds[3]),
            fmt_sd(&r.tta_clean.folds[3]),
            fmt_sd(&r.deformed.folds[3]),
        );
    }
    let _ = writeln!(
        s,
        "\nDice: mean ± SD over the folds, each fold's model (its last weights) on its own validation slices. `out of fold`: the mean over all slices, each scored once. `+ TTA`: the softmax averaged over the eight flips and rotations of the square; `clean`: the clean-up of connected components decided per class out of fold (keep all, the largest, or those touching the myocardium; `postprocess.json`). `deformed`: a deformed copy of each validation fold (`cmr eval --deform {DEFORM_SEED}`: elastic warp, rotation up to ±30°, scale 0.8–1.2, gamma, noise, bias field). `training (min)`: wall time of this invocation's training, all folds (0 when an earlier invocation trained them).\n"
    );
    let _ = writeln!(
        s,
        "`submission.csv` holds the test predictions of the {} fold ensemble (best cross-validated mean Dice with TTA{}); `submission-<arch>.csv` those of each network's ensemble, with TTA, and clean-up where it helped out of fold.\n",
        best.display_name(),
        if results.iter().any(|r| r.arch == best && !r.clean.is_none()) {
            " and clean-up"
        } else {
            ""
        }
    );
    let _ = writeln!(
        s,
        "## The seed report's figures (one 20-slice validation split, full-width networks, 200 epochs)\n"
    );
    let _ = writeln!(s, "| setting | mean Dice |\n|---|---|");
    for (k, v) in REPORT_FIGURES {
        let _ = writeln!(s, "| {k} | {v} |");
    }
    let _ = writeln!(s, "\n## Curves (fold 0)\n");
    for r in results {
        let _ = writeln!(
            s,
            "### {}\n\n![{} curves](runs/{}/fold-0/curves.png)\n",
            r.arch.display_name(),
            r.arch.name(),
            r.arch.name()
        );
    }
    s
}

/// Score the CV folder at `dir` on `samples` (optionally deformed).
fn score(
    dir: &Path,
    spec: &CvSpec,
    samples: &[Sample],
    device: &candle_core::Device,
    tta: Tta,
    clean: PostProcess,
    deform: bool,
) -> anyhow::Result<CvScores> {
    let (cv, _) = CvDir::open(dir)?;
    let options = PredictOptions {
        tta,
        clean,
        kernels: spec.config.kernels,
        ..PredictOptions::default()
    };
    let config = AugmentConfig::deformed_test();
    let transform = |s: &Sample| {
        if deform {
            deform_sample(s, &config, DEFORM_SEED)
        } else {
            s.clone()
        }
    };
    let report = evaluate_folds(&cv, spec, samples, device, options, &transform, |_| {})?;
    Ok(CvScores::from(&report))
}

/// `report.html` of the cross-validation: every training slice predicted by
/// the fold model that did not train on it (with TTA and the decided
/// clean-up), as `cmr eval --report` draws it.
fn out_of_fold_report(
    dir: &Path,
    cv: &CvDir,
    spec: &CvSpec,
    samples: &[Sample],
    device: &candle_core::Device,
    clean: PostProcess,
) -> anyhow::Result<()> {
    let options = PredictOptions {
        tta: Tta::Dihedral,
        clean,
        kernels: spec.config.kernels,
        ..PredictOptions::default()
    };
    let mut slices = Vec::with_capacity(samples.len());
    let mut acc = cmr_loss::MetricsAccumulator::new();
    for fold in 0..spec.folds.k {
        let val = spec.folds.split(samples, fold)?.val;
        let model = Predictor::load_ensemble(&[cv.fold_dir(fold)], device, options)?;
        for (s, prediction) in val.iter().zip(model.predict(&val, |_| {})?) {
            let Some(truth) = s.mask.clone() else { continue };
            acc.add(
                &s.id,
                cmr_loss::LabelMap::new(prediction.data(), prediction.height(), prediction.width())?,
                cmr_loss::LabelMap::new(truth.data(), truth.height(), truth.width())?,
            )?;
            slices.push(cmr_train::report::Slice {
                id: s.id.clone(),
                image: s.image.clone(),
                truth,
                prediction,
            });
        }
    }
    let header = cmr_train::report::Header {
        model: &cv.root().display().to_string(),
        data: "the training slices, each predicted by the fold model that did not train on it",
        settings: format!(
            "{}-fold cross-validation, TTA (8 views), clean-up {clean}.",
            spec.folds.k
        ),
    };
    let path = cmr_train::report::write(dir, &header, &acc.report(), acc.images(), &slices)?;
    tracing::info!("{}", path.display());
    Ok(())
}

/// Run the whole pipeline; the finished output folder.
pub fn run(opts: &ReproduceOptions) -> anyhow::Result<Vec<NetworkResult>> {
    if opts.archs.is_empty() {
        bail!("no architecture to reproduce");
    }
    let name = opts
        .out
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "out".into());
    let parent = opts
        .out
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let partial = parent.join(format!("{name}.partial"));
    std::fs::create_dir_all(partial.join("runs")).with_context(|| format!("creating {}", partial.display()))?;
    // one reproduction per output folder: a second one fails here, naming the first
    let lock = cmr_data::DirLock::acquire(&partial)?;

    let first = config_for(opts, opts.archs[0]);
    let mut dataset = Dataset::open(&opts.data, first.data.load_options())?;
    if let Some(n) = opts.train_limit {
        dataset.train.truncate(n);
    }
    let mut test = dataset.test.take().unwrap_or_default();
    if let Some(n) = opts.test_limit {
        test.truncate(n);
    }
    let samples = dataset.train;
    let folds = Folds::new(&samples, opts.folds, first.seed, first.data.grouping)?;
    tracing::info!(
        "{}-fold cross-validation over {} training slices ({}), {} test images",
        opts.folds,
        samples.len(),
        folds.grouping,
        test.len()
    );

    let mut results = Vec::new();
    for &arch in &opts.archs {
        let cfg = config_for(opts, arch);
        let spec = CvSpec {
            config: cfg.clone(),
            folds: Folds::new(&samples, opts.folds, cfg.seed, cfg.data.grouping)?,
        };
        let dir = partial.join("runs").join(arch.name());
        let train_seconds = train(&spec, &samples, &dir)?;
        let device = cfg.device.open()?;
        let plain = score(&dir, &spec, &samples, &device, Tta::None, PostProcess::NONE, false)?;
        let tta = score(&dir, &spec, &samples, &device, Tta::Dihedral, PostProcess::NONE, false)?;
        let (cv, _) = CvDir::open(&dir)?;
        let eight = PredictOptions {
            tta: Tta::Dihedral,
            kernels: cfg.kernels,
            ..PredictOptions::default()
        };
        let decision = decide_clean_up(&[(cv.clone(), spec.clone())], &samples, &device, eight, |_| {})?;
        cv.write_clean(&decision)?;
        let clean = decision.chosen;
        out_of_fold_report(
            &partial.join(format!("report-{}", arch.name())),
            &cv,
            &spec,
            &samples,
            &device,
            clean,
        )?;
        let tta_clean = score(&dir, &spec, &samples, &device, Tta::Dihedral, clean, false)?;
        let deformed = score(&dir, &spec, &samples, &device, Tta::Dihedral, clean, true)?;
        tracing::info!(
            "{}: cross-validated mean Dice {} (TTA {}, TTA + clean-up ({clean}) {}, deformed {})",
            arch.display_name(),
            fmt_sd(&plain.folds[3]),
            fmt_sd(&tta.folds[3]),
            fmt_sd(&tta_clean.folds[3]),
            fmt_sd(&deformed.folds[3])
        );
        if !test.is_empty() {
            let options = PredictOptions {
                tta: Tta::Dihedral,
                clean,
                kernels: cfg.kernels,
                ..PredictOptions::default()
            };
            let ensemble = Predictor::load_ensemble(&ensemble_members(&dir)?, &device, options)?;
            let masks = ensemble.predict(&test, |_| {})?;
            let rows: Vec<(String, cmr_data::Mask)> = test
                .iter()
                .zip(masks)
                .map(|(s, m)| (format!("{}_mask", s.id), m.unfit(s.original)))
                .collect();
            write_submission(&partial.join(format!("submission-{}.csv", arch.name())), &rows)?;
        }
        let mut seconds = Vec::new();
        for f in 0..opts.folds {
            let log = cmr_train::MetricsLog::read(&dir.join(format!("fold-{f}")).join(RunDir::METRICS))?;
            seconds.extend(log.records.iter().map(|r| r.seconds));
        }
        let stats = model_stats(&cfg.model, cfg.data.size, cfg.data.size)?;
        results.push(NetworkResult {
            arch,
            parameters: stats.parameters,
            size_mb: stats.size_mb,
            gflops: stats.gflops,
            folds: opts.folds,
            epochs: cfg.epochs,
            mean_epoch_seconds: seconds.iter().sum::<f64>() / seconds.len().max(1) as f64,
            train_seconds,
            config: cfg,
            plain,
            tta,
            tta_clean,
            deformed,
            clean,
        });
    }
    let best = results
        .iter()
        .max_by(|a, b| {
            a.chosen()
                .out_of_fold
                .mean_dice
                .total_cmp(&b.chosen().out_of_fold.mean_dice)
        })
        .map(|r| r.arch)
        .expect("at least one network");
    if !test.is_empty() {
        std::fs::copy(
            partial.join(format!("submission-{}.csv", best.name())),
            partial.join("submission.csv.tmp"),
        )
        .context("copying the best submission")?;
        std::fs::rename(partial.join("submission.csv.tmp"), partial.join("submission.csv"))
            .context("placing submission.csv")?;
    }
    cmr_data::write_atomic(
        &partial.join("REPORT.md"),
        report_md(opts, samples.len(), &folds, &results, best).as_bytes(),
    )?;

    // Swap the finished folder into place (without the lock's file: the
    // lock itself is held until this function returns).
    std::fs::remove_file(partial.join(cmr_data::DirLock::FILE))
        .with_context(|| format!("removing {}", partial.join(cmr_data::DirLock::FILE).display()))?;
    let old = parent.join(format!("{name}.old"));
    if old.exists() {
        std::fs::remove_dir_all(&old).with_context(|| format!("removing {}", old.display()))?;
    }
    if opts.out.exists() {
        std::fs::rename(&opts.out, &old).with_context(|| format!("moving the old {} aside", opts.out.display()))?;
    }
    std::fs::rename(&partial, &opts.out).with_context(|| format!("placing {}", opts.out.display()))?;
    if old.exists() {
        std::fs::remove_dir_all(&old).with_context(|| format!("removing {}", old.display()))?;
    }
    tracing::info!(
        "{}: REPORT.md, submission.csv, report-*/report.html, runs/",
        opts.out.display()
    );
    drop(lock);
    Ok(results)
}

/// Today's date (UTC) as `YYYY-MM-DD`, from the system clock.
pub fn today() -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    // days since 1970-01-01 to a civil date (H. Hinnant's algorithm)
    let z = (secs / 86_400) as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!("{y:04}-{m:02}-{d:02}")
}

/// Copy each network's fold ensemble (the fold models, their
/// configurations and logs, `cv.json`, `summary.json`) from the finished
/// output folder into `models/<arch>/`, with a README there recording the
/// command, the date and the cross-validated scores.
pub fn ship(opts: &ReproduceOptions, results: &[NetworkResult], models: &Path, command: &str) -> anyhow::Result<()> {
    let copy = |from: &Path, to: &Path| -> anyhow::Result<()> {
        let bytes = std::fs::read(from).with_context(|| format!("reading {}", from.display()))?;
        cmr_data::write_atomic(to, &bytes)?;
        Ok(())
    };
    for r in results {
        let from = opts.out.join("runs").join(r.arch.name());
        let staged = models.join(format!("{}.partial", r.arch.name()));
        if staged.exists() {
            std::fs::remove_dir_all(&staged).with_context(|| format!("removing {}", staged.display()))?;
        }
        for file in [CvDir::SPEC, CvDir::SUMMARY, CvDir::CLEAN] {
            std::fs::create_dir_all(&staged).with_context(|| format!("creating {}", staged.display()))?;
            copy(&from.join(file), &staged.join(file))?;
        }
        for f in 0..r.folds {
            let fold = format!("fold-{f}");
            std::fs::create_dir_all(staged.join(&fold)).with_context(|| format!("creating {}", staged.display()))?;
            for file in [RunDir::BEST, RunDir::CONFIG, RunDir::METRICS, RunDir::SPLITS] {
                copy(&from.join(&fold).join(file), &staged.join(&fold).join(file))?;
            }
        }
        let to = models.join(r.arch.name());
        if to.exists() {
            std::fs::remove_dir_all(&to).with_context(|| format!("removing {}", to.display()))?;
        }
        std::fs::rename(&staged, &to).with_context(|| format!("placing {}", to.display()))?;
    }
    for r in results {
        cmr_data::write_atomic(
            &models.join(r.arch.name()).join("README.md"),
            model_readme(r, command).as_bytes(),
        )?;
    }
    Ok(())
}

/// `models/<arch>/README.md`: how the shipped ensemble was made and what it
/// scores, cross-validated.
fn model_readme(r: &NetworkResult, command: &str) -> String {
    let mut s = format!(
        "# {}: a {}-fold ensemble

",
        r.arch.display_name(),
        r.folds
    );
    let _ = writeln!(
        s,
        "Trained by `{command}` on {} ({} CPU threads; {:.1} s an epoch). `cmr predict --model {} …` uses the ensemble of its folds: `cv.json` (recipe and folds), `fold-N/` (each fold's last weights, `config.json`, `metrics.csv`).
",
        today(),
        candle_core::utils::get_num_threads(),
        r.mean_epoch_seconds,
        r.arch.name()
    );
    let _ = writeln!(
        s,
        "Cross-validated over {} training slices, folds by patient: each fold's model on its own validation slices, mean ± SD over folds (and the mean over all slices, out of fold).
",
        r.plain.out_of_fold.images
    );
    let _ = writeln!(
        s,
        "| prediction | Dice RV | Dice Myo | Dice LV | mean Dice | out of fold |\n|---|---|---|---|---|---|"
    );
    for (name, c) in [
        ("one model", &r.plain),
        ("+ TTA (8 views)", &r.tta),
        ("+ TTA, clean-up", &r.tta_clean),
        ("deformed copies, as shipped", &r.deformed),
    ] {
        let _ = writeln!(
            s,
            "| {name} | {} | {} | {} | {} | {:.4} |",
            fmt_sd(&c.folds[0]),
            fmt_sd(&c.folds[1]),
            fmt_sd(&c.folds[2]),
            fmt_sd(&c.folds[3]),
            c.out_of_fold.mean_dice
        );
    }
    let _ = writeln!(
        s,
        "\nShipped with TTA; clean-up decided per class out of fold (`postprocess.json`, applied by `--clean`): {}.",
        r.clean
    );
    s
}
