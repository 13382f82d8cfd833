//! `cmr train`: build the recipe from preset, file and flags; train or resume.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use anyhow::{Context, bail};
use cmr_data::{AugmentConfig, Dataset, Folds, Sample};
use cmr_loss::Loss;
use cmr_models::Architecture;
use cmr_train::{
    ConfigChanges, CvDir, CvOutcome, CvSpec, EarlyStopping, Outcome, PseudoLabels, TrainConfig, Trainer, check_teacher,
    device_name, load_splits, train_folds,
};

use crate::args::{AugmentChoice, LossChoice, TrainArgs};
use crate::commands::open_device;
use crate::progress::TrainProgress;
use crate::text::count;

/// The architecture named by `[model] arch` in a TOML file, if any.
fn arch_in_toml(path: &Path) -> anyhow::Result<Option<Architecture>> {
    let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let table: toml::Table = toml::from_str(&text).with_context(|| format!("parsing {}", path.display()))?;
    let Some(arch) = table.get("model").and_then(|m| m.get("arch")).and_then(|a| a.as_str()) else {
        return Ok(None);
    };
    arch.parse()
        .map(Some)
        .map_err(|e: String| anyhow::anyhow!("{}: {e}", path.display()))
}

/// Preset, then the TOML file, then the flags.
fn build_config(args: &TrainArgs) -> anyhow::Result<TrainConfig> {
    let arch = match (args.arch, &args.config) {
        (Some(a), _) => a,
        (None, Some(path)) => {
            arch_in_toml(path)?.with_context(|| format!("{}: no [model] arch; give --arch", path.display()))?
        }
        (None, None) => bail!("give --arch (segnet, unet or unet3plus)"),
    };
    let mut cfg = TrainConfig::preset(args.preset, arch);
    if let Some(path) = &args.config {
        cfg = cfg.overlay_toml(path)?;
        if args.arch.is_some_and(|a| a != cfg.model.architecture()) {
            bail!(
                "--arch {arch} disagrees with {} (model.arch = {})",
                path.display(),
                cfg.model.architecture()
            );
        }
    }
    apply_flags(&mut cfg, args);
    apply_deep_supervision(&mut cfg, args)?;
    // a volume dataset's slices go by patient, whatever the recipe groups by
    if !args.data.join("train").exists()
        && let Some(volumes) = cmr_data::find_volume_dataset(&args.data)?
    {
        if cfg.data.grouping != cmr_data::Grouping::Volume {
            tracing::info!(
                "{}: a volume dataset: its slices are grouped by patient (data.grouping = volume)",
                args.data.display()
            );
        }
        cfg.data.grouping = cmr_data::Grouping::Volume;
        // slices resampled to one in-plane spacing: the recipe's, else the
        // median of the training set (as nnU-Net chooses it)
        if cfg.data.spacing_mm.is_none() {
            let median = volumes.median_spacing()?;
            tracing::info!(
                "{}: slices resampled to {median} mm in plane, the median spacing (data.spacing_mm)",
                args.data.display()
            );
            cfg.data.spacing_mm = Some(median);
        }
    }
    if let Some(kernels) = crate::env::kernels(cfg.kernels)? {
        cfg.kernels = kernels;
    }
    if let Some(choice) = args.precision {
        cfg.kernels.precision = crate::commands::precision(choice);
    }
    cfg.validate()?;
    Ok(cfg)
}

/// `--deep-supervision`, which only U-Net 3+ has.
fn apply_deep_supervision(cfg: &mut TrainConfig, args: &TrainArgs) -> anyhow::Result<()> {
    if args.deep_supervision {
        match &mut cfg.model {
            cmr_models::ModelConfig::UNet3Plus(c) => c.deep_supervision = true,
            other => bail!("--deep-supervision is for U-Net 3+, not {}", other.architecture()),
        }
    }
    Ok(())
}

fn apply_flags(cfg: &mut TrainConfig, args: &TrainArgs) {
    if let Some(e) = args.epochs {
        cfg.epochs = e;
    }
    if let Some(b) = args.batch_size {
        cfg.batch_size = b;
    }
    if let Some(lr) = args.lr {
        cfg.optim.set_lr(lr);
    }
    if let Some(s) = args.seed {
        cfg.seed = s;
    }
    if let Some(decay) = args.ema {
        cfg.ema = Some(cmr_train::EmaConfig { decay });
    }
    if let Some(v) = args.val_every {
        cfg.val_every = v;
    }
    if let Some(p) = args.patience {
        cfg.early_stopping = Some(EarlyStopping {
            patience: p,
            min_delta: 0.0,
        });
    }
    if let Some(d) = args.device.device {
        cfg.device = d;
    }
    match args.loss {
        Some(LossChoice::SoftDice) => cfg.loss = Loss::soft_dice(),
        Some(LossChoice::Ce) => cfg.loss = Loss::cross_entropy(),
        Some(LossChoice::DiceCe) => cfg.loss = Loss::dice_ce(1.0, 1.0),
        None => {}
    }
    match args.augment {
        Some(AugmentChoice::None) => cfg.data.augment = AugmentConfig::none(),
        Some(AugmentChoice::Report) => cfg.data.augment = AugmentConfig::report(),
        Some(AugmentChoice::Strong) => cfg.data.augment = AugmentConfig::strong(),
        Some(AugmentChoice::Robust) => cfg.data.augment = AugmentConfig::robust(),
        None => {}
    }
}

