//! NIfTI-1 volumes (`.nii`, `.nii.gz`), read and written with the `nifti`
//! crate: 3-D and 4-D, u8/i16/u16/f32/f64 voxels in either byte order, the
//! scaling (`scl_slope`, `scl_inter`), the spacing (`pixdim`) and the
//! qform/sform affine, kept in the header so that what is written back has
//! the input's geometry. What `cmr` cannot honour is an error naming the
//! file and the reason: NIfTI-2 (recognised by its 540-byte header), more
//! than four dimensions, another voxel type; and, for a volume to segment
//! ([`Volume::check_segmentable`]), a zero or negative spacing, an in-plane
//! size under 16 voxels, or NaN voxels.

use std::io::{Read, Seek};
use std::path::{Path, PathBuf};

use nifti::{NiftiHeader, NiftiType};

use crate::atomic::temp_path_like;
use crate::error::{DataError, Result};

/// The smallest in-plane size a slice of a volume to segment may have.
pub const MIN_IN_PLANE: usize = 16;

/// A volume's voxels as stored (native byte order, before scaling), in
/// NIfTI's order: x fastest, then y, z and t.
#[derive(Clone, Debug, PartialEq)]
pub enum Voxels {
    U8(Vec<u8>),
    I16(Vec<i16>),
    U16(Vec<u16>),
    F32(Vec<f32>),
    F64(Vec<f64>),
}

