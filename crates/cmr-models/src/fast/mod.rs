//! Fast CPU kernels for the training step, as candle custom ops with their
//! own backward passes: convolution (stride 1, "same" padding) by our own
//! AVX-512 micro-kernel or packed GEMMs for the forward and input-gradient
//! passes, by GEMMs for the weight gradient, BatchNorm
//! fused with ReLU (training and inference), the whole conv-BN-ReLU layer in
//! training as one op, max-pooling, the 2×2 transposed convolution and
//! bilinear up-sampling.
//!
//! They apply to f32 tensors on the CPU only; on any other device (or with the
//! switch off) the networks use candle's own ops, which compute the same
//! function. [`set_enabled`] (or `CMR_FAST=0` in the environment) turns the
//! fast path off, so the two can be compared.

/// Define kernel functions that run compiled for the widest vector
/// instructions this CPU has.
///
/// A release build targets the architecture's baseline (SSE2 on x86-64), so
/// plain loops use 128-bit vectors and convert f32 to f64 one value at a
/// time. For each function this defines its body once (always inlined), a
/// copy compiled with AVX2+FMA and one with AVX-512 enabled, and the function
/// itself, which calls the copy for this CPU (decided once, at run time) so
/// that the binary still runs on any x86-64. Only loops inside the body gain:
/// closures handed to rayon are separate functions, so the functions defined
/// here are the per-task work.
macro_rules! simd_fn {
    ($(
        $(#[$meta:meta])*
        $vis:vis fn $name:ident($($arg:ident: $ty:ty),* $(,)?) $(-> $ret:ty)? $body:block
    )*) => {$(
        $(#[$meta])*
        #[allow(clippy::too_many_arguments)]
        $vis fn $name($($arg: $ty),*) $(-> $ret)? {
            #[inline(always)]
            fn imp($($arg: $ty),*) $(-> $ret)? $body
            #[cfg(target_arch = "x86_64")]
            #[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vl,avx2,fma")]
            unsafe fn avx512($($arg: $ty),*) $(-> $ret)? {
                imp($($arg),*)
            }
            #[cfg(target_arch = "x86_64")]
            #[target_feature(enable = "avx2,fma")]
            unsafe fn avx2($($arg: $ty),*) $(-> $ret)? {
                imp($($arg),*)
            }
            match $crate::fast::simd_level() {
                // SAFETY: `simd_level` found AVX-512 on this CPU.
                #[cfg(target_arch = "x86_64")]
                3 => unsafe { avx512($($arg),*) },
                // SAFETY: `simd_level` found AVX2 and FMA on this CPU.
                #[cfg(target_arch = "x86_64")]
                2 => unsafe { avx2($($arg),*) },
                _ => imp($($arg),*),
            }
        }
    )*};
}

mod batched;
mod bn;
mod concat;
mod conv;
mod direct;
mod fused;
mod pool;
mod tape;
mod upconv;
mod upsample;
pub(crate) mod upsampled;
mod winograd;

use std::sync::atomic::{AtomicU8, Ordering};

use candle_core::{CpuStorage, DType, Layout, Result, Storage, Tensor};

pub use batched::{Batched, set_batched};
pub use bn::{BnStats, bn_relu_eval, bn_relu_train};
pub use conv::{conv2d, conv2d_affine_relu, conv2d_relu, upsampled_conv2d_affine_relu};
pub use direct::set_direct;
pub use fused::{conv_bn_relu_train, upsampled_conv_bn_relu_train};
pub use pool::{Argmax, max_pool, max_pool_with_argmax, max_unpool};
pub use tape::{Tape, cat, forward_backward, record};
pub use upconv::upconv2x2;
pub use upsample::upsample_bilinear;
pub use upsampled::set_upsampled;
pub use winograd::{Winograd, set_winograd, set_winograd_mode};

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

/// `n` values for a kernel that writes every one of them before anything
/// reads them, without filling them first: a zero fill is a pass over
/// memory, made on one thread before the parallel kernel starts, and on a
/// training step's activations it was 4–6 % of the step's samples (see
/// BENCHMARKS.md, fifth round). In this crate's tests the values are NaN
/// instead, so that a kernel that leaves one unwritten fails its comparison
/// against candle.
///
/// # Safety
/// The caller writes every element before any is read, and before the
/// buffer reaches anything that reads it (a tensor, another kernel).
#[allow(clippy::uninit_vec)]
unsafe fn output_buffer(n: usize) -> Vec<f32> {
    let mut v = Vec::with_capacity(n);
    // SAFETY: the capacity is `n`; every `f32` bit pattern is a valid value,
    // and the caller's contract is that no element is read before it is
    // written.
    unsafe { v.set_len(n) };
    #[cfg(test)]
    v.fill(f32::NAN);
    v
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

/// Vector lanes of f32 partial sums: independent running sums the compiler
/// keeps in one vector register (one running sum would be a serial chain of
/// additions).
pub(crate) const LANES: usize = 16;

/// Values summed in f32 (in [`LANES`] lanes, 16 each) before the block's sum
/// joins the f64 total: f32 vector arithmetic at full width, and no lane
/// adds up more than 16 values in single precision.
pub(crate) const BLOCK: usize = LANES * 16;

/// `Σ f(x)`: in f32 lane by lane within blocks of [`BLOCK`] values, in f64
/// across blocks.
#[inline(always)]
pub(crate) fn block_sum(x: &[f32], f: impl Fn(f32) -> f32) -> f64 {
    let mut total = 0f64;
    for block in x.chunks(BLOCK) {
        let mut acc = [0f32; LANES];
        let chunks = block.chunks_exact(LANES);
        for (a, &v) in acc.iter_mut().zip(chunks.remainder()) {
            *a += f(v);
        }
        for c in chunks {
            for j in 0..LANES {
                acc[j] += f(c[j]);
            }
        }
        total += acc.iter().map(|&v| f64::from(v)).sum::<f64>();
    }
    total
}

/// 0: not yet detected, 1: baseline only, 2: AVX2+FMA, 3: AVX-512.
static SIMD: AtomicU8 = AtomicU8::new(0);

/// The vector instructions [`simd_fn!`] kernels run with: the widest this CPU
/// has, unless `CMR_SIMD=0` (or [`set_simd`]) asks for the baseline.
pub(crate) fn simd_level() -> u8 {
    match SIMD.load(Ordering::Relaxed) {
        0 => {
            let off = std::env::var("CMR_SIMD").is_ok_and(|v| v == "0");
            let level = if off { 1 } else { detect_simd() };
            SIMD.store(level, Ordering::Relaxed);
            level
        }
        level => level,
    }
}

#[cfg(target_arch = "x86_64")]
fn detect_simd() -> u8 {
    if std::is_x86_feature_detected!("avx512f")
        && std::is_x86_feature_detected!("avx512bw")
        && std::is_x86_feature_detected!("avx512dq")
        && std::is_x86_feature_detected!("avx512vl")
    {
        3
    } else if std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma") {
        2
    } else {
        1
    }
}

#[cfg(not(target_arch = "x86_64"))]
fn detect_simd() -> u8 {
    1
}

/// Use the widest vector instructions the CPU has (`true`, the default) or
/// the build's baseline (`false`) in the kernels' loops. Both give the same
/// bits: Rust neither fuses multiply-adds nor reorders float arithmetic on
/// its own, so only the width of the instructions changes.
pub fn set_simd(widest: bool) {
    SIMD.store(if widest { detect_simd() } else { 1 }, Ordering::Relaxed);
}

/// Keep freed memory in the process instead of handing it back to the
/// system, so that the next training step's tensors reuse pages that are
/// already mapped. Returns whether the allocator took the settings.
///
/// Every op's output is a fresh allocation of up to tens of MB. glibc's
/// `malloc` maps allocations above its threshold (128 KiB, raised as
/// large blocks are freed) straight from the system and trims free memory
/// at the top of the heap, so each step's new tensors arrive as untouched
/// pages: a page fault, a zero-fill and, on free, an unmap for every 4 KiB
/// of every activation and gradient. With the mapping threshold at its
/// maximum (32 MiB) and trimming only past 1 GiB of free memory at the top,
/// the pages stay mapped; the peak resident set does not grow (the process
/// holds on to memory it has already used). A process-wide setting, so the
/// binaries call it (`cmr`, `cargo xtask`, the step benchmark); a no-op
/// outside Linux with glibc.
pub fn keep_freed_memory() -> bool {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        // SAFETY: mallopt only changes the allocator's tuning parameters;
        // both values are within the documented ranges.
        unsafe {
            libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20) == 1 && libc::mallopt(libc::M_TRIM_THRESHOLD, 1 << 30) == 1
        }
    }
    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    {
        false
    }
}

