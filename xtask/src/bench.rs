//! `cargo xtask bench`: our step benchmark next to the PyTorch reference of
//! the same networks, same shapes, same thread count, in one table.
//!
//! Both sides run as servers (`step --serve`, `torch_reference.py --serve`)
//! that answer "run this case once" requests, and the driver alternates them
//! run by run: each of our runs has a PyTorch run of the same case right
//! before or after it (which side goes first swaps every pair). This
//! machine's speed drifts by up to 2× over minutes; two runs seconds apart
//! see the same speed, where two tables minutes apart did not. Each row
//! reports both medians, their ratio, and in how many of its pairs our run
//! was the faster one.
//!
//! The peers (`--peers`, default `torch`) are PyTorch f32 eager (`torch`),
//! PyTorch with bf16 autocast and channels-last tensors (`torch-bf16`,
//! oneDNN's AMX kernels where the CPU has them) and ONNX Runtime in f32
//! (`onnx`, inference rows only), all from `xtask/bench/torch_reference.py`,
//! which runs when a Python with `torch` (and `onnxruntime`, `onnx` for
//! `onnx`) is found: `--python PATH`, else `$CMR_TORCH_PYTHON`, else
//! `python3`. Get one with `python3 -m venv .venv && .venv/bin/pip install
//! torch onnxruntime onnx`. With several peers each of our runs is paired
//! with one run of each peer, the order reversed every other run.

use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::time::Duration;

use anyhow::{Context, bail};
use serde::Deserialize;

/// The rows of each network, in table order.
pub const WHATS: [&str; 4] = ["train b4", "train b8", "infer b1", "infer b20"];

/// Options of `cargo xtask bench`.
#[derive(Clone, Debug)]
pub struct BenchOptions {
    /// Timed pairs per row (one run of each side), after one warm-up run each.
    pub runs: usize,
    pub threads: usize,
    pub archs: Vec<String>,
    pub widths: Vec<String>,
    /// Rows of each network (of [`WHATS`]).
    pub whats: Vec<String>,
    pub python: Option<String>,
    /// The other sides, in table order.
    pub peers: Vec<Peer>,
    /// Our side in bf16 on the AMX tiles (`step --bf16`) instead of f32.
    pub bf16: bool,
}

/// One other side of the comparison.
#[derive(Clone, Debug, PartialEq)]
pub enum Peer {
    /// PyTorch, f32 eager.
    Torch,
    /// PyTorch, bf16 autocast and channels-last.
    TorchBf16,
    /// ONNX Runtime, f32, inference only.
    Onnx,
    /// Another build's step benchmark (`--against`).
    Build(std::path::PathBuf),
}

impl Peer {
    /// The names `--peers` takes.
    pub const NAMES: [&'static str; 3] = ["torch", "torch-bf16", "onnx"];

    pub fn parse(name: &str) -> anyhow::Result<Self> {
        match name {
            "torch" => Ok(Self::Torch),
            "torch-bf16" => Ok(Self::TorchBf16),
            "onnx" => Ok(Self::Onnx),
            other => bail!("unknown peer {other:?} (torch, torch-bf16, onnx)"),
        }
    }

    /// Its column name.
    fn label(&self) -> &'static str {
        match self {
            Self::Torch => "PyTorch",
            Self::TorchBf16 => "PyTorch bf16",
            Self::Onnx => "ONNX Runtime",
            Self::Build(_) => "other build",
        }
    }

    /// Whether it runs `what` (ONNX Runtime: inference only).
    fn runs(&self, what: &str) -> bool {
        !(matches!(self, Self::Onnx) && what.starts_with("train"))
    }
}

/// One side's answer to a request.
#[derive(Debug, Deserialize)]
struct Reply {
    ms: Option<f64>,
    /// The case's convolution work (our side only).
    gflop: Option<f64>,
    error: Option<String>,
}

/// One run's answer.
#[derive(Clone, Copy, Debug, PartialEq)]
struct Answer {
    ms: f64,
    gflop: Option<f64>,
}

/// A benchmark process that runs one case per request line.
struct Server {
    name: &'static str,
    child: Child,
    stdin: Option<ChildStdin>,
    stdout: BufReader<ChildStdout>,
}

impl Server {
    fn spawn(name: &'static str, mut command: Command) -> anyhow::Result<Self> {
        let mut child = command
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .with_context(|| format!("starting the {name} benchmark"))?;
        let stdin = child.stdin.take();
        let stdout = BufReader::new(child.stdout.take().context("no stdout")?);
        Ok(Self {
            name,
            child,
            stdin,
            stdout,
        })
    }