impl Voxels {
    pub fn len(&self) -> usize {
        match self {
            Self::U8(v) => v.len(),
            Self::I16(v) => v.len(),
            Self::U16(v) => v.len(),
            Self::F32(v) => v.len(),
            Self::F64(v) => v.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Each voxel as f64 (no scaling).
    fn as_f64(&self) -> Vec<f64> {
        match self {
            Self::U8(v) => v.iter().map(|&x| f64::from(x)).collect(),
            Self::I16(v) => v.iter().map(|&x| f64::from(x)).collect(),
            Self::U16(v) => v.iter().map(|&x| f64::from(x)).collect(),
            Self::F32(v) => v.iter().map(|&x| f64::from(x)).collect(),
            Self::F64(v) => v.clone(),
        }
    }
}

/// A NIfTI-1 volume: its header (geometry, scaling, codes) and its voxels.
#[derive(Clone, Debug)]
pub struct Volume {
    pub header: NiftiHeader,
    pub voxels: Voxels,
    /// Where it was read from.
    pub path: PathBuf,
}

fn err(path: &Path, message: impl Into<String>) -> DataError {
    DataError::Nifti {
        path: path.to_path_buf(),
        message: message.into(),
    }
}

/// The most bytes a volume's file may hold once unpacked (header,
/// extensions and voxels): 2 GiB, a 512×512×2048 i16 volume. Larger claims
/// are refused before anything is allocated for them.
pub const MAX_VOLUME_BYTES: u64 = 2 << 30;

/// The largest in-plane side a volume may have (as for PNGs).
pub const MAX_VOLUME_SIDE: usize = 4096;

/// The file's bytes, gunzipped when they start as gzip (whatever the name
/// says; every member of a multi-member gzip), at most [`MAX_VOLUME_BYTES`].
fn read_bounded(path: &Path) -> Result<Vec<u8>> {
    let mut file = std::fs::File::open(path).map_err(|e| DataError::io(path, e))?;
    let on_disk = file.metadata().map_err(|e| DataError::io(path, e))?.len();
    let mut magic = [0u8; 2];
    let n = file.read(&mut magic).map_err(|e| DataError::io(path, e))?;
    let gzip = n == 2 && magic == [0x1f, 0x8b];
    file.rewind().map_err(|e| DataError::io(path, e))?;
    let too_big = || {
        err(
            path,
            format!("unpacks to more than {MAX_VOLUME_BYTES} bytes, the most cmr reads of one volume"),
        )
    };
    let mut bytes = Vec::new();
    if gzip {
        let mut gz = flate2::read::MultiGzDecoder::new(file).take(MAX_VOLUME_BYTES + 1);
        gz.read_to_end(&mut bytes)
            .map_err(|e| err(path, format!("not a readable gzip file ({e})")))?;
    } else {
        if on_disk > MAX_VOLUME_BYTES {
            return Err(too_big());
        }
        bytes.reserve_exact(on_disk as usize);
        file.take(MAX_VOLUME_BYTES + 1)
            .read_to_end(&mut bytes)
            .map_err(|e| DataError::io(path, e))?;
    }
    if bytes.len() as u64 > MAX_VOLUME_BYTES {
        return Err(too_big());
    }
    Ok(bytes)
}

/// The voxel count of `header`'s dimensions, each checked: a rank of 3 or
/// 4, every extent at least 1, the in-plane sides at most
/// [`MAX_VOLUME_SIDE`].
fn voxel_count(path: &Path, header: &NiftiHeader) -> Result<usize> {
    let rank = usize::from(header.dim[0]);
    if !(3..=4).contains(&rank) {
        return Err(err(
            path,
            format!("a {rank}-D volume: cmr takes 3-D (x, y, slices) and 4-D (x, y, slices, time) volumes"),
        ));
    }
    let extents = &header.dim[1..=rank];
    // dim holds i16 values: a negative one reads as above i16::MAX
    if let Some(bad) = extents.iter().find(|&&d| d == 0 || d > i16::MAX as u16) {
        let shown = *bad as i16;
        return Err(err(
            path,
            format!(
                "dimensions {:?}: an extent of {shown} (each must be at least 1)",
                extents.iter().map(|&d| d as i16).collect::<Vec<_>>()
            ),
        ));
    }
    let (x, y) = (usize::from(extents[0]), usize::from(extents[1]));
    if x > MAX_VOLUME_SIDE || y > MAX_VOLUME_SIDE {
        return Err(err(
            path,
            format!("slices of {x}×{y} voxels: volumes are limited to {MAX_VOLUME_SIDE} voxels a side"),
        ));
    }
    // at most 32767⁴ < 2⁶⁴: no overflow
    Ok(extents.iter().map(|&d| usize::from(d)).product())
}

/// Read a NIfTI-1 volume (header and voxels): a single file (`.nii`,
/// `.nii.gz`) or a pair (`.hdr` with `.img` or `.img.gz` beside it).
/// The header's claims are checked against the bytes there before anything
/// is allocated for them; extensions are skipped.
pub fn read_volume(path: &Path) -> Result<Volume> {
    let bytes = read_bounded(path)?;
    if bytes.len() < 4 {
        return Err(err(path, "too short to be a NIfTI file"));
    }
    let lead = [bytes[0], bytes[1], bytes[2], bytes[3]];
    let sizeof_hdr = [i32::from_le_bytes(lead), i32::from_be_bytes(lead)];
    if sizeof_hdr.contains(&540) {
        return Err(err(
            path,
            "a NIfTI-2 file (540-byte header): cmr reads NIfTI-1 (.nii, .nii.gz); convert it, e.g. with nibabel",
        ));
    }
    if !sizeof_hdr.contains(&348) {
        return Err(err(path, "not a NIfTI-1 file (its header does not start with 348)"));
    }
    if bytes.len() < 348 {
        return Err(err(
            path,
            format!("{} bytes: shorter than a NIfTI-1 header (348)", bytes.len()),
        ));
    }
    let header =
        NiftiHeader::from_reader(&bytes[..]).map_err(|e| err(path, format!("cannot read the NIfTI header: {e}")))?;
    let kind = header.data_type().map_err(|_| {
        err(
            path,
            format!(
                "voxels of datatype code {}: cmr reads u8, i16, u16, f32 and f64",
                header.datatype
            ),
        )
    })?;
    let width = match kind {
        NiftiType::Uint8 => 1,
        NiftiType::Int16 | NiftiType::Uint16 => 2,
        NiftiType::Float32 => 4,
        NiftiType::Float64 => 8,
        other => {
            return Err(err(
                path,
                format!("voxels of type {other:?}: cmr reads u8, i16, u16, f32 and f64"),
            ));
        }
    };
    let count = voxel_count(path, &header)?;
    let claimed = (count as u64).saturating_mul(width);
    if claimed > MAX_VOLUME_BYTES {
        return Err(err(
            path,
            format!(
                "dimensions {:?} of {width}-byte voxels: {claimed} bytes, more than the {MAX_VOLUME_BYTES} cmr reads of one volume",
                &header.dim[1..=usize::from(header.dim[0])]
            ),
        ));
    }
    let offset = header.vox_offset;
    if !(offset.is_finite() && offset >= 0.0 && offset.fract() == 0.0) {
        return Err(err(path, format!("a voxel offset (vox_offset) of {offset}")));
    }
    let offset = offset as u64;
    // a pair keeps its voxels in the .img beside the .hdr
    let (data, data_path) = if header.magic == *b"ni1\0" {
        let img = pair_image(path)?;
        (read_bounded(&img)?, img)
    } else if header.magic == *b"n+1\0" {
        if offset < 348 {
            return Err(err(
                path,
                format!("a voxel offset (vox_offset) of {offset}, inside the header"),
            ));
        }
        (bytes, path.to_path_buf())
    } else {
        return Err(err(
            path,
            "not a NIfTI-1 file (its magic is neither \"n+1\" nor \"ni1\")",
        ));
    };
    let end = offset.saturating_add(claimed);
    if end > data.len() as u64 {
        return Err(err(
            &data_path,
            format!(
                "the header claims {claimed} bytes of voxels from byte {offset} ({} × {width} bytes), but the file holds {}",
                count,
                data.len()
            ),
        ));
    }
    // the voxels, cut out in place (no second copy of the volume)
    let mut raw = data;
    raw.truncate(end as usize);
    raw.drain(..offset as usize);
    let volume = nifti::InMemNiftiVolume::from_raw_data(&header, raw).map_err(|e| err(path, e.to_string()))?;
    let voxels = match kind {
        NiftiType::Uint8 => Voxels::U8(volume.into_nifti_typed_data().map_err(|e| err(path, e.to_string()))?),
        NiftiType::Int16 => Voxels::I16(volume.into_nifti_typed_data().map_err(|e| err(path, e.to_string()))?),
        NiftiType::Uint16 => Voxels::U16(volume.into_nifti_typed_data().map_err(|e| err(path, e.to_string()))?),
        NiftiType::Float32 => Voxels::F32(volume.into_nifti_typed_data().map_err(|e| err(path, e.to_string()))?),
        _ => Voxels::F64(volume.into_nifti_typed_data().map_err(|e| err(path, e.to_string()))?),
    };
    // from_raw_data checked the length against the dimensions
    Ok(Volume {
        header,
        voxels,
        path: path.to_path_buf(),
    })
}

/// The `.img` (or `.img.gz`) beside a pair's `.hdr` (or `.hdr.gz`).
fn pair_image(hdr: &Path) -> Result<PathBuf> {
    let name = hdr
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let lower = name.to_lowercase();
    let stem = lower
        .strip_suffix(".hdr.gz")
        .or_else(|| lower.strip_suffix(".hdr"))
        .map(|s| &name[..s.len()])
        .ok_or_else(|| {
            err(
                hdr,
                "a header without voxels (magic \"ni1\") must be named .hdr, with its .img beside it",
            )
        })?;
    ["img", "img.gz", "IMG", "IMG.GZ"]
        .iter()
        .map(|ext| hdr.with_file_name(format!("{stem}.{ext}")))
        .find(|p| p.is_file())
        .ok_or_else(|| {
            err(
                hdr,
                format!("a header without voxels: its image {stem}.img is not beside it"),
            )
        })
}

impl Volume {
    /// A new u8 volume of `dims` (`[x, y, slices, frames]`; 3-D when
    /// `frames` is 1) at `spacing` mm, voxels in NIfTI's order, placed by an
    /// sform of the spacing alone (millimetres, scanner coordinates): for
    /// volumes built from slices (tests, synthetic data).
    pub fn new_u8(dims: [usize; 4], spacing: [f32; 3], voxels: Vec<u8>, path: &Path) -> Result<Self> {
        if voxels.len() != dims.iter().product::<usize>() || dims.iter().any(|&d| d == 0 || d > usize::from(u16::MAX)) {
            return Err(err(path, format!("{} voxels for dimensions {dims:?}", voxels.len())));
        }
        let four = dims[3] > 1;
        let mut header = NiftiHeader {
            datatype: NiftiType::Uint8 as i16,
            bitpix: 8,
            scl_slope: 1.0,
            scl_inter: 0.0,
            sform_code: 1,
            qform_code: 0,
            xyzt_units: 2, // millimetres
            ..NiftiHeader::default()
        };
        header.dim = [
            if four { 4 } else { 3 },
            dims[0] as u16,
            dims[1] as u16,
            dims[2] as u16,
            dims[3] as u16,
            1,
            1,
            1,
        ];
        header.pixdim = [1.0, spacing[0], spacing[1], spacing[2], 1.0, 1.0, 1.0, 1.0];
        header.srow_x = [spacing[0], 0.0, 0.0, 0.0];
        header.srow_y = [0.0, spacing[1], 0.0, 0.0];
        header.srow_z = [0.0, 0.0, spacing[2], 0.0];
        Ok(Self {
            header,
            voxels: Voxels::U8(voxels),
            path: path.to_path_buf(),
        })
    }

    /// `[x, y, slices, frames]` (frames 1 for a 3-D volume).
    pub fn dims(&self) -> [usize; 4] {
        let d = &self.header.dim;
        let t = if d[0] >= 4 { usize::from(d[4]).max(1) } else { 1 };
        [usize::from(d[1]), usize::from(d[2]), usize::from(d[3]), t]
    }

    /// Voxel size in millimetres along x, y and the slices.
    pub fn spacing(&self) -> [f32; 3] {
        [self.header.pixdim[1], self.header.pixdim[2], self.header.pixdim[3]]
    }

    /// Each voxel's value, `raw · scl_slope + scl_inter` when the slope is set
    /// (not 0 and finite), else the raw value.
    pub fn values(&self) -> Vec<f32> {
        let (slope, inter) = (self.header.scl_slope, self.header.scl_inter);
        let scaled = slope != 0.0 && slope.is_finite();
        self.voxels
            .as_f64()
            .into_iter()
            .map(|v| {
                if scaled {
                    (v * f64::from(slope) + f64::from(inter)) as f32
                } else {
                    v as f32
                }
            })
            .collect()
    }

    /// The voxel-to-scanner affine (4×4, millimetres): the sform where its
    /// code is set, else the qform's rotation (quaternion), spacing and offset,
    /// else the spacing alone (NIfTI's method 1).
    pub fn affine(&self) -> [[f64; 4]; 4] {
        let h = &self.header;
        let row = |r: [f32; 4]| r.map(f64::from);
        if h.sform_code > 0 {
            return [row(h.srow_x), row(h.srow_y), row(h.srow_z), [0.0, 0.0, 0.0, 1.0]];
        }
        let [dx, dy, dz] = [h.pixdim[1], h.pixdim[2], h.pixdim[3]].map(f64::from);
        if h.qform_code > 0 {
            let (b, c, d) = (f64::from(h.quatern_b), f64::from(h.quatern_c), f64::from(h.quatern_d));
            let a = (1.0 - (b * b + c * c + d * d)).max(0.0).sqrt();
            let qfac = if h.pixdim[0] < 0.0 { -1.0 } else { 1.0 };
            let r = [
                [
                    a * a + b * b - c * c - d * d,
                    2.0 * (b * c - a * d),
                    2.0 * (b * d + a * c),
                ],
                [
                    2.0 * (b * c + a * d),
                    a * a + c * c - b * b - d * d,
                    2.0 * (c * d - a * b),
                ],
                [
                    2.0 * (b * d - a * c),
                    2.0 * (c * d + a * b),
                    a * a + d * d - c * c - b * b,
                ],
            ];
            let o = [h.quatern_x, h.quatern_y, h.quatern_z].map(f64::from);
            let s = [dx, dy, dz * qfac];
            let mut m = [[0.0; 4]; 4];
            for i in 0..3 {
                for j in 0..3 {
                    m[i][j] = r[i][j] * s[j];
                }
                m[i][3] = o[i];
            }
            m[3][3] = 1.0;
            return m;
        }
        [
            [dx, 0.0, 0.0, 0.0],
            [0.0, dy, 0.0, 0.0],
            [0.0, 0.0, dz, 0.0],
            [0.0, 0.0, 0.0, 1.0],
        ]
    }

    /// A positive finite voxel spacing (volumes in mL need one).
    pub fn check_spacing(&self) -> Result<()> {
        match self.spacing().into_iter().find(|s| !(s.is_finite() && *s > 0.0)) {
            Some(s) => Err(err(
                &self.path,
                format!("a voxel spacing of {s} mm (pixdim): it must be positive"),
            )),
            None => Ok(()),
        }
    }

    /// Whether `cmr` can segment this volume slice by slice: a positive
    /// finite spacing, slices of at least [`MIN_IN_PLANE`] voxels each way,
    /// no NaN voxel. The error names the first problem.
    pub fn check_segmentable(&self) -> Result<()> {
        let [x, y, ..] = self.dims();
        self.check_spacing()?;
        if x < MIN_IN_PLANE || y < MIN_IN_PLANE {
            return Err(err(
                &self.path,
                format!("slices of {x}×{y} voxels: cmr needs at least {MIN_IN_PLANE}×{MIN_IN_PLANE}"),
            ));
        }
        let nans = self.values().iter().filter(|v| v.is_nan()).count();
        if nans > 0 {
            return Err(err(&self.path, format!("{nans} NaN voxels")));
        }
        Ok(())
    }
}

/// Byte offsets of `scl_slope` and `scl_inter` in a NIfTI-1 header.
const SCL_SLOPE_AT: usize = 112;
const SCL_INTER_AT: usize = 116;

/// Write `voxels` with `header`'s geometry, codes, scaling and byte order to
/// `path` (`.nii`, or `.nii.gz` compressed), atomically. The `nifti` crate
/// writes the file uncompressed into a temporary name (it resets the
/// scaling to 1 and 0 as it writes: the header's own values are put back
/// into those bytes), and the result is compressed and placed as `path`.
fn write_with_header(path: &Path, header: &NiftiHeader, voxels: &Voxels, dims: [usize; 4]) -> Result<()> {
    let shape = if header.dim[0] >= 4 {
        ndarray::IxDyn(&[dims[0], dims[1], dims[2], dims[3]])
    } else {
        ndarray::IxDyn(&[dims[0], dims[1], dims[2]])
    };
    let tmp = temp_path_like(&path.with_file_name("volume.nii"));
    let writer = nifti::writer::WriterOptions::new(&tmp).reference_header(header);
    // NIfTI's order is x fastest: a Fortran-order array of the dimensions
    macro_rules! write_as {
        ($v:expr) => {{
            let array = ndarray::ArrayD::from_shape_vec(ndarray::ShapeBuilder::f(shape), $v.clone())
                .map_err(|e| err(path, e.to_string()))?;
            writer.write_nifti(&array)
        }};
    }
    let written = match voxels {
        Voxels::U8(v) => write_as!(v),
        Voxels::I16(v) => write_as!(v),
        Voxels::U16(v) => write_as!(v),
        Voxels::F32(v) => write_as!(v),
        Voxels::F64(v) => write_as!(v),
    };
    let bytes = written
        .map_err(|e| match e {
            // a missing folder, a full disk: said as the OS says it
            nifti::NiftiError::Io(io) => DataError::io(path, io),
            other => err(path, format!("cannot write NIfTI: {other}")),
        })
        .and_then(|()| std::fs::read(&tmp).map_err(|e| DataError::io(&tmp, e)));
    let _ = std::fs::remove_file(&tmp);
    let mut bytes = bytes?;
    if bytes.len() < SCL_INTER_AT + 4 {
        return Err(err(path, "the NIfTI writer wrote no header"));
    }
    let big = header.endianness == nifti::Endianness::Big;
    let put = |b: &mut [u8], at: usize, v: f32| {
        let raw = if big { v.to_be_bytes() } else { v.to_le_bytes() };
        b[at..at + 4].copy_from_slice(&raw);
    };
    put(&mut bytes, SCL_SLOPE_AT, header.scl_slope);
    put(&mut bytes, SCL_INTER_AT, header.scl_inter);
    let gz = path.to_string_lossy().ends_with(".gz");
    if gz {
        use std::io::Write;
        let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        enc.write_all(&bytes).map_err(|e| DataError::io(path, e))?;
        bytes = enc.finish().map_err(|e| DataError::io(path, e))?;
    }
    crate::atomic::write_atomic(path, &bytes)
}

/// Write `volume` back (the same header fields and voxels) to `path`.
pub fn write_volume(path: &Path, volume: &Volume) -> Result<()> {
    write_with_header(path, &volume.header, &volume.voxels, volume.dims())
}

/// Write a label volume (u8, one label per voxel of `reference`, in its
/// order) with `reference`'s dimensions, spacing, affine and orientation,
/// unscaled.
pub fn write_labels(path: &Path, reference: &Volume, labels: &[u8]) -> Result<()> {
    let dims = reference.dims();
    if labels.len() != dims.iter().product::<usize>() {
        return Err(err(
            path,
            format!("{} labels for a volume of {:?} voxels", labels.len(), dims),
        ));
    }
    let mut header = reference.header.clone();
    header.scl_slope = 1.0;
    header.scl_inter = 0.0;
    header.cal_min = 0.0;
    header.cal_max = 3.0;
    write_with_header(path, &header, &Voxels::U8(labels.to_vec()), dims)
}

/// How a volume's intensities become the 8-bit slices the networks take.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Window {
    /// The values as they are (an unscaled u8 volume: the PNGs' convention).
    AsIs,
    /// `lo..hi` (the volume's 0.5th and 99.5th percentiles) stretched to
    /// 0..255, clamped outside.
    Percentiles { lo: f32, hi: f32 },
}

/// The in-plane grid of a volume's slices resampled from `[sx, sy]` mm to
/// `target` mm (at least 1 voxel a side).
pub fn resampled_size(dims: [usize; 4], spacing: [f32; 2], target: f64) -> crate::plane::Size {
    let side = |n: usize, s: f32| ((n as f64 * f64::from(s) / target).round() as usize).max(1);
    crate::plane::Size {
        height: side(dims[1], spacing[1]),
        width: side(dims[0], spacing[0]),
    }
}

/// Which percentiles of a volume's intensities map to 0 and 255 (saved with
/// each model: training and prediction window alike).
#[derive(Clone, Copy, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VolumeWindow {
    pub lo_percentile: f64,
    pub hi_percentile: f64,
}

