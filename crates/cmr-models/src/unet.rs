//! U-Net (Ronneberger et al., 2015, "U-Net: Convolutional Networks for
//! Biomedical Image Segmentation"), as in the report.
//!
//! Input `[B, in, H, W]`, output logits `[B, classes, H, W]`; `H` and `W` must
//! be multiples of 2^(depth−1). Encoder: per level two conv-BN-ReLU, 2×2
//! max-pool between levels. Decoder: 2×2 transposed conv stride 2 halving the
//! channels, concatenation `[skip, up]`, two conv-BN-ReLU. Head: 1×1 conv.
//!
//! Weight names: `enc.{level}.{0,1}.{conv,bn}.*`, `dec.{level}.up.*`,
//! `dec.{level}.conv.{0,1}.{conv,bn}.*` (level 0 is full resolution), `head.*`.

use candle_core::{Module, ModuleT, Result, Tensor};
use candle_nn::VarBuilder;

use crate::backend::{self, KernelConfig};
use crate::blocks::{Conv, ConvStack, UpConv2x2};
use crate::config::UNetConfig;

#[derive(Clone, Debug)]
struct DecoderStage {
    up: UpConv2x2,
    conv: ConvStack,
}

/// The U-Net.
#[derive(Clone, Debug)]
pub struct UNet {
    encoder: Vec<ConvStack>,
    /// `decoder[i]` produces level `i`; there is none for the deepest level.
    decoder: Vec<DecoderStage>,
    head: Conv,
    kernels: KernelConfig,
}

impl UNet {
    pub fn new(cfg: &UNetConfig, kernels: KernelConfig, vb: VarBuilder) -> Result<Self> {
        let f = &cfg.filters;
        let mut encoder = Vec::with_capacity(f.len());
        let mut c = cfg.in_channels;
        for (level, &width) in f.iter().enumerate() {
            encoder.push(ConvStack::new(c, &[width, width], kernels, vb.pp("enc").pp(level))?);
            c = width;
        }
        let mut decoder = Vec::with_capacity(f.len() - 1);
        for level in 0..f.len() - 1 {
            let vb = vb.pp("dec").pp(level);
            decoder.push(DecoderStage {
                up: UpConv2x2::new(f[level + 1], f[level], kernels, vb.pp("up"))?,
                conv: ConvStack::new(2 * f[level], &[f[level], f[level]], kernels, vb.pp("conv"))?,
            });
        }
        let head = Conv::new(f[0], cfg.num_classes, 1, kernels, vb.pp("head"))?;
        Ok(Self {
            encoder,
            decoder,
            head,
            kernels,
        })
    }
}

impl ModuleT for UNet {
    fn forward_t(&self, xs: &Tensor, train: bool) -> Result<Tensor> {
        let mut skips = Vec::with_capacity(self.encoder.len());
        let mut x = xs.clone();
        for (level, stage) in self.encoder.iter().enumerate() {
            if level > 0 {
                // [B, C, H, W] -> [B, C, H/2, W/2]
                x = backend::max_pool(&x, 2, &self.kernels)?;
            }
            x = stage.forward_t(&x, train)?;
            skips.push(x.clone());
        }
        skips.pop(); // the deepest level is `x` itself
        for stage in self.decoder.iter().rev() {
            let skip = skips.pop().expect("one skip per decoder stage");
            // [B, 2C, H/2, W/2] -> [B, C, H, W], then [B, 2C, H, W] with the skip
            let up = stage.up.forward(&x)?;
            x = stage
                .conv
                .forward_t(&backend::cat(&[&skip, &up], 1, &self.kernels)?, train)?;
        }
        self.head.forward(&x)
    }
}
