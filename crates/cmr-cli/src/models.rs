//! What `--model` names: a path, or one of the shipped models.
//!
//! The shipped models (`models/<name>/` of the source tree) are embedded in
//! the binary (`build.rs`), so that `--model unet3plus` works wherever `cmr`
//! is installed, the clone moved or gone. A name is looked up in
//! `$CMR_MODELS_DIR`, then `./models`, then among the embedded models, which
//! are unpacked once into a cache folder named by their content hash
//! (`$CMR_CACHE_DIR`, else `$XDG_CACHE_HOME/cmr`, else `~/.cache/cmr`, else the
//! system's temporary folder).

use std::path::{Path, PathBuf};

use anyhow::{Context, bail};

use crate::env;

/// One embedded file: its path inside the model's folder, and its bytes.
type EmbeddedFile = (&'static str, &'static [u8]);
/// One embedded model: its name, a hash of its files, and the files.
type EmbeddedModel = (&'static str, &'static str, &'static [EmbeddedFile]);

include!(concat!(env!("OUT_DIR"), "/embedded_models.rs"));

/// Folders searched for models by name before the embedded ones.
fn model_dirs() -> Vec<PathBuf> {
    let mut dirs = Vec::new();
    if let Some(d) = env::path(env::MODELS_DIR) {
        dirs.push(d);
    }
    dirs.push(PathBuf::from("models"));
    dirs
}

/// A run folder (its best model) or a cross-validation folder (an ensemble).
fn is_model_folder(dir: &Path) -> bool {
    dir.join("model.safetensors").is_file() || dir.join("cv.json").is_file()
}

/// Where embedded models are unpacked.
fn cache_root() -> PathBuf {
    if let Some(d) = env::path(env::CACHE_DIR) {
        return d;
    }
    if let Some(d) = env::path(env::XDG_CACHE_HOME) {
        return d.join("cmr");
    }
    if let Some(home) = env::path(env::HOME) {
        return home.join(".cache/cmr");
    }
    std::env::temp_dir().join("cmr-cache")
}

/// Unpack the embedded model `name` (once per content) and return its folder.
/// The files are written into a staging folder that is renamed into place
/// whole, so a crash never leaves a half-unpacked model under the final name.
fn unpack(name: &str) -> anyhow::Result<Option<PathBuf>> {
    let Some((_, hash, files)) = EMBEDDED.iter().find(|(n, _, _)| *n == name) else {
        return Ok(None);
    };
    let root = cache_root().join("models");
    let dir = root.join(format!("{name}-{hash}"));
    if dir.is_dir() {
        return Ok(Some(dir));
    }
    let staging = root.join(format!(".{name}-{hash}.{}", std::process::id()));
    for (rel, bytes) in *files {
        let path = staging.join(rel);
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent).with_context(|| format!("creating {}", parent.display()))?;
        }
        std::fs::write(&path, bytes).with_context(|| format!("unpacking {}", path.display()))?;
    }
    if let Err(e) = std::fs::rename(&staging, &dir) {
        let _ = std::fs::remove_dir_all(&staging);
        // another process may have unpacked it first
        if !dir.is_dir() {
            return Err(e).with_context(|| format!("placing {}", dir.display()));
        }
    }
    tracing::debug!("unpacked the shipped model {name} into {}", dir.display());
    Ok(Some(dir))
}

/// Resolve `--model`: an existing path as it is, else a model's name
/// (`unet3plus` → `$CMR_MODELS_DIR/unet3plus`, `./models/unet3plus`, or the
/// embedded one).
pub fn resolve(model: &str) -> anyhow::Result<PathBuf> {
    let path = PathBuf::from(model);
    if path.exists() {
        return Ok(path);
    }
    let is_name = !model.is_empty() && model.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_');
    if is_name {
        for dir in model_dirs() {
            let candidate = dir.join(model);
            if is_model_folder(&candidate) {
                return Ok(candidate);
            }
        }
        if let Some(dir) = unpack(model)? {
            return Ok(dir);
        }
    }
    let mut shipped: Vec<String> = model_dirs()
        .iter()
        .filter_map(|d| std::fs::read_dir(d).ok())
        .flatten()
        .filter_map(|e| e.ok())
        .filter(|e| is_model_folder(&e.path()))
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .chain(EMBEDDED.iter().map(|(n, _, _)| n.to_string()))
        .collect();
    shipped.sort();
    shipped.dedup();
    if shipped.is_empty() {
        bail!("{model}: no such file or folder, and no shipped model of that name")
    }
    bail!(
        "{model}: no such file or folder, and no shipped model of that name (shipped: {})",
        shipped.join(", ")
    )
}
