//! What `--model` names: a path, or one of the models shipped under `models/`.

use std::path::{Path, PathBuf};

use anyhow::bail;

/// Folders searched for shipped models: `$CMR_MODELS_DIR`, `./models`, and the
/// `models/` of the source tree this binary was built from.
fn model_dirs() -> Vec<PathBuf> {
    let mut dirs = Vec::new();
    if let Some(d) = std::env::var_os("CMR_MODELS_DIR") {
        dirs.push(PathBuf::from(d));
    }
    dirs.push(PathBuf::from("models"));
    dirs.push(Path::new(env!("CARGO_MANIFEST_DIR")).join("../../models"));
    dirs
}

/// A run folder (its best model) or a cross-validation folder (an ensemble).
fn is_model_folder(dir: &Path) -> bool {
    dir.join("model.safetensors").is_file() || dir.join("cv.json").is_file()
}

/// Resolve `--model`: an existing path as it is, else a shipped model's name
/// (`unet3plus` → `models/unet3plus/`).
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
    }
    let shipped: Vec<String> = model_dirs()
        .iter()
        .filter_map(|d| std::fs::read_dir(d).ok())
        .flatten()
        .filter_map(|e| e.ok())
        .filter(|e| is_model_folder(&e.path()))
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    if shipped.is_empty() {
        bail!("{model}: no such file or folder, and no shipped model of that name")
    }
    bail!(
        "{model}: no such file or folder, and no shipped model of that name (shipped: {})",
        shipped.join(", ")
    )
}
