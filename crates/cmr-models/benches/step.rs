//! Training-step and inference timings of the three networks.
//!
//! `cargo bench -p cmr-models --bench step -- [--quick] [FILTER…]`
//!
//! For each network at `seed` and `small` widths: one training step (forward
//! in train mode, soft-Dice loss, backward as `cmr train` runs it — on the
//! fast kernels' tape when they are on; no optimiser) at batch 4 and 8,
//! and inference (eval-mode forward) at batch 1 and 20, all at 96×96. Each
//! figure is the median of `--runs` timed runs (default 5) after one warm-up,
//! with the achieved GFLOP/s (training counted as 3× the forward FLOPs).
//! A filter keeps the rows whose label contains it, e.g. `unet3plus/small`;
//! `--json` prints one JSON object per row instead of the table; `--what
//! "train b8"` keeps only the rows of that kind (to measure one case's peak
//! memory with `/usr/bin/time -v`); `--no-kernels` runs candle's own ops
//! (`KernelConfig::off`), `--bf16` bf16 products on the CPU's bf16 unit (AMX tiles, else AVX512-BF16 dot products). `--compare batched` (or `direct`, `upsampled`, `winograd`, `f4`: F(2×2)
//! everywhere Winograd runs against the default's tiles; `bf16`: f32 products against bf16 on the bf16 unit,
//! AMX or AVX512-BF16) times
//! each case with that switch of the fast kernels off and on, alternating
//! run by run in one process, so that a slow minute of the machine hits both
//! alike: two rows per case, the mode in brackets.
//!
//! `--serve` is for `cargo xtask bench`, which alternates this benchmark
//! and the PyTorch reference run by run: it reads one request per line on
//! stdin, `ARCH/WIDTHS WHAT` (e.g. `unet3plus/seed train b8`), runs that
//! case once and answers one line, `{"ms":…,"gflop":…}` (the case's
//! convolution work) or `{"error":"…"}`. Networks
//! and inputs are built on first use and kept; the driver discards each
//! case's first run as its warm-up.

#![allow(clippy::print_stdout, clippy::unwrap_used)]

use std::time::Instant;

use std::collections::HashMap;
use std::io::{BufRead, Write};

use candle_core::{DType, Device, ModuleT, Tensor};
use candle_nn::{VarBuilder, VarMap};
use cmr_kernels::{Batched, KernelConfig, Precision, Winograd, forward_backward};
use cmr_loss::Loss;
use cmr_models::{Architecture, Model, ModelConfig, Preset, build, forward_flops};

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// Median ms of `runs` timed runs of each of `nets` on `case`, after a
/// warm-up, the nets alternating run by run.
fn time(runs: usize, nets: &[Net], case: &Case) -> Vec<f64> {
    let mut ms = vec![Vec::new(); nets.len()];
    for i in 0..=runs {
        for (m, net) in nets.iter().enumerate() {
            let t = Instant::now();
            net.run(case);
            if i > 0 {
                ms[m].push(t.elapsed().as_secs_f64() * 1e3);
            }
        }
    }
    ms.into_iter().map(median).collect()
}

/// The two settings `--compare` names: (off, on), `base` otherwise.
fn switch(name: &str, base: KernelConfig) -> [KernelConfig; 2] {
    let pair = |off: KernelConfig| [off, base];
    match name {
        "batched" => pair(KernelConfig {
            batched: Batched::Off,
            ..base
        }),
        "direct" => pair(KernelConfig { direct: false, ..base }),
        "upsampled" => pair(KernelConfig {
            upsampled: false,
            ..base
        }),
        "winograd" => pair(KernelConfig {
            winograd: Winograd::Off,
            ..base
        }),
        // off: F(2×2) on every layer Winograd takes; on: the default's tiles
        "f4" => pair(KernelConfig {
            winograd: Winograd::F2x2,
            ..base
        }),
        // off: f32 products; on: bf16 on the CPU's bf16 unit where the plan puts them
        "bf16" => [
            KernelConfig {
                precision: Precision::F32,
                ..base
            },
            KernelConfig {
                precision: Precision::Bf16,
                ..base
            },
        ],
        other => panic!("--compare: unknown switch {other:?} (batched, direct, upsampled, winograd, f4, bf16)"),
    }
}

