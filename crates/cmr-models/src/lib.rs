//! The report's three segmentation networks as candle modules: SegNet, U-Net
//! and U-Net 3+, layer for layer and parameter for parameter the PyTorch
//! reference definitions, at the report's widths or narrower presets.
//!
//! Every network maps `[B, 1, H, W]` images to `[B, 4, H, W]` logits and
//! implements `ModuleT`, so `train` reaches every BatchNorm. The ops candle
//! lacks (bilinear up-sampling with a gradient, max-pool indices and
//! max-unpool) live in [`ops`]. This crate does no file I/O beyond what a
//! `VarBuilder` does, and knows nothing of images on disk or command lines.
//!
//! Weight names (the `vb.pp(..)` paths) are the checkpoint format; each
//! network's module documents its own.

mod blocks;
mod config;
mod error;
pub mod fast;
mod model;
pub mod ops;
mod segnet;
mod stats;
#[cfg(test)]
mod testing;
mod unet;
mod unet3plus;

pub use blocks::{BN_EPS, BN_MOMENTUM, BatchNorm2d, Conv, ConvBnRelu, ConvStack, UpConv2x2, is_running_stat};
pub use config::{Architecture, ModelConfig, Preset, SegNetConfig, UNet3PlusConfig, UNetConfig};
pub use error::{ModelError, Result};
pub use model::{Model, build};
pub use segnet::SegNet;
pub use stats::{ModelStats, count_parameters, forward_flops, model_stats, parameter_count};
pub use unet::UNet;
pub use unet3plus::UNet3Plus;
