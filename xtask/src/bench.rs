//! `cargo xtask bench`: our step benchmark next to the PyTorch reference of
//! the same networks, same shapes, same thread count, in one table.
//!
//! The PyTorch side (`xtask/bench/torch_reference.py`) runs when a Python with
//! `torch` is found: `--python PATH`, else `$CMR_TORCH_PYTHON`, else
//! `python3`. Get one with `python3 -m venv .venv && .venv/bin/pip install torch`.

use std::collections::BTreeMap;
use std::path::Path;
use std::process::{Command, Stdio};

use anyhow::{Context, bail};
use serde::Deserialize;

#[derive(Debug, Deserialize)]
struct Row {
    arch: String,
    widths: String,
    what: String,
    ms: f64,
}

/// Options of `cargo xtask bench`.
#[derive(Clone, Debug)]
pub struct BenchOptions {
    pub runs: usize,
    pub threads: usize,
    pub archs: Vec<String>,
    pub widths: Vec<String>,
    pub python: Option<String>,
    pub torch: bool,
}

fn parse(stdout: &[u8]) -> Vec<Row> {
    String::from_utf8_lossy(stdout)
        .lines()
        .filter(|l| l.starts_with('{'))
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
}

fn ours(opts: &BenchOptions) -> anyhow::Result<Vec<Row>> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let mut filters = Vec::new();
    for w in &opts.widths {
        for a in &opts.archs {
            filters.push(format!("{a}/{w}"));
        }
    }
    tracing::info!("cmr: cargo bench -p cmr-models --bench step ({} threads)", opts.threads);
    let out = Command::new(cargo)
        .args([
            "bench",
            "-q",
            "-p",
            "cmr-models",
            "--bench",
            "step",
            "--",
            "--json",
            "--runs",
        ])
        .arg(opts.runs.to_string())
        .args(&filters)
        .env("RAYON_NUM_THREADS", opts.threads.to_string())
        .stderr(Stdio::inherit())
        .output()
        .context("running cargo bench")?;
    if !out.status.success() {
        bail!("cargo bench failed");
    }
    Ok(parse(&out.stdout))
}

fn torch(opts: &BenchOptions) -> anyhow::Result<Option<Vec<Row>>> {
    let python = opts
        .python
        .clone()
        .or_else(|| std::env::var("CMR_TORCH_PYTHON").ok())
        .unwrap_or_else(|| "python3".into());
    let has_torch = Command::new(&python)
        .args(["-c", "import torch"])
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !has_torch {
        tracing::warn!(
            "{python} has no torch: PyTorch column left empty (python3 -m venv .venv && .venv/bin/pip install torch, then --python .venv/bin/python)"
        );
        return Ok(None);
    }
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("bench/torch_reference.py");
    tracing::info!("PyTorch: {} ({} threads)", script.display(), opts.threads);
    let out = Command::new(&python)
        .arg(&script)
        .args(["--threads", &opts.threads.to_string(), "--runs", &opts.runs.to_string()])
        .args(["--widths", &opts.widths.join(","), "--archs", &opts.archs.join(",")])
        .env("OMP_NUM_THREADS", opts.threads.to_string())
        .stderr(Stdio::inherit())
        .output()
        .context("running the PyTorch reference")?;
    if !out.status.success() {
        bail!("the PyTorch reference failed");
    }
    Ok(Some(parse(&out.stdout)))
}

/// Run both and print the table (markdown) on stdout.
pub fn run(opts: &BenchOptions) -> anyhow::Result<String> {
    let ours = ours(opts)?;
    let theirs = if opts.torch { torch(opts)? } else { None };
    let key = |r: &Row| (r.widths.clone(), r.arch.clone(), r.what.clone());
    let theirs: BTreeMap<_, f64> = theirs.unwrap_or_default().iter().map(|r| (key(r), r.ms)).collect();
    let mut table = String::from(
        "| network | widths | what | cmr (ms) | PyTorch (ms) | cmr / PyTorch |\n|---|---|---|---|---|---|\n",
    );
    for r in &ours {
        let t = theirs.get(&key(r));
        table.push_str(&format!(
            "| {} | {} | {} | {:.1} | {} | {} |\n",
            r.arch,
            r.widths,
            r.what,
            r.ms,
            t.map_or("–".into(), |t| format!("{t:.1}")),
            t.map_or("–".into(), |t| format!("{:.2}×", r.ms / t)),
        ));
    }
    Ok(table)
}
