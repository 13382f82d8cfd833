//! Building blocks shared by the three networks: 3×3 convolution with bias,
//! BatchNorm, conv-BN-ReLU stacks, 2×2 stride-2 transposed convolution.
//!
//! Each block asks its `VarBuilder` for tensors with PyTorch's default
//! initialisation as the hint (uniform ±1/√fan_in for weights and biases,
//! BatchNorm weight 1 and bias 0), so that a seeded backend reproduces the
//! reference networks' initial distribution.

use candle_core::{Module, ModuleT, Result, Tensor, Var};
use candle_nn::{BatchNorm, Init, VarBuilder};

use crate::fast;

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
    padding: usize,
}

impl Conv {
    pub fn new(in_channels: usize, out_channels: usize, kernel: usize, vb: VarBuilder) -> Result<Self> {
        let fan_in = in_channels * kernel * kernel;
        let weight = vb.get_with_hints((out_channels, in_channels, kernel, kernel), "weight", uniform(fan_in))?;
        let bias = vb.get_with_hints(out_channels, "bias", uniform(fan_in))?;
        Ok(Self {
            weight,
            bias,
            padding: kernel / 2,
        })
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
        if fast::applies(xs) {
            return fast::conv2d(xs, &self.weight, &self.bias);
        }
        let ys = xs.conv2d(&self.weight, self.padding, 1, 1, 1)?;
        ys.broadcast_add(&self.bias.reshape((1, (), 1, 1))?)
    }
}

/// BatchNorm over channels (eps 1e-5, momentum 0.1, affine). Weights:
/// `weight`, `bias`, and the running statistics `running_mean`,
/// `running_var`, which are state, not parameters.
///
/// Wraps candle-nn's `BatchNorm` (the reference path) and keeps handles on
/// the same tensors for the fused fast path.
#[derive(Clone, Debug)]
pub struct BatchNorm2d {
    reference: BatchNorm,
    weight: Tensor,
    bias: Tensor,
    running_mean: Var,
    running_var: Var,
}

impl BatchNorm2d {
    pub fn new(channels: usize, vb: VarBuilder) -> Result<Self> {
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
        })
    }

    /// Inference-mode BatchNorm as a per-channel affine map `x·scale + shift`
    /// (running statistics folded in), as differentiable tensors `[C]`.
    pub fn folded(&self) -> Result<(Tensor, Tensor)> {
        let scale = self.weight.div(&(self.running_var.as_tensor() + BN_EPS)?.sqrt()?)?;
        let shift = (&self.bias - self.running_mean.as_tensor().mul(&scale)?)?;
        Ok((scale, shift))
    }

    /// BatchNorm then ReLU: `[B, C, H, W] -> [B, C, H, W]`. In training mode
    /// the batch statistics normalise and update the running ones.
    pub fn forward_relu(&self, xs: &Tensor, train: bool) -> Result<Tensor> {
        if !fast::applies(xs) {
            return self.reference.forward_t(xs, train)?.relu();
        }
        if !train {
            return fast::bn_relu_eval(
                xs,
                &self.weight,
                &self.bias,
                self.running_mean.as_tensor(),
                self.running_var.as_tensor(),
                BN_EPS,
            );
        }
        let (ys, stats) = fast::bn_relu_train(xs, &self.weight, &self.bias, BN_EPS)?;
        self.update_running(&stats)?;
        Ok(ys)
    }

    /// Move the running statistics towards a training batch's (PyTorch's
    /// rule: `(1 − momentum)·old + momentum·batch`, unbiased variance).
    fn update_running(&self, stats: &fast::BnStats) -> Result<()> {
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
    pub fn new(in_channels: usize, out_channels: usize, vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            conv: Conv::new(in_channels, out_channels, 3, vb.pp("conv"))?,
            bn: BatchNorm2d::new(out_channels, vb.pp("bn"))?,
        })
    }
}

impl ModuleT for ConvBnRelu {
    /// `[B, in, H, W] -> [B, out, H, W]`
    fn forward_t(&self, xs: &Tensor, train: bool) -> Result<Tensor> {
        if fast::applies(xs) {
            return self.fast_forward(xs, 1, train);
        }
        self.bn.forward_relu(&self.conv.forward(xs)?, train)
    }
}

impl ConvBnRelu {
    /// [`ModuleT::forward_t`] of `xs` bilinearly up-sampled `factor` times
    /// (`align_corners = false`): `[B, in, H, W] -> [B, out, H·factor,
    /// W·factor]`. On the fast path the convolution runs at `xs`'s resolution
    /// and the up-sampled input is never made (`fast::upsampled_conv2d_affine_relu`;
    /// `CMR_UPSAMPLED=0` turns that off).
    pub fn forward_upsampled(&self, xs: &Tensor, factor: usize, train: bool) -> Result<Tensor> {
        if factor > 1 && fast::applies(xs) && fast::upsampled::enabled() {
            return self.fast_forward(xs, factor, train);
        }
        self.forward_t(&crate::ops::upsample_bilinear(xs, factor)?, train)
    }

