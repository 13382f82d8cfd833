//! Dataset loading: every validation error on fixtures written to a temp dir,
//! and the real dataset under `../shared/data/cmr-2021`.

#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};

use cmr_data::{
    BatchPlan, DataError, Dataset, Labels, LoadOptions, Normalization, Size, Splits, ValSource, load_split, read_mask,
    read_submission, rle_decode, rle_encode, write_submission,
};

fn gray(path: &Path, w: u32, h: u32, f: impl Fn(u32, u32) -> u8) {
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    image::GrayImage::from_fn(w, h, |x, y| image::Luma([f(x, y)]))
        .save(path)
        .unwrap();
}

/// A labelled split of `n` 8×8 pairs: `cmr1 … cmrn`.
fn split(n: usize) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    for i in 1..=n {
        gray(&dir.path().join(format!("image/cmr{i}.png")), 8, 8, |x, y| {
            (x * 10 + y) as u8
        });
        gray(&dir.path().join(format!("mask/cmr{i}_mask.png")), 8, 8, |x, y| {
            ((x + y) % 4) as u8
        });
    }
    dir
}

const OPTS: LoadOptions = LoadOptions {
    size: 8,
    spacing_mm: None,
    window: cmr_data::VolumeWindow::CLIP,
};

fn load(dir: &Path) -> Result<Vec<cmr_data::Sample>, DataError> {
    load_split(dir, Labels::Required, OPTS)
}

fn message(e: DataError) -> String {
    e.to_string()
}

#[test]
fn a_good_split_loads_in_natural_order() {
    let dir = split(12);
    let s = load(dir.path()).unwrap();
    let ids: Vec<&str> = s.iter().map(|s| s.id.as_str()).collect();
    assert_eq!(ids[..3], ["cmr1", "cmr2", "cmr3"]);
    assert_eq!(ids[11], "cmr12");
    assert!(s.iter().all(|s| s.mask.is_some()));
}

#[test]
fn an_undecodable_png_is_named() {
    let dir = split(2);
    let bad = dir.path().join("image/cmr2.png");
    std::fs::write(&bad, b"not a png at all").unwrap();
    let e = load(dir.path()).unwrap_err();
    assert!(matches!(e, DataError::Decode { ref path, .. } if path == &bad), "{e}");
    assert!(message(e).contains("cmr2.png"));
}

#[test]
fn a_truncated_png_is_named() {
    let dir = split(2);
    let bad = dir.path().join("mask/cmr1_mask.png");
    let bytes = std::fs::read(&bad).unwrap();
    std::fs::write(&bad, &bytes[..bytes.len() / 2]).unwrap();
    let e = load(dir.path()).unwrap_err();
    assert!(matches!(e, DataError::Decode { ref path, .. } if path == &bad), "{e}");
}

#[test]
fn a_mask_value_above_three_is_named_with_its_position() {
    let dir = split(2);
    gray(&dir.path().join("mask/cmr2_mask.png"), 8, 8, |x, y| {
        if (x, y) == (5, 6) { 4 } else { 0 }
    });
    let e = load(dir.path()).unwrap_err();
    let m = message(e);
    assert!(
        m.contains("cmr2_mask.png") && m.contains("value 4") && m.contains("x 5, y 6"),
        "{m}"
    );
}

#[test]
fn an_image_without_its_mask() {
    let dir = split(3);
    std::fs::remove_file(dir.path().join("mask/cmr2_mask.png")).unwrap();
    let m = message(load(dir.path()).unwrap_err());
    assert!(
        m.contains("cmr2.png") && m.contains("has no mask") && m.contains("cmr2_mask.png"),
        "{m}"
    );
}

#[test]
fn a_mask_without_its_image() {
    let dir = split(3);
    std::fs::remove_file(dir.path().join("image/cmr3.png")).unwrap();
    let m = message(load(dir.path()).unwrap_err());
    assert!(m.contains("cmr3_mask.png") && m.contains("has no image"), "{m}");
}

