//! The CPU's matrix engine (Intel AMX) and bf16, with no candle in it: the
//! detection of AMX-BF16 and the one-time grant of its tile state by Linux,
//! the rounding of f32 to bf16, and the tile micro-kernel every bf16
//! algorithm is built on.
//!
//! An AMX tile multiply (`tdpbf16ps`) adds the products of a 16 × 32 bf16
//! tile and a 32 × 16 one (stored as 16 rows of 16 bf16 pairs, "VNNI"
//! layout) into a 16 × 16 f32 tile: 8192 multiply-adds per instruction.
//! Tile instructions have no stable intrinsics, so they are written with
//! `asm!`; the compiler neither uses the tile registers nor knows about them,
//! so their contents persist from one `asm!` block to the next on a thread.
//!
//! The micro-kernel keeps a 32 × 32 block of f32 sums in tiles 0–3 (rows
//! `0..16`, `16..32` by columns `0..16`, `16..32`), loads two 16-row slices
//! of the left operand into tiles 4–5 and two 16-column slices of the right
//! one into tiles 6–7 per step of 32 products, and does four tile multiplies.

use std::sync::OnceLock;

/// What the CPU offers for bf16 matrix products, as detected (and granted)
/// once per process.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MatrixUnit {
    /// AMX-BF16 tiles, their state granted by the OS.
    Amx,
    /// No tiles, but AVX512-BF16's dot products (`vdpbf16ps`: 16 lanes,
    /// each the sum of two bf16 products added into f32).
    Avx512Bf16,
    /// None usable: the f32 kernels run instead.
    None,
}

impl std::fmt::Display for MatrixUnit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Amx => "AMX-BF16",
            Self::Avx512Bf16 => "AVX512-BF16 (no AMX)",
            Self::None => "no bf16 matrix unit",
        })
    }
}

/// The matrix unit of this CPU: AMX where the CPU has AMX-TILE and
/// AMX-BF16 and Linux grants the tile state (`arch_prctl(ARCH_REQ_XCOMP_PERM,
/// XFEATURE_XTILEDATA)`, asked once per process), else AVX512-BF16 where
/// the CPU has it, else none.
pub fn matrix_unit() -> MatrixUnit {
    static UNIT: OnceLock<MatrixUnit> = OnceLock::new();
    *UNIT.get_or_init(|| {
        if cpu_has_amx_bf16() && request_tile_state() {
            MatrixUnit::Amx
        } else if has_avx512_bf16() {
            MatrixUnit::Avx512Bf16
        } else {
            MatrixUnit::None
        }
    })
}

/// Whether the bf16 tile kernels can run here.
pub fn has_amx() -> bool {
    matrix_unit() == MatrixUnit::Amx
}

/// Whether the CPU has AVX512-BF16's dot products (with AVX-512F), whether
/// or not it also has AMX.
pub fn has_avx512_bf16() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx512f") && std::arch::is_x86_feature_detected!("avx512bf16")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// Whether the convolutions can run in bf16 here, on either unit.
pub fn has_bf16_unit() -> bool {
    matrix_unit() != MatrixUnit::None
}

#[cfg(target_arch = "x86_64")]
fn cpu_has_amx_bf16() -> bool {
    use std::arch::x86_64::__cpuid_count;
    // CPUID leaf 7, sub-leaf 0: EDX bit 22 AMX-BF16, bit 24 AMX-TILE.
    #[allow(unused_unsafe)]
    // SAFETY: CPUID exists on every x86-64 CPU, and leaf 0's maximum is
    // checked before leaf 7 is read.
    let (max, edx) = unsafe { (__cpuid_count(0, 0).eax, __cpuid_count(7, 0).edx) };
    max >= 7 && edx & (1 << 22) != 0 && edx & (1 << 24) != 0
}

#[cfg(not(target_arch = "x86_64"))]
fn cpu_has_amx_bf16() -> bool {
    false
}

