//! Losses and metrics for cardiac MR segmentation, with the report's and the
//! competition's definitions.
//!
//! Losses ([`Loss`]: cross-entropy, soft Dice, Dice+CE) are differentiable
//! candle expressions on logits `[B, C, H, W]` and targets `[B, H, W]`, on any
//! device. Metrics ([`MetricsAccumulator`]: Dice, IoU, HD95, noise number) are
//! computed on label masks, per image and class, over a whole split; on label
//! volumes ([`VolumeMetrics`]: 3-D Dice, HD95 in mm) per volume. No I/O.

mod components;
mod error;
mod loss;
mod metrics;
mod postprocess;
mod volume;

pub use components::{extra_components, keep_largest_components, label_components};
pub use error::{LossError, Result};
pub use loss::{Loss, cross_entropy, one_hot, soft_dice_loss, soft_dice_per_class};
pub use metrics::{
    CLASS_NAMES, ClassMetrics, DEFINITIONS, ImageMetrics, LabelMap, MetricsAccumulator, MetricsReport, dice, hd95, iou,
    percentile,
};
pub use postprocess::{Clean, PostProcess};
pub use volume::{LabelVolume, VolumeMetrics, dice_3d, hd95_mm};
