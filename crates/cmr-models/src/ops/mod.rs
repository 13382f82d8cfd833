//! The differentiable ops candle 0.11 lacks, built from ops that have a
//! gradient on every device.

pub(crate) mod pool;
pub(crate) mod upsample;

pub use pool::{PoolIndices, max_pool, max_pool2x2_with_indices, max_unpool2x2};
pub use upsample::{bilinear_matrix, upsample_bilinear};
