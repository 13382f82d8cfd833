//! Volumes through the binary: a NIfTI stack of real slices segments to the
//! same labels as its PNG slices, and `cmr measure` gives the volumes and the
//! ejection fraction that the voxel counts and the spacing give by hand.

use cmr_data::{Volume, Voxels, labels_to_volume, read_image, read_mask, read_volume, write_labels, write_volume};
use cmr_tests::{cmr, fails, ok, shared_data};

#[test]
fn a_volume_of_slices_segments_like_its_pngs_and_is_measured() {
    let Some(data) = shared_data() else { return };
    let dir = tempfile::tempdir().unwrap();
    // four slices (two hearts' pairs) as x × y × z = 96 × 96 × 4 at 1.25 × 1.25 × 8 mm
    let pngs = dir.path().join("pngs");
    std::fs::create_dir_all(&pngs).unwrap();
    let mut slices = Vec::new();
    for i in 1..=4 {
        let src = data.join(format!("train/image/cmr{i}.png"));
        std::fs::copy(&src, pngs.join(format!("cmr{i}.png"))).unwrap();
        slices.push(read_image(&src).unwrap());
    }
    let voxels = labels_to_volume([96, 96, 4, 1], &slices);
    let scan = dir.path().join("scan.nii.gz");
    let v = Volume::new_u8([96, 96, 4, 1], [1.25, 1.25, 8.0], voxels, &scan).unwrap();
    write_volume(&scan, &v).unwrap();

    let seg_dir = dir.path().join("seg");
    ok(cmr()
        .args(["predict", "--model", "unet", "--device", "cpu", "--input"])
        .arg(&scan)
        .arg("--out")
        .arg(&seg_dir));
    let png_dir = dir.path().join("png");
    ok(cmr()
        .args(["predict", "--model", "unet", "--device", "cpu", "--input"])
        .arg(&pngs)
        .arg("--out")
        .arg(&png_dir));
    let seg = read_volume(&seg_dir.join("scan_seg.nii.gz")).unwrap();
    assert_eq!(seg.dims(), [96, 96, 4, 1]);
    assert_eq!(seg.spacing(), [1.25, 1.25, 8.0]);
    assert_eq!(seg.affine(), v.affine());
    let masks: Vec<_> = (1..=4)
        .map(|i| read_mask(&png_dir.join(format!("cmr{i}_mask.png"))).unwrap())
        .collect();
    let expect = labels_to_volume([96, 96, 4, 1], &masks);
    assert_eq!(
        seg.voxels,
        Voxels::U8(expect.clone()),
        "the volume's labels are the slices' PNG predictions"
    );

    // measured: voxel counts × 1.25 · 1.25 · 8 mm³
    let json = ok(cmr()
        .args(["measure", "--json", "--masks"])
        .arg(seg_dir.join("scan_seg.nii.gz")));
    let n: serde_json::Value = serde_json::from_str(&json).unwrap();
    let lv = expect.iter().filter(|&&l| l == 3).count() as f64 * 12.5 / 1000.0;
    let myo = expect.iter().filter(|&&l| l == 2).count() as f64 * 12.5 / 1000.0;
    assert!((n[0]["lv_edv_ml"].as_f64().unwrap() - lv).abs() < 1e-9, "{json}");
    assert!(
        (n[0]["myo_mass_g"].as_f64().unwrap() - myo * 1.05).abs() < 1e-9,
        "{json}"
    );
    assert!(n[0]["lv_ef"].is_null(), "one frame: no ejection fraction");
    // the same numbers straight from the model
    let direct = ok(cmr()
        .args(["measure", "--json", "--model", "unet", "--device", "cpu", "--input"])
        .arg(&scan));
    let d: serde_json::Value = serde_json::from_str(&direct).unwrap();
    assert_eq!(d[0]["lv_edv_ml"], n[0]["lv_edv_ml"]);

    // a two-frame cine with known counts: EF exactly the formula's
    let mut frames = vec![0u8; 20 * 20 * 2 * 2];
    let per = 20 * 20 * 2;
    frames[..400].fill(3); // frame 0: LV 400 voxels
    frames[per..per + 160].fill(3); // frame 1: LV 160 voxels
    frames[per + 160..per + 200].fill(2);
    let reference = Volume::new_u8([20, 20, 2, 2], [1.5, 1.5, 8.0], vec![0; 1600], &scan).unwrap();
    let cine = dir.path().join("cine_seg.nii.gz");
    write_labels(&cine, &reference, &frames).unwrap();
    let json = ok(cmr().args(["measure", "--json", "--masks"]).arg(&cine));
    let c: serde_json::Value = serde_json::from_str(&json).unwrap();
    assert_eq!(c[0]["ed_frame"], 0);
    assert_eq!(c[0]["es_frame"], 1);
    assert!((c[0]["lv_edv_ml"].as_f64().unwrap() - 400.0 * 0.018).abs() < 1e-9);
    assert!((c[0]["lv_ef"].as_f64().unwrap() - 60.0).abs() < 1e-9, "{json}");

    // NIfTI-2 is refused by name and nothing is written
    let n2 = data.join("../nifti-samples/example_nifti2.nii.gz");
    if n2.is_file() {
        let out = dir.path().join("n2");
        let err = fails(
            cmr()
                .args(["predict", "--model", "unet", "--input"])
                .arg(&n2)
                .arg("--out")
                .arg(&out),
        );
        assert!(err.contains("NIfTI-2"), "{err}");
        assert!(!out.exists() || std::fs::read_dir(&out).unwrap().next().is_none());
    }
}

