//! A short cross-validation through the binary: two folds, two epochs, twelve
//! slices; its scores, deformed scores, and the folder as an ensemble.

use cmr_data::read_mask;
use cmr_tests::{cmr, fails, ok, shared_data, subset};

#[test]
fn cross_validate_score_and_predict_with_the_folds() {
    let Some(data) = shared_data() else { return };
    let dir = tempfile::tempdir().unwrap();
    let root = subset(&data, dir.path(), 12, 2);
    let cv = dir.path().join("cv");
    ok(cmr()
        .args([
            "train",
            "--arch",
            "unet",
            "--folds",
            "2",
            "--epochs",
            "2",
            "--batch-size",
            "4",
        ])
        .args(["--device", "cpu", "--augment", "robust", "--data"])
        .arg(&root)
        .arg("--out")
        .arg(&cv));
    for f in [
        "cv.json",
        "summary.json",
        "fold-0/model.safetensors",
        "fold-1/metrics.csv",
    ] {
        assert!(cv.join(f).is_file(), "{f} missing");
    }
    let spec: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(cv.join("cv.json")).unwrap()).unwrap();
    let folds = spec["folds"]["val"].as_array().unwrap();
    assert_eq!(folds.len(), 2);
    assert_eq!(folds.iter().map(|f| f.as_array().unwrap().len()).sum::<usize>(), 12);
    assert_eq!(spec["config"]["keep"], "last");
    // a finished cross-validation resumes to nothing new
    ok(cmr().args(["train", "--resume"]).arg(&cv).arg("--data").arg(&root));
    // another folder's data does not fit the folds
    let other = subset(&data, &dir.path().join("other"), 10, 0);
    let err = fails(cmr().args(["train", "--resume"]).arg(&cv).arg("--data").arg(&other));
    assert!(err.contains("does not have"), "{err}");

    let score = |extra: &[&str]| -> serde_json::Value {
        let json = ok(cmr()
            .args(["eval", "--json", "--per-image", "--model"])
            .arg(&cv)
            .arg("--data")
            .arg(&root)
            .args(extra));
        serde_json::from_str(&json).unwrap()
    };
    let clean = score(&[]);
    assert_eq!(clean["k"], 2);
    assert_eq!(clean["folds"].as_array().unwrap().len(), 2);
    assert_eq!(clean["out_of_fold"]["images"], 12);
    assert_eq!(clean["per_image"].as_array().unwrap().len(), 12);
    let mean = clean["dice_over_folds"]["mean"]["mean"].as_f64().unwrap();
    assert!((0.0..=1.0).contains(&mean), "{mean}");
    let deformed = score(&["--deform", "1"]);
    assert_eq!(deformed["deform_seed"], 1);
    // (two epochs predict mostly background, so the scores may not move:
    // what the deformation does is tested in cmr-data)
    assert_eq!(
        score(&["--deform", "1"])["out_of_fold"],
        deformed["out_of_fold"],
        "seeded"
    );
    let table = ok(cmr()
        .args(["eval", "--tta", "--model"])
        .arg(&cv)
        .arg("--data")
        .arg(&root));
    assert!(table.contains("mean ± SD") && table.contains("out of fold"), "{table}");

    // clean-up decided per class and recorded; --clean then applies it
    let json = ok(cmr()
        .args(["eval", "--json", "--decide-clean", "--model"])
        .arg(&cv)
        .arg("--data")
        .arg(&root));
    let decision: serde_json::Value = serde_json::from_str(&json).unwrap();
    assert_eq!(decision["images"], 12);
    assert!(cv.join("postprocess.json").is_file());
    let cleaned: serde_json::Value = serde_json::from_str(&ok(cmr()
        .args(["eval", "--json", "--clean", "--model"])
        .arg(&cv)
        .arg("--data")
        .arg(&root)))
    .unwrap();
    assert_eq!(cleaned["clean"], decision["chosen"]);

    // a second seed on the same folds: their fold ensembles, cross-validated
    let cv2 = dir.path().join("cv2");
    ok(cmr()
        .args([
            "train",
            "--arch",
            "unet",
            "--epochs",
            "2",
            "--batch-size",
            "4",
            "--seed",
            "7",
        ])
        .args(["--device", "cpu", "--folds-from"])
        .arg(&cv)
        .arg("--data")
        .arg(&root)
        .arg("--out")
        .arg(&cv2));
    let spec2: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(cv2.join("cv.json")).unwrap()).unwrap();
    assert_eq!(spec2["folds"], spec["folds"]);
    assert_eq!(spec2["config"]["seed"], 7);
    let both = format!("{},{}", cv.display(), cv2.display());
    let json = ok(cmr().args(["eval", "--json", "--model", &both, "--data"]).arg(&root));
    let v: serde_json::Value = serde_json::from_str(&json).unwrap();
    assert_eq!(v["cross_validations"], 2);
    assert_eq!(v["out_of_fold"]["images"], 12);
    // other folds cannot join
    let cv3 = dir.path().join("cv3");
    ok(cmr()
        .args([
            "train", "--arch", "unet", "--epochs", "1", "--folds", "3", "--device", "cpu", "--data",
        ])
        .arg(&root)
        .arg("--out")
        .arg(&cv3));
    let mixed = format!("{},{}", cv.display(), cv3.display());
    let err = fails(cmr().args(["eval", "--model", &mixed, "--data"]).arg(&root));
    assert!(err.contains("folds differ"), "{err}");

    // the folder is an ensemble of its folds; a list of runs is one too
    let masks = dir.path().join("masks");
    ok(cmr()
        .args(["predict", "--tta", "--model"])
        .arg(&cv)
        .arg("--input")
        .arg(root.join("test"))
        .arg("--out")
        .arg(&masks));
    assert!(read_mask(&masks.join("cmr121_mask.png")).is_ok());
    let pair = format!("{},{}", cv.join("fold-0").display(), cv.join("fold-1").display());
    let listed = dir.path().join("listed");
    ok(cmr()
        .args(["predict", "--tta", "--model", &pair, "--input"])
        .arg(root.join("test"))
        .arg("--out")
        .arg(&listed));
    for i in [121, 122] {
        let name = format!("cmr{i}_mask.png");
        assert_eq!(
            read_mask(&masks.join(&name)).unwrap(),
            read_mask(&listed.join(&name)).unwrap()
        );
    }
    let json = ok(cmr()
        .args(["eval", "--json", "--model", &pair, "--data"])
        .arg(root.join("train")));
    let v: serde_json::Value = serde_json::from_str(&json).unwrap();
    assert_eq!(v["members"], 2);
}

