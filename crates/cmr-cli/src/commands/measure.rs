//! `cmr measure`: the numbers the ACDC challenge grades, from segmented
//! volumes: per frame the LV and RV cavity volumes and the myocardial
//! volume (voxel counts × voxel volume); for a cine (4-D), end-diastole (the
//! frame of the largest LV volume) and end-systole (the smallest), EDV, ESV,
//! stroke volume and ejection fraction of both ventricles, and the
//! myocardial mass at end-diastole (1.05 g/mL).

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, bail};
use serde::Serialize;

use crate::args::MeasureArgs;
use crate::commands::load_predictor;
use crate::commands::predict::{read_segmentable, segment_volume, volume_inputs};
use crate::text::outln;

/// Density of myocardium, g/mL (the ACDC challenge's).
pub const MYO_DENSITY: f64 = 1.05;

/// One frame's volumes, mL.
#[derive(Clone, Debug, Serialize)]
struct Frame {
    frame: usize,
    /// The case this frame is, for a patient of a volume dataset.
    #[serde(skip_serializing_if = "Option::is_none")]
    case: Option<String>,
    lv_ml: f64,
    rv_ml: f64,
    myo_ml: f64,
}

/// A volume's clinical numbers.
#[derive(Clone, Debug, Serialize)]
struct Numbers {
    volume: String,
    frames: usize,
    voxel_ml: f64,
    ed_frame: usize,
    es_frame: usize,
    /// Where ED and ES come from: the dataset (ACDC's Info.cfg) or the
    /// volumes (the largest and the smallest LV).
    phases_from: &'static str,
    lv_edv_ml: f64,
    lv_esv_ml: f64,
    lv_sv_ml: f64,
    /// Percent; absent for a single frame.
    lv_ef: Option<f64>,
    rv_edv_ml: f64,
    rv_esv_ml: f64,
    rv_sv_ml: f64,
    rv_ef: Option<f64>,
    myo_mass_g: f64,
    per_frame: Vec<Frame>,
}

/// The numbers of a label volume with dimensions `dims` and spacing
/// `spacing` (mm).
fn numbers(volume: String, labels: &[u8], dims: [usize; 4], spacing: [f32; 3]) -> Numbers {
    let voxel_ml = voxel_ml(spacing);
    let per = dims[0] * dims[1] * dims[2];
    let per_frame: Vec<Frame> = labels
        .chunks(per.max(1))
        .enumerate()
        .map(|(t, f)| frame_of(t, None, f, voxel_ml))
        .collect();
    from_frames(volume, voxel_ml, per_frame, None)
}

fn voxel_ml(spacing: [f32; 3]) -> f64 {
    spacing.iter().map(|&s| f64::from(s)).product::<f64>() / 1000.0
}

/// The volumes of one frame's labels.
fn frame_of(frame: usize, case: Option<String>, labels: &[u8], voxel_ml: f64) -> Frame {
    let count = |c: u8| labels.iter().filter(|&&v| v == c).count() as f64 * voxel_ml;
    Frame {
        frame,
        case,
        lv_ml: count(3),
        rv_ml: count(1),
        myo_ml: count(2),
    }
}

/// The numbers of a heart's frames; ED and ES as `named` says (indices into
/// `per_frame`), else the largest and the smallest LV.
fn from_frames(volume: String, voxel_ml: f64, per_frame: Vec<Frame>, named: Option<(usize, usize)>) -> Numbers {
    // end-diastole: the largest LV; end-systole: the smallest (first of ties)
    let pick = |better: fn(f64, f64) -> bool| {
        per_frame
            .iter()
            .fold(None, |best: Option<&Frame>, f| match best {
                Some(b) if !better(f.lv_ml, b.lv_ml) => Some(b),
                _ => Some(f),
            })
            .map_or(0, |f| f.frame)
    };
    let (ed, es, phases_from) = match named {
        Some((ed, es)) => (ed, es, "dataset"),
        None => (pick(|a, b| a > b), pick(|a, b| a < b), "volumes"),
    };
    let cine = per_frame.len() > 1;
    let f = |t: usize| {
        per_frame.get(t).cloned().unwrap_or(Frame {
            frame: t,
            case: None,
            lv_ml: 0.0,
            rv_ml: 0.0,
            myo_ml: 0.0,
        })
    };
    let (edf, esf) = (f(ed), f(es));
    let ef = |edv: f64, esv: f64| (cine && edv > 0.0).then(|| 100.0 * (edv - esv) / edv);
    Numbers {
        volume,
        frames: per_frame.len(),
        voxel_ml,
        ed_frame: ed,
        es_frame: es,
        phases_from,
        lv_edv_ml: edf.lv_ml,
        lv_esv_ml: esf.lv_ml,
        lv_sv_ml: edf.lv_ml - esf.lv_ml,
        lv_ef: ef(edf.lv_ml, esf.lv_ml),
        rv_edv_ml: edf.rv_ml,
        rv_esv_ml: esf.rv_ml,
        rv_sv_ml: edf.rv_ml - esf.rv_ml,
        rv_ef: ef(edf.rv_ml, esf.rv_ml),
        myo_mass_g: edf.myo_ml * MYO_DENSITY,
        per_frame,
    }
}

