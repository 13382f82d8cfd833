//! Pseudo-labels (self-training): a dataset's unlabelled images (`test/`),
//! labelled by a teacher, join a run's training slices.
//!
//! Only a cross-validation takes them, fold by fold: fold `k` is taught by
//! fold `k` of a teacher cross-validation on the same folds, a model that never
//! saw the slices fold `k` is scored on, so that the cross-validated scores
//! stay honest. The labels are predicted once, when a fold starts, and kept in
//! the fold's folder (`pseudo/<id>_mask.png`): a resumed fold trains on the
//! labels it started with, and anyone can look at them.
//!
//! ```text
//! CV/fold-k/pseudo/<id>_mask.png   the teacher's mask of each unlabelled image
//! CV/fold-k/pseudo/teacher.json    which model labelled them, and how
//! ```

use std::path::{Path, PathBuf};

use candle_core::Device;
use cmr_data::{Folds, Sample, mask_file_name, read_mask, write_mask};
use cmr_models::KernelConfig;
use serde::{Deserialize, Serialize};

use crate::cv::CvDir;
use crate::error::{Result, TrainError};
use crate::predict::{PredictOptions, Predictor, Tta};

/// `data.pseudo_labels`: where a cross-validation's pseudo-labels come from.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PseudoLabels {
    /// A finished cross-validation on the same folds: its fold `k` labels
    /// the images that fold `k` trains on.
    pub teacher: PathBuf,
    /// The teacher's test-time augmentation.
    #[serde(default = "dihedral")]
    pub tta: Tta,
}

fn dihedral() -> Tta {
    Tta::Dihedral
}

/// What `pseudo/teacher.json` records.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct TeacherRecord {
    /// The teacher's model folder that labelled these images.
    model: PathBuf,
    tta: Tta,
    /// The unlabelled images, in order.
    ids: Vec<String>,
}

/// The folder of a run's pseudo-labels.
pub const PSEUDO_DIR: &str = "pseudo";
const RECORD: &str = "teacher.json";

/// Check that `teacher` can teach the cross-validation with `folds`: a
/// cross-validation folder whose folds are the same and whose every fold is
/// finished (or shipped). Returns its fold folders.
pub fn check_teacher(teacher: &Path, folds: &Folds) -> Result<Vec<PathBuf>> {
    let (cv, spec) = CvDir::open(teacher)?;
    if spec.folds.val != folds.val {
        return Err(TrainError::Run {
            path: teacher.to_path_buf(),
            message: "its folds are not this cross-validation's: a fold's teacher must not have trained on the slices that fold is scored on (train both with the same --folds-from)".into(),
        });
    }
    (0..folds.k)
        .map(|k| {
            if cv.fold_ready(k)? {
                Ok(cv.fold_dir(k))
            } else {
                Err(TrainError::Run {
                    path: cv.fold_dir(k),
                    message: "not finished: a teacher's folds must all be trained (cmr train --resume)".into(),
                })
            }
        })
        .collect()
}

/// The unlabelled `images` with the masks of `run/pseudo/`: read back when
/// the folder is there, else predicted by the model at `teacher` and written
/// there first (into a temporary folder renamed when whole, so that a crash
/// leaves no partial labels under the final name). `teacher` is not read
/// when the labels are there: a resumed run does not need its teacher.
pub fn pseudo_labelled(
    run: &Path,
    teacher: &Path,
    tta: Tta,
    images: &[Sample],
    device: &Device,
    kernels: KernelConfig,
) -> Result<Vec<Sample>> {
    let dir = run.join(PSEUDO_DIR);
    let ids: Vec<String> = images.iter().map(|s| s.id.clone()).collect();
    if !dir.exists() {
        write_labels(&dir, teacher, tta, images, &ids, device, kernels)?;
    }
    let record_path = dir.join(RECORD);
    let text = std::fs::read_to_string(&record_path).map_err(|e| TrainError::io(&record_path, e))?;
    let record: TeacherRecord = serde_json::from_str(&text).map_err(|e| TrainError::ConfigFile {
        path: record_path.clone(),
        message: e.to_string(),
    })?;
    if record.ids != ids {
        return Err(TrainError::Run {
            path: dir,
            message: format!(
                "labels {} unlabelled images, and the data has {} others: not the data this run started with",
                record.ids.len(),
                ids.len()
            ),
        });
    }
    images
        .iter()
        .map(|s| {
            let path = dir.join(mask_file_name(&s.id));
            let mask = read_mask(&path)?;
            if mask.size() != s.image.size() {
                return Err(TrainError::Run {
                    path,
                    message: format!(
                        "a {}×{} mask for a {}×{} image",
                        mask.height(),
                        mask.width(),
                        s.image.height(),
                        s.image.width()
                    ),
                });
            }
            Ok(Sample {
                mask: Some(mask),
                ..s.clone()
            })
        })
        .collect()
}

fn write_labels(
    dir: &Path,
    teacher: &Path,
    tta: Tta,
    images: &[Sample],
    ids: &[String],
    device: &Device,
    kernels: KernelConfig,
) -> Result<()> {
    let options = PredictOptions {
        tta,
        kernels,
        ..PredictOptions::default()
    };
    let predictor = Predictor::load(teacher, device, options)?;
    let size = predictor.config().data.size;
    if let Some(s) = images
        .iter()
        .find(|s| s.image.height() != size || s.image.width() != size)
    {
        return Err(TrainError::Run {
            path: teacher.to_path_buf(),
            message: format!(
                "takes {size}×{size} images, and {} is fitted to {}×{}",
                s.id,
                s.image.height(),
                s.image.width()
            ),
        });
    }
    let masks = predictor.predict(images, |_| {})?;
    let partial = dir.with_extension("partial");
    if partial.exists() {
        std::fs::remove_dir_all(&partial).map_err(|e| TrainError::io(&partial, e))?;
    }
    std::fs::create_dir_all(&partial).map_err(|e| TrainError::io(&partial, e))?;
    for (s, mask) in images.iter().zip(&masks) {
        write_mask(&partial.join(mask_file_name(&s.id)), mask)?;
    }
    let record = TeacherRecord {
        model: teacher.to_path_buf(),
        tta,
        ids: ids.to_vec(),
    };
    let text = serde_json::to_string_pretty(&record).expect("a TeacherRecord always serialises");
    cmr_data::write_atomic(&partial.join(RECORD), text.as_bytes())?;
    std::fs::rename(&partial, dir).map_err(|e| TrainError::io(dir, e))?;
    tracing::info!(
        "{}: {} unlabelled images labelled by {} ({})",
        dir.display(),
        images.len(),
        teacher.display(),
        tta
    );
    Ok(())
}
