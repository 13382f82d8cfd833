//! `cmr predict`: masks (and overlays, and a CSV) for images.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, bail};
use cmr_data::{
    LoadOptions, list_pngs, load_images, read_image, submission_rows, write_mask, write_overlay, write_rows,
};

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

/// Whether `a` and `b` name one folder (both must exist).
fn same_folder(a: &std::path::Path, b: &std::path::Path) -> bool {
    match (a.canonicalize(), b.canonicalize()) {
        (Ok(a), Ok(b)) => a == b,
        _ => false,
    }
}

pub fn run(args: PredictArgs) -> anyhow::Result<ExitCode> {
    let files = inputs(&args.input)?;
    if let Some(dir) = files[0].parent().filter(|d| same_folder(d, &args.out)) {
        bail!(
            "{}: --out is the folder of the input images (a second run would read the masks as images): choose another",
            dir.display()
        );
    }
    if let Some(csv) = args.csv.as_ref().filter(|c| c.is_dir()) {
        bail!("{}: --csv names a folder, not a file", csv.display());
    }
    let predictor = load_predictor(&args.model, &args.inference)?;
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
    let mut rows = Vec::new();
    for (sample, mask) in samples.iter().zip(masks) {
        let mask = mask.unfit(sample.original);
        let name = format!("{}_mask", sample.id);
        write_mask(&staged.path(&format!("{name}.png"))?, &mask)?;
        if args.overlay {
            let image = read_image(&sample.path)?;
            write_overlay(&staged.path(&format!("{}_overlay.png", sample.id))?, &image, &mask)?;
        }
        // run lengths only: the full-size masks are not all held at once
        if args.csv.is_some() {
            rows.extend(submission_rows(&name, &mask));
        }
    }
    // The CSV is written beside its place before any mask moves, and placed
    // last: if it cannot be, the masks are taken back out.
    let csv = match &args.csv {
        Some(csv) => Some((csv, prepare_csv(csv, &rows)?)),
        None => None,
    };
    let result = staged.commit_then(|| {
        if let Some((csv, tmp)) = &csv {
            std::fs::rename(tmp, csv).with_context(|| format!("placing {}", csv.display()))?;
        }
        Ok(())
    });
    let n = match result {
        Ok(n) => n,
        Err(e) => {
            if let Some((_, tmp)) = &csv {
                let _ = std::fs::remove_file(tmp);
            }
            return Err(e);
        }
    };
    tracing::info!(
        "{}: {} for {}",
        args.out.display(),
        count(n, "file"),
        count(samples.len(), "image")
    );
    if let Some((csv, _)) = &csv {
        tracing::info!("{}: {}", csv.display(), count(rows.len(), "row"));
    }
    Ok(ExitCode::SUCCESS)
}

/// Write the submission for `rows` to a hidden file beside `csv` (creating
/// its folder); the caller renames it into place.
fn prepare_csv(csv: &std::path::Path, rows: &[cmr_data::Row]) -> anyhow::Result<PathBuf> {
    let parent = csv.parent().filter(|p| !p.as_os_str().is_empty());
    if let Some(parent) = parent {
        std::fs::create_dir_all(parent).with_context(|| format!("creating {}", parent.display()))?;
    }
    let name = csv
        .file_name()
        .with_context(|| format!("{}: --csv must name a file", csv.display()))?;
    let tmp = csv.with_file_name(format!(".{}.{}.partial", name.to_string_lossy(), std::process::id()));
    write_rows(&tmp, rows)?;
    Ok(tmp)
}