#[test]
fn image_and_mask_of_different_sizes() {
    let dir = split(2);
    gray(&dir.path().join("mask/cmr1_mask.png"), 8, 7, |_, _| 0);
    let e = load(dir.path()).unwrap_err();
    assert!(matches!(e, DataError::SizeMismatch { .. }), "{e}");
    let m = message(e);
    assert!(
        m.contains("cmr1_mask.png") && m.contains("8x7") && m.contains("8x8"),
        "{m}"
    );
}

#[test]
fn an_empty_split_and_missing_folders() {
    let dir = tempfile::tempdir().unwrap();
    let e = load(&dir.path().join("nope")).unwrap_err();
    assert!(matches!(e, DataError::MissingFolder { .. }), "{e}");
    let e = load(dir.path()).unwrap_err();
    assert!(message(e).contains("image"));
    std::fs::create_dir_all(dir.path().join("image")).unwrap();
    std::fs::create_dir_all(dir.path().join("mask")).unwrap();
    std::fs::write(dir.path().join("image/readme.txt"), "not an image").unwrap();
    let e = load(dir.path()).unwrap_err();
    assert!(matches!(e, DataError::EmptySplit { .. }), "{e}");
    // a labelled split needs mask/
    let d2 = split(1);
    std::fs::remove_dir_all(d2.path().join("mask")).unwrap();
    let e = load(d2.path()).unwrap_err();
    assert!(matches!(e, DataError::MissingFolder { .. }) && message(e).contains("mask"));
    // … but images alone are fine where labels are not required
    assert_eq!(load_split(d2.path(), Labels::IfPresent, OPTS).unwrap().len(), 1);
}

#[test]
fn a_colour_mask_is_rejected_and_a_colour_image_converted() {
    let dir = split(1);
    let rgb = image::RgbImage::from_fn(8, 8, |_, _| image::Rgb([1, 1, 1]));
    rgb.save(dir.path().join("mask/cmr1_mask.png")).unwrap();
    let e = load(dir.path()).unwrap_err();
    assert!(matches!(e, DataError::MaskFormat { .. }), "{e}");
    let dir = split(1);
    rgb.save(dir.path().join("image/cmr1.png")).unwrap();
    assert_eq!(load(dir.path()).unwrap()[0].image.get(0, 0), 1);
}

#[cfg(unix)]
#[test]
fn broken_links_and_odd_names_are_errors_not_skipped() {
    use std::os::unix::ffi::OsStrExt;
    // a dangling link among the images
    let dir = split(3);
    let link = dir.path().join("image/cmr9.png");
    std::os::unix::fs::symlink(dir.path().join("nowhere.png"), &link).unwrap();
    let err = message(load(dir.path()).unwrap_err());
    assert!(err.contains("cmr9.png") && err.contains("symbolic link"), "{err}");
    std::fs::remove_file(&link).unwrap();
    // a link loop
    let a = dir.path().join("image/a.png");
    let b = dir.path().join("image/b.png");
    std::os::unix::fs::symlink(&b, &a).unwrap();
    std::os::unix::fs::symlink(&a, &b).unwrap();
    let err = message(cmr_data::list_pngs(&dir.path().join("image")).unwrap_err());
    assert!(err.contains("symbolic link"), "{err}");
    std::fs::remove_file(&a).unwrap();
    std::fs::remove_file(&b).unwrap();
    // a name that is not UTF-8
    let odd = dir
        .path()
        .join("image")
        .join(std::ffi::OsStr::from_bytes(b"cmr\xff.png"));
    gray(&odd, 8, 8, |_, _| 0);
    let err = message(cmr_data::list_pngs(&dir.path().join("image")).unwrap_err());
    assert!(err.contains("not valid UTF-8"), "{err}");
    std::fs::remove_file(&odd).unwrap();
    // two files of one id: both are named
    gray(&dir.path().join("image/cmr1.PNG"), 8, 8, |_, _| 0);
    let err = message(cmr_data::list_pngs(&dir.path().join("image")).unwrap_err());
    assert!(err.contains("cmr1.png") && err.contains("cmr1.PNG"), "{err}");
    // a folder named like a PNG is passed over (with a warning)
    std::fs::remove_file(dir.path().join("image/cmr1.PNG")).unwrap();
    std::fs::create_dir(dir.path().join("image/extra.png")).unwrap();
    assert_eq!(load(dir.path()).unwrap().len(), 3);
}

