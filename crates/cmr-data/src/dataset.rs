//! Dataset discovery and validation: split folders, pairing, natural order.
//!
//! A split folder holds `image/<id>.png` and, when labelled, `mask/<id>_mask.png`.
//! A dataset root holds `train/`, optionally `val/` and `test/`.

use std::cmp::Ordering;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use crate::error::{DataError, Result};
use crate::plane::{Image, Mask, Size};
use crate::png::{read_image, read_mask};

/// One slice: its id (the image file stem, e.g. `cmr12`), the image and, in a
/// labelled split, its mask, both centre padded/cropped to the loading size.
#[derive(Clone, Debug)]
pub struct Sample {
    pub id: String,
    pub image: Image,
    pub mask: Option<Mask>,
    /// Size of the image on disk, to map predictions back with [`Image::unfit`].
    pub original: Size,
    /// Where the image was read from.
    pub path: PathBuf,
}

/// Whether a split's masks are read.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Labels {
    /// `mask/` must exist and every image must have its mask.
    Required,
    /// Read and pair masks when `mask/` exists; otherwise images only.
    IfPresent,
    /// Images only; a `mask/` folder is not looked at.
    Ignore,
}

/// Options for loading a split.
#[derive(Clone, Copy, Debug)]
pub struct LoadOptions {
    /// Side length every image and mask is centre padded/cropped to.
    pub size: usize,
    /// In-plane spacing (mm) that volume slices are resampled to before they
    /// are fitted (bilinear for images, nearest for masks); `None`: as they
    /// are. PNG slices have no spacing and are never resampled.
    pub spacing_mm: Option<f64>,
    /// The intensity window of volume slices (PNG slices are 8-bit already).
    pub window: crate::volume::VolumeWindow,
}

impl Default for LoadOptions {
    fn default() -> Self {
        Self {
            size: 96,
            spacing_mm: None,
            window: crate::volume::VolumeWindow::CLIP,
        }
    }
}

/// Compare ids in natural order: digit runs compare as numbers, so `cmr2` comes
/// before `cmr10`.
pub fn natural_cmp(a: &str, b: &str) -> Ordering {
    let (mut a, mut b) = (a.as_bytes(), b.as_bytes());
    loop {
        match (a.first(), b.first()) {
            (None, None) => return Ordering::Equal,
            (None, Some(_)) => return Ordering::Less,
            (Some(_), None) => return Ordering::Greater,
            (Some(x), Some(y)) if x.is_ascii_digit() && y.is_ascii_digit() => {
                let na = a.iter().take_while(|c| c.is_ascii_digit()).count();
                let nb = b.iter().take_while(|c| c.is_ascii_digit()).count();
                let (da, db) = (&a[..na], &b[..nb]);
                let ta = trim_zeros(da);
                let tb = trim_zeros(db);
                let ord = ta.len().cmp(&tb.len()).then_with(|| ta.cmp(tb)).then(na.cmp(&nb));
                if ord != Ordering::Equal {
                    return ord;
                }
                a = &a[na..];
                b = &b[nb..];
            }
            (Some(x), Some(y)) => {
                if x != y {
                    return x.cmp(y);
                }
                a = &a[1..];
                b = &b[1..];
            }
        }
    }
}

fn trim_zeros(d: &[u8]) -> &[u8] {
    let z = d.iter().take_while(|&&c| c == b'0').count();
    &d[z..]
}

