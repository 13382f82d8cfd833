//! Atomic file writes: write a temporary file beside the target, then rename.
//!
//! A crash or an error never leaves a truncated file under the final name: the
//! target either keeps its old contents or gets the complete new ones.

use std::fs::{self, File};
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use crate::error::{DataError, Result};

static COUNTER: AtomicU64 = AtomicU64::new(0);

/// The temporary name used for `path` while it is being written: hidden, in the
/// same folder (so that the rename stays on one file system), unique per process
/// and call.
fn temp_path(path: &Path) -> PathBuf {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "out".to_string());
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    path.with_file_name(format!(".{name}.{}.{n}.tmp", std::process::id()))
}

/// Write `path` atomically with what `fill` writes into the buffered writer.
///
/// The parent folder must exist. On any error the temporary file is removed and
/// `path` is left as it was.
pub fn write_atomic_with<F>(path: &Path, fill: F) -> Result<()>
where
    F: FnOnce(&mut dyn Write) -> std::io::Result<()>,
{
    let tmp = temp_path(path);
    let result = (|| -> std::io::Result<()> {
        let file = File::create(&tmp)?;
        let mut writer = BufWriter::new(file);
        fill(&mut writer)?;
        let file = writer.into_inner().map_err(|e| e.into_error())?;
        file.sync_all()?;
        fs::rename(&tmp, path)?;
        sync_parent(path)
    })();
    if let Err(source) = result {
        let _ = fs::remove_file(&tmp);
        return Err(DataError::io(path, source));
    }
    Ok(())
}

/// A temporary name in `path`'s folder ending as `path` does (`.nii.gz`,
/// `.nii`), for libraries that choose the format by the name.
pub(crate) fn temp_path_like(path: &Path) -> PathBuf {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "out".to_string());
    // one ending kept whole, no other dot (libraries replace "the extension")
    let ending = [".nii.gz", ".hdr.gz", ".img.gz", ".nii", ".hdr", ".img"]
        .into_iter()
        .find(|e| name.ends_with(e))
        .unwrap_or("");
    let stem = name[..name.len() - ending.len()].replace('.', "_");
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    path.with_file_name(format!(".tmp-{}-{n}-{stem}{ending}", std::process::id()))
}

/// Make a rename into `path`'s folder durable: `fsync` the folder (on Unix;
/// elsewhere the rename is as durable as the platform makes it).
fn sync_parent(path: &Path) -> std::io::Result<()> {
    #[cfg(unix)]
    {
        let parent = match path.parent() {
            Some(p) if !p.as_os_str().is_empty() => p,
            _ => Path::new("."),
        };
        File::open(parent)?.sync_all()?;
    }
    #[cfg(not(unix))]
    let _ = path;
    Ok(())
}

/// Whether `name` is one of [`write_atomic_with`]'s temporary names
/// (`.<name>.<pid>.<n>.tmp`), and of which process.
fn temp_owner(name: &str) -> Option<u32> {
    let inner = name.strip_prefix('.')?.strip_suffix(".tmp")?;
    let mut parts = inner.rsplitn(3, '.');
    let _n: u64 = parts.next()?.parse().ok()?;
    let pid: u32 = parts.next()?.parse().ok()?;
    let target = parts.next()?;
    (!target.is_empty()).then_some(pid)
}

/// Remove the temporary files that writes by other processes left in `dir`
/// (a process killed while writing leaves one). Only safe while no other
/// process writes in `dir`: call it with the folder's [`DirLock`] held.
/// Returns the files removed.
///
/// [`DirLock`]: crate::DirLock
pub fn remove_stale_temps(dir: &Path) -> Result<Vec<PathBuf>> {
    let me = std::process::id();
    let mut removed = Vec::new();
    let entries = match fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(removed),
        Err(e) => return Err(DataError::io(dir, e)),
    };
    for entry in entries {
        let entry = entry.map_err(|e| DataError::io(dir, e))?;
        let Some(pid) = entry.file_name().to_str().and_then(temp_owner) else {
            continue;
        };
        if pid == me || !entry.file_type().map_err(|e| DataError::io(entry.path(), e))?.is_file() {
            continue;
        }
        fs::remove_file(entry.path()).map_err(|e| DataError::io(entry.path(), e))?;
        removed.push(entry.path());
    }
    removed.sort();
    Ok(removed)
}

/// Write `bytes` to `path` atomically.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    write_atomic_with(path, |w| w.write_all(bytes))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replaces_contents_and_leaves_no_temp() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.txt");
        write_atomic(&path, b"first").unwrap();
        write_atomic(&path, b"second").unwrap();
        assert_eq!(fs::read(&path).unwrap(), b"second");
        assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 1);
    }

    #[test]
    fn failure_keeps_the_old_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.txt");
        write_atomic(&path, b"old").unwrap();
        let err = write_atomic_with(&path, |w| {
            w.write_all(b"partial")?;
            Err(std::io::Error::other("disk full"))
        })
        .unwrap_err();
        assert!(err.to_string().contains("a.txt"), "{err}");
        assert_eq!(fs::read(&path).unwrap(), b"old");
        assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 1);
    }

    #[test]
    fn temp_names_are_recognised() {
        let tmp = temp_path(Path::new("/x/last.safetensors"));
        let name = tmp.file_name().unwrap().to_str().unwrap();
        assert_eq!(temp_owner(name), Some(std::process::id()));
        assert_eq!(temp_owner(".state.json.123.4.tmp"), Some(123));
        for other in [
            "state.json",
            ".state.json.tmp",
            ".x.abc.4.tmp",
            "..1.2.tmp",
            ".a.1.2.txt",
            "a.1.2.tmp",
        ] {
            assert_eq!(temp_owner(other), None, "{other}");
        }
    }

    #[test]
    fn stale_temps_of_other_processes_are_removed() {
        let dir = tempfile::tempdir().unwrap();
        let keep = ["state.json", ".lock", "notes.1.2.tmp"];
        for k in keep {
            fs::write(dir.path().join(k), b"k").unwrap();
        }
        fs::write(dir.path().join(".last.safetensors.999999.3.tmp"), b"partial").unwrap();
        fs::write(dir.path().join(".state.json.1.0.tmp"), b"partial").unwrap();
        let mine = temp_path(&dir.path().join("metrics.csv"));
        fs::write(&mine, b"being written").unwrap();
        let removed = remove_stale_temps(dir.path()).unwrap();
        assert_eq!(removed.len(), 2, "{removed:?}");
        let mut left: Vec<String> = fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        left.sort();
        let mut expected: Vec<String> = keep.iter().map(|s| s.to_string()).collect();
        expected.push(mine.file_name().unwrap().to_str().unwrap().to_string());
        expected.sort();
        assert_eq!(left, expected);
        assert!(remove_stale_temps(&dir.path().join("absent")).unwrap().is_empty());
    }

    #[test]
    fn missing_folder_is_an_error_naming_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("nope").join("a.txt");
        let err = write_atomic(&path, b"x").unwrap_err();
        assert!(err.to_string().contains("a.txt"), "{err}");
    }
}
