//! `cmr submit`: the competition's run-length CSV from a folder of masks.

use std::process::ExitCode;

use anyhow::{Context, bail};
use cmr_data::{list_pngs, read_mask, write_submission};

use crate::args::SubmitArgs;
use crate::text::count;

/// The CSV name of a mask file stem: `cmr121_mask` as it is, `cmr121` →
/// `cmr121_mask`.
pub fn row_name(stem: &str) -> String {
    if stem.ends_with("_mask") {
        stem.to_string()
    } else {
        format!("{stem}_mask")
    }
}

pub fn run(args: SubmitArgs) -> anyhow::Result<ExitCode> {
    let all = list_pngs(&args.masks)?;
    if all.is_empty() {
        bail!("{}: no mask PNGs", args.masks.display());
    }
    // A predict folder also holds overlays: take the `*_mask.png` files where
    // there are any, every PNG otherwise (masks named like their images).
    let is_mask = |p: &std::path::PathBuf| {
        p.file_stem()
            .and_then(|s| s.to_str())
            .is_some_and(|s| s.ends_with("_mask"))
    };
    let files: Vec<_> = if all.iter().any(is_mask) {
        all.iter().filter(|p| is_mask(p)).cloned().collect()
    } else {
        all.clone()
    };
    if files.len() < all.len() {
        tracing::info!(
            "{}: {} PNGs that are not *_mask.png left out (overlays)",
            args.masks.display(),
            all.len() - files.len()
        );
    }
    let mut masks = Vec::with_capacity(files.len());
    for path in &files {
        let stem = path.file_stem().and_then(|s| s.to_str()).unwrap_or_default();
        masks.push((row_name(stem), read_mask(path)?));
    }
    if let Some(parent) = args.out.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent).with_context(|| format!("creating {}", parent.display()))?;
    }
    write_submission(&args.out, &masks)?;
    tracing::info!(
        "{}: {}, {}",
        args.out.display(),
        count(masks.len(), "mask"),
        count(3 * masks.len(), "row")
    );
    Ok(ExitCode::SUCCESS)
}