impl Default for VolumeWindow {
    fn default() -> Self {
        Self::CLIP
    }
}

impl VolumeWindow {
    /// The 0.5th and 99.5th percentiles, as nnU-Net clips.
    pub const CLIP: Self = Self {
        lo_percentile: 0.5,
        hi_percentile: 99.5,
    };

    /// Both in 0–100, the lower below the upper.
    pub fn validate(&self) -> Result<()> {
        let (lo, hi) = (self.lo_percentile, self.hi_percentile);
        if !(lo.is_finite() && hi.is_finite() && (0.0..100.0).contains(&lo) && hi > lo && hi <= 100.0) {
            return Err(DataError::Config(format!(
                "window percentiles {lo}…{hi}: each from 0 to 100, the lower below the upper"
            )));
        }
        Ok(())
    }
}

/// The default window for `volume` ([`window_with`] of the 0.5th and 99.5th
/// percentiles).
pub fn window_of(volume: &Volume) -> Window {
    window_with(volume, VolumeWindow::default())
}

/// The window for `volume`: as it is for unscaled u8 voxels, else the
/// percentiles `w` names (over all slices and frames, as nnU-Net normalises
/// per volume).
pub fn window_with(volume: &Volume, w: VolumeWindow) -> Window {
    let unscaled = volume.header.scl_slope == 0.0
        || !volume.header.scl_slope.is_finite()
        || (volume.header.scl_slope == 1.0 && volume.header.scl_inter == 0.0);
    if matches!(volume.voxels, Voxels::U8(_)) && unscaled {
        return Window::AsIs;
    }
    let mut v: Vec<f32> = volume.values().into_iter().filter(|x| x.is_finite()).collect();
    if v.is_empty() {
        return Window::Percentiles { lo: 0.0, hi: 1.0 };
    }
    v.sort_by(f32::total_cmp);
    let at = |q: f64| v[((v.len() - 1) as f64 * q).round() as usize];
    let (lo, hi) = (at(w.lo_percentile / 100.0), at(w.hi_percentile / 100.0));
    Window::Percentiles {
        lo,
        hi: if hi > lo { hi } else { lo + 1.0 },
    }
}

