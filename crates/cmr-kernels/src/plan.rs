//! Which algorithm convolves a layer: one pure function of the layer's
//! shape, the pass and the [`KernelConfig`], used by the forward and the
//! backward pass alike. ARCHITECTURE.md's table lists its answer for every
//! layer of the three networks, and a test holds the two together.
//!
//! The rules (the measurements behind each threshold are in BENCHMARKS.md,
//! "Where each convolution algorithm runs"):
//! - an input up-sampled by `f > 1` (U-Net 3+'s decoder branches) is
//!   convolved at its own resolution ([`Algorithm::Upsampled`], all three
//!   gradients in one pass), unless that is turned off: then the layer is
//!   planned as a convolution of the up-sampled image;
//! - with bf16 precision on a CPU with AMX, the products on its tiles for
//!   odd kernels with at least [`TILES_MIN_CHANNELS`] channels in and out
//!   on images of at least [`TILES_MIN_PIXELS`] ([`Algorithm::Tiles`];
//!   forward, and so the input gradient); on a CPU with AVX512-BF16 but no
//!   AMX, the same layers on its dot products ([`Algorithm::Dots`]);
//! - Winograd's minimal filtering for 3×3 kernels from 8×8 up with many
//!   channels and enough tiles, F(4×4) tiles where the batch has 144 of
//!   them, else F(2×2) ([`winograd_tile`]);
//! - batch-wide GEMMs for images up to 8×8 with at least 256·256·9
//!   weights (forward from two images up; backward all three gradients);
//! - from 32×32 up, the direct AVX-512 kernel (rows of at least 16 pixels,
//!   where the CPU has AVX-512), else shifted views of the padded input;
//! - below, im2col and one GEMM (1×1 kernels: the GEMM on the input itself).
//!
//! The input gradient is the forward convolution of the output gradient
//! with the flipped kernel, channels swapped: it is planned as that forward
//! pass.

use crate::amx::MatrixUnit;
use crate::config::{Batched, KernelConfig, Precision, Winograd};

/// The fewest input and output channels whose products go on AMX tiles (or
/// the dot products, which take the same layers) in bf16: a tile multiply
/// takes 32 input channels (fewer are padded with zeros), and the sums leave
/// the tiles 32 output channels at a time.
pub const TILES_MIN_CHANNELS: usize = 16;

/// The smallest images whose products go on the tiles: at 6×6 the bf16
/// copy of the weights (made on every call) costs more than the products
/// save (1024 channels: 7.1 ms against 4.1 ms in f32, batch 1).
pub const TILES_MIN_PIXELS: usize = 12 * 12;

/// Images with at least this many pixels are convolved on the zero-padded
/// input in place (the direct kernel, or shifted views); smaller ones by
/// im2col, whose one deep GEMM is faster there. Shifted views were 1.3–1.8×
/// faster than im2col at 96×96 and 48×48, slower at 12×12; the direct kernel
/// under this size was no faster at the narrow widths and slower at the
/// report's.
pub const SHIFTED_MIN_PIXELS: usize = 32 * 32;

/// The largest images (pixels) whose convolution runs batch-wide by
/// default, and the fewest weights (`cout·cin·k·k`).
pub const BATCHED_MAX_PIXELS: usize = 8 * 8;
pub const BATCHED_MIN_WEIGHTS: usize = 256 * 256 * 9;

/// The fewest 2×2 output tiles (over the batch) that Winograd takes, and the
/// fewest 4×4 tiles that give F(4×4) tiles.
pub const WINOGRAD_MIN_TILES: usize = 128;
pub const WINOGRAD_F4_MIN_TILES: usize = 144;

/// One convolution layer: `batch` images `[cin, h, w]` (before any
/// up-sampling) to `cout` channels, a `k × k` kernel (stride 1, padding
/// `k / 2`), the input up-sampled bilinearly by `upsample` first (1: not).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ConvShape {
    pub batch: usize,
    pub cin: usize,
    pub h: usize,
    pub w: usize,
    pub cout: usize,
    pub k: usize,
    pub upsample: usize,
}

