//! Bad input: each error exits non-zero, names the file and the problem, and
//! leaves no partial output.

use cmr_tests::{cmr, fails, ok, shared_data, subset};

/// A trained 1-epoch U-Net run on 8 slices, shared by the error tests.
fn small_run(dir: &std::path::Path, data: &std::path::Path) -> (std::path::PathBuf, std::path::PathBuf) {
    let root = subset(data, dir, 8, 2);
    let run = dir.join("run");
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
        .arg(&root)
        .arg("--out")
        .arg(&run));
    (root, run)
}

#[test]
fn model_errors() {
    let Some(data) = shared_data() else { return };
    let dir = tempfile::tempdir().unwrap();
    let (root, run) = small_run(dir.path(), &data);
    let out = dir.path().join("out");

    // a checkpoint of another architecture
    let wrong = dir.path().join("wrong");
    std::fs::create_dir_all(&wrong).unwrap();
    std::fs::copy(run.join("model.safetensors"), wrong.join("model.safetensors")).unwrap();
    let cfg = std::fs::read_to_string(run.join("config.json")).unwrap();
    let cfg = cfg.replacen(
        "\"arch\": \"unet\"",
        "\"arch\": \"unet3plus\",\n    \"branch_channels\": 16",
        1,
    );
    std::fs::write(wrong.join("config.json"), cfg).unwrap();
    let err = fails(
        cmr()
            .args(["predict", "--model"])
            .arg(&wrong)
            .arg("--input")
            .arg(root.join("test"))
            .arg("--out")
            .arg(&out),
    );
    assert!(
        err.contains("model.safetensors") && err.contains("another network"),
        "{err}"
    );
    assert!(!out.exists() || std::fs::read_dir(&out).unwrap().count() == 0);

    // a truncated checkpoint
    let cut = dir.path().join("cut");
    std::fs::create_dir_all(&cut).unwrap();
    let bytes = std::fs::read(run.join("model.safetensors")).unwrap();
    std::fs::write(cut.join("model.safetensors"), &bytes[..bytes.len() / 3]).unwrap();
    std::fs::copy(run.join("config.json"), cut.join("config.json")).unwrap();
    let err = fails(
        cmr()
            .args(["eval", "--model"])
            .arg(&cut)
            .arg("--data")
            .arg(root.join("train")),
    );
    assert!(
        err.contains("model.safetensors") && err.contains("safetensors"),
        "{err}"
    );

    // a model that does not exist
    let err = fails(
        cmr()
            .args(["predict", "--model", "no-such-model", "--input"])
            .arg(root.join("test"))
            .arg("--out")
            .arg(&out),
    );
    assert!(err.contains("no-such-model"), "{err}");

    // an output path that cannot be written (below a regular file)
    let blocker = dir.path().join("file");
    std::fs::write(&blocker, "x").unwrap();
    let err = fails(
        cmr()
            .args(["predict", "--model"])
            .arg(&run)
            .arg("--input")
            .arg(root.join("test"))
            .arg("--out")
            .arg(blocker.join("masks")),
    );
    assert!(err.contains("file/masks"), "{err}");

    // a bad PNG among the inputs: nothing is written
    let inputs = dir.path().join("inputs");
    std::fs::create_dir_all(&inputs).unwrap();
    std::fs::copy(root.join("test/image/cmr121.png"), inputs.join("cmr121.png")).unwrap();
    std::fs::write(inputs.join("cmr122.png"), b"\x89PNG broken").unwrap();
    let out2 = dir.path().join("out2");
    let err = fails(
        cmr()
            .args(["predict", "--model"])
            .arg(&run)
            .arg("--input")
            .arg(&inputs)
            .arg("--out")
            .arg(&out2),
    );
    assert!(err.contains("cmr122.png"), "{err}");
    assert!(!out2.exists());
}

