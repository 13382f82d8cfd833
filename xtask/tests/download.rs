//! `cargo xtask download` end to end: the sample archive served over HTTP on
//! 127.0.0.1, a tampered archive, HTTP errors, a truncated download, `--from`
//! a folder, and a second run that does nothing.

#![allow(clippy::unwrap_used)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpListener;
use std::path::{Path, PathBuf};

use xtask::download::{Installed, Source, install, verify_installed};

fn shared() -> Option<PathBuf> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../shared/data");
    if root.join("cmr-2021-upstream-sample.tar.gz").is_file() {
        return Some(root);
    }
    assert!(
        std::env::var("CMR_REQUIRE_DATA").is_err(),
        "shared data not found at {}",
        root.display()
    );
    eprintln!("skipped: shared data not found at {}", root.display());
    None
}

/// Serve `routes` (path → body) on 127.0.0.1 until the test ends. A body
/// under `/truncated` announces its full length but sends half.
fn serve(routes: Vec<(&'static str, Vec<u8>)>) -> String {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { continue };
            let mut reader = BufReader::new(stream.try_clone().unwrap());
            let mut request = String::new();
            reader.read_line(&mut request).unwrap();
            let mut line = String::new();
            while reader.read_line(&mut line).is_ok() && line.trim() != "" {
                line.clear();
            }
            let path = request.split_whitespace().nth(1).unwrap_or("/").to_string();
            match routes.iter().find(|(p, _)| *p == path) {
                Some((p, body)) => {
                    let head = format!(
                        "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                        body.len()
                    );
                    let _ = stream.write_all(head.as_bytes());
                    let n = if p.starts_with("/truncated") {
                        body.len() / 2
                    } else {
                        body.len()
                    };
                    let _ = stream.write_all(&body[..n]);
                }
                None => {
                    let _ =
                        stream.write_all(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n");
                }
            }
        }
    });
    format!("http://{addr}")
}

/// The sample archive with one byte of one training image changed.
fn tampered(archive: &Path) -> Vec<u8> {
    let mut input = tar::Archive::new(flate2::read::GzDecoder::new(std::fs::File::open(archive).unwrap()));
    let mut out = tar::Builder::new(flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast()));
    for entry in input.entries().unwrap() {
        let mut entry = entry.unwrap();
        let mut header = entry.header().clone();
        let path = entry.path().unwrap().into_owned();
        let mut data = Vec::new();
        entry.read_to_end(&mut data).unwrap();
        if path.ends_with("train/image/cmr7.png") {
            let i = data.len() / 2;
            data[i] ^= 0x01;
        }
        out.append_data(&mut header, &path, data.as_slice()).unwrap();
    }
    out.into_inner().unwrap().finish().unwrap()
}

#[test]
fn install_from_http_and_reject_bad_downloads() {
    let Some(shared) = shared() else { return };
    let archive = shared.join("cmr-2021-upstream-sample.tar.gz");
    let bytes = std::fs::read(&archive).unwrap();
    let base = serve(vec![
        ("/archive.tar.gz", bytes.clone()),
        ("/tampered.tar.gz", tampered(&archive)),
        ("/truncated.tar.gz", bytes),
    ]);
    let dir = tempfile::tempdir().unwrap();
    let dest = dir.path().join("data/cmr-2021");

    // a tampered file: rejected, nothing installed
    let err = install(&Source::Url(format!("{base}/tampered.tar.gz")), &dest, false).unwrap_err();
    let msg = format!("{err:#}");
    assert!(msg.contains("train/image/cmr7.png") && msg.contains("SHA-256"), "{msg}");
    assert!(!dest.exists());
    assert_eq!(
        std::fs::read_dir(dir.path().join("data")).unwrap().count(),
        0,
        "no leftovers"
    );

    // HTTP errors and a truncated download
    let msg = format!(
        "{:#}",
        install(&Source::Url(format!("{base}/missing.tar.gz")), &dest, false).unwrap_err()
    );
    assert!(msg.contains("404"), "{msg}");
    let msg = format!(
        "{:#}",
        install(&Source::Url(format!("{base}/truncated.tar.gz")), &dest, false).unwrap_err()
    );
    assert!(msg.contains("truncated") || msg.contains("broke off"), "{msg}");
    assert!(!dest.exists());

    // the real thing
    let got = install(&Source::Url(format!("{base}/archive.tar.gz")), &dest, false).unwrap();
    assert_eq!(
        got,
        Installed::Fresh {
            files: 280,
            missing_splits: vec!["val".into()]
        }
    );
    assert_eq!(verify_installed(&dest).unwrap(), 280);
    assert!(!dest.join("test/mask").exists(), "predicted masks are not labels");
    assert_eq!(std::fs::read_dir(dest.join("train/image")).unwrap().count(), 100);
    assert_eq!(
        std::fs::read_dir(dir.path().join("data")).unwrap().count(),
        1,
        "no leftovers"
    );

    // a second run does nothing; a failed forced reinstall keeps the old copy
    let stamp = std::fs::metadata(dest.join("train/image/cmr1.png"))
        .unwrap()
        .modified()
        .unwrap();
    assert_eq!(
        install(&Source::Url(format!("{base}/archive.tar.gz")), &dest, false).unwrap(),
        Installed::AlreadyThere { files: 280 }
    );
    assert!(install(&Source::Url(format!("{base}/tampered.tar.gz")), &dest, true).is_err());
    assert_eq!(verify_installed(&dest).unwrap(), 280);
    assert_eq!(
        std::fs::metadata(dest.join("train/image/cmr1.png"))
            .unwrap()
            .modified()
            .unwrap(),
        stamp
    );
}