/// Ask Linux for the tile data state (off for every process until asked).
#[cfg(all(target_arch = "x86_64", target_os = "linux", target_env = "gnu"))]
fn request_tile_state() -> bool {
    const ARCH_REQ_XCOMP_PERM: libc::c_long = 0x1023;
    const XFEATURE_XTILEDATA: libc::c_long = 18;
    // SAFETY: `arch_prctl` with this request reads no memory; it only
    // changes which state components this process may use.
    unsafe { libc::syscall(libc::SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) == 0 }
}

#[cfg(not(all(target_arch = "x86_64", target_os = "linux", target_env = "gnu")))]
fn request_tile_state() -> bool {
    false
}

/// `v` rounded to bf16 (to nearest, ties to even; a NaN stays a NaN), as
/// its bits.
#[inline(always)]
pub fn to_bf16(v: f32) -> u16 {
    // Branch-free (a select), so that loops over it vectorise.
    let b = v.to_bits();
    let rounded = b.wrapping_add(0x7fff + ((b >> 16) & 1)) >> 16;
    let quiet = (b >> 16) | 0x0040;
    (if b & 0x7fff_ffff > 0x7f80_0000 { quiet } else { rounded }) as u16
}

/// The f32 value of bf16 bits.
#[inline(always)]
pub fn from_bf16(v: u16) -> f32 {
    f32::from_bits(u32::from(v) << 16)
}

/// The tile configuration of the micro-kernel: palette 1, all eight tiles
/// 16 rows of 64 bytes. `ldtilecfg` reads 64 bytes, 64-byte aligned.
#[cfg(target_arch = "x86_64")]
#[repr(C, align(64))]
struct TileConfig {
    palette: u8,
    start_row: u8,
    reserved: [u8; 14],
    colsb: [u16; 16],
    rows: [u8; 16],
}

#[cfg(target_arch = "x86_64")]
const CONFIG: TileConfig = TileConfig {
    palette: 1,
    start_row: 0,
    reserved: [0; 14],
    colsb: [64, 64, 64, 64, 64, 64, 64, 64, 0, 0, 0, 0, 0, 0, 0, 0],
    rows: [16, 16, 16, 16, 16, 16, 16, 16, 0, 0, 0, 0, 0, 0, 0, 0],
};

/// The tiles of one thread, configured for the micro-kernel while this
/// lives, and released (back to the state a context switch need not save)
/// when it drops. Only [`Tiles::new`] makes one, where [`has_amx`] holds.
pub(crate) struct Tiles(std::marker::PhantomData<*const ()>);

/// One step's operands: the addresses of the left operand's two 16-row
/// slices (rows `a_stride` bytes apart, 32 bf16 each) and the right
/// operand's two 16-column slices (16 rows of 16 bf16 pairs, `b_stride`
/// bytes apart), and how far each moves per step (bytes).
#[derive(Clone, Copy, Debug)]
pub(crate) struct Steps {
    pub(crate) a: [*const u16; 2],
    pub(crate) a_stride: usize,
    pub(crate) a_step: usize,
    pub(crate) b: [*const u16; 2],
    pub(crate) b_stride: usize,
    pub(crate) b_step: usize,
    pub(crate) count: usize,
}

impl Tiles {
    /// Configure this thread's tiles, or `None` where there is no AMX.
    pub(crate) fn new() -> Option<Self> {
        if !has_amx() {
            return None;
        }
        #[cfg(target_arch = "x86_64")]
        {
            // SAFETY: the CPU has AMX-TILE and the OS granted its state
            // (`has_amx`); `CONFIG` is a valid palette-1 configuration, 64
            // bytes, 64-byte aligned, and only read.
            unsafe {
                std::arch::asm!("ldtilecfg [{}]", in(reg) &CONFIG, options(nostack, readonly, preserves_flags));
            }
            Some(Self(std::marker::PhantomData))
        }
        #[cfg(not(target_arch = "x86_64"))]
        None
    }

    /// Set the 32 × 32 sums to zero.
    pub(crate) fn zero(&mut self) {
        // SAFETY: the tiles are configured (`self` exists); tilezero touches
        // no memory.
        unsafe {
            std::arch::asm!(
                "tilezero tmm0",
                "tilezero tmm1",
                "tilezero tmm2",
                "tilezero tmm3",
                options(nostack, nomem, preserves_flags)
            );
        }
    }

