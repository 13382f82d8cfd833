//! The error type of `cmr-data`: every variant names the file and the problem.

use std::path::PathBuf;

/// Everything that can go wrong while reading, validating or writing data.
#[derive(Debug, thiserror::Error)]
pub enum DataError {
    /// A file or folder could not be read or written.
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// A folder the layout requires is not there.
    #[error("{}: folder not found ({what})", path.display())]
    MissingFolder { path: PathBuf, what: &'static str },
    /// A volume dataset whose layout (ACDC, nnU-Net) is broken, and how.
    #[error("{}: {message}", path.display())]
    Layout { path: PathBuf, message: String },
    /// A NIfTI volume that cannot be read, written or used, and why.
    #[error("{}: {message}", path.display())]
    Nifti { path: PathBuf, message: String },
    /// A PNG that does not decode (truncated, corrupt, not a PNG, too large).
    #[error("{}: cannot decode PNG: {message}", path.display())]
    Decode { path: PathBuf, message: String },
    /// A PNG could not be encoded.
    #[error("{}: cannot encode PNG: {source}", path.display())]
    Encode {
        path: PathBuf,
        #[source]
        source: image::ImageError,
    },
    /// A mask that is not an 8-bit single-channel PNG.
    #[error("{}: a mask must be an 8-bit grayscale PNG, found {found}", path.display())]
    MaskFormat { path: PathBuf, found: String },
    /// A mask pixel outside 0..=3.
    #[error("{}: mask value {value} at (x {x}, y {y}) is not a class (0..=3)", path.display())]
    MaskValue {
        path: PathBuf,
        value: u8,
        x: usize,
        y: usize,
    },
    /// An image in a labelled split without its mask.
    #[error("{}: image has no mask (expected {})", image.display(), expected.display())]
    MissingMask { image: PathBuf, expected: PathBuf },
    /// A mask whose image is not there.
    #[error("{}: mask has no image (expected {})", mask.display(), expected.display())]
    OrphanMask { mask: PathBuf, expected: PathBuf },
    /// Image and mask of different sizes.
    #[error(
        "{}: mask is {}x{} but its image {} is {}x{}",
        mask.display(), mask_size.0, mask_size.1, image.display(), image_size.0, image_size.1
    )]
    SizeMismatch {
        image: PathBuf,
        mask: PathBuf,
        image_size: (usize, usize),
        mask_size: (usize, usize),
    },
    /// A split folder without a single image.
    #[error("{}: no PNG images in this split", dir.display())]
    EmptySplit { dir: PathBuf },
    /// Two files that map to the same sample id.
    #[error("{}: sample id {id:?} is also {} (ids are file names without the extension)", path.display(), first.display())]
    DuplicateId { path: PathBuf, first: PathBuf, id: String },
    /// A name that looks like an input but cannot be read as one (a broken
    /// or looping symbolic link, a name that is not UTF-8).
    #[error("{}: {reason}", path.display())]
    NotAFile { path: PathBuf, reason: String },
    /// A malformed run-length CSV.
    #[error("{}:{line}: {message}", path.display())]
    Csv {
        path: PathBuf,
        line: usize,
        message: String,
    },
    /// A run-length encoding that does not fit the mask it decodes into.
    #[error("run-length encoding: {0}")]
    Rle(String),
    /// A configuration value out of its range.
    #[error("invalid data configuration: {0}")]
    Config(String),
    /// Another process holds the folder's lock (it is training or writing
    /// there).
    #[error("{}: in use by {} (one writer per folder: wait for it to finish, or stop it)", dir.display(), holder(*pid))]
    Locked { dir: PathBuf, pid: Option<u32> },
    /// A tensor operation failed while batching.
    #[error(transparent)]
    Tensor(#[from] candle_core::Error),
}

fn holder(pid: Option<u32>) -> String {
    match pid {
        Some(p) => format!("another process (pid {p})"),
        None => "another process".to_string(),
    }
}

/// `Result` with [`DataError`].
pub type Result<T, E = DataError> = std::result::Result<T, E>;

impl DataError {
    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Self::Io {
            path: path.into(),
            source,
        }
    }
}
