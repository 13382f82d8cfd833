//! The report's three segmentation networks as candle modules: SegNet, U-Net
//! and U-Net 3+, layer for layer and parameter for parameter the PyTorch
//! reference definitions, at the report's widths or narrower presets.
//!
//! Every network maps `[B, 1, H, W]` images to `[B, 4, H, W]` logits and
//! implements `ModuleT`, so `train` reaches every BatchNorm. The ops candle
//! lacks (bilinear up-sampling with a gradient, max-pool indices and
//! max-unpool) live in [`ops`], as candle expressions for every device;
//! [`backend`] runs each op on the CPU kernels of `cmr-kernels` where the
//! [`KernelConfig`] a network was built with applies, else on those. This
//! crate does no file I/O beyond what a `VarBuilder` does, and knows nothing
//! of images on disk or command lines.
//!
//! Weight names (the `vb.pp(..)` paths) are the checkpoint format; each
//! network's module documents its own.

pub mod backend;
mod blocks;
mod config;
mod error;
mod model;
pub mod ops;
mod segnet;
mod stats;
mod unet;
mod unet3plus;

pub use backend::KernelConfig;
pub use blocks::{BN_EPS, BN_MOMENTUM, BatchNorm2d, Conv, ConvBnRelu, ConvStack, UpConv2x2, is_running_stat};
pub use config::{Architecture, ModelConfig, Preset, SegNetConfig, UNet3PlusConfig, UNetConfig};
pub use error::{ModelError, Result};
pub use model::{Model, build};
pub use segnet::SegNet;
pub use stats::{ConvLayer, ModelStats, conv_layers, count_parameters, forward_flops, model_stats, parameter_count};
pub use unet::UNet;
pub use unet3plus::UNet3Plus;