/// Stack training slices `first..first+4` (images, and masks as labels) into
/// one 96 × 96 × 4 volume pair at 1.25 × 1.25 × 8 mm.
fn stack(data: &std::path::Path, first: usize, image: &std::path::Path, label: &std::path::Path) -> Vec<u8> {
    let ids: Vec<usize> = (first..first + 4).collect();
    let images: Vec<_> = ids
        .iter()
        .map(|i| read_image(&data.join(format!("train/image/cmr{i}.png"))).unwrap())
        .collect();
    let masks: Vec<_> = ids
        .iter()
        .map(|i| read_mask(&data.join(format!("train/mask/cmr{i}_mask.png"))).unwrap())
        .collect();
    std::fs::create_dir_all(image.parent().unwrap()).unwrap();
    std::fs::create_dir_all(label.parent().unwrap()).unwrap();
    let v = Volume::new_u8(
        [96, 96, 4, 1],
        [1.25, 1.25, 8.0],
        labels_to_volume([96, 96, 4, 1], &images),
        image,
    )
    .unwrap();
    write_volume(image, &v).unwrap();
    let labels = labels_to_volume([96, 96, 4, 1], &masks);
    write_labels(label, &v, &labels).unwrap();
    labels
}

#[test]
fn an_acdc_shaped_dataset_is_scored_in_3d_with_its_clinical_numbers() {
    let Some(data) = shared_data() else { return };
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("acdc");
    // two patients, ED and ES each; patient001 names its phases in Info.cfg
    let mut truth = std::collections::BTreeMap::new();
    for (patient, frames) in [("patient001", [(1, 1), (12, 5)]), ("patient002", [(1, 9), (9, 13)])] {
        for (frame, first) in frames {
            let id = format!("{patient}_frame{frame:02}");
            let labels = stack(
                &data,
                first,
                &root.join(format!("{patient}/{id}.nii.gz")),
                &root.join(format!("{patient}/{id}_gt.nii.gz")),
            );
            truth.insert(id, labels);
        }
    }
    std::fs::write(root.join("patient001/Info.cfg"), "ED: 1\nES: 12\nGroup: NOR\n").unwrap();

    // the labels themselves as predictions: perfect scores, no errors
    let same = dir.path().join("same");
    std::fs::create_dir_all(&same).unwrap();
    let reference = read_volume(&root.join("patient001/patient001_frame01.nii.gz")).unwrap();
    for (id, labels) in &truth {
        write_labels(&same.join(format!("{id}_seg.nii.gz")), &reference, labels).unwrap();
    }
    let json = ok(cmr()
        .args(["eval", "--json", "--pred"])
        .arg(&same)
        .arg("--data")
        .arg(&root));
    let r: serde_json::Value = serde_json::from_str(&json).unwrap();
    assert_eq!(r["layout"], "ACDC");
    assert_eq!(r["cases"].as_array().unwrap().len(), 4);
    assert_eq!(r["mean_dice"], 1.0, "{json}");
    assert_eq!(r["classes"]["LV"]["hd95_mm_mean"], 0.0);
    let patients = r["patients"].as_array().unwrap();
    assert_eq!(patients[0]["phases_from"], "dataset");
    assert_eq!(patients[0]["es_case"], "patient001_frame12");
    assert_eq!(patients[1]["phases_from"], "labels");
    for a in r["clinical"].as_array().unwrap() {
        assert_eq!(a["mean_abs_error"], 0.0, "{a}");
    }
    // by hand: patient001's LV EDV and EF from the voxel counts (12.5 mm³)
    let lv = |id: &str| truth[id].iter().filter(|&&l| l == 3).count() as f64 * 12.5 / 1000.0;
    let (edv, esv) = (lv("patient001_frame01"), lv("patient001_frame12"));
    let t = &patients[0]["truth"];
    assert!((t["lv_edv_ml"].as_f64().unwrap() - edv).abs() < 1e-9);
    assert!((t["lv_ef"].as_f64().unwrap() - 100.0 * (edv - esv) / edv).abs() < 1e-9);

    // measured from its labels, the dataset or one patient's folder: ED and ES
    // as Info.cfg names them
    for source in [root.clone(), root.join("patient001")] {
        let json = ok(cmr().args(["measure", "--json", "--masks"]).arg(&source));
        let m: serde_json::Value = serde_json::from_str(&json).unwrap();
        assert_eq!(m[0]["volume"], "patient001", "{json}");
        assert_eq!(m[0]["phases_from"], "dataset");
        assert_eq!(
            m[0]["per_frame"][m[0]["es_frame"].as_u64().unwrap() as usize]["case"],
            "patient001_frame12"
        );
        assert!((m[0]["lv_edv_ml"].as_f64().unwrap() - edv).abs() < 1e-9);
        assert!((m[0]["lv_ef"].as_f64().unwrap() - 100.0 * (edv - esv) / edv).abs() < 1e-9);
    }
    let table = ok(cmr().args(["measure", "--masks"]).arg(&root));
    assert!(
        table.contains("patient002") && table.contains("from the volumes"),
        "{table}"
    );

    // patient001's ES prediction misses the LV of its first slice: the EF
    // error is what the counts say, and only the LV's Dice of that case drops
    let mut es = truth["patient001_frame12"].clone();
    let missed = es[..96 * 96].iter().filter(|&&l| l == 3).count() as f64 * 12.5 / 1000.0;
    assert!(missed > 0.0);
    for l in &mut es[..96 * 96] {
        if *l == 3 {
            *l = 0;
        }
    }
    write_labels(&same.join("patient001_frame12_seg.nii.gz"), &reference, &es).unwrap();
    let r: serde_json::Value = serde_json::from_str(&ok(cmr()
        .args(["eval", "--json", "--pred"])
        .arg(&same)
        .arg("--data")
        .arg(&root)))
    .unwrap();
    let pred_ef = 100.0 * (edv - (esv - missed)) / edv;
    let got = r["patients"][0]["pred"]["lv_ef"].as_f64().unwrap();
    assert!((got - pred_ef).abs() < 1e-9, "{got} vs {pred_ef}");
    let lv_dice = r["cases"][1]["dice"][2].as_f64().unwrap();
    let kept = esv - missed;
    assert!((lv_dice - 2.0 * kept / (kept + esv)).abs() < 1e-9, "{lv_dice}");
    assert_eq!(r["cases"][1]["dice"][0], 1.0);

    // a model: its scores equal those of its own segmentations scored as files
    let model_json = ok(cmr()
        .args(["eval", "--json", "--model", "unet", "--device", "cpu", "--data"])
        .arg(&root));
    let images = dir.path().join("images");
    std::fs::create_dir_all(&images).unwrap();
    for id in truth.keys() {
        let patient = &id[..10];
        std::fs::copy(
            root.join(format!("{patient}/{id}.nii.gz")),
            images.join(format!("{id}.nii.gz")),
        )
        .unwrap();
    }
    let segs = dir.path().join("segs");
    ok(cmr()
        .args(["predict", "--model", "unet", "--device", "cpu", "--input"])
        .arg(&images)
        .arg("--out")
        .arg(&segs));
    let file_json = ok(cmr()
        .args(["eval", "--json", "--pred"])
        .arg(&segs)
        .arg("--data")
        .arg(&root));
    let (m, f): (serde_json::Value, serde_json::Value) = (
        serde_json::from_str(&model_json).unwrap(),
        serde_json::from_str(&file_json).unwrap(),
    );
    assert_eq!(m["cases"], f["cases"]);
    assert_eq!(m["clinical"], f["clinical"]);
    assert!(m["mean_dice"].as_f64().unwrap() > 0.5, "{model_json}");
    // the table names the layout and the clinical rows
    let table = ok(cmr().args(["eval", "--pred"]).arg(&segs).arg("--data").arg(&root));
    assert!(
        table.contains("ACDC") && table.contains("lv_ef") && table.contains("HD95"),
        "{table}"
    );

    // a missing prediction and a mislabelled volume are named
    std::fs::remove_file(segs.join("patient002_frame09_seg.nii.gz")).unwrap();
    let err = fails(cmr().args(["eval", "--pred"]).arg(&segs).arg("--data").arg(&root));
    assert!(err.contains("patient002_frame09"), "{err}");
    let mut bad = truth["patient002_frame09"].clone();
    bad[5] = 7;
    write_labels(&segs.join("patient002_frame09_seg.nii.gz"), &reference, &bad).unwrap();
    let err = fails(cmr().args(["eval", "--pred"]).arg(&segs).arg("--data").arg(&root));
    assert!(err.contains("label 7"), "{err}");
}

