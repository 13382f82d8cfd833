//! Network configurations, presets and the architecture enum.

use serde::{Deserialize, Serialize};

use crate::error::{ModelError, Result};

/// The three networks of the report.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Architecture {
    /// SegNet: VGG16-BN encoder, max-unpool decoder.
    SegNet,
    /// U-Net with transposed-conv up-sampling.
    UNet,
    /// U-Net 3+ with full-scale skip connections.
    UNet3Plus,
}

impl Architecture {
    pub const ALL: [Self; 3] = [Self::SegNet, Self::UNet, Self::UNet3Plus];

    /// The lower-case name used on the command line and in files.
    pub fn name(self) -> &'static str {
        match self {
            Self::SegNet => "segnet",
            Self::UNet => "unet",
            Self::UNet3Plus => "unet3plus",
        }
    }

    /// The name as the report writes it.
    pub fn display_name(self) -> &'static str {
        match self {
            Self::SegNet => "SegNet",
            Self::UNet => "U-Net",
            Self::UNet3Plus => "U-Net 3+",
        }
    }
}

impl std::fmt::Display for Architecture {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for Architecture {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Self::ALL
            .into_iter()
            .find(|a| a.name().eq_ignore_ascii_case(s))
            .ok_or_else(|| format!("unknown architecture {s:?} (expected segnet, unet or unet3plus)"))
    }
}

/// Named widths.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Preset {
    /// The report's widths (base 64).
    #[default]
    Seed,
    /// Narrow networks (base 16) that train in minutes on a 2-core CPU.
    Small,
}

impl Preset {
    pub const ALL: [Self; 2] = [Self::Seed, Self::Small];

    pub fn name(self) -> &'static str {
        match self {
            Self::Seed => "seed",
            Self::Small => "small",
        }
    }
}

impl std::fmt::Display for Preset {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for Preset {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Self::ALL
            .into_iter()
            .find(|p| p.name().eq_ignore_ascii_case(s))
            .ok_or_else(|| format!("unknown model preset {s:?} (expected seed or small)"))
    }
}

fn default_in_channels() -> usize {
    1
}

fn default_num_classes() -> usize {
    4
}

/// U-Net: `filters[i]` channels at level `i` (depth = `filters.len()`, 4 or 5).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UNetConfig {
    #[serde(default = "default_in_channels")]
    pub in_channels: usize,
    #[serde(default = "default_num_classes")]
    pub num_classes: usize,
    pub filters: Vec<usize>,
}

impl UNetConfig {
    /// The report's U-Net: depth 4, filters 64, 128, 256, 512.
    pub fn seed() -> Self {
        Self {
            in_channels: 1,
            num_classes: 4,
            filters: vec![64, 128, 256, 512],
        }
    }

    /// Depth 4, filters 16, 32, 64, 128.
    pub fn small() -> Self {
        Self {
            filters: vec![16, 32, 64, 128],
            ..Self::seed()
        }
    }
}

/// U-Net 3+: encoder as the U-Net; every decoder branch has
/// `branch_channels`, a decoder stage `branch_channels · depth`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UNet3PlusConfig {
    #[serde(default = "default_in_channels")]
    pub in_channels: usize,
    #[serde(default = "default_num_classes")]
    pub num_classes: usize,
    pub filters: Vec<usize>,
    pub branch_channels: usize,
    /// The UNet 3+ paper's deep supervision: a side output (3×3 conv to the
    /// classes, bilinearly up-sampled) from every decoder stage below the top
    /// and from the deepest encoder stage, trained with the main output
    /// ([`crate::UNet3Plus`]'s doc). Off, the network is the report's.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub deep_supervision: bool,
}

impl UNet3PlusConfig {
    /// The report's U-Net 3+: depth 4, filters 64…512, 64-channel branches.
    pub fn seed() -> Self {
        Self {
            in_channels: 1,
            num_classes: 4,
            filters: vec![64, 128, 256, 512],
            branch_channels: 64,
            deep_supervision: false,
        }
    }

    /// Depth 4, filters 16…128, 16-channel branches.
    pub fn small() -> Self {
        Self {
            filters: vec![16, 32, 64, 128],
            branch_channels: 16,
            ..Self::seed()
        }
    }

    /// Channels of a decoder stage: one branch per level.
    pub fn stage_channels(&self) -> usize {
        self.branch_channels * self.filters.len()
    }
}

