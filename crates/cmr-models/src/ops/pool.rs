//! 2×2 max-pooling with indices and max-unpooling at those indices (SegNet).
//!
//! Each 2×2 window's elements are brought to a last axis of length 4 in
//! row-major window order, so that "first maximum wins" is PyTorch's rule
//! (it scans the window row by row and keeps the first strict maximum). The
//! chosen position is kept as a one-hot mask `[B, C, H/2, W/2, 4]`: pooling is
//! the sum of mask × values (its gradient reaches the chosen element only, as
//! in PyTorch, even under ties), and unpooling is mask × broadcast values.
//! Only comparisons, cumulative sums and products are used, so every device
//! runs it and the tie rule does not depend on a device's argmax. On the CPU
//! the kernels (`crate::backend`) do the same with the recorded positions
//! instead of masks.

use candle_core::{D, DType, Device, Result, Tensor};

/// Where each 2×2 window's maximum was, as returned by
/// [`max_pool2x2_with_indices`]: a one-hot mask from candle's ops, or the
/// positions the fast CPU kernel recorded.
#[derive(Clone, Debug)]
pub struct PoolIndices {
    repr: Repr,
}

#[derive(Clone, Debug)]
enum Repr {
    /// One-hot `[B, C, H/2, W/2, 4]` (values 0 or 1 in the input's dtype).
    Mask(Tensor),
    /// Flat `y·W + x` positions in the input plane (CPU).
    Argmax(cmr_kernels::Argmax, Device),
}

impl PoolIndices {
    /// The positions the CPU kernel recorded.
    pub fn from_argmax(argmax: cmr_kernels::Argmax, device: &Device) -> Self {
        Self {
            repr: Repr::Argmax(argmax, device.clone()),
        }
    }

    /// The kernel's positions, if these indices are those.
    pub fn argmax(&self) -> Option<&cmr_kernels::Argmax> {
        match &self.repr {
            Repr::Argmax(a, _) => Some(a),
            Repr::Mask(_) => None,
        }
    }

    /// The one-hot mask `[B, C, H/2, W/2, 4]` of each window's maximum
    /// (row-major window order).
    pub fn mask(&self) -> Result<Tensor> {
        match &self.repr {
            Repr::Mask(m) => Ok(m.clone()),
            Repr::Argmax(a, dev) => {
                let (b, c, h, w) = a.input_dims();
                let (h2, w2) = (h / 2, w / 2);
                let mut m = vec![0f32; b * c * h2 * w2 * 4];
                a.with_positions(|pos| {
                    for (o, &p) in pos.iter().enumerate() {
                        let (oy, ox) = ((o / w2) % h2, o % w2);
                        let (y, x) = (p as usize / w, p as usize % w);
                        m[o * 4 + (y - 2 * oy) * 2 + (x - 2 * ox)] = 1.0;
                    }
                });
                Tensor::from_vec(m, (b, c, h2, w2, 4), dev)
            }
        }
    }

    /// The flat `y·W + x` index of each window's maximum, as PyTorch's
    /// `MaxPool2d(2, return_indices=True)` reports it: `[B, C, H/2, W/2]` u32.
    pub fn flat_indices(&self) -> Result<Tensor> {
        if let Repr::Argmax(a, dev) = &self.repr {
            let (b, c, h, w) = a.input_dims();
            let pos = a.with_positions(|p| p.to_vec());
            return Tensor::from_vec(pos, (b, c, h / 2, w / 2), dev);
        }
        let mask = self.mask()?;
        let (_, _, h2, w2, _) = mask.dims5()?;
        let dev = mask.device();
        // position in the window, 0..4 row-major
        let pos = mask.argmax(D::Minus1)?.to_dtype(DType::F64)?;
        let dy = (&pos / 2.0)?.floor()?;
        let dx = (&pos - (&dy * 2.0)?)?;
        let rows = (Tensor::arange(0f64, h2 as f64, dev)? * 2.0)?.reshape((1, 1, h2, 1))?;
        let cols = (Tensor::arange(0f64, w2 as f64, dev)? * 2.0)?.reshape((1, 1, 1, w2))?;
        let y = dy.broadcast_add(&rows)?;
        let x = dx.broadcast_add(&cols)?;
        ((y * (2 * w2) as f64)? + x)?.to_dtype(DType::U32)
    }
}

/// `[B, C, H, W] -> [B, C, H/k, k, W/k, k] -> [B, C, H/k, W/k, k·k]`
fn windows(xs: &Tensor, k: usize) -> Result<Tensor> {
    let (b, c, h, w) = xs.dims4()?;
    if k == 0 || h % k != 0 || w % k != 0 {
        candle_core::bail!("{k}×{k} max-pool needs a height and width divisible by {k}, got {h}×{w}");
    }
    xs.reshape((b, c, h / k, k, w / k, k))?
        .permute((0, 1, 2, 4, 3, 5))?
        .reshape((b, c, h / k, w / k, k * k))
}

