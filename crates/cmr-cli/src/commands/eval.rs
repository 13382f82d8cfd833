//! `cmr eval`: metrics of a model, an ensemble or a cross-validation on a
//! labelled split, optionally on deformed copies of it.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, bail};
use cmr_data::{AugmentConfig, Dataset, Labels, LoadOptions, Sample, deform_sample, load_split};
use cmr_train::{CvDir, DeviceSpec, decide_clean_up, evaluate_fold_ensembles, load_splits};

use crate::args::{EvalArgs, SplitChoice};
use crate::commands::{load_members, member_split, model_members, open_device, predict_options};
use crate::progress::image_bar;
use crate::text::count;
use crate::text::outln;

/// The identity, or the deformed copy of `--deform SEED`.
fn transform(deform: Option<u64>) -> impl Fn(&Sample) -> Sample {
    let config = AugmentConfig::deformed_test();
    move |s: &Sample| match deform {
        Some(seed) => deform_sample(s, &config, seed),
        None => s.clone(),
    }
}

pub fn run(args: EvalArgs) -> anyhow::Result<ExitCode> {
    if let Some(ds) = cmr_data::find_volume_dataset(&args.data)? {
        return crate::commands::eval_volumes::run(&args, ds);
    }
    if let Some(pred) = &args.pred {
        return run_pred(pred, &args);
    }
    let model = args
        .model
        .clone()
        .context("give --model M, or --pred DIR to score masks")?;
    if !args.data.join("image").is_dir() {
        let paths = model
            .split(',')
            .map(|m| crate::models::resolve(m.trim()))
            .collect::<anyhow::Result<Vec<_>>>()?;
        if paths.iter().all(|p| CvDir::is_cv(p)) {
            return run_cv(&paths, &args);
        }
    }
    let members = model_members(&model)?;
    let predictor = load_members(&members, &model, &args.inference)?;
    let config = predictor.config().clone();
    let opts = config.data.load_options();
    let records = members
        .iter()
        .map(|m| member_split(m))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let (samples, split) = if args.split == SplitChoice::Val {
        own_validation(&args, &members, &records, opts)?
    } else if args.data.join("image").is_dir() {
        (
            load_split(&args.data, Labels::Required, opts)?,
            args.data.display().to_string(),
        )
    } else {
        let splits = load_splits(&args.data, &config).with_context(|| {
            format!(
                "{}: neither a split folder (image/, mask/) nor a dataset root",
                args.data.display()
            )
        })?;
        let what = format!("{} ({})", args.data.display(), splits.source);
        (splits.val, what)
    };
    for (member, record) in members.iter().zip(&records) {
        let Some(record) = record else { continue };
        let seen = record.trained_on(samples.iter().map(|s| s.id.as_str()));
        if seen > 0 {
            tracing::warn!(
                "{seen} of the {} slices scored trained {}: the score is optimistic (--split val scores its validation slices only)",
                samples.len(),
                member.display()
            );
        }
    }
    let samples: Vec<Sample> = samples.iter().map(transform(args.deform)).collect();
    tracing::info!(
        "evaluating on {} of {split}{}",
        count(samples.len(), "image"),
        args.deform
            .map(|s| format!(", deformed (seed {s})"))
            .unwrap_or_default()
    );
    let bar = image_bar(samples.len(), "eval");
    let eval = predictor.evaluate(&samples, None)?;
    bar.finish_and_clear();
    let report = eval.metrics.report();
    let options = *predictor.options();
    if let Some(dir) = &args.report {
        let slices: Vec<cmr_train::report::Slice> = samples
            .iter()
            .zip(eval.masks.iter().cloned())
            .map(|(s, prediction)| cmr_train::report::Slice {
                id: s.id.clone(),
                image: s.image.clone(),
                truth: s.mask.clone().unwrap_or_else(|| prediction.map(|_| 0)),
                prediction,
            })
            .collect();
        let settings = format!(
            "{} member(s); TTA {:?}; clean-up {}{}.",
            predictor.members().len(),
            options.tta,
            options.clean,
            args.deform
                .map(|s| format!("; deformed copies (seed {s})"))
                .unwrap_or_default()
        );
        let header = cmr_train::report::Header {
            model: &model,
            data: &split,
            settings,
        };
        let path = cmr_train::report::write(dir, &header, &report, eval.metrics.images(), &slices)?;
        tracing::info!("{}", path.display());
    }
    if args.json {
        let mut value = serde_json::to_value(&report)?;
        value["model"] = model.clone().into();
        value["data"] = split.into();
        value["members"] = predictor.members().len().into();
        value["tta"] = serde_json::to_value(options.tta)?;
        value["clean"] = serde_json::to_value(options.clean)?;
        value["deform_seed"] = serde_json::to_value(args.deform)?;
        value["definitions"] = cmr_loss::DEFINITIONS.into();
        for c in &report.classes {
            value[format!("dice_{}", c.class.to_lowercase())] = c.dice.into();
        }
        if args.per_image {
            value["per_image"] = serde_json::to_value(eval.metrics.images())?;
        }
        outln!("{}", serde_json::to_string_pretty(&value)?)?;
    } else {
        if args.per_image {
            print_per_image(eval.metrics.images())?;
        }
        outln!("{report}")?;
    }
    Ok(ExitCode::SUCCESS)
}

