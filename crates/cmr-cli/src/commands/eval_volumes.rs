//! `cmr eval` on a labelled volume dataset (ACDC or nnU-Net layout): per
//! case the 3-D Dice and HD95 (mm) of each class; per patient the clinical
//! numbers from the prediction against the ones from the labels (EF in
//! percentage points, volumes in mL, mass in g), summarised as Bernard et
//! al. 2018 report them (mean, bias, SD of the error, mean absolute error,
//! correlation).

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{Context, bail};
use cmr_data::{Phase, VolumeCase, VolumeDataset};
use cmr_loss::{CLASS_NAMES, LabelVolume, VolumeMetrics};
use serde::Serialize;

use crate::args::EvalArgs;
use crate::commands::load_predictor;
use crate::commands::measure::{MYO_DENSITY, label_values};
use crate::commands::predict::{read_segmentable, segment_volume, volume_name};
use crate::progress::image_bar;
use crate::text::{count, outln};

/// One case's scores and class volumes (mL: RV, Myo, LV).
#[derive(Clone, Debug, Serialize)]
struct CaseScore {
    #[serde(flatten)]
    metrics: VolumeMetrics,
    patient: String,
    phase: Option<Phase>,
    truth_ml: [f64; 3],
    pred_ml: [f64; 3],
}

/// The clinical numbers of one heart (from its ED and ES cases).
#[derive(Clone, Copy, Debug, Default, Serialize)]
struct Clinical {
    lv_edv_ml: f64,
    lv_esv_ml: f64,
    lv_ef: f64,
    rv_edv_ml: f64,
    rv_esv_ml: f64,
    rv_ef: f64,
    myo_mass_g: f64,
}

const MEASURES: [&str; 7] = [
    "lv_edv_ml",
    "lv_esv_ml",
    "lv_ef",
    "rv_edv_ml",
    "rv_esv_ml",
    "rv_ef",
    "myo_mass_g",
];

impl Clinical {
    /// From the class volumes (RV, Myo, LV; mL) at ED and at ES.
    fn of(ed: [f64; 3], es: [f64; 3]) -> Self {
        let ef = |edv: f64, esv: f64| if edv > 0.0 { 100.0 * (edv - esv) / edv } else { 0.0 };
        Self {
            lv_edv_ml: ed[2],
            lv_esv_ml: es[2],
            lv_ef: ef(ed[2], es[2]),
            rv_edv_ml: ed[0],
            rv_esv_ml: es[0],
            rv_ef: ef(ed[0], es[0]),
            myo_mass_g: ed[1] * MYO_DENSITY,
        }
    }

    fn values(&self) -> [f64; 7] {
        [
            self.lv_edv_ml,
            self.lv_esv_ml,
            self.lv_ef,
            self.rv_edv_ml,
            self.rv_esv_ml,
            self.rv_ef,
            self.myo_mass_g,
        ]
    }
}

/// One heart's numbers, truth and prediction.
#[derive(Clone, Debug, Serialize)]
struct PatientNumbers {
    patient: String,
    ed_case: String,
    es_case: String,
    /// Whether ED and ES came from the dataset (Info.cfg) or from the
    /// labels (the largest and the smallest LV).
    phases_from: &'static str,
    truth: Clinical,
    pred: Clinical,
}

/// The agreement of one clinical measure over the patients.
#[derive(Clone, Debug, Serialize)]
struct Agreement {
    measure: &'static str,
    n: usize,
    truth_mean: f64,
    pred_mean: f64,
    /// Mean of prediction − truth.
    bias: f64,
    /// Standard deviation of prediction − truth.
    sd: f64,
    mean_abs_error: f64,
    /// Pearson's r; absent under two patients or without spread.
    correlation: Option<f64>,
}

fn mean(x: &[f64]) -> f64 {
    x.iter().sum::<f64>() / x.len().max(1) as f64
}

/// Sample standard deviation (0 for fewer than two values).
fn sd(x: &[f64]) -> f64 {
    if x.len() < 2 {
        return 0.0;
    }
    let m = mean(x);
    (x.iter().map(|v| (v - m).powi(2)).sum::<f64>() / (x.len() - 1) as f64).sqrt()
}