    /// Run `request` (`ARCH/WIDTHS WHAT`) once; its time in ms.
    fn run(&mut self, request: &str) -> anyhow::Result<Answer> {
        let name = self.name;
        let stdin = self.stdin.as_mut().context("server closed")?;
        writeln!(stdin, "{request}")
            .and_then(|()| stdin.flush())
            .with_context(|| format!("the {name} benchmark exited"))?;
        let mut line = String::new();
        if self.stdout.read_line(&mut line)? == 0 {
            bail!("the {name} benchmark exited before answering {request:?}");
        }
        let reply: Reply = serde_json::from_str(line.trim())
            .with_context(|| format!("the {name} benchmark answered {:?} to {request:?}", line.trim()))?;
        match (reply.ms, reply.error) {
            (_, Some(e)) => bail!("the {name} benchmark, {request:?}: {e}"),
            (Some(ms), None) => Ok(Answer { ms, gflop: reply.gflop }),
            (None, None) => bail!("the {name} benchmark answered {:?} to {request:?}", line.trim()),
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        // end of input: the server exits
        drop(self.stdin.take());
        let _ = self.child.wait();
    }
}

fn ours(opts: &BenchOptions) -> anyhow::Result<Server> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let bf16 = if opts.bf16 { " --bf16" } else { "" };
    tracing::info!(
        "cmr: cargo bench -p cmr-models --bench step -- --serve{bf16} ({} threads)",
        opts.threads
    );
    let mut command = Command::new(cargo);
    command
        .args(["bench", "-q", "-p", "cmr-models", "--bench", "step", "--", "--serve"])
        .args(opts.bf16.then_some("--bf16"))
        .env("RAYON_NUM_THREADS", opts.threads.to_string());
    Server::spawn("cmr", command)
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

fn torch(opts: &BenchOptions, python: &str, peer: &Peer) -> anyhow::Result<Server> {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("bench/torch_reference.py");
    let mode = match peer {
        Peer::TorchBf16 => "bf16",
        Peer::Onnx => "onnx",
        _ => "f32",
    };
    tracing::info!(
        "{}: {} --serve --mode {mode} ({} threads)",
        peer.label(),
        script.display(),
        opts.threads
    );
    let mut command = Command::new(python);
    command
        .arg(&script)
        .args(["--threads", &opts.threads.to_string(), "--serve", "--mode", mode])
        .env("OMP_NUM_THREADS", opts.threads.to_string());
    Server::spawn(peer.label(), command)
}

/// Whether `python` can import `module`.
fn has_module(python: &str, module: &str) -> bool {
    Command::new(python)
        .args(["-c", &format!("import {module}")])
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// The median of `v` (the mean of the middle two for an even count).
fn median(v: &[f64]) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(f64::total_cmp);
    let n = v.len();
    match n {
        0 => f64::NAN,
        _ if n % 2 == 1 => v[n / 2],
        _ => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

/// One row's figures from its paired runs.
#[derive(Debug, PartialEq)]
struct Summary {
    ours_ms: f64,
    theirs_ms: Option<f64>,
    /// Pairs in which our run was the faster, and pairs.
    faster: Option<(usize, usize)>,
}

fn summarise(ours: &[f64], theirs: &[f64]) -> Summary {
    let paired = !theirs.is_empty();
    Summary {
        ours_ms: median(ours),
        theirs_ms: paired.then(|| median(theirs)),
        faster: paired.then(|| {
            (
                ours.iter().zip(theirs).filter(|(o, t)| o < t).count(),
                ours.len().min(theirs.len()),
            )
        }),
    }
}

/// The pause before each timed run: the other side's worker threads stop
/// spinning (OpenMP's and rayon's spin briefly after their last task).
const SETTLE: Duration = Duration::from_millis(10);

/// Run every row, our side and each peer alternating run by run, and return
/// the table (markdown).
pub fn run(opts: &BenchOptions) -> anyhow::Result<String> {
    if opts.runs == 0 {
        bail!("--runs must be at least 1");
    }
    // Checked once: importing torch takes seconds.
    let wants_python = opts.peers.iter().any(|p| !matches!(p, Peer::Build(_)));
    let python = if wants_python { torch_python(opts) } else { None };
    let mut peers: Vec<(&Peer, Server)> = Vec::new();
    for peer in &opts.peers {
        let server = match peer {
            Peer::Build(path) => {
                tracing::info!("the other side: {} --serve ({} threads)", path.display(), opts.threads);
                let mut command = Command::new(path);
                command
                    .arg("--serve")
                    .env("RAYON_NUM_THREADS", opts.threads.to_string());
                Server::spawn("other build", command)?
            }
            _ => {
                let Some(python) = python.as_deref() else { continue };
                if *peer == Peer::Onnx && !(has_module(python, "onnxruntime") && has_module(python, "onnx")) {
                    tracing::warn!(
                        "{python} has no onnxruntime or onnx: ONNX Runtime left out (pip install onnxruntime onnx)"
                    );
                    continue;
                }
                torch(opts, python, peer)?
            }
        };
        peers.push((peer, server));
    }
    let mut cmr = ours(opts)?;
    let mut table = String::from("| network | widths | what | cmr (ms) | cmr GFLOP/s |");
    let mut rule = String::from("|---|---|---|---|---|");
    for (peer, _) in &peers {
        let l = peer.label();
        table.push_str(&format!(" {l} (ms) | cmr / {l} | cmr faster |"));
        rule.push_str("---|---|---|");
    }
    if peers.len() > 1 {
        table.push_str(" cmr / fastest peer |");
        rule.push_str("---|");
    }
    table.push('\n');
    table.push_str(&rule);
    table.push('\n');
    for widths in &opts.widths {
        for arch in &opts.archs {
            for what in &opts.whats {
                let request = format!("{arch}/{widths} {what}");
                // warm-up, not counted; a peer that cannot run the case (an
                // export ONNX does not take) is left out of the row
                cmr.run(&request)?;
                let mut runs_it = vec![false; peers.len()];
                for (j, (peer, server)) in peers.iter_mut().enumerate() {
                    if peer.runs(what) {
                        match server.run(&request) {
                            Ok(_) => runs_it[j] = true,
                            Err(e) => tracing::warn!("{e:#}: left out of this row"),
                        }
                    }
                }
                let mut mine = Vec::new();
                let mut gflop = None;
                let mut theirs: Vec<Vec<f64>> = vec![Vec::new(); peers.len()];
                for i in 0..opts.runs {
                    // ours first in even runs, last in odd ones (the peers
                    // then in reverse order)
                    let ours_first = i % 2 == 0;
                    if ours_first {
                        std::thread::sleep(SETTLE);
                        let a = cmr.run(&request)?;
                        mine.push(a.ms);
                        gflop = gflop.or(a.gflop);
                    }
                    let order: Vec<usize> = if ours_first {
                        (0..peers.len()).collect()
                    } else {
                        (0..peers.len()).rev().collect()
                    };
                    for j in order {
                        let (_, server) = &mut peers[j];
                        if runs_it[j] {
                            std::thread::sleep(SETTLE);
                            theirs[j].push(server.run(&request)?.ms);
                        }
                    }
                    if !ours_first {
                        std::thread::sleep(SETTLE);
                        let a = cmr.run(&request)?;
                        mine.push(a.ms);
                        gflop = gflop.or(a.gflop);
                    }
                }
                let ours_ms = median(&mine);
                let mut line = format!(
                    "| {arch} | {widths} | {what} | {ours_ms:.1} | {} |",
                    gflop.map_or("–".into(), |g| format!("{:.0}", g / (ours_ms / 1e3)))
                );
                let mut fastest = f64::INFINITY;
                for t in &theirs {
                    let s = summarise(&mine, t);
                    if let Some(t) = s.theirs_ms {
                        fastest = fastest.min(t);
                    }
                    line.push_str(&format!(
                        " {} | {} | {} |",
                        s.theirs_ms.map_or("–".into(), |t| format!("{t:.1}")),
                        s.theirs_ms.map_or("–".into(), |t| format!("{:.2}×", s.ours_ms / t)),
                        s.faster.map_or("–".into(), |(k, n)| format!("{k} of {n}")),
                    ));
                }
                if peers.len() > 1 {
                    line.push_str(&if fastest.is_finite() {
                        format!(" {:.2}× |", ours_ms / fastest)
                    } else {
                        " – |".into()
                    });
                }
                tracing::info!("{line}");
                table.push_str(&line);
                table.push('\n');
            }
        }
    }
    Ok(table)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn median_of_odd_and_even_counts() {
        assert_eq!(median(&[3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&[4.0, 1.0, 3.0, 2.0]), 2.5);
        assert!(median(&[]).is_nan());
    }

    #[test]
    fn summary_pairs_runs_in_order() {
        // pair by pair: 10 < 12, 20 > 11, 9 < 30
        let s = summarise(&[10.0, 20.0, 9.0], &[12.0, 11.0, 30.0]);
        assert_eq!(
            s,
            Summary {
                ours_ms: 10.0,
                theirs_ms: Some(12.0),
                faster: Some((2, 3)),
            }
        );
        let alone = summarise(&[5.0, 7.0], &[]);
        assert_eq!(alone.ours_ms, 6.0);
        assert_eq!((alone.theirs_ms, alone.faster), (None, None));
    }

    #[test]
    fn server_reports_errors_and_exits() {
        // a stand-in server: answers the first request, fails the second,
        // then exits without answering the third
        let mut command = Command::new("sh");
        command.args([
            "-c",
            r#"read a; echo '{"ms": 1.5}'; read b; echo '{"error": "no such case"}'; read c"#,
        ]);
        let mut s = Server::spawn("test", command).unwrap();
        assert_eq!(s.run("unet/seed infer b1").unwrap().ms, 1.5);
        let e = s.run("unet/seed frob").unwrap_err().to_string();
        assert!(e.contains("no such case") && e.contains("unet/seed frob"), "{e}");
        let e = s.run("unet/seed infer b1").unwrap_err().to_string();
        assert!(e.contains("exited"), "{e}");
    }
}