#[test]
fn install_from_a_folder_and_an_archive_file() {
    let Some(shared) = shared() else { return };
    let dir = tempfile::tempdir().unwrap();
    let dest = dir.path().join("cmr");
    let got = install(&Source::from_path(&shared.join("cmr-2021")).unwrap(), &dest, false).unwrap();
    assert!(matches!(got, Installed::Fresh { files: 280, .. }), "{got:?}");
    assert_eq!(
        install(&Source::from_path(&shared.join("cmr-2021")).unwrap(), &dest, false).unwrap(),
        Installed::AlreadyThere { files: 280 }
    );
    // a changed file in an installed copy is noticed and repaired
    std::fs::write(dest.join("test/image/cmr150.png"), b"x").unwrap();
    assert!(verify_installed(&dest).is_err());
    let src = Source::from_path(&shared.join("cmr-2021-upstream-sample.tar.gz")).unwrap();
    assert!(matches!(install(&src, &dest, false).unwrap(), Installed::Fresh { .. }));
    assert_eq!(verify_installed(&dest).unwrap(), 280);
    // a folder without the data
    let empty = tempfile::tempdir().unwrap();
    let msg = format!(
        "{:#}",
        install(&Source::Folder(empty.path().into()), &dir.path().join("x"), false).unwrap_err()
    );
    assert!(msg.contains("none of the dataset's files"), "{msg}");
}

/// A tmpfs of `size` mounted at `at` while it lives (needs root: `None`
/// otherwise).
struct SmallDisk(PathBuf);

impl SmallDisk {
    fn mount(at: &Path, size: &str) -> Option<Self> {
        std::fs::create_dir_all(at).unwrap();
        let ok = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(at)
            .stderr(std::process::Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        ok.then(|| Self(at.to_path_buf()))
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount").arg(&self.0).status();
    }
}

/// The names in `dir`, sorted.
fn names(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

#[cfg(unix)]
#[test]
fn a_full_disk_fails_clearly_and_keeps_the_installed_copy() {
    let Some(shared) = shared() else { return };
    let dir = tempfile::tempdir().unwrap();
    let Some(disk) = SmallDisk::mount(&dir.path().join("disk"), "8m") else {
        eprintln!("skipped: cannot mount a tmpfs here (not root)");
        return;
    };
    let src = Source::from_path(&shared.join("cmr-2021")).unwrap();
    let dest = disk.0.join("cmr");
    assert!(matches!(
        install(&src, &dest, false).unwrap(),
        Installed::Fresh { files: 280, .. }
    ));

    // fill what is left
    let filler = disk.0.join("filler");
    {
        let mut f = std::fs::File::create(&filler).unwrap();
        let block = vec![7u8; 4096];
        while f.write_all(&block).is_ok() {}
        let _ = f.sync_all();
    }

    // a forced reinstall cannot stage its copy: a clear error, the installed
    // copy as it was, no staging folder left
    let msg = format!("{:#}", install(&src, &dest, true).unwrap_err());
    assert!(
        msg.contains("No space left on device") && msg.contains(&*disk.0.to_string_lossy()),
        "{msg}"
    );
    assert_eq!(verify_installed(&dest).unwrap(), 280);
    assert_eq!(names(&disk.0), ["cmr", "filler"]);

    // a fresh install on the full disk leaves nothing at all
    let other = disk.0.join("other");
    let msg = format!("{:#}", install(&src, &other, false).unwrap_err());
    assert!(msg.contains("No space left on device"), "{msg}");
    assert_eq!(names(&disk.0), ["cmr", "filler"]);

    // with room again, the same command works
    std::fs::remove_file(&filler).unwrap();
    assert!(matches!(
        install(&src, &other, false).unwrap(),
        Installed::Fresh { files: 280, .. }
    ));
    assert_eq!(verify_installed(&other).unwrap(), 280);
}
