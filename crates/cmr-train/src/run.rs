//! A run folder and what is in it.
//!
//! ```text
//! RUN/config.json           the TrainConfig, written before the first step
//! RUN/model.safetensors     the model: best on validation, or the last (config `keep`)
//! RUN/last.safetensors      the latest weights (for resume)
//! RUN/optimizer.safetensors the optimiser state (for resume)
//! RUN/splits.json           the training and validation ids and their fingerprint
//! RUN/state.json            progress: epochs done, best score, steps
//! RUN/metrics.csv           one row per epoch
//! RUN/curves.png            loss and Dice curves
//! ```
//! Every file is written atomically.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::config::TrainConfig;
use crate::error::{Result, TrainError};

/// The files of a run.
#[derive(Clone, Debug)]
pub struct RunDir {
    root: PathBuf,
}

impl RunDir {
    pub const CONFIG: &'static str = "config.json";
    pub const BEST: &'static str = "model.safetensors";
    pub const LAST: &'static str = "last.safetensors";
    pub const OPTIMIZER: &'static str = "optimizer.safetensors";
    pub const STATE: &'static str = "state.json";
    pub const SPLITS: &'static str = "splits.json";
    pub const METRICS: &'static str = "metrics.csv";
    pub const CURVES: &'static str = "curves.png";

    /// A run folder at `root` (nothing is touched).
    pub fn at(root: &Path) -> Self {
        Self {
            root: root.to_path_buf(),
        }
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    pub fn file(&self, name: &str) -> PathBuf {
        self.root.join(name)
    }

    /// Start a new run: create the folder and write `config.json`. A folder
    /// that already holds a run is refused (resume it or choose another).
    pub fn create(root: &Path, config: &TrainConfig) -> Result<Self> {
        let run = Self::at(root);
        if run.file(Self::CONFIG).exists() {
            return Err(TrainError::Run {
                path: root.to_path_buf(),
                message: "already holds a run (resume it, or choose another output folder)".into(),
            });
        }
        std::fs::create_dir_all(root).map_err(|e| TrainError::io(root, e))?;
        cmr_data::write_atomic(&run.file(Self::CONFIG), config.to_json().as_bytes())?;
        Ok(run)
    }

    /// Open an existing run and read its configuration.
    pub fn open(root: &Path) -> Result<(Self, TrainConfig)> {
        let run = Self::at(root);
        let config_path = run.file(Self::CONFIG);
        if !config_path.is_file() {
            return Err(TrainError::Run {
                path: root.to_path_buf(),
                message: format!("not a run folder (no {})", Self::CONFIG),
            });
        }
        let config = TrainConfig::read_json(&config_path)?;
        Ok((run, config))
    }

    /// Read `state.json`; `None` before the first checkpoint.
    pub fn read_state(&self) -> Result<Option<TrainState>> {
        read_json_if_there(&self.file(Self::STATE))
    }

    pub fn write_state(&self, state: &TrainState) -> Result<()> {
        let text = serde_json::to_string_pretty(state).expect("state serialises");
        cmr_data::write_atomic(&self.file(Self::STATE), text.as_bytes())?;
        Ok(())
    }
}

/// Read the JSON file at `path`; `None` when there is none, an error naming
/// the file when it does not parse.
pub(crate) fn read_json_if_there<T: serde::de::DeserializeOwned>(path: &Path) -> Result<Option<T>> {
    if !path.exists() {
        return Ok(None);
    }
    let text = std::fs::read_to_string(path).map_err(|e| TrainError::io(path, e))?;
    serde_json::from_str(&text)
        .map(Some)
        .map_err(|e| TrainError::ConfigFile {
            path: path.to_path_buf(),
            message: e.to_string(),
        })
}

/// The best validation score so far.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Best {
    /// 1-based epoch at which it was reached.
    pub epoch: usize,
    /// Mean foreground Dice on the validation split.
    pub mean_dice: f64,
}

/// Progress of a run, enough to continue it exactly. The random streams are
/// keyed by (seed, epoch, sample), so no generator state needs keeping.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct TrainState {
    /// Epochs completed.
    pub epochs_done: usize,
    /// Batches done in the epoch under way (non-zero after an interruption).
    pub batches_done: usize,
    /// Sum of the batch losses of those batches.
    pub partial_loss_sum: f64,
    /// Seconds spent in the epoch under way before the interruption.
    #[serde(default)]
    pub partial_seconds: f64,
    pub optimizer_steps: u64,
    pub best: Option<Best>,
    /// Validations since the best one (for early stopping).
    pub validations_since_best: usize,
    /// Whether the run ended (all epochs, or stopped early).
    pub finished: bool,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::TrainPreset;
    use cmr_models::Architecture;

    #[test]
    fn create_open_and_refuse_to_overwrite() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("run");
        let cfg = TrainConfig::preset(TrainPreset::Cpu, Architecture::UNet);
        let run = RunDir::create(&root, &cfg).unwrap();
        assert!(run.file(RunDir::CONFIG).is_file());
        assert!(RunDir::create(&root, &cfg).is_err());
        let (_, back) = RunDir::open(&root).unwrap();
        assert_eq!(back, cfg);
        assert_eq!(run.read_state().unwrap(), None);
        let s = TrainState {
            epochs_done: 3,
            best: Some(Best {
                epoch: 2,
                mean_dice: 0.8,
            }),
            ..TrainState::default()
        };
        run.write_state(&s).unwrap();
        assert_eq!(run.read_state().unwrap(), Some(s));
        assert!(RunDir::open(dir.path()).is_err());
    }
}
