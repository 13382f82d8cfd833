//! Building blocks shared by the three networks: 3×3 convolution with bias,
//! BatchNorm, conv-BN-ReLU stacks, 2×2 stride-2 transposed convolution.
//!
//! Each block asks its `VarBuilder` for tensors with PyTorch's default
//! initialisation as the hint (uniform ±1/√fan_in for weights and biases,
//! BatchNorm weight 1 and bias 0), so that a seeded backend reproduces the
//! reference networks' initial distribution.
//!
//! Each block keeps the [`KernelConfig`] it was built with and runs its ops
//! through [`crate::backend`], which picks the CPU kernels or candle's ops.

use candle_core::{Module, ModuleT, Result, Tensor, Var};
use candle_nn::{BatchNorm, Init, VarBuilder};

use crate::backend::{self, BatchNormParts, BnStats, KernelConfig};

/// BatchNorm epsilon and momentum of the reference networks (PyTorch's).
pub const BN_EPS: f64 = 1e-5;
pub const BN_MOMENTUM: f64 = 0.1;

fn uniform(fan_in: usize) -> Init {
    let bound = 1.0 / (fan_in as f64).sqrt();
    Init::Uniform { lo: -bound, up: bound }
}

/// A 2-D convolution with bias, stride 1, "same" padding (`k / 2`).
///
/// Weights: `weight` `[out, in, k, k]`, `bias` `[out]`.
#[derive(Clone, Debug)]
pub struct Conv {
    weight: Tensor,
    bias: Tensor,
    kernels: KernelConfig,
}

impl Conv {
    pub fn new(
        in_channels: usize,
        out_channels: usize,
        kernel: usize,
        kernels: KernelConfig,
        vb: VarBuilder,
    ) -> Result<Self> {
        let fan_in = in_channels * kernel * kernel;
        let weight = vb.get_with_hints((out_channels, in_channels, kernel, kernel), "weight", uniform(fan_in))?;
        let bias = vb.get_with_hints(out_channels, "bias", uniform(fan_in))?;
        Ok(Self { weight, bias, kernels })
    }

    pub fn weight(&self) -> &Tensor {
        &self.weight
    }

    pub fn bias(&self) -> &Tensor {
        &self.bias
    }
}

impl Module for Conv {
    /// `[B, in, H, W] -> [B, out, H, W]`
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        backend::conv(xs, &self.weight, &self.bias, &self.kernels)
    }
}

/// BatchNorm over channels (eps 1e-5, momentum 0.1, affine). Weights:
/// `weight`, `bias`, and the running statistics `running_mean`,
/// `running_var`, which are state, not parameters.
///
/// Wraps candle-nn's `BatchNorm` (the reference path) and keeps handles on
/// the same tensors for the kernels.
#[derive(Clone, Debug)]
pub struct BatchNorm2d {
    reference: BatchNorm,
    weight: Tensor,
    bias: Tensor,
    running_mean: Var,
    running_var: Var,
    kernels: KernelConfig,
}

impl BatchNorm2d {
    pub fn new(channels: usize, kernels: KernelConfig, vb: VarBuilder) -> Result<Self> {
        let running_mean = vb.get_with_hints(channels, "running_mean", Init::Const(0.0))?;
        let running_var = vb.get_with_hints(channels, "running_var", Init::Const(1.0))?;
        let weight = vb.get_with_hints(channels, "weight", Init::Const(1.0))?;
        let bias = vb.get_with_hints(channels, "bias", Init::Const(0.0))?;
        let reference = BatchNorm::new_with_momentum(
            channels,
            running_mean.clone(),
            running_var.clone(),
            weight.clone(),
            bias.clone(),
            BN_EPS,
            BN_MOMENTUM,
        )?;
        // `reference` made these variables (or found them to be ones): share them.
        let running_mean = Var::from_tensor(reference.running_mean())?;
        let running_var = Var::from_tensor(reference.running_var())?;
        Ok(Self {
            reference,
            weight,
            bias,
            running_mean,
            running_var,
            kernels,
        })
    }