#[test]
fn data_and_config_errors() {
    let Some(data) = shared_data() else { return };
    let dir = tempfile::tempdir().unwrap();
    let root = subset(&data, dir.path(), 4, 0);

    // a bad PNG in the training data: named, and no run folder is left
    std::fs::write(root.join("train/image/cmr3.png"), b"garbage").unwrap();
    let run = dir.path().join("run");
    let err = fails(
        cmr()
            .args(["train", "--arch", "unet", "--epochs", "1", "--data"])
            .arg(&root)
            .arg("--out")
            .arg(&run),
    );
    assert!(err.contains("cmr3.png") && err.contains("decode"), "{err}");
    assert!(!run.exists());

    // a mask value above 3
    let root2 = subset(&data, &dir.path().join("b"), 4, 0);
    let mut mask = image::GrayImage::new(96, 96);
    mask.put_pixel(10, 20, image::Luma([7]));
    mask.save(root2.join("train/mask/cmr2_mask.png")).unwrap();
    let err = fails(
        cmr()
            .args(["train", "--arch", "unet", "--epochs", "1", "--data"])
            .arg(&root2)
            .arg("--out")
            .arg(&run),
    );
    assert!(err.contains("cmr2_mask.png") && err.contains("value 7"), "{err}");

    // a config with an unknown key
    let cfg = dir.path().join("c.toml");
    std::fs::write(&cfg, "epochs = 1\n[optim]\nlearning_rate = 0.1\n").unwrap();
    let err = fails(
        cmr()
            .args(["train", "--arch", "unet", "--config"])
            .arg(&cfg)
            .arg("--data")
            .arg(&root2)
            .arg("--out")
            .arg(&run),
    );
    assert!(err.contains("c.toml") && err.contains("learning_rate"), "{err}");
    assert!(!run.exists());

    // an invalid value
    let err = fails(
        cmr()
            .args(["train", "--arch", "unet", "--batch-size", "0", "--data"])
            .arg(&root2)
            .arg("--out")
            .arg(&run),
    );
    assert!(err.contains("batch_size"), "{err}");

    // a missing data folder
    let err = fails(
        cmr()
            .args(["train", "--arch", "unet", "--data"])
            .arg(dir.path().join("nowhere"))
            .arg("--out")
            .arg(&run),
    );
    assert!(err.contains("nowhere"), "{err}");

    // submit from a folder with a bad mask
    let masks = dir.path().join("masks");
    std::fs::create_dir_all(&masks).unwrap();
    mask.save(masks.join("cmr1_mask.png")).unwrap();
    let csv = dir.path().join("s.csv");
    let err = fails(cmr().args(["submit", "--masks"]).arg(&masks).arg("--out").arg(&csv));
    assert!(err.contains("cmr1_mask.png"), "{err}");
    assert!(!csv.exists());

    // an unknown architecture, from clap
    let (status, _, stderr) = cmr_tests::output(cmr().args(["info", "--arch", "resnet"]));
    assert!(!status.success() && stderr.contains("resnet"), "{stderr}");
}

