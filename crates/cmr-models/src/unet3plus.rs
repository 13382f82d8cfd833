//! U-Net 3+ (Huang et al., 2020, "UNet 3+: A Full-Scale Connected UNet for
//! Medical Image Segmentation"), without the classification-guided module;
//! with the paper's deep supervision where the configuration asks for it
//! (the report trained without).
//!
//! Input `[B, in, H, W]`, output logits `[B, classes, H, W]`; `H` and `W` must
//! be multiples of 2^(depth−1). The encoder is the U-Net's. The deepest
//! decoder output is the deepest encoder output; every other decoder stage `i`
//! takes all levels `j`: encoder outputs `j < i` max-pooled by 2^(i−j)
//! (kernel = stride), the encoder output `j = i` as it is, and decoder outputs
//! `j > i` bilinearly up-sampled by 2^(j−i) (`align_corners = false`), each
//! through a conv(→`branch_channels`)-BN-ReLU; the branches are concatenated
//! in level order and fused by a conv-BN-ReLU. Head: 3×3 conv to the classes.
//!
//! Deep supervision (`deep_supervision`): a side head (3×3 conv to the
//! classes) on every decoder stage below the top and on the deepest encoder
//! output, its logits bilinearly up-sampled to the input size. In training
//! mode the output is then `[B, classes·depth, H, W]`: the main logits, then
//! the side outputs from the shallowest to the deepest (the loss weighs them,
//! `cmr-train`); in inference mode, the main logits alone.
//!
//! Weight names: `enc.{level}.{0,1}.{conv,bn}.*`,
//! `dec.{level}.branch.{source level}.{conv,bn}.*`, `dec.{level}.fuse.{conv,bn}.*`,
//! `head.*`, and with deep supervision `side.{level}.*` (levels 1 to depth − 1).

use candle_core::{Module, ModuleT, Result, Tensor};
use candle_nn::VarBuilder;

use crate::backend::{self, KernelConfig};
use crate::blocks::{Conv, ConvBnRelu, ConvStack};
use crate::config::UNet3PlusConfig;

#[derive(Clone, Debug)]
struct DecoderStage {
    /// One branch per source level, in level order.
    branches: Vec<ConvBnRelu>,
    fuse: ConvBnRelu,
}

/// The U-Net 3+.
#[derive(Clone, Debug)]
pub struct UNet3Plus {
    encoder: Vec<ConvStack>,
    /// `decoder[i]` produces level `i`, for every level but the deepest.
    decoder: Vec<DecoderStage>,
    head: Conv,
    /// Deep supervision's heads, for levels 1 to depth − 1 (empty without).
    side: Vec<Conv>,
    kernels: KernelConfig,
}

impl UNet3Plus {
    pub fn new(cfg: &UNet3PlusConfig, kernels: KernelConfig, vb: VarBuilder) -> Result<Self> {
        let f = &cfg.filters;
        let depth = f.len();
        let stage = cfg.stage_channels();
        let mut encoder = Vec::with_capacity(depth);
        let mut c = cfg.in_channels;
        for (level, &width) in f.iter().enumerate() {
            encoder.push(ConvStack::new(c, &[width, width], kernels, vb.pp("enc").pp(level))?);
            c = width;
        }
        let mut decoder = Vec::with_capacity(depth - 1);
        for level in 0..depth - 1 {
            let vb = vb.pp("dec").pp(level);
            let branches = (0..depth)
                .map(|source| {
                    // encoder outputs up to this level and the deepest level,
                    // decoder stages in between
                    let channels = if source <= level || source == depth - 1 {
                        f[source]
                    } else {
                        stage
                    };
                    ConvBnRelu::new(channels, cfg.branch_channels, kernels, vb.pp("branch").pp(source))
                })
                .collect::<Result<Vec<_>>>()?;
            let fuse = ConvBnRelu::new(stage, stage, kernels, vb.pp("fuse"))?;
            decoder.push(DecoderStage { branches, fuse });
        }
        let head = Conv::new(stage, cfg.num_classes, 3, kernels, vb.pp("head"))?;
        let side = if cfg.deep_supervision {
            (1..depth)
                .map(|level| {
                    // the deepest level's input is the encoder's output
                    let channels = if level == depth - 1 { f[level] } else { stage };
                    Conv::new(channels, cfg.num_classes, 3, kernels, vb.pp("side").pp(level))
                })
                .collect::<Result<Vec<_>>>()?
        } else {
            Vec::new()
        };
        Ok(Self {
            encoder,
            decoder,
            head,
            side,
            kernels,
        })
    }
}

impl ModuleT for UNet3Plus {
    fn forward_t(&self, xs: &Tensor, train: bool) -> Result<Tensor> {
        let depth = self.encoder.len();
        let mut enc = Vec::with_capacity(depth);
        let mut x = xs.clone();
        for (level, stage) in self.encoder.iter().enumerate() {
            if level > 0 {
                // [B, C, H, W] -> [B, C, H/2, W/2]
                x = backend::max_pool(&x, 2, &self.kernels)?;
            }
            x = stage.forward_t(&x, train)?;
            enc.push(x.clone());
        }
        // dec[j] for j > level: the deepest is the encoder's output.
        let mut dec: Vec<Option<Tensor>> = vec![None; depth];
        dec[depth - 1] = enc.last().cloned();
        for level in (0..depth - 1).rev() {
            let stage = &self.decoder[level];
            let mut parts = Vec::with_capacity(depth);
            for (source, branch) in stage.branches.iter().enumerate() {
                let part = if source < level {
                    // [B, C, H·2^k, W·2^k] -> [B, C, H, W]
                    branch.forward_t(
                        &backend::max_pool(&enc[source], 1 << (level - source), &self.kernels)?,
                        train,
                    )?
                } else if source == level {
                    branch.forward_t(&enc[source], train)?
                } else {
                    let deeper = dec[source].as_ref().expect("deeper stages are computed first");
                    // bilinear up-sampling then the branch:
                    // [B, C, H/2^k, W/2^k] -> [B, branch, H, W]
                    branch.forward_upsampled(deeper, 1 << (source - level), train)?
                };
                parts.push(part);
            }
            // depth × [B, branch, H, W] -> [B, depth·branch, H, W]
            let fused = stage.fuse.forward_t(
                &backend::cat(&parts.iter().collect::<Vec<_>>(), 1, &self.kernels)?,
                train,
            )?;
            dec[level] = Some(fused);
        }
        let top = dec[0].take().expect("level 0 is decoded last");
        let main = self.head.forward(&top)?;
        if !train || self.side.is_empty() {
            return Ok(main);
        }
        let mut outputs = vec![main];
        for (i, head) in self.side.iter().enumerate() {
            let level = i + 1;
            let input = dec[level].as_ref().expect("every level is decoded");
            let logits = head.forward(input)?;
            outputs.push(backend::upsample_bilinear(&logits, 1 << level, &self.kernels)?);
        }
        backend::cat(&outputs.iter().collect::<Vec<_>>(), 1, &self.kernels)
    }
}