    /// The layer on the fast CPU kernels, of `xs` up-sampled `factor` times
    /// (1: as it is). Inference: BatchNorm (running statistics) and ReLU
    /// applied to each image's output while it is in cache. Training: the
    /// whole layer as one op (see `fast::conv_bn_relu_train`).
    fn fast_forward(&self, xs: &Tensor, factor: usize, train: bool) -> Result<Tensor> {
        let conv = &self.conv;
        if !train {
            let (scale, shift) = self.bn.folded()?;
            return fast::upsampled_conv2d_affine_relu(xs, factor, &conv.weight, &conv.bias, &scale, &shift);
        }
        let (ys, stats) = fast::upsampled_conv_bn_relu_train(
            xs,
            factor,
            &conv.weight,
            &conv.bias,
            &self.bn.weight,
            &self.bn.bias,
            BN_EPS,
        )?;
        self.bn.update_running(&stats)?;
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
    pub fn new(in_channels: usize, widths: &[usize], vb: VarBuilder) -> Result<Self> {
        let mut layers = Vec::with_capacity(widths.len());
        let mut c = in_channels;
        for (i, &w) in widths.iter().enumerate() {
            layers.push(ConvBnRelu::new(c, w, vb.pp(i))?);
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
///
/// On the CPU fast path, one custom op (`fast::upconv2x2`); otherwise one
/// matrix product, `[B·H·W, in] × [in, out·4]`, then a rearrangement of the
/// blocks, both differentiable on every device.
#[derive(Clone, Debug)]
pub struct UpConv2x2 {
    weight: Tensor,
    bias: Tensor,
    out_channels: usize,
}

impl UpConv2x2 {
    pub fn new(in_channels: usize, out_channels: usize, vb: VarBuilder) -> Result<Self> {
        // PyTorch computes the fan-in of a transposed conv from weight.size(1).
        let fan_in = out_channels * 4;
        let weight = vb.get_with_hints((in_channels, out_channels, 2, 2), "weight", uniform(fan_in))?;
        let bias = vb.get_with_hints(out_channels, "bias", uniform(fan_in))?;
        Ok(Self {
            weight,
            bias,
            out_channels,
        })
    }
}

impl Module for UpConv2x2 {
    /// `[B, in, H, W] -> [B, out, 2H, 2W]`
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        if fast::applies(xs) {
            return fast::upconv2x2(xs, &self.weight, &self.bias);
        }
        let (b, cin, h, w) = xs.dims4()?;
        let cout = self.out_channels;
        // [B, in, H, W] -> [B·H·W, in]
        let x = xs.permute((0, 2, 3, 1))?.reshape((b * h * w, cin))?;
        // [in, out, 2, 2] -> [in, out·4]
        let k = self.weight.reshape((cin, cout * 4))?;
        // [B·H·W, out·4] -> [B, H, W, out, 2, 2] -> [B, out, H, 2, W, 2]
        let y = x
            .matmul(&k)?
            .reshape((b, h, w, cout, 2, 2))?
            .permute((0, 3, 1, 4, 2, 5))?;
        y.reshape((b, cout, 2 * h, 2 * w))?
            .broadcast_add(&self.bias.reshape((1, cout, 1, 1))?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device};
    use candle_nn::VarMap;

    #[test]
    fn upconv_equals_candle_conv_transpose() {
        let dev = Device::Cpu;
        let vm = VarMap::new();
        let vb = VarBuilder::from_varmap(&vm, DType::F32, &dev);
        let up = UpConv2x2::new(3, 5, vb).unwrap();
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
        assert!(diff < 1e-5, "{diff}");
    }

    #[test]
    fn conv_keeps_the_spatial_size() {
        let dev = Device::Cpu;
        let vm = VarMap::new();
        let vb = VarBuilder::from_varmap(&vm, DType::F32, &dev);
        let block = ConvStack::new(1, &[4, 6], vb).unwrap();
        let x = Tensor::zeros((2, 1, 10, 7), DType::F32, &dev).unwrap();
        assert_eq!(block.forward_t(&x, true).unwrap().dims(), &[2, 6, 10, 7]);
        let names: std::collections::BTreeSet<String> = vm.data().lock().unwrap().keys().cloned().collect();
        assert!(names.contains("0.conv.weight"));
        assert!(names.contains("1.bn.running_var"));
        assert_eq!(names.len(), 12);
    }
}
