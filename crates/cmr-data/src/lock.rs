//! One writer per folder: an exclusive OS lock on `DIR/.lock`.
//!
//! The lock is the operating system's (`flock` on Unix, `LockFileEx` on
//! Windows, through `std::fs::File::try_lock`): it is released when the
//! process exits, however it exits, so a crash never leaves a stale lock.
//! The file holds the holder's process id, for the message the next process
//! prints; its presence alone means nothing.

use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use crate::error::{DataError, Result};

/// An exclusive lock on a folder, held until dropped.
#[derive(Debug)]
pub struct DirLock {
    // held open: closing it releases the lock
    _file: File,
    dir: PathBuf,
}

impl DirLock {
    /// The lock file's name inside the folder.
    pub const FILE: &'static str = ".lock";

    /// Lock `dir` (which must exist) for this process, or fail at once with
    /// [`DataError::Locked`] naming the process that holds it.
    pub fn acquire(dir: &Path) -> Result<Self> {
        let path = dir.join(Self::FILE);
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .map_err(|e| DataError::io(&path, e))?;
        match file.try_lock() {
            Ok(()) => {}
            Err(std::fs::TryLockError::WouldBlock) => {
                // the holder writes its pid just after taking the lock: give
                // it a moment, so that the message can name it
                let mut pid = None;
                for _ in 0..20 {
                    let mut text = String::new();
                    pid = file
                        .seek(SeekFrom::Start(0))
                        .and_then(|_| file.read_to_string(&mut text))
                        .ok()
                        .and_then(|_| text.trim().parse::<u32>().ok());
                    if pid.is_some() {
                        break;
                    }
                    std::thread::sleep(std::time::Duration::from_millis(5));
                }
                return Err(DataError::Locked {
                    dir: dir.to_path_buf(),
                    pid,
                });
            }
            Err(std::fs::TryLockError::Error(e)) => return Err(DataError::io(&path, e)),
        }
        let write_pid = |file: &mut File| -> std::io::Result<()> {
            file.set_len(0)?;
            file.seek(SeekFrom::Start(0))?;
            writeln!(file, "{}", std::process::id())?;
            file.flush()
        };
        // the pid is for the next process's message only: a full disk that
        // cannot take it must not stop the work the lock protects
        if let Err(e) = write_pid(&mut file) {
            tracing::debug!("{}: cannot record the pid: {e}", path.display());
        }
        Ok(Self {
            _file: file,
            dir: dir.to_path_buf(),
        })
    }

    /// The locked folder.
    pub fn dir(&self) -> &Path {
        &self.dir
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_lock_fails_naming_the_holder_and_succeeds_after_release() {
        let dir = tempfile::tempdir().unwrap();
        let first = DirLock::acquire(dir.path()).unwrap();
        assert_eq!(first.dir(), dir.path());
        // a second open file description conflicts even within one process
        let err = DirLock::acquire(dir.path()).unwrap_err();
        match &err {
            DataError::Locked { dir: d, pid } => {
                assert_eq!(d, dir.path());
                assert_eq!(*pid, Some(std::process::id()));
            }
            other => panic!("{other}"),
        }
        let text = err.to_string();
        assert!(text.contains(&std::process::id().to_string()), "{text}");
        drop(first);
        let again = DirLock::acquire(dir.path()).unwrap();
        drop(again);
    }

    #[test]
    fn a_missing_folder_is_an_error_naming_it() {
        let dir = tempfile::tempdir().unwrap();
        let err = DirLock::acquire(&dir.path().join("absent")).unwrap_err().to_string();
        assert!(err.contains("absent"), "{err}");
    }
}