/// Refuse an output folder inside the dataset: its files would be read as
/// data by the next training (or break it).
fn check_out_of_data(out: &Path, data: &Path) -> anyhow::Result<()> {
    let out_abs = std::path::absolute(out).unwrap_or_else(|_| out.to_path_buf());
    let inside = [data.canonicalize().ok(), std::path::absolute(data).ok()]
        .into_iter()
        .flatten()
        .any(|d| out_abs.starts_with(&d));
    if inside {
        bail!(
            "{}: the output folder is inside the dataset {}: choose one outside it",
            out.display(),
            data.display()
        );
    }
    Ok(())
}

/// The recipe `cfg` with the flags laid over it, and the settings that
/// differ; another network is an error.
type Differences = Vec<(String, String, String)>;

fn flag_differences(cfg: &TrainConfig, args: &TrainArgs, run: &Path) -> anyhow::Result<(TrainConfig, Differences)> {
    if let Some(a) = args.arch.filter(|a| *a != cfg.model.architecture()) {
        bail!(
            "{}: the run trains {}, not {a}: a resumed run keeps its network (start a new run with --out)",
            run.display(),
            cfg.model.architecture()
        );
    }
    let mut wanted = cfg.clone();
    apply_flags(&mut wanted, args);
    apply_deep_supervision(&mut wanted, args)?;
    if let Some(kernels) = crate::env::kernels(cfg.kernels)? {
        wanted.kernels = kernels;
    }
    if let Some(choice) = args.precision {
        wanted.kernels.precision = crate::commands::precision(choice);
    }
    let differences = cfg.differences(&wanted);
    Ok((wanted, differences))
}

/// What the flags given with `--resume` change in the run's recipe `cfg`:
/// the settings a resume may change, or an error listing those it may not.
fn resume_changes(cfg: &TrainConfig, args: &TrainArgs, run: &Path) -> anyhow::Result<ConfigChanges> {
    let (wanted, differences) = flag_differences(cfg, args, run)?;
    let fixed: Vec<String> = differences
        .iter()
        .filter(|(key, ..)| !ConfigChanges::may_change(key))
        .map(|(key, old, new)| format!("{key} {old} → {new}"))
        .collect();
    if !fixed.is_empty() {
        bail!(
            "{}: a resumed run keeps its recipe, and these flags would change it: {} (only --epochs, --val-every, --patience and --device may change; start a new run with --out to train another recipe)",
            run.display(),
            fixed.join(", ")
        );
    }
    for (key, old, new) in &differences {
        tracing::info!("{}: {key} changes from {old} to {new}", run.display());
    }
    Ok(ConfigChanges {
        epochs: args.epochs,
        val_every: args.val_every,
        early_stopping: args.patience.and(wanted.early_stopping),
        device: args.device.device,
        kernels: Some(wanted.kernels).filter(|k| *k != cfg.kernels),
    })
}

/// `runs/<arch>-<preset>` (`-cv<K>`, or `-cv` with `--folds-from`, for a
/// cross-validation), or the first
/// free `-2`, `-3` … after it.
fn default_out(cfg: &TrainConfig, args: &TrainArgs) -> PathBuf {
    let mut base = format!("{}-{}", cfg.model.architecture(), args.preset);
    match args.folds {
        Some(k) => base = format!("{base}-cv{k}"),
        None if args.folds_from.is_some() => base = format!("{base}-cv"),
        None => {}
    }
    let runs = PathBuf::from("runs");
    let mut candidate = runs.join(&base);
    let mut n = 2;
    while candidate.exists() {
        candidate = runs.join(format!("{base}-{n}"));
        n += 1;
    }
    candidate
}

