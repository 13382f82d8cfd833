//! Where the networks' ops meet the kernels: each function here runs the
//! fast CPU kernel of `cmr-kernels` where the [`KernelConfig`] applies (f32
//! on the CPU, kernels enabled), and otherwise the device-generic reference
//! (candle's ops and [`crate::ops`]), which computes the same function. The
//! blocks and networks call these and never name a kernel.

use candle_core::{ModuleT, Result, Tensor};
use candle_nn::BatchNorm;
pub use cmr_kernels::amx::{MatrixUnit, matrix_unit};
pub use cmr_kernels::{Batched, BnStats, KernelConfig, Precision, Simd, Winograd};

use crate::ops;

/// A convolution with bias, stride 1, padding `k / 2` (`weight [out, in,
/// k, k]`, `bias [out]`).
pub fn conv(xs: &Tensor, weight: &Tensor, bias: &Tensor, kernels: &KernelConfig) -> Result<Tensor> {
    if kernels.applies(xs) {
        return cmr_kernels::conv2d(xs, weight, bias, kernels);
    }
    let k = weight.dim(2)?;
    xs.conv2d(weight, k / 2, 1, 1, 1)?
        .broadcast_add(&bias.reshape((1, (), 1, 1))?)
}

/// The tensors of a BatchNorm layer: candle-nn's module (the reference)
/// and handles on its affine parameters and running statistics.
#[derive(Clone, Copy, Debug)]
pub struct BatchNormParts<'a> {
    pub reference: &'a BatchNorm,
    pub weight: &'a Tensor,
    pub bias: &'a Tensor,
    pub running_mean: &'a Tensor,
    pub running_var: &'a Tensor,
    pub eps: f64,
}

impl BatchNormParts<'_> {
    /// Inference-mode BatchNorm as a per-channel affine map `x·scale +
    /// shift` (running statistics folded in), as differentiable tensors
    /// `[C]`.
    fn folded(&self) -> Result<(Tensor, Tensor)> {
        let scale = self.weight.div(&(self.running_var + self.eps)?.sqrt()?)?;
        let shift = (self.bias - self.running_mean.mul(&scale)?)?;
        Ok((scale, shift))
    }
}

/// BatchNorm then ReLU. In training mode, also the batch statistics when the
/// kernel computed them (the caller moves its running statistics with
/// them; candle-nn's reference moves its own).
pub fn bn_relu(
    xs: &Tensor,
    bn: BatchNormParts,
    train: bool,
    kernels: &KernelConfig,
) -> Result<(Tensor, Option<BnStats>)> {
    if !kernels.applies(xs) {
        return Ok((bn.reference.forward_t(xs, train)?.relu()?, None));
    }
    if !train {
        let ys = cmr_kernels::bn_relu_eval(xs, bn.weight, bn.bias, bn.running_mean, bn.running_var, bn.eps, kernels)?;
        return Ok((ys, None));
    }
    let (ys, stats) = cmr_kernels::bn_relu_train(xs, bn.weight, bn.bias, bn.eps, kernels)?;
    Ok((ys, Some(stats)))
}

/// Convolution, BatchNorm and ReLU of `xs` bilinearly up-sampled `factor`
/// times (1: as it is). On the kernels the whole layer is one op (training)
/// or the convolution with BatchNorm applied to its output (inference), at
/// `xs`'s resolution where the configuration says so; elsewhere up-sampling,
/// convolution and BatchNorm one after the other.
pub fn conv_bn_relu(
    xs: &Tensor,
    factor: usize,
    (weight, bias): (&Tensor, &Tensor),
    bn: BatchNormParts,
    train: bool,
    kernels: &KernelConfig,
) -> Result<(Tensor, Option<BnStats>)> {
    if !kernels.applies(xs) {
        let up = upsample_bilinear(xs, factor, kernels)?;
        return bn_relu(&conv(&up, weight, bias, kernels)?, bn, train, kernels);
    }
    if !train {
        let (scale, shift) = bn.folded()?;
        let ys = cmr_kernels::upsampled_conv2d_affine_relu(xs, factor, weight, bias, &scale, &shift, kernels)?;
        return Ok((ys, None));
    }
    let (ys, stats) =
        cmr_kernels::upsampled_conv_bn_relu_train(xs, factor, weight, bias, bn.weight, bn.bias, bn.eps, kernels)?;
    Ok((ys, Some(stats)))
}

