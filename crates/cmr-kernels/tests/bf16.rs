//! bf16 on the CPU's bf16 units (AMX tiles, AVX512-BF16 dot products)
//! against the f32 kernels: the forward pass and the input gradient within
//! bf16's tolerance (1e-2 of the largest value), the weight and bias
//! gradients (f32 in both) equal; without a unit (a CPU that has none, or
//! forced by `Bf16Unit::None`) the bf16 setting falls back to f32 and gives
//! its bits exactly.

#![allow(clippy::unwrap_used)]

use candle_core::{Tensor, Var};
use cmr_kernels::amx::MatrixUnit;
use cmr_kernels::testing::{fixed_tensor, max_rel};
use cmr_kernels::{Algorithm, Bf16Unit, ConvShape, KernelConfig, Pass, Precision, plan};

const F32: KernelConfig = KernelConfig::DEFAULT;
const BF16: KernelConfig = KernelConfig {
    precision: Precision::Bf16,
    ..KernelConfig::DEFAULT
};

/// bf16 keeps 8 bits of each operand: a sum of products is off by about
/// 2⁻⁸ of the largest products' size; 1e-2 of the largest value bounds it
/// with room.
const TOLERANCE: f32 = 1e-2;

/// The bf16 settings to test on this CPU, each with whether it runs bf16
/// products: every unit the CPU has, and the forced fallback.
fn settings() -> Vec<(KernelConfig, bool)> {
    let mut out = vec![(
        KernelConfig {
            bf16_unit: Bf16Unit::None,
            ..BF16
        },
        false,
    )];
    for unit in [Bf16Unit::Auto, Bf16Unit::Dots] {
        let on = unit.unit() != MatrixUnit::None;
        if unit == Bf16Unit::Auto || on && unit.unit() != Bf16Unit::Auto.unit() {
            out.push((
                KernelConfig {
                    bf16_unit: unit,
                    ..BF16
                },
                on,
            ));
        }
    }
    if !out.iter().any(|&(_, on)| on) {
        eprintln!(
            "no AMX-BF16 nor AVX512-BF16 on this CPU: the bf16 setting runs the f32 kernels (tested to give their bits)"
        );
    }
    out
}

/// `(y, dx, dw, db)` of `conv2d` with a fixed probe as the output gradient.
fn conv_pass(x: &Tensor, w: &Tensor, b: &Tensor, probe: &Tensor, cfg: &KernelConfig) -> [Tensor; 4] {
    let (xv, wv, bv) = (
        Var::from_tensor(x).unwrap(),
        Var::from_tensor(w).unwrap(),
        Var::from_tensor(b).unwrap(),
    );
    let y = cmr_kernels::conv2d(&xv, &wv, &bv, cfg).unwrap();
    let grads = (&y * probe).unwrap().sum_all().unwrap().backward().unwrap();
    [
        y,
        grads.get(&xv).unwrap().clone(),
        grads.get(&wv).unwrap().clone(),
        grads.get(&bv).unwrap().clone(),
    ]
}

/// The networks' layer shapes at both widths, and odd ones (channels that
/// are not multiples of 32, sizes that leave partial blocks, 1×1 and 5×5
/// kernels); each on the tiles where the plan puts it.
#[test]
fn convolution_in_bf16_is_within_tolerance_of_f32() {
    for (cfg, on) in settings() {
        convolution_within_tolerance(&cfg, on);
    }
}

fn convolution_within_tolerance(cfg: &KernelConfig, on: bool) {
    for (i, &(b, cin, cout, h, w, k)) in [
        (2, 64, 64, 24, 24, 3),
        (1, 128, 128, 12, 12, 3),
        (2, 16, 32, 48, 48, 3),
        (1, 33, 40, 13, 11, 3),
        (3, 20, 17, 12, 15, 5),
        (2, 48, 64, 16, 16, 1),
    ]
    .iter()
    .enumerate()
    {
        let seed = 100 + 10 * i as u64;
        let x = fixed_tensor(&[b, cin, h, w], seed, 0.0, 1.0);
        let wt = fixed_tensor(&[cout, cin, k, k], seed + 1, 0.0, 0.2);
        let bias = fixed_tensor(&[cout], seed + 2, 0.0, 0.1);
        let probe = fixed_tensor(&[b, cout, h, w], seed + 3, 0.0, 1.0);
        let exact = conv_pass(&x, &wt, &bias, &probe, &F32);
        let bf16 = conv_pass(&x, &wt, &bias, &probe, cfg);
        let shape = (b, cin, cout, h, w, k);
        let unit = cfg.bf16_unit;
        let layer = ConvShape {
            batch: b,
            cin,
            h,
            w,
            cout,
            k,
            upsample: 1,
        };
        for (name, got, want, pass) in [
            ("y", &bf16[0], &exact[0], Pass::Forward),
            ("dx", &bf16[1], &exact[1], Pass::InputGrad),
        ] {
            let e = max_rel(got, want);
            if on {
                assert!(e < TOLERANCE, "{unit:?} {shape:?} {name}: {e}");
                // where the plan puts the pass in bf16, its rounding shows:
                // not the f32 path by mistake
                let in_bf16 = matches!(plan(&layer, pass, cfg), Algorithm::Tiles | Algorithm::Dots);
                assert_eq!(
                    e > 0.0,
                    in_bf16,
                    "{unit:?} {shape:?} {name}: {e}, planned in bf16: {in_bf16}"
                );
            } else {
                assert_eq!(e, 0.0, "{unit:?} {shape:?} {name}: the fallback is f32");
            }
        }
        // the weight and bias gradients are f32 in both, from the same
        // input and output gradient
        for (name, got, want) in [("dw", &bf16[2], &exact[2]), ("db", &bf16[3], &exact[3])] {
            assert_eq!(max_rel(got, want), 0.0, "{shape:?} {name}");
        }
    }
}