/// One network at one width, built once.
struct Net {
    model: Model,
    kernels: KernelConfig,
    /// Forward GFLOP of one 96×96 image.
    gflop: f64,
    loss: Loss,
}

impl Net {
    fn new(arch: Architecture, preset: Preset, kernels: KernelConfig) -> Self {
        let cfg = ModelConfig::preset(arch, preset);
        let varmap = VarMap::new();
        let model = build(
            &cfg,
            &kernels,
            VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu),
        )
        .unwrap();
        let gflop = forward_flops(&cfg, 96, 96) as f64 / 1e9;
        Self {
            model,
            kernels,
            gflop,
            loss: Loss::soft_dice(),
        }
    }

    /// The inputs of `what` (`train bN` or `infer bN`).
    fn case(what: &str) -> Option<Case> {
        let (kind, b) = what.split_once(" b")?;
        let b: usize = b.parse().ok().filter(|&b| b > 0)?;
        let dev = Device::Cpu;
        let x = Tensor::randn(0f32, 1.0, (b, 1, 96, 96), &dev).unwrap();
        match kind {
            "train" => {
                let y = Tensor::rand(0f32, 4.0, (b, 96, 96), &dev)
                    .unwrap()
                    .floor()
                    .unwrap()
                    .to_dtype(DType::U32)
                    .unwrap();
                Some(Case::Train { x, y })
            }
            "infer" => Some(Case::Infer { x }),
            _ => None,
        }
    }

    /// Run `case` once.
    fn run(&self, case: &Case) {
        match case {
            Case::Train { x, y } => {
                // as `cmr train` does: on the kernels' tape when they run
                let backward = self.kernels.backward_for(x);
                let step = forward_backward(
                    backward,
                    || self.model.forward_t(x, true),
                    |logits| Ok(self.loss.compute(logits, y, &self.kernels).unwrap()),
                )
                .unwrap();
                assert_eq!(step.backward, backward, "the tape covers the network");
            }
            Case::Infer { x } => {
                let _ = self.model.forward_t(x, false).unwrap().argmax(1).unwrap();
            }
        }
    }

    /// GFLOP/s of `case` run in `ms` (training counted as 3× the forward).
    fn rate(&self, case: &Case, ms: f64) -> f64 {
        let (factor, x) = match case {
            Case::Train { x, .. } => (3.0, x),
            Case::Infer { x } => (1.0, x),
        };
        factor * self.gflop * x.dim(0).unwrap() as f64 / (ms / 1e3)
    }
}

/// The inputs of one row.
enum Case {
    Train { x: Tensor, y: Tensor },
    Infer { x: Tensor },
}

/// `--serve`: answer `ARCH/WIDTHS WHAT` requests on stdin, one run each.
fn serve(kernels: KernelConfig) {
    let mut nets: HashMap<String, Net> = HashMap::new();
    let mut cases: HashMap<String, Case> = HashMap::new();
    let mut out = std::io::stdout().lock();
    for line in std::io::stdin().lock().lines() {
        let Ok(line) = line else { break };
        let line = line.trim();
        if line.is_empty() {
            continue;
        }
        let answer = (|| -> Result<(f64, f64), String> {
            let (label, what) = line.split_once(' ').ok_or("expected `ARCH/WIDTHS WHAT`")?;
            let (arch, preset) = label.split_once('/').ok_or("expected `ARCH/WIDTHS`")?;
            let arch: Architecture = arch.parse()?;
            let preset: Preset = preset.parse()?;
            let what = what.trim();
            if !cases.contains_key(line) {
                let case = Net::case(what).ok_or_else(|| format!("unknown case {what:?} (train bN, infer bN)"))?;
                cases.insert(line.to_string(), case);
            }
            let net = nets
                .entry(format!("{arch}/{preset}"))
                .or_insert_with(|| Net::new(arch, preset, kernels));
            let t = Instant::now();
            net.run(&cases[line]);
            let ms = t.elapsed().as_secs_f64() * 1e3;
            // the case's convolution work, GFLOP (its rate times its time)
            Ok((ms, net.rate(&cases[line], ms) * ms / 1e3))
        })();
        let reply = match answer {
            Ok((ms, gflop)) => format!("{{\"ms\":{ms:.3},\"gflop\":{gflop:.4}}}"),
            Err(e) => format!("{{\"error\":{e:?}}}"),
        };
        if writeln!(out, "{reply}").and_then(|()| out.flush()).is_err() {
            break;
        }
    }
}

