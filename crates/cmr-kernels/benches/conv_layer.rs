//! One 3×3 convolution layer (`cmr_kernels::conv2d`, forward and backward: input
//! and weight gradients) at the networks' shapes, with each way the fast
//! kernels can compute it, alternating between them so that a slow minute
//! of this machine hits all of them alike; the minimum over the rounds.
//! This is what chose where the direct kernel runs (forward pass and input
//! gradient; a direct weight-gradient kernel, tried, was slower than the
//! GEMMs from 32 channels up and is not kept), in a second table at small
//! images' shapes, where their backward pass runs batch-wide, and in a third
//! what Winograd's minimal filtering does for layers with many channels;
//! the fourth compares its two tiles there: F(2×2, 3×3) everywhere, or the
//! default's choice (F(4×4, 3×3) where the batch has 144 of its tiles);
//! the fifth, `bf16`, the forward pass alone (inference) in f32 and in bf16
//! on the CPU's bf16 unit (AMX tiles, else AVX512-BF16 dot products), with
//! the bf16 side's GFLOP/s of direct-convolution work and its fraction of
//! the unit's peak: the nominal one (tiles: 1024 flops per cycle and core at
//! the clock of the f32 peak, 294 GFLOP/s on two cores, so about 4.7
//! TFLOP/s; dot products: twice the f32 peak, 588 GFLOP/s) and the rate
//! measured here on cached operands (`amx::measured_peak_gflops`, times the
//! threads).
//!
//! `cargo bench -p cmr-kernels --bench conv_layer [-- --rounds N] [TABLE…]`
//! (one thread unless `RAYON_NUM_THREADS` says otherwise); `TABLE` is one
//! of `direct`, `batched`, `winograd`, `tiles`, `bf16` (default: all five).

#![allow(clippy::print_stdout, clippy::unwrap_used)]

use std::time::Instant;

use candle_core::{Device, Tensor, Var};
use cmr_kernels::{Batched, KernelConfig, Winograd};

