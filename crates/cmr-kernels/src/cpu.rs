//! The leaf layer's CPU plumbing, with no candle in it: [`simd_fn!`] and the
//! detection of vector instructions, output buffers, blocked sums, the
//! shared output pointer of a parallel kernel, the thread count and the
//! allocator setting of the binaries.

pub use crate::config::Simd;

/// Define kernel functions that run compiled for the widest vector
/// instructions this CPU has.
///
/// A release build targets the architecture's baseline (SSE2 on x86-64), so
/// plain loops use 128-bit vectors and convert f32 to f64 one value at a
/// time. For each function this defines its body once (always inlined), a
/// copy compiled with AVX2+FMA and one with AVX-512 enabled, and the function
/// itself, which takes the [`Simd`] setting as its first argument and calls
/// the copy for it and this CPU (detected at run time) so that the binary
/// still runs on any x86-64. Only loops inside the body gain:
/// closures handed to rayon are separate functions, so the functions defined
/// here are the per-task work.
macro_rules! simd_fn {
    ($(
        $(#[$meta:meta])*
        $vis:vis fn $name:ident($simd:ident: Simd, $($arg:ident: $ty:ty),* $(,)?) $(-> $ret:ty)? $body:block
    )*) => {$(
        $(#[$meta])*
        #[allow(clippy::too_many_arguments)]
        $vis fn $name($simd: $crate::cpu::Simd, $($arg: $ty),*) $(-> $ret)? {
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
            match $crate::cpu::level($simd) {
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

pub(crate) use simd_fn;

/// The copy of a [`simd_fn!`] function to run: 3 AVX-512, 2 AVX2 with FMA,
/// 1 the baseline.
#[inline]
pub(crate) fn level(simd: Simd) -> u8 {
    match simd {
        Simd::Baseline => 1,
        Simd::Widest => widest_cached(),
    }
}

/// What this CPU has, detected once (one load per call after that: the
/// kernels call [`level`] per row of some loops, and four feature tests each
/// time were measurable in small inference). A fact of the machine, not a
/// setting: the setting is the [`Simd`] passed in.
#[inline]
fn widest_cached() -> u8 {
    use std::sync::atomic::{AtomicU8, Ordering};
    static WIDEST: AtomicU8 = AtomicU8::new(0);
    match WIDEST.load(Ordering::Relaxed) {
        0 => {
            let level = widest();
            WIDEST.store(level, Ordering::Relaxed);
            level
        }
        level => level,
    }
}

#[cfg(target_arch = "x86_64")]
fn widest() -> u8 {
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
fn widest() -> u8 {
    1
}

/// Whether this CPU has AVX-512 (the direct convolution kernel's
/// intrinsics).
#[cfg(target_arch = "x86_64")]
pub fn has_avx512() -> bool {
    std::is_x86_feature_detected!("avx512f")
}

#[cfg(not(target_arch = "x86_64"))]
pub fn has_avx512() -> bool {
    false
}

/// `n` output values for a kernel that writes every one of them before
/// anything reads them, without filling them first: a zero fill is a pass
/// over memory, made on one thread before the parallel kernel starts, and on
/// a training step's activations it was 4–6 % of the step's samples (see
/// BENCHMARKS.md, fifth round).
///
/// The values live in the spare capacity of an empty `Vec` (as
/// [`MaybeUninit`](std::mem::MaybeUninit) slots, which may hold anything)
/// until [`Fresh::written`] gives the vector its length: no `Vec<f32>` ever
/// holds a value that was not written, and a kernel that panics half-way
/// drops an empty vector. In this crate's tests the slots are NaN instead of
/// left as they were, so that a kernel that leaves one unwritten fails its
/// comparison against candle.
pub(crate) struct Fresh {
    values: Vec<f32>,
    n: usize,
}

impl Fresh {
    /// Room for `n` values, none of them written.
    pub(crate) fn new(n: usize) -> Self {
        #[allow(unused_mut)]
        let mut values = Vec::with_capacity(n);
        #[cfg(test)]
        for slot in values.spare_capacity_mut() {
            slot.write(f32::NAN);
        }
        Self { values, n }
    }

    /// The `n` values, for the kernel to write.
    ///
    /// # Safety
    /// The caller writes each value before it reads it, here or through
    /// the buffer's later views, and hands the buffer on only through
    /// [`Fresh::written`].
    pub(crate) unsafe fn slots(&mut self) -> &mut [f32] {
        let spare = &mut self.values.spare_capacity_mut()[..self.n];
        // SAFETY: the `n` slots lie inside the vector's allocation, aligned
        // for f32 (`MaybeUninit<f32>` has f32's layout), borrowed mutably
        // from `self` for the slice's lifetime. The slice is a write-first
        // view: by the caller's contract no value is read before it is
        // written, so no unwritten float is ever produced.
        unsafe { std::slice::from_raw_parts_mut(spare.as_mut_ptr().cast::<f32>(), self.n) }
    }

    /// The first value's address, for a kernel that writes the values through
    /// raw pointers (on several threads).
    pub(crate) fn as_mut_ptr(&mut self) -> *mut f32 {
        self.values.as_mut_ptr()
    }

    /// The values, once the kernel has written all of them.
    ///
    /// # Safety
    /// Every one of the `n` values has been written.
    pub(crate) unsafe fn written(mut self) -> Vec<f32> {
        // SAFETY: the capacity is at least `n`, and by the caller's
        // contract all `n` values are initialised.
        unsafe { self.values.set_len(self.n) };
        self.values
    }
}

/// `n` values written by `write`, which writes every one of them before it
/// reads any (the common case of [`Fresh`]), and what `write` returns.
///
/// # Safety
/// `write` writes each of the `n` values before reading it, and all of
/// them before it returns.
pub(crate) unsafe fn fresh_with<R>(n: usize, write: impl FnOnce(&mut [f32]) -> R) -> (Vec<f32>, R) {
    let mut fresh = Fresh::new(n);
    // SAFETY: by the caller's contract `write` writes before it reads, and
    // the slots reach nothing else.
    let r = write(unsafe { fresh.slots() });
    // SAFETY: by the caller's contract `write` wrote all `n` values.
    (unsafe { fresh.written() }, r)
}

/// [`fresh_with`] for a `write` that returns nothing.
///
/// # Safety
/// As for [`fresh_with`].
pub(crate) unsafe fn fresh(n: usize, write: impl FnOnce(&mut [f32])) -> Vec<f32> {
    // SAFETY: the caller's contract is `fresh_with`'s.
    unsafe { fresh_with(n, write) }.0
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

/// A raw output pointer that the threads of one kernel share, each writing
/// its own elements only (`direct::convolve`'s tiles, `winograd`'s jobs):
/// each use states why its writes are disjoint.
#[derive(Clone, Copy)]
pub(crate) struct SendPtr(pub(crate) *mut f32);
// SAFETY: the pointer is only written through, by threads that write
// disjoint elements (see each use).
unsafe impl Send for SendPtr {}
// SAFETY: as for `Send`: shared, it is only written through, at disjoint
// elements.
unsafe impl Sync for SendPtr {}
impl SendPtr {
    pub(crate) fn get(self) -> *mut f32 {
        self.0
    }
}

/// Threads the kernels may use.
pub(crate) fn threads() -> usize {
    rayon::current_num_threads().max(1)
}