#[test]
fn deform_writes_a_seeded_aligned_copy() {
    let Some(data) = shared_data() else { return };
    let dir = tempfile::tempdir().unwrap();
    let root = subset(&data, dir.path(), 4, 0);
    let copy = |out: &str, seed: &str| {
        let out = dir.path().join(out);
        ok(cmr()
            .args(["deform", "--seed", seed, "--data"])
            .arg(&root)
            .arg("--out")
            .arg(&out));
        out
    };
    let (a, b, c) = (copy("a", "1"), copy("b", "1"), copy("c", "2"));
    for i in 1..=4 {
        let image = format!("image/cmr{i}.png");
        let mask = format!("mask/cmr{i}_mask.png");
        let read = |d: &std::path::Path, f: &str| std::fs::read(d.join(f)).unwrap();
        assert_eq!(read(&a, &image), read(&b, &image), "seeded");
        assert_eq!(read(&a, &mask), read(&b, &mask), "seeded");
        assert_ne!(read(&a, &image), read(&c, &image), "another seed, another copy");
        let original = read_mask(&root.join(format!("train/{mask}"))).unwrap();
        let deformed = read_mask(&a.join(&mask)).unwrap();
        assert_eq!(deformed.size(), original.size());
        assert_ne!(deformed, original);
    }
    assert_eq!(std::fs::read_dir(a.join("image")).unwrap().count(), 4);
    assert!(
        !std::fs::read_dir(&a)
            .unwrap()
            .any(|e| e.unwrap().file_name().to_string_lossy().starts_with(".cmr"))
    );
}

