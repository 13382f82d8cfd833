//! `cmr predict`: masks (and overlays, and a CSV) for images.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, bail};
use cmr_data::{
    LoadOptions, OverlayMode, OverlayStyle, image_ids, list_pngs, load_images, mask_file_name, read_image, read_mask,
    submission_rows, write_mask, write_overlay_styled, write_rows,
};

use crate::args::{OverlayChoice, PredictArgs};
use crate::commands::load_predictor;
use crate::progress::image_bar;
use crate::staged::Staged;
use crate::text::count;

/// Images loaded and predicted at a time: enough to fill the predictor's
/// batches, few enough that memory does not grow with the folder.
pub const PREDICT_CHUNK: usize = 64;

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

/// Whether `path` names a NIfTI volume (`.nii`, `.nii.gz`).
pub fn is_volume(path: &std::path::Path) -> bool {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().to_lowercase())
        .unwrap_or_default();
    name.ends_with(".nii") || name.ends_with(".nii.gz")
}

/// A volume's name without its ending (`scan.nii.gz` → `scan`).
pub fn volume_name(path: &std::path::Path) -> String {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let lower = name.to_lowercase();
    let cut = if lower.ends_with(".nii.gz") {
        7
    } else if lower.ends_with(".nii") {
        4
    } else {
        0
    };
    name[..name.len() - cut].to_string()
}