/// Windows `[…, k·k]` → (pooled values, one-hot mask of the first maximum).
fn first_max(win: &Tensor) -> Result<(Tensor, Tensor)> {
    let detached = win.detach();
    let max = detached.max_keepdim(D::Minus1)?;
    let is_max = detached.broadcast_eq(&max)?.to_dtype(win.dtype())?;
    // The first maximum is the one where the running count of maxima is 1.
    let first = is_max.cumsum(D::Minus1)?.eq(1.0)?.to_dtype(win.dtype())?;
    let mask = (is_max * first)?;
    let pooled = (win * &mask)?.sum(D::Minus1)?;
    Ok((pooled, mask))
}

/// 2×2 max-pooling, stride 2, returning the pooled values `[B, C, H/2, W/2]`
/// and where each maximum was. Ties go to the first position in row-major
/// window order. From candle's ops alone (every device).
pub fn max_pool2x2_with_indices(xs: &Tensor) -> Result<(Tensor, PoolIndices)> {
    let (pooled, mask) = first_max(&windows(xs, 2)?)?;
    Ok((pooled, PoolIndices { repr: Repr::Mask(mask) }))
}

/// `k×k` max-pooling with stride `k`, as PyTorch's `MaxPool2d(k)`: the
/// gradient of each window goes to its first maximum only (candle's own
/// `max_pool2d` splits it among ties). From candle's ops alone (every
/// device).
pub fn max_pool(xs: &Tensor, k: usize) -> Result<Tensor> {
    if k == 1 {
        return Ok(xs.clone());
    }
    Ok(first_max(&windows(xs, k)?)?.0)
}

