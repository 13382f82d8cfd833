//! Several output files that appear together or not at all: written into a
//! hidden staging folder inside the destination, then moved into place.
//!
//! Each staging folder holds a lock while its process lives; a new one sweeps
//! the staging folders whose process died (killed while writing). Before
//! anything moves, every destination is checked; a move that fails anyway
//! (or a final step that fails, such as placing a CSV) puts back what was
//! there before.

use std::path::{Path, PathBuf};

use anyhow::Context;
use cmr_data::DirLock;

const PREFIX: &str = ".cmr-staging-";

/// A staging folder in `dest`. Dropped without [`Staged::commit`], it is
/// removed with everything in it, and so is `dest` if it was made for it
/// and holds nothing else.
#[derive(Debug)]
pub struct Staged {
    dest: PathBuf,
    tmp: PathBuf,
    files: Vec<String>,
    committed: bool,
    // whether `dest` was made here (removed again, if empty, on failure)
    created: bool,
    // held until the folder is removed
    lock: Option<DirLock>,
}

/// Remove the staging folders in `dest` whose process is gone (their lock
/// is free).
fn sweep(dest: &Path) {
    let Ok(entries) = std::fs::read_dir(dest) else { return };
    for entry in entries.flatten() {
        let name = entry.file_name();
        if !name.to_string_lossy().starts_with(PREFIX) || !entry.path().is_dir() {
            continue;
        }
        let path = entry.path();
        if let Ok(lock) = DirLock::acquire(&path) {
            drop(lock);
            match std::fs::remove_dir_all(&path) {
                Ok(()) => tracing::info!("removed {}, left by an interrupted run", path.display()),
                Err(e) => tracing::warn!("{}: cannot remove a stale staging folder: {e}", path.display()),
            }
        }
    }
}

impl Staged {
    /// Create `dest` if needed and a staging folder inside it.
    pub fn new(dest: &Path) -> anyhow::Result<Self> {
        let created = !dest.exists();
        std::fs::create_dir_all(dest).with_context(|| format!("creating {}", dest.display()))?;
        sweep(dest);
        let tmp = dest.join(format!("{PREFIX}{}", std::process::id()));
        std::fs::create_dir_all(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
        let lock = match DirLock::acquire(&tmp) {
            Ok(lock) => lock,
            Err(e) => {
                let _ = std::fs::remove_dir_all(&tmp);
                if created {
                    let _ = std::fs::remove_dir(dest);
                }
                return Err(e.into());
            }
        };
        Ok(Self {
            dest: dest.to_path_buf(),
            tmp,
            files: Vec::new(),
            committed: false,
            created,
            lock: Some(lock),
        })
    }

    /// Where to write the file `name` (a relative path, sub-folders
    /// allowed) now; it lands in `dest` at commit.
    pub fn path(&mut self, name: &str) -> anyhow::Result<PathBuf> {
        let path = self.tmp.join(name);
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent).with_context(|| format!("creating {}", parent.display()))?;
        }
        self.files.push(name.to_string());
        Ok(path)
    }

    /// Move every file into `dest`, replacing files of the same name.
    pub fn commit(self) -> anyhow::Result<usize> {
        self.commit_then(|| Ok(()))
    }

    /// Move every file into `dest`, then run `last` (e.g. place a file
    /// elsewhere); if a move or `last` fails, the files moved are taken out
    /// again and the ones they replaced put back.
    pub fn commit_then(mut self, last: impl FnOnce() -> anyhow::Result<()>) -> anyhow::Result<usize> {
        for name in &self.files {
            let to = self.dest.join(name);
            if to.is_dir() {
                anyhow::bail!(
                    "{}: a folder is in the way of an output file (nothing was written)",
                    to.display()
                );
            }
        }
        let backup = self.tmp.join(".replaced");
        let mut moved: Vec<&String> = Vec::new();
        let mut replaced: Vec<&String> = Vec::new();
        let result = (|| -> anyhow::Result<()> {
            for name in &self.files {
                let (from, to) = (self.tmp.join(name), self.dest.join(name));
                if let Some(parent) = to.parent() {
                    std::fs::create_dir_all(parent).with_context(|| format!("creating {}", parent.display()))?;
                }
                if to.exists() {
                    let keep = backup.join(name);
                    if let Some(parent) = keep.parent() {
                        std::fs::create_dir_all(parent).with_context(|| format!("creating {}", parent.display()))?;
                    }
                    std::fs::rename(&to, &keep).with_context(|| format!("setting {} aside", to.display()))?;
                    replaced.push(name);
                }
                std::fs::rename(&from, &to).with_context(|| format!("moving {} into place", to.display()))?;
                moved.push(name);
            }
            last()
        })();
        if let Err(e) = result {
            for name in moved {
                let _ = std::fs::remove_file(self.dest.join(name));
            }
            for name in replaced {
                let _ = std::fs::rename(backup.join(name), self.dest.join(name));
            }
            return Err(e);
        }
        self.committed = true;
        self.lock = None;
        let _ = std::fs::remove_dir_all(&self.tmp);
        Ok(self.files.len())
    }
}

