//! Convolution, training-mode BatchNorm and ReLU as one custom op.
//!
//! The layer has five tensors (input, conv weight and bias, BatchNorm weight
//! and bias) and candle's custom ops take three, so the three per-channel
//! vectors travel packed as `[bias; γ; β]` (`3·Cout`): a `cat` whose backward
//! splits the gradient again. One op instead of a convolution followed by a
//! BatchNorm+ReLU removes a graph node per layer, and with it candle's
//! gradient accumulation for the convolution's output (a zero tensor and an
//! addition the size of the activation): the BatchNorm backward hands its
//! result straight to the convolution's.
//!
//! The convolution's output `z` (BatchNorm's input) is kept by the op for the
//! backward pass, as the separate ops kept it as a graph node.

use std::sync::{Arc, Mutex};

use candle_core::{CpuStorage, CustomOp3, Layout, Result, Shape, Tensor};

use crate::bn::{BnStats, normalise_relu, relu_backward, statistics};
use crate::conv::{self, Source, source_forward};
use crate::cpu::fresh;
use crate::gemm::Epilogue;
use crate::{KernelConfig, slice};

/// What the forward pass leaves for the backward one.
struct Saved {
    z: Vec<f32>,
    stats: BnStats,
}

struct ConvBnReluTrain {
    source: Source,
    eps: f64,
    saved: Arc<Mutex<Option<Saved>>>,
    cfg: KernelConfig,
}

impl CustomOp3 for ConvBnReluTrain {
    fn name(&self) -> &'static str {
        "cmr-conv-bn-relu-train"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (b, cin, h, w) = l1.shape().dims4()?;
        let (cout, _, k, _) = l2.shape().dims4()?;
        let packed = slice(s3, l3)?;
        let (bias, gamma, beta) = (&packed[..cout], &packed[cout..2 * cout], &packed[2 * cout..]);
        let (ho, wo) = self.source.out_hw(h, w);
        let hw = ho * wo;
        let (x, weight) = (slice(s1, l1)?, slice(s2, l2)?);
        let epi = Epilogue::bias(bias);
        // SAFETY: `source_forward` writes every output value before reading it.
        let z = unsafe {
            fresh(b * cout * hw, |z| {
                source_forward(self.source, x, (b, cin, h, w), weight, (cout, k), epi, z, &self.cfg)
            })
        };
        let simd = self.cfg.simd;
        let stats = statistics(simd, &z, b, cout, hw, self.eps);
        // SAFETY: `normalise_relu` writes every plane in full, reading none.
        let out = unsafe {
            fresh(z.len(), |out| {
                normalise_relu(simd, &z, out, cout, hw, &stats, gamma, beta)
            })
        };
        *self.saved.lock().expect("saved lock") = Some(Saved { z, stats });
        Ok((CpuStorage::F32(out), Shape::from((b, cout, ho, wo))))
    }

    fn bwd(
        &self,
        x: &Tensor,
        weight: &Tensor,
        packed: &Tensor,
        y: &Tensor,
        dy: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (b, cout, h, w) = y.dims4()?;
        let params = packed.to_vec1::<f32>()?;
        let (gamma, beta) = (&params[cout..2 * cout], &params[2 * cout..]);
        let dz = {
            let saved = self.saved.lock().expect("saved lock");
            let Some(saved) = saved.as_ref() else {
                candle_core::bail!("conv-bn-relu backward before its forward")
            };
            crate::with_data(dy, |gs| {
                relu_backward(self.cfg.simd, &saved.z, gs, (b, cout, h * w), &saved.stats, gamma, beta)
            })?
        };
        let (dz, dgamma, dbeta) = dz;
        conv::backward(self.source, x, weight, &dz, Some((dgamma, dbeta)), &self.cfg)
    }
}

/// `relu(BatchNorm(conv(x, weight) + bias))` in training mode (batch
/// statistics), with the batch statistics returned for the running
/// estimates: `x [B, Cin, H, W]`, `weight [Cout, Cin, k, k]` (k odd, padding
/// `k / 2`), `bias`, `gamma`, `beta` `[Cout]`. CPU and f32 only; see
/// [`KernelConfig::applies`].
pub fn conv_bn_relu_train(
    x: &Tensor,
    weight: &Tensor,
    bias: &Tensor,
    gamma: &Tensor,
    beta: &Tensor,
    eps: f64,
    cfg: &KernelConfig,
) -> Result<(Tensor, BnStats)> {
    train_of(Source::Input, x, weight, bias, gamma, beta, eps, cfg)
}

/// [`conv_bn_relu_train`] of `x` bilinearly up-sampled `factor` times
/// (`align_corners = false`, as [`crate::upsample_bilinear`]): `x [B, Cin, H,
/// W]` → `[B, Cout, H·factor, W·factor]`, the convolution and its gradients
/// computed at `x`'s resolution (`upsampled.rs`), or, with `cfg.upsampled`
/// off, on the up-sampled input.
#[allow(clippy::too_many_arguments)]
pub fn upsampled_conv_bn_relu_train(
    x: &Tensor,
    factor: usize,
    weight: &Tensor,
    bias: &Tensor,
    gamma: &Tensor,
    beta: &Tensor,
    eps: f64,
    cfg: &KernelConfig,
) -> Result<(Tensor, BnStats)> {
    let source = Source::upsampled(factor)?;
    if source != Source::Input && !cfg.upsampled {
        let up = crate::upsample_bilinear(x, factor, cfg)?;
        return train_of(Source::Input, &up, weight, bias, gamma, beta, eps, cfg);
    }
    train_of(source, x, weight, bias, gamma, beta, eps, cfg)
}

