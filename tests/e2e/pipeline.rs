//! Train, evaluate, predict and submit on 16 real slices; the CSV decodes back
//! to exactly the predicted masks.

use cmr_data::{Size, read_mask, read_submission};
use cmr_tests::{cmr, fails, ok, output, shared_data, subset};

#[test]
fn train_eval_predict_submit() {
    let Some(data) = shared_data() else { return };
    let dir = tempfile::tempdir().unwrap();
    let root = subset(&data, dir.path(), 16, 4);
    let run = dir.path().join("run");

    ok(cmr()
        .args([
            "train",
            "--arch",
            "unet",
            "--epochs",
            "2",
            "--batch-size",
            "4",
            "--device",
            "cpu",
        ])
        .arg("--data")
        .arg(&root)
        .arg("--out")
        .arg(&run));
    for f in [
        "config.json",
        "model.safetensors",
        "checkpoint.safetensors",
        "state.json",
        "metrics.csv",
        "curves.png",
    ] {
        assert!(run.join(f).is_file(), "{f} missing");
    }
    let metrics = std::fs::read_to_string(run.join("metrics.csv")).unwrap();
    assert_eq!(metrics.lines().count(), 3, "{metrics}");
    // what the terminal showed, kept in the run
    let log = std::fs::read_to_string(run.join("train.log")).unwrap();
    assert!(log.contains("epoch 1/2") && log.contains("epoch 2/2"), "{log}");

    // eval on the dataset root: the run's own held-out split, as JSON
    let json = ok(cmr()
        .args(["eval", "--json", "--per-image", "--model"])
        .arg(&run)
        .arg("--data")
        .arg(&root));
    let v: serde_json::Value = serde_json::from_str(&json).unwrap();
    let mean = v["mean_dice"].as_f64().unwrap();
    assert!((0.0..=1.0).contains(&mean), "{mean}");
    assert_eq!(v["classes"].as_array().unwrap().len(), 3);
    assert_eq!(
        v["per_image"].as_array().unwrap().len(),
        4,
        "20 % of 16 held out, whole patients (pairs): 3 → 4"
    );
    assert!(v["dice_lv"].as_f64().is_some());
    // the table form, on slices the model trained on: said so
    let (status, table, stderr) = output(
        cmr()
            .args(["eval", "--model"])
            .arg(&run)
            .arg("--data")
            .arg(root.join("train")),
    );
    assert!(status.success(), "{stderr}");
    assert!(table.contains("Myo") && table.contains("(16 images)"), "{table}");
    assert!(
        stderr.contains("12 of the 16 slices scored trained") && stderr.contains("optimistic"),
        "{stderr}"
    );
    // its own validation slices, as splits.json recorded them
    let splits: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(run.join("splits.json")).unwrap()).unwrap();
    assert_eq!(splits["train"].as_array().unwrap().len(), 12);
    assert_eq!(splits["sha256"].as_str().unwrap().len(), 64);
    let own = ok(cmr()
        .args(["eval", "--json", "--per-image", "--split", "val", "--model"])
        .arg(&run)
        .arg("--data")
        .arg(root.join("train")));
    let own: serde_json::Value = serde_json::from_str(&own).unwrap();
    let ids: Vec<&str> = own["per_image"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].as_str().unwrap())
        .collect();
    let recorded: Vec<&str> = splits["val"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    assert_eq!(ids, recorded);
    assert_eq!(
        own["mean_dice"], v["mean_dice"],
        "the hold-out recomputed and the recorded one agree"
    );
    // resuming on other data is refused unless allowed
    let other = subset(&data, &dir.path().join("other"), 20, 0);
    let err = fails(cmr().args(["train", "--resume"]).arg(&run).arg("--data").arg(&other));
    assert!(err.contains("other data"), "{err}");
    ok(cmr()
        .args(["train", "--allow-other-data", "--resume"])
        .arg(&run)
        .arg("--data")
        .arg(&other));
    let moved: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(run.join("splits.json")).unwrap()).unwrap();
    assert_eq!(
        moved["train"].as_array().unwrap().len() + moved["val"].as_array().unwrap().len(),
        20
    );

    // predict the test images, with overlays, TTA, clean-up and a CSV
    let masks = dir.path().join("masks");
    let csv = dir.path().join("pred.csv");
    ok(cmr()
        .args(["predict", "--overlay", "--tta", "--clean", "--model"])
        .arg(&run)
        .arg("--input")
        .arg(root.join("test"))
        .arg("--out")
        .arg(&masks)
        .arg("--csv")
        .arg(&csv));
    let mut predicted = Vec::new();
    for i in 121..125 {
        let m = read_mask(&masks.join(format!("cmr{i}_mask.png"))).unwrap();
        assert_eq!(m.size(), Size { height: 96, width: 96 });
        assert!(masks.join(format!("cmr{i}_overlay.png")).is_file());
        predicted.push((format!("cmr{i}_mask"), m));
    }
    assert_eq!(std::fs::read_dir(&masks).unwrap().count(), 8, "only masks and overlays");

    // submit straight from predict's folder: the overlays are left out
    let submission = dir.path().join("sub/submission.csv");
    ok(cmr()
        .args(["submit", "--masks"])
        .arg(&masks)
        .arg("--out")
        .arg(&submission));
    let text = std::fs::read_to_string(&submission).unwrap();
    assert_eq!(text.lines().count(), 1 + 3 * 4);
    assert!(text.starts_with("id,encoding\ncmr121_mask1,"), "{text}");
    let decoded = read_submission(&submission, Size { height: 96, width: 96 }).unwrap();
    assert_eq!(decoded, predicted);
    assert_eq!(
        text,
        std::fs::read_to_string(&csv).unwrap(),
        "predict --csv and submit agree"
    );

    // a single PNG gives the same mask as in the folder run
    let one = dir.path().join("one");
    ok(cmr()
        .args(["predict", "--tta", "--clean", "--model"])
        .arg(&run)
        .arg("--input")
        .arg(root.join("test/image/cmr122.png"))
        .arg("--out")
        .arg(&one));
    assert_eq!(read_mask(&one.join("cmr122_mask.png")).unwrap(), predicted[1].1);
}

