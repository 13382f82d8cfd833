//! `cargo xtask bench`: our step benchmark next to the PyTorch reference of
//! the same networks, same shapes, same thread count, in one table. The two
//! sides alternate network by network; with `--rounds N` that N times, and
//! each figure is its best round.
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
    /// Alternating rounds of both sides; the best round counts.
    pub rounds: usize,
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

/// The Python that runs the PyTorch side, if it has torch: `--python`,
/// else `$CMR_TORCH_PYTHON`, else `python3`.
fn torch_python(opts: &BenchOptions) -> Option<String> {
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
        return None;
    }
    Some(python)
}

fn torch(opts: &BenchOptions, python: &str) -> anyhow::Result<Vec<Row>> {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("bench/torch_reference.py");
    tracing::info!("PyTorch: {} ({} threads)", script.display(), opts.threads);
    let out = Command::new(python)
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
    Ok(parse(&out.stdout))
}

/// Each row's best (lowest) figure over the rounds.
fn best(rounds: &[Vec<Row>]) -> BTreeMap<(String, String, String), f64> {
    let mut best = BTreeMap::new();
    for r in rounds.iter().flatten() {
        let e = best.entry(key(r)).or_insert(f64::INFINITY);
        *e = r.ms.min(*e);
    }
    best
}

fn key(r: &Row) -> (String, String, String) {
    (r.widths.clone(), r.arch.clone(), r.what.clone())
}

/// Run both (`rounds` times) and return the table (markdown).
///
/// The two sides alternate network by network (one network at one width,
/// all its rows, then the other side's same rows), the side that goes first
/// swapping every round: this machine's speed drifts by up to 2× over
/// minutes, and a whole table of one side then the other compared one
/// minute's speed with another's.
pub fn run(opts: &BenchOptions) -> anyhow::Result<String> {
    let (mut ours_rounds, mut theirs_rounds) = (Vec::new(), Vec::new());
    // Checked once: importing torch takes seconds.
    let python = if opts.torch { torch_python(opts) } else { None };
    let cases: Vec<BenchOptions> = opts
        .widths
        .iter()
        .flat_map(|w| {
            opts.archs.iter().map(move |a| BenchOptions {
                archs: vec![a.clone()],
                widths: vec![w.clone()],
                ..opts.clone()
            })
        })
        .collect();
    for round in 1..=opts.rounds.max(1) {
        tracing::info!("round {round} of {}", opts.rounds.max(1));
        let (mut mine, mut theirs) = (Vec::new(), Vec::new());
        for case in &cases {
            let torch_first = round % 2 == 0;
            if let (true, Some(python)) = (torch_first, &python) {
                theirs.extend(torch(case, python)?);
            }
            mine.extend(ours(case)?);
            if let (false, Some(python)) = (torch_first, &python) {
                theirs.extend(torch(case, python)?);
            }
        }
        ours_rounds.push(mine);
        theirs_rounds.push(theirs);
    }
    // Rows in our benchmark's order, each at its best round.
    let ours_best = best(&ours_rounds);
    let theirs = best(&theirs_rounds);
    let order: Vec<&Row> = ours_rounds.first().map(|r| r.iter().collect()).unwrap_or_default();
    let mut table = String::from(
        "| network | widths | what | cmr (ms) | PyTorch (ms) | cmr / PyTorch |\n|---|---|---|---|---|---|\n",
    );
    for r in order {
        let ms = ours_best.get(&key(r)).copied().unwrap_or(r.ms);
        let t = theirs.get(&key(r));
        table.push_str(&format!(
            "| {} | {} | {} | {:.1} | {} | {} |\n",
            r.arch,
            r.widths,
            r.what,
            ms,
            t.map_or("–".into(), |t| format!("{t:.1}")),
            t.map_or("–".into(), |t| format!("{:.2}×", ms / t)),
        ));
    }
    Ok(table)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(what: &str, ms: f64) -> Row {
        Row {
            arch: "unet".into(),
            widths: "small".into(),
            what: what.into(),
            ms,
        }
    }

    #[test]
    fn best_takes_each_rows_lowest_round() {
        let rounds = vec![
            vec![row("train b4", 120.0), row("infer b1", 10.0)],
            vec![row("train b4", 100.0), row("infer b1", 12.0)],
        ];
        let b = best(&rounds);
        assert_eq!(b[&key(&row("train b4", 0.0))], 100.0);
        assert_eq!(b[&key(&row("infer b1", 0.0))], 10.0);
        assert_eq!(b.len(), 2);
    }
}
