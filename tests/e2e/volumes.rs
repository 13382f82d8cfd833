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
