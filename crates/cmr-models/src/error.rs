//! The error type of `cmr-models`.

/// A network that cannot be built.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    /// An inconsistent configuration, with what is wrong.
    #[error("invalid {arch} configuration: {message}")]
    Config { arch: &'static str, message: String },
    /// A tensor could not be created or has the wrong shape (for instance a
    /// checkpoint of another architecture).
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

/// `Result` with [`ModelError`].
pub type Result<T, E = ModelError> = std::result::Result<T, E>;
