//! `cmr eval`: metrics of a model on a labelled split.

#![allow(clippy::print_stdout)]

use std::process::ExitCode;

use anyhow::Context;
use cmr_data::{Labels, LoadOptions, load_split};
use cmr_train::load_splits;

use crate::args::EvalArgs;
use crate::commands::load_predictor;
use crate::progress::image_bar;

pub fn run(args: EvalArgs) -> anyhow::Result<ExitCode> {
    let predictor = load_predictor(&args.model, &args.inference)?;
    let config = predictor.config().clone();
    let opts = LoadOptions { size: config.data.size };
    let (samples, split) = if args.data.join("image").is_dir() {
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
    tracing::info!("evaluating on {} images of {split}", samples.len());
    let bar = image_bar(samples.len(), "eval");
    let eval = predictor.evaluate(&samples, None)?;
    bar.finish_and_clear();
    let report = eval.metrics.report();
    if args.json {
        let mut value = serde_json::to_value(&report)?;
        value["model"] = args.model.clone().into();
        value["data"] = split.into();
        value["tta"] = args.inference.tta.into();
        value["clean"] = args.inference.clean.into();
        for c in &report.classes {
            value[format!("dice_{}", c.class.to_lowercase())] = c.dice.into();
        }
        if args.per_image {
            value["per_image"] = serde_json::to_value(eval.metrics.images())?;
        }
        println!("{}", serde_json::to_string_pretty(&value)?);
    } else {
        if args.per_image {
            println!("{:<12} {:>8} {:>8} {:>8} {:>8}", "image", "RV", "Myo", "LV", "mean");
            for m in eval.metrics.images() {
                println!(
                    "{:<12} {:>8.4} {:>8.4} {:>8.4} {:>8.4}",
                    m.id,
                    m.dice[0],
                    m.dice[1],
                    m.dice[2],
                    m.mean_dice()
                );
            }
            println!();
        }
        println!("{report}");
    }
    Ok(ExitCode::SUCCESS)
}
