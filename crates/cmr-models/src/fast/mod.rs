//! Fast CPU kernels for the training step, as candle custom ops with their
//! own backward passes: convolution (stride 1, "same" padding) as packed GEMMs
//! for the forward, input-gradient and weight-gradient passes, and BatchNorm
//! fused with ReLU (training and inference), max-pooling and bilinear
//! up-sampling.
//!
//! They apply to f32 tensors on the CPU only; on any other device (or with the
//! switch off) the networks use candle's own ops, which compute the same
//! function. [`set_enabled`] (or `CMR_FAST=0` in the environment) turns the
//! fast path off, so the two can be compared.

mod bn;
mod conv;
mod pool;
mod upsample;

use std::sync::atomic::{AtomicU8, Ordering};

use candle_core::{CpuStorage, DType, Layout, Result, Storage, Tensor};

pub use bn::{BnStats, bn_relu_eval, bn_relu_train};
pub use conv::{conv2d, conv2d_relu};
pub use pool::{Argmax, max_pool, max_pool_with_argmax, max_unpool};
pub use upsample::upsample_bilinear;

/// 0: not yet read from the environment, 1: on, 2: off.
static STATE: AtomicU8 = AtomicU8::new(0);

/// Whether the fast CPU kernels are used (default on; `CMR_FAST=0` turns
/// them off).
pub fn enabled() -> bool {
    match STATE.load(Ordering::Relaxed) {
        1 => true,
        2 => false,
        _ => {
            let on = std::env::var("CMR_FAST").map(|v| v != "0").unwrap_or(true);
            STATE.store(if on { 1 } else { 2 }, Ordering::Relaxed);
            on
        }
    }
}

/// Turn the fast CPU kernels on or off for the whole process.
pub fn set_enabled(on: bool) {
    STATE.store(if on { 1 } else { 2 }, Ordering::Relaxed);
}

/// Whether the fast path handles `x`: enabled, f32, on the CPU.
pub fn applies(x: &Tensor) -> bool {
    x.device().is_cpu() && x.dtype() == DType::F32 && enabled()
}

/// The contiguous f32 data of a custom op's CPU argument.
fn slice<'a>(s: &'a CpuStorage, l: &Layout) -> Result<&'a [f32]> {
    let all = s.as_slice::<f32>()?;
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(&all[a..b]),
        None => candle_core::bail!("fast kernels need contiguous inputs"),
    }
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

/// Accumulators per lane: independent f64 sums that the compiler keeps in
/// vector registers (one running sum would be a serial chain of additions).
pub(crate) const LANES: usize = 8;

/// `Σ f(x)` over `x` in f64, lane by lane.
pub(crate) fn lane_sum(x: &[f32], f: impl Fn(f64) -> f64) -> f64 {
    let mut acc = [0f64; LANES];
    let chunks = x.chunks_exact(LANES);
    let tail: f64 = chunks.remainder().iter().map(|&v| f(f64::from(v))).sum();
    for c in chunks {
        for j in 0..LANES {
            acc[j] += f(f64::from(c[j]));
        }
    }
    acc.iter().sum::<f64>() + tail
}

/// Threads the kernels may use.
fn threads() -> usize {
    rayon::current_num_threads().max(1)
}
