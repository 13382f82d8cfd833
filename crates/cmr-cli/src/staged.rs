//! Several output files that appear together or not at all: written into a
//! hidden staging folder inside the destination, then moved into place.

use std::path::{Path, PathBuf};

use anyhow::Context;

/// A staging folder in `dest`. Dropped without [`Staged::commit`], it is
/// removed with everything in it.
#[derive(Debug)]
pub struct Staged {
    dest: PathBuf,
    tmp: PathBuf,
    files: Vec<String>,
    committed: bool,
}

impl Staged {
    /// Create `dest` if needed and a staging folder inside it.
    pub fn new(dest: &Path) -> anyhow::Result<Self> {
        std::fs::create_dir_all(dest).with_context(|| format!("creating {}", dest.display()))?;
        let tmp = dest.join(format!(".cmr-staging-{}", std::process::id()));
        std::fs::create_dir_all(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
        Ok(Self {
            dest: dest.to_path_buf(),
            tmp,
            files: Vec::new(),
            committed: false,
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
    pub fn commit(mut self) -> anyhow::Result<usize> {
        for name in &self.files {
            let (from, to) = (self.tmp.join(name), self.dest.join(name));
            if let Some(parent) = to.parent() {
                std::fs::create_dir_all(parent).with_context(|| format!("creating {}", parent.display()))?;
            }
            std::fs::rename(&from, &to).with_context(|| format!("moving {} into place", to.display()))?;
        }
        self.committed = true;
        let _ = std::fs::remove_dir_all(&self.tmp);
        Ok(self.files.len())
    }
}

impl Drop for Staged {
    fn drop(&mut self) {
        if !self.committed {
            let _ = std::fs::remove_dir_all(&self.tmp);
        }
    }
}
