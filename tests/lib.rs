//! Helpers for the end-to-end tests: the `cmr` binary, the shared dataset and
//! small copies of it.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

/// The `cmr` binary of this build profile, built once per test run.
pub fn cmr_bin() -> PathBuf {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        // target/<profile>/deps/e2e-… → target/<profile>/cmr
        let exe = std::env::current_exe().expect("test binary path");
        let profile_dir = exe
            .parent()
            .and_then(Path::parent)
            .expect("target/<profile>")
            .to_path_buf();
        let release = profile_dir.file_name().is_some_and(|n| n == "release");
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let mut cmd = Command::new(cargo);
        cmd.args(["build", "--quiet", "-p", "cmr-cli", "--bin", "cmr"]);
        if release {
            cmd.arg("--release");
        }
        let status = cmd.status().expect("running cargo build");
        assert!(status.success(), "cargo build -p cmr-cli failed");
        let bin = profile_dir.join(format!("cmr{}", std::env::consts::EXE_SUFFIX));
        assert!(bin.is_file(), "{} not built", bin.display());
        bin
    })
    .clone()
}

/// A `cmr` command with a quiet, colourless log.
pub fn cmr() -> Command {
    let mut c = Command::new(cmr_bin());
    c.env("RUST_LOG", "warn").env("NO_COLOR", "1");
    c
}

/// The shared dataset. With `CMR_REQUIRE_DATA=1` (CI) its absence is a
/// failure; otherwise `None` and the test says it is skipped.
pub fn shared_data() -> Option<PathBuf> {
    let root = std::env::var_os("CMR_DATA_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../../shared/data/cmr-2021"));
    if root.join("train").is_dir() {
        return Some(root);
    }
    assert!(
        std::env::var("CMR_REQUIRE_DATA").is_err(),
        "dataset not found at {}",
        root.display()
    );
    eprintln!("skipped: dataset not found at {}", root.display());
    None
}

fn copy(from: &Path, to: &Path) {
    std::fs::create_dir_all(to.parent().unwrap()).unwrap();
    std::fs::copy(from, to).unwrap_or_else(|e| panic!("copying {}: {e}", from.display()));
}

/// A dataset root in `dir` with the first `train` labelled slices and the
/// first `test` test images of the shared set.
pub fn subset(data: &Path, dir: &Path, train: usize, test: usize) -> PathBuf {
    let root = dir.join("data");
    for i in 1..=train {
        copy(
            &data.join(format!("train/image/cmr{i}.png")),
            &root.join(format!("train/image/cmr{i}.png")),
        );
        copy(
            &data.join(format!("train/mask/cmr{i}_mask.png")),
            &root.join(format!("train/mask/cmr{i}_mask.png")),
        );
    }
    for i in 121..121 + test {
        copy(
            &data.join(format!("test/image/cmr{i}.png")),
            &root.join(format!("test/image/cmr{i}.png")),
        );
    }
    root
}

/// Run a command; its (status, stdout, stderr).
pub fn output(cmd: &mut Command) -> (std::process::ExitStatus, String, String) {
    let out = cmd.output().expect("running cmr");
    (
        out.status,
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Run a command that must succeed; its stdout.
pub fn ok(cmd: &mut Command) -> String {
    let (status, stdout, stderr) = output(cmd);
    assert!(status.success(), "{cmd:?} failed: {status}\n{stderr}");
    stdout
}

/// Run a command that must fail; its stderr.
pub fn fails(cmd: &mut Command) -> String {
    let (status, _, stderr) = output(cmd);
    assert!(!status.success(), "{cmd:?} should have failed");
    assert!(stderr.contains("error"), "{stderr}");
    stderr
}
