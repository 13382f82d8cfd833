//! The error type of `cmr-train`.

use std::path::PathBuf;

/// Everything that can stop training, evaluation or inference.
#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    #[error(transparent)]
    Data(#[from] cmr_data::DataError),
    #[error(transparent)]
    Model(#[from] cmr_models::ModelError),
    #[error(transparent)]
    Loss(#[from] cmr_loss::LossError),
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
    /// A file could not be read or written.
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// A configuration file that does not parse or has an unknown key.
    #[error("{}: {message}", path.display())]
    ConfigFile { path: PathBuf, message: String },
    /// A configuration value out of range.
    #[error("invalid training configuration: {0}")]
    Config(String),
    /// A checkpoint that cannot be read or does not fit its configuration.
    #[error("{}: {message}", path.display())]
    Checkpoint { path: PathBuf, message: String },
    /// A run folder that cannot be used (missing files, already trained …).
    #[error("{}: {message}", path.display())]
    Run { path: PathBuf, message: String },
    /// The device asked for is not available in this build or machine.
    #[error("{0}")]
    Device(String),
    /// The loss became NaN, infinite or absurdly large (the run diverged).
    #[error(
        "the training loss became {value:e} at epoch {epoch}, batch {batch}: the run diverged; the last good checkpoint is kept (lower the learning rate and start again)"
    )]
    NonFinite { value: f64, epoch: usize, batch: usize },
}

/// `Result` with [`TrainError`].
pub type Result<T, E = TrainError> = std::result::Result<T, E>;

impl TrainError {
    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Self::Io {
            path: path.into(),
            source,
        }
    }

    pub(crate) fn checkpoint(path: impl Into<PathBuf>, message: impl std::fmt::Display) -> Self {
        Self::Checkpoint {
            path: path.into(),
            message: message.to_string(),
        }
    }
}