#[allow(clippy::too_many_arguments)]
fn train_of(
    source: Source,
    x: &Tensor,
    weight: &Tensor,
    bias: &Tensor,
    gamma: &Tensor,
    beta: &Tensor,
    eps: f64,
    cfg: &KernelConfig,
) -> Result<(Tensor, BnStats)> {
    conv::check_shapes(x, weight)?;
    let packed = conv::pack_channels(weight.dim(0)?, [("bias", bias), ("gamma", gamma), ("beta", beta)], cfg)?;
    let saved = Arc::new(Mutex::new(None));
    let op = ConvBnReluTrain {
        source,
        eps,
        saved: saved.clone(),
        cfg: *cfg,
    };
    let y = crate::tape::apply3(
        [x, weight, &packed],
        [&x.contiguous()?, &weight.contiguous()?, &packed],
        op,
    )?;
    let stats = saved.lock().expect("saved lock").as_ref().map(|s| s.stats.clone());
    match stats {
        Some(s) => Ok((y, s)),
        None => candle_core::bail!("conv-bn-relu forward did not record its statistics"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::KernelConfig;

    const CFG: &KernelConfig = &KernelConfig::DEFAULT;
    use crate::testing::{FiniteDiff, assert_gradient, fixed_values, max_rel, narrow, off_the_kink, widen};
    use candle_core::{Device, ModuleT, Var};

    /// candle's own ops: conv2d + bias, candle-nn's BatchNorm (its output is
    /// the pre-activation, returned first), relu.
    fn reference(
        x: &Tensor,
        w: &Tensor,
        b: &Tensor,
        gamma: &Tensor,
        beta: &Tensor,
    ) -> (Tensor, Tensor, candle_nn::BatchNorm) {
        let (c, _, k, _) = w.dims4().unwrap();
        let dev = x.device();
        let bn = candle_nn::BatchNorm::new_with_momentum(
            c,
            Tensor::zeros(c, candle_core::DType::F32, dev).unwrap(),
            Tensor::ones(c, candle_core::DType::F32, dev).unwrap(),
            gamma.clone(),
            beta.clone(),
            1e-5,
            0.1,
        )
        .unwrap();
        let z = x
            .conv2d(w, k / 2, 1, 1, 1)
            .unwrap()
            .broadcast_add(&b.reshape((1, (), 1, 1)).unwrap())
            .unwrap();
        let pre = bn.forward_t(&z, true).unwrap();
        let y = pre.relu().unwrap();
        (pre, y, bn)
    }

    fn max_abs(t: &Tensor) -> f32 {
        t.abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap()
    }

    /// Values, running statistics and all five gradients against candle's
    /// ops, on both convolution methods, batches below and above the thread
    /// count, and an input that is not a variable (no input gradient).
    #[test]
    fn matches_candle_values_statistics_and_gradients() {
        let dev = Device::Cpu;
        for &(bsz, cin, cout, h, w, k, input_var) in &[
            (1, 1, 4, 9, 7, 3, false),
            (3, 5, 6, 8, 11, 3, true),
            (8, 16, 16, 24, 24, 3, true),
            (4, 3, 2, 6, 4, 5, true),
            (3, 4, 6, 33, 40, 3, true),
            (2, 1, 8, 36, 32, 3, false),
        ] {
            let shape = (bsz, cin, cout, h, w, k);
            let x0 = (Tensor::randn(0f32, 1.0, (bsz, cin, h, w), &dev).unwrap() + 0.3).unwrap();
            let xv = Var::from_tensor(&x0).unwrap();
            let x = if input_var { xv.as_tensor().clone() } else { x0 };
            let wt = Var::from_tensor(&Tensor::randn(0f32, 0.3, (cout, cin, k, k), &dev).unwrap()).unwrap();
            let bias = Var::from_tensor(&Tensor::randn(0f32, 0.3, cout, &dev).unwrap()).unwrap();
            let gamma = Var::from_tensor(&Tensor::randn(1f32, 0.3, cout, &dev).unwrap()).unwrap();
            let beta = Var::from_tensor(&Tensor::randn(0f32, 0.3, cout, &dev).unwrap()).unwrap();
            let probe = Tensor::randn(0f32, 1.0, (bsz, cout, h, w), &dev).unwrap();
            let (fast, stats) = conv_bn_relu_train(&x, &wt, &bias, &gamma, &beta, 1e-5, CFG).unwrap();
            let (pre, slow, bn) = reference(&x, &wt, &bias, &gamma, &beta);
            let probe = off_the_kink(&pre, &probe);
            assert!(
                max_rel(&fast, &slow) < 1e-4,
                "{shape:?} forward {}",
                max_rel(&fast, &slow)
            );
            let rm: Vec<f32> = stats.mean.iter().map(|m| 0.1 * m).collect();
            let rv: Vec<f32> = stats.var_unbiased.iter().map(|v| 0.9 + 0.1 * v).collect();
            let crm = bn.running_mean().to_vec1::<f32>().unwrap();
            let crv = bn.running_var().to_vec1::<f32>().unwrap();
            for c in 0..cout {
                assert!((rm[c] - crm[c]).abs() < 1e-5, "{shape:?} running mean {c}");
                assert!(
                    (rv[c] - crv[c]).abs() < 1e-4 * crv[c].abs().max(1.0),
                    "{shape:?} running var {c}"
                );
            }
            let gf = (&fast * &probe).unwrap().sum_all().unwrap().backward().unwrap();
            let gs = (&slow * &probe).unwrap().sum_all().unwrap().backward().unwrap();
            for (name, v) in [
                ("w", wt.as_tensor()),
                ("gamma", gamma.as_tensor()),
                ("beta", beta.as_tensor()),
            ] {
                let e = max_rel(gf.get(v).unwrap(), gs.get(v).unwrap());
                assert!(e < 1e-4, "{shape:?} d{name}: {e}");
            }
            // The bias cancels in the normalisation: both gradients are
            // rounding noise around zero, small against the weight's.
            let scale = max_abs(gs.get(wt.as_tensor()).unwrap());
            for g in [&gf, &gs] {
                let db = max_abs(g.get(bias.as_tensor()).unwrap());
                assert!(db <= 1e-4 * scale, "{shape:?} dbias {db} against dw {scale}");
            }
            if input_var {
                let e = max_rel(gf.get(xv.as_tensor()).unwrap(), gs.get(xv.as_tensor()).unwrap());
                assert!(e < 1e-4, "{shape:?} dx: {e}");
            } else {
                assert!(gf.get(&x).is_none(), "{shape:?}: gradient for a constant input");
            }
        }
    }

    /// Finite differences in f32 of the fused backward, through the input,
    /// the conv weight and γ.
    #[test]
    fn gradient_matches_finite_differences() {
        let dev = Device::Cpu;
        let (b, cin, cout, h, w) = (2, 2, 3, 5, 4);
        let x0: Vec<f32> = (0..b * cin * h * w)
            .map(|i| ((i * 37 % 23) as f32 - 11.0) / 7.0)
            .collect();
        let w0: Vec<f32> = (0..cout * cin * 9)
            .map(|i| ((i * 17 % 13) as f32 - 6.0) / 9.0)
            .collect();
        let g0 = [1.3f32, 0.7, 1.1];
        let bias = Tensor::new(&[0.1f32, -0.2, 0.3], &dev).unwrap();
        let beta = Tensor::new(&[0.2f32, -0.1, 0.05], &dev).unwrap();
        let probe = Tensor::from_vec(fixed_values(b * cout * h * w, 11), (b, cout, h, w), &dev).unwrap();
        let f = |xv: &[f32], wv: &[f32], gv: &[f32]| -> f64 {
            let x = Tensor::from_slice(xv, (b, cin, h, w), &dev).unwrap();
            let wt = Tensor::from_slice(wv, (cout, cin, 3, 3), &dev).unwrap();
            let gamma = Tensor::from_slice(gv, cout, &dev).unwrap();
            let (y, _) = conv_bn_relu_train(&x, &wt, &bias, &gamma, &beta, 1e-5, CFG).unwrap();
            f64::from((y * &probe).unwrap().sum_all().unwrap().to_scalar::<f32>().unwrap())
        };
        let xv = Var::from_tensor(&Tensor::from_slice(&x0, (b, cin, h, w), &dev).unwrap()).unwrap();
        let wv = Var::from_tensor(&Tensor::from_slice(&w0, (cout, cin, 3, 3), &dev).unwrap()).unwrap();
        let gv = Var::from_tensor(&Tensor::from_slice(&g0, cout, &dev).unwrap()).unwrap();
        let (y, _) = conv_bn_relu_train(&xv, &wv, &bias, &gv, &beta, 1e-5, CFG).unwrap();
        let g = (y * &probe).unwrap().sum_all().unwrap().backward().unwrap();
        let grad = |v: &Var| widen(&g.get(v).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap());
        let check = FiniteDiff {
            eps: 1e-3,
            tol: 2e-3,
            floor: 1.0,
        };
        let fx = |v: &[f64]| f(&narrow(v), &w0, &g0);
        assert_gradient("dx", fx, &widen(&x0), &grad(&xv), check, 0..x0.len());
        let fw = |v: &[f64]| f(&x0, &narrow(v), &g0);
        assert_gradient("dw", fw, &widen(&w0), &grad(&wv), check, 0..w0.len());
        let fg = |v: &[f64]| f(&x0, &w0, &narrow(v));
        assert_gradient("dgamma", fg, &widen(&g0), &grad(&gv), check, 0..g0.len());
    }
}