/// The PNG files of a folder by id (file stem), in natural order.
fn png_files(dir: &Path) -> Result<BTreeMap<NaturalKey, PathBuf>> {
    let entries = std::fs::read_dir(dir).map_err(|e| DataError::io(dir, e))?;
    let mut out: BTreeMap<NaturalKey, PathBuf> = BTreeMap::new();
    for entry in entries {
        let path = entry.map_err(|e| DataError::io(dir, e))?.path();
        let is_png = path.extension().is_some_and(|e| e.eq_ignore_ascii_case("png"));
        if !is_png {
            continue;
        }
        // nothing named *.png is passed over without a word
        match std::fs::metadata(&path) {
            Ok(m) if m.is_file() => {}
            Ok(_) => {
                tracing::warn!("{}: not a file, skipped", path.display());
                continue;
            }
            Err(e) => {
                let link = std::fs::symlink_metadata(&path).is_ok_and(|m| m.file_type().is_symlink());
                let reason = if link {
                    format!("a symbolic link that leads nowhere ({e})")
                } else {
                    e.to_string()
                };
                return Err(DataError::NotAFile { path, reason });
            }
        }
        let Some(stem) = path.file_stem().and_then(|s| s.to_str()) else {
            return Err(DataError::NotAFile {
                path,
                reason: "the file name is not valid UTF-8 (ids are text: rename it)".into(),
            });
        };
        let key = NaturalKey(stem.to_string());
        if let Some(first) = out.get(&key) {
            return Err(DataError::DuplicateId {
                id: stem.to_string(),
                first: first.clone(),
                path,
            });
        }
        out.insert(key, path);
    }
    Ok(out)
}

/// A string ordered by [`natural_cmp`].
#[derive(Clone, Debug, PartialEq, Eq)]
struct NaturalKey(String);

