//! `cargo xtask test`: the test suite crate by crate, as CI runs it.

use std::process::Command;
use std::time::Instant;

use anyhow::bail;

/// Every package, lowest layer first.
pub const PACKAGES: [&str; 7] = [
    "cmr-data",
    "cmr-models",
    "cmr-loss",
    "cmr-train",
    "cmr-cli",
    "xtask",
    "cmr-tests",
];

/// Run `cargo test -p <package>` for each of `packages` (all when empty),
/// stopping at the first failure.
pub fn run(packages: &[String], extra: &[String]) -> anyhow::Result<()> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let chosen: Vec<String> = if packages.is_empty() {
        PACKAGES.iter().map(|s| s.to_string()).collect()
    } else {
        packages.to_vec()
    };
    let mut summary = Vec::new();
    for package in &chosen {
        tracing::info!("cargo test -p {package}");
        let started = Instant::now();
        let status = Command::new(&cargo)
            .args(["test", "-p", package])
            .args(extra)
            .status()?;
        summary.push(format!(
            "{package}: {} in {:.0} s",
            if status.success() { "ok" } else { "FAILED" },
            started.elapsed().as_secs_f64()
        ));
        if !status.success() {
            for line in &summary {
                tracing::info!("{line}");
            }
            bail!("tests of {package} failed");
        }
    }
    for line in &summary {
        tracing::info!("{line}");
    }
    Ok(())
}