/// Threads the kernels may use.
/// A raw output pointer that the threads of one kernel share, each writing
/// its own elements only (`direct::convolve`'s tiles, `winograd`'s jobs):
/// each use states why its writes are disjoint.
#[derive(Clone, Copy)]
struct SendPtr(*mut f32);
// SAFETY: the pointer is only written through, by threads that write
// disjoint elements (see each use).
unsafe impl Send for SendPtr {}
unsafe impl Sync for SendPtr {}
impl SendPtr {
    fn get(self) -> *mut f32 {
        self.0
    }
}

fn threads() -> usize {
    rayon::current_num_threads().max(1)
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
    fn run_all() -> Vec<Vec<f32>> {
        let x = var(&[3, 4, 36, 40], 1, 1.0, 0.0);
        let w1 = var(&[6, 4, 3, 3], 2, 0.3, 0.0);
        let b1 = var(&[6], 3, 0.3, 0.0);
        let gamma = var(&[6], 4, 0.3, 1.0);
        let beta = var(&[6], 5, 0.3, 0.0);
        let w2 = var(&[6, 6, 3, 3], 6, 0.3, 0.0);
        let w3 = var(&[5, 6, 3, 3], 7, 0.3, 0.0);
        let b3 = var(&[5], 8, 0.3, 0.0);
        let (y, _) = conv_bn_relu_train(&x, &w1, &b1, &gamma, &beta, 1e-5).unwrap();
        let (y, _) = bn_relu_train(&conv2d(&y, &w2, &b1).unwrap(), &gamma, &beta, 1e-5).unwrap();
        let (p, arg) = max_pool_with_argmax(&y, 2).unwrap();
        let z = conv2d_relu(&p, &w3, &b3).unwrap();
        let (z, arg2) = max_pool_with_argmax(&z, 2).unwrap();
        let out = (max_unpool(&z, &arg2).unwrap() + upsample_bilinear(&z, 2).unwrap()).unwrap();
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
        set_simd(true);
        let wide = run_all();
        set_simd(false);
        let base = run_all();
        set_simd(true);
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
