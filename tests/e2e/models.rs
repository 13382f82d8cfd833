//! Shipped models are embedded in the binary: `--model <name>` works from any
//! folder, with no source tree in sight, unpacked once into a cache folder.

use cmr_tests::{cmr, ok, shared_data};

#[test]
fn a_shipped_model_works_from_anywhere() {
    let Some(data) = shared_data() else { return };
    let dir = tempfile::tempdir().unwrap();
    let cache = dir.path().join("cache");
    let run = |out: &str| {
        ok(cmr()
            .current_dir(dir.path())
            .env_remove("CMR_MODELS_DIR")
            .env("CMR_CACHE_DIR", &cache)
            .args(["predict", "--model", "unet", "--input"])
            .arg(data.join("test/image/cmr121.png"))
            .arg("--out")
            .arg(dir.path().join(out)));
    };
    run("a");
    assert!(dir.path().join("a/cmr121_mask.png").is_file());
    let unpacked: Vec<_> = std::fs::read_dir(cache.join("models"))
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(unpacked.len(), 1, "{unpacked:?}");
    assert!(unpacked[0].to_string_lossy().starts_with("unet-"));
    // a second run reuses the unpacked copy and predicts the same mask
    run("b");
    assert_eq!(std::fs::read_dir(cache.join("models")).unwrap().count(), 1);
    assert_eq!(
        std::fs::read(dir.path().join("a/cmr121_mask.png")).unwrap(),
        std::fs::read(dir.path().join("b/cmr121_mask.png")).unwrap()
    );
}

#[test]
fn info_speaks_the_presets_of_train() {
    let params = |extra: &[&str]| -> u64 {
        let json = ok(cmr().args(["info", "--arch", "unet", "--json"]).args(extra));
        let v: serde_json::Value = serde_json::from_str(&json).unwrap();
        v["parameters"].as_u64().unwrap()
    };
    // the default is what `cmr train` trains by default
    assert_eq!(params(&[]), params(&["--preset", "cpu"]));
    assert_eq!(params(&["--preset", "seed"]), 7_702_020);
    assert!(params(&[]) < 1_000_000);
}

#[test]
fn every_subcommand_has_examples_and_the_train_defaults_are_said() {
    for sub in ["train", "eval", "predict", "submit", "info", "deform"] {
        let help = ok(cmr().args([sub, "--help"]));
        assert!(help.contains("Example"), "{sub} --help has no example:\n{help}");
    }
    let help = ok(cmr().args(["train", "--help"]));
    for flag in ["--epochs", "--batch-size", "--lr", "--seed"] {
        let line = help
            .lines()
            .skip_while(|l| !l.contains(flag))
            .take(4)
            .collect::<Vec<_>>()
            .join(" ");
        assert!(line.contains("default"), "{flag}: {line}");
    }
}

#[test]
fn info_describes_a_trained_model() {
    let json = ok(cmr().args(["info", "--json", "--model", "unet3plus"]));
    let v: serde_json::Value = serde_json::from_str(&json).unwrap();
    assert_eq!(v["folds"], 5);
    let members = v["members"].as_array().unwrap();
    assert_eq!(members.len(), 5);
    assert!(members.iter().all(|m| m["arch"] == "unet3plus" && m["keep"] == "last"));
    let slices: u64 = members.iter().map(|m| m["validation_slices"].as_u64().unwrap()).sum();
    assert_eq!(slices, 100, "each slice validated once");
    let table = ok(cmr().args(["info", "--model", "unet"]));
    assert!(
        table.contains("one run") && table.contains("483204 parameters"),
        "{table}"
    );
}