    /// Set the 32 × 32 sums to those in `sums` (laid out as [`Tiles::store`]
    /// writes them).
    pub(crate) fn load(&mut self, sums: &[f32], stride: usize) {
        assert!(
            stride >= 32 && sums.len() >= 31 * stride + 32,
            "tile load out of bounds"
        );
        let base = sums.as_ptr();
        // SAFETY: the four tiles' 16 rows of 64 bytes, `stride` floats apart,
        // at offsets 0, 16, 16·stride and 16·stride + 16, lie inside `sums`
        // (asserted); only the tile registers are written.
        unsafe {
            std::arch::asm!(
                "tileloadd tmm0, [{c0} + {s}*1]",
                "tileloadd tmm1, [{c1} + {s}*1]",
                "tileloadd tmm2, [{c2} + {s}*1]",
                "tileloadd tmm3, [{c3} + {s}*1]",
                c0 = in(reg) base,
                c1 = in(reg) base.add(16),
                c2 = in(reg) base.add(16 * stride),
                c3 = in(reg) base.add(16 * stride + 16),
                s = in(reg) stride * 4,
                options(nostack, readonly, preserves_flags)
            );
        }
    }

    /// Add `s.count` steps of 32 products to the sums.
    ///
    /// # Safety
    /// For every step `i < s.count`, the 16 rows of 64 bytes at `s.a[r] +
    /// i·s.a_step + row·s.a_stride` and at `s.b[c] + i·s.b_step +
    /// row·s.b_stride` (rows `0..16`) are readable.
    pub(crate) unsafe fn steps(&mut self, s: Steps) {
        if s.count == 0 {
            return;
        }
        // SAFETY: by the caller's contract every row loaded is readable; the
        // tiles are configured (`self` exists). The loop only reads memory
        // and writes the tile registers, which no compiled code uses.
        unsafe {
            std::arch::asm!(
                "2:",
                "tileloadd tmm4, [{a0} + {sa}*1]",
                "tileloadd tmm5, [{a1} + {sa}*1]",
                "tileloadd tmm6, [{b0} + {sb}*1]",
                "tileloadd tmm7, [{b1} + {sb}*1]",
                "tdpbf16ps tmm0, tmm4, tmm6",
                "tdpbf16ps tmm1, tmm4, tmm7",
                "tdpbf16ps tmm2, tmm5, tmm6",
                "tdpbf16ps tmm3, tmm5, tmm7",
                "add {a0}, {astep}",
                "add {a1}, {astep}",
                "add {b0}, {bstep}",
                "add {b1}, {bstep}",
                "dec {n}",
                "jnz 2b",
                a0 = inout(reg) s.a[0] => _,
                a1 = inout(reg) s.a[1] => _,
                b0 = inout(reg) s.b[0] => _,
                b1 = inout(reg) s.b[1] => _,
                sa = in(reg) s.a_stride,
                sb = in(reg) s.b_stride,
                astep = in(reg) s.a_step,
                bstep = in(reg) s.b_step,
                n = inout(reg) s.count => _,
                options(nostack, readonly)
            );
        }
    }

    /// The 32 × 32 sums, written to `out`: row `i`, column `j` at `[i·stride
    /// + j]`.
    pub(crate) fn store(&mut self, out: &mut [f32], stride: usize) {
        assert!(
            stride >= 32 && out.len() >= 31 * stride + 32,
            "tile store out of bounds"
        );
        let base = out.as_mut_ptr();
        // SAFETY: the four 16 × 16 tiles go to 16 rows of 64 bytes each,
        // `stride` floats apart, at offsets 0, 16, 16·stride and 16·stride +
        // 16: the last byte written is below `(31·stride + 32)` floats,
        // inside `out` (asserted), which is borrowed mutably.
        unsafe {
            std::arch::asm!(
                "tilestored [{c0} + {s}*1], tmm0",
                "tilestored [{c1} + {s}*1], tmm1",
                "tilestored [{c2} + {s}*1], tmm2",
                "tilestored [{c3} + {s}*1], tmm3",
                c0 = in(reg) base,
                c1 = in(reg) base.add(16),
                c2 = in(reg) base.add(16 * stride),
                c3 = in(reg) base.add(16 * stride + 16),
                s = in(reg) stride * 4,
                options(nostack, preserves_flags)
            );
        }
    }
}