impl ConvShape {
    /// The layer's output height and width.
    pub fn out_hw(&self) -> (usize, usize) {
        (self.h * self.upsample, self.w * self.upsample)
    }
}

/// A pass over a convolution layer.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Pass {
    Forward,
    /// The gradient of the layer's input.
    InputGrad,
    /// The gradients of its weights and bias.
    WeightGrad,
}

/// The output tile of Winograd's F(m×m, 3×3).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Tile {
    /// F(2×2, 3×3): 16 products for 4 outputs (2.25× fewer), transforms of
    /// additions only, results exact to a few units in the last place.
    F2x2,
    /// F(4×4, 3×3): 36 products for 16 outputs (4× fewer); the transforms
    /// scale by up to 8, so rounding grows to a few 1e-6 of the largest
    /// value.
    F4x4,
}

/// How a pass over a layer is computed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Algorithm {
    /// The up-sampled input convolved at its own resolution
    /// (`upsampled.rs`); backward, the three gradients in one pass.
    Upsampled,
    /// Winograd's minimal filtering (`winograd.rs`).
    Winograd(Tile),
    /// All images' columns in one GEMM (`batched.rs`); backward, the three
    /// gradients in one pass.
    Batched,
    /// The direct AVX-512 micro-kernel on the padded input (`direct.rs`).
    Direct,
    /// `k·k` GEMMs on shifted views of the padded input (`shifted.rs`).
    Shifted,
    /// im2col and one GEMM per image (`im2col.rs`).
    Im2col,
    /// A 1×1 kernel: one GEMM on the input itself.
    Gemm,
    /// bf16 products on AMX tiles, f32 sums (`bf16_conv.rs`).
    Tiles,
    /// bf16 products on AVX512-BF16 dot products, f32 sums (`bf16_conv.rs`):
    /// where the CPU has no AMX, or `bf16_unit = "dots"` asks for them.
    Dots,
}

impl std::fmt::Display for Algorithm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Upsampled => "up-sampled",
            Self::Winograd(Tile::F2x2) => "Winograd F(2×2)",
            Self::Winograd(Tile::F4x4) => "Winograd F(4×4)",
            Self::Batched => "batched",
            Self::Direct => "direct",
            Self::Shifted => "shifted views",
            Self::Im2col => "im2col",
            Self::Gemm => "GEMM (1×1)",
            Self::Tiles => "bf16 tiles",
            Self::Dots => "bf16 dot products",
        })
    }
}

/// The algorithm for `pass` over the layer `shape` (see the module doc).
pub fn plan(shape: &ConvShape, pass: Pass, cfg: &KernelConfig) -> Algorithm {
    if shape.upsample > 1 {
        if cfg.upsampled {
            return Algorithm::Upsampled;
        }
        let (h, w) = shape.out_hw();
        return plan(
            &ConvShape {
                h,
                w,
                upsample: 1,
                ..*shape
            },
            pass,
            cfg,
        );
    }
    let ConvShape {
        batch: b,
        cin,
        h,
        w,
        cout,
        k,
        ..
    } = *shape;
    match pass {
        Pass::Forward => {
            if let Some(bf16) = in_bf16(shape, cfg) {
                bf16
            } else if let Some(tile) = winograd_tile(shape, cfg) {
                Algorithm::Winograd(tile)
            } else if b > 1 && batched(shape, cfg) {
                Algorithm::Batched
            } else if k > 1 && h * w >= SHIFTED_MIN_PIXELS {
                if cfg.direct && w >= 16 && crate::cpu::has_avx512() {
                    Algorithm::Direct
                } else {
                    Algorithm::Shifted
                }
            } else if k == 1 {
                Algorithm::Gemm
            } else {
                Algorithm::Im2col
            }
        }
        Pass::InputGrad if batched(shape, cfg) => Algorithm::Batched,
        Pass::InputGrad => plan(
            &ConvShape {
                cin: cout,
                cout: cin,
                ..*shape
            },
            Pass::Forward,
            cfg,
        ),
        Pass::WeightGrad => {
            if batched(shape, cfg) {
                Algorithm::Batched
            } else if let Some(tile) = winograd_tile(shape, cfg) {
                Algorithm::Winograd(tile)
            } else if k > 1 && h * w >= SHIFTED_MIN_PIXELS {
                Algorithm::Shifted
            } else if k == 1 {
                Algorithm::Gemm
            } else {
                Algorithm::Im2col
            }
        }
    }
}