/// The NIfTI volumes `input` names: the file, or a folder's `.nii`/`.nii.gz`
/// files in name order.
pub fn volume_inputs(input: &std::path::Path) -> anyhow::Result<Option<Vec<PathBuf>>> {
    if input.is_file() {
        return Ok(is_volume(input).then(|| vec![input.to_path_buf()]));
    }
    if !input.is_dir() {
        return Ok(None);
    }
    let mut found: Vec<PathBuf> = std::fs::read_dir(input)
        .with_context(|| format!("reading {}", input.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.is_file() && is_volume(p))
        .collect();
    found.sort();
    Ok((!found.is_empty()).then_some(found))
}

/// Read one volume and check that the 2-D network can segment it. Volumes
/// are read one at a time: only one is held in memory.
pub fn read_segmentable(file: &std::path::Path) -> anyhow::Result<cmr_data::Volume> {
    let v = cmr_data::read_volume(file)?;
    v.check_segmentable()?;
    Ok(v)
}

/// The labels of every voxel of `v`, slice by slice by the 2-D network (in
/// the volume's voxel order). The intensities are windowed per volume
/// ([`cmr_data::window_of`]); slices are padded or cropped to the network's
/// input size and the labels mapped back exactly.
pub fn segment_volume(predictor: &cmr_train::Predictor, v: &cmr_data::Volume) -> anyhow::Result<Vec<u8>> {
    let size = predictor.config().data.size;
    let target = cmr_data::Size {
        height: size,
        width: size,
    };
    let [nx, ny, nz, nt] = v.dims();
    let name = volume_name(&v.path);
    let chosen = predictor.config().data.window;
    let window = cmr_data::window_with(v, chosen);
    // a model trained on volumes records its in-plane spacing: resample to it
    let [sx, sy, _] = v.spacing();
    let grid = predictor
        .config()
        .data
        .spacing_mm
        .map(|t| cmr_data::resampled_size(v.dims(), [sx, sy], t));
    let samples: Vec<cmr_data::Sample> = cmr_data::volume_slices(v, window)
        .into_iter()
        .enumerate()
        .map(|(k, image)| {
            let image = match grid {
                Some(g) => cmr_data::resize_u8_bilinear(&image, g.height, g.width),
                None => image,
            };
            cmr_data::Sample {
                id: format!("{name}_t{}_z{}", k / nz, k % nz),
                original: image.size(),
                image: image.fit(target),
                mask: None,
                path: v.path.clone(),
            }
        })
        .collect();
    tracing::info!(
        "{}: {nx}×{ny} voxels, {nz} slices × {nt} frames, spacing {:?} mm, {}",
        v.path.display(),
        v.spacing(),
        match window {
            cmr_data::Window::AsIs => "8-bit values as they are".to_string(),
            cmr_data::Window::Percentiles { lo, hi } => format!(
                "window {lo}…{hi} (the {}th–{}th percentiles)",
                chosen.lo_percentile, chosen.hi_percentile
            ),
        }
    );
    let bar = image_bar(samples.len(), "segment");
    let masks: Vec<cmr_data::Mask> = match grid {
        None => {
            let masks = predictor.predict(&samples, |done| bar.set_position(done as u64))?;
            samples.iter().zip(masks).map(|(s, m)| m.unfit(s.original)).collect()
        }
        Some(grid) => {
            if let Some(t) = predictor.config().data.spacing_mm {
                tracing::info!(
                    "{}: slices resampled from {sx}×{sy} mm to {t} mm ({}×{} → {}×{}) and back",
                    v.path.display(),
                    nx,
                    ny,
                    grid.width,
                    grid.height
                );
            }
            let out = predictor.predict_probabilities(&samples, |done| bar.set_position(done as u64))?;
            let mut masks = Vec::with_capacity(out.len());
            for (_, probs) in out {
                let mut labels = back_to_grid(&probs, target, grid, [ny, nx])?;
                predictor.options().clean.apply(&mut labels, ny, nx);
                masks.push(cmr_data::Plane::from_vec(ny, nx, labels).context("a slice of the volume's size")?);
            }
            masks
        }
    };
    bar.finish_and_clear();
    Ok(cmr_data::labels_to_volume(v.dims(), &masks))
}

/// Labels on the volume's own `[height, width]` grid from probabilities
/// `[classes, h, w]` at the network's input `net`: each class's plane
/// mapped back from the crop or pad to the resampled `grid` (the margin is
/// background), resampled bilinearly to the volume's grid, then the argmax.
fn back_to_grid(
    probs: &[f32],
    net: cmr_data::Size,
    grid: cmr_data::Size,
    [height, width]: [usize; 2],
) -> anyhow::Result<Vec<u8>> {
    let per = net.height * net.width;
    let inside = cmr_data::Plane::from_vec(net.height, net.width, vec![1f32; per])
        .context("a plane of the network's size")?
        .unfit(grid);
    let mut best: Vec<(f32, u8)> = vec![(f32::NEG_INFINITY, 0); height * width];
    for (c, plane) in probs.chunks(per).enumerate() {
        let fitted = cmr_data::Plane::from_vec(net.height, net.width, plane.to_vec())
            .context("a probability plane of the network's size")?;
        let mut back = fitted.unfit(grid);
        if c == 0 {
            for (p, &i) in back.data_mut().iter_mut().zip(inside.data()) {
                *p += 1.0 - i;
            }
        }
        let resized = cmr_data::resize_bilinear(&back, height, width);
        for (b, &p) in best.iter_mut().zip(resized.data()) {
            if p > b.0 {
                *b = (p, c as u8);
            }
        }
    }
    Ok(best.into_iter().map(|(_, c)| c).collect())
}

/// Segment volumes: every slice of every frame by the 2-D network, written
/// as `<name>_seg.nii.gz` with the input's dimensions, spacing and affine.
/// A model trained on PNG slices has no spacing: slices are padded or
/// cropped to its input size, not resampled.
fn run_volumes(args: &PredictArgs, files: &[PathBuf]) -> anyhow::Result<ExitCode> {
    if args.overlay.is_some() || args.csv.is_some() || args.save_probabilities {
        bail!("--overlay, --csv and --save-probabilities are for PNG slices, not NIfTI volumes");
    }
    let predictor = load_predictor(&args.model, &args.inference)?;
    // One volume at a time; a bad one fails the run and, staged, nothing lands.
    let mut staged = Staged::new(&args.out)?;
    for f in files {
        let v = read_segmentable(f)?;
        let labels = segment_volume(&predictor, &v)?;
        let name = volume_name(&v.path);
        cmr_data::write_labels(&staged.path(&format!("{name}_seg.nii.gz"))?, &v, &labels)?;
    }
    let n = staged.commit_then(|| Ok(()))?;
    tracing::info!(
        "{}: {} for {}",
        args.out.display(),
        count(n, "file"),
        count(files.len(), "volume")
    );
    Ok(ExitCode::SUCCESS)
}

pub fn run(args: PredictArgs) -> anyhow::Result<ExitCode> {
    if let Some(volumes) = volume_inputs(&args.input)? {
        return run_volumes(&args, &volumes);
    }
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
    // Every name is checked first (no file read); then the images stream
    // through in chunks, so that memory does not grow with the folder. A bad
    // image fails the run, and staged, nothing lands.
    image_ids(&files)?;
    let opts = LoadOptions {
        size: predictor.config().data.size,
        spacing_mm: None,
        window: cmr_data::VolumeWindow::CLIP,
    };
    let bar = image_bar(files.len(), "predict");
    let mut staged = Staged::new(&args.out)?;
    let mut rows = Vec::new();
    // a split folder's true masks, for the overlays
    let truth_dir = Some(args.input.join("mask")).filter(|d| d.is_dir() && args.input.join("image").is_dir());
    for (k, chunk) in files.chunks(PREDICT_CHUNK).enumerate() {
        let samples = load_images(chunk, opts)?;
        let done = k * PREDICT_CHUNK;
        let progress = |n: usize| bar.set_position((done + n) as u64);
        let predictions: Vec<(cmr_data::Mask, Option<Vec<f32>>)> = if args.save_probabilities {
            predictor
                .predict_probabilities(&samples, progress)?
                .into_iter()
                .map(|(m, p)| (m, Some(p)))
                .collect()
        } else {
            predictor
                .predict(&samples, progress)?
                .into_iter()
                .map(|m| (m, None))
                .collect()
        };
        for (sample, (mask, probs)) in samples.iter().zip(predictions) {
            write_outputs(&args, &mut staged, truth_dir.as_deref(), sample, mask, probs, &mut rows)?;
        }
    }
    bar.finish_and_clear();

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
        count(files.len(), "image")
    );
    if let Some((csv, _)) = &csv {
        tracing::info!("{}: {}", csv.display(), count(rows.len(), "row"));
    }
    Ok(ExitCode::SUCCESS)
}

