//! Cardiac MR slices as data: discovery, validation, pad/crop, splits,
//! augmentation, batching to candle tensors, and the competition's formats.
//!
//! This crate knows files and pixels and nothing of networks. Everything it
//! writes (mask PNGs, overlays, the run-length CSV) is written atomically.

mod atomic;
mod augment;
mod batch;
mod dataset;
mod error;
mod layout;
mod lock;
mod normalize;
mod overlay;
mod plane;
mod png;
mod record;
mod rle;
mod rng;
mod split;
mod transforms;
mod volume;

pub use atomic::{remove_stale_temps, write_atomic, write_atomic_with};
pub use augment::{Affine, AugmentConfig, Elastic, Ranged, deform_sample};
pub use batch::{Batch, BatchPlan};
pub use dataset::{
    Dataset, Labels, LoadOptions, Sample, image_ids, list_pngs, load_images, load_split, mask_file_name, natural_cmp,
    volume_samples,
};
pub use error::{DataError, Result};
pub use layout::{Layout, Phase, VolumeCase, VolumeDataset, find_volume_dataset, read_info_cfg};
pub use lock::DirLock;
pub use normalize::{Normalization, to_unit};
pub use overlay::{CLASS_COLOURS, OverlayMode, OverlayStyle, Rgb, compose, encode_png, write_overlay_styled};
pub use plane::{Image, Mask, Plane, Size};
pub use png::{NUM_CLASSES, read_image, read_mask, write_image, write_mask};
pub use record::{SplitRecord, fingerprint};
pub use rle::{
    FOREGROUND, Row, read_submission, rle_decode, rle_encode, submission_rows, write_rows, write_submission,
};
pub use rng::{StreamRng, hash_str, purpose, stream};
pub use split::{Folds, Grouping, Splits, ValSource, hold_out, slice_case};
pub use transforms::{
    AffineParams, Warp, affine_bilinear, affine_nearest, flip_h, flip_v, gaussian_blur, low_resolution,
    resize_bilinear, resize_nearest, resize_u8_bilinear, rot90, smooth_field,
};
pub use volume::{
    MIN_IN_PLANE, Volume, VolumeWindow, Voxels, Window, labels_to_volume, read_volume, resampled_size, volume_slices,
    window_of, window_with, write_labels, write_volume,
};