fn pearson(a: &[f64], b: &[f64]) -> Option<f64> {
    if a.len() < 2 {
        return None;
    }
    let (ma, mb) = (mean(a), mean(b));
    let cov: f64 = a.iter().zip(b).map(|(x, y)| (x - ma) * (y - mb)).sum();
    let va: f64 = a.iter().map(|x| (x - ma).powi(2)).sum();
    let vb: f64 = b.iter().map(|y| (y - mb).powi(2)).sum();
    (va > 0.0 && vb > 0.0).then(|| cov / (va * vb).sqrt())
}

fn agreement(patients: &[PatientNumbers]) -> Vec<Agreement> {
    (0..MEASURES.len())
        .map(|k| {
            let t: Vec<f64> = patients.iter().map(|p| p.truth.values()[k]).collect();
            let p: Vec<f64> = patients.iter().map(|p| p.pred.values()[k]).collect();
            let err: Vec<f64> = p.iter().zip(&t).map(|(a, b)| a - b).collect();
            Agreement {
                measure: MEASURES[k],
                n: t.len(),
                truth_mean: mean(&t),
                pred_mean: mean(&p),
                bias: mean(&err),
                sd: sd(&err),
                mean_abs_error: mean(&err.iter().map(|e| e.abs()).collect::<Vec<_>>()),
                correlation: pearson(&t, &p),
            }
        })
        .collect()
}

/// ED and ES of one patient's scored cases: the dataset's phases where it
/// names both, else the largest and the smallest LV of the labels. `None`
/// with fewer than two cases.
fn phases(cases: &[&CaseScore]) -> Option<(usize, usize, &'static str)> {
    if cases.len() < 2 {
        return None;
    }
    let named = |p: Phase| cases.iter().position(|c| c.phase == Some(p));
    if let (Some(ed), Some(es)) = (named(Phase::Ed), named(Phase::Es)) {
        return Some((ed, es, "dataset"));
    }
    let lv = |i: usize| cases[i].truth_ml[2];
    let ed = (0..cases.len()).fold(0, |b, i| if lv(i) > lv(b) { i } else { b });
    let es = (0..cases.len()).fold(0, |b, i| if lv(i) < lv(b) { i } else { b });
    (ed != es).then_some((ed, es, "labels"))
}

/// The predicted segmentation of `case` in `dir`: `<id>_seg.nii.gz` (as
/// `cmr predict` names it), `<image name>_seg.nii.gz`, or `<id>.nii.gz` /
/// `<id>.nii` (as nnU-Net names its predictions).
fn prediction_file(dir: &Path, case: &VolumeCase) -> anyhow::Result<PathBuf> {
    let image = volume_name(&case.image);
    let candidates = [
        format!("{}_seg.nii.gz", case.id),
        format!("{image}_seg.nii.gz"),
        format!("{}.nii.gz", case.id),
        format!("{}.nii", case.id),
    ];
    candidates
        .iter()
        .map(|c| dir.join(c))
        .find(|p| p.is_file())
        .with_context(|| {
            format!(
                "{}: no prediction for case {} (looked for {})",
                dir.display(),
                case.id,
                candidates.join(", ")
            )
        })
}

/// Where the predictions come from.
enum Source<'a> {
    Model(Box<cmr_train::Predictor>),
    /// A cross-validation (or several on the same folds): each case scored
    /// by the fold (ensemble) that held it out.
    Folds(Vec<(std::collections::BTreeSet<String>, cmr_train::Predictor)>),
    /// A folder of segmentations.
    Pred(&'a Path),
}