/// `--decide-clean`: the out-of-fold Dice of every clean-up rule per class,
/// and the choice recorded in the (single) CV folder.
fn decide_clean(
    cvs: &[(CvDir, cmr_train::CvSpec)],
    samples: &[Sample],
    device: &candle_core::Device,
    options: cmr_train::PredictOptions,
    args: &EvalArgs,
) -> anyhow::Result<ExitCode> {
    let bar = image_bar(samples.len(), "clean-up");
    let decision = decide_clean_up(cvs, samples, device, options, |done| bar.set_position(done as u64))?;
    bar.finish_and_clear();
    if cvs.len() == 1 {
        cvs[0].0.write_clean(&decision)?;
        tracing::info!("{}: recorded", cvs[0].0.root().join(CvDir::CLEAN).display());
    } else {
        tracing::warn!("an ensemble of cross-validations: the decision is printed, not recorded");
    }
    if args.json {
        outln!("{}", serde_json::to_string_pretty(&decision)?)?;
        return Ok(ExitCode::SUCCESS);
    }
    outln!(
        "out-of-fold Dice per clean-up rule ({} images, TTA {}):",
        decision.images,
        decision.tta
    )?;
    for (class, name) in [(1u8, "RV"), (2, "Myo"), (3, "LV")] {
        let row: Vec<String> = decision
            .dice
            .iter()
            .filter(|(c, _, _)| *c == class)
            .map(|(_, r, d)| format!("{} {d:.4}", r.name()))
            .collect();
        outln!(
            "{name:<4} {}   -> {}",
            row.join(", "),
            decision.chosen.rule(class).name()
        )?;
    }
    Ok(ExitCode::SUCCESS)
}

/// `--split val`: the recorded validation slices of a single model, found
/// among the labelled slices of `--data` (a split folder, or a dataset root's
/// train/ and val/).
fn own_validation(
    args: &EvalArgs,
    members: &[PathBuf],
    records: &[Option<cmr_data::SplitRecord>],
    opts: LoadOptions,
) -> anyhow::Result<(Vec<Sample>, String)> {
    let ([member], [record]) = (members, records) else {
        bail!("--split val needs one model (an ensemble's members validated on different slices)");
    };
    let record = record.as_ref().with_context(|| {
        format!(
            "{}: no splits.json (trained before splits were recorded)",
            member.display()
        )
    })?;
    let all = if args.data.join("image").is_dir() {
        load_split(&args.data, Labels::Required, opts)?
    } else {
        let dataset = Dataset::open(&args.data, opts).with_context(|| format!("loading {}", args.data.display()))?;
        dataset
            .train
            .into_iter()
            .chain(dataset.val.unwrap_or_default())
            .collect()
    };
    let wanted: std::collections::BTreeSet<&str> = record.val.iter().map(String::as_str).collect();
    let samples: Vec<Sample> = all.into_iter().filter(|s| wanted.contains(s.id.as_str())).collect();
    if samples.is_empty() {
        bail!(
            "{}: none of the model's {} validation slices",
            args.data.display(),
            record.val.len()
        );
    }
    if samples.len() < record.val.len() {
        tracing::warn!(
            "{}: {} of the model's {} validation slices are not there",
            args.data.display(),
            record.val.len() - samples.len(),
            record.val.len()
        );
    }
    let what = format!(
        "{} (the model's validation slices, {})",
        args.data.display(),
        record.source
    );
    Ok((samples, what))
}

