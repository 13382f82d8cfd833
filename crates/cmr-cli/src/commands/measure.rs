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
#[derive(Clone, Copy, Debug, Serialize)]
struct Frame {
    frame: usize,
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
    let voxel_ml = spacing.iter().map(|&s| f64::from(s)).product::<f64>() / 1000.0;
    let per = dims[0] * dims[1] * dims[2];
    let per_frame: Vec<Frame> = labels
        .chunks(per.max(1))
        .enumerate()
        .map(|(t, f)| {
            let count = |c: u8| f.iter().filter(|&&v| v == c).count() as f64 * voxel_ml;
            Frame {
                frame: t,
                lv_ml: count(3),
                rv_ml: count(1),
                myo_ml: count(2),
            }
        })
        .collect();
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
    let ed = pick(|a, b| a > b);
    let es = pick(|a, b| a < b);
    let cine = per_frame.len() > 1;
    let f = |t: usize| {
        per_frame.get(t).copied().unwrap_or(Frame {
            frame: t,
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
                let labels: Vec<u8> = v.values().iter().map(|&x| x.round().clamp(0.0, 255.0) as u8).collect();
                if let Some(bad) = labels.iter().find(|&&l| l > 3) {
                    bail!(
                        "{}: label {bad} in a segmentation (0 background, 1 RV, 2 Myo, 3 LV)",
                        f.display()
                    );
                }
                v.check_spacing()?;
                all.push(numbers(f.display().to_string(), &labels, v.dims(), v.spacing()));
            }
        }
    }
    if let Some(csv) = &args.csv {
        let mut text = String::from(
            "volume,frames,ed_frame,es_frame,lv_edv_ml,lv_esv_ml,lv_sv_ml,lv_ef,rv_edv_ml,rv_esv_ml,rv_sv_ml,rv_ef,myo_mass_g\n",
        );
        let o = |v: Option<f64>| v.map(|x| format!("{x:.2}")).unwrap_or_default();
        for n in &all {
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
        outln!("{}", serde_json::to_string_pretty(&all)?)?;
        return Ok(ExitCode::SUCCESS);
    }
    for n in &all {
        outln!("{} ({} frames, voxel {:.4} mL)", n.volume, n.frames, n.voxel_ml)?;
        if n.frames > 1 {
            outln!(
                "          EDV (mL)  ESV (mL)  SV (mL)  EF (%)   ED frame {}, ES frame {}",
                n.ed_frame,
                n.es_frame
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
