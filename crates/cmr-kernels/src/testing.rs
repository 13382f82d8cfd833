//! Test helpers shared by the op and kernel tests: relative error and
//! central-difference gradient checks.

use candle_core::{Device, Tensor};

/// `max |a − b| / max |b|` (the denominator at least 1e-6).
pub fn max_rel(a: &Tensor, b: &Tensor) -> f32 {
    let max_abs = |t: &Tensor| {
        t.abs()
            .and_then(|t| t.max_all())
            .and_then(|t| t.to_scalar::<f32>())
            .expect("f32 tensor")
    };
    let diff = (a - b).expect("same shapes");
    // A NaN anywhere (an output value a kernel left unwritten, in tests)
    // must not vanish in the maximum.
    let sum = diff.sum_all().and_then(|t| t.to_scalar::<f32>()).expect("f32 tensor");
    if sum.is_nan() {
        return f32::NAN;
    }
    max_abs(&diff) / max_abs(b).max(1e-6)
}

/// A central-difference check: step `eps`, and the bound
/// `|numeric − analytic| ≤ tol · max(|numeric|, floor)`.
#[derive(Clone, Copy, Debug)]
pub struct FiniteDiff {
    pub eps: f64,
    pub tol: f64,
    pub floor: f64,
}

/// Check `analytic` (the gradient of `f` at `x0`) by central differences at
/// the coordinates `indices`.
pub fn assert_gradient(
    what: &str,
    f: impl Fn(&[f64]) -> f64,
    x0: &[f64],
    analytic: &[f64],
    check: FiniteDiff,
    indices: impl IntoIterator<Item = usize>,
) {
    let FiniteDiff { eps, tol, floor } = check;
    for i in indices {
        let (mut plus, mut minus) = (x0.to_vec(), x0.to_vec());
        plus[i] += eps;
        minus[i] -= eps;
        let numeric = (f(&plus) - f(&minus)) / (2.0 * eps);
        assert!(
            (numeric - analytic[i]).abs() <= tol * numeric.abs().max(floor),
            "{what}[{i}]: analytic {} numeric {numeric}",
            analytic[i]
        );
    }
}

/// f32 values as f64.
pub fn widen(v: &[f32]) -> Vec<f64> {
    v.iter().map(|&x| f64::from(x)).collect()
}

/// f64 values as f32.
pub fn narrow(v: &[f64]) -> Vec<f32> {
    v.iter().map(|&x| x as f32).collect()
}

/// Deterministic pseudo-random values in [-1, 1) (candle's CPU generator
/// cannot be seeded): fixed probes keep finite-difference checks near ReLU
/// kinks reproducible.
pub fn fixed_values(n: usize, seed: u64) -> Vec<f32> {
    let mut s = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
    (0..n)
        .map(|_| {
            s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            ((s >> 40) as f32 / (1u64 << 23) as f32) - 1.0
        })
        .collect()
}

/// A tensor of [`fixed_values`] scaled to `mean ± half` (inputs of tests
/// that pass through a ReLU: with random ones a value now and then lands
/// within rounding of the kink, where the two sides' gradients differ).
pub fn fixed_tensor(shape: &[usize], seed: u64, mean: f32, half: f32) -> Tensor {
    let n = shape.iter().product();
    let v: Vec<f32> = fixed_values(n, seed).into_iter().map(|v| mean + half * v).collect();
    Tensor::from_vec(v, shape, &Device::Cpu).expect("shape of n values")
}

/// `probe` with zeros where the pre-activation `pre` lies within 1e-3 of
/// its largest magnitude of the ReLU's kink. Two implementations that agree
/// to rounding can put such a value on opposite sides of zero, and their
/// gradients then differ by a whole term; with the probe zero there, the
/// gradient of `sum(relu(pre) · probe)` no longer depends on that side,
/// and the rest of the outputs is still compared (in the three tests that
/// use it, all but 0.5 % of them, at most 1 % in one call, over 5 runs).
/// The margin is ten times the loosest forward tolerance (1e-4) of those
/// tests.
pub fn off_the_kink(pre: &Tensor, probe: &Tensor) -> Tensor {
    let margin = pre
        .abs()
        .and_then(|t| t.max_all())
        .and_then(|t| t.to_scalar::<f32>())
        .expect("f32 tensor")
        * 1e-3;
    pre.abs()
        .and_then(|a| a.gt(margin))
        .and_then(|m| m.to_dtype(probe.dtype()))
        .and_then(|m| m * probe)
        .expect("pre-activation and probe of one shape")
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Only values within 1e-3 of the largest magnitude of zero lose their
    /// probe, on either side of the kink; the rest keep it as it was.
    #[test]
    fn off_the_kink_by_hand() {
        let dev = Device::Cpu;
        let pre = Tensor::new(&[-4.0f32, 3.9e-3, -3.9e-3, 4.1e-3, 0.0, 1.0], &dev).expect("tensor");
        let probe = Tensor::new(&[2.0f32, 3.0, 4.0, 5.0, 6.0, -7.0], &dev).expect("tensor");
        let got = off_the_kink(&pre, &probe).to_vec1::<f32>().expect("f32 vector");
        assert_eq!(got, [2.0, 0.0, 0.0, 5.0, 0.0, -7.0]);
    }
}