/// The bf16 algorithm for the layer, if its products go to the CPU's bf16
/// unit: AMX tiles, else AVX512-BF16's dot products.
fn in_bf16(s: &ConvShape, cfg: &KernelConfig) -> Option<Algorithm> {
    let fits = cfg.precision == Precision::Bf16
        && s.k % 2 == 1
        && s.cin >= TILES_MIN_CHANNELS
        && s.cout >= TILES_MIN_CHANNELS
        && s.h * s.w >= TILES_MIN_PIXELS;
    match cfg.bf16_unit.unit() {
        _ if !fits => None,
        MatrixUnit::Amx => Some(Algorithm::Tiles),
        MatrixUnit::Avx512Bf16 => Some(Algorithm::Dots),
        MatrixUnit::None => None,
    }
}

/// Whether the layer's convolution runs batch-wide: images under 32×32 with
/// a kernel larger than 1×1, and by default only small images with many
/// weights (there one image's GEMM is too shallow; at 12×12 and up, or with
/// fewer weights, images on separate threads need no synchronisation inside
/// the GEMMs and were faster).
fn batched(s: &ConvShape, cfg: &KernelConfig) -> bool {
    let small = s.k > 1 && s.h * s.w < SHIFTED_MIN_PIXELS;
    match cfg.batched {
        Batched::Off => false,
        Batched::Always => small,
        Batched::Auto => small && s.h * s.w <= BATCHED_MAX_PIXELS && s.cout * s.cin * s.k * s.k >= BATCHED_MIN_WEIGHTS,
    }
}