/// SegNet: block `i` has `convs[i]` convolutions of `filters[i]` channels,
/// followed by 2×2 max-pooling with indices.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SegNetConfig {
    #[serde(default = "default_in_channels")]
    pub in_channels: usize,
    #[serde(default = "default_num_classes")]
    pub num_classes: usize,
    pub filters: Vec<usize>,
    pub convs: Vec<usize>,
}

impl SegNetConfig {
    /// The report's SegNet: a VGG16-BN encoder (64,64 | 128,128 | 256×3 |
    /// 512×3 | 512×3) and its mirror.
    pub fn seed() -> Self {
        Self {
            in_channels: 1,
            num_classes: 4,
            filters: vec![64, 128, 256, 512, 512],
            convs: vec![2, 2, 3, 3, 3],
        }
    }

    /// VGG16 layout at a quarter of the width.
    pub fn small() -> Self {
        Self {
            filters: vec![16, 32, 64, 128, 128],
            ..Self::seed()
        }
    }
}

/// The most channels a layer may have: wide enough for any network of the
/// report (1024), small enough that a typo (`100000`) is an error, not an
/// allocation of hundreds of gigabytes.
pub const MAX_WIDTH: usize = 4096;

/// The configuration of any of the three networks. In JSON and TOML the
/// architecture is the `arch` key: `{"arch": "unet", "filters": [...]}`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "arch", rename_all = "lowercase")]
pub enum ModelConfig {
    #[serde(rename = "segnet")]
    SegNet(SegNetConfig),
    #[serde(rename = "unet")]
    UNet(UNetConfig),
    #[serde(rename = "unet3plus")]
    UNet3Plus(UNet3PlusConfig),
}

impl ModelConfig {
    /// The configuration of `arch` at `preset` widths.
    pub fn preset(arch: Architecture, preset: Preset) -> Self {
        match (arch, preset) {
            (Architecture::SegNet, Preset::Seed) => Self::SegNet(SegNetConfig::seed()),
            (Architecture::SegNet, Preset::Small) => Self::SegNet(SegNetConfig::small()),
            (Architecture::UNet, Preset::Seed) => Self::UNet(UNetConfig::seed()),
            (Architecture::UNet, Preset::Small) => Self::UNet(UNetConfig::small()),
            (Architecture::UNet3Plus, Preset::Seed) => Self::UNet3Plus(UNet3PlusConfig::seed()),
            (Architecture::UNet3Plus, Preset::Small) => Self::UNet3Plus(UNet3PlusConfig::small()),
        }
    }

    pub fn architecture(&self) -> Architecture {
        match self {
            Self::SegNet(_) => Architecture::SegNet,
            Self::UNet(_) => Architecture::UNet,
            Self::UNet3Plus(_) => Architecture::UNet3Plus,
        }
    }

    pub fn in_channels(&self) -> usize {
        match self {
            Self::SegNet(c) => c.in_channels,
            Self::UNet(c) => c.in_channels,
            Self::UNet3Plus(c) => c.in_channels,
        }
    }

    pub fn num_classes(&self) -> usize {
        match self {
            Self::SegNet(c) => c.num_classes,
            Self::UNet(c) => c.num_classes,
            Self::UNet3Plus(c) => c.num_classes,
        }
    }

    /// Number of resolution levels (U-Nets) or pooling blocks (SegNet).
    pub fn depth(&self) -> usize {
        match self {
            Self::SegNet(c) => c.filters.len(),
            Self::UNet(c) => c.filters.len(),
            Self::UNet3Plus(c) => c.filters.len(),
        }
    }

    /// Input height and width must be multiples of this.
    pub fn size_multiple(&self) -> usize {
        match self {
            Self::SegNet(c) => 1 << c.filters.len(),
            Self::UNet(c) => 1 << (c.filters.len() - 1),
            Self::UNet3Plus(c) => 1 << (c.filters.len() - 1),
        }
    }

