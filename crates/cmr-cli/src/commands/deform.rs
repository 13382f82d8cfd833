//! `cmr deform`: write a seeded deformed copy of a labelled split (the copy
//! `cmr eval --deform` scores), to look at or to score with other tools.

use std::process::ExitCode;

use anyhow::Context;
use cmr_data::{
    AugmentConfig, Labels, LoadOptions, deform_sample, load_split, mask_file_name, write_image, write_mask,
};

use crate::args::DeformArgs;
use crate::staged::Staged;
use crate::text::count;

pub fn run(args: DeformArgs) -> anyhow::Result<ExitCode> {
    let split = if args.data.join("image").is_dir() {
        args.data.clone()
    } else {
        args.data.join("train")
    };
    let samples = load_split(
        &split,
        Labels::Required,
        LoadOptions {
            size: args.size,
            spacing_mm: None,
            window: cmr_data::VolumeWindow::CLIP,
        },
    )
    .with_context(|| format!("loading {}", split.display()))?;
    let config = AugmentConfig::deformed_test();
    let mut staged = Staged::new(&args.out)?;
    for sample in &samples {
        let copy = deform_sample(sample, &config, args.seed);
        let mask = copy.mask.as_ref().context("a labelled sample has a mask")?;
        write_image(
            &staged.path(&format!("image/{}.png", copy.id))?,
            &copy.image.unfit(sample.original),
        )?;
        write_mask(
            &staged.path(&format!("mask/{}", mask_file_name(&copy.id)))?,
            &mask.unfit(sample.original),
        )?;
    }
    let n = staged.commit()?;
    tracing::info!(
        "{}: {}, a deformed copy of the {} of {} (seed {})",
        args.out.display(),
        count(n, "file"),
        count(samples.len(), "image"),
        split.display(),
        args.seed
    );
    Ok(ExitCode::SUCCESS)
}