/// Stage the outputs for one predicted image: its mask at the image's size,
/// and, as asked, its probabilities, its overlay and its CSV rows (run
/// lengths only: the full-size masks are not all held at once).
fn write_outputs(
    args: &PredictArgs,
    staged: &mut Staged,
    truth_dir: Option<&std::path::Path>,
    sample: &cmr_data::Sample,
    mask: cmr_data::Mask,
    probs: Option<Vec<f32>>,
    rows: &mut Vec<cmr_data::Row>,
) -> anyhow::Result<()> {
    if let Some(probs) = probs {
        let path = staged.path(&format!("{}_probabilities.safetensors", sample.id))?;
        write_probabilities(&path, &probs, &mask, sample.original)?;
    }
    let mask = mask.unfit(sample.original);
    let name = format!("{}_mask", sample.id);
    write_mask(&staged.path(&format!("{name}.png"))?, &mask)?;
    if let Some(choice) = args.overlay {
        let image = read_image(&sample.path)?;
        let style = OverlayStyle {
            mode: match choice {
                OverlayChoice::Fill => OverlayMode::Fill,
                OverlayChoice::Outline => OverlayMode::Outline,
            },
            scale: usize::from(args.overlay_scale),
            legend: true,
        };
        // the true mask beside the prediction, where the split has one
        let truth_path = truth_dir.map(|d| d.join(mask_file_name(&sample.id)));
        let truth = match truth_path.filter(|p| p.is_file()) {
            Some(p) => Some(read_mask(&p)?),
            None => None,
        };
        let path = staged.path(&format!("{}_overlay.png", sample.id))?;
        write_overlay_styled(&path, &image, &mask, truth.as_ref(), style)?;
    }
    if args.csv.is_some() {
        rows.extend(submission_rows(&name, &mask));
    }
    Ok(())
}

/// `probs` (`[classes, h, w]` flat, at the mask's size) mapped back to the
/// image's size as the mask is, written as the tensor `probabilities`.
/// Where the image was cropped for the network, the margin is background
/// with probability 1.
fn write_probabilities(
    path: &std::path::Path,
    probs: &[f32],
    mask: &cmr_data::Mask,
    original: cmr_data::Size,
) -> anyhow::Result<()> {
    let (h, w) = (mask.height(), mask.width());
    let classes = probs.len() / (h * w).max(1);
    let mut data = Vec::with_capacity(classes * original.height * original.width);
    // 1 inside the network's window, 0 in a margin the crop left out
    let inside = cmr_data::Plane::from_vec(h, w, vec![1f32; h * w])
        .context("a plane of the mask's size")?
        .unfit(original);
    for (c, plane) in probs.chunks(h * w).enumerate() {
        let fitted =
            cmr_data::Plane::from_vec(h, w, plane.to_vec()).context("a probability plane of the mask's size")?;
        let back = fitted.unfit(original);
        if c == 0 {
            data.extend(back.data().iter().zip(inside.data()).map(|(&p, &i)| p + (1.0 - i)));
        } else {
            data.extend_from_slice(back.data());
        }
    }
    let tensor = candle_core::Tensor::from_vec(
        data,
        (classes, original.height, original.width),
        &candle_core::Device::Cpu,
    )?;
    let tensors = std::collections::HashMap::from([("probabilities".to_string(), tensor)]);
    candle_core::safetensors::save(&tensors, path).with_context(|| format!("writing {}", path.display()))?;
    Ok(())
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
