//! `cargo xtask download`: fetch the CMR set, verify every file against the
//! built-in manifest, install it atomically.
//!
//! Sources: the pinned public archive (default), a mirror URL, a local
//! `.tar.gz`/`.zip`, or a local folder. Only the manifest's files are taken
//! (train and val images and masks, test images), wherever the data root sits
//! in the archive; `test/mask/` (predictions, not labels) and everything else
//! is left out. The files are unpacked and verified in a staging folder beside
//! the destination and only then swapped into place: a failure at any point
//! leaves the previous installation as it was.

use std::collections::{BTreeMap, BTreeSet};
use std::fs::File;
use std::io::{IsTerminal, Read, Write};
use std::path::{Path, PathBuf};

use anyhow::{Context, bail};

use crate::manifest::{SPLITS, manifest, sha256_file, sha256_hex, split_of};

/// The pinned public archive (about 20 MB).
pub const DEFAULT_URL: &str =
    "https://github.com/eddie8615/Neural-Computation-at-UoB/archive/6cd2c8d08aaea47e8dbfd8640c9706a9b91240b3.tar.gz";

/// Where the files come from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Source {
    Url(String),
    Archive(PathBuf),
    Folder(PathBuf),
}

impl Source {
    /// `--from PATH`: a folder or an archive.
    pub fn from_path(path: &Path) -> anyhow::Result<Self> {
        if path.is_dir() {
            Ok(Self::Folder(path.to_path_buf()))
        } else if path.is_file() {
            Ok(Self::Archive(path.to_path_buf()))
        } else {
            bail!("{}: no such file or folder", path.display())
        }
    }
}

/// What `install` did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Installed {
    /// The destination already held a verified copy; nothing was touched.
    AlreadyThere { files: usize },
    /// Files were installed; splits the source lacked are listed.
    Fresh { files: usize, missing_splits: Vec<String> },
}

/// Check an installed copy: train and test present, every file of each present
/// split there and matching its hash, nothing else. Returns the file count.
pub fn verify_installed(dest: &Path) -> anyhow::Result<usize> {
    let m = manifest();
    let mut count = 0;
    for split in SPLITS {
        if !dest.join(split).is_dir() {
            if split == "val" {
                continue;
            }
            bail!("{}: no {split}/", dest.display());
        }
        for (rel, hash) in m.iter().filter(|(p, _)| split_of(p) == split) {
            let path = dest.join(rel);
            let got = sha256_file(&path).with_context(|| format!("{}", path.display()))?;
            if got != *hash {
                bail!("{}: SHA-256 does not match the manifest", path.display());
            }
            count += 1;
        }
    }
    Ok(count)
}

/// Split an archive or folder path into (prefix, path relative to the data
/// root) when its last three components name a manifest file.
fn match_manifest<'m>(path: &str, m: &BTreeMap<&'m str, &'m str>) -> Option<(String, &'m str)> {
    let parts: Vec<&str> = path
        .trim_start_matches("./")
        .split('/')
        .filter(|s| !s.is_empty())
        .collect();
    if parts.len() < 3 {
        return None;
    }
    let rel = parts[parts.len() - 3..].join("/");
    let (key, _) = m.get_key_value(rel.as_str())?;
    Some((parts[..parts.len() - 3].join("/"), *key))
}

/// A manifest path and the file's bytes.
type Entry<'m> = (&'m str, Vec<u8>);

/// Files found in a source, grouped by the data root they sit under.
#[derive(Default)]
struct Found<'m> {
    by_prefix: BTreeMap<String, Vec<Entry<'m>>>,
}

impl<'m> Found<'m> {
    fn add(&mut self, prefix: String, rel: &'m str, bytes: Vec<u8>) {
        self.by_prefix.entry(prefix).or_default().push((rel, bytes));
    }

    /// The files under the data root with the most manifest files.
    fn best(self, source: &str) -> anyhow::Result<Vec<Entry<'m>>> {
        let mut groups: Vec<(String, Vec<Entry<'m>>)> = self.by_prefix.into_iter().collect();
        groups.sort_by_key(|g| std::cmp::Reverse(g.1.len()));
        match groups.as_slice() {
            [] => bail!("{source}: holds none of the dataset's files (expected train/image/cmrN.png …)"),
            [a, b, ..] if a.1.len() == b.1.len() => bail!(
                "{source}: two copies of the dataset, under {:?} and {:?}; point --from at one",
                a.0,
                b.0
            ),
            _ => Ok(groups.swap_remove(0).1),
        }
    }
}

