//! `cmr info`: parameters, size and forward FLOPs of a network, or what a
//! trained model is (architecture, size, training data, scores).

use std::path::Path;
use std::process::ExitCode;

use anyhow::Context;
use cmr_data::SplitRecord;
use cmr_models::model_stats;
use cmr_train::{CvDir, DeviceSpec, RunDir, TrainConfig, device_name, ensemble_members};

use crate::args::InfoArgs;
use crate::commands::open_device;
use crate::text::outln;

pub fn run(args: InfoArgs) -> anyhow::Result<ExitCode> {
    if let Some(model) = &args.model {
        return describe(model, args.json);
    }
    let arch = args.arch.context("give --arch or --model")?;
    let device = open_device(&args.device, DeviceSpec::Cpu)?;
    let cfg = TrainConfig::preset(args.preset, arch).model;
    let stats = model_stats(&cfg, args.size, args.size)?;
    if args.json {
        let value = serde_json::json!({
            "arch": arch.name(),
            "preset": args.preset.name(),
            "parameters": stats.parameters,
            "size_mb": stats.size_mb,
            "gflops": stats.gflops,
            "input": [stats.height, stats.width],
            "device": device_name(&device),
            "config": cfg,
        });
        outln!("{}", serde_json::to_string_pretty(&value)?)?;
    } else {
        outln!(
            "network     {} (the {} preset's widths)",
            arch.display_name(),
            args.preset
        )?;
        outln!("parameters  {}", stats.parameters)?;
        outln!("size        {:.2} MB (f32)", stats.size_mb)?;
        outln!(
            "forward     {:.2} GFLOPs per {}×{} image",
            stats.gflops,
            stats.height,
            stats.width
        )?;
        outln!("device      {}", device_name(&device))?;
    }
    Ok(ExitCode::SUCCESS)
}

/// One member run of a model: its config, split record and best score.
fn member(dir: &Path) -> anyhow::Result<serde_json::Value> {
    let run = if dir.is_dir() {
        dir
    } else {
        dir.parent().unwrap_or(Path::new("."))
    };
    let config = TrainConfig::read_json(&run.join(RunDir::CONFIG))?;
    let stats = model_stats(&config.model, config.data.size, config.data.size)?;
    let split = SplitRecord::read(&run.join(RunDir::SPLITS))?;
    let state = RunDir::at(run).read_state()?;
    Ok(serde_json::json!({
        "run": run.display().to_string(),
        "arch": config.model.architecture().name(),
        "parameters": stats.parameters,
        "size_mb": stats.size_mb,
        "gflops": stats.gflops,
        "input": config.data.size,
        // the weights are stored in f32 whatever the products were
        "precision": "f32",
        "trained_in": config.kernels.precision.to_string(),
        "epochs": config.epochs,
        "keep": config.keep,
        "training_slices": split.as_ref().map(|s| s.train.len()),
        "validation_slices": split.as_ref().map(|s| s.val.len()),
        "data_sha256": split.as_ref().map(|s| s.sha256.clone()),
        "best_validation_dice": state.as_ref().and_then(|s| s.best.as_ref()).map(|b| b.mean_dice),
    }))
}

/// A JSON value for a line of text: "?" for null.
fn shown(v: &serde_json::Value) -> String {
    if v.is_null() { "?".into() } else { v.to_string() }
}

/// `cmr info --model M`.
fn describe(model: &str, json: bool) -> anyhow::Result<ExitCode> {
    let path = crate::models::resolve(model)?;
    let members = ensemble_members(&path)?;
    let mut described = members
        .iter()
        .map(|m| member(m).with_context(|| format!("reading {}", m.display())))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let cv = if CvDir::is_cv(&path) {
        Some(CvDir::open(&path)?)
    } else {
        None
    };
    // folds trained before splits.json existed: their slices from cv.json
    if let Some((_, spec)) = &cv {
        let total: usize = spec.folds.val.iter().map(Vec::len).sum();
        for (m, val) in described.iter_mut().zip(&spec.folds.val) {
            if m["validation_slices"].is_null() {
                m["validation_slices"] = val.len().into();
                m["training_slices"] = (total - val.len()).into();
            }
        }
    }
    let clean = match &cv {
        Some((dir, _)) => dir.read_clean()?.map(|d| d.chosen),
        None => None,
    };
    if json {
        let value = serde_json::json!({
            "model": path.display().to_string(),
            "folds": cv.as_ref().map(|(_, spec)| spec.folds.k),
            "grouping": cv.as_ref().map(|(_, spec)| spec.folds.grouping),
            "clean_up": clean,
            "members": described,
        });
        outln!("{}", serde_json::to_string_pretty(&value)?)?;
        return Ok(ExitCode::SUCCESS);
    }
    let first = &described[0];
    outln!("model       {}", path.display())?;
    match &cv {
        Some((_, spec)) => outln!(
            "kind        ensemble of a {}-fold cross-validation ({})",
            spec.folds.k,
            spec.folds.grouping
        )?,
        None => outln!("kind        one run")?,
    }
    outln!(
        "network     {} ({} parameters, {:.2} MB, f32)",
        first["arch"].as_str().unwrap_or("?"),
        first["parameters"],
        first["size_mb"].as_f64().unwrap_or(0.0)
    )?;
    outln!(
        "forward     {:.2} GFLOPs per {} px image, per member",
        first["gflops"].as_f64().unwrap_or(0.0),
        first["input"]
    )?;
    if let Some(c) = clean {
        outln!("clean-up    {c} (decided out of fold)")?;
    }
    for m in &described {
        outln!(
            "member      {}: {} epochs in {}, kept {}, trained on {} slices (validated on {}), data sha256 {}",
            m["run"].as_str().unwrap_or("?"),
            m["epochs"],
            m["trained_in"].as_str().unwrap_or("?"),
            m["keep"].as_str().unwrap_or("?"),
            shown(&m["training_slices"]),
            shown(&m["validation_slices"]),
            m["data_sha256"]
                .as_str()
                .map_or("not recorded".into(), |s| s[..12.min(s.len())].to_string()),
        )?;
    }
    if cv.is_some() {
        outln!("scores      cmr eval --model {model} --data <dataset root> --tta")?;
    }
    Ok(ExitCode::SUCCESS)
}