impl PartialOrd for NaturalKey {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for NaturalKey {
    fn cmp(&self, other: &Self) -> Ordering {
        natural_cmp(&self.0, &other.0).then_with(|| self.0.cmp(&other.0))
    }
}

/// The mask file name of an image id: `<id>_mask.png`.
pub fn mask_file_name(id: &str) -> String {
    format!("{id}_mask.png")
}

/// Load a split folder: every `image/*.png`, paired with `mask/<id>_mask.png`
/// as `labels` says, validated and fitted to `opts.size`.
///
/// Errors name the file: a missing folder, an empty split, an undecodable PNG,
/// a mask value above 3, an image without its mask, a mask without its image,
/// image and mask of different sizes.
pub fn load_split(dir: &Path, labels: Labels, opts: LoadOptions) -> Result<Vec<Sample>> {
    if opts.size == 0 {
        return Err(DataError::Config("size must be at least 1".into()));
    }
    if !dir.is_dir() {
        return Err(DataError::MissingFolder {
            path: dir.to_path_buf(),
            what: "split folder",
        });
    }
    let image_dir = dir.join("image");
    if !image_dir.is_dir() {
        return Err(DataError::MissingFolder {
            path: image_dir,
            what: "a split holds image/*.png",
        });
    }
    let mask_dir = dir.join("mask");
    let labelled = match labels {
        Labels::Required => {
            if !mask_dir.is_dir() {
                return Err(DataError::MissingFolder {
                    path: mask_dir,
                    what: "a labelled split holds mask/<id>_mask.png",
                });
            }
            true
        }
        Labels::IfPresent => mask_dir.is_dir(),
        Labels::Ignore => false,
    };

    let images = png_files(&image_dir)?;
    if images.is_empty() {
        return Err(DataError::EmptySplit { dir: image_dir });
    }
    let mut masks = if labelled {
        png_files(&mask_dir)?
            .into_iter()
            .map(|(k, path)| {
                let id = k.0.strip_suffix("_mask").unwrap_or(&k.0).to_string();
                (id, path)
            })
            .collect::<BTreeMap<String, PathBuf>>()
    } else {
        BTreeMap::new()
    };

    let target = Size {
        height: opts.size,
        width: opts.size,
    };
    let mut samples = Vec::with_capacity(images.len());
    for (NaturalKey(id), image_path) in images {
        let image = read_image(&image_path)?;
        let mask = if labelled {
            let Some(mask_path) = masks.remove(&id) else {
                return Err(DataError::MissingMask {
                    expected: mask_dir.join(mask_file_name(&id)),
                    image: image_path,
                });
            };
            let mask = read_mask(&mask_path)?;
            if mask.size() != image.size() {
                return Err(DataError::SizeMismatch {
                    image_size: (image.width(), image.height()),
                    mask_size: (mask.width(), mask.height()),
                    image: image_path,
                    mask: mask_path,
                });
            }
            Some(mask.fit(target))
        } else {
            None
        };
        let original = image.size();
        if original != target {
            tracing::debug!(
                "{}: {}x{} fitted to {}x{}",
                image_path.display(),
                original.width,
                original.height,
                target.width,
                target.height
            );
        }
        samples.push(Sample {
            id,
            image: image.fit(target),
            mask,
            original,
            path: image_path,
        });
    }
    if let Some((id, mask)) = masks.into_iter().next() {
        return Err(DataError::OrphanMask {
            mask,
            expected: image_dir.join(format!("{id}.png")),
        });
    }
    Ok(samples)
}

/// The PNG files directly in `dir`, in natural order of their stems.
pub fn list_pngs(dir: &Path) -> Result<Vec<PathBuf>> {
    if !dir.is_dir() {
        return Err(DataError::MissingFolder {
            path: dir.to_path_buf(),
            what: "folder of PNG images",
        });
    }
    Ok(png_files(dir)?.into_values().collect())
}

/// The ids of a list of image files: their stems, which must be UTF-8 and
/// distinct. Reads no file, so that a long list can be checked whole before
/// its images are loaded a chunk at a time.
pub fn image_ids(paths: &[PathBuf]) -> Result<Vec<String>> {
    let mut seen = BTreeMap::new();
    let mut ids = Vec::with_capacity(paths.len());
    for path in paths {
        let id = path
            .file_stem()
            .and_then(|s| s.to_str())
            .ok_or_else(|| DataError::NotAFile {
                path: path.clone(),
                reason: "the file name is not valid UTF-8 (ids are text: rename it)".into(),
            })?
            .to_string();
        if let Some(first) = seen.insert(id.clone(), path.clone()) {
            return Err(DataError::DuplicateId {
                path: path.clone(),
                first,
                id,
            });
        }
        ids.push(id);
    }
    Ok(ids)
}

/// Load images (no masks) from a list of PNG files, fitted to `opts.size`.
/// Ids are the file stems ([`image_ids`]); two files with the same stem are
/// an error.
pub fn load_images(paths: &[PathBuf], opts: LoadOptions) -> Result<Vec<Sample>> {
    let target = Size {
        height: opts.size,
        width: opts.size,
    };
    let ids = image_ids(paths)?;
    let mut samples = Vec::with_capacity(paths.len());
    for (path, id) in paths.iter().zip(ids) {
        let image = read_image(path)?;
        samples.push(Sample {
            id,
            original: image.size(),
            image: image.fit(target),
            mask: None,
            path: path.clone(),
        });
    }
    Ok(samples)
}

/// The slices of a volume dataset's cases as samples, resampled in plane to
/// `opts.spacing_mm` where given and fitted to `opts.size` (padded or
/// cropped): the labelled cases' slices (with their masks) and the unlabelled ones'. Ids are
/// `<case>_zNN`, grouped by patient with [`crate::Grouping::Volume`].
/// Intensities are windowed per volume, as `cmr predict` does
/// ([`crate::window_with`] of `opts.window`). A label volume must match its image's
/// dimensions, be 3-D and hold classes 0–3.
pub fn volume_samples(ds: &crate::layout::VolumeDataset, opts: LoadOptions) -> Result<(Vec<Sample>, Vec<Sample>)> {
    let target = Size {
        height: opts.size,
        width: opts.size,
    };
    let (mut labelled, mut unlabelled) = (Vec::new(), Vec::new());
    for case in &ds.cases {
        let image = crate::volume::read_volume(&case.image)?;
        image.check_segmentable()?;
        let [_, _, nz, nt] = image.dims();
        if nt != 1 {
            return Err(DataError::Layout {
                path: case.image.clone(),
                message: format!("{nt} frames: a case is one 3-D frame (as ACDC and nnU-Net keep them)"),
            });
        }
        let [sx, sy, _] = image.spacing();
        let grid = opts
            .spacing_mm
            .map(|t| crate::volume::resampled_size(image.dims(), [sx, sy], t));
        let slices: Vec<Image> = crate::volume::volume_slices(&image, crate::volume::window_with(&image, opts.window))
            .into_iter()
            .map(|s| match grid {
                Some(g) => crate::transforms::resize_u8_bilinear(&s, g.height, g.width),
                None => s,
            })
            .collect();
        let masks = match &case.label {
            Some(path) => {
                let label = crate::volume::read_volume(path)?;
                if label.dims() != image.dims() {
                    return Err(DataError::Layout {
                        path: path.clone(),
                        message: format!(
                            "{:?} voxels, but its image {} has {:?}",
                            label.dims(),
                            case.image.display(),
                            image.dims()
                        ),
                    });
                }
                let masks: Vec<Mask> = crate::volume::volume_slices(&label, crate::volume::Window::AsIs)
                    .into_iter()
                    .map(|m| match grid {
                        Some(g) => crate::transforms::resize_nearest(&m, g.height, g.width),
                        None => m,
                    })
                    .collect();
                if let Some((z, bad)) = masks
                    .iter()
                    .enumerate()
                    .find_map(|(z, m)| m.data().iter().find(|&&v| v > 3).map(|&v| (z, v)))
                {
                    return Err(DataError::Layout {
                        path: path.clone(),
                        message: format!("label {bad} in slice {z} (0 background, 1 RV, 2 Myo, 3 LV)"),
                    });
                }
                Some(masks)
            }
            None => None,
        };
        let width = nz.to_string().len().max(2);
        for (z, slice) in slices.into_iter().enumerate() {
            let sample = Sample {
                id: format!("{}_z{z:0width$}", case.id),
                original: slice.size(),
                image: slice.fit(target),
                mask: masks.as_ref().map(|m| m[z].fit(target)),
                path: case.image.clone(),
            };
            match sample.mask {
                Some(_) => labelled.push(sample),
                None => unlabelled.push(sample),
            }
        }
    }
    Ok((labelled, unlabelled))
}

/// A dataset root: `train/` (labelled), optional `val/` (labelled) and `test/`
/// (images; any masks there are not labels and are ignored).
#[derive(Clone, Debug)]
pub struct Dataset {
    pub root: PathBuf,
    pub train: Vec<Sample>,
    pub val: Option<Vec<Sample>>,
    pub test: Option<Vec<Sample>>,
}

impl Dataset {
    /// Open and validate a dataset root.
    pub fn open(root: &Path, opts: LoadOptions) -> Result<Self> {
        if !root.is_dir() {
            return Err(DataError::MissingFolder {
                path: root.to_path_buf(),
                what: "dataset root",
            });
        }
        if !root.join("train").exists()
            && let Some(volumes) = crate::layout::find_volume_dataset(root)?
        {
            let (train, test) = volume_samples(&volumes, opts)?;
            if train.is_empty() {
                return Err(DataError::Layout {
                    path: root.to_path_buf(),
                    message: format!("a {} dataset without labelled cases", volumes.layout),
                });
            }
            return Ok(Self {
                root: root.to_path_buf(),
                train,
                val: None,
                test: (!test.is_empty()).then_some(test),
            });
        }
        let train = load_split(&root.join("train"), Labels::Required, opts)?;
        let val_dir = root.join("val");
        let val = if val_dir.exists() {
            Some(load_split(&val_dir, Labels::Required, opts)?)
        } else {
            None
        };
        let test_dir = root.join("test");
        let test = if test_dir.exists() {
            Some(load_split(&test_dir, Labels::Ignore, opts)?)
        } else {
            None
        };
        Ok(Self {
            root: root.to_path_buf(),
            train,
            val,
            test,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn natural_order() {
        let mut ids = vec!["cmr10", "cmr2", "cmr1", "cmr100", "cmr02", "a", "cmr", "b3"];
        ids.sort_by(|a, b| natural_cmp(a, b));
        assert_eq!(ids, vec!["a", "b3", "cmr", "cmr1", "cmr2", "cmr02", "cmr10", "cmr100"]);
    }
}
