//! The two layouts in which people keep labelled cardiac volumes, found by
//! looking: ACDC's and nnU-Net's.
//!
//! - **ACDC**: `patientNNN/patientNNN_frameMM.nii.gz` with its labels in
//!   `patientNNN_frameMM_gt.nii.gz` and the patient's `Info.cfg`, whose `ED:`
//!   and `ES:` lines name the end-diastolic and end-systolic frames (a
//!   `patientNNN_4d.nii.gz` cine beside them is not a case). The patient
//!   folders lie in the root or in its `training/` or `testing/` folder, or
//!   the root is one patient's folder.
//! - **nnU-Net**: `imagesTr/<case>_0000.nii.gz` with labels in
//!   `labelsTr/<case>.nii.gz` (`.nii` too). One channel only: a `_0001`
//!   image is refused. The patient is the case name without a trailing
//!   `_frameMM` (how nnU-Net's ACDC conversion names cases), else the case.
//!
//! Cases come sorted by patient and frame; a patient's cases stay together
//! whenever they are split (by [`VolumeCase::patient`]).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use crate::error::{DataError, Result};

/// Which layout a dataset folder is in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Layout {
    Acdc,
    NnUnet,
}

impl std::fmt::Display for Layout {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Acdc => "ACDC",
            Self::NnUnet => "nnU-Net",
        })
    }
}

/// The cardiac phase a case shows, where the dataset says.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
pub enum Phase {
    /// End-diastole.
    Ed,
    /// End-systole.
    Es,
}

/// One labelled (or unlabelled) volume of a dataset.
#[derive(Clone, Debug, PartialEq)]
pub struct VolumeCase {
    /// The case's name (`patient001_frame01`, an nnU-Net case).
    pub id: String,
    /// The heart it belongs to: cases of one patient are never split apart.
    pub patient: String,
    pub image: PathBuf,
    /// The labels (0 background, 1 RV, 2 Myo, 3 LV), where the dataset has
    /// them.
    pub label: Option<PathBuf>,
    /// ED or ES, where the dataset names it (ACDC's `Info.cfg`).
    pub phase: Option<Phase>,
}

/// A folder of volumes in one of the [`Layout`]s.
#[derive(Clone, Debug)]
pub struct VolumeDataset {
    pub root: PathBuf,
    pub layout: Layout,
    pub cases: Vec<VolumeCase>,
}

fn layout_err(path: &Path, message: impl Into<String>) -> DataError {
    DataError::Layout {
        path: path.to_path_buf(),
        message: message.into(),
    }
}

fn entries(dir: &Path) -> Result<Vec<PathBuf>> {
    let read = std::fs::read_dir(dir).map_err(|source| DataError::Io {
        path: dir.to_path_buf(),
        source,
    })?;
    let mut out = Vec::new();
    for entry in read {
        let entry = entry.map_err(|source| DataError::Io {
            path: dir.to_path_buf(),
            source,
        })?;
        out.push(entry.path());
    }
    out.sort();
    Ok(out)
}

fn name_of(path: &Path) -> Result<&str> {
    path.file_name()
        .and_then(|n| n.to_str())
        .ok_or_else(|| DataError::NotAFile {
            path: path.to_path_buf(),
            reason: "the file name is not valid UTF-8 (case names are text: rename it)".into(),
        })
}

/// `name` without a NIfTI ending (`.nii.gz`, `.nii`), or `None` when it has
/// neither.
fn nifti_stem(name: &str) -> Option<&str> {
    name.strip_suffix(".nii.gz").or_else(|| name.strip_suffix(".nii"))
}

/// `patient001_frame01` → (`patient001`, 1).
fn split_frame(stem: &str) -> Option<(&str, u32)> {
    let (head, frame) = stem.rsplit_once("_frame")?;
    (!frame.is_empty() && frame.bytes().all(|b| b.is_ascii_digit()))
        .then(|| frame.parse().ok().map(|f| (head, f)))
        .flatten()
}

fn is_patient_folder(path: &Path) -> bool {
    path.is_dir()
        && path
            .file_name()
            .and_then(|n| n.to_str())
            .and_then(|n| n.strip_prefix("patient"))
            .is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
}

