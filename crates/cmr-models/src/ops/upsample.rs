//! Bilinear up-sampling by an integer factor with `align_corners = false`
//! (PyTorch's `nn.Upsample(scale_factor=s, mode="bilinear")`), with a gradient.
//!
//! Bilinear interpolation is separable: `Y = A_h · X · A_wᵀ` for each
//! `[H, W]` plane, with fixed interpolation matrices `A_h` `[s·H, H]` and
//! `A_w` `[s·W, W]`. Two matrix products give the forward pass on every
//! device, and the gradient follows from candle's matmul backward.

use candle_core::{DType, Device, Result, Tensor};

/// The `[n·factor, n]` matrix of 1-D linear interpolation with
/// `align_corners = false`.
///
/// Output `i` samples the input at `src = (i + 0.5) / factor − 0.5`, clamped at
/// 0 below (as PyTorch does); it takes `1 − λ` of `⌊src⌋` and `λ` of
/// `min(⌊src⌋ + 1, n − 1)`, `λ = src − ⌊src⌋`.
pub fn bilinear_matrix(n: usize, factor: usize, dtype: DType, device: &Device) -> Result<Tensor> {
    let m = n * factor;
    let mut a = vec![0f64; m * n];
    for i in 0..m {
        let src = ((i as f64 + 0.5) / factor as f64 - 0.5).max(0.0);
        let i0 = (src.floor() as usize).min(n - 1);
        let i1 = (i0 + 1).min(n - 1);
        let lambda = src - i0 as f64;
        a[i * n + i0] += 1.0 - lambda;
        a[i * n + i1] += lambda;
    }
    Tensor::from_vec(a, (m, n), device)?.to_dtype(dtype)
}

/// Up-sample `[B, C, H, W]` to `[B, C, factor·H, factor·W]` bilinearly
/// (`align_corners = false`) by two matrix products, on every device.
pub fn upsample_bilinear(xs: &Tensor, factor: usize) -> Result<Tensor> {
    if factor == 1 {
        return Ok(xs.clone());
    }
    let (b, c, h, w) = xs.dims4()?;
    let (ho, wo) = (h * factor, w * factor);
    let a_h = bilinear_matrix(h, factor, xs.dtype(), xs.device())?;
    let a_w = bilinear_matrix(w, factor, xs.dtype(), xs.device())?;
    // Along W: [B·C·H, W] × [W, Wo] -> [B·C·H, Wo]
    let y = xs.reshape((b * c * h, w))?.matmul(&a_w.t()?)?;
    // Along H: [B·C, Wo, H] × [H, Ho] -> [B·C, Wo, Ho], then back to [B, C, Ho, Wo]
    let y = y.reshape((b * c, h, wo))?.transpose(1, 2)?.reshape((b * c * wo, h))?;
    let y = y.matmul(&a_h.t()?)?.reshape((b * c, wo, ho))?.transpose(1, 2)?;
    y.reshape((b, c, ho, wo))
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Var;
    use cmr_kernels::testing::{FiniteDiff, assert_gradient, fixed_values, widen};

    #[test]
    fn matrix_by_hand() {
        // n = 2, factor 2: src = -0.25 -> 0, 0.25, 0.75, 1.25 -> clamp
        let a = bilinear_matrix(2, 2, DType::F64, &Device::Cpu)
            .unwrap()
            .to_vec2::<f64>()
            .unwrap();
        assert_eq!(
            a,
            vec![vec![1.0, 0.0], vec![0.75, 0.25], vec![0.25, 0.75], vec![0.0, 1.0]]
        );
    }

    #[test]
    fn values_match_pytorch() {
        // torch.nn.functional.interpolate(torch.tensor([[[[1.,2.],[3.,4.]]]]),
        //     scale_factor=2, mode="bilinear", align_corners=False)
        let x = Tensor::new(&[[[[1f32, 2.], [3., 4.]]]], &Device::Cpu).unwrap();
        let y = upsample_bilinear(&x, 2)
            .unwrap()
            .squeeze(0)
            .unwrap()
            .squeeze(0)
            .unwrap()
            .to_vec2::<f32>()
            .unwrap();
        let expected = vec![
            vec![1.0, 1.25, 1.75, 2.0],
            vec![1.5, 1.75, 2.25, 2.5],
            vec![2.5, 2.75, 3.25, 3.5],
            vec![3.0, 3.25, 3.75, 4.0],
        ];
        assert_eq!(y, expected);
    }

    #[test]
    fn factor_four_matches_candle_forward() {
        let dev = Device::Cpu;
        let x = Tensor::randn(0f32, 1.0, (2, 3, 5, 6), &dev).unwrap();
        for factor in [2usize, 4, 8] {
            let ours = upsample_bilinear(&x, factor).unwrap();
            let theirs = x.upsample_bilinear2d(5 * factor, 6 * factor, false).unwrap();
            let d = (ours - theirs)
                .unwrap()
                .abs()
                .unwrap()
                .max_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap();
            assert!(d < 1e-5, "factor {factor}: {d}");
        }
    }

    /// The function checked, `Σ w·up(x)`, is linear in `x`: central
    /// differences have no truncation error at any step, and a step of 1e-3
    /// keeps their rounding error (about `|f|·2⁻⁵² / eps`, 1e-12 here) far
    /// below the bound. (A step of 1e-6 put it near 1e-9, at the bound for a
    /// small gradient value: with random inputs the test failed now and then.)
    /// Fixed inputs, so that a failure reproduces.
    #[test]
    fn gradient_matches_finite_differences() {
        let dev = Device::Cpu;
        let fixed = |n: usize, seed: u64| widen(&fixed_values(n, seed));
        let x = Var::from_tensor(&Tensor::from_vec(fixed(24, 11), (1, 2, 3, 4), &dev).unwrap()).unwrap();
        let weights = Tensor::from_vec(fixed(384, 12), (1, 2, 12, 16), &dev).unwrap();
        let f = |t: &Tensor| -> Tensor {
            (upsample_bilinear(t, 4).unwrap() * &weights)
                .unwrap()
                .sum_all()
                .unwrap()
        };
        let grads = f(x.as_tensor()).backward().unwrap();
        let g = grads
            .get(x.as_tensor())
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f64>()
            .unwrap();
        let base = x.as_tensor().flatten_all().unwrap().to_vec1::<f64>().unwrap();
        let fv = |v: &[f64]| {
            f(&Tensor::from_slice(v, (1, 2, 3, 4), &dev).unwrap())
                .to_scalar::<f64>()
                .unwrap()
        };
        assert_gradient(
            "dx",
            fv,
            &base,
            &g,
            FiniteDiff {
                eps: 1e-3,
                tol: 1e-6,
                floor: 1e-3,
            },
            0..base.len(),
        );
    }
}
