//! Fast CPU kernels for cmr's training step and inference, as candle custom
//! ops with their own backward passes: convolution (stride 1, "same"
//! padding) by Winograd's minimal filtering, a direct AVX-512 micro-kernel
//! or packed GEMMs, BatchNorm fused with ReLU (training and inference), the
//! whole conv-BN-ReLU layer in training as one op, max-pooling, the 2×2
//! transposed convolution, bilinear up-sampling (and a convolution of an
//! up-sampled input at the input's resolution), and the losses in one op.
//! [`Tape`] runs a training step's backward pass over them.
//!
//! This crate knows candle and nothing of networks. It is layered bottom-up:
//! - the leaf layer, slices in and out, no candle: [`cpu`] (vector
//!   instructions, output buffers) and `gemm` (strided views, the GEMM,
//!   epilogues, work buffers);
//! - the algorithms, one file each, callable on slices: `im2col`,
//!   `shifted`, `direct`, `winograd`, `batched`, `upsampled`,
//!   `weight_grad`; `bn`, `pool`, `upsample`, `upconv`, `loss`;
//! - [`plan`], the one function that picks a convolution's algorithm for
//!   every pass;
//! - the candle custom ops on top (`conv`, `fused`, and the op in each of
//!   the other files), and the tape.
//!
//! Every op takes a [`KernelConfig`]: which kernels run is a value the
//! caller saves with its run, never a process-wide switch. The ops apply
//! to f32 tensors on the CPU only ([`KernelConfig::applies`]); elsewhere,
//! or with `enabled` off, callers use candle's own ops, which compute the
//! same functions.

pub mod amx;
pub mod cpu;
mod gemm;

mod batched;
mod bf16_conv;
mod direct;
mod im2col;
mod shifted;
mod upsampled;
mod weight_grad;
mod winograd;

mod bn;
mod concat;
mod loss;
mod pool;
mod upconv;
mod upsample;

pub mod plan;

mod config;
mod conv;
mod fused;
mod tape;

pub mod testing;

use candle_core::{CpuStorage, Layout, Result, Storage, Tensor};

pub use bn::{BnStats, bn_relu_eval, bn_relu_train};
pub use config::{Batched, Bf16Unit, KernelConfig, Precision, Simd, Winograd};
pub use conv::{conv2d, conv2d_affine_relu, conv2d_relu, upsampled_conv2d_affine_relu};
pub use cpu::keep_freed_memory;
pub use fused::{conv_bn_relu_train, upsampled_conv_bn_relu_train};
pub use loss::{LossSpec, fused_loss};
pub use plan::{Algorithm, ConvShape, Pass, Tile, plan};
pub use pool::{Argmax, max_pool, max_pool_with_argmax, max_unpool};
pub use tape::{Backward, Tape, add, cat, forward_backward, narrow, record, scale};
pub use upconv::upconv2x2;
pub use upsample::upsample_bilinear;

/// The contiguous f32 data of a custom op's CPU argument.
fn slice<'a>(s: &'a CpuStorage, l: &Layout) -> Result<&'a [f32]> {
    let all = s.as_slice::<f32>()?;
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(&all[a..b]),
        None => candle_core::bail!("fast kernels need contiguous inputs"),
    }
}

/// The four dimensions of a custom op's argument.
fn dims4(l: &Layout) -> Result<(usize, usize, usize, usize)> {
    l.shape().dims4()
}

/// Run `f` on the contiguous f32 data of a CPU tensor.
fn with_data<R>(t: &Tensor, f: impl FnOnce(&[f32]) -> R) -> Result<R> {
    let t = t.contiguous()?;
    let (storage, layout) = t.storage_and_layout();
    match &*storage {
        Storage::Cpu(cpu) => Ok(f(slice(cpu, layout)?)),
        _ => candle_core::bail!("fast kernels run on the CPU only"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::fixed_values;
    use candle_core::{Device, Var};

    fn var(shape: &[usize], seed: u64, scale: f32, offset: f32) -> Var {
        let n = shape.iter().product();
        let v: Vec<f32> = fixed_values(n, seed).iter().map(|x| x * scale + offset).collect();
        Var::from_tensor(&Tensor::from_vec(v, shape, &Device::Cpu).unwrap()).unwrap()
    }

    /// Every kernel in one small network (both convolution methods, the
    /// fused layer, BatchNorm+ReLU, pooling, un-pooling, up-sampling):
    /// output and gradients as flat vectors.
    fn run_all(cfg: &KernelConfig) -> Vec<Vec<f32>> {
        let x = var(&[3, 4, 36, 40], 1, 1.0, 0.0);
        let w1 = var(&[6, 4, 3, 3], 2, 0.3, 0.0);
        let b1 = var(&[6], 3, 0.3, 0.0);
        let gamma = var(&[6], 4, 0.3, 1.0);
        let beta = var(&[6], 5, 0.3, 0.0);
        let w2 = var(&[6, 6, 3, 3], 6, 0.3, 0.0);
        let w3 = var(&[5, 6, 3, 3], 7, 0.3, 0.0);
        let b3 = var(&[5], 8, 0.3, 0.0);
        let (y, _) = conv_bn_relu_train(&x, &w1, &b1, &gamma, &beta, 1e-5, cfg).unwrap();
        let (y, _) = bn_relu_train(&conv2d(&y, &w2, &b1, cfg).unwrap(), &gamma, &beta, 1e-5, cfg).unwrap();
        let (p, arg) = max_pool_with_argmax(&y, 2, cfg).unwrap();
        let z = conv2d_relu(&p, &w3, &b3, cfg).unwrap();
        let (z, arg2) = max_pool_with_argmax(&z, 2, cfg).unwrap();
        let out = (max_unpool(&z, &arg2, cfg).unwrap() + upsample_bilinear(&z, 2, cfg).unwrap()).unwrap();
        let _ = arg;
        let n = out.elem_count();
        let probe = Tensor::from_vec(fixed_values(n, 9), out.dims(), &Device::Cpu).unwrap();
        let grads = (&out * &probe).unwrap().sum_all().unwrap().backward().unwrap();
        let flat = |t: &Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let mut all = vec![flat(&out)];
        for v in [&x, &w1, &b1, &gamma, &beta, &w2, &w3, &b3] {
            all.push(flat(grads.get(v.as_tensor()).unwrap()));
        }
        all
    }

    /// glibc takes both settings (values out of its range would be refused).
    #[test]
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    fn allocator_keeps_freed_memory() {
        assert!(keep_freed_memory());
    }

    /// The kernels compiled for the widest vectors give the same bits as
    /// the baseline build, values and gradients.
    #[test]
    fn vector_width_does_not_change_results() {
        let wide = run_all(&KernelConfig::default());
        let base = run_all(&KernelConfig {
            simd: Simd::Baseline,
            ..KernelConfig::default()
        });
        assert_eq!(wide.len(), 9);
        for (i, (a, b)) in wide.iter().zip(&base).enumerate() {
            assert!(
                !a.is_empty() && a.iter().any(|v| *v != 0.0),
                "output {i} is empty or zero"
            );
            let same = a.iter().zip(b).all(|(x, y)| x.to_bits() == y.to_bits());
            assert!(same, "output {i} differs between vector widths");
        }
    }
}