pub fn run(args: MeasureArgs) -> anyhow::Result<ExitCode> {
    let source = args
        .masks
        .as_ref()
        .or(args.input.as_ref())
        .context("give --masks PATH, or --model M --input PATH")?;
    if let Some(ds) = cmr_data::find_volume_dataset(source)? {
        let all = measure_patients(&args, &ds)?;
        return report(&args, &all);
    }
    let files: Vec<PathBuf> =
        volume_inputs(source)?.with_context(|| format!("{}: no NIfTI volume (.nii, .nii.gz)", source.display()))?;
    let mut all = Vec::with_capacity(files.len());
    match &args.model {
        Some(model) => {
            let predictor = load_predictor(model, &args.inference)?;
            for f in &files {
                let v = read_segmentable(f)?;
                let labels = segment_volume(&predictor, &v)?;
                all.push(numbers(v.path.display().to_string(), &labels, v.dims(), v.spacing()));
            }
        }
        None => {
            for f in &files {
                let v = cmr_data::read_volume(f)?;
                let labels = label_values(&v)?;
                v.check_spacing()?;
                all.push(numbers(f.display().to_string(), &labels, v.dims(), v.spacing()));
            }
        }
    }
    report(&args, &all)
}

/// Each patient of a volume dataset measured over its cases (frames): with
/// --model its images segmented, with --masks its labels. ED and ES are
/// the frames the dataset names (ACDC's Info.cfg), else the largest and the
/// smallest LV.
fn measure_patients(args: &MeasureArgs, ds: &cmr_data::VolumeDataset) -> anyhow::Result<Vec<Numbers>> {
    let predictor = match &args.model {
        Some(model) => Some(load_predictor(model, &args.inference)?),
        None => None,
    };
    let mut patients: Vec<&str> = ds.cases.iter().map(|c| c.patient.as_str()).collect();
    patients.dedup();
    let mut all = Vec::with_capacity(patients.len());
    for patient in patients {
        let cases: Vec<&cmr_data::VolumeCase> = ds.cases.iter().filter(|c| c.patient == patient).collect();
        let mut frames = Vec::with_capacity(cases.len());
        let mut first_voxel = None;
        for (k, case) in cases.iter().enumerate() {
            let (labels, spacing) = match &predictor {
                Some(p) => {
                    let v = read_segmentable(&case.image)?;
                    (segment_volume(p, &v)?, v.spacing())
                }
                None => {
                    let path = case.label.as_ref().with_context(|| {
                        format!(
                            "{}: no labels (_gt) to measure: give --model to segment it",
                            case.image.display()
                        )
                    })?;
                    let v = cmr_data::read_volume(path)?;
                    v.check_spacing()?;
                    (label_values(&v)?, v.spacing())
                }
            };
            let ml = voxel_ml(spacing);
            first_voxel.get_or_insert(ml);
            frames.push(frame_of(k, Some(case.id.clone()), &labels, ml));
        }
        let named = |p: cmr_data::Phase| cases.iter().position(|c| c.phase == Some(p));
        let phases = named(cmr_data::Phase::Ed).zip(named(cmr_data::Phase::Es));
        all.push(from_frames(
            patient.to_string(),
            first_voxel.unwrap_or(0.0),
            frames,
            phases,
        ));
    }
    Ok(all)
}

/// A segmentation's labels, checked to be classes (0–3).
pub fn label_values(v: &cmr_data::Volume) -> anyhow::Result<Vec<u8>> {
    let labels: Vec<u8> = v.values().iter().map(|&x| x.round().clamp(0.0, 255.0) as u8).collect();
    if let Some(bad) = labels.iter().find(|&&l| l > 3) {
        bail!(
            "{}: label {bad} in a segmentation (0 background, 1 RV, 2 Myo, 3 LV)",
            v.path.display()
        );
    }
    Ok(labels)
}

