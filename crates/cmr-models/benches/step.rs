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
//! memory with `/usr/bin/time -v`). `--compare batched` (or `direct`) times
//! each case with that switch of the fast kernels off and on, alternating
//! run by run in one process, so that a slow minute of the machine hits both
//! alike: two rows per case, the mode in brackets.

#![allow(clippy::print_stdout, clippy::unwrap_used)]

use std::time::Instant;

use candle_core::{DType, Device, ModuleT, Tensor};
use candle_nn::{VarBuilder, VarMap};
use cmr_loss::Loss;
use cmr_models::{Architecture, ModelConfig, Preset, build, forward_flops};

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// Median ms of `runs` timed runs of `f` after a warm-up, for each mode:
/// one mode without a switch, else `set(false)` and `set(true)` alternating.
fn time(runs: usize, set: Option<fn(bool)>, mut f: impl FnMut()) -> Vec<f64> {
    let modes: &[bool] = if set.is_some() { &[false, true] } else { &[true] };
    let mut ms = vec![Vec::new(); modes.len()];
    for i in 0..=runs {
        for (m, &on) in modes.iter().enumerate() {
            if let Some(set) = set {
                set(on);
            }
            let t = Instant::now();
            f();
            if i > 0 {
                ms[m].push(t.elapsed().as_secs_f64() * 1e3);
            }
        }
    }
    if let Some(set) = set {
        set(true);
    }
    ms.into_iter().map(median).collect()
}

/// The switch `--compare` names.
fn switch(name: &str) -> fn(bool) {
    match name {
        "batched" => |on| {
            cmr_models::fast::set_batched(if on {
                cmr_models::fast::Batched::Auto
            } else {
                cmr_models::fast::Batched::Off
            })
        },
        "direct" => cmr_models::fast::set_direct,
        other => panic!("--compare: unknown switch {other:?} (batched, direct)"),
    }
}

fn main() {
    // as the `cmr` binary does
    cmr_models::fast::keep_freed_memory();
    let args: Vec<String> = std::env::args().skip(1).filter(|a| a != "--bench").collect();
    let mut runs = 5;
    let mut json = false;
    let mut what: Option<String> = None;
    let mut compare: Option<String> = None;
    let mut filters = Vec::new();
    let mut it = args.iter();
    while let Some(a) = it.next() {
        match a.as_str() {
            "--quick" => runs = 1,
            "--json" => json = true,
            "--what" => what = it.next().cloned(),
            "--runs" => runs = it.next().and_then(|v| v.parse().ok()).expect("--runs N"),
            "--compare" => compare = it.next().cloned(),
            f => filters.push(f.to_string()),
        }
    }
    let set = compare.as_deref().map(switch);
    // the row label's suffix for each mode
    let modes: Vec<String> = match &compare {
        Some(name) => vec![format!(" [{name} off]"), format!(" [{name} on]")],
        None => vec![String::new()],
    };
    let dev = Device::Cpu;
    let threads = candle_core::utils::get_num_threads();
    if !json {
        println!(
            "# cmr-models step benchmark: CPU, {threads} threads, 96×96, median of {runs}, fast kernels {}",
            if cmr_models::fast::enabled() { "on" } else { "off" }
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
            let cfg = ModelConfig::preset(arch, preset);
            let varmap = VarMap::new();
            let model = build(&cfg, VarBuilder::from_varmap(&varmap, DType::F32, &dev)).unwrap();
            let gflop = forward_flops(&cfg, 96, 96) as f64 / 1e9;
            let loss = Loss::soft_dice();
            let wanted = |w: &str| what.as_deref().is_none_or(|x| x == w);
            for b in [4usize, 8] {
                if !wanted(&format!("train b{b}")) {
                    continue;
                }
                let x = Tensor::randn(0f32, 1.0, (b, 1, 96, 96), &dev).unwrap();
                let y = Tensor::rand(0f32, 4.0, (b, 96, 96), &dev)
                    .unwrap()
                    .floor()
                    .unwrap()
                    .to_dtype(DType::U32)
                    .unwrap();
                let ms = time(runs, set, || {
                    // as `cmr train` does: on the fast kernels' tape when
                    // they are on
                    let _grads = cmr_models::fast::forward_backward(
                        cmr_models::fast::applies(&x),
                        || model.forward_t(&x, true),
                        |logits| Ok(loss.compute(logits, &y).unwrap()),
                    )
                    .unwrap();
                });
                for (ms, mode) in ms.into_iter().zip(&modes) {
                    let rate = 3.0 * gflop * b as f64 / (ms / 1e3);
                    row(arch, preset, format!("train b{b}{mode}"), ms, rate);
                }
            }
            for b in [1usize, 20] {
                if !wanted(&format!("infer b{b}")) {
                    continue;
                }
                let x = Tensor::randn(0f32, 1.0, (b, 1, 96, 96), &dev).unwrap();
                let ms = time(runs, set, || {
                    let _ = model.forward_t(&x, false).unwrap().argmax(1).unwrap();
                });
                for (ms, mode) in ms.into_iter().zip(&modes) {
                    let rate = gflop * b as f64 / (ms / 1e3);
                    row(arch, preset, format!("infer b{b}{mode}"), ms, rate);
                }
            }
        }
    }
}
