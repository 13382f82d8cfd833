//! Every environment variable the `cmr` and `cargo xtask` binaries read, as
//! named constants, and the only code that reads them (`cargo xtask tidy`
//! checks that no other file does; xtask includes this file). The libraries
//! read none: what these say reaches them as typed settings
//! ([`KernelConfig`], paths), saved with each run where they shape it.
//!
//! `RUST_LOG` (the log filter) is read by `tracing-subscriber` itself.

#![allow(dead_code)] // each binary uses part of it

use std::path::PathBuf;

use anyhow::bail;
use cmr_models::KernelConfig;
use cmr_models::backend::{Batched, Simd, Winograd};

/// `0`: candle's own ops everywhere instead of the CPU kernels (`1`: on,
/// the default).
pub const FAST: &str = "CMR_FAST";
/// `0`: the kernels' loops in the build's baseline instructions instead of
/// the widest the CPU has (the same bits, slower).
pub const SIMD: &str = "CMR_SIMD";
/// Winograd's minimal filtering for 3×3 layers with many channels: `0`
/// off, `2` F(2×2) tiles everywhere it runs, `4` F(4×4) tiles there, `1`
/// where measured faster with the tile measured faster (the default).
pub const WINOGRAD: &str = "CMR_WINOGRAD";
/// Small images' convolutions batch-wide: `0` never, `1` where measured
/// faster (the default), `always` for every image under 32×32.
pub const BATCHED: &str = "CMR_BATCHED";
/// `0`: no direct AVX-512 convolution kernel (shifted-view GEMMs instead).
pub const DIRECT: &str = "CMR_DIRECT";
/// `0`: up-sample U-Net 3+'s deeper decoder inputs before convolving them,
/// instead of convolving them at their own resolution.
pub const UPSAMPLED: &str = "CMR_UPSAMPLED";
/// The kernel settings above, in the order the README lists them.
pub const KERNEL_VARS: [&str; 6] = [FAST, SIMD, WINOGRAD, BATCHED, DIRECT, UPSAMPLED];

/// An extra folder of models, searched by name before `./models`.
pub const MODELS_DIR: &str = "CMR_MODELS_DIR";
/// Where models embedded in the binary are unpacked (else
/// `$XDG_CACHE_HOME/cmr`, else `$HOME/.cache/cmr`).
pub const CACHE_DIR: &str = "CMR_CACHE_DIR";
pub const XDG_CACHE_HOME: &str = "XDG_CACHE_HOME";
pub const HOME: &str = "HOME";
/// A TrueType font for the labels of `curves.png` (else the first of
/// [`SYSTEM_FONTS`] found).
pub const PLOT_FONT: &str = "CMR_PLOT_FONT";

/// Common places of a sans-serif TrueType font.
pub const SYSTEM_FONTS: [&str; 5] = [
    "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/TTF/DejaVuSans.ttf",
    "/Library/Fonts/Arial.ttf",
    "C:\\Windows\\Fonts\\arial.ttf",
];

/// The fonts to try for the curves, in order.
pub fn plot_fonts() -> Vec<PathBuf> {
    path(PLOT_FONT)
        .into_iter()
        .chain(SYSTEM_FONTS.iter().map(PathBuf::from))
        .collect()
}

/// The variable's value, if it is set (and not empty).
fn value(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.is_empty())
}

/// A path from the environment, if set and not empty.
pub fn path(name: &str) -> Option<PathBuf> {
    std::env::var_os(name).filter(|v| !v.is_empty()).map(PathBuf::from)
}

/// `0` or `1`.
fn switch(name: &str, v: &str) -> anyhow::Result<bool> {
    match v {
        "0" => Ok(false),
        "1" => Ok(true),
        _ => bail!("{name}={v}: expected 0 (off) or 1 (on)"),
    }
}

/// The kernel settings the environment asks for, laid over `base`; `None`
/// when it sets none of them (a resumed run then keeps its own).
pub fn kernels(base: KernelConfig) -> anyhow::Result<Option<KernelConfig>> {
    let mut k = base;
    let mut any = false;
    for name in KERNEL_VARS {
        let Some(v) = value(name) else { continue };
        any = true;
        match name {
            FAST => k.enabled = switch(name, &v)?,
            SIMD => {
                k.simd = if switch(name, &v)? {
                    Simd::Widest
                } else {
                    Simd::Baseline
                }
            }
            DIRECT => k.direct = switch(name, &v)?,
            UPSAMPLED => k.upsampled = switch(name, &v)?,
            WINOGRAD => {
                k.winograd = match v.as_str() {
                    "0" => Winograd::Off,
                    "1" => Winograd::Auto,
                    "2" => Winograd::F2x2,
                    "4" => Winograd::F4x4,
                    _ => bail!("{name}={v}: expected 0 (off), 1 (where faster), 2 (F(2×2) tiles) or 4 (F(4×4) tiles)"),
                }
            }
            BATCHED => {
                k.batched = match v.as_str() {
                    "0" => Batched::Off,
                    "1" => Batched::Auto,
                    "always" => Batched::Always,
                    _ => bail!("{name}={v}: expected 0 (never), 1 (where faster) or always"),
                }
            }
            _ => unreachable!("every kernel variable is handled"),
        }
    }
    Ok(any.then_some(k))
}