/// The Winograd tile for the layer, if Winograd takes it: 3×3 kernels on
/// images from 8×8 up, with enough channels (under 32×32 at least
/// `128·128·24·24` products per image, from there 64·64 channel pairs) and
/// at least [`WINOGRAD_MIN_TILES`] 2×2 tiles over the batch; F(4×4) where
/// there are [`WINOGRAD_F4_MIN_TILES`] 4×4 tiles (fewer, and reading its
/// 2.25× larger transformed weights costs more than the products save).
pub fn winograd_tile(s: &ConvShape, cfg: &KernelConfig) -> Option<Tile> {
    let ConvShape {
        batch: b,
        cin,
        h,
        w,
        cout,
        k,
        ..
    } = *s;
    if cfg.winograd == Winograd::Off || k != 3 || h < 8 || w < 8 {
        return None;
    }
    let enough = if h * w < SHIFTED_MIN_PIXELS {
        cin * cout * h * w >= 128 * 128 * 24 * 24
    } else {
        cin * cout >= 64 * 64
    };
    if !enough || b * h.div_ceil(2) * w.div_ceil(2) < WINOGRAD_MIN_TILES {
        return None;
    }
    Some(match cfg.winograd {
        Winograd::F2x2 => Tile::F2x2,
        Winograd::F4x4 => Tile::F4x4,
        _ if b * h.div_ceil(4) * w.div_ceil(4) >= WINOGRAD_F4_MIN_TILES => Tile::F4x4,
        _ => Tile::F2x2,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shape(batch: usize, cin: usize, hw: usize, cout: usize) -> ConvShape {
        ConvShape {
            batch,
            cin,
            h: hw,
            w: hw,
            cout,
            k: 3,
            upsample: 1,
        }
    }

    /// The thresholds, each on both sides (the networks' table is pinned
    /// in cmr-models' tests).
    #[test]
    fn thresholds_on_both_sides() {
        let cfg = KernelConfig::default();
        let fwd = |s: ConvShape| plan(&s, Pass::Forward, &cfg);
        // Winograd: 64·64 channel pairs from 32×32 up
        assert_eq!(fwd(shape(1, 64, 96, 64)), Algorithm::Winograd(Tile::F4x4));
        assert!(matches!(
            fwd(shape(1, 32, 96, 64)),
            Algorithm::Direct | Algorithm::Shifted
        ));
        // under 32×32: the products per image; 144 4×4 tiles for F(4×4)
        assert_eq!(fwd(shape(8, 256, 12, 256)), Algorithm::Winograd(Tile::F2x2));
        assert_eq!(fwd(shape(16, 256, 12, 256)), Algorithm::Winograd(Tile::F4x4));
        assert_eq!(fwd(shape(8, 128, 12, 128)), Algorithm::Im2col);
        // too few tiles: batch 1 at 12×12 is 36 tiles
        assert_eq!(fwd(shape(1, 512, 12, 512)), Algorithm::Im2col);
        // batch-wide at 6×6 with many weights, from two images up forward
        assert_eq!(fwd(shape(8, 256, 6, 256)), Algorithm::Batched);
        assert_eq!(fwd(shape(1, 256, 6, 256)), Algorithm::Im2col);
        assert_eq!(plan(&shape(1, 256, 6, 256), Pass::WeightGrad, &cfg), Algorithm::Batched);
        assert_eq!(fwd(shape(8, 128, 6, 256)), Algorithm::Im2col);
        // 1×1
        assert_eq!(
            fwd(ConvShape {
                k: 1,
                ..shape(8, 16, 96, 4)
            }),
            Algorithm::Gemm
        );
        // the input gradient is the forward pass with the channels swapped
        let s = shape(8, 1, 96, 32);
        assert_eq!(
            plan(&s, Pass::InputGrad, &cfg),
            fwd(ConvShape { cin: 32, cout: 1, ..s })
        );
    }

    /// Each setting moves the layers it names and no others.
    #[test]
    fn settings_move_their_layers() {
        let s = shape(8, 64, 96, 64);
        let on = KernelConfig::default();
        let off = KernelConfig {
            winograd: Winograd::Off,
            ..on
        };
        assert_eq!(plan(&s, Pass::Forward, &on), Algorithm::Winograd(Tile::F4x4));
        let f2 = KernelConfig {
            winograd: Winograd::F2x2,
            ..on
        };
        assert_eq!(plan(&s, Pass::Forward, &f2), Algorithm::Winograd(Tile::F2x2));
        let expect = if crate::cpu::has_avx512() {
            Algorithm::Direct
        } else {
            Algorithm::Shifted
        };
        assert_eq!(plan(&s, Pass::Forward, &off), expect);
        let no_direct = KernelConfig { direct: false, ..off };
        assert_eq!(plan(&s, Pass::Forward, &no_direct), Algorithm::Shifted);
        assert_eq!(plan(&s, Pass::WeightGrad, &off), Algorithm::Shifted);
        let small = shape(8, 32, 12, 32);
        let always = KernelConfig {
            batched: Batched::Always,
            ..on
        };
        assert_eq!(plan(&small, Pass::Forward, &on), Algorithm::Im2col);
        assert_eq!(plan(&small, Pass::Forward, &always), Algorithm::Batched);
        let up = ConvShape {
            upsample: 4,
            ..shape(8, 32, 12, 16)
        };
        assert_eq!(plan(&up, Pass::Forward, &on), Algorithm::Upsampled);
        let not_up = KernelConfig { upsampled: false, ..on };
        assert_eq!(
            plan(&up, Pass::Forward, &not_up),
            plan(&shape(8, 32, 48, 16), Pass::Forward, &not_up)
        );
    }
}