/// The training layer (conv, BatchNorm with batch statistics, ReLU) in bf16:
/// its output and all its gradients within tolerance of f32.
#[test]
fn a_training_layer_in_bf16_is_within_tolerance_of_f32() {
    for (cfg, on) in settings() {
        training_layer_within_tolerance(&cfg, on);
    }
}

fn training_layer_within_tolerance(cfg: &KernelConfig, on: bool) {
    let (b, cin, cout, h, w) = (4, 32, 48, 24, 24);
    let x = fixed_tensor(&[b, cin, h, w], 7, 0.0, 1.0);
    let wt = fixed_tensor(&[cout, cin, 3, 3], 8, 0.0, 0.2);
    let bias = fixed_tensor(&[cout], 9, 0.0, 0.1);
    let gamma = fixed_tensor(&[cout], 10, 1.0, 0.2);
    let beta = fixed_tensor(&[cout], 11, 0.0, 0.1);
    // where the pre-activation lies near the ReLU's kink, rounding decides
    // the side, and the gradient there differs by a whole term: the probe
    // is zero there (within 2e-2 of the largest magnitude: bf16's rounding
    // moves the pre-activation by up to about 2⁻⁸ of it)
    let z = cmr_kernels::conv2d(&x, &wt, &bias, &F32).unwrap();
    let mean = z
        .mean_keepdim(0)
        .unwrap()
        .mean_keepdim(2)
        .unwrap()
        .mean_keepdim(3)
        .unwrap();
    let centred = z.broadcast_sub(&mean).unwrap();
    let var = centred
        .sqr()
        .unwrap()
        .mean_keepdim(0)
        .unwrap()
        .mean_keepdim(2)
        .unwrap()
        .mean_keepdim(3)
        .unwrap();
    let pre = centred
        .broadcast_div(&(var + 1e-5).unwrap().sqrt().unwrap())
        .unwrap()
        .broadcast_mul(&gamma.reshape((1, cout, 1, 1)).unwrap())
        .unwrap()
        .broadcast_add(&beta.reshape((1, cout, 1, 1)).unwrap())
        .unwrap();
    let margin = pre.abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap() * 2e-2;
    let away = pre
        .abs()
        .unwrap()
        .gt(margin)
        .unwrap()
        .to_dtype(candle_core::DType::F32)
        .unwrap();
    let probe = (fixed_tensor(&[b, cout, h, w], 12, 0.0, 1.0) * away).unwrap();
    let run = |cfg: &KernelConfig| {
        let vars = [&x, &wt, &bias, &gamma, &beta].map(|t| Var::from_tensor(t).unwrap());
        let (y, _) =
            cmr_kernels::conv_bn_relu_train(&vars[0], &vars[1], &vars[2], &vars[3], &vars[4], 1e-5, cfg).unwrap();
        let grads = (&y * &probe).unwrap().sum_all().unwrap().backward().unwrap();
        let mut out = vec![y];
        out.extend(vars.iter().map(|v| grads.get(v).unwrap().clone()));
        out
    };
    let (exact, bf16) = (run(&F32), run(cfg));
    let largest = |t: &Tensor| t.abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
    for (i, name) in ["y", "dx", "dw", "dbias", "dgamma", "dbeta"].iter().enumerate() {
        let (got, want) = (&bf16[i], &exact[i]);
        // the conv's bias feeds BatchNorm, which removes it: its gradient is
        // zero up to rounding, measured on the scale of β's (the same sums)
        let scale = if *name == "dbias" {
            largest(&exact[5])
        } else {
            largest(want)
        };
        let e = largest(&(got - want).unwrap()) / scale.max(1e-6);
        if on {
            assert!(e < TOLERANCE, "{:?} {name}: {e}", cfg.bf16_unit);
        } else {
            assert_eq!(e, 0.0, "{:?} {name}: the fallback is f32", cfg.bf16_unit);
        }
    }
}
