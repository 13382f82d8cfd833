//! NIfTI volumes written by another tool (nibabel's test files in
//! `../shared/data/nifti-samples`): read, written back, read again, with the
//! same header fields and voxels; their values as nibabel reports them; and
//! every file cmr must refuse, refused with its reason.

#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};

use cmr_data::{DataError, Voxels, read_volume, write_labels, write_volume};

/// The samples' folder: beside the dataset (`$CMR_DATA_DIR/../nifti-samples`)
/// or in the shared folder next to the checkout.
fn samples() -> Option<PathBuf> {
    let root = std::env::var_os("CMR_DATA_DIR")
        .map(|d| PathBuf::from(d).join("../nifti-samples"))
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../../../shared/data/nifti-samples"));
    if root.join("anatomical.nii").is_file() {
        return Some(root);
    }
    assert!(
        std::env::var("CMR_REQUIRE_DATA").is_err(),
        "NIfTI samples not found at {}",
        root.display()
    );
    eprintln!("skipped: NIfTI samples not found at {}", root.display());
    None
}

fn range(v: &[f32]) -> (f32, f32) {
    v.iter()
        .fold((f32::INFINITY, f32::NEG_INFINITY), |(a, b), &x| (a.min(x), b.max(x)))
}

/// Each sample read, written back (same name ending) and read again: the
/// header fields that carry meaning and the voxels are identical; shapes,
/// spacings, types and value ranges are nibabel's.
#[test]
fn samples_round_trip_with_their_geometry_and_values() {
    let Some(dir) = samples() else { return };
    let dir_out = tempfile::tempdir().unwrap();
    // (file, dims, spacing, voxel type, value range)
    type Case = (&'static str, [usize; 4], [f32; 3], &'static str, (f32, f32));
    let cases: [Case; 4] = [
        (
            "anatomical.nii",
            [33, 41, 25, 1],
            [2.0, 2.0, 2.0],
            "i16",
            (-610.0, 30393.0),
        ),
        (
            "example4d.nii.gz",
            [128, 96, 24, 2],
            [2.0, 2.0, 2.2],
            "i16",
            (0.0, 1162.0),
        ),
        (
            "functional.nii",
            [17, 21, 3, 20],
            [4.0, 4.0, 8.0],
            "i16",
            (629.83, 5571.62),
        ),
        ("standard.nii.gz", [4, 5, 7, 1], [1.0, 3.0, 2.0], "u8", (0.0, 255.0)),
    ];
    for (name, dims, spacing, kind, (lo, hi)) in cases {
        let v = read_volume(&dir.join(name)).unwrap();
        assert_eq!(v.dims(), dims, "{name}");
        let close = v.spacing().iter().zip(spacing).all(|(a, b)| (a - b).abs() < 1e-5);
        assert!(close, "{name}: spacing {:?}", v.spacing());
        let k = match v.voxels {
            Voxels::U8(_) => "u8",
            Voxels::I16(_) => "i16",
            Voxels::U16(_) => "u16",
            Voxels::F32(_) => "f32",
            Voxels::F64(_) => "f64",
        };
        assert_eq!(k, kind, "{name}");
        let (a, b) = range(&v.values());
        assert!((a - lo).abs() < 0.01 && (b - hi).abs() < 0.01, "{name}: {a} … {b}");
        let out = dir_out.path().join(name);
        write_volume(&out, &v).unwrap();
        let w = read_volume(&out).unwrap();
        let (h, g) = (&v.header, &w.header);
        assert_eq!(w.voxels, v.voxels, "{name}: voxels");
        assert_eq!(g.dim, h.dim, "{name}");
        assert_eq!(g.pixdim, h.pixdim, "{name}");
        assert_eq!(g.datatype, h.datatype, "{name}");
        assert_eq!(g.bitpix, h.bitpix, "{name}");
        assert_eq!((g.scl_slope, g.scl_inter), (h.scl_slope, h.scl_inter), "{name}");
        assert_eq!((g.qform_code, g.sform_code), (h.qform_code, h.sform_code), "{name}");
        assert_eq!(
            [
                g.quatern_b,
                g.quatern_c,
                g.quatern_d,
                g.quatern_x,
                g.quatern_y,
                g.quatern_z
            ],
            [
                h.quatern_b,
                h.quatern_c,
                h.quatern_d,
                h.quatern_x,
                h.quatern_y,
                h.quatern_z
            ],
            "{name}"
        );
        assert_eq!((g.srow_x, g.srow_y, g.srow_z), (h.srow_x, h.srow_y, h.srow_z), "{name}");
        assert_eq!(g.endianness, h.endianness, "{name}: byte order kept");
        assert_eq!(g.xyzt_units, h.xyzt_units, "{name}");
        assert_eq!(w.affine(), v.affine(), "{name}");
        assert!(
            !std::fs::read_dir(dir_out.path()).unwrap().any(|e| e
                .unwrap()
                .file_name()
                .to_string_lossy()
                .contains(".tmp-")),
            "no temporary file left"
        );
    }
    // the big-endian file stays big-endian
    let a = read_volume(&dir.join("anatomical.nii")).unwrap();
    assert_eq!(a.header.endianness, nifti::Endianness::Big);
}