/// ACDC's `Info.cfg`: the ED and ES frame numbers.
pub fn read_info_cfg(path: &Path) -> Result<(u32, u32)> {
    let text = std::fs::read_to_string(path).map_err(|source| DataError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    let (mut ed, mut es) = (None, None);
    for (i, line) in text.lines().enumerate() {
        let Some((key, value)) = line.split_once(':') else {
            continue;
        };
        let slot = match key.trim() {
            "ED" => &mut ed,
            "ES" => &mut es,
            _ => continue,
        };
        let frame: u32 = value.trim().parse().map_err(|_| {
            layout_err(
                path,
                format!(
                    "line {}: {:?} is not a frame number (as in \"ED: 1\")",
                    i + 1,
                    value.trim()
                ),
            )
        })?;
        *slot = Some(frame);
    }
    match (ed, es) {
        (Some(ed), Some(es)) => Ok((ed, es)),
        _ => Err(layout_err(
            path,
            "no \"ED:\" or no \"ES:\" line (ACDC's Info.cfg names both frames)",
        )),
    }
}

fn acdc_patient(dir: &Path, cases: &mut Vec<VolumeCase>) -> Result<()> {
    let patient = name_of(dir)?.to_string();
    let info = dir.join("Info.cfg");
    let phases = if info.is_file() {
        Some(read_info_cfg(&info)?)
    } else {
        None
    };
    let files = entries(dir)?;
    let mut images: BTreeMap<u32, (String, PathBuf)> = BTreeMap::new();
    let mut labels: BTreeMap<u32, PathBuf> = BTreeMap::new();
    for f in &files {
        let Some(stem) = nifti_stem(name_of(f)?) else { continue };
        let (stem, is_label) = match stem.strip_suffix("_gt") {
            Some(s) => (s, true),
            None => (stem, false),
        };
        let Some((head, frame)) = split_frame(stem) else {
            continue; // the 4-D cine, or another file
        };
        if head != patient {
            return Err(layout_err(
                f,
                format!("a frame of {head} in the folder of {patient} (ACDC names frames after their patient)"),
            ));
        }
        if is_label {
            labels.insert(frame, f.clone());
        } else {
            images.insert(frame, (stem.to_string(), f.clone()));
        }
    }
    if let Some((frame, label)) = labels.iter().find(|(f, _)| !images.contains_key(f)) {
        return Err(layout_err(label, format!("labels of frame {frame} without its image")));
    }
    for (frame, (id, image)) in images {
        let phase = phases.and_then(|(ed, es)| match frame {
            f if f == ed => Some(Phase::Ed),
            f if f == es => Some(Phase::Es),
            _ => None,
        });
        cases.push(VolumeCase {
            id,
            patient: patient.clone(),
            image,
            label: labels.remove(&frame),
            phase,
        });
    }
    Ok(())
}

fn find_acdc(root: &Path) -> Result<Option<Vec<VolumeCase>>> {
    // one patient's folder on its own
    if is_patient_folder(root) {
        let mut cases = Vec::new();
        acdc_patient(root, &mut cases)?;
        return Ok((!cases.is_empty()).then_some(cases));
    }
    for dir in [root.to_path_buf(), root.join("training"), root.join("testing")] {
        if !dir.is_dir() {
            continue;
        }
        let patients: Vec<PathBuf> = entries(&dir)?.into_iter().filter(|p| is_patient_folder(p)).collect();
        if patients.is_empty() {
            continue;
        }
        let mut cases = Vec::new();
        for p in &patients {
            acdc_patient(p, &mut cases)?;
        }
        if cases.is_empty() {
            return Err(layout_err(
                &dir,
                "patient folders without patientNNN_frameMM.nii.gz volumes",
            ));
        }
        return Ok(Some(cases));
    }
    Ok(None)
}

fn find_nnunet(root: &Path) -> Result<Option<Vec<VolumeCase>>> {
    let (images, labels) = (root.join("imagesTr"), root.join("labelsTr"));
    if !images.is_dir() {
        return Ok(None);
    }
    let mut cases = Vec::new();
    for f in entries(&images)? {
        let Some(stem) = nifti_stem(name_of(&f)?) else { continue };
        let Some((case, channel)) = stem.rsplit_once('_') else {
            return Err(layout_err(&f, "not <case>_0000.nii.gz (nnU-Net names each channel)"));
        };
        if channel != "0000" {
            return Err(layout_err(
                &f,
                format!("channel {channel}: cmr segments one channel (only <case>_0000 images)"),
            ));
        }
        let label = ["nii.gz", "nii"]
            .iter()
            .map(|ext| labels.join(format!("{case}.{ext}")))
            .find(|p| p.is_file());
        let patient = split_frame(case).map_or(case, |(head, _)| head).to_string();
        cases.push(VolumeCase {
            id: case.to_string(),
            patient,
            image: f.clone(),
            label,
            phase: None,
        });
    }
    if cases.is_empty() {
        return Err(layout_err(&images, "no <case>_0000.nii.gz volumes"));
    }
    Ok(Some(cases))
}

impl VolumeDataset {
    /// The median in-plane spacing (mm) of the labelled cases (x and y
    /// pooled), as nnU-Net takes its target spacing: a default for
    /// training on these volumes. Reads every labelled image.
    pub fn median_spacing(&self) -> Result<f64> {
        let mut all = Vec::new();
        for case in self.cases.iter().filter(|c| c.label.is_some()) {
            let v = crate::volume::read_volume(&case.image)?;
            v.check_spacing()?;
            let [sx, sy, _] = v.spacing();
            all.extend([f64::from(sx), f64::from(sy)]);
        }
        if all.is_empty() {
            return Err(layout_err(&self.root, "no labelled case to take a spacing from"));
        }
        all.sort_by(f64::total_cmp);
        let n = all.len();
        let median = if n % 2 == 1 {
            all[n / 2]
        } else {
            (all[n / 2 - 1] + all[n / 2]) / 2.0
        };
        // to 0.1 µm: the header's f32 read as f64 without its noise digits
        Ok((median * 1e4).round() / 1e4)
    }
}

/// The volume dataset at `root`, if it is in one of the [`Layout`]s
/// (`None` when it is in neither, e.g. a folder of PNG slices).
pub fn find_volume_dataset(root: &Path) -> Result<Option<VolumeDataset>> {
    let found = match find_acdc(root)? {
        Some(cases) => Some((Layout::Acdc, cases)),
        None => find_nnunet(root)?.map(|cases| (Layout::NnUnet, cases)),
    };
    Ok(found.map(|(layout, mut cases)| {
        cases.sort_by(|a, b| (&a.patient, &a.id).cmp(&(&b.patient, &b.id)));
        VolumeDataset {
            root: root.to_path_buf(),
            layout,
            cases,
        }
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn touch(p: &Path) {
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, b"").unwrap();
    }

    #[test]
    fn acdc_cases_with_their_phases() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("training");
        for p in ["patient001", "patient002"] {
            for f in ["01", "12"] {
                touch(&root.join(format!("{p}/{p}_frame{f}.nii.gz")));
                touch(&root.join(format!("{p}/{p}_frame{f}_gt.nii.gz")));
            }
            touch(&root.join(format!("{p}/{p}_4d.nii.gz")));
        }
        std::fs::write(
            root.join("patient001/Info.cfg"),
            "ED: 1\nES: 12\nGroup: DCM\nHeight: 184.0\n",
        )
        .unwrap();
        let ds = find_volume_dataset(dir.path()).unwrap().unwrap();
        assert_eq!(ds.layout, Layout::Acdc);
        let ids: Vec<&str> = ds.cases.iter().map(|c| c.id.as_str()).collect();
        assert_eq!(
            ids,
            [
                "patient001_frame01",
                "patient001_frame12",
                "patient002_frame01",
                "patient002_frame12"
            ]
        );
        assert_eq!(ds.cases[0].phase, Some(Phase::Ed));
        assert_eq!(ds.cases[1].phase, Some(Phase::Es));
        assert_eq!(ds.cases[2].phase, None, "no Info.cfg: the phase is not known");
        assert_eq!(ds.cases[3].patient, "patient002");
        assert!(ds.cases.iter().all(|c| c.label.is_some()));
        // one patient's folder is a dataset of one
        let one = find_volume_dataset(&root.join("patient001")).unwrap().unwrap();
        assert_eq!(one.cases, ds.cases[..2]);

        // a broken Info.cfg is named with its line
        std::fs::write(root.join("patient002/Info.cfg"), "ED: one\nES: 12\n").unwrap();
        let e = find_volume_dataset(dir.path()).unwrap_err().to_string();
        assert!(e.contains("patient002/Info.cfg") && e.contains("line 1"), "{e}");
        std::fs::write(root.join("patient002/Info.cfg"), "ED: 1\n").unwrap();
        let e = find_volume_dataset(dir.path()).unwrap_err().to_string();
        assert!(e.contains("ES:"), "{e}");
        std::fs::remove_file(root.join("patient002/Info.cfg")).unwrap();
        // labels without their image
        std::fs::remove_file(root.join("patient002/patient002_frame12.nii.gz")).unwrap();
        let e = find_volume_dataset(dir.path()).unwrap_err().to_string();
        assert!(
            e.contains("patient002_frame12_gt") && e.contains("without its image"),
            "{e}"
        );
    }

    #[test]
    fn nnunet_cases_grouped_by_patient() {
        let dir = tempfile::tempdir().unwrap();
        for c in ["patient001_frame01", "patient001_frame12", "heart7"] {
            touch(&dir.path().join(format!("imagesTr/{c}_0000.nii.gz")));
        }
        touch(&dir.path().join("labelsTr/patient001_frame01.nii.gz"));
        touch(&dir.path().join("labelsTr/heart7.nii"));
        let ds = find_volume_dataset(dir.path()).unwrap().unwrap();
        assert_eq!(ds.layout, Layout::NnUnet);
        let got: Vec<(&str, &str, bool)> = ds
            .cases
            .iter()
            .map(|c| (c.id.as_str(), c.patient.as_str(), c.label.is_some()))
            .collect();
        assert_eq!(
            got,
            [
                ("heart7", "heart7", true),
                ("patient001_frame01", "patient001", true),
                ("patient001_frame12", "patient001", false)
            ]
        );
        // a second channel is refused by name
        touch(&dir.path().join("imagesTr/heart7_0001.nii.gz"));
        let e = find_volume_dataset(dir.path()).unwrap_err().to_string();
        assert!(e.contains("heart7_0001") && e.contains("one channel"), "{e}");
    }

    #[test]
    fn a_png_dataset_is_neither() {
        let dir = tempfile::tempdir().unwrap();
        touch(&dir.path().join("train/image/cmr1.png"));
        assert!(find_volume_dataset(dir.path()).unwrap().is_none());
    }
}