impl Drop for Staged {
    fn drop(&mut self) {
        if !self.committed {
            self.lock = None;
            let _ = std::fs::remove_dir_all(&self.tmp);
            // a folder this run made stays only if something else is in it
            if self.created {
                let _ = std::fs::remove_dir(&self.dest);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(dir: &Path) -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        v.sort();
        v
    }

    #[test]
    fn all_or_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("out");
        std::fs::create_dir_all(&out).unwrap();
        std::fs::write(out.join("a.png"), b"old a").unwrap();
        // a folder in the way: nothing moves
        std::fs::create_dir(out.join("c.png")).unwrap();
        let mut s = Staged::new(&out).unwrap();
        for n in ["a.png", "b.png", "c.png"] {
            std::fs::write(s.path(n).unwrap(), n).unwrap();
        }
        let err = s.commit().unwrap_err().to_string();
        assert!(err.contains("c.png") && err.contains("in the way"), "{err}");
        assert_eq!(names(&out), ["a.png", "c.png"]);
        assert_eq!(std::fs::read(out.join("a.png")).unwrap(), b"old a");
        std::fs::remove_dir(out.join("c.png")).unwrap();

        // a last step that fails: the old files are back, the new ones gone
        let mut s = Staged::new(&out).unwrap();
        for n in ["a.png", "b.png"] {
            std::fs::write(s.path(n).unwrap(), n).unwrap();
        }
        let err = s.commit_then(|| anyhow::bail!("the CSV cannot be placed")).unwrap_err();
        assert!(err.to_string().contains("CSV"), "{err}");
        assert_eq!(names(&out), ["a.png"]);
        assert_eq!(std::fs::read(out.join("a.png")).unwrap(), b"old a");

        // and when all goes well, all of it lands
        let mut s = Staged::new(&out).unwrap();
        for n in ["a.png", "sub/b.png"] {
            std::fs::write(s.path(n).unwrap(), n).unwrap();
        }
        assert_eq!(s.commit().unwrap(), 2);
        assert_eq!(names(&out), ["a.png", "sub"]);
        assert_eq!(std::fs::read(out.join("a.png")).unwrap(), b"a.png");

        // a failed run leaves no folder it made, and keeps one it did not
        let fresh = dir.path().join("fresh");
        let mut s = Staged::new(&fresh).unwrap();
        std::fs::write(s.path("a.png").unwrap(), "a").unwrap();
        drop(s);
        assert!(!fresh.exists());
        let s = Staged::new(&out).unwrap();
        drop(s);
        assert_eq!(names(&out), ["a.png", "sub"]);
        // nor one that something else wrote into meanwhile
        let s = Staged::new(&fresh).unwrap();
        std::fs::write(fresh.join("theirs.txt"), "x").unwrap();
        drop(s);
        assert_eq!(names(&fresh), ["theirs.txt"]);
    }

    #[test]
    fn a_dead_process_staging_folder_is_swept_a_live_one_kept() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().to_path_buf();
        // a killed run's staging folder: no lock held
        let dead = out.join(format!("{PREFIX}999999"));
        std::fs::create_dir_all(&dead).unwrap();
        std::fs::write(dead.join("cmr1_mask.png"), b"x").unwrap();
        // a live one (another Staged in this process holds its lock)
        let live = Staged::new(&out.join("other")).unwrap();
        let live_tmp = out.join(format!("{PREFIX}live"));
        std::fs::create_dir_all(&live_tmp).unwrap();
        let _held = DirLock::acquire(&live_tmp).unwrap();
        let s = Staged::new(&out).unwrap();
        assert!(!dead.exists());
        assert!(live_tmp.exists());
        drop(s);
        drop(live);
    }
}