/// A label volume takes its reference's geometry; a label count that does
/// not fit is refused and writes nothing.
#[test]
fn labels_take_the_reference_geometry() {
    let Some(dir) = samples() else { return };
    let v = read_volume(&dir.join("example4d.nii.gz")).unwrap();
    let out = tempfile::tempdir().unwrap();
    let path = out.path().join("seg.nii.gz");
    let n: usize = v.dims().iter().product();
    let labels: Vec<u8> = (0..n).map(|i| (i % 4) as u8).collect();
    write_labels(&path, &v, &labels).unwrap();
    let s = read_volume(&path).unwrap();
    assert_eq!(s.voxels, Voxels::U8(labels));
    assert_eq!(s.dims(), v.dims());
    assert_eq!(s.spacing(), v.spacing());
    assert_eq!(s.affine(), v.affine());
    let bad = out.path().join("bad.nii.gz");
    assert!(write_labels(&bad, &v, &[0u8; 7]).is_err());
    assert!(!bad.exists());
}

fn message(e: DataError) -> String {
    e.to_string()
}

/// NIfTI-2, five dimensions, a spacing of zero, slices under 16 voxels and
/// NaN voxels: each refused, the message naming the file and the reason.
#[test]
fn what_cmr_cannot_honour_is_refused_by_name() {
    let Some(dir) = samples() else { return };
    let nifti2 = dir.join("example_nifti2.nii.gz");
    let e = message(read_volume(&nifti2).unwrap_err());
    assert!(e.contains("example_nifti2.nii.gz") && e.contains("NIfTI-2"), "{e}");
    let out = tempfile::tempdir().unwrap();
    // five dimensions: the header's dim[0] patched in an uncompressed copy
    let a = read_volume(&dir.join("anatomical.nii")).unwrap();
    let copy = out.path().join("five.nii");
    write_volume(&copy, &a).unwrap();
    let mut bytes = std::fs::read(&copy).unwrap();
    // big-endian header: dim[0] at byte 40, dim[5] at byte 50
    bytes[40..42].copy_from_slice(&5i16.to_be_bytes());
    bytes[50..52].copy_from_slice(&1i16.to_be_bytes());
    std::fs::write(&copy, &bytes).unwrap();
    let e = message(read_volume(&copy).unwrap_err());
    assert!(e.contains("five.nii") && e.contains("5-D"), "{e}");
    // slices under 16 voxels
    let small = read_volume(&dir.join("standard.nii.gz")).unwrap();
    let e = message(small.check_segmentable().unwrap_err());
    assert!(e.contains("4×5") && e.contains("16"), "{e}");
    assert!(a.check_segmentable().is_ok());
    // a zero spacing
    let mut flat = a.clone();
    flat.header.pixdim[3] = 0.0;
    let e = message(flat.check_segmentable().unwrap_err());
    assert!(e.contains("spacing of 0"), "{e}");
    // NaN voxels, through a written f32 volume
    let mut f = a.clone();
    let mut vals = a.values();
    vals[7] = f32::NAN;
    vals[70] = f32::NAN;
    f.voxels = Voxels::F32(vals);
    f.header.datatype = 16;
    f.header.bitpix = 32;
    f.header.scl_slope = 1.0;
    f.header.scl_inter = 0.0;
    let nan = out.path().join("nan.nii.gz");
    write_volume(&nan, &f).unwrap();
    let e = message(read_volume(&nan).unwrap().check_segmentable().unwrap_err());
    assert!(e.contains("nan.nii.gz") && e.contains("2 NaN voxels"), "{e}");
}

/// A header whose dimensions claim more voxels than its file holds (or
/// than cmr reads of one volume) is refused before anything is allocated
/// for the claim; a negative extent is named.
#[test]
fn a_header_claiming_more_than_its_file_is_refused() {
    let Some(dir) = samples() else { return };
    let out = tempfile::tempdir().unwrap();
    // anatomical.nii is big-endian: dim[k] is the i16 at byte 40 + 2k
    let bytes = std::fs::read(dir.join("anatomical.nii")).unwrap();
    let patched = |k: usize, value: i16| {
        let mut b = bytes.clone();
        b[40 + 2 * k..42 + 2 * k].copy_from_slice(&value.to_be_bytes());
        let p = out.path().join(format!("dim{k}-{value}.nii"));
        std::fs::write(&p, b).unwrap();
        p
    };
    let longer = patched(3, 200);
    let m = message(read_volume(&longer).unwrap_err());
    assert!(m.contains("the header claims") && m.contains("dim3-200.nii"), "{m}");
    let huge = patched(3, i16::MAX);
    let m = message(read_volume(&huge).unwrap_err());
    assert!(m.contains("the header claims") || m.contains("more than"), "{m}");
    let wide = patched(1, 5000);
    let m = message(read_volume(&wide).unwrap_err());
    assert!(m.contains("limited to 4096"), "{m}");
    let negative = patched(2, -3);
    let m = message(read_volume(&negative).unwrap_err());
    assert!(m.contains("an extent of -3"), "{m}");
    // the file itself still reads
    assert!(read_volume(&dir.join("anatomical.nii")).is_ok());
}