/// `cmr eval --pred`: a folder of masks scored without a model gives what
/// `cmr eval --model` gives for the model that predicted them, writes
/// summary.json, and names a missing prediction.
#[test]
fn eval_scores_a_folder_of_predicted_masks() {
    let Some(data) = shared_data() else { return };
    let dir = tempfile::tempdir().unwrap();
    let root = subset(&data, dir.path(), 8, 0);
    let split = root.join("train");
    let masks = dir.path().join("pred");
    let csv = dir.path().join("pred.csv");
    ok(cmr()
        .args(["predict", "--model", "unet", "--device", "cpu", "--input"])
        .arg(&split)
        .arg("--out")
        .arg(&masks)
        .arg("--csv")
        .arg(&csv));
    let by_model: serde_json::Value = serde_json::from_str(&ok(cmr()
        .args([
            "eval",
            "--json",
            "--per-image",
            "--model",
            "unet",
            "--device",
            "cpu",
            "--data",
        ])
        .arg(&split)))
    .unwrap();
    let by_masks: serde_json::Value = serde_json::from_str(&ok(cmr()
        .args(["eval", "--json", "--pred"])
        .arg(&masks)
        .arg("--data")
        .arg(&split)))
    .unwrap();
    assert_eq!(by_masks["cases"], 8);
    assert_eq!(by_masks["foreground_mean_dice"], by_model["mean_dice"]);
    assert_eq!(by_masks["mean"]["classes"], by_model["classes"]);
    let dice = |v: &serde_json::Value| -> Vec<String> {
        v.as_array()
            .unwrap()
            .iter()
            .map(|m| format!("{} {}", m["id"], m["dice"]))
            .collect()
    };
    assert_eq!(dice(&by_masks["per_case"]), dice(&by_model["per_image"]));
    let summary: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(masks.join("summary.json")).unwrap()).unwrap();
    assert_eq!(summary, by_masks);
    // the same predictions as a run-length CSV: the same scores, nothing written
    let by_csv: serde_json::Value = serde_json::from_str(&ok(cmr()
        .args(["eval", "--json", "--pred"])
        .arg(&csv)
        .arg("--data")
        .arg(&split)))
    .unwrap();
    assert_eq!(by_csv["per_case"], by_masks["per_case"]);
    assert_eq!(by_csv["mean"], by_masks["mean"]);
    assert_eq!(
        std::fs::read_dir(dir.path()).unwrap().count(),
        3,
        "root, pred, pred.csv only"
    );
    // a CSV without one slice's rows names it
    let text = std::fs::read_to_string(&csv).unwrap();
    let cut: String = text
        .lines()
        .filter(|l| !l.starts_with("cmr5_mask"))
        .map(|l| format!("{l}\n"))
        .collect();
    std::fs::write(&csv, cut).unwrap();
    let err = fails(cmr().args(["eval", "--pred"]).arg(&csv).arg("--data").arg(&split));
    assert!(
        err.contains("no prediction for 1 of the 8") && err.contains("cmr5_mask1"),
        "{err}"
    );
    // one prediction missing: named, nothing scored
    std::fs::remove_file(masks.join("cmr3_mask.png")).unwrap();
    let err = fails(cmr().args(["eval", "--pred"]).arg(&masks).arg("--data").arg(&split));
    assert!(
        err.contains("no prediction for 1 of the 8") && err.contains("cmr3_mask.png"),
        "{err}"
    );
    // a model and masks at once is refused by the parser
    let err = fails(
        cmr()
            .args(["eval", "--model", "unet", "--pred"])
            .arg(&masks)
            .arg("--data")
            .arg(&split),
    );
    assert!(err.contains("cannot be used with"), "{err}");
}

