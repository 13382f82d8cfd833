//! SegNet (Badrinarayanan et al., 2017, "SegNet: A Deep Convolutional
//! Encoder-Decoder Architecture for Image Segmentation"), as in the report.
//!
//! Input `[B, in, H, W]`, output logits `[B, classes, H, W]`; `H` and `W` must
//! be multiples of 2^blocks (32 for VGG16's five blocks: 96 → 3). Encoder: the
//! VGG16-BN blocks, each followed by 2×2 max-pooling that keeps its indices.
//! Decoder: the mirror, deepest block first; each un-pools at the stored
//! indices, then runs the block's conv-BN-ReLU layers in reverse channel
//! order. The very last conv goes to the classes with no BN or ReLU.
//!
//! Weight names: `enc.{block}.{layer}.{conv,bn}.*`,
//! `dec.{block}.{layer}.{conv,bn}.*`, `head.*` (the last conv).

use candle_core::{Module, ModuleT, Result, Tensor};
use candle_nn::VarBuilder;

use crate::backend::{self, KernelConfig};
use crate::blocks::{Conv, ConvStack};
use crate::config::SegNetConfig;

/// The SegNet.
#[derive(Clone, Debug)]
pub struct SegNet {
    encoder: Vec<ConvStack>,
    /// `decoder[b]` mirrors `encoder[b]`; the first block's last conv is `head`.
    decoder: Vec<ConvStack>,
    head: Conv,
    kernels: KernelConfig,
}

impl SegNet {
    pub fn new(cfg: &SegNetConfig, kernels: KernelConfig, vb: VarBuilder) -> Result<Self> {
        let f = &cfg.filters;
        let mut encoder = Vec::with_capacity(f.len());
        let mut decoder = Vec::with_capacity(f.len());
        let mut c = cfg.in_channels;
        for (block, (&width, &n)) in f.iter().zip(&cfg.convs).enumerate() {
            encoder.push(ConvStack::new(c, &vec![width; n], kernels, vb.pp("enc").pp(block))?);
            // Mirror: n − 1 layers at this width, then down to the previous
            // block's width (the first block ends in `head` instead).
            let mut widths = vec![width; n - 1];
            if block > 0 {
                widths.push(f[block - 1]);
            }
            decoder.push(ConvStack::new(width, &widths, kernels, vb.pp("dec").pp(block))?);
            c = width;
        }
        let head = Conv::new(f[0], cfg.num_classes, 3, kernels, vb.pp("head"))?;
        Ok(Self {
            encoder,
            decoder,
            head,
            kernels,
        })
    }
}

impl ModuleT for SegNet {
    fn forward_t(&self, xs: &Tensor, train: bool) -> Result<Tensor> {
        let mut indices = Vec::with_capacity(self.encoder.len());
        let mut x = xs.clone();
        for block in &self.encoder {
            // [B, C, H, W] -> [B, C', H/2, W/2]
            let (pooled, idx) = backend::max_pool2x2_with_indices(&block.forward_t(&x, train)?, &self.kernels)?;
            indices.push(idx);
            x = pooled;
        }
        for block in self.decoder.iter().rev() {
            let idx = indices.pop().expect("one set of indices per block");
            // [B, C, H/2, W/2] -> [B, C, H, W]
            x = block.forward_t(&backend::max_unpool2x2(&x, &idx, &self.kernels)?, train)?;
        }
        self.head.forward(&x)
    }
}