fn print_per_image(images: &[cmr_loss::ImageMetrics]) -> std::io::Result<()> {
    outln!("{:<12} {:>8} {:>8} {:>8} {:>8}", "image", "RV", "Myo", "LV", "mean")?;
    for m in images {
        outln!(
            "{:<12} {:>8.4} {:>8.4} {:>8.4} {:>8.4}",
            m.id,
            m.dice[0],
            m.dice[1],
            m.dice[2],
            m.mean_dice()
        )?;
    }
    outln!()
}

/// Cross-validated scores of CV folders on the same folds: each fold's model
/// (or the ensemble of the folders' fold models) on its own validation slices
/// of `train/`.
fn run_cv(paths: &[PathBuf], args: &EvalArgs) -> anyhow::Result<ExitCode> {
    if args.report.is_some() {
        bail!("--report scores one model or ensemble on one split; for a cross-validation give --data a split folder");
    }
    let cvs = paths
        .iter()
        .map(|p| CvDir::open(p).with_context(|| format!("reading {}", p.display())))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let spec = cvs[0].1.clone();
    let path = &paths[0];
    let dataset = Dataset::open(&args.data, spec.config.data.load_options())
        .with_context(|| format!("loading {}", args.data.display()))?;
    let device = open_device(&args.inference.device, DeviceSpec::Auto)?;
    let recorded = if cvs.len() == 1 {
        cvs[0].0.read_clean()?.map(|d| d.chosen)
    } else {
        None
    };
    let options = predict_options(&args.inference, recorded)?;
    if args.decide_clean {
        return decide_clean(&cvs, &dataset.train, &device, options, args);
    }
    tracing::info!(
        "cross-validation {}{}: {} folds ({}), each fold's model on its own validation slices of {}/train{}",
        path.display(),
        if cvs.len() > 1 {
            format!(" and {} more (fold ensembles)", cvs.len() - 1)
        } else {
            String::new()
        },
        spec.folds.k,
        spec.folds.grouping,
        args.data.display(),
        args.deform
            .map(|s| format!(", deformed (seed {s})"))
            .unwrap_or_default()
    );
    let bar = image_bar(dataset.train.len(), "eval");
    let report = evaluate_fold_ensembles(
        &cvs,
        &dataset.train,
        &device,
        options,
        &transform(args.deform),
        |done| bar.set_position(done as u64),
    )
    .with_context(|| format!("evaluating {}", args.model.as_deref().unwrap_or_default()))?;
    bar.finish_and_clear();
    let stats = report.fold_dice();
    let oof = report.out_of_fold.report();
    if args.json {
        let names = ["rv", "myo", "lv", "mean"];
        let fold_stats: serde_json::Map<String, serde_json::Value> = names
            .iter()
            .zip(stats)
            .map(|(n, s)| Ok((n.to_string(), serde_json::to_value(s)?)))
            .collect::<Result<_, serde_json::Error>>()?;
        let mut value = serde_json::json!({
            "model": args.model.as_deref().unwrap_or_default(),
            "data": args.data.display().to_string(),
            "k": spec.folds.k,
            "cross_validations": cvs.len(),
            "grouping": spec.folds.grouping,
            "tta": options.tta,
            "clean": options.clean,
            "deform_seed": args.deform,
            "dice_over_folds": fold_stats,
            "folds": report.folds,
            "out_of_fold": oof,
            "definitions": cmr_loss::DEFINITIONS,
        });
        if args.per_image {
            value["per_image"] = serde_json::to_value(report.out_of_fold.images())?;
        }
        outln!("{}", serde_json::to_string_pretty(&value)?)?;
        return Ok(ExitCode::SUCCESS);
    }
    if args.per_image {
        print_per_image(report.out_of_fold.images())?;
    }
    outln!(
        "{:<10} {:>8} {:>8} {:>8} {:>8} {:>7}",
        "fold",
        "RV",
        "Myo",
        "LV",
        "mean",
        "images"
    )?;
    for (f, r) in report.folds.iter().enumerate() {
        outln!(
            "{:<10} {:>8.4} {:>8.4} {:>8.4} {:>8.4} {:>7}",
            f,
            r.classes[0].dice,
            r.classes[1].dice,
            r.classes[2].dice,
            r.mean_dice,
            r.images
        )?;
    }
    outln!(
        "{:<10} {:>8} {:>8} {:>8} {:>8}",
        "mean ± SD",
        format!("{:.3}±{:.3}", stats[0].mean, stats[0].sd),
        format!("{:.3}±{:.3}", stats[1].mean, stats[1].sd),
        format!("{:.3}±{:.3}", stats[2].mean, stats[2].sd),
        format!("{:.3}±{:.3}", stats[3].mean, stats[3].sd),
    )?;
    outln!("\nout of fold (every slice scored once, by the model that did not train on it):\n{oof}")?;
    Ok(ExitCode::SUCCESS)
}