#[test]
fn other_sizes_are_fitted_and_remembered() {
    let dir = tempfile::tempdir().unwrap();
    gray(&dir.path().join("image/a.png"), 10, 6, |x, _| x as u8 + 1);
    gray(&dir.path().join("mask/a_mask.png"), 10, 6, |x, _| (x % 4) as u8);
    let s = load(dir.path()).unwrap();
    assert_eq!(s[0].original, Size { height: 6, width: 10 });
    assert_eq!(s[0].image.size(), Size { height: 8, width: 8 });
    // width 10 → 8 crops one column each side; height 6 → 8 pads one row each side
    assert_eq!(s[0].image.get(0, 0), 0);
    assert_eq!(s[0].image.get(1, 0), 2);
    let back = s[0].mask.as_ref().unwrap().unfit(s[0].original);
    assert_eq!(back.get(0, 1), 1);
    assert_eq!(back.get(0, 0), 0, "cropped column comes back as background");
}

/// The shared dataset, if present. With `CMR_REQUIRE_DATA=1` (CI) its absence
/// is a failure; otherwise the test says it is skipped.
fn shared_data() -> Option<PathBuf> {
    let root = std::env::var_os("CMR_DATA_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../../../shared/data/cmr-2021"));
    if root.join("train").is_dir() {
        return Some(root);
    }
    assert!(
        std::env::var("CMR_REQUIRE_DATA").is_err(),
        "dataset not found at {}",
        root.display()
    );
    eprintln!("skipped: dataset not found at {}", root.display());
    None
}

#[test]
fn the_shared_dataset_loads() {
    let Some(root) = shared_data() else { return };
    let ds = Dataset::open(&root, LoadOptions::default()).unwrap();
    assert_eq!(ds.train.len(), 100);
    assert!(
        ds.train
            .iter()
            .all(|s| s.mask.is_some() && s.image.size() == Size { height: 96, width: 96 })
    );
    assert!(
        ds.train
            .iter()
            .all(|s| s.mask.as_ref().unwrap().data().iter().all(|&v| v <= 3))
    );
    assert_eq!(ds.train[0].id, "cmr1");
    assert_eq!(ds.train[99].id, "cmr100");
    let test = ds.test.as_ref().unwrap();
    assert_eq!(test.len(), 80);
    assert!(test.iter().all(|s| s.mask.is_none()));
    assert_eq!(test[0].id, "cmr121");
    // every class occurs
    for c in 1..=3u8 {
        assert!(ds.train.iter().any(|s| s.mask.as_ref().unwrap().data().contains(&c)));
    }
    let splits = Splits::from_dataset(&ds, 0.2, 42, cmr_data::Grouping::Slice).unwrap();
    assert_eq!((splits.train.len(), splits.val.len()), (80, 20));
    assert!(matches!(splits.source, ValSource::HeldOut { .. }));
    let plan = BatchPlan::eval(8, Normalization::UnitRange);
    let b = plan
        .batches(&splits.val, 0, &candle_core::Device::Cpu)
        .unwrap()
        .next()
        .unwrap()
        .unwrap();
    assert_eq!(b.images.dims(), &[8, 1, 96, 96]);
}

#[test]
fn run_length_round_trips_every_training_mask() {
    let Some(root) = shared_data() else { return };
    let dir = root.join("train/mask");
    let mut masks = Vec::new();
    for i in 1..=100 {
        let name = format!("cmr{i}_mask");
        let mask = read_mask(&dir.join(format!("{name}.png"))).unwrap();
        for c in 1..=3u8 {
            let enc = rle_encode(&mask, c);
            let dec = rle_decode(&enc, mask.size()).unwrap();
            for (d, &m) in dec.data().iter().zip(mask.data()) {
                assert_eq!(*d, m == c, "{name} class {c}");
            }
        }
        masks.push((name, mask));
    }
    let out = tempfile::tempdir().unwrap();
    let csv = out.path().join("train.csv");
    write_submission(&csv, &masks).unwrap();
    assert_eq!(read_submission(&csv, Size { height: 96, width: 96 }).unwrap(), masks);
}