    /// Reject inconsistent configurations with a message saying what is wrong.
    pub fn validate(&self) -> Result<()> {
        let arch = self.architecture().name();
        let bad = |message: String| Err(ModelError::Config { arch, message });
        if self.in_channels() == 0 || self.num_classes() < 2 {
            return bad(format!(
                "in_channels must be at least 1 and num_classes at least 2, got {} and {}",
                self.in_channels(),
                self.num_classes()
            ));
        }
        let filters = match self {
            Self::SegNet(c) => &c.filters,
            Self::UNet(c) => &c.filters,
            Self::UNet3Plus(c) => &c.filters,
        };
        if filters.contains(&0) {
            return bad(format!("every filter width must be positive, got {filters:?}"));
        }
        let widest = match self {
            Self::UNet3Plus(c) => filters.iter().copied().chain([c.branch_channels]).max(),
            _ => filters.iter().copied().max(),
        };
        if widest.is_some_and(|w| w > MAX_WIDTH) || self.in_channels() > MAX_WIDTH || self.num_classes() > MAX_WIDTH {
            return bad(format!(
                "widths are limited to {MAX_WIDTH} channels (the report's widest is 1024), got {}",
                widest.unwrap_or(0).max(self.in_channels()).max(self.num_classes())
            ));
        }
        match self {
            Self::UNet(_) | Self::UNet3Plus(_) if !(4..=5).contains(&filters.len()) => {
                bad(format!("depth must be 4 or 5 (filters has {} entries)", filters.len()))
            }
            Self::UNet3Plus(c) if c.branch_channels == 0 => bad("branch_channels must be positive".into()),
            Self::SegNet(c) if c.filters.is_empty() || c.filters.len() > 6 => {
                bad(format!("SegNet needs 1 to 6 blocks, got {}", c.filters.len()))
            }
            Self::SegNet(c)
                if c.convs.len() != c.filters.len() || c.convs.contains(&0) || c.convs.iter().any(|&n| n > 8) =>
            {
                bad(format!(
                    "convs must give a count from 1 to 8 for each of the {} blocks, got {:?}",
                    c.filters.len(),
                    c.convs
                ))
            }
            _ => Ok(()),
        }
    }

    /// Check that an input of `height × width` fits the network.
    pub fn check_input_size(&self, height: usize, width: usize) -> Result<()> {
        let m = self.size_multiple();
        if height == 0 || width == 0 || !height.is_multiple_of(m) || !width.is_multiple_of(m) {
            return Err(ModelError::Config {
                arch: self.architecture().name(),
                message: format!("input {height}×{width} is not a multiple of {m} on each side"),
            });
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip() {
        for a in Architecture::ALL {
            assert_eq!(a.name().parse::<Architecture>().unwrap(), a);
        }
        assert!("resnet".parse::<Architecture>().is_err());
        assert_eq!("SMALL".parse::<Preset>().unwrap(), Preset::Small);
    }

    #[test]
    fn json_uses_the_arch_tag_and_rejects_unknown_keys() {
        let c = ModelConfig::preset(Architecture::UNet3Plus, Preset::Small);
        let s = serde_json::to_string(&c).unwrap();
        assert!(s.contains("\"arch\":\"unet3plus\""), "{s}");
        assert_eq!(serde_json::from_str::<ModelConfig>(&s).unwrap(), c);
        let bad = r#"{"arch":"unet","filters":[8,16,32,64],"widht":3}"#;
        assert!(serde_json::from_str::<ModelConfig>(bad).is_err());
    }

    #[test]
    fn invalid_configs_are_rejected() {
        let mut u = UNetConfig::small();
        u.filters = vec![8, 16, 32];
        let err = ModelConfig::UNet(u).validate().unwrap_err().to_string();
        assert!(err.contains("depth must be 4 or 5"), "{err}");
        let mut s = SegNetConfig::small();
        s.convs.pop();
        assert!(ModelConfig::SegNet(s).validate().is_err());
        let mut p = UNet3PlusConfig::small();
        p.branch_channels = 0;
        assert!(ModelConfig::UNet3Plus(p).validate().is_err());
        let c = ModelConfig::preset(Architecture::SegNet, Preset::Seed);
        assert!(c.check_input_size(96, 96).is_ok());
        assert!(c.check_input_size(80, 96).is_err());
        // widths past the bound are an error, not an allocation
        let mut u = UNetConfig::small();
        u.filters = vec![16, 32, 64, 100_000];
        let err = ModelConfig::UNet(u).validate().unwrap_err().to_string();
        assert!(err.contains("limited to 4096") && err.contains("100000"), "{err}");
        let mut p = UNet3PlusConfig::small();
        p.branch_channels = MAX_WIDTH + 1;
        assert!(ModelConfig::UNet3Plus(p).validate().is_err());
        let mut s = SegNetConfig::small();
        s.convs[0] = 1000;
        assert!(ModelConfig::SegNet(s).validate().is_err());
        let mut u = UNetConfig::seed();
        u.filters = vec![MAX_WIDTH; 4];
        assert!(ModelConfig::UNet(u).validate().is_ok());
        for a in Architecture::ALL {
            ModelConfig::preset(a, Preset::Seed).validate().unwrap();
        }
    }
}
