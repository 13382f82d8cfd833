//! Parameter counts, size and forward FLOPs of a configuration.
//!
//! Parameters are counted as PyTorch's `sum(p.numel() for p in
//! model.parameters())`: BatchNorm running statistics are buffers, not
//! parameters. FLOPs count 2 per multiply-add of the convolutions (including
//! transposed and 1×1 convs) for one image; BatchNorm, ReLU, pooling,
//! up-sampling and concatenation are left out (they are a small fraction).

use candle_core::{DType, Device};
use candle_nn::{VarBuilder, VarMap};
use serde::Serialize;

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
    build(cfg, vb)?;
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

/// FLOPs of a `k×k` conv from `cin` to `cout` channels producing `pixels`.
fn conv(cin: usize, cout: usize, k: usize, pixels: usize) -> u64 {
    2 * (k * k * cin * cout * pixels) as u64
}

/// Forward FLOPs of one `height × width` image (see the module doc).
pub fn forward_flops(cfg: &ModelConfig, height: usize, width: usize) -> u64 {
    let px = |level: usize| (height >> level) * (width >> level);
    match cfg {
        ModelConfig::UNet(c) => {
            let f = &c.filters;
            let mut total = 0;
            let mut cin = c.in_channels;
            for (l, &w) in f.iter().enumerate() {
                total += conv(cin, w, 3, px(l)) + conv(w, w, 3, px(l));
                cin = w;
            }
            for l in 0..f.len() - 1 {
                // the 2×2 transposed conv: every input pixel makes 4 outputs
                total += conv(f[l + 1], f[l], 1, px(l));
                total += conv(2 * f[l], f[l], 3, px(l)) + conv(f[l], f[l], 3, px(l));
            }
            total + conv(f[0], c.num_classes, 1, px(0))
        }
        ModelConfig::UNet3Plus(c) => {
            let f = &c.filters;
            let d = f.len();
            let stage = c.stage_channels();
            let mut total = 0;
            let mut cin = c.in_channels;
            for (l, &w) in f.iter().enumerate() {
                total += conv(cin, w, 3, px(l)) + conv(w, w, 3, px(l));
                cin = w;
            }
            for l in 0..d - 1 {
                for (s, &width) in f.iter().enumerate() {
                    let ch = if s <= l || s == d - 1 { width } else { stage };
                    total += conv(ch, c.branch_channels, 3, px(l));
                }
                total += conv(stage, stage, 3, px(l));
            }
            total + conv(stage, c.num_classes, 3, px(0))
        }
        ModelConfig::SegNet(c) => {
            let f = &c.filters;
            let mut total = 0;
            let mut cin = c.in_channels;
            for (b, (&w, &n)) in f.iter().zip(&c.convs).enumerate() {
                total += conv(cin, w, 3, px(b)) + (n as u64 - 1) * conv(w, w, 3, px(b));
                let out = if b > 0 { f[b - 1] } else { c.num_classes };
                total += (n as u64 - 1) * conv(w, w, 3, px(b)) + conv(w, out, 3, px(b));
                cin = w;
            }
            total
        }
    }
}