/// Each fold of the cross-validations `paths` (on the same folds): the
/// cases it held out, and its model (ensemble).
fn fold_predictors(
    model: &str,
    paths: &[PathBuf],
    args: &EvalArgs,
) -> anyhow::Result<Vec<(std::collections::BTreeSet<String>, cmr_train::Predictor)>> {
    let mut opened = Vec::with_capacity(paths.len());
    for p in paths {
        opened.push(cmr_train::CvDir::open(p)?);
    }
    let k = opened[0].1.folds.k;
    if let Some((cv, spec)) = opened.iter().find(|(_, s)| s.folds != opened[0].1.folds) {
        bail!(
            "{}: {} folds that are not those of {} (give cross-validations made with --folds-from)",
            cv.root().display(),
            spec.folds.k,
            paths[0].display()
        );
    }
    let mut folds = Vec::with_capacity(k);
    for fold in 0..k {
        let members: Vec<PathBuf> = opened.iter().map(|(cv, _)| cv.fold_dir(fold)).collect();
        let record = crate::commands::member_split(&members[0])?
            .with_context(|| format!("{}: no splits.json", members[0].display()))?;
        let held_out = record
            .val
            .iter()
            .map(|id| cmr_data::slice_case(id).to_string())
            .collect();
        // `model` names the cross-validation: its decided clean-up applies
        let predictor = crate::commands::load_members(&members, model, &args.inference)?;
        folds.push((held_out, predictor));
    }
    Ok(folds)
}

/// A label volume's labels, checked: 3-D, values 0–3.
fn labels_of(v: &cmr_data::Volume) -> anyhow::Result<Vec<u8>> {
    let [_, _, _, nt] = v.dims();
    if nt != 1 {
        bail!(
            "{}: {nt} frames: volumes are scored frame by frame (one 3-D file a frame, as ACDC and nnU-Net keep them)",
            v.path.display()
        );
    }
    label_values(v)
}