#[test]
fn predict_writes_all_or_nothing_and_never_into_its_inputs() {
    let Some(data) = shared_data() else { return };
    let dir = tempfile::tempdir().unwrap();
    let (root, run) = small_run(dir.path(), &data);
    let predict = |out: &std::path::Path| {
        let mut c = cmr();
        c.args(["predict", "--model"])
            .arg(&run)
            .arg("--input")
            .arg(root.join("test"))
            .arg("--out")
            .arg(out);
        c
    };
    let entries = |d: &std::path::Path| -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(d)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        v.sort();
        v
    };

    // the CSV cannot be placed: no mask is left either
    let out = dir.path().join("a");
    let blocked_csv = dir.path().join("csv-dir");
    std::fs::create_dir_all(&blocked_csv).unwrap();
    let err = fails(predict(&out).arg("--csv").arg(&blocked_csv));
    assert!(err.contains("csv-dir") && err.contains("folder"), "{err}");
    assert!(!out.exists() || entries(&out).is_empty(), "{:?}", entries(&out));

    // one destination blocked by a folder: nothing moves
    std::fs::create_dir_all(out.join("cmr122_mask.png")).unwrap();
    let err = fails(predict(&out).arg("--csv").arg(dir.path().join("s.csv")));
    assert!(err.contains("cmr122_mask.png") && err.contains("in the way"), "{err}");
    assert_eq!(entries(&out), ["cmr122_mask.png"]);
    assert!(!dir.path().join("s.csv").exists());
    assert!(
        !entries(dir.path()).iter().any(|n| n.contains("partial")),
        "{:?}",
        entries(dir.path())
    );
    std::fs::remove_dir(out.join("cmr122_mask.png")).unwrap();

    // a killed run's staging folder is swept by the next run
    let stale = out.join(".cmr-staging-999999");
    std::fs::create_dir_all(&stale).unwrap();
    std::fs::write(stale.join("cmr121_mask.png"), b"half").unwrap();
    ok(&mut predict(&out));
    assert_eq!(entries(&out), ["cmr121_mask.png", "cmr122_mask.png"]);

    // outputs inside the inputs are refused
    let err = fails(&mut predict(&root.join("test").join("image")));
    assert!(err.contains("folder of the input images"), "{err}");
    let err = fails(
        cmr()
            .args(["train", "--arch", "unet", "--epochs", "1"])
            .arg("--data")
            .arg(&root)
            .arg("--out")
            .arg(root.join("train").join("image")),
    );
    assert!(err.contains("inside the dataset"), "{err}");
    assert_eq!(std::fs::read_dir(root.join("train/image")).unwrap().count(), 8);

    // More images than one chunk of the streaming predictor (64): a bad image
    // in the last chunk, after the first was predicted and staged, still
    // leaves nothing behind.
    let many = dir.path().join("many");
    std::fs::create_dir_all(&many).unwrap();
    for k in 121..=190 {
        let name = format!("cmr{k}.png");
        std::fs::copy(data.join("test/image").join(&name), many.join(&name)).unwrap();
    }
    let last = many.join("cmr190.png");
    let good = std::fs::read(&last).unwrap();
    std::fs::write(&last, &good[..good.len() / 2]).unwrap();
    let stream = |out: &std::path::Path, input: &std::path::Path| {
        let mut c = cmr();
        c.args(["predict", "--model"])
            .arg(&run)
            .arg("--input")
            .arg(input)
            .arg("--out")
            .arg(out)
            .arg("--csv")
            .arg(out.with_extension("csv"));
        c
    };
    let out = dir.path().join("many-out");
    let err = fails(&mut stream(&out, &many));
    assert!(err.contains("cmr190.png"), "{err}");
    assert!(!out.exists() || entries(&out).is_empty(), "{:?}", entries(&out));
    assert!(!out.with_extension("csv").exists());
    // repaired, all 70 land; the last chunk's six as they come out of a
    // folder of those six (the same batches: identical), the first image as
    // it comes out alone (another batch size may round differently)
    std::fs::write(&last, &good).unwrap();
    ok(&mut stream(&out, &many));
    assert_eq!(entries(&out).len(), 70, "{:?}", entries(&out));
    let tail = dir.path().join("tail");
    std::fs::create_dir_all(&tail).unwrap();
    for k in 185..=190 {
        let name = format!("cmr{k}.png");
        std::fs::copy(many.join(&name), tail.join(&name)).unwrap();
    }
    let tail_out = dir.path().join("tail-out");
    ok(&mut stream(&tail_out, &tail));
    for k in 185..=190 {
        let name = format!("cmr{k}_mask.png");
        let (a, b) = (out.join(&name), tail_out.join(&name));
        assert_eq!(std::fs::read(&a).unwrap(), std::fs::read(&b).unwrap(), "{name}");
    }
    let csv = std::fs::read_to_string(out.with_extension("csv")).unwrap();
    let tail_csv = std::fs::read_to_string(tail_out.with_extension("csv")).unwrap();
    for row in tail_csv.lines().skip(1) {
        assert!(csv.lines().any(|l| l == row), "{row}");
    }
    let one = dir.path().join("one");
    ok(&mut stream(&one, &many.join("cmr121.png")));
    let a = cmr_data::read_mask(&out.join("cmr121_mask.png")).unwrap();
    let b = cmr_data::read_mask(&one.join("cmr121_mask.png")).unwrap();
    let same = a.data().iter().zip(b.data()).filter(|(x, y)| x == y).count();
    assert!(
        same * 1000 >= a.data().len() * 999,
        "{same} of {} pixels agree",
        a.data().len()
    );
}
