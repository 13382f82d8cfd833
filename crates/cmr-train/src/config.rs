//! `TrainConfig`: everything a run needs, written as `config.json` next to
//! every model, and its presets.

use std::path::Path;

use cmr_data::{AugmentConfig, Grouping, LoadOptions, Normalization, VolumeWindow};
use cmr_loss::Loss;
use cmr_models::{Architecture, KernelConfig, ModelConfig, Preset};
use serde::{Deserialize, Serialize};

use crate::device::DeviceSpec;
use crate::ema::EmaConfig;
use crate::error::{Result, TrainError};
use crate::optim::OptimConfig;
use crate::pseudo::PseudoLabels;
use crate::schedule::Schedule;

fn default_size() -> usize {
    96
}
fn default_val_fraction() -> f64 {
    0.2
}
fn one() -> usize {
    1
}

/// The largest `data.size`: every slice is padded to `size × size`, so a typo
/// (`100000`) would otherwise ask for gigabytes per image.
pub const MAX_SIZE: usize = 1024;

/// Inputs: size, validation split, normalisation, augmentation.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DataConfig {
    /// Images are centre padded/cropped to `size × size`.
    #[serde(default = "default_size")]
    pub size: usize,
    /// Fraction of `train/` held out for validation when there is no `val/`.
    #[serde(default = "default_val_fraction")]
    pub val_fraction: f64,
    /// Which slices come from one patient: hold-outs and folds take whole
    /// patients. Configs that do not say split by slice, as runs made before
    /// grouping existed did.
    #[serde(default)]
    pub grouping: Grouping,
    #[serde(default)]
    pub normalization: Normalization,
    #[serde(default)]
    pub augment: AugmentConfig,
    /// In-plane spacing (mm) that volume slices are resampled to, for
    /// training and prediction alike; absent for PNG slices (they have no
    /// spacing) and then volumes are padded or cropped, not resampled.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub spacing_mm: Option<f64>,
    /// The percentiles of a volume's intensities that map to 0 and 255, in
    /// training and prediction alike (PNG slices are 8-bit already).
    #[serde(default)]
    pub window: VolumeWindow,
    /// Self-training: the dataset's unlabelled images, labelled by a teacher
    /// cross-validation fold by fold, join each fold's training slices
    /// (cross-validations only; see [`crate::PseudoLabels`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pseudo_labels: Option<PseudoLabels>,
}

impl DataConfig {
    /// How the data of this recipe are loaded.
    pub fn load_options(&self) -> LoadOptions {
        LoadOptions {
            size: self.size,
            spacing_mm: self.spacing_mm,
            window: self.window,
        }
    }
}

impl Default for DataConfig {
    fn default() -> Self {
        Self {
            size: default_size(),
            val_fraction: default_val_fraction(),
            grouping: Grouping::Consecutive { size: 2 },
            normalization: Normalization::default(),
            augment: AugmentConfig::none(),
            spacing_mm: None,
            window: VolumeWindow::CLIP,
            pseudo_labels: None,
        }
    }
}

/// Stop when the validation score has not improved by `min_delta` for
/// `patience` validations.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EarlyStopping {
    pub patience: usize,
    #[serde(default)]
    pub min_delta: f64,
}

/// Which weights a run keeps as its model (`model.safetensors`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Keep {
    /// The weights of the best validation score. Scoring that model on the
    /// same validation slices is optimistic: it was chosen on them.
    #[default]
    Best,
    /// The weights after the last epoch (cross-validation keeps these, so that
    /// each fold's score comes from slices that chose nothing).
    Last,
}

/// A training recipe. Written to `config.json` before the first step and
/// read back by `resume`, `eval` and `predict`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrainConfig {
    pub model: ModelConfig,
    #[serde(default)]
    pub data: DataConfig,
    #[serde(default)]
    pub loss: Loss,
    #[serde(default)]
    pub optim: OptimConfig,
    #[serde(default)]
    pub schedule: Schedule,
    pub epochs: usize,
    pub batch_size: usize,
    #[serde(default)]
    pub seed: u64,
    #[serde(default)]
    pub device: DeviceSpec,
    /// Validate every this many epochs (and always after the last).
    #[serde(default = "one")]
    pub val_every: usize,
    #[serde(default)]
    pub early_stopping: Option<EarlyStopping>,
    /// Which weights become `model.safetensors`.
    #[serde(default)]
    pub keep: Keep,
    /// Which CPU kernels run (changes results to rounding only; runs saved
    /// before this setting existed have the default).
    #[serde(default)]
    pub kernels: KernelConfig,
    /// A moving average of the weights, which validation and the kept model
    /// use (none: the live weights).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ema: Option<EmaConfig>,
}

