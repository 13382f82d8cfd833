//! Which kernels run: one plain value, saved with every run (`config.json`'s
//! `kernels`) and handed to every op. Nothing here reads the environment:
//! the binaries turn their `CMR_*` variables into a [`KernelConfig`].

use candle_core::{DType, Tensor};
use serde::{Deserialize, Serialize};

use crate::amx::MatrixUnit;

/// The kernels' settings. The default is what was measured fastest on this
/// project's machines; every other value computes the same function (the
/// results differ to rounding only, except [`Simd`], which gives the same
/// bits) and exists to compare or to work around a machine.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct KernelConfig {
    /// Run the fast kernels for f32 tensors on the CPU (`false`: candle's
    /// own ops everywhere, as on a GPU).
    pub enabled: bool,
    /// Vector instructions of the kernels' own loops.
    pub simd: Simd,
    /// Where 3×3 convolutions run by Winograd's minimal filtering.
    pub winograd: Winograd,
    /// Where small images' convolutions run batch-wide.
    pub batched: Batched,
    /// The direct AVX-512 convolution kernel from 32×32 up (where the CPU
    /// has AVX-512; elsewhere shifted-view GEMMs run instead).
    pub direct: bool,
    /// Convolve an up-sampled input at its own resolution (U-Net 3+'s
    /// decoder branches) instead of up-sampling it first.
    pub upsampled: bool,
    /// The precision of the convolutions' products: bf16 on the CPU's
    /// matrix engine (AMX, else AVX512-BF16) where it has one and the layer
    /// suits it ([`crate::plan`]), f32 elsewhere.
    pub precision: Precision,
    /// Which of the CPU's bf16 units bf16 products go to.
    pub bf16_unit: Bf16Unit,
}

impl Default for KernelConfig {
    fn default() -> Self {
        Self::DEFAULT
    }
}

impl KernelConfig {
    /// The default, as a constant.
    pub const DEFAULT: Self = Self {
        enabled: true,
        simd: Simd::Widest,
        winograd: Winograd::Auto,
        batched: Batched::Auto,
        direct: true,
        upsampled: true,
        precision: Precision::F32,
        bf16_unit: Bf16Unit::Auto,
    };

    /// candle's own ops everywhere.
    pub fn off() -> Self {
        Self {
            enabled: false,
            ..Self::default()
        }
    }

    /// Whether the fast kernels handle `x`: enabled, f32, on the CPU.
    pub fn applies(&self, x: &Tensor) -> bool {
        self.enabled && x.device().is_cpu() && x.dtype() == DType::F32
    }

    /// The backward pass for a training step on the input `x`: the kernels'
    /// tape where they run, candle's elsewhere.
    pub fn backward_for(&self, x: &Tensor) -> crate::Backward {
        if self.applies(x) {
            crate::Backward::Tape
        } else {
            crate::Backward::Candle
        }
    }
}

/// The vector instructions the kernels' own loops are compiled for
/// (`gemm`'s products choose their own).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Simd {
    /// The widest this CPU has: AVX-512, else AVX2 with FMA, else the
    /// build's baseline.
    #[default]
    Widest,
    /// The build's baseline (SSE2 on x86-64): the same bits, slower; for
    /// comparisons.
    Baseline,
}

/// The precision of the convolutions' products (their sums, BatchNorm, the
/// loss and the weights stay f32).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Precision {
    /// f32 products everywhere.
    #[default]
    F32,
    /// bf16 operands, f32 sums, on AMX tiles where the CPU has them, else on
    /// AVX512-BF16 dot products (for the layers [`crate::plan`] gives them;
    /// [`Bf16Unit`] chooses); f32 elsewhere.
    Bf16,
}

impl std::fmt::Display for Precision {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::F32 => "f32",
            Self::Bf16 => "bf16",
        })
    }
}

/// Which bf16 unit [`Precision::Bf16`]'s products go to.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Bf16Unit {
    /// The best this CPU has: AMX tiles, else AVX512-BF16 dot products,
    /// else none (f32).
    #[default]
    Auto,
    /// AVX512-BF16's dot products even where the CPU has AMX (for
    /// comparisons); none where it lacks them.
    Dots,
    /// None: f32 products, as on a CPU without a bf16 unit (to test the
    /// fallback anywhere).
    None,
}

impl Bf16Unit {
    /// The unit this setting gives on this CPU.
    pub fn unit(self) -> MatrixUnit {
        match self {
            Self::Auto => crate::amx::matrix_unit(),
            Self::Dots if crate::amx::has_avx512_bf16() => MatrixUnit::Avx512Bf16,
            Self::Dots | Self::None => MatrixUnit::None,
        }
    }
}

/// Where 3×3 convolutions run by Winograd's minimal filtering.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Winograd {
    /// Nowhere: the direct kernel or GEMMs.
    Off,
    /// Where it was measured faster, with the tile measured faster there
    /// (from 8×8 up with many channels, F(4×4) tiles where the batch has
    /// 144 of them: [`crate::plan`]).
    #[default]
    Auto,
    /// F(2×2, 3×3) on the layers that [`Winograd::Auto`] takes (for
    /// comparisons).
    F2x2,
    /// F(4×4, 3×3) on the layers that [`Winograd::Auto`] takes (for
    /// comparisons).
    F4x4,
}

/// Where the convolutions of images under 32×32 run batch-wide (one GEMM
/// over all images' columns) instead of image by image, forward and
/// backward.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Batched {
    /// Image by image.
    Off,
    /// Where it was measured faster: up to 8×8 with at least 256·256·9
    /// weights ([`crate::plan`]).
    #[default]
    Auto,
    /// For every image under 32×32 (for comparisons).
    Always,
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The saved form names every setting, and an empty object is the
    /// default (older runs' config.json have no `kernels`).
    #[test]
    fn saved_form_round_trips() {
        let cfg = KernelConfig {
            simd: Simd::Baseline,
            winograd: Winograd::F4x4,
            batched: Batched::Always,
            direct: false,
            ..KernelConfig::default()
        };
        let json = serde_json::to_string(&cfg).unwrap();
        assert_eq!(
            json,
            r#"{"enabled":true,"simd":"baseline","winograd":"f4x4","batched":"always","direct":false,"upsampled":true,"precision":"f32","bf16_unit":"auto"}"#
        );
        assert_eq!(serde_json::from_str::<KernelConfig>(&json).unwrap(), cfg);
        assert_eq!(
            serde_json::from_str::<KernelConfig>("{}").unwrap(),
            KernelConfig::default()
        );
        assert!(serde_json::from_str::<KernelConfig>(r#"{"winograd":"f3"}"#).is_err());
        assert!(serde_json::from_str::<KernelConfig>(r#"{"tile":2}"#).is_err());
    }
}