/// `predict --save-probabilities`: one tensor per image, `[4, H, W]`, each
/// pixel's probabilities summing to 1, their argmax the written mask
/// (no clean-up).
#[test]
fn predict_saves_probabilities() {
    let Some(data) = shared_data() else { return };
    let dir = tempfile::tempdir().unwrap();
    let root = subset(&data, dir.path(), 0, 3);
    let out = dir.path().join("pred");
    ok(cmr()
        .args([
            "predict",
            "--model",
            "unet",
            "--tta",
            "--save-probabilities",
            "--device",
            "cpu",
            "--input",
        ])
        .arg(root.join("test"))
        .arg("--out")
        .arg(&out));
    for i in 121..124 {
        let tensors = candle_core::safetensors::load(
            out.join(format!("cmr{i}_probabilities.safetensors")),
            &candle_core::Device::Cpu,
        )
        .unwrap();
        let p = &tensors["probabilities"];
        assert_eq!(p.dims(), &[4, 96, 96]);
        let sums = p.sum(0).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
        assert!(sums.iter().all(|s| (s - 1.0).abs() < 1e-4), "probabilities sum to 1");
        let argmax = p.argmax(0).unwrap().flatten_all().unwrap().to_vec1::<u32>().unwrap();
        let mask = read_mask(&out.join(format!("cmr{i}_mask.png"))).unwrap();
        let labels: Vec<u32> = mask.data().iter().map(|&v| u32::from(v)).collect();
        assert_eq!(argmax, labels, "cmr{i}: the mask is the argmax");
    }
}

/// The headless Chromium of the machine, if it has one (Debian's package:
/// `apt-get install chromium`); `CMR_REQUIRE_BROWSER=1` (CI, where it is
/// installed) makes its absence a failure.
fn chromium() -> Option<&'static str> {
    for name in ["chromium", "chromium-browser", "google-chrome"] {
        let found = std::process::Command::new(name)
            .arg("--version")
            .output()
            .is_ok_and(|o| o.status.success());
        if found {
            return Some(name);
        }
    }
    assert!(
        std::env::var("CMR_REQUIRE_BROWSER").is_err(),
        "CMR_REQUIRE_BROWSER is set but no chromium was found"
    );
    eprintln!("no chromium: the report is checked as HTML only");
    None
}

/// `cmr eval --report`: one self-contained page with a gallery entry per
/// slice, worst first; a real browser loads it with no broken picture and
/// renders it.
#[test]
fn eval_writes_a_report_a_browser_renders() {
    let Some(data) = shared_data() else { return };
    let dir = tempfile::tempdir().unwrap();
    let root = subset(&data, dir.path(), 8, 0);
    let out = dir.path().join("report");
    ok(cmr()
        .args(["eval", "--model", "unet", "--device", "cpu", "--report"])
        .arg(&out)
        .arg("--data")
        .arg(root.join("train")));
    let page = out.join("report.html");
    let html = std::fs::read_to_string(&page).unwrap();
    assert_eq!(html.matches(r#"<figure class="entry">"#).count(), 8);
    // nothing from the network (the SVG namespace is a name, not a fetch)
    let own = html.replace("http://www.w3.org/2000/svg", "");
    assert!(!own.contains("http://") && !own.contains("https://"), "self-contained");
    assert!(html.contains("Pixel confusion matrix") && html.contains("<svg"));
    // worst first: the captions' mean Dice never decrease
    let means: Vec<f64> = html
        .split("mean Dice ")
        .skip(1)
        .map(|s| s.split(' ').next().unwrap().parse().unwrap())
        .collect();
    assert_eq!(means.len(), 8);
    assert!(means.windows(2).all(|w| w[0] <= w[1]), "{means:?}");
    let Some(browser) = chromium() else { return };
    let url = format!("file://{}", page.display());
    let dom = std::process::Command::new(browser)
        .args(["--headless", "--no-sandbox", "--disable-gpu", "--dump-dom"])
        .arg(&url)
        .output()
        .unwrap();
    let dom = String::from_utf8_lossy(&dom.stdout);
    assert!(
        dom.contains(r#"data-broken="0""#) && dom.contains(r#"data-gallery="8""#),
        "the page's own count: {}",
        dom.lines().find(|l| l.contains("<body")).unwrap_or("no body")
    );
    let shot = dir.path().join("shot.png");
    let status = std::process::Command::new(browser)
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--hide-scrollbars",
            "--window-size=1000,1400",
        ])
        .arg(format!("--screenshot={}", shot.display()))
        .arg(&url)
        .output()
        .unwrap();
    assert!(status.status.success(), "{}", String::from_utf8_lossy(&status.stderr));
    let img = image::open(&shot).unwrap().to_rgb8();
    assert_eq!(img.dimensions(), (1000, 1400));
    let coloured = img.pixels().filter(|p| p.0[0] != p.0[1] || p.0[1] != p.0[2]).count();
    assert!(
        coloured > 1000,
        "the rendered page shows the coloured overlays ({coloured} pixels)"
    );
}