/// `--pred DIR`: the masks in `pred` against the labelled split `--data`, no
/// model. Every labelled slice must have its prediction (`<id>_mask.png`, the
/// same size as its true mask); other files in `pred` are ignored.
/// `summary.json` (per case, per class, mean and foreground mean) is written
/// into `pred`.
fn run_pred(pred: &std::path::Path, args: &EvalArgs) -> anyhow::Result<ExitCode> {
    use cmr_data::{mask_file_name, read_mask};
    use cmr_loss::{LabelMap, MetricsAccumulator};
    let csv = pred.is_file();
    if !csv && !pred.is_dir() {
        bail!(
            "{}: neither a folder of predicted masks nor a run-length CSV",
            pred.display()
        );
    }
    if !args.data.join("mask").is_dir() {
        bail!(
            "{}: not a labelled split folder (image/, mask/): --pred scores against one split",
            args.data.display()
        );
    }
    // the true masks, at their own size (no fitting to a network)
    let samples = load_split(&args.data, Labels::Required, LoadOptions::default())?;
    // a run-length CSV (as `cmr predict --csv` and `cmr submit` write it),
    // decoded at the true masks' size
    let decoded: Option<std::collections::BTreeMap<String, cmr_data::Mask>> = if csv {
        let truth = read_mask(&args.data.join("mask").join(mask_file_name(&samples[0].id)))?;
        let size = cmr_data::Size {
            height: truth.height(),
            width: truth.width(),
        };
        Some(cmr_data::read_submission(pred, size)?.into_iter().collect())
    } else {
        None
    };
    let row_name = |id: &str| format!("{id}_mask");
    let missing: Vec<&str> = samples
        .iter()
        .map(|s| s.id.as_str())
        .filter(|id| match &decoded {
            Some(rows) => !rows.contains_key(&row_name(id)),
            None => !pred.join(mask_file_name(id)).is_file(),
        })
        .collect();
    if let Some(first) = missing.first() {
        let where_ = match &decoded {
            Some(_) => format!("no rows {}1…3", row_name(first)),
            None => pred.join(mask_file_name(first)).display().to_string(),
        };
        bail!(
            "{}: no prediction for {} of the {} labelled slices of {} (the first: {where_})",
            pred.display(),
            missing.len(),
            samples.len(),
            args.data.display(),
        );
    }
    let mut acc = MetricsAccumulator::new();
    for s in &samples {
        let truth_path = args.data.join("mask").join(mask_file_name(&s.id));
        let truth = read_mask(&truth_path)?;
        let (p, pred_path) = match &decoded {
            Some(rows) => (
                rows.get(&row_name(&s.id)).cloned().context("checked above")?,
                format!("{} (rows {}1…3)", pred.display(), row_name(&s.id)),
            ),
            None => {
                let path = pred.join(mask_file_name(&s.id));
                (read_mask(&path)?, path.display().to_string())
            }
        };
        if (p.height(), p.width()) != (truth.height(), truth.width()) {
            bail!(
                "{pred_path}: {}×{} pixels, but its true mask {} is {}×{} (a run-length CSV holds masks of one size)",
                p.width(),
                p.height(),
                truth_path.display(),
                truth.width(),
                truth.height()
            );
        }
        acc.add(
            &s.id,
            LabelMap::new(p.data(), p.height(), p.width())?,
            LabelMap::new(truth.data(), truth.height(), truth.width())?,
        )?;
    }
    let report = acc.report();
    let summary = serde_json::json!({
        "pred": pred.display().to_string(),
        "data": args.data.display().to_string(),
        "cases": acc.len(),
        "per_case": acc.images(),
        "mean": &report,
        "foreground_mean_dice": report.mean_dice,
        "definitions": cmr_loss::DEFINITIONS,
    });
    if csv {
        tracing::info!("{} scored", count(acc.len(), "case"));
    } else {
        let path = pred.join("summary.json");
        cmr_data::write_atomic(&path, serde_json::to_string_pretty(&summary)?.as_bytes())?;
        tracing::info!("{} scored: {}", count(acc.len(), "case"), path.display());
    }
    if args.json {
        outln!("{}", serde_json::to_string_pretty(&summary)?)?;
    } else {
        if args.per_image {
            print_per_image(acc.images())?;
        }
        outln!("{report}")?;
    }
    Ok(ExitCode::SUCCESS)
}