/// The patients of a split's ids (`patientNNN_frameMM_zKK` → `patientNNN`).
fn patients_of(ids: &serde_json::Value) -> std::collections::BTreeSet<String> {
    ids.as_array()
        .unwrap()
        .iter()
        .map(|id| id.as_str().unwrap().split("_frame").next().unwrap().to_string())
        .collect()
}

#[test]
fn training_on_acdc_and_nnunet_shaped_folders_splits_by_patient() {
    let Some(data) = shared_data() else { return };
    let dir = tempfile::tempdir().unwrap();
    // ACDC: three patients, ED and ES each (4 slices a frame)
    let acdc = dir.path().join("acdc");
    for (p, patient) in ["patient001", "patient002", "patient003"].iter().enumerate() {
        for (f, frame) in [1, 10].iter().enumerate() {
            let id = format!("{patient}_frame{frame:02}");
            stack(
                &data,
                1 + 8 * p + 4 * f,
                &acdc.join(format!("{patient}/{id}.nii.gz")),
                &acdc.join(format!("{patient}/{id}_gt.nii.gz")),
            );
        }
        std::fs::write(acdc.join(format!("{patient}/Info.cfg")), "ED: 1\nES: 10\n").unwrap();
    }
    let cv = dir.path().join("cv");
    ok(cmr()
        .args([
            "train",
            "--arch",
            "unet",
            "--epochs",
            "1",
            "--batch-size",
            "4",
            "--folds",
            "3",
            "--device",
            "cpu",
        ])
        .arg("--data")
        .arg(&acdc)
        .arg("--out")
        .arg(&cv));
    let mut seen = std::collections::BTreeSet::new();
    for k in 0..3 {
        let splits: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(cv.join(format!("fold-{k}/splits.json"))).unwrap()).unwrap();
        let (train, val) = (patients_of(&splits["train"]), patients_of(&splits["val"]));
        assert_eq!(val.len(), 1, "fold {k}: one patient of three: {val:?}");
        assert!(train.is_disjoint(&val), "fold {k}: a heart on both sides");
        assert_eq!(
            splits["val"].as_array().unwrap().len(),
            8,
            "both frames' slices of the patient"
        );
        seen.extend(val);
        let config: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(cv.join(format!("fold-{k}/config.json"))).unwrap()).unwrap();
        assert_eq!(config["data"]["grouping"]["kind"], "volume");
    }
    assert_eq!(seen.len(), 3, "every patient validated once");
    // the cross-validation scores each volume in 3-D by the fold that held
    // it out: the same as that fold's model alone on that patient
    let json = ok(cmr()
        .args(["eval", "--json", "--model"])
        .arg(&cv)
        .arg("--data")
        .arg(&acdc));
    let r: serde_json::Value = serde_json::from_str(&json).unwrap();
    assert_eq!(r["cases"].as_array().unwrap().len(), 6, "{json}");
    assert_eq!(r["patients"].as_array().unwrap().len(), 3);
    let splits0: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(cv.join("fold-0/splits.json")).unwrap()).unwrap();
    let held = patients_of(&splits0["val"]).into_iter().next().unwrap();
    let alone = dir.path().join("alone");
    std::fs::create_dir_all(alone.join(&held)).unwrap();
    for f in std::fs::read_dir(acdc.join(&held)).unwrap() {
        let f = f.unwrap().path();
        std::fs::copy(&f, alone.join(&held).join(f.file_name().unwrap())).unwrap();
    }
    let one: serde_json::Value = serde_json::from_str(&ok(cmr()
        .args(["eval", "--json", "--model"])
        .arg(cv.join("fold-0"))
        .arg("--data")
        .arg(&alone)))
    .unwrap();
    let of = |v: &serde_json::Value| -> Vec<serde_json::Value> {
        v["cases"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|c| c["patient"] == held.as_str())
            .cloned()
            .collect()
    };
    assert_eq!(of(&r), of(&one), "patient {held}: scored by fold 0");
    // that fold's model on every case: its training cases are warned about
    let (status, _, stderr) = cmr_tests::output(
        cmr()
            .args(["eval", "--model"])
            .arg(cv.join("fold-0"))
            .arg("--data")
            .arg(&acdc),
    );
    assert!(status.success(), "{stderr}");
    assert!(
        stderr.contains("4 of the 6 labelled cases were in the model's training set"),
        "{stderr}"
    );
    // a case no fold held out is refused: its models trained on it, or never
    // saw this dataset
    let stranger = alone.join("patient009");
    std::fs::create_dir_all(&stranger).unwrap();
    for f in ["patient009_frame01.nii.gz", "patient009_frame01_gt.nii.gz"] {
        let from = acdc.join(&held).join(f.replace("patient009", &held));
        std::fs::copy(from, stranger.join(f)).unwrap();
    }
    let err = fails(cmr().args(["eval", "--model"]).arg(&cv).arg("--data").arg(&alone));
    assert!(
        err.contains("patient009_frame01") && err.contains("held out by no fold"),
        "{err}"
    );

    // nnU-Net: cases named <patient>_frameMM, one unlabelled
    let nn = dir.path().join("nnunet");
    for (p, patient) in ["patient001", "patient002"].iter().enumerate() {
        for (f, frame) in [1, 10].iter().enumerate() {
            let case = format!("{patient}_frame{frame:02}");
            stack(
                &data,
                1 + 8 * p + 4 * f,
                &nn.join(format!("imagesTr/{case}_0000.nii.gz")),
                &nn.join(format!("labelsTr/{case}.nii.gz")),
            );
        }
    }
    let run = dir.path().join("run");
    ok(cmr()
        .args([
            "train",
            "--arch",
            "unet",
            "--epochs",
            "1",
            "--batch-size",
            "4",
            "--device",
            "cpu",
        ])
        .arg("--data")
        .arg(&nn)
        .arg("--out")
        .arg(&run));
    let splits: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(run.join("splits.json")).unwrap()).unwrap();
    let (train, val) = (patients_of(&splits["train"]), patients_of(&splits["val"]));
    assert!(
        train.is_disjoint(&val) && !val.is_empty() && !train.is_empty(),
        "{splits}"
    );
    // the target spacing is the training set's median, recorded
    let config_text = std::fs::read_to_string(run.join("config.json")).unwrap();
    let config: serde_json::Value = serde_json::from_str(&config_text).unwrap();
    assert_eq!(config["data"]["spacing_mm"], 1.25, "{config_text}");
    assert_eq!(config["data"]["window"]["hi_percentile"], 99.5, "the window, stated");

    // predicting at the model's own spacing resamples nothing: the same
    // labels as the same weights without a spacing (padded or cropped)
    let plain = dir.path().join("plain");
    std::fs::create_dir_all(&plain).unwrap();
    for f in ["model.safetensors", "splits.json"] {
        std::fs::copy(run.join(f), plain.join(f)).unwrap();
    }
    let mut no_spacing = config.clone();
    no_spacing["data"].as_object_mut().unwrap().remove("spacing_mm");
    std::fs::write(
        plain.join("config.json"),
        serde_json::to_string_pretty(&no_spacing).unwrap(),
    )
    .unwrap();
    let scan = nn.join("imagesTr/patient001_frame01_0000.nii.gz");
    let predict = |model: &std::path::Path, input: &std::path::Path, out: &str| {
        let out = dir.path().join(out);
        ok(cmr()
            .args(["predict", "--device", "cpu", "--model"])
            .arg(model)
            .arg("--input")
            .arg(input)
            .arg("--out")
            .arg(&out));
        read_volume(&out.join(format!("{}_seg.nii.gz", stem_of(input)))).unwrap()
    };
    let a = predict(&run, &scan, "a");
    let b = predict(&plain, &scan, "b");
    assert_eq!(a.voxels, b.voxels, "at its own spacing, nothing is resampled");
    // Resampling for real: the shipped U-Net given a spacing of 1.25 mm, and
    // a scan at 0.625 mm (slices upscaled 2×, labels by nearest): brought to
    // 1.25 mm for the network and back, it scores about as the 96 × 96 slices
    // do; padded or cropped instead (no spacing), the heart is twice the size
    // the network knows.
    let shipped = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../models/unet");
    let spaced = dir.path().join("unet-1.25");
    std::fs::create_dir_all(&spaced).unwrap();
    std::fs::copy(shipped.join("model.safetensors"), spaced.join("model.safetensors")).unwrap();
    let mut cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(shipped.join("config.json")).unwrap()).unwrap();
    cfg["data"]["spacing_mm"] = serde_json::json!(1.25);
    std::fs::write(spaced.join("config.json"), cfg.to_string()).unwrap();
    let (slices, masks): (Vec<_>, Vec<_>) = (1..=4)
        .map(|i| {
            let img = read_image(&data.join(format!("train/image/cmr{i}.png"))).unwrap();
            let m = read_mask(&data.join(format!("train/mask/cmr{i}_mask.png"))).unwrap();
            (
                cmr_data::resize_u8_bilinear(&img, 192, 192),
                cmr_data::resize_nearest(&m, 192, 192),
            )
        })
        .unzip();
    let fine = dir.path().join("fine.nii.gz");
    let fine_v = Volume::new_u8(
        [192, 192, 4, 1],
        [0.625, 0.625, 8.0],
        labels_to_volume([192, 192, 4, 1], &slices),
        &fine,
    )
    .unwrap();
    write_volume(&fine, &fine_v).unwrap();
    let truth = labels_to_volume([192, 192, 4, 1], &masks);
    let dice = |v: &Volume| -> f64 {
        let Voxels::U8(p) = &v.voxels else { panic!("u8 labels") };
        let per: Vec<f64> = (1..=3u8)
            .map(|c| {
                let (a, b) = (
                    p.iter().filter(|&&l| l == c).count(),
                    truth.iter().filter(|&&l| l == c).count(),
                );
                let both = p.iter().zip(&truth).filter(|(x, y)| **x == c && **y == c).count();
                2.0 * both as f64 / (a + b).max(1) as f64
            })
            .collect();
        per.iter().sum::<f64>() / 3.0
    };
    let resampled = predict(&spaced, &fine, "c");
    assert_eq!(resampled.dims(), [192, 192, 4, 1]);
    assert_eq!(resampled.spacing(), [0.625, 0.625, 8.0]);
    let padded = predict(&shipped, &fine, "d");
    let (dr, dp) = (dice(&resampled), dice(&padded));
    eprintln!("a 0.625 mm scan: mean Dice {dr:.4} resampled to 1.25 mm, {dp:.4} padded or cropped");
    assert!(dr > 0.8 && dr > dp + 0.05, "resampled {dr}, padded {dp}");

    // a label volume that does not fit its image is named
    let bad = Volume::new_u8([96, 96, 3, 1], [1.25, 1.25, 8.0], vec![0; 96 * 96 * 3], &nn).unwrap();
    write_volume(&nn.join("labelsTr/patient002_frame10.nii.gz"), &bad).unwrap();
    let err = fails(
        cmr()
            .args(["train", "--arch", "unet", "--epochs", "1", "--device", "cpu"])
            .arg("--data")
            .arg(&nn)
            .arg("--out")
            .arg(dir.path().join("run2")),
    );
    assert!(
        err.contains("patient002_frame10.nii.gz") && err.contains("voxels"),
        "{err}"
    );
    assert!(!dir.path().join("run2").exists());
}

/// A volume file's name without its ending (`scan.nii.gz` → `scan`).
fn stem_of(path: &std::path::Path) -> String {
    let name = path.file_name().unwrap().to_string_lossy().into_owned();
    name.trim_end_matches(".gz").trim_end_matches(".nii").to_string()
}