/// Self-training: each fold of a cross-validation also trains on the test
/// images, labelled by the same fold of a teacher cross-validation on the
/// same folds; a teacher on other folds is refused.
#[test]
fn pseudo_labels_come_from_the_teacher_fold_that_never_saw_the_fold() {
    let Some(data) = shared_data() else { return };
    let dir = tempfile::tempdir().unwrap();
    let root = subset(&data, dir.path(), 8, 3);
    let train = |extra: &[&str], out: &std::path::Path| {
        let mut cmd = cmr();
        cmd.args([
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
        .args(extra)
        .arg("--data")
        .arg(&root)
        .arg("--out")
        .arg(out);
        cmd
    };
    let teacher = dir.path().join("teacher");
    ok(&mut train(&["--folds", "2"], &teacher));
    let student = dir.path().join("student");
    let t = teacher.to_str().unwrap();
    ok(&mut train(&["--folds-from", t, "--pseudo-labels-from", t], &student));
    let spec: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(student.join("cv.json")).unwrap()).unwrap();
    let recorded = spec["config"]["data"]["pseudo_labels"]["teacher"].as_str().unwrap();
    assert_eq!(
        std::path::Path::new(recorded).canonicalize().unwrap(),
        teacher.canonicalize().unwrap()
    );
    let test_ids = ["cmr121", "cmr122", "cmr123"];
    for fold in 0..2 {
        // the labels are that teacher fold's eight-view prediction
        let predicted = dir.path().join(format!("predicted-{fold}"));
        ok(cmr()
            .args(["predict", "--tta", "--device", "cpu", "--model"])
            .arg(teacher.join(format!("fold-{fold}")))
            .arg("--input")
            .arg(root.join("test"))
            .arg("--out")
            .arg(&predicted));
        let fold_dir = student.join(format!("fold-{fold}"));
        for id in test_ids {
            let name = format!("{id}_mask.png");
            assert_eq!(
                read_mask(&fold_dir.join("pseudo").join(&name)).unwrap(),
                read_mask(&predicted.join(&name)).unwrap(),
                "fold {fold}, {id}"
            );
        }
        // and the fold trained on them, validated on its labelled slices only
        let splits: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(fold_dir.join("splits.json")).unwrap()).unwrap();
        let ids = |key: &str| -> Vec<String> {
            splits[key]
                .as_array()
                .unwrap()
                .iter()
                .map(|v| v.as_str().unwrap().to_string())
                .collect()
        };
        let (trained, validated) = (ids("train"), ids("val"));
        assert!(test_ids.iter().all(|id| trained.iter().any(|t| t == id)), "{trained:?}");
        assert!(validated.iter().all(|v| !v.starts_with("cmr12")), "{validated:?}");
        assert_eq!(
            validated,
            spec["folds"]["val"][fold]
                .as_array()
                .unwrap()
                .iter()
                .map(|v| v.as_str().unwrap().to_string())
                .collect::<Vec<_>>()
        );
    }
    // a finished student resumes to nothing new, its labels untouched
    let before = std::fs::read(student.join("fold-0/pseudo/cmr121_mask.png")).unwrap();
    ok(cmr().args(["train", "--resume"]).arg(&student).arg("--data").arg(&root));
    assert_eq!(
        std::fs::read(student.join("fold-0/pseudo/cmr121_mask.png")).unwrap(),
        before
    );

    // a teacher on other folds trained on slices the student's folds score
    let other = dir.path().join("other");
    ok(&mut train(&["--folds", "4"], &other));
    let err = fails(&mut train(
        &["--folds-from", t, "--pseudo-labels-from", other.to_str().unwrap()],
        &dir.path().join("refused"),
    ));
    assert!(err.contains("not this cross-validation's"), "{err}");
    assert!(!dir.path().join("refused").exists());
    // pseudo-labels are for a cross-validation only
    let err = fails(&mut train(&["--pseudo-labels-from", t], &dir.path().join("single")));
    assert!(err.contains("--folds-from"), "{err}");
}
