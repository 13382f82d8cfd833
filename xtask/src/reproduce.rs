//! `cargo xtask reproduce`: data → train each network → evaluate on
//! validation → predict the test images → `submission.csv` → `REPORT.md`.
//!
//! Everything is built in `<out>.partial/` and moved to `<out>` only when
//! complete. An interrupted reproduction picks up where it stopped: finished
//! runs are kept, unfinished ones resumed, as long as their configuration is
//! the one asked for.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::time::Instant;

use anyhow::{Context, bail};
use cmr_data::{Dataset, LoadOptions, Splits, write_submission};
use cmr_loss::MetricsReport;
use cmr_models::{Architecture, model_stats};
use cmr_train::{
    DeviceSpec, EpochRecord, Observer, PredictOptions, Predictor, RunDir, TrainConfig, TrainPreset, Trainer,
    device_name,
};

/// What to reproduce.
#[derive(Clone, Debug)]
pub struct ReproduceOptions {
    pub preset: TrainPreset,
    pub archs: Vec<Architecture>,
    /// The installed dataset root.
    pub data: PathBuf,
    pub out: PathBuf,
    /// Override the preset's epochs (short runs, CI).
    pub epochs: Option<usize>,
    /// Use only the first N training slices / test images (short runs, CI).
    pub train_limit: Option<usize>,
    pub test_limit: Option<usize>,
    pub device: DeviceSpec,
}

/// What one network reached.
#[derive(Clone, Debug)]
pub struct NetworkResult {
    pub arch: Architecture,
    pub config: TrainConfig,
    pub parameters: usize,
    pub size_mb: f64,
    pub gflops: f64,
    pub best_epoch: usize,
    pub epochs_run: usize,
    pub mean_epoch_seconds: f64,
    pub train_seconds: f64,
    pub val: MetricsReport,
    pub val_tta: MetricsReport,
}

/// Logs one line per epoch.
struct EpochLog {
    arch: Architecture,
    epochs: usize,
}

