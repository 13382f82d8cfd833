//! The error type of `cmr-loss`.

/// A loss or metric that cannot be computed from its inputs.
#[derive(Debug, thiserror::Error)]
pub enum LossError {
    /// Inputs whose shapes do not fit together.
    #[error("shape mismatch: {0}")]
    Shape(String),
    /// A loss configuration out of range.
    #[error("invalid loss configuration: {0}")]
    Config(String),
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

/// `Result` with [`LossError`].
pub type Result<T, E = LossError> = std::result::Result<T, E>;
