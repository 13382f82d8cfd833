//! Parameter counts, size and forward FLOPs of a configuration.
//!
//! Parameters are counted as PyTorch's `sum(p.numel() for p in
//! model.parameters())`: BatchNorm running statistics are buffers, not
//! parameters. FLOPs count 2 per multiply-add of the convolutions (including
//! transposed and 1×1 convs) for one image; BatchNorm, ReLU, pooling,
//! up-sampling and concatenation are left out (they are a small fraction).

use candle_core::{DType, Device};
use candle_nn::{VarBuilder, VarMap};
use cmr_kernels::ConvShape;
use serde::Serialize;

use crate::backend::KernelConfig;
use crate::blocks::is_running_stat;
use crate::config::ModelConfig;
use crate::error::Result;
use crate::model::build;

/// What `cmr info` reports.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct ModelStats {
    pub parameters: usize,
    /// Size of the f32 parameters in MB (10^6 bytes).
    pub size_mb: f64,
    /// Forward GFLOPs for one image of the given size.
    pub gflops: f64,
    pub height: usize,
    pub width: usize,
}

/// Trainable parameters in a `VarMap` (running statistics excluded).
pub fn count_parameters(varmap: &VarMap) -> usize {
    let data = varmap.data().lock().expect("var map lock");
    data.iter()
        .filter(|(name, _)| !is_running_stat(name))
        .map(|(_, v)| v.elem_count())
        .sum()
}

/// Build `cfg` on the CPU and count its parameters.
pub fn parameter_count(cfg: &ModelConfig) -> Result<usize> {
    let varmap = VarMap::new();
    let vb = VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu);
    build(cfg, &KernelConfig::off(), vb)?;
    Ok(count_parameters(&varmap))
}

/// Parameters, size and forward GFLOPs at `height × width`.
pub fn model_stats(cfg: &ModelConfig, height: usize, width: usize) -> Result<ModelStats> {
    cfg.validate()?;
    cfg.check_input_size(height, width)?;
    let parameters = parameter_count(cfg)?;
    Ok(ModelStats {
        parameters,
        size_mb: parameters as f64 * 4.0 / 1e6,
        gflops: forward_flops(cfg, height, width) as f64 / 1e9,
        height,
        width,
    })
}

/// One convolution of a network: its weight name's prefix and its shape
/// (input resolution, channels, kernel, up-sampling of the input).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConvLayer {
    pub name: String,
    pub shape: ConvShape,
}

impl ConvLayer {
    /// Multiply-adds × 2 of the layer.
    fn flops(&self) -> u64 {
        let s = &self.shape;
        let (ho, wo) = s.out_hw();
        2 * (s.k * s.k * s.cin * s.cout * ho * wo * s.batch) as u64
    }
}

/// Every convolution of the network `cfg` on `batch` images of `height ×
/// width`, in forward order (what [`cmr_kernels::plan`] is asked about).
/// The U-Net's 2×2 transposed convolutions are not among them: each is one
/// op of its own (`cmr_kernels::upconv2x2`).
pub fn conv_layers(cfg: &ModelConfig, batch: usize, height: usize, width: usize) -> Vec<ConvLayer> {
    let mut layers = Vec::new();
    let mut push = |name: String, cin: usize, level: usize, cout: usize, k: usize, upsample: usize| {
        layers.push(ConvLayer {
            name,
            shape: ConvShape {
                batch,
                cin,
                h: height >> level,
                w: width >> level,
                cout,
                k,
                upsample,
            },
        });
    };
    match cfg {
        ModelConfig::UNet(c) => {
            let f = &c.filters;
            let mut cin = c.in_channels;
            for (l, &w) in f.iter().enumerate() {
                push(format!("enc.{l}.0"), cin, l, w, 3, 1);
                push(format!("enc.{l}.1"), w, l, w, 3, 1);
                cin = w;
            }
            for l in (0..f.len() - 1).rev() {
                push(format!("dec.{l}.conv.0"), 2 * f[l], l, f[l], 3, 1);
                push(format!("dec.{l}.conv.1"), f[l], l, f[l], 3, 1);
            }
            push("head".into(), f[0], 0, c.num_classes, 1, 1);
        }
        ModelConfig::UNet3Plus(c) => {
            let f = &c.filters;
            let d = f.len();
            let stage = c.stage_channels();
            let mut cin = c.in_channels;
            for (l, &w) in f.iter().enumerate() {
                push(format!("enc.{l}.0"), cin, l, w, 3, 1);
                push(format!("enc.{l}.1"), w, l, w, 3, 1);
                cin = w;
            }
            for l in (0..d - 1).rev() {
                for (s, &width) in f.iter().enumerate() {
                    let ch = if s <= l || s == d - 1 { width } else { stage };
                    // deeper sources are up-sampled from their own level
                    let (level, up) = if s > l { (s, 1 << (s - l)) } else { (l, 1) };
                    push(format!("dec.{l}.branch.{s}"), ch, level, c.branch_channels, 3, up);
                }
                push(format!("dec.{l}.fuse"), stage, l, stage, 3, 1);
            }
            push("head".into(), stage, 0, c.num_classes, 3, 1);
        }
        ModelConfig::SegNet(c) => {
            let f = &c.filters;
            let mut cin = c.in_channels;
            for (b, (&w, &n)) in f.iter().zip(&c.convs).enumerate() {
                for i in 0..n {
                    push(format!("enc.{b}.{i}"), if i == 0 { cin } else { w }, b, w, 3, 1);
                }
                cin = w;
            }
            for (b, (&w, &n)) in f.iter().zip(&c.convs).enumerate().rev() {
                for i in 0..n - 1 {
                    push(format!("dec.{b}.{i}"), w, b, w, 3, 1);
                }
                if b > 0 {
                    push(format!("dec.{b}.{}", n - 1), w, b, f[b - 1], 3, 1);
                }
            }
            push("head".into(), f[0], 0, c.num_classes, 3, 1);
        }
    }
    layers
}

/// Forward FLOPs of one `height × width` image (see the module doc).
pub fn forward_flops(cfg: &ModelConfig, height: usize, width: usize) -> u64 {
    let convs: u64 = conv_layers(cfg, 1, height, width).iter().map(ConvLayer::flops).sum();
    let upconvs = match cfg {
        // the 2×2 transposed conv: every input pixel makes 4 outputs, as a
        // 1×1 conv from f[l + 1] to f[l] at the output's resolution
        ModelConfig::UNet(c) => {
            let f = &c.filters;
            (0..f.len() - 1)
                .map(|l| 2 * (f[l + 1] * f[l] * (height >> l) * (width >> l)) as u64)
                .sum()
        }
        _ => 0,
    };
    convs + upconvs
}