/// Every slice of every frame as an 8-bit image (rows along y, columns along
/// x: voxel `(x, y)` at row `y`, column `x`), frame by frame, slice by slice:
/// index `t · slices + z`.
pub fn volume_slices(volume: &Volume, window: Window) -> Vec<crate::plane::Image> {
    let [nx, ny, nz, nt] = volume.dims();
    let values = volume.values();
    let to_u8 = |v: f32| -> u8 {
        match window {
            Window::AsIs => v.clamp(0.0, 255.0).round() as u8,
            Window::Percentiles { lo, hi } => ((v - lo) / (hi - lo) * 255.0).clamp(0.0, 255.0).round() as u8,
        }
    };
    let plane = nx * ny;
    (0..nt * nz)
        .map(|k| {
            let slice = &values[k * plane..(k + 1) * plane];
            crate::plane::Plane::from_fn(ny, nx, |y, x| to_u8(slice[y * nx + x]))
        })
        .collect()
}

/// Labels of every slice (in [`volume_slices`]' order and orientation) back
/// into one volume's voxel order.
pub fn labels_to_volume(dims: [usize; 4], slices: &[crate::plane::Mask]) -> Vec<u8> {
    let [nx, ny, ..] = dims;
    let mut out = Vec::with_capacity(dims.iter().product());
    for s in slices {
        for y in 0..ny {
            for x in 0..nx {
                out.push(s.get(y, x));
            }
        }
    }
    out
}