impl Drop for Tiles {
    fn drop(&mut self) {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: AMX exists (`self` exists); tilerelease touches no memory.
        unsafe {
            std::arch::asm!("tilerelease", options(nostack, nomem, preserves_flags));
        }
    }
}

/// The bf16 unit's rate on this core, GFLOP/s, timed over `n` rounds (for
/// the benchmarks' "fraction of peak"): AMX tile multiplies on operands in
/// the first-level cache (four a round, 32 k multiply-adds), or AVX512-BF16
/// dot products on registers (sixteen a round, 512 multiply-adds); `None`
/// without either.
pub fn measured_peak_gflops(n: usize) -> Option<f64> {
    match matrix_unit() {
        MatrixUnit::Amx => tiles_peak_gflops(n),
        MatrixUnit::Avx512Bf16 => dots_peak_gflops(n),
        MatrixUnit::None => None,
    }
}

fn tiles_peak_gflops(n: usize) -> Option<f64> {
    let mut tiles = Tiles::new()?;
    let ones = vec![0x3f80u16; 2048];
    tiles.zero();
    let start = std::time::Instant::now();
    // SAFETY: every step reads the same 16 rows of 64 bytes at offsets 0
    // and 1024 bytes of `ones` (2048 values, 4096 bytes).
    unsafe {
        tiles.steps(Steps {
            a: [ones.as_ptr(), ones[512..].as_ptr()],
            a_stride: 64,
            a_step: 0,
            b: [ones.as_ptr(), ones[512..].as_ptr()],
            b_stride: 64,
            b_step: 0,
            count: n.max(1),
        });
    }
    let seconds = start.elapsed().as_secs_f64();
    Some(n.max(1) as f64 * 4.0 * 16.0 * 16.0 * 32.0 * 2.0 / seconds / 1e9)
}

/// `n` rounds of 16 independent dot products (16 lanes × 2 products each),
/// as many as an unrolled kernel keeps in flight.
fn dots_peak_gflops(n: usize) -> Option<f64> {
    if !has_avx512_bf16() {
        return None;
    }
    let rounds = n.max(1);
    let start = std::time::Instant::now();
    // SAFETY: the CPU has AVX512-BF16 and AVX-512F (checked above).
    let sum = unsafe { dots_rounds(rounds) };
    let seconds = start.elapsed().as_secs_f64();
    std::hint::black_box(sum);
    Some(rounds as f64 * 16.0 * 16.0 * 2.0 * 2.0 / seconds / 1e9)
}

/// # Safety
/// The CPU has AVX512-BF16 and AVX-512F.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bf16")]
#[allow(clippy::needless_range_loop)]
unsafe fn dots_rounds(rounds: usize) -> f32 {
    use std::arch::x86_64::*;
    // 1 + 2⁻⁷ and 1 − 2⁻⁷ in every bf16 lane: sums that stay finite
    // SAFETY: both types are 512 bits of plain data.
    let (a, b) = unsafe {
        (
            std::mem::transmute::<__m512i, __m512bh>(_mm512_set1_epi32(0x3f81_3f81)),
            std::mem::transmute::<__m512i, __m512bh>(_mm512_set1_epi32(0x3f7e_3f7e)),
        )
    };
    let mut acc = [_mm512_setzero_ps(); 16];
    for _ in 0..rounds {
        for i in 0..16 {
            acc[i] = _mm512_dpbf16_ps(acc[i], a, b);
        }
    }
    let mut total = _mm512_setzero_ps();
    for v in acc {
        total = _mm512_add_ps(total, v);
    }
    _mm512_reduce_add_ps(total)
}