fn main() {
    let args: Vec<String> = std::env::args().skip(1).filter(|a| a != "--bench").collect();
    let rounds = args
        .iter()
        .position(|a| a == "--rounds")
        .and_then(|i| args.get(i + 1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(7);
    const TABLES: [&str; 5] = ["direct", "batched", "winograd", "tiles", "bf16"];
    let mut chosen: Vec<&str> = Vec::new();
    let mut rest = args.iter();
    while let Some(a) = rest.next() {
        if a == "--rounds" {
            rest.next();
        } else if let Some(t) = TABLES.iter().find(|t| **t == a) {
            chosen.push(t);
        } else {
            panic!("unknown argument {a:?} (--rounds N, or tables: {TABLES:?})");
        }
    }
    let wanted = |t: &str| chosen.is_empty() || chosen.contains(&t);
    cmr_kernels::keep_freed_memory();
    // (batch, cin, cout, side): the narrow widths' layers, then the report's
    let shapes = [
        (4, 1, 16, 96),
        (4, 16, 16, 96),
        (4, 16, 32, 48),
        (4, 32, 32, 48),
        (4, 80, 80, 96),
        (4, 80, 80, 48),
        (4, 64, 64, 96),
        (4, 128, 128, 48),
        (4, 320, 320, 96),
    ];
    println!(
        "# conv layer fwd+bwd, {} thread(s), min of {rounds} alternating rounds (ms)",
        rayon::current_num_threads()
    );
    // The first two tables without Winograd, which would take some of
    // their layers (the third compares it).
    let on = KernelConfig::DEFAULT;
    let no_winograd = KernelConfig {
        winograd: Winograd::Off,
        ..on
    };
    if wanted("direct") {
        let gemms = KernelConfig {
            direct: false,
            ..no_winograd
        };
        table(&shapes, rounds, [("GEMMs", gemms), ("direct", no_winograd)]);
    }
    // Small images: the backward pass image by image or batch-wide
    // (`batched.rs`), wherever the default would choose.
    let small = [
        (8, 64, 64, 24),
        (8, 128, 128, 12),
        (8, 128, 128, 6),
        (8, 128, 256, 6),
        (8, 256, 256, 6),
        (8, 256, 256, 24),
        (8, 512, 512, 12),
        (8, 512, 512, 6),
        (4, 512, 512, 6),
        (8, 1024, 1024, 6),
    ];
    if wanted("batched") {
        let by = |batched| KernelConfig { batched, ..no_winograd };
        table(
            &small,
            rounds,
            [("by image", by(Batched::Off)), ("batch-wide", by(Batched::Always))],
        );
    }
    // Layers with many channels: im2col and one GEMM under 32×32, the
    // direct kernel from there up, or Winograd's minimal filtering
    // (`winograd.rs`), where it applies by default.
    let winograd = [
        (4, 512, 512, 12),
        (8, 512, 512, 12),
        (8, 256, 512, 12),
        (4, 256, 256, 24),
        (8, 256, 256, 24),
        (4, 128, 128, 48),
        (4, 256, 256, 48),
        (1, 256, 256, 96),
        (8, 128, 128, 24),
        (8, 128, 64, 48),
        (8, 64, 64, 96),
        (4, 80, 80, 96),
    ];
    if wanted("winograd") {
        table(&winograd, rounds, [("without", no_winograd), ("Winograd", on)]);
    }
    // Its two tiles on the layers it takes: F(2×2) everywhere, or the
    // default (F(4×4) where the batch has 144 of its tiles).
    if wanted("tiles") {
        let f2 = KernelConfig {
            winograd: Winograd::F2x2,
            ..on
        };
        table(&winograd, rounds, [("F(2×2)", f2), ("default", on)]);
    }
    if wanted("bf16") {
        if !cmr_kernels::amx::has_bf16_unit() {
            println!("# bf16: neither AMX-BF16 nor AVX512-BF16 on this CPU (both sides would run f32)");
            return;
        }
        let bf16 = KernelConfig {
            precision: cmr_kernels::Precision::Bf16,
            ..on
        };
        // the report's widths' layers (U-Net, U-Net 3+'s encoder), batch 1
        // and 8
        let layers = [
            (1, 64, 64, 96),
            (1, 128, 128, 48),
            (1, 256, 256, 24),
            (1, 512, 512, 12),
            (1, 1024, 1024, 6),
            (8, 64, 64, 96),
            (8, 128, 128, 48),
            (8, 256, 256, 24),
            (8, 512, 512, 12),
            (8, 1024, 1024, 6),
        ];
        forward_table(&layers, rounds, [("f32", on), ("bf16", bf16)]);
    }
}

/// The minimum time (ms) of `run` under each setting over `rounds` rounds,
/// the settings alternating, each timed run after an untimed one.
fn alternating(rounds: usize, modes: &[(&str, KernelConfig); 2], run: impl Fn(&KernelConfig)) -> [f64; 2] {
    let mut best = [f64::INFINITY; 2];
    for _ in 0..rounds {
        for (i, (_, cfg)) in modes.iter().enumerate() {
            run(cfg);
            let t = Instant::now();
            run(cfg);
            best[i] = best[i].min(t.elapsed().as_secs_f64() * 1e3);
        }
    }
    best
}

/// The bf16 unit's nominal peak on this machine's two cores (see the
/// module doc): the tiles 16 times the f32 peak, the dot products twice it.
fn bf16_peak_gflops() -> f64 {
    match cmr_kernels::amx::matrix_unit() {
        cmr_kernels::amx::MatrixUnit::Amx => 294.0 * 16.0,
        _ => 294.0 * 2.0,
    }
}

/// One line per shape: the layer's forward time (conv + bias) under each
/// setting, alternating, and the second's GFLOP/s.
fn forward_table(shapes: &[(usize, usize, usize, usize)], rounds: usize, modes: [(&str, KernelConfig); 2]) {
    let names = modes.map(|(n, _)| n);
    let dev = Device::Cpu;
    let measured = (0..5)
        .filter_map(|_| cmr_kernels::amx::measured_peak_gflops(200_000))
        .fold(0f64, f64::max)
        * rayon::current_num_threads() as f64;
    println!(
        "# {} on cached operands: {measured:.0} GFLOP/s on {} thread(s)",
        cmr_kernels::amx::matrix_unit(),
        rayon::current_num_threads()
    );
    println!(
        "{:<22} {} {:>10} {:>9} {:>9}  second's algorithm",
        "b, cin, cout, side",
        names.map(|m| format!("{m:>12}")).join(""),
        "GFLOP/s",
        "nominal",
        "measured"
    );
    for &(b, cin, cout, side) in shapes {
        let x = Tensor::randn(0f32, 1.0, (b, cin, side, side), &dev).unwrap();
        let w = Tensor::randn(0f32, 0.1, (cout, cin, 3, 3), &dev).unwrap();
        let bias = Tensor::zeros(cout, candle_core::DType::F32, &dev).unwrap();
        let run = |cfg: &KernelConfig| {
            std::hint::black_box(cmr_kernels::conv2d(&x, &w, &bias, cfg).unwrap());
        };
        let best = alternating(rounds, &modes, run);
        let flops = 2.0 * (b * cin * cout * 9 * side * side) as f64;
        let gflops = flops / (best[1] * 1e-3) / 1e9;
        let layer = cmr_kernels::ConvShape {
            batch: b,
            cin,
            h: side,
            w: side,
            cout,
            k: 3,
            upsample: 1,
        };
        let algorithm = cmr_kernels::plan(&layer, cmr_kernels::Pass::Forward, &modes[1].1);
        println!(
            "{:<22} {} {gflops:>10.0} {:>8.1}% {:>8.1}%  {algorithm}",
            format!("{b}, {cin}, {cout}, {side}"),
            best.map(|v| format!("{v:>12.2}")).join(""),
            100.0 * gflops / bf16_peak_gflops(),
            100.0 * gflops / measured
        );
    }
}

/// One line per shape: the layer's fwd+bwd time under each of two settings,
/// alternating.
fn table(shapes: &[(usize, usize, usize, usize)], rounds: usize, modes: [(&str, KernelConfig); 2]) {
    let names = modes.map(|(n, _)| n);
    let dev = Device::Cpu;
    println!(
        "{:<22} {}",
        "b, cin, cout, side",
        names.map(|m| format!("{m:>12}")).join("")
    );
    for &(b, cin, cout, side) in shapes {
        let x = Var::from_tensor(&Tensor::randn(0f32, 1.0, (b, cin, side, side), &dev).unwrap()).unwrap();
        let w = Var::from_tensor(&Tensor::randn(0f32, 0.1, (cout, cin, 3, 3), &dev).unwrap()).unwrap();
        let bias = Var::from_tensor(&Tensor::zeros(cout, candle_core::DType::F32, &dev).unwrap()).unwrap();
        let probe = Tensor::randn(0f32, 1.0, (b, cout, side, side), &dev).unwrap();
        let run = |cfg: &KernelConfig| {
            let y = cmr_kernels::conv2d(&x, &w, &bias, cfg).unwrap();
            let g = (&y * &probe).unwrap().sum_all().unwrap().backward().unwrap();
            std::hint::black_box(g.get(&w).unwrap());
        };
        let best = alternating(rounds, &modes, run);
        println!(
            "{:<22} {}",
            format!("{b}, {cin}, {cout}, {side}"),
            best.map(|v| format!("{v:>12.1}")).join("")
        );
    }
}
