//! `cmr predict`: masks (and overlays, and a CSV) for images.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, bail};
use cmr_data::{LoadOptions, list_pngs, load_images, read_image, write_mask, write_overlay, write_submission};

use crate::args::PredictArgs;
use crate::commands::load_predictor;
use crate::progress::image_bar;
use crate::staged::Staged;
use crate::text::count;

/// The PNGs `--input` names: a file, a split folder's image/, or a folder.
fn inputs(input: &std::path::Path) -> anyhow::Result<Vec<PathBuf>> {
    if input.is_file() {
        return Ok(vec![input.to_path_buf()]);
    }
    let dir = if input.join("image").is_dir() {
        input.join("image")
    } else {
        input.to_path_buf()
    };
    let files = list_pngs(&dir)?;
    if files.is_empty() {
        bail!("{}: no PNG images", dir.display());
    }
    Ok(files)
}

pub fn run(args: PredictArgs) -> anyhow::Result<ExitCode> {
    let predictor = load_predictor(&args.model, &args.inference)?;
    let files = inputs(&args.input)?;
    // Read and validate every image before writing anything.
    let samples = load_images(
        &files,
        LoadOptions {
            size: predictor.config().data.size,
        },
    )?;
    let bar = image_bar(samples.len(), "predict");
    let masks = predictor.predict(&samples, |done| bar.set_position(done as u64))?;
    bar.finish_and_clear();

    let mut staged = Staged::new(&args.out)?;
    let mut rows = Vec::with_capacity(samples.len());
    for (sample, mask) in samples.iter().zip(masks) {
        let mask = mask.unfit(sample.original);
        let name = format!("{}_mask", sample.id);
        write_mask(&staged.path(&format!("{name}.png"))?, &mask)?;
        if args.overlay {
            let image = read_image(&sample.path)?;
            write_overlay(&staged.path(&format!("{}_overlay.png", sample.id))?, &image, &mask)?;
        }
        rows.push((name, mask));
    }
    if let Some(parent) = args
        .csv
        .as_ref()
        .and_then(|c| c.parent())
        .filter(|p| !p.as_os_str().is_empty())
    {
        std::fs::create_dir_all(parent).with_context(|| format!("creating {}", parent.display()))?;
    }
    let n = staged.commit()?;
    tracing::info!(
        "{}: {} for {}",
        args.out.display(),
        count(n, "file"),
        count(samples.len(), "image")
    );
    if let Some(csv) = &args.csv {
        write_submission(csv, &rows)?;
        tracing::info!("{}: {}", csv.display(), count(3 * rows.len(), "row"));
    }
    Ok(ExitCode::SUCCESS)
}