#[cfg(not(target_arch = "x86_64"))]
unsafe fn dots_rounds(_: usize) -> f32 {
    unreachable!("AVX512-BF16 on a CPU that is not x86-64")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bf16_rounds_to_nearest_even() {
        // exact values stay
        for v in [0.0f32, -0.0, 1.0, -2.5, 0.15625, f32::INFINITY, f32::NEG_INFINITY] {
            assert_eq!(from_bf16(to_bf16(v)), v, "{v}");
        }
        // 1 + 2⁻⁸ is half way between 1 and 1 + 2⁻⁷: to the even one, 1
        assert_eq!(from_bf16(to_bf16(1.0 + 1.0 / 256.0)), 1.0);
        // 1 + 3·2⁻⁸ is half way between 1 + 2⁻⁷ and 1 + 2⁻⁶: to 1 + 2⁻⁶
        assert_eq!(from_bf16(to_bf16(1.0 + 3.0 / 256.0)), 1.0 + 1.0 / 64.0);
        // just above half way rounds up
        assert_eq!(from_bf16(to_bf16(f32::from_bits(0x3f80_8001))), 1.0 + 1.0 / 128.0);
        assert!(from_bf16(to_bf16(f32::NAN)).is_nan());
        // the largest finite value rounds to infinity, as the hardware does
        assert_eq!(from_bf16(to_bf16(f32::MAX)), f32::INFINITY);
        // half a unit in the last place: at most 2⁻⁸ of the value
        for i in 0..1000 {
            let v = (i as f32 * 0.731).sin() * 10f32.powi(i % 7 - 3);
            let r = from_bf16(to_bf16(v));
            assert!((r - v).abs() <= v.abs() / 256.0, "{v} → {r}");
        }
    }

    /// One block of products on the tiles against the same products of the
    /// bf16 values in f64: each sum of exact products of bf16 values, rounded
    /// once per step of 32 by the tiles, is within 1e-5 of the largest.
    #[test]
    fn the_micro_kernel_multiplies() {
        let Some(mut tiles) = Tiles::new() else {
            eprintln!("no AMX-BF16 here: the micro-kernel is not tested (the f32 kernels run instead)");
            return;
        };
        let k = 96; // three steps
        let val = |i: usize, s: f32| to_bf16(((i as f32) * s).sin());
        // left [32, k] row-major; right [k, 32] as two 16-column slices in
        // pairs: slice c, pair row p, column j, element e at
        // ((c·k/2 + p)·16 + j)·2 + e.
        let a: Vec<u16> = (0..32 * k).map(|i| val(i, 0.37)).collect();
        let right = |kk: usize, j: usize| val(kk * 32 + j, 0.91);
        let mut b = vec![0u16; k * 32];
        for c in 0..2 {
            for p in 0..k / 2 {
                for j in 0..16 {
                    for e in 0..2 {
                        b[((c * k / 2 + p) * 16 + j) * 2 + e] = right(2 * p + e, 16 * c + j);
                    }
                }
            }
        }
        tiles.zero();
        // SAFETY: each step reads rows inside `a` and `b` (checked by the
        // shapes above: 32 rows of k values, and k/2 pair rows per slice).
        unsafe {
            tiles.steps(Steps {
                a: [a.as_ptr(), a[16 * k..].as_ptr()],
                a_stride: k * 2,
                a_step: 64,
                b: [b.as_ptr(), b[k * 16..].as_ptr()],
                b_stride: 64,
                b_step: 16 * 64,
                count: k / 32,
            });
        }
        let mut out = [0f32; 1024];
        tiles.store(&mut out, 32);
        let mut largest = 0f64;
        let mut expected = vec![0f64; 1024];
        for i in 0..32 {
            for j in 0..32 {
                let s: f64 = (0..k)
                    .map(|kk| f64::from(from_bf16(a[i * k + kk])) * f64::from(from_bf16(right(kk, j))))
                    .sum();
                expected[i * 32 + j] = s;
                largest = largest.max(s.abs());
            }
        }
        for (i, (&got, &want)) in out.iter().zip(&expected).enumerate() {
            assert!((f64::from(got) - want).abs() <= 1e-5 * largest, "{i}: {got} vs {want}");
        }
    }
}