/// The settings a run may change when it resumes (the rest of its recipe is
/// fixed: another batch size, rate or seed would make it another run).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ConfigChanges {
    /// The new total number of epochs.
    pub epochs: Option<usize>,
    pub val_every: Option<usize>,
    pub early_stopping: Option<EarlyStopping>,
    /// Where it runs.
    pub device: Option<DeviceSpec>,
    /// Which CPU kernels run.
    pub kernels: Option<KernelConfig>,
}

impl ConfigChanges {
    /// The top-level `TrainConfig` keys these settings are.
    pub const KEYS: [&'static str; 5] = ["epochs", "val_every", "early_stopping", "device", "kernels"];

    /// No change but the number of epochs.
    pub fn epochs(epochs: Option<usize>) -> Self {
        Self {
            epochs,
            ..Self::default()
        }
    }

    /// Whether the dotted key `key` (as [`TrainConfig::differences`] names
    /// it) may change on resume.
    pub fn may_change(key: &str) -> bool {
        let top = key.split('.').next().unwrap_or(key);
        Self::KEYS.contains(&top)
    }

    pub fn apply(&self, config: &mut TrainConfig) {
        if let Some(e) = self.epochs {
            config.epochs = e;
        }
        if let Some(v) = self.val_every {
            config.val_every = v;
        }
        if let Some(e) = &self.early_stopping {
            config.early_stopping = Some(e.clone());
        }
        if let Some(k) = self.kernels {
            config.kernels = k;
        }
        if let Some(d) = self.device {
            config.device = d;
        }
    }
}

/// Named recipes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TrainPreset {
    /// The report's recipe: widths of the paper, Adam 1e-3, StepLR ×0.5 every
    /// 20 epochs, 200 epochs, batch 8, soft Dice, the five augmentations.
    Seed,
    /// Narrow networks (`small` widths) that train in minutes on two CPU
    /// cores: Dice+CE, Adam 2e-3 with a cosine schedule; U-Net at the small
    /// widths with the robust augmentation for 400 epochs, U-Net 3+ at 1.5×
    /// them (24…192, 24-channel branches) with it for 200; SegNet with the
    /// five augmentations for 80.
    #[default]
    Cpu,
}

impl TrainPreset {
    pub const ALL: [Self; 2] = [Self::Seed, Self::Cpu];

    pub fn name(self) -> &'static str {
        match self {
            Self::Seed => "seed",
            Self::Cpu => "cpu",
        }
    }
}

impl std::fmt::Display for TrainPreset {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for TrainPreset {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Self::ALL
            .into_iter()
            .find(|p| p.name().eq_ignore_ascii_case(s))
            .ok_or_else(|| format!("unknown training preset {s:?} (expected seed or cpu)"))
    }
}

impl TrainConfig {
    /// The recipe `preset` for `arch`.
    pub fn preset(preset: TrainPreset, arch: Architecture) -> Self {
        match preset {
            TrainPreset::Seed => Self {
                model: ModelConfig::preset(arch, Preset::Seed),
                data: DataConfig {
                    augment: AugmentConfig::report(),
                    ..DataConfig::default()
                },
                loss: Loss::soft_dice(),
                optim: OptimConfig::adam(1e-3),
                schedule: Schedule::Step {
                    step_size: 20,
                    gamma: 0.5,
                },
                epochs: 200,
                batch_size: 8,
                seed: 42,
                device: DeviceSpec::Auto,
                val_every: 1,
                early_stopping: None,
                keep: Keep::Best,
                kernels: KernelConfig::default(),
                ema: None,
            },
            TrainPreset::Cpu => Self {
                // U-Net 3+ trains at 1.5× the small widths with the robust
                // augmentation for 200 epochs (3.9 s an epoch on two cores:
                // 13 minutes, 65 for five folds; cross-validated 0.898 against
                // 0.892 for the small widths at 160); U-Net at the small widths
                // with it for 400 epochs (1.5 s an epoch on one core: 10
                // minutes; cross-validated 0.895, 0.902 with TTA, against
                // 0.890 at 200 epochs and 0.879 with the report's five for 80;
                // 0.866 on deformed copies against 0.783); SegNet keeps the
                // report's five for 80 epochs until cross-validation has
                // measured it with the robust augmentation.
                model: match arch {
                    Architecture::UNet3Plus => ModelConfig::UNet3Plus(cmr_models::UNet3PlusConfig {
                        filters: vec![24, 48, 96, 192],
                        branch_channels: 24,
                        ..cmr_models::UNet3PlusConfig::small()
                    }),
                    Architecture::SegNet | Architecture::UNet => ModelConfig::preset(arch, Preset::Small),
                },
                data: DataConfig {
                    augment: match arch {
                        Architecture::UNet3Plus | Architecture::UNet => AugmentConfig::robust(),
                        Architecture::SegNet => AugmentConfig::report(),
                    },
                    ..DataConfig::default()
                },
                loss: Loss::dice_ce(1.0, 1.0),
                optim: OptimConfig::adam(2e-3),
                schedule: Schedule::Cosine {
                    warmup_epochs: 2,
                    min_lr: 1e-5,
                },
                epochs: match arch {
                    Architecture::UNet => 400,
                    Architecture::UNet3Plus => 200,
                    Architecture::SegNet => 80,
                },
                batch_size: 8,
                seed: 42,
                device: DeviceSpec::Auto,
                val_every: 1,
                early_stopping: None,
                keep: Keep::Best,
                kernels: KernelConfig::default(),
                ema: None,
            },
        }
    }