fn read_tar_gz<'m>(path: &Path, m: &BTreeMap<&'m str, &'m str>) -> anyhow::Result<Found<'m>> {
    let file = File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let mut archive = tar::Archive::new(flate2::read::GzDecoder::new(std::io::BufReader::new(file)));
    let corrupt = |e: std::io::Error| anyhow::anyhow!("{}: archive is truncated or corrupt ({e})", path.display());
    let mut found = Found::default();
    for entry in archive.entries().map_err(corrupt)? {
        let mut entry = entry.map_err(corrupt)?;
        if !entry.header().entry_type().is_file() {
            continue;
        }
        let name = entry.path().map_err(corrupt)?.to_string_lossy().replace('\\', "/");
        if let Some((prefix, rel)) = match_manifest(&name, m) {
            let mut bytes = Vec::new();
            entry.read_to_end(&mut bytes).map_err(corrupt)?;
            found.add(prefix, rel, bytes);
        }
    }
    Ok(found)
}

fn read_zip<'m>(path: &Path, m: &BTreeMap<&'m str, &'m str>) -> anyhow::Result<Found<'m>> {
    let file = File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let corrupt =
        |e: &dyn std::fmt::Display| anyhow::anyhow!("{}: archive is truncated or corrupt ({e})", path.display());
    let mut archive = zip::ZipArchive::new(file).map_err(|e| corrupt(&e))?;
    let mut found = Found::default();
    for i in 0..archive.len() {
        let mut entry = archive.by_index(i).map_err(|e| corrupt(&e))?;
        if !entry.is_file() {
            continue;
        }
        let name = entry.name().replace('\\', "/");
        if let Some((prefix, rel)) = match_manifest(&name, m) {
            let mut bytes = Vec::new();
            entry.read_to_end(&mut bytes).map_err(|e| corrupt(&e))?;
            found.add(prefix, rel, bytes);
        }
    }
    Ok(found)
}

fn read_folder<'m>(root: &Path, m: &BTreeMap<&'m str, &'m str>) -> anyhow::Result<Found<'m>> {
    let mut found = Found::default();
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).with_context(|| format!("reading {}", dir.display()))? {
            let path = entry.with_context(|| format!("reading {}", dir.display()))?.path();
            if path.is_dir() {
                stack.push(path);
                continue;
            }
            let rel_path = path
                .strip_prefix(root)
                .unwrap_or(&path)
                .to_string_lossy()
                .replace('\\', "/");
            if let Some((prefix, rel)) = match_manifest(&rel_path, m) {
                let bytes = std::fs::read(&path).with_context(|| format!("reading {}", path.display()))?;
                found.add(prefix, rel, bytes);
            }
        }
    }
    Ok(found)
}

fn is_zip(path: &Path) -> anyhow::Result<bool> {
    let mut magic = [0u8; 4];
    let mut f = File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let n = f
        .read(&mut magic)
        .with_context(|| format!("reading {}", path.display()))?;
    Ok(n == 4 && &magic == b"PK\x03\x04")
}

/// Download `url` into `to`, with progress on stderr.
pub fn fetch(url: &str, to: &Path) -> anyhow::Result<()> {
    tracing::info!("downloading {url}");
    let response = ureq::get(url).call().map_err(|e| match e {
        ureq::Error::StatusCode(code) => anyhow::anyhow!("{url}: HTTP status {code}"),
        other => anyhow::anyhow!("cannot reach {url}: {other} (no network? install from a local copy with --from)"),
    })?;
    let total: Option<u64> = response
        .headers()
        .get("content-length")
        .and_then(|v| v.to_str().ok())
        .and_then(|s| s.parse().ok());
    let mut reader = response.into_body().into_reader();
    let mut out = std::io::BufWriter::new(File::create(to).with_context(|| format!("creating {}", to.display()))?);
    let mut buf = vec![0u8; 1 << 16];
    let (mut got, mut shown) = (0u64, 0u64);
    let terminal = std::io::stderr().is_terminal();
    loop {
        let n = reader
            .read(&mut buf)
            .with_context(|| format!("{url}: download broke off after {got} bytes"))?;
        if n == 0 {
            break;
        }
        out.write_all(&buf[..n])
            .with_context(|| format!("writing {}", to.display()))?;
        got += n as u64;
        if got - shown >= 1 << 20 {
            shown = got;
            let mb = got as f64 / 1e6;
            match total {
                Some(t) if terminal => eprint!("\r  {mb:.1} / {:.1} MB", t as f64 / 1e6),
                None if terminal => eprint!("\r  {mb:.1} MB"),
                _ => tracing::debug!("{mb:.1} MB"),
            }
        }
    }
    if terminal {
        eprintln!();
    }
    out.flush().with_context(|| format!("writing {}", to.display()))?;
    if let Some(t) = total
        && got != t
    {
        bail!("{url}: download truncated ({got} of {t} bytes)");
    }
    tracing::info!("downloaded {:.1} MB", got as f64 / 1e6);
    Ok(())
}

/// Removes a path when dropped, unless disarmed.
struct Cleanup(Option<PathBuf>);