/// `ConvTranspose2d(kernel 2, stride 2)` with bias (`weight [in, out, 2,
/// 2]`): on the kernels one op, elsewhere one matrix product and a
/// rearrangement of the 2×2 blocks.
pub fn upconv2x2(xs: &Tensor, weight: &Tensor, bias: &Tensor, kernels: &KernelConfig) -> Result<Tensor> {
    if kernels.applies(xs) {
        return cmr_kernels::upconv2x2(xs, weight, bias, kernels);
    }
    let (b, cin, h, w) = xs.dims4()?;
    let cout = weight.dim(1)?;
    // [B, in, H, W] -> [B·H·W, in]
    let x = xs.permute((0, 2, 3, 1))?.reshape((b * h * w, cin))?;
    // [in, out, 2, 2] -> [in, out·4]
    let k = weight.reshape((cin, cout * 4))?;
    // [B·H·W, out·4] -> [B, H, W, out, 2, 2] -> [B, out, H, 2, W, 2]
    let y = x
        .matmul(&k)?
        .reshape((b, h, w, cout, 2, 2))?
        .permute((0, 3, 1, 4, 2, 5))?;
    y.reshape((b, cout, 2 * h, 2 * w))?
        .broadcast_add(&bias.reshape((1, cout, 1, 1))?)
}

/// Concatenation along `dim`, on the kernels' tape when training on them.
pub fn cat(parts: &[&Tensor], dim: usize, kernels: &KernelConfig) -> Result<Tensor> {
    if parts.iter().all(|p| kernels.applies(p)) {
        return cmr_kernels::cat(parts, dim, kernels);
    }
    Tensor::cat(parts, dim)
}

/// `a + b` (same shapes): a residual connection.
pub fn add(a: &Tensor, b: &Tensor, kernels: &KernelConfig) -> Result<Tensor> {
    if kernels.applies(a) && kernels.applies(b) {
        return cmr_kernels::add(a, b);
    }
    a + b
}

/// `x · factor`.
pub fn scale(xs: &Tensor, factor: f64, kernels: &KernelConfig) -> Result<Tensor> {
    if kernels.applies(xs) {
        return cmr_kernels::scale(xs, factor);
    }
    xs * factor
}

/// `k×k` max-pooling, stride `k`, the gradient to each window's first
/// maximum (PyTorch's `MaxPool2d(k)`).
pub fn max_pool(xs: &Tensor, k: usize, kernels: &KernelConfig) -> Result<Tensor> {
    if k == 1 {
        return Ok(xs.clone());
    }
    if kernels.applies(xs) {
        return cmr_kernels::max_pool(xs, k, kernels);
    }
    ops::max_pool(xs, k)
}

/// 2×2 max-pooling with where each maximum was (SegNet).
pub fn max_pool2x2_with_indices(xs: &Tensor, kernels: &KernelConfig) -> Result<(Tensor, ops::PoolIndices)> {
    if kernels.applies(xs) {
        let (pooled, argmax) = cmr_kernels::max_pool_with_argmax(xs, 2, kernels)?;
        return Ok((pooled, ops::PoolIndices::from_argmax(argmax, xs.device())));
    }
    ops::max_pool2x2_with_indices(xs)
}

/// Max-unpooling at the positions [`max_pool2x2_with_indices`] found.
pub fn max_unpool2x2(xs: &Tensor, indices: &ops::PoolIndices, kernels: &KernelConfig) -> Result<Tensor> {
    if let Some(argmax) = indices.argmax()
        && kernels.applies(xs)
    {
        return cmr_kernels::max_unpool(xs, argmax, kernels);
    }
    ops::max_unpool2x2(xs, indices)
}

/// Bilinear up-sampling by an integer factor (`align_corners = false`).
pub fn upsample_bilinear(xs: &Tensor, factor: usize, kernels: &KernelConfig) -> Result<Tensor> {
    if factor == 1 {
        return Ok(xs.clone());
    }
    if kernels.applies(xs) {
        return cmr_kernels::upsample_bilinear(xs, factor, kernels);
    }
    ops::upsample_bilinear(xs, factor)
}