    fn parts(&self) -> BatchNormParts<'_> {
        BatchNormParts {
            reference: &self.reference,
            weight: &self.weight,
            bias: &self.bias,
            running_mean: self.running_mean.as_tensor(),
            running_var: self.running_var.as_tensor(),
            eps: BN_EPS,
        }
    }

    /// BatchNorm then ReLU: `[B, C, H, W] -> [B, C, H, W]`. In training mode
    /// the batch statistics normalise and update the running ones.
    pub fn forward_relu(&self, xs: &Tensor, train: bool) -> Result<Tensor> {
        let (ys, stats) = backend::bn_relu(xs, self.parts(), train, &self.kernels)?;
        self.update_running(stats.as_ref())?;
        Ok(ys)
    }

    /// Move the running statistics towards a training batch's (PyTorch's
    /// rule: `(1 − momentum)·old + momentum·batch`, unbiased variance), when
    /// the kernels computed them (candle-nn's module moves its own).
    fn update_running(&self, stats: Option<&BnStats>) -> Result<()> {
        let Some(stats) = stats else {
            return Ok(());
        };
        let update = |var: &Var, batch: &[f32]| -> Result<()> {
            let old = var.as_tensor().to_vec1::<f32>()?;
            let new: Vec<f32> = old
                .iter()
                .zip(batch)
                .map(|(o, b)| ((1.0 - BN_MOMENTUM) * f64::from(*o) + BN_MOMENTUM * f64::from(*b)) as f32)
                .collect();
            var.set(&Tensor::from_vec(new, old.len(), var.device())?)
        };
        update(&self.running_mean, &stats.mean)?;
        update(&self.running_var, &stats.var_unbiased)
    }
}

/// Whether a weight name is a BatchNorm running statistic (state that the
/// optimiser must not touch).
pub fn is_running_stat(name: &str) -> bool {
    name.ends_with("running_mean") || name.ends_with("running_var")
}

/// 3×3 convolution, BatchNorm, ReLU. Weights under `conv.` and `bn.`.
#[derive(Clone, Debug)]
pub struct ConvBnRelu {
    conv: Conv,
    bn: BatchNorm2d,
}

impl ConvBnRelu {
    pub fn new(in_channels: usize, out_channels: usize, kernels: KernelConfig, vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            conv: Conv::new(in_channels, out_channels, 3, kernels, vb.pp("conv"))?,
            bn: BatchNorm2d::new(out_channels, kernels, vb.pp("bn"))?,
        })
    }
}

impl ModuleT for ConvBnRelu {
    /// `[B, in, H, W] -> [B, out, H, W]`
    fn forward_t(&self, xs: &Tensor, train: bool) -> Result<Tensor> {
        self.forward_upsampled(xs, 1, train)
    }
}

impl ConvBnRelu {
    /// [`ModuleT::forward_t`] of `xs` bilinearly up-sampled `factor` times
    /// (`align_corners = false`): `[B, in, H, W] -> [B, out, H·factor,
    /// W·factor]`. On the kernels the convolution can run at `xs`'s
    /// resolution, the up-sampled input never made (`KernelConfig::upsampled`).
    pub fn forward_upsampled(&self, xs: &Tensor, factor: usize, train: bool) -> Result<Tensor> {
        let conv = (&self.conv.weight, &self.conv.bias);
        let (ys, stats) = backend::conv_bn_relu(xs, factor, conv, self.bn.parts(), train, &self.bn.kernels)?;
        self.bn.update_running(stats.as_ref())?;
        Ok(ys)
    }
}

/// A stack of conv-BN-ReLU layers with the given output widths (the U-Net's
/// "double conv" is `widths = [c, c]`). Layers are named `0`, `1`, ….
#[derive(Clone, Debug)]
pub struct ConvStack {
    layers: Vec<ConvBnRelu>,
}

