//! One entry point for the three networks: [`build`] and [`Model`].

use candle_core::{ModuleT, Result as CandleResult, Tensor};
use candle_nn::VarBuilder;

use crate::backend::KernelConfig;
use crate::config::ModelConfig;
use crate::error::Result;
use crate::segnet::SegNet;
use crate::unet::UNet;
use crate::unet3plus::UNet3Plus;

/// Any of the three networks.
#[derive(Clone, Debug)]
pub enum Model {
    SegNet(SegNet),
    UNet(UNet),
    UNet3Plus(UNet3Plus),
}

/// Build the network `cfg` describes, taking its weights from `vb` (a
/// `VarMap` for training, a checkpoint for inference), its ops run by the
/// `kernels` (see [`crate::backend`]).
///
/// An invalid configuration is rejected before any tensor is made; a
/// checkpoint of another architecture or width fails on the first tensor
/// whose name or shape does not match.
pub fn build(cfg: &ModelConfig, kernels: &KernelConfig, vb: VarBuilder) -> Result<Model> {
    cfg.validate()?;
    let k = *kernels;
    Ok(match cfg {
        ModelConfig::SegNet(c) => Model::SegNet(SegNet::new(c, k, vb)?),
        ModelConfig::UNet(c) => Model::UNet(UNet::new(c, k, vb)?),
        ModelConfig::UNet3Plus(c) => Model::UNet3Plus(UNet3Plus::new(c, k, vb)?),
    })
}

impl ModuleT for Model {
    /// `[B, in, H, W] -> [B, classes, H, W]` logits. `train` selects batch
    /// statistics (and updates the running ones) in every BatchNorm.
    fn forward_t(&self, xs: &Tensor, train: bool) -> CandleResult<Tensor> {
        match self {
            Self::SegNet(m) => m.forward_t(xs, train),
            Self::UNet(m) => m.forward_t(xs, train),
            Self::UNet3Plus(m) => m.forward_t(xs, train),
        }
    }
}