impl Drop for Cleanup {
    fn drop(&mut self) {
        if let Some(p) = self.0.take() {
            let _ = if p.is_dir() {
                std::fs::remove_dir_all(&p)
            } else {
                std::fs::remove_file(&p)
            };
        }
    }
}

/// Install the dataset from `source` into `dest`. Unless `force`, a verified
/// copy already at `dest` is left alone.
pub fn install(source: &Source, dest: &Path, force: bool) -> anyhow::Result<Installed> {
    if !force && dest.exists() {
        match verify_installed(dest) {
            Ok(files) => return Ok(Installed::AlreadyThere { files }),
            Err(e) => tracing::info!("reinstalling: {e:#}"),
        }
    }
    let name = dest
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "data".into());
    let parent = dest
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    std::fs::create_dir_all(parent).with_context(|| format!("creating {}", parent.display()))?;
    let pid = std::process::id();

    let m = manifest();
    let mut _download = Cleanup(None);
    let (found, label) = match source {
        Source::Url(url) => {
            let tmp = parent.join(format!(".{name}.download-{pid}"));
            _download = Cleanup(Some(tmp.clone()));
            fetch(url, &tmp)?;
            let found = if is_zip(&tmp)? {
                read_zip(&tmp, &m)?
            } else {
                read_tar_gz(&tmp, &m)?
            };
            (found, url.clone())
        }
        Source::Archive(path) => {
            let found = if is_zip(path)? {
                read_zip(path, &m)?
            } else {
                read_tar_gz(path, &m)?
            };
            (found, path.display().to_string())
        }
        Source::Folder(path) => (read_folder(path, &m)?, path.display().to_string()),
    };
    let files = found.best(&label)?;

    // Verify everything before writing anything.
    let mut have = BTreeSet::new();
    for (rel, bytes) in &files {
        if sha256_hex(bytes) != m[rel] {
            bail!("{label}: {rel} does not match its SHA-256 in the manifest (corrupt or tampered); nothing installed");
        }
        have.insert(*rel);
    }
    let mut missing_splits = Vec::new();
    for split in SPLITS {
        let expected: Vec<&str> = m.keys().copied().filter(|p| split_of(p) == split).collect();
        let present = expected.iter().filter(|p| have.contains(*p)).count();
        if present == 0 {
            if split == "val" {
                missing_splits.push(split.to_string());
                continue;
            }
            bail!("{label}: has no {split}/ files; nothing installed");
        }
        if present < expected.len() {
            let first = expected
                .iter()
                .find(|p| !have.contains(*p))
                .copied()
                .unwrap_or_default();
            bail!(
                "{label}: {split}/ is incomplete ({present} of {} files; {first} is missing); nothing installed",
                expected.len()
            );
        }
    }

    let staging = parent.join(format!(".{name}.staging-{pid}"));
    if staging.exists() {
        std::fs::remove_dir_all(&staging).with_context(|| format!("removing {}", staging.display()))?;
    }
    let mut guard = Cleanup(Some(staging.clone()));
    for (rel, bytes) in &files {
        let path = staging.join(rel);
        std::fs::create_dir_all(path.parent().expect("manifest paths have folders"))
            .with_context(|| format!("creating {}", path.display()))?;
        std::fs::write(&path, bytes).with_context(|| format!("writing {}", path.display()))?;
    }
    // Swap into place: the old copy moves aside and is removed only afterwards.
    let old = parent.join(format!(".{name}.old-{pid}"));
    let had_old = dest.exists();
    if had_old {
        std::fs::rename(dest, &old).with_context(|| format!("moving the old {} aside", dest.display()))?;
    }
    if let Err(e) = std::fs::rename(&staging, dest) {
        if had_old {
            let _ = std::fs::rename(&old, dest);
        }
        return Err(e).with_context(|| format!("moving the new copy to {}", dest.display()));
    }
    guard.0 = None;
    if had_old {
        std::fs::remove_dir_all(&old).with_context(|| format!("removing {}", old.display()))?;
    }
    for split in &missing_splits {
        tracing::warn!("{label} has no {split}/ split: training holds out a seeded part of train/ for validation");
    }
    Ok(Installed::Fresh {
        files: files.len(),
        missing_splits,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn manifest_paths_are_found_under_any_prefix() {
        let m = manifest();
        let (prefix, rel) = match_manifest("Repo-abc/cwk2/CW2/data/train/image/cmr1.png", &m).unwrap();
        assert_eq!(
            (prefix.as_str(), rel),
            ("Repo-abc/cwk2/CW2/data", "train/image/cmr1.png")
        );
        assert_eq!(match_manifest("train/mask/cmr100_mask.png", &m).unwrap().0, "");
        assert!(match_manifest("x/test/mask/cmr121_mask.png", &m).is_none());
        assert!(match_manifest("x/train/image/cmr999.png", &m).is_none());
        assert!(match_manifest("cmr1.png", &m).is_none());
    }
}
