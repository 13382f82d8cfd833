//! The SHA-256 manifest of every genuine file of the public CMR set, built in.
//!
//! One line per file, `sha256sum` format, paths relative to the data root:
//! train and val images and masks, test images. `test/mask/` of the upstream
//! archive holds one student's predictions, not labels: it is not listed, so
//! it is never installed.

use std::collections::BTreeMap;
use std::io::Read;
use std::path::Path;

use sha2::{Digest, Sha256};

const SHA256SUMS: &str = include_str!("SHA256SUMS");

/// The splits of the set, each with its folders.
pub const SPLITS: [&str; 3] = ["train", "val", "test"];

/// Relative path → lowercase hex SHA-256.
pub fn manifest() -> BTreeMap<&'static str, &'static str> {
    SHA256SUMS
        .lines()
        .filter_map(|l| {
            let (hash, path) = l.split_once("  ")?;
            Some((path.trim(), hash.trim()))
        })
        .collect()
}

/// Lowercase hex SHA-256 of bytes.
pub fn sha256_hex(bytes: &[u8]) -> String {
    let digest = Sha256::digest(bytes);
    digest.iter().map(|b| format!("{b:02x}")).collect()
}

/// Lowercase hex SHA-256 of a file.
pub fn sha256_file(path: &Path) -> std::io::Result<String> {
    let mut f = std::fs::File::open(path)?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 16];
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    Ok(hasher.finalize().iter().map(|b| format!("{b:02x}")).collect())
}

/// The split a manifest path belongs to (`train/image/cmr1.png` → `train`).
pub fn split_of(path: &str) -> &str {
    path.split('/').next().unwrap_or("")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn manifest_lists_the_genuine_files() {
        let m = manifest();
        assert_eq!(m.len(), 320);
        assert_eq!(m.keys().filter(|p| p.starts_with("train/image/")).count(), 100);
        assert_eq!(m.keys().filter(|p| p.starts_with("val/mask/")).count(), 20);
        assert_eq!(m.keys().filter(|p| p.starts_with("test/image/")).count(), 80);
        assert!(!m.keys().any(|p| p.starts_with("test/mask/")));
        assert!(m.values().all(|h| h.len() == 64));
        assert_eq!(
            sha256_hex(b"abc"),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }
}