fn main() {
    // as the `cmr` binary does
    cmr_kernels::keep_freed_memory();
    let args: Vec<String> = std::env::args().skip(1).filter(|a| a != "--bench").collect();
    let mut runs = 5;
    let mut json = false;
    let mut what: Option<String> = None;
    let mut compare: Option<String> = None;
    let mut kernels = KernelConfig::DEFAULT;
    let mut serving = false;
    let mut filters = Vec::new();
    let mut it = args.iter();
    while let Some(a) = it.next() {
        match a.as_str() {
            "--quick" => runs = 1,
            "--json" => json = true,
            "--what" => what = it.next().cloned(),
            "--runs" => runs = it.next().and_then(|v| v.parse().ok()).expect("--runs N"),
            "--compare" => compare = it.next().cloned(),
            "--no-kernels" => kernels = KernelConfig::off(),
            "--bf16" => kernels.precision = Precision::Bf16,
            "--serve" => serving = true,
            f => filters.push(f.to_string()),
        }
    }
    if serving {
        return serve(kernels);
    }
    let settings: Vec<KernelConfig> = match compare.as_deref() {
        Some(name) => switch(name, kernels).to_vec(),
        None => vec![kernels],
    };
    // the row label's suffix for each mode
    let modes: Vec<String> = match &compare {
        Some(name) => vec![format!(" [{name} off]"), format!(" [{name} on]")],
        None => vec![String::new()],
    };
    let threads = candle_core::utils::get_num_threads();
    if !json {
        println!(
            "# cmr-models step benchmark: CPU, {threads} threads, 96×96, median of {runs}, fast kernels {}",
            if kernels.enabled { "on" } else { "off" }
        );
        println!("{:<22} {:>24} {:>10} {:>9}", "case", "what", "ms", "GFLOP/s");
    }
    let row = |arch: Architecture, preset: Preset, what: String, ms: f64, rate: f64| {
        if json {
            println!(
                "{{\"arch\":\"{arch}\",\"widths\":\"{preset}\",\"what\":\"{what}\",\"ms\":{ms:.3},\"gflops\":{rate:.2},\"threads\":{threads}}}"
            );
        } else {
            println!("{:<22} {what:>24} {ms:>10.1} {rate:>9.1}", format!("{arch}/{preset}"));
        }
    };
    for preset in [Preset::Seed, Preset::Small] {
        for arch in [Architecture::UNet, Architecture::UNet3Plus, Architecture::SegNet] {
            let label = format!("{arch}/{preset}");
            if !filters.is_empty() && !filters.iter().any(|f| label.contains(f.as_str())) {
                continue;
            }
            let nets: Vec<Net> = settings.iter().map(|&k| Net::new(arch, preset, k)).collect();
            let wanted = |w: &str| what.as_deref().is_none_or(|x| x == w);
            for w in ["train b4", "train b8", "infer b1", "infer b20"] {
                if !wanted(w) {
                    continue;
                }
                let case = Net::case(w).unwrap();
                let ms = time(runs, &nets, &case);
                for (ms, mode) in ms.into_iter().zip(&modes) {
                    row(arch, preset, format!("{w}{mode}"), ms, nets[0].rate(&case, ms));
                }
            }
        }
    }
}