impl ConvStack {
    pub fn new(in_channels: usize, widths: &[usize], kernels: KernelConfig, vb: VarBuilder) -> Result<Self> {
        let mut layers = Vec::with_capacity(widths.len());
        let mut c = in_channels;
        for (i, &w) in widths.iter().enumerate() {
            layers.push(ConvBnRelu::new(c, w, kernels, vb.pp(i))?);
            c = w;
        }
        Ok(Self { layers })
    }
}

impl ModuleT for ConvStack {
    fn forward_t(&self, xs: &Tensor, train: bool) -> Result<Tensor> {
        self.layers.iter().try_fold(xs.clone(), |x, l| l.forward_t(&x, train))
    }
}

/// Transposed convolution with kernel 2 and stride 2 (PyTorch
/// `ConvTranspose2d(in, out, 2, stride=2)`): each input pixel becomes a 2×2
/// output block. Weights: `weight` `[in, out, 2, 2]` (PyTorch's layout),
/// `bias` `[out]`.
#[derive(Clone, Debug)]
pub struct UpConv2x2 {
    weight: Tensor,
    bias: Tensor,
    kernels: KernelConfig,
}

impl UpConv2x2 {
    pub fn new(in_channels: usize, out_channels: usize, kernels: KernelConfig, vb: VarBuilder) -> Result<Self> {
        // PyTorch computes the fan-in of a transposed conv from weight.size(1).
        let fan_in = out_channels * 4;
        let weight = vb.get_with_hints((in_channels, out_channels, 2, 2), "weight", uniform(fan_in))?;
        let bias = vb.get_with_hints(out_channels, "bias", uniform(fan_in))?;
        Ok(Self { weight, bias, kernels })
    }
}

impl Module for UpConv2x2 {
    /// `[B, in, H, W] -> [B, out, 2H, 2W]`
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        backend::upconv2x2(xs, &self.weight, &self.bias, &self.kernels)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device};
    use candle_nn::VarMap;

    /// Both paths, the kernel and candle's matrix product, against
    /// candle's own transposed convolution.
    #[test]
    fn upconv_equals_candle_conv_transpose() {
        let dev = Device::Cpu;
        for kernels in [KernelConfig::DEFAULT, KernelConfig::off()] {
            let vm = VarMap::new();
            let vb = VarBuilder::from_varmap(&vm, DType::F32, &dev);
            let up = UpConv2x2::new(3, 5, kernels, vb).unwrap();
            let x = Tensor::randn(0f32, 1.0, (2, 3, 4, 6), &dev).unwrap();
            let ours = up.forward(&x).unwrap();
            let reference = x
                .conv_transpose2d(&up.weight, 0, 0, 2, 1)
                .unwrap()
                .broadcast_add(&up.bias.reshape((1, 5, 1, 1)).unwrap())
                .unwrap();
            assert_eq!(ours.dims(), &[2, 5, 8, 12]);
            let diff = (ours - reference)
                .unwrap()
                .abs()
                .unwrap()
                .max_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap();
            assert!(diff < 1e-5, "{kernels:?}: {diff}");
        }
    }

    #[test]
    fn conv_keeps_the_spatial_size() {
        let dev = Device::Cpu;
        let vm = VarMap::new();
        let vb = VarBuilder::from_varmap(&vm, DType::F32, &dev);
        let block = ConvStack::new(1, &[4, 6], KernelConfig::DEFAULT, vb).unwrap();
        let x = Tensor::zeros((2, 1, 10, 7), DType::F32, &dev).unwrap();
        assert_eq!(block.forward_t(&x, true).unwrap().dims(), &[2, 6, 10, 7]);
        let names: std::collections::BTreeSet<String> = vm.data().lock().unwrap().keys().cloned().collect();
        assert!(names.contains("0.conv.weight"));
        assert!(names.contains("1.bn.running_var"));
        assert_eq!(names.len(), 12);
    }
}