impl Observer for EpochLog {
    fn epoch_end(&mut self, r: &EpochRecord, improved: bool) {
        tracing::info!(
            "{} epoch {}/{}: train loss {:.4}, val Dice {}, {:.1} s{}",
            self.arch,
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
    cfg
}

/// Train (or resume, or reuse) the run of `arch` in `dir`.
fn train(
    opts: &ReproduceOptions,
    arch: Architecture,
    cfg: &TrainConfig,
    splits: &Splits,
    dir: &Path,
) -> anyhow::Result<f64> {
    let started = Instant::now();
    let mut trainer = if dir.join(RunDir::CONFIG).exists() {
        let (run, existing) = RunDir::open(dir)?;
        let state = run.read_state()?;
        if existing != *cfg || state.is_none() {
            tracing::info!("{}: another or unstarted configuration; starting again", dir.display());
            std::fs::remove_dir_all(dir).with_context(|| format!("removing {}", dir.display()))?;
            Trainer::create(cfg.clone(), dir, cfg.device.open()?)?
        } else if state.as_ref().is_some_and(|s| s.finished) {
            tracing::info!("{}: already trained", dir.display());
            return Ok(0.0);
        } else {
            tracing::info!("{}: resuming", dir.display());
            Trainer::resume(dir, cfg.device.open()?, None)?
        }
    } else {
        Trainer::create(cfg.clone(), dir, cfg.device.open()?)?
    };
    tracing::info!(
        "training {} ({} preset, {} epochs) on {}",
        arch.display_name(),
        opts.preset,
        cfg.epochs,
        device_name(trainer.device())
    );
    let mut log = EpochLog {
        arch,
        epochs: cfg.epochs,
    };
    trainer.fit(splits, &mut log, &AtomicBool::new(false))?;
    Ok(started.elapsed().as_secs_f64())
}

fn fmt_dice(v: f64) -> String {
    format!("{v:.3}")
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

fn report_md(opts: &ReproduceOptions, splits: &Splits, results: &[NetworkResult], best: Architecture) -> String {
    let mut s = String::new();
    let _ = writeln!(s, "# cmr reproduction: `{}` preset\n", opts.preset);
    let _ = writeln!(
        s,
        "Made by `cargo xtask reproduce --preset {}{}{}{}` on {}, {} threads. Validation: {} ({} images; {} training images).\n",
        opts.preset,
        if opts.archs.len() == 3 {
            String::new()
        } else {
            format!(
                " --archs {}",
                opts.archs.iter().map(|a| a.name()).collect::<Vec<_>>().join(",")
            )
        },
        opts.epochs.map(|e| format!(" --epochs {e}")).unwrap_or_default(),
        opts.train_limit
            .map(|n| format!(" --train-limit {n}"))
            .unwrap_or_default(),
        std::env::consts::ARCH,
        candle_core::utils::get_num_threads(),
        splits.source,
        splits.val.len(),
        splits.train.len()
    );
    let _ = writeln!(
        s,
        "| network | depth | loss | optimiser | lr | parameters | size (MB) | GFLOPs | epochs (best) | epoch (s) | training (min) | Dice RV | Dice Myo | Dice LV | **mean Dice** | + TTA, clean | noise |"
    );
    let _ = writeln!(
        s,
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"
    );
    for r in results {
        let _ = writeln!(
            s,
            "| {} | {} | {} | {} | {} | {} | {:.1} | {:.2} | {} ({}) | {:.1} | {:.1} | {} | {} | {} | **{}** | {} | {:.2} |",
            r.arch.display_name(),
            r.config.model.depth(),
            r.config.loss.name(),
            r.config.optim.name(),
            r.config.optim.lr(),
            r.parameters,
            r.size_mb,
            r.gflops,
            r.epochs_run,
            r.best_epoch,
            r.mean_epoch_seconds,
            r.train_seconds / 60.0,
            fmt_dice(r.val.classes[0].dice),
            fmt_dice(r.val.classes[1].dice),
            fmt_dice(r.val.classes[2].dice),
            fmt_dice(r.val.mean_dice),
            fmt_dice(r.val_tta.mean_dice),
            r.val.noise_number
        );
    }
    let _ = writeln!(
        s,
        "\n`noise`: connected components per image beyond the largest of each class (8-connectivity), summed over the classes, without clean-up. `+ TTA, clean`: the same model with flip test-time augmentation and largest-component clean-up. `training (min)`: wall time of this invocation's training (0 when an earlier invocation trained it).\n"
    );
    let _ = writeln!(
        s,
        "`submission.csv` holds the test predictions of {} (best mean validation Dice), with TTA and clean-up; `submission-<arch>.csv` those of each network.\n",
        best.display_name()
    );
    let _ = writeln!(
        s,
        "## The seed report's figures (validation mean Dice, full-width networks, 200 epochs)\n"
    );
    let _ = writeln!(s, "| setting | mean Dice |\n|---|---|");
    for (k, v) in REPORT_FIGURES {
        let _ = writeln!(s, "| {k} | {v} |");
    }
    let _ = writeln!(s, "\n## Curves\n");
    for r in results {
        let _ = writeln!(
            s,
            "### {}\n\n![{} curves](runs/{}/curves.png)\n",
            r.arch.display_name(),
            r.arch.name(),
            r.arch.name()
        );
    }
    s
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

    let first = config_for(opts, opts.archs[0]);
    let mut dataset = Dataset::open(&opts.data, LoadOptions { size: first.data.size })?;
    if let Some(n) = opts.train_limit {
        dataset.train.truncate(n);
    }
    let mut test = dataset.test.take().unwrap_or_default();
    if let Some(n) = opts.test_limit {
        test.truncate(n);
    }
    let splits = Splits::from_dataset(&dataset, first.data.val_fraction, first.seed, first.data.grouping)?;
    tracing::info!(
        "{} training, {} validation ({}), {} test images",
        splits.train.len(),
        splits.val.len(),
        splits.source,
        test.len()
    );

    let mut results = Vec::new();
    for &arch in &opts.archs {
        let cfg = config_for(opts, arch);
        let dir = partial.join("runs").join(arch.name());
        let train_seconds = train(opts, arch, &cfg, &splits, &dir)?;
        let run = RunDir::at(&dir);
        let state = run.read_state()?.context("a trained run has a state")?;
        let records = cmr_train::MetricsLog::read(&run.file(RunDir::METRICS))?.records;
        let device = cfg.device.open()?;
        let plain = Predictor::load(&dir, &device, PredictOptions::default())?;
        let val = plain.evaluate(&splits.val, None)?.metrics.report();
        let tta_opts = PredictOptions {
            tta: cmr_train::Tta::Dihedral,
            clean: true,
            ..PredictOptions::default()
        };
        let tta = Predictor::load(&dir, &device, tta_opts)?;
        let val_tta = tta.evaluate(&splits.val, None)?.metrics.report();
        tracing::info!(
            "{}: validation mean Dice {:.4} (TTA + clean {:.4})",
            arch.display_name(),
            val.mean_dice,
            val_tta.mean_dice
        );
        if !test.is_empty() {
            let masks = tta.predict(&test, |_| {})?;
            let rows: Vec<(String, cmr_data::Mask)> = test
                .iter()
                .zip(masks)
                .map(|(s, m)| (format!("{}_mask", s.id), m.unfit(s.original)))
                .collect();
            write_submission(&partial.join(format!("submission-{}.csv", arch.name())), &rows)?;
        }
        let stats = model_stats(&cfg.model, cfg.data.size, cfg.data.size)?;
        results.push(NetworkResult {
            arch,
            parameters: stats.parameters,
            size_mb: stats.size_mb,
            gflops: stats.gflops,
            best_epoch: state.best.as_ref().map_or(0, |b| b.epoch),
            epochs_run: state.epochs_done,
            mean_epoch_seconds: records.iter().map(|r| r.seconds).sum::<f64>() / records.len().max(1) as f64,
            train_seconds,
            config: cfg,
            val,
            val_tta,
        });
    }
    let best = results
        .iter()
        .max_by(|a, b| a.val_tta.mean_dice.total_cmp(&b.val_tta.mean_dice))
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
        report_md(opts, &splits, &results, best).as_bytes(),
    )?;

    // Swap the finished folder into place.
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
    tracing::info!("{}: REPORT.md, submission.csv, runs/", opts.out.display());
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

/// Copy each network's best model and its configuration from the finished
/// output folder into `models/<arch>/`, with a README recording the command,
/// the date and the held-out scores.
pub fn ship(opts: &ReproduceOptions, results: &[NetworkResult], models: &Path, command: &str) -> anyhow::Result<()> {
    for r in results {
        let from = opts.out.join("runs").join(r.arch.name());
        let to = models.join(r.arch.name());
        std::fs::create_dir_all(&to).with_context(|| format!("creating {}", to.display()))?;
        for file in [RunDir::BEST, RunDir::CONFIG, RunDir::METRICS] {
            let bytes =
                std::fs::read(from.join(file)).with_context(|| format!("reading {}", from.join(file).display()))?;
            cmr_data::write_atomic(&to.join(file), &bytes)?;
        }
    }
    let mut s = String::from("# Shipped models\n\n");
    let _ = writeln!(
        s,
        "Trained by `{command}` on {} (2 CPU threads). `cmr predict --model <name> …` finds them by name (`segnet`, `unet`, `unet3plus`). Each folder holds the best model on validation (`model.safetensors`), the full training configuration (`config.json`) and the per-epoch log (`metrics.csv`).\n",
        today()
    );
    let _ = writeln!(
        s,
        "Validation: the seeded 20 % hold-out of `train/` (seed 42), which the shared copy of the data needs since it has no `val/`.\n"
    );
    let _ = writeln!(
        s,
        "| model | parameters | epochs | Dice RV | Dice Myo | Dice LV | mean Dice | + TTA, clean |\n|---|---|---|---|---|---|---|---|"
    );
    for r in results {
        let _ = writeln!(
            s,
            "| {} | {} | {} (best {}) | {:.4} | {:.4} | {:.4} | {:.4} | {:.4} |",
            r.arch.name(),
            r.parameters,
            r.epochs_run,
            r.best_epoch,
            r.val.classes[0].dice,
            r.val.classes[1].dice,
            r.val.classes[2].dice,
            r.val.mean_dice,
            r.val_tta.mean_dice
        );
    }
    cmr_data::write_atomic(&models.join("README.md"), s.as_bytes())?;
    Ok(())
}