/// The numbers as a CSV (if asked), JSON or a table.
fn report(args: &MeasureArgs, all: &[Numbers]) -> anyhow::Result<ExitCode> {
    if let Some(csv) = &args.csv {
        let mut text = String::from(
            "volume,frames,ed_frame,es_frame,lv_edv_ml,lv_esv_ml,lv_sv_ml,lv_ef,rv_edv_ml,rv_esv_ml,rv_sv_ml,rv_ef,myo_mass_g\n",
        );
        let o = |v: Option<f64>| v.map(|x| format!("{x:.2}")).unwrap_or_default();
        for n in all {
            text += &format!(
                "{},{},{},{},{:.2},{:.2},{:.2},{},{:.2},{:.2},{:.2},{},{:.2}\n",
                n.volume.replace(',', "_"),
                n.frames,
                n.ed_frame,
                n.es_frame,
                n.lv_edv_ml,
                n.lv_esv_ml,
                n.lv_sv_ml,
                o(n.lv_ef),
                n.rv_edv_ml,
                n.rv_esv_ml,
                n.rv_sv_ml,
                o(n.rv_ef),
                n.myo_mass_g
            );
        }
        cmr_data::write_atomic(csv, text.as_bytes())?;
        tracing::info!("{}: {} rows", csv.display(), all.len());
    }
    if args.json {
        outln!("{}", serde_json::to_string_pretty(all)?)?;
        return Ok(ExitCode::SUCCESS);
    }
    for n in all {
        outln!("{} ({} frames, voxel {:.4} mL)", n.volume, n.frames, n.voxel_ml)?;
        if n.frames > 1 {
            let name = |t: usize| match n.per_frame.get(t).and_then(|f| f.case.as_ref()) {
                Some(case) => case.clone(),
                None => format!("frame {t}"),
            };
            outln!(
                "          EDV (mL)  ESV (mL)  SV (mL)  EF (%)   ED {}, ES {} (from the {})",
                name(n.ed_frame),
                name(n.es_frame),
                n.phases_from
            )?;
            let ef = |v: Option<f64>| v.map_or("–".to_string(), |x| format!("{x:.1}"));
            outln!(
                "LV     {:>10.2} {:>9.2} {:>8.2} {:>7}",
                n.lv_edv_ml,
                n.lv_esv_ml,
                n.lv_sv_ml,
                ef(n.lv_ef)
            )?;
            outln!(
                "RV     {:>10.2} {:>9.2} {:>8.2} {:>7}",
                n.rv_edv_ml,
                n.rv_esv_ml,
                n.rv_sv_ml,
                ef(n.rv_ef)
            )?;
        } else {
            outln!("LV cavity {:.2} mL, RV cavity {:.2} mL", n.lv_edv_ml, n.rv_edv_ml)?;
        }
        outln!("myocardial mass {:.2} g (at end-diastole, 1.05 g/mL)", n.myo_mass_g)?;
    }
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Two frames of a 10×10×4 volume at 1.5 × 1.5 × 8 mm (18 mm³ a voxel):
    /// LV 100 voxels then 40, RV 50 then 30, Myo 60 in both: EDV 1.8 mL,
    /// ESV 0.72 mL, EF 60 %, RV EF 40 %, mass 60 · 0.018 · 1.05 g.
    #[test]
    fn ejection_fraction_by_hand() {
        let frame = |lv: usize, rv: usize, myo: usize| {
            let mut f = vec![0u8; 400];
            f[..lv].fill(3);
            f[lv..lv + rv].fill(1);
            f[lv + rv..lv + rv + myo].fill(2);
            f
        };
        let labels: Vec<u8> = [frame(40, 30, 60), frame(100, 50, 60)].concat();
        let n = numbers("v".into(), &labels, [10, 10, 4, 2], [1.5, 1.5, 8.0]);
        assert_eq!((n.ed_frame, n.es_frame), (1, 0));
        assert!((n.voxel_ml - 0.018).abs() < 1e-12);
        assert!((n.lv_edv_ml - 1.8).abs() < 1e-9 && (n.lv_esv_ml - 0.72).abs() < 1e-9);
        assert!((n.lv_ef.unwrap() - 60.0).abs() < 1e-9);
        assert!((n.rv_ef.unwrap() - 40.0).abs() < 1e-9);
        assert!((n.myo_mass_g - 60.0 * 0.018 * 1.05).abs() < 1e-9);
        // one frame: volumes, no EF
        let one = numbers("v".into(), &frame(100, 0, 0), [10, 10, 4, 1], [1.0, 1.0, 1.0]);
        assert!(one.lv_ef.is_none() && (one.lv_edv_ml - 0.1).abs() < 1e-12);
    }
}