/// Max-unpooling: put each value of `[B, C, H/2, W/2]` at its window's stored
/// position in a zero `[B, C, H, W]`. Differentiable w.r.t. `xs`.
pub fn max_unpool2x2(xs: &Tensor, indices: &PoolIndices) -> Result<Tensor> {
    let (b, c, h2, w2) = xs.dims4()?;
    let mask = &indices.mask()?.to_device(xs.device())?.to_dtype(xs.dtype())?;
    if mask.dims() != [b, c, h2, w2, 4] {
        candle_core::bail!(
            "max-unpool: values {:?} do not match pool indices {:?}",
            xs.dims(),
            mask.dims()
        );
    }
    xs.unsqueeze(4)?
        .broadcast_mul(mask)?
        .reshape((b, c, h2, w2, 2, 2))?
        .permute((0, 1, 2, 4, 3, 5))?
        .reshape((b, c, 2 * h2, 2 * w2))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::{self, KernelConfig};
    use candle_core::{Device, Var};
    use cmr_kernels::testing::{FiniteDiff, assert_gradient};

    fn t(v: &[f32], h: usize, w: usize) -> Tensor {
        Tensor::from_vec(v.to_vec(), (1, 1, h, w), &Device::Cpu).unwrap()
    }

    fn flat(t: &Tensor) -> Vec<f32> {
        t.flatten_all().unwrap().to_vec1().unwrap()
    }

    #[test]
    fn pool_and_unpool_by_hand() {
        #[rustfmt::skip]
        let x = t(&[
            1., 5., 0., 0.,
            3., 2., 0., 7.,
            4., 4., 9., 1.,
            4., 4., 9., 9.,
        ], 4, 4);
        let (p, idx) = max_pool2x2_with_indices(&x).unwrap();
        assert_eq!(flat(&p), vec![5., 7., 4., 9.]);
        // PyTorch: indices [[1, 7], [8, 10]] (ties pick the first in row-major order)
        assert_eq!(
            idx.flat_indices()
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1::<u32>()
                .unwrap(),
            vec![1, 7, 8, 10]
        );
        let u = max_unpool2x2(&p, &idx).unwrap();
        #[rustfmt::skip]
        let expected = vec![
            0., 5., 0., 0.,
            0., 0., 0., 7.,
            4., 0., 9., 0.,
            0., 0., 0., 0.,
        ];
        assert_eq!(flat(&u), expected);
    }

    #[test]
    fn all_zero_windows_pick_exactly_one() {
        let x = t(&[0.; 16], 4, 4);
        let (_, idx) = max_pool2x2_with_indices(&x).unwrap();
        let m = flat(&idx.mask().unwrap());
        for w in m.chunks(4) {
            assert_eq!(w, [1., 0., 0., 0.]);
        }
        // and a tie that is not at the first position
        let x = t(&[0., 3., 3., 3.], 2, 2);
        let (_, idx) = max_pool2x2_with_indices(&x).unwrap();
        assert_eq!(flat(&idx.mask().unwrap()), vec![0., 1., 0., 0.]);
    }

    #[test]
    fn larger_windows_and_first_max_gradient() {
        #[rustfmt::skip]
        let x = t(&[
            1., 2., 0., 0.,
            3., 9., 0., 5.,
            9., 0., 1., 1.,
            0., 0., 5., 0.,
        ], 4, 4);
        let p = first_max(&windows(&x, 4).unwrap()).unwrap().0;
        assert_eq!(flat(&p), vec![9.]);
        let v = Var::from_tensor(&x).unwrap();
        let g = first_max(&windows(v.as_tensor(), 4).unwrap())
            .unwrap()
            .0
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        let g = flat(g.get(v.as_tensor()).unwrap());
        // two nines: the first in row-major order takes the whole gradient
        assert_eq!(g.iter().sum::<f32>(), 1.0);
        assert_eq!(g[5], 1.0);
        assert!(windows(&x, 3).is_err());
    }

    #[test]
    fn odd_sizes_are_rejected() {
        assert!(max_pool2x2_with_indices(&t(&[0.; 6], 2, 3)).is_err());
    }

    /// Finite differences in f64 of `sum(w · unpool(pool(x) · a))` w.r.t. `x`
    /// (through the pooled values) and w.r.t. the unpooled values.
    #[test]
    fn gradients_match_finite_differences() {
        let dev = Device::Cpu;
        let shape = (2, 3, 4, 6);
        // Distinct values so that a small step never changes which is the maximum.
        let base: Vec<f64> = (0..144).map(|i| ((i * 37) % 144) as f64 * 0.1).collect();
        let x = Var::from_tensor(&Tensor::from_vec(base.clone(), shape, &dev).unwrap()).unwrap();
        let w = Tensor::randn(0f64, 1.0, shape, &dev).unwrap();
        let f = |t: &Tensor| -> Tensor {
            let (p, idx) = max_pool2x2_with_indices(t).unwrap();
            let v = (p.sqr().unwrap() * 0.5).unwrap();
            (max_unpool2x2(&v, &idx).unwrap() * &w).unwrap().sum_all().unwrap()
        };
        let grads = f(x.as_tensor()).backward().unwrap();
        let g = grads
            .get(x.as_tensor())
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f64>()
            .unwrap();
        let fv = |v: &[f64]| {
            f(&Tensor::from_slice(v, shape, &dev).unwrap())
                .to_scalar::<f64>()
                .unwrap()
        };
        assert_gradient(
            "dx",
            fv,
            &base,
            &g,
            FiniteDiff {
                eps: 1e-5,
                tol: 1e-6,
                floor: 1.0,
            },
            0..base.len(),
        );
        let nonzero = g.iter().filter(|v| **v != 0.0).count();
        assert_eq!(nonzero, 36, "one element per window carries the gradient");
    }

    #[test]
    fn tied_gradient_goes_to_the_first_position_only() {
        let dev = Device::Cpu;
        let x = Var::from_tensor(&Tensor::from_vec(vec![2f32, 2., 2., 1.], (1, 1, 2, 2), &dev).unwrap()).unwrap();
        let (p, _) = max_pool2x2_with_indices(x.as_tensor()).unwrap();
        let g = p.sum_all().unwrap().backward().unwrap();
        assert_eq!(flat(g.get(x.as_tensor()).unwrap()), vec![1., 0., 0., 0.]);
    }

    /// The fast kernels against the composite path, on data with many ties:
    /// pooled values, masks, flat indices, the un-pooled result, and the
    /// gradient through pool → scale → un-pool, all exactly equal.
    #[test]
    fn fast_pool_and_unpool_equal_the_reference() {
        let dev = Device::Cpu;
        let x = Tensor::rand(0f32, 3.0, (2, 3, 8, 6), &dev).unwrap().floor().unwrap();
        let v = Var::from_tensor(&x).unwrap();
        let probe = Tensor::randn(0f32, 1.0, (2, 3, 8, 6), &dev).unwrap();
        let scale = Tensor::randn(0f32, 1.0, (2, 3, 4, 3), &dev).unwrap();
        let f = |t: &Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let run = |fast: bool| {
            let kernels = if fast {
                KernelConfig::DEFAULT
            } else {
                KernelConfig::off()
            };
            let (p, idx) = backend::max_pool2x2_with_indices(v.as_tensor(), &kernels).unwrap();
            assert_eq!(matches!(idx.repr, Repr::Argmax(..)), fast);
            let u = backend::max_unpool2x2(&(&p * &scale).unwrap(), &idx, &kernels).unwrap();
            let g = (&u * &probe).unwrap().sum_all().unwrap().backward().unwrap();
            let flat_idx = idx
                .flat_indices()
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1::<u32>()
                .unwrap();
            (
                f(&p),
                f(&idx.mask().unwrap()),
                flat_idx,
                f(&u),
                f(g.get(v.as_tensor()).unwrap()),
            )
        };
        assert_eq!(run(true), run(false));
    }
}
