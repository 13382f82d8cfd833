//! A run folder and what is in it.
//!
//! ```text
//! RUN/config.json            the TrainConfig, written before the first step
//! RUN/model.safetensors      the model: best on validation, or the last (config `keep`)
//! RUN/checkpoint.safetensors the latest step: weights, optimiser state and progress
//! RUN/splits.json            the training and validation ids and their fingerprint
//! RUN/state.json             a readable copy of the checkpoint's progress
//! RUN/metrics.csv            one row per epoch
//! RUN/curves.png             loss and Dice curves
//! RUN/.lock                  held by the process writing the run
//! ```
//! Every file is written atomically (and its folder `fsync`ed). What resume
//! needs is one file, `checkpoint.safetensors`, replaced by a single rename:
//! a kill at any moment leaves the previous step's checkpoint or the new one,
//! never a mix. `model.safetensors` and `metrics.csv` are written before the
//! checkpoint of their epoch: a kill between them is undone by resuming,
//! which trains that epoch again, identically, and rewrites them. Runs from
//! before the checkpoint file (`last.safetensors`, `optimizer.safetensors`,
//! `state.json`) still resume; their next checkpoint replaces those files.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use cmr_data::DirLock;

use serde::{Deserialize, Serialize};

use crate::config::TrainConfig;
use crate::error::{Result, TrainError};

/// The files of a run.
#[derive(Clone, Debug)]
pub struct RunDir {
    root: PathBuf,
    /// The folder's lock, when this process writes the run.
    lock: Option<Arc<DirLock>>,
}

impl RunDir {
    pub const CONFIG: &'static str = "config.json";
    pub const BEST: &'static str = "model.safetensors";
    pub const CHECKPOINT: &'static str = "checkpoint.safetensors";
    /// The latest weights, in runs from before `checkpoint.safetensors`.
    pub const LAST: &'static str = "last.safetensors";
    /// The optimiser state, in runs from before `checkpoint.safetensors`.
    pub const OPTIMIZER: &'static str = "optimizer.safetensors";
    pub const STATE: &'static str = "state.json";
    pub const SPLITS: &'static str = "splits.json";
    pub const METRICS: &'static str = "metrics.csv";
    pub const CURVES: &'static str = "curves.png";

    /// A run folder at `root` (nothing is touched).
    pub fn at(root: &Path) -> Self {
        Self {
            root: root.to_path_buf(),
            lock: None,
        }
    }

    /// Take the run's lock for this process (a second writer fails at once,
    /// naming the holder) and remove the temporary files that killed writers
    /// left. Does nothing when this `RunDir` holds it already.
    pub fn lock(&mut self) -> Result<()> {
        if self.lock.is_none() {
            self.lock = Some(Arc::new(lock_and_sweep(&self.root)?));
        }
        Ok(())
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    pub fn file(&self, name: &str) -> PathBuf {
        self.root.join(name)
    }

    /// Start a new run: create the folder and write `config.json`. A folder
    /// that already holds a run is refused (resume it or choose another).
    /// The new run holds its folder's lock.
    pub fn create(root: &Path, config: &TrainConfig) -> Result<Self> {
        let mut run = Self::at(root);
        if run.file(Self::CONFIG).exists() {
            return Err(already_a_run(root));
        }
        std::fs::create_dir_all(root).map_err(|e| TrainError::io(root, e))?;
        run.lock()?;
        // checked again under the lock: another process may have been first
        if run.file(Self::CONFIG).exists() {
            return Err(already_a_run(root));
        }
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

    /// The progress of the latest checkpoint (read from its header; in an
    /// older run, `state.json`); `None` before the first checkpoint.
    pub fn read_state(&self) -> Result<Option<TrainState>> {
        let checkpoint = self.file(Self::CHECKPOINT);
        if checkpoint.exists() {
            let text = crate::checkpoint::Checkpoint::read_state(&checkpoint)?;
            return TrainState::from_json(&text, &checkpoint).map(Some);
        }
        read_json_if_there(&self.file(Self::STATE))
    }

    /// Write `state.json`, the readable copy of a checkpoint's progress.
    pub fn write_state(&self, state: &TrainState) -> Result<()> {
        cmr_data::write_atomic(&self.file(Self::STATE), state.to_json().as_bytes())?;
        Ok(())
    }
}

fn already_a_run(root: &Path) -> TrainError {
    TrainError::Run {
        path: root.to_path_buf(),
        message: "already holds a run (resume it, or choose another output folder)".into(),
    }
}

/// Lock the folder `root` and remove the temporary files of writes that
/// were killed there.
pub(crate) fn lock_and_sweep(root: &Path) -> Result<DirLock> {
    let lock = DirLock::acquire(root)?;
    for stale in cmr_data::remove_stale_temps(root)? {
        tracing::info!("removed {}, left by an interrupted write", stale.display());
    }
    Ok(lock)
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

impl TrainState {
    pub fn to_json(&self) -> String {
        serde_json::to_string_pretty(self).expect("a TrainState always serialises")
    }

    /// Parse the progress record read from `path`.
    pub fn from_json(text: &str, path: &Path) -> Result<Self> {
        serde_json::from_str(text).map_err(|e| TrainError::ConfigFile {
            path: path.to_path_buf(),
            message: format!("progress record: {e}"),
        })
    }
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

    #[test]
    fn progress_floats_round_trip_exactly() {
        use rand::{Rng, SeedableRng};
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(5);
        let path = Path::new("state.json");
        for _ in 0..2000 {
            let s = TrainState {
                partial_loss_sum: rng.random::<f64>() * 10f64.powi(rng.random_range(-8..8)),
                partial_seconds: rng.random::<f64>() * 1e4,
                best: Some(Best {
                    epoch: 1,
                    mean_dice: rng.random::<f64>(),
                }),
                ..TrainState::default()
            };
            let back = TrainState::from_json(&s.to_json(), path).unwrap();
            assert_eq!(back.partial_loss_sum.to_bits(), s.partial_loss_sum.to_bits());
            assert_eq!(back.partial_seconds.to_bits(), s.partial_seconds.to_bits());
            assert_eq!(back, s);
        }
        // the value the issue found
        let v: f64 = serde_json::from_str("9.288373947143555").unwrap();
        assert_eq!(serde_json::to_string(&v).unwrap(), "9.288373947143555");
    }
}