    /// Reject inconsistent settings, saying which.
    pub fn validate(&self) -> Result<()> {
        self.model.validate()?;
        self.loss.validate(self.model.num_classes())?;
        self.optim.validate()?;
        self.schedule.validate()?;
        self.data.augment.validate()?;
        self.data.grouping.validate()?;
        self.data.window.validate()?;
        if let Some(e) = &self.ema {
            e.validate()?;
        }
        if let Some(t) = self.data.spacing_mm
            && !(t.is_finite() && (0.05..=50.0).contains(&t))
        {
            return Err(TrainError::Config(format!(
                "data.spacing_mm must be from 0.05 to 50 mm, got {t}"
            )));
        }
        if self.data.size > MAX_SIZE {
            return Err(TrainError::Config(format!(
                "data.size is limited to {MAX_SIZE} pixels (the slices are 96), got {}",
                self.data.size
            )));
        }
        self.model
            .check_input_size(self.data.size, self.data.size)
            .map_err(|e| TrainError::Config(format!("data.size: {e}")))?;
        if self.epochs == 0 || self.batch_size == 0 || self.val_every == 0 {
            return Err(TrainError::Config(format!(
                "epochs, batch_size and val_every must be at least 1, got {}, {} and {}",
                self.epochs, self.batch_size, self.val_every
            )));
        }
        if !(self.data.val_fraction > 0.0 && self.data.val_fraction < 1.0) {
            return Err(TrainError::Config(format!(
                "data.val_fraction must be in (0, 1), got {}",
                self.data.val_fraction
            )));
        }
        Ok(())
    }

    /// `self` with the keys of the TOML file at `path` laid over it. Tables
    /// merge key by key; a table naming another variant (`arch` of the model,
    /// `kind` of the loss, optimiser or schedule) replaces the old one
    /// entirely. Unknown keys are an error naming the file.
    pub fn overlay_toml(&self, path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| TrainError::io(path, e))?;
        let file_err = |message: String| TrainError::ConfigFile {
            path: path.to_path_buf(),
            message,
        };
        let overlay: toml::Table = toml::from_str(&text).map_err(|e| file_err(e.to_string()))?;
        // JSON has no NaN or infinity: say so, rather than "invalid type: null"
        if let Some(key) = non_finite(&toml::Value::Table(overlay.clone()), "") {
            return Err(file_err(format!(
                "{key}: nan and inf are not accepted (give a finite number)"
            )));
        }
        let overlay = serde_json::to_value(overlay).map_err(|e| file_err(e.to_string()))?;
        let mut base = serde_json::to_value(self).map_err(|e| file_err(e.to_string()))?;
        merge(&mut base, overlay);
        serde_json::from_value(base).map_err(|e| file_err(e.to_string()))
    }

    /// Read and validate a `config.json`: a file that does not parse, or
    /// holds settings `validate` rejects, is an error naming it.
    pub fn read_json(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| TrainError::io(path, e))?;
        let config: Self = serde_json::from_str(&text).map_err(|e| TrainError::ConfigFile {
            path: path.to_path_buf(),
            message: e.to_string(),
        })?;
        config.validate().map_err(|e| TrainError::ConfigFile {
            path: path.to_path_buf(),
            message: e.to_string(),
        })?;
        Ok(config)
    }

    /// The settings in which `other` differs from `self`: (key, old value,
    /// new value), keys as dotted paths (`optim.lr`), values as JSON.
    pub fn differences(&self, other: &Self) -> Vec<(String, String, String)> {
        fn walk(prefix: &str, a: &serde_json::Value, b: &serde_json::Value, out: &mut Vec<(String, String, String)>) {
            use serde_json::Value::Object;
            match (a, b) {
                (Object(x), Object(y)) => {
                    let mut keys: Vec<&String> = x.keys().chain(y.keys()).collect();
                    keys.sort();
                    keys.dedup();
                    let null = serde_json::Value::Null;
                    for k in keys {
                        let key = if prefix.is_empty() {
                            k.clone()
                        } else {
                            format!("{prefix}.{k}")
                        };
                        walk(&key, x.get(k).unwrap_or(&null), y.get(k).unwrap_or(&null), out);
                    }
                }
                _ if a != b => out.push((prefix.to_string(), a.to_string(), b.to_string())),
                _ => {}
            }
        }
        let a = serde_json::to_value(self).expect("a TrainConfig always serialises");
        let b = serde_json::to_value(other).expect("a TrainConfig always serialises");
        let mut out = Vec::new();
        walk("", &a, &b, &mut out);
        out
    }

    pub fn to_json(&self) -> String {
        serde_json::to_string_pretty(self).expect("a TrainConfig always serialises")
    }
}