pub fn run(args: &EvalArgs, ds: VolumeDataset) -> anyhow::Result<ExitCode> {
    if args.deform.is_some() || args.decide_clean || args.report.is_some() {
        bail!("--deform, --decide-clean and --report are for PNG slices, not volume datasets");
    }
    let labelled: Vec<&VolumeCase> = ds.cases.iter().filter(|c| c.label.is_some()).collect();
    if labelled.is_empty() {
        bail!(
            "{}: a {} dataset without labels: nothing to score",
            ds.root.display(),
            ds.layout
        );
    }
    let source = match (&args.pred, &args.model) {
        (Some(dir), _) => Source::Pred(dir),
        (None, Some(m)) => {
            let paths = m
                .split(',')
                .map(|m| crate::models::resolve(m.trim()))
                .collect::<anyhow::Result<Vec<_>>>()?;
            if paths.iter().all(|p| cmr_train::CvDir::is_cv(p)) {
                tracing::info!("each case scored by the fold that held it out (cross-validated, out of fold)");
                Source::Folds(fold_predictors(m, &paths, args)?)
            } else {
                // cases a member trained on score optimistically: say so
                let mut trained = std::collections::BTreeSet::new();
                for member in crate::commands::model_members(m)? {
                    if let Some(record) = crate::commands::member_split(&member)? {
                        trained.extend(record.train.iter().map(|id| cmr_data::slice_case(id).to_string()));
                    }
                }
                let seen = labelled.iter().filter(|c| trained.contains(&c.id)).count();
                if seen > 0 {
                    tracing::warn!(
                        "{} of the {} labelled cases were in the model's training set: their scores are optimistic (a cross-validation folder scores each case out of fold)",
                        seen,
                        labelled.len()
                    );
                }
                Source::Model(Box::new(load_predictor(m, &args.inference)?))
            }
        }
        (None, None) => bail!("give --model M, or --pred DIR to score segmentations"),
    };
    tracing::info!(
        "{}: {} dataset, {} with labels, {} without",
        ds.root.display(),
        ds.layout,
        count(labelled.len(), "case"),
        ds.cases.len() - labelled.len()
    );
    let bar = image_bar(labelled.len(), "score");
    let mut scores = Vec::with_capacity(labelled.len());
    for (k, case) in labelled.iter().enumerate() {
        let label_path = case.label.as_ref().context("a labelled case")?;
        let truth = cmr_data::read_volume(label_path)?;
        truth.check_spacing()?;
        let gt = labels_of(&truth)?;
        let model: Option<&cmr_train::Predictor> = match &source {
            Source::Model(p) => Some(p),
            Source::Folds(folds) => Some(
                folds
                    .iter()
                    .find(|(held, _)| held.contains(&case.id))
                    .map(|(_, p)| p)
                    .with_context(|| {
                        format!(
                            "case {} ({}) was held out by no fold: the cross-validation was not made on this dataset, and scoring it would score cases its models trained on",
                            case.id,
                            case.image.display()
                        )
                    })?,
            ),
            Source::Pred(_) => None,
        };
        let pred = match (model, &source) {
            (Some(p), _) => {
                let image = read_segmentable(&case.image)?;
                if image.dims() != truth.dims() {
                    bail!(
                        "{}: {:?} voxels, but its labels {} have {:?}",
                        case.image.display(),
                        image.dims(),
                        label_path.display(),
                        truth.dims()
                    );
                }
                segment_volume(p, &image)?
            }
            (None, Source::Pred(dir)) => {
                let file = prediction_file(dir, case)?;
                let v = cmr_data::read_volume(&file)?;
                if v.dims() != truth.dims() {
                    bail!(
                        "{}: {:?} voxels, but the labels {} have {:?}",
                        file.display(),
                        v.dims(),
                        label_path.display(),
                        truth.dims()
                    );
                }
                labels_of(&v)?
            }
            (None, _) => bail!("{}: no model and no predictions for this case", case.image.display()),
        };
        let [nx, ny, nz, _] = truth.dims();
        let spacing = truth.spacing().map(f64::from);
        let g = LabelVolume::new(&gt, [nx, ny, nz], spacing)?;
        let p = LabelVolume::new(&pred, [nx, ny, nz], spacing)?;
        scores.push(CaseScore {
            metrics: VolumeMetrics::compute(&case.id, p, g)?,
            patient: case.patient.clone(),
            phase: case.phase,
            truth_ml: g.class_ml(),
            pred_ml: p.class_ml(),
        });
        bar.set_position(k as u64 + 1);
    }
    bar.finish_and_clear();

    // per patient: ED and ES, the numbers both ways
    let mut patients = Vec::new();
    let mut names: Vec<&str> = scores.iter().map(|s| s.patient.as_str()).collect();
    names.dedup();
    for name in names {
        let cases: Vec<&CaseScore> = scores.iter().filter(|s| s.patient == name).collect();
        let Some((ed, es, from)) = phases(&cases) else { continue };
        patients.push(PatientNumbers {
            patient: name.to_string(),
            ed_case: cases[ed].metrics.id.clone(),
            es_case: cases[es].metrics.id.clone(),
            phases_from: from,
            truth: Clinical::of(cases[ed].truth_ml, cases[es].truth_ml),
            pred: Clinical::of(cases[ed].pred_ml, cases[es].pred_ml),
        });
    }
    let agreement = agreement(&patients);
    let dice: Vec<Vec<f64>> = (0..3)
        .map(|c| scores.iter().map(|s| s.metrics.dice[c]).collect())
        .collect();
    let hd: Vec<Vec<f64>> = (0..3)
        .map(|c| scores.iter().map(|s| s.metrics.hd95_mm[c]).collect())
        .collect();
    let mean_dice: Vec<f64> = scores.iter().map(|s| s.metrics.mean_dice()).collect();

    if args.json {
        let classes: serde_json::Map<String, serde_json::Value> = (0..3)
            .map(|c| {
                (
                    CLASS_NAMES[c].to_string(),
                    serde_json::json!({
                        "dice_mean": mean(&dice[c]), "dice_sd": sd(&dice[c]),
                        "hd95_mm_mean": mean(&hd[c]), "hd95_mm_sd": sd(&hd[c]),
                    }),
                )
            })
            .collect();
        let out = serde_json::json!({
            "data": ds.root.display().to_string(),
            "layout": ds.layout.to_string(),
            "cases": scores,
            "classes": classes,
            "mean_dice": mean(&mean_dice),
            "mean_dice_sd": sd(&mean_dice),
            "patients": patients,
            "clinical": agreement,
        });
        outln!("{}", serde_json::to_string_pretty(&out)?)?;
        return Ok(ExitCode::SUCCESS);
    }
    outln!(
        "{} ({} dataset): {}, 3-D per volume",
        ds.root.display(),
        ds.layout,
        count(scores.len(), "case")
    )?;
    outln!(
        "{:<24} {:>7} {:>7} {:>7} {:>7}   {:>9} {:>9} {:>9}",
        "case",
        "RV",
        "Myo",
        "LV",
        "mean",
        "RV HD95",
        "Myo HD95",
        "LV HD95"
    )?;
    if args.per_image {
        for s in &scores {
            let m = &s.metrics;
            outln!(
                "{:<24} {:>7.4} {:>7.4} {:>7.4} {:>7.4}   {:>9.2} {:>9.2} {:>9.2}",
                m.id,
                m.dice[0],
                m.dice[1],
                m.dice[2],
                m.mean_dice(),
                m.hd95_mm[0],
                m.hd95_mm[1],
                m.hd95_mm[2]
            )?;
        }
    }
    outln!(
        "{:<24} {:>7.4} {:>7.4} {:>7.4} {:>7.4}   {:>9.2} {:>9.2} {:>9.2}",
        "mean",
        mean(&dice[0]),
        mean(&dice[1]),
        mean(&dice[2]),
        mean(&mean_dice),
        mean(&hd[0]),
        mean(&hd[1]),
        mean(&hd[2])
    )?;
    outln!(
        "{:<24} {:>7.4} {:>7.4} {:>7.4} {:>7.4}   {:>9.2} {:>9.2} {:>9.2}",
        "SD",
        sd(&dice[0]),
        sd(&dice[1]),
        sd(&dice[2]),
        sd(&mean_dice),
        sd(&hd[0]),
        sd(&hd[1]),
        sd(&hd[2])
    )?;
    outln!("Dice per class over the whole volume; HD95 in mm (surface distances both ways, spacing-aware)")?;
    if patients.is_empty() {
        outln!("clinical numbers: no patient with two labelled frames (ED and ES)")?;
        return Ok(ExitCode::SUCCESS);
    }
    outln!("")?;
    outln!(
        "clinical numbers, {} (prediction against labels):",
        count(patients.len(), "patient")
    )?;
    outln!(
        "{:<12} {:>10} {:>10} {:>9} {:>9} {:>9} {:>7}",
        "measure",
        "truth",
        "predicted",
        "bias",
        "SD",
        "MAE",
        "r"
    )?;
    for a in &agreement {
        outln!(
            "{:<12} {:>10.2} {:>10.2} {:>9.2} {:>9.2} {:>9.2} {:>7}",
            a.measure,
            a.truth_mean,
            a.pred_mean,
            a.bias,
            a.sd,
            a.mean_abs_error,
            a.correlation.map_or("–".to_string(), |r| format!("{r:.3}"))
        )?;
    }
    outln!("EF in percent (errors in percentage points), volumes in mL, mass in g (myocardium at ED × 1.05 g/mL)")?;
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn agreement_by_hand() {
        let p = |t: f64, q: f64| PatientNumbers {
            patient: String::new(),
            ed_case: String::new(),
            es_case: String::new(),
            phases_from: "labels",
            truth: Clinical {
                lv_ef: t,
                ..Clinical::default()
            },
            pred: Clinical {
                lv_ef: q,
                ..Clinical::default()
            },
        };
        let a = agreement(&[p(50.0, 52.0), p(60.0, 58.0), p(40.0, 43.0)]);
        let ef = &a[2];
        assert_eq!(ef.measure, "lv_ef");
        assert!((ef.bias - 1.0).abs() < 1e-12);
        assert!((ef.mean_abs_error - 7.0 / 3.0).abs() < 1e-12);
        // errors 2, −2, 3: mean 1, squared deviations 1 + 9 + 4 over 2
        assert!((ef.sd - 7f64.sqrt()).abs() < 1e-12);
        assert!(ef.correlation.unwrap() > 0.9);
        assert!(a[0].correlation.is_none(), "no spread: no correlation");
        // EF from two frames: (100 − 40) / 100
        let c = Clinical::of([80.0, 100.0, 100.0], [30.0, 90.0, 40.0]);
        assert_eq!(c.lv_ef, 60.0);
        assert!((c.rv_ef - 62.5).abs() < 1e-12);
        assert!((c.myo_mass_g - 105.0).abs() < 1e-12);
    }
}