/// Ctrl-C (or SIGTERM, as a scheduler sends it) once: finish the step, save,
/// stop. Twice: exit at once (the last checkpoint stays whole).
fn stop_flag() -> anyhow::Result<Arc<AtomicBool>> {
    let stop = Arc::new(AtomicBool::new(false));
    let handler = stop.clone();
    ctrlc::set_handler(move || {
        if handler.swap(true, Ordering::SeqCst) {
            eprintln!("\ninterrupted twice: exiting without saving the current step");
            std::process::exit(130);
        }
        eprintln!("\ninterrupt: finishing the current step and saving (Ctrl-C again to exit now)");
    })
    .context("installing the Ctrl-C handler")?;
    Ok(stop)
}

pub fn run(args: TrainArgs) -> anyhow::Result<ExitCode> {
    if let Some(dir) = args.resume.as_ref().filter(|d| CvDir::is_cv(d)) {
        if args.allow_other_data {
            bail!("a cross-validation's folds fix its data: --allow-other-data does not apply");
        }
        let (mut cv, spec) = CvDir::open(dir)?;
        return run_cv(&mut cv, &spec, &args);
    }
    if args.folds.is_some() || args.folds_from.is_some() {
        let mut cfg = build_config(&args)?;
        // each fold is scored on its validation slices: they must choose nothing
        cfg.keep = cmr_train::Keep::Last;
        let (samples, _) = train_samples(&args.data, &cfg)?;
        let folds = match (&args.folds_from, args.folds) {
            (Some(from), k) => {
                let (_, other) = CvDir::open(from)?;
                if k.is_some_and(|k| k != other.folds.k) {
                    bail!(
                        "--folds {} disagrees with the {} folds of {}",
                        k.unwrap_or(0),
                        other.folds.k,
                        from.display()
                    );
                }
                // the same ids, or training a fold would fail half-way
                other
                    .folds
                    .split(&samples, 0)
                    .with_context(|| format!("the folds of {}", from.display()))?;
                other.folds
            }
            (None, Some(k)) => Folds::new(&samples, k, cfg.seed, cfg.data.grouping)
                .with_context(|| format!("making {k} folds of {}", args.data.display()))?,
            (None, None) => unreachable!("checked above"),
        };
        if let Some(teacher) = &args.pseudo_labels_from {
            check_teacher(teacher, &folds).with_context(|| format!("the teacher {}", teacher.display()))?;
            // recorded absolute: a resume from another folder finds it
            let teacher = std::path::absolute(teacher).unwrap_or_else(|_| teacher.clone());
            cfg.data.pseudo_labels = Some(PseudoLabels {
                teacher,
                tta: cmr_train::Tta::Dihedral,
            });
        }
        let out = args.out.clone().unwrap_or_else(|| default_out(&cfg, &args));
        check_out_of_data(&out, &args.data)?;
        let spec = CvSpec { config: cfg, folds };
        let mut cv = CvDir::create(&out, &spec)
            .with_context(|| format!("starting the cross-validation in {}", out.display()))?;
        return run_cv(&mut cv, &spec, &args);
    }
    // Read and validate the data before anything is written.
    let (mut trainer, splits) = match &args.resume {
        Some(run) => {
            let (_, cfg) = cmr_train::RunDir::open(run)?;
            let changes = resume_changes(&cfg, &args, run)?;
            let splits = load_splits(&args.data, &cfg).with_context(|| format!("loading {}", args.data.display()))?;
            let device = open_device(&args.device, changes.device.unwrap_or(cfg.device))?;
            let mut t =
                Trainer::resume(run, device, &changes).with_context(|| format!("resuming {}", run.display()))?;
            if args.allow_other_data {
                t.set_other_data(cmr_train::OtherData::Allow);
            }
            tracing::info!(
                "resuming {} after epoch {} (batch {})",
                run.display(),
                t.state().epochs_done,
                t.state().batches_done
            );
            (t, splits)
        }
        None => {
            let cfg = build_config(&args)?;
            let splits = load_splits(&args.data, &cfg).with_context(|| format!("loading {}", args.data.display()))?;
            let out = args.out.clone().unwrap_or_else(|| default_out(&cfg, &args));
            check_out_of_data(&out, &args.data)?;
            let device = open_device(&args.device, cfg.device)?;
            let t =
                Trainer::create(cfg, &out, device).with_context(|| format!("starting the run in {}", out.display()))?;
            (t, splits)
        }
    };
    let cfg = trainer.config().clone();
    let run_dir = trainer.run().root().to_path_buf();
    crate::logging::also_to(&run_dir.join("train.log"))?;
    tracing::info!(
        "{} ({} parameters) on {}: {} training and {} validation images (validation: {}), {}, run {}",
        cfg.model.architecture().display_name(),
        cmr_models::count_parameters(trainer.varmap()),
        device_name(trainer.device()),
        splits.train.len(),
        splits.val.len(),
        splits.source,
        count(cfg.epochs, "epoch"),
        run_dir.display()
    );
    let stop = stop_flag()?;
    let mut progress = TrainProgress::new(cfg.epochs, trainer.state().epochs_done);
    let outcome = trainer.fit(&splits, &mut progress, &stop);
    progress.finish();
    match outcome? {
        Outcome::Finished { best } | Outcome::StoppedEarly { best, .. } => {
            match best {
                Some(b) => tracing::info!(
                    "best validation Dice {:.4} at epoch {}: {}",
                    b.mean_dice,
                    b.epoch,
                    run_dir.join(cmr_train::RunDir::BEST).display()
                ),
                None => tracing::warn!("no validation ran: no best model saved"),
            }
            Ok(ExitCode::SUCCESS)
        }
        Outcome::Interrupted { epoch, batches_done } => {
            tracing::warn!(
                "interrupted in epoch {epoch} after {batches_done} batches; saved. Continue with: cmr train --resume {} --data {}",
                run_dir.display(),
                args.data.display()
            );
            Ok(ExitCode::from(130))
        }
    }
}