/// Where a Python with nibabel is at hand: nibabel reads what cmr wrote
/// with the same shape, affine, spacing and voxel values (scaled) as cmr
/// reads back. Skipped, saying so, without one.
#[test]
fn nibabel_reads_what_cmr_writes() {
    let Some(dir) = samples() else { return };
    let python = "python3";
    let has = std::process::Command::new(python)
        .args(["-c", "import nibabel, numpy"])
        .stderr(std::process::Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !has {
        eprintln!("skipped: no Python with nibabel (pip install nibabel)");
        return;
    }
    let out = tempfile::tempdir().unwrap();
    let script = r#"
import json, sys
import nibabel as nib, numpy as np
img = nib.load(sys.argv[1])
data = np.asarray(img.dataobj, dtype=np.float64)
data.reshape(-1, order="F").astype("<f8").tofile(sys.argv[2])
print(json.dumps({"shape": list(img.shape), "affine": img.affine.tolist(),
                  "zooms": [float(z) for z in img.header.get_zooms()[:3]]}))
"#;
    for name in [
        "anatomical.nii",
        "example4d.nii.gz",
        "functional.nii",
        "standard.nii.gz",
    ] {
        let v = read_volume(&dir.join(name)).unwrap();
        let written = out.path().join(name);
        write_volume(&written, &v).unwrap();
        let raw = out.path().join(format!("{name}.f64"));
        let run = std::process::Command::new(python)
            .arg("-c")
            .arg(script)
            .arg(&written)
            .arg(&raw)
            .output()
            .unwrap();
        assert!(run.status.success(), "{name}: {}", String::from_utf8_lossy(&run.stderr));
        let info: serde_json::Value = serde_json::from_slice(&run.stdout).unwrap();
        let dims = v.dims();
        let shape: Vec<usize> = info["shape"]
            .as_array()
            .unwrap()
            .iter()
            .map(|d| d.as_u64().unwrap() as usize)
            .collect();
        let expect: Vec<usize> = if dims[3] > 1 { dims.to_vec() } else { dims[..3].to_vec() };
        assert_eq!(shape, expect, "{name}");
        let affine = v.affine();
        for (r, row) in info["affine"].as_array().unwrap().iter().enumerate() {
            for (c, x) in row.as_array().unwrap().iter().enumerate() {
                let x = x.as_f64().unwrap();
                assert!(
                    (x - affine[r][c]).abs() < 1e-4,
                    "{name}: affine[{r}][{c}] {x} vs {}",
                    affine[r][c]
                );
            }
        }
        for (z, s) in info["zooms"].as_array().unwrap().iter().zip(v.spacing()) {
            assert!((z.as_f64().unwrap() - f64::from(s)).abs() < 1e-5, "{name}: spacing");
        }
        let bytes = std::fs::read(&raw).unwrap();
        let theirs: Vec<f64> = bytes
            .chunks_exact(8)
            .map(|b| f64::from_le_bytes(b.try_into().unwrap()))
            .collect();
        let ours = v.values();
        assert_eq!(theirs.len(), ours.len(), "{name}");
        for (i, (&t, &o)) in theirs.iter().zip(&ours).enumerate() {
            assert!(
                (t - f64::from(o)).abs() <= 1e-4 * t.abs().max(1.0),
                "{name}: voxel {i}: nibabel {t}, cmr {o}"
            );
        }
    }
}

/// The window's percentiles come from the config: 0 and 100 are the range,
/// the default clips 0.5 % at each end; nonsense is refused.
#[test]
fn the_intensity_window_takes_its_percentiles() {
    use cmr_data::{VolumeWindow, Window, window_of, window_with};
    let Some(dir) = samples() else { return };
    let v = read_volume(&dir.join("functional.nii")).unwrap();
    let (min, max) = range(&v.values());
    let all = VolumeWindow {
        lo_percentile: 0.0,
        hi_percentile: 100.0,
    };
    assert_eq!(window_with(&v, all), Window::Percentiles { lo: min, hi: max });
    let Window::Percentiles { lo, hi } = window_of(&v) else {
        panic!("a scaled int16 volume is windowed")
    };
    assert!(lo > min && hi < max && lo < hi, "{lo} {hi}");
    assert_eq!(window_of(&v), window_with(&v, VolumeWindow::CLIP));
    // unscaled u8 stays as it is
    let u8v = read_volume(&dir.join("standard.nii.gz")).unwrap();
    assert_eq!(window_with(&u8v, all), Window::AsIs);
    for (lo, hi) in [(50.0, 50.0), (-1.0, 99.0), (1.0, 101.0), (f64::NAN, 99.0)] {
        let w = VolumeWindow {
            lo_percentile: lo,
            hi_percentile: hi,
        };
        assert!(w.validate().is_err(), "{lo} {hi}");
    }
    assert!(VolumeWindow::CLIP.validate().is_ok());
}
