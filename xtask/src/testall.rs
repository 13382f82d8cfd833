//! `cargo xtask test`: the test suite of every crate, as CI runs it.

use std::process::Command;
use std::time::Instant;

use anyhow::bail;

/// Every package, lowest layer first.
pub const PACKAGES: [&str; 8] = [
    "cmr-kernels",
    "cmr-data",
    "cmr-models",
    "cmr-loss",
    "cmr-train",
    "cmr-cli",
    "xtask",
    "cmr-tests",
];

/// Run the tests of `packages` (all when empty): one `cargo test -p A -p B …`,
/// so that the packages are built once, with one resolution of features.
/// (One `cargo test -p` per package resolves features per package: candle and
/// `gemm` differ in features between, say, `cmr-data` and `cmr-models`, and
/// were rebuilt for each package, about 20 minutes of CI.) cargo runs each
/// package's test binaries in turn and reports them separately; it stops at
/// the first package that fails.
pub fn run(packages: &[String], extra: &[String]) -> anyhow::Result<()> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let chosen: Vec<String> = if packages.is_empty() {
        PACKAGES.iter().map(|s| s.to_string()).collect()
    } else {
        packages.to_vec()
    };
    let mut args = vec!["test".to_string()];
    for package in &chosen {
        args.push("-p".into());
        args.push(package.clone());
    }
    tracing::info!("cargo {}", args.join(" "));
    let started = Instant::now();
    let status = Command::new(&cargo).args(&args).args(extra).status()?;
    let took = started.elapsed().as_secs_f64();
    if !status.success() {
        bail!("tests failed ({took:.0} s): {}", chosen.join(", "));
    }
    tracing::info!("tests passed in {took:.0} s: {}", chosen.join(", "));
    Ok(())
}