/// The labelled `train/` slices of the dataset at `root`, fitted to the
/// recipe's size (a cross-validation runs over these; `val/`, if any, is
/// left for a final check), and its unlabelled `test/` images (none without
/// that folder).
fn train_samples(root: &Path, cfg: &TrainConfig) -> anyhow::Result<(Vec<Sample>, Vec<Sample>)> {
    let dataset =
        Dataset::open(root, cfg.data.load_options()).with_context(|| format!("loading {}", root.display()))?;
    if dataset.val.is_some() {
        tracing::info!(
            "{}: cross-validating over train/ only (val/ is not used)",
            root.display()
        );
    }
    Ok((dataset.train, dataset.test.unwrap_or_default()))
}

/// Train (or continue) every fold of a cross-validation.
fn run_cv(cv: &mut CvDir, spec: &CvSpec, args: &TrainArgs) -> anyhow::Result<ExitCode> {
    crate::logging::also_to(&cv.root().join("train.log"))?;
    if args.resume.is_some() {
        let (_, differences) = flag_differences(&spec.config, args, cv.root())?;
        let changed: Vec<String> = differences
            .into_iter()
            .filter(|(key, ..)| key != "device")
            .map(|(key, ..)| key)
            .collect();
        if !changed.is_empty() {
            bail!(
                "{}: a cross-validation resumes with its own recipe (cv.json), and these flags would change it: {} (its folds share one recipe)",
                cv.root().display(),
                changed.join(", ")
            );
        }
    }
    let (samples, unlabelled) = train_samples(&args.data, &spec.config)?;
    let device = open_device(&args.device, spec.config.device)?;
    let cfg = &spec.config;
    tracing::info!(
        "{}-fold cross-validation of {} ({} each) over {} slices ({}) on {}: {}",
        spec.folds.k,
        cfg.model.architecture().display_name(),
        count(cfg.epochs, "epoch"),
        samples.len(),
        spec.folds.grouping,
        device_name(&device),
        cv.root().display()
    );
    let stop = stop_flag()?;
    let mut progress = TrainProgress::new(cfg.epochs, 0);
    if let Some(p) = &cfg.data.pseudo_labels {
        tracing::info!(
            "self-training: each fold also trains on the {} unlabelled images, labelled by that fold of {}",
            unlabelled.len(),
            p.teacher.display()
        );
    }
    let outcome = train_folds(cv, spec, &samples, &unlabelled, &device, &mut progress, &stop);
    progress.finish();
    match outcome.with_context(|| format!("training {}", cv.root().display()))? {
        CvOutcome::Finished(summary) => {
            for f in &summary.folds {
                tracing::info!(
                    "fold {}: best validation Dice {} at epoch {} ({})",
                    f.fold,
                    f.best_mean_dice.map_or("-".into(), |d| format!("{d:.4}")),
                    f.best_epoch.map_or("-".into(), |e| e.to_string()),
                    count(f.validation_images, "image")
                );
            }
            if let Some(m) = summary.best_mean_dice {
                tracing::info!(
                    "best validation Dice during training {m} over {} folds (optimistic: chosen on those slices); the kept models' scores: cmr eval --model {} --data {}",
                    m.n,
                    cv.root().display(),
                    args.data.display()
                );
            }
            Ok(ExitCode::SUCCESS)
        }
        CvOutcome::Interrupted { fold } => {
            tracing::warn!(
                "interrupted in fold {fold}; saved. Continue with: cmr train --resume {} --data {}",
                cv.root().display(),
                args.data.display()
            );
            Ok(ExitCode::from(130))
        }
    }
}