/// The dotted key of the first NaN or infinite float in `value`.
fn non_finite(value: &toml::Value, key: &str) -> Option<String> {
    let join = |k: &str| {
        if key.is_empty() {
            k.to_string()
        } else {
            format!("{key}.{k}")
        }
    };
    match value {
        toml::Value::Float(f) if !f.is_finite() => Some(key.to_string()),
        toml::Value::Table(t) => t.iter().find_map(|(k, v)| non_finite(v, &join(k))),
        toml::Value::Array(a) => a
            .iter()
            .enumerate()
            .find_map(|(i, v)| non_finite(v, &format!("{key}[{i}]"))),
        _ => None,
    }
}

/// The keys that name an enum variant in our configs.
const TAGS: [&str; 2] = ["arch", "kind"];

/// Lay `overlay` over `base`: objects merge recursively (unless they name
/// different variants), anything else replaces.
fn merge(base: &mut serde_json::Value, overlay: serde_json::Value) {
    match (base, overlay) {
        (serde_json::Value::Object(b), serde_json::Value::Object(o))
            if TAGS.iter().all(|t| match (b.get(*t), o.get(*t)) {
                (Some(x), Some(y)) => x == y,
                _ => true,
            }) =>
        {
            for (k, v) in o {
                merge(b.entry(k).or_insert(serde_json::Value::Null), v);
            }
        }
        (slot, v) => *slot = v,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn presets_are_valid_and_the_seed_one_is_the_report() {
        for p in TrainPreset::ALL {
            for a in Architecture::ALL {
                TrainConfig::preset(p, a).validate().unwrap();
            }
        }
        let s = TrainConfig::preset(TrainPreset::Seed, Architecture::UNet3Plus);
        assert_eq!(s.optim.lr(), 1e-3);
        assert_eq!(s.epochs, 200);
        assert_eq!(s.batch_size, 8);
        assert_eq!(s.loss, Loss::soft_dice());
        assert_eq!(
            s.schedule,
            Schedule::Step {
                step_size: 20,
                gamma: 0.5
            }
        );
        assert_eq!(s.data.augment, AugmentConfig::report());
    }

    #[test]
    fn json_round_trip() {
        let c = TrainConfig::preset(TrainPreset::Cpu, Architecture::SegNet);
        let back: TrainConfig = serde_json::from_str(&c.to_json()).unwrap();
        assert_eq!(back, c);
    }

    #[test]
    fn toml_overlays_merge_and_unknown_keys_fail() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.toml");
        std::fs::write(
            &path,
            "epochs = 3\nseed = 7\n[optim]\nlr = 0.01\n[data.augment]\nhflip = 0.25\n[schedule]\nkind = \"poly\"\npower = 0.9\n",
        )
        .unwrap();
        let base = TrainConfig::preset(TrainPreset::Seed, Architecture::UNet);
        let c = base.overlay_toml(&path).unwrap();
        assert_eq!(c.epochs, 3);
        assert_eq!(c.seed, 7);
        assert_eq!(c.optim, OptimConfig::adam(0.01));
        assert_eq!(c.data.augment.hflip, 0.25);
        assert_eq!(c.data.augment.vflip, 0.5);
        assert_eq!(c.schedule, Schedule::Poly { power: 0.9 });

        std::fs::write(
            &path,
            "[model]\narch = \"unet3plus\"\nfilters = [8, 16, 32, 64]\nbranch_channels = 8\n",
        )
        .unwrap();
        let c = base.overlay_toml(&path).unwrap();
        assert_eq!(c.model.architecture(), Architecture::UNet3Plus);

        std::fs::write(&path, "[optim]\nlr = nan\n").unwrap();
        let err = base.overlay_toml(&path).unwrap_err().to_string();
        assert!(
            err.contains("optim.lr") && err.contains("nan") && !err.contains("null"),
            "{err}"
        );
        std::fs::write(&path, "[data.augment.gamma]\nmax = inf\n").unwrap();
        let err = base.overlay_toml(&path).unwrap_err().to_string();
        assert!(err.contains("data.augment.gamma.max"), "{err}");

        std::fs::write(&path, "epoch = 3\n").unwrap();
        let err = base.overlay_toml(&path).unwrap_err().to_string();
        assert!(err.contains("c.toml") && err.contains("epoch"), "{err}");
        std::fs::write(&path, "[optim]\nkind = \"adam\"\nlr = 0.1\nmomentum = 0.9\n").unwrap();
        assert!(base.overlay_toml(&path).is_err());
    }

    #[test]
    fn invalid_settings_are_named() {
        let mut c = TrainConfig::preset(TrainPreset::Cpu, Architecture::UNet);
        c.data.size = 90;
        let err = c.validate().unwrap_err().to_string();
        assert!(err.contains("data.size"), "{err}");
        let mut c = TrainConfig::preset(TrainPreset::Cpu, Architecture::UNet);
        c.batch_size = 0;
        assert!(c.validate().is_err());
        let mut c = TrainConfig::preset(TrainPreset::Cpu, Architecture::UNet);
        c.data.size = 100_000 * 16;
        let err = c.validate().unwrap_err().to_string();
        assert!(err.contains("limited to 1024"), "{err}");
        c.data.size = MAX_SIZE;
        c.validate().unwrap();
    }

    #[test]
    fn a_loaded_config_is_validated_naming_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("config.json");
        let mut c = TrainConfig::preset(TrainPreset::Cpu, Architecture::UNet);
        std::fs::write(&path, c.to_json()).unwrap();
        assert_eq!(TrainConfig::read_json(&path).unwrap(), c);
        c.data.size = 0;
        std::fs::write(&path, c.to_json()).unwrap();
        let err = TrainConfig::read_json(&path).unwrap_err().to_string();
        assert!(err.contains("config.json") && err.contains("data.size"), "{err}");
    }

    #[test]
    fn differences_name_each_changed_key_and_resume_may_change_only_some() {
        let a = TrainConfig::preset(TrainPreset::Cpu, Architecture::UNet);
        assert!(a.differences(&a).is_empty());
        let mut b = a.clone();
        b.epochs = 7;
        b.optim.set_lr(0.5);
        b.batch_size = 4;
        b.early_stopping = Some(EarlyStopping {
            patience: 3,
            min_delta: 0.0,
        });
        let d = b.differences(&a);
        let keys: Vec<&str> = d.iter().map(|(k, ..)| k.as_str()).collect();
        assert_eq!(keys, ["batch_size", "early_stopping", "epochs", "optim.lr"], "{d:?}");
        assert_eq!(d[0], ("batch_size".to_string(), "4".to_string(), "8".to_string()));
        let may: Vec<bool> = keys.iter().map(|k| ConfigChanges::may_change(k)).collect();
        assert_eq!(may, [false, true, true, false]);
        assert!(ConfigChanges::may_change("early_stopping.patience"));
        assert!(!ConfigChanges::may_change("epochs_x"));

        let mut c = a.clone();
        ConfigChanges {
            epochs: Some(7),
            val_every: Some(2),
            early_stopping: Some(EarlyStopping {
                patience: 3,
                min_delta: 0.0,
            }),
            device: Some(DeviceSpec::Cpu),
            kernels: Some(KernelConfig {
                direct: false,
                ..KernelConfig::default()
            }),
        }
        .apply(&mut c);
        let keys: Vec<String> = a.differences(&c).into_iter().map(|(k, ..)| k).collect();
        assert_eq!(
            keys,
            ["device", "early_stopping", "epochs", "kernels.direct", "val_every"]
        );
        assert!(keys.iter().all(|k| ConfigChanges::may_change(k)));
    }
}
