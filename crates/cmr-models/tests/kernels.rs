//! The CPU kernels of `cmr-kernels` against this crate's candle references
//! (`ops`), and the kernels' tape against candle's backward pass on the
//! three networks.

#![allow(clippy::unwrap_used)]

use candle_core::{DType, Device, ModuleT, Tensor, Var};
use candle_nn::{VarBuilder, VarMap};
use cmr_kernels::testing::max_rel;
use cmr_kernels::{Backward, forward_backward};
use cmr_models::{Architecture, KernelConfig, ModelConfig, Preset, build, ops};

const CFG: &KernelConfig = &KernelConfig::DEFAULT;

/// Values and gradients against the matrix-product reference, factors 2
/// to 16 (U-Net 3+ uses up to 16), odd and non-square planes.
#[test]
fn matches_the_matrix_reference() {
    let dev = Device::Cpu;
    for &(b, c, h, w, f) in &[
        (2, 3, 5, 7, 2),
        (1, 2, 6, 6, 4),
        (3, 1, 3, 4, 8),
        (2, 2, 6, 5, 16),
        (1, 1, 1, 3, 2),
    ] {
        let x = Var::from_tensor(&Tensor::randn(0f32, 1.0, (b, c, h, w), &dev).unwrap()).unwrap();
        let probe = Tensor::randn(0f32, 1.0, (b, c, h * f, w * f), &dev).unwrap();
        let fast = cmr_kernels::upsample_bilinear(&x, f, CFG).unwrap();
        let slow = ops::upsample_bilinear(&x, f).unwrap();
        assert!(max_rel(&fast, &slow) < 1e-5, "{:?} forward", (b, c, h, w, f));
        let gf = (&fast * &probe).unwrap().sum_all().unwrap().backward().unwrap();
        let gs = (&slow * &probe).unwrap().sum_all().unwrap().backward().unwrap();
        let e = max_rel(gf.get(&x).unwrap(), gs.get(&x).unwrap());
        assert!(e < 1e-4, "{:?} dx: {e}", (b, c, h, w, f));
    }
}

#[test]
fn matches_the_composite_reference_with_ties() {
    let dev = Device::Cpu;
    for k in [2usize, 4, 8] {
        // small integers: many ties
        let x = Tensor::rand(0f32, 4.0, (2, 3, 16, 8), &dev).unwrap().floor().unwrap();
        let v = Var::from_tensor(&x).unwrap();
        let probe = Tensor::randn(0f32, 1.0, (2, 3, 16 / k, 8 / k), &dev).unwrap();
        let slow = ops::max_pool(v.as_tensor(), k).unwrap();
        let gs = (&slow * &probe).unwrap().sum_all().unwrap().backward().unwrap();
        let fast = cmr_kernels::max_pool(v.as_tensor(), k, CFG).unwrap();
        let gf = (&fast * &probe).unwrap().sum_all().unwrap().backward().unwrap();
        let f = |t: &Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        assert_eq!(f(&fast), f(&slow), "k {k}");
        assert_eq!(
            f(gf.get(v.as_tensor()).unwrap()),
            f(gs.get(v.as_tensor()).unwrap()),
            "k {k}"
        );
    }
}

/// On each network (narrow widths, batch 3, 32×32; U-Net 3+ also with deep
/// supervision), the tape's gradients
/// are candle's `Tensor::backward` ones for every variable, and every
/// variable has one.
#[test]
fn gradients_match_candle_backward_on_the_three_networks() {
    let dev = Device::Cpu;
    let mut deep = cmr_models::UNet3PlusConfig::small();
    deep.deep_supervision = true;
    let configs = Architecture::ALL
        .map(|a| ModelConfig::preset(a, Preset::Small))
        .into_iter()
        // side outputs: up-sampling and a concatenation after the heads
        .chain([ModelConfig::UNet3Plus(deep)]);
    for cfg in configs {
        let arch = cfg.architecture();
        let vm = VarMap::new();
        let vb = VarBuilder::from_varmap(&vm, DType::F32, &dev);
        let model = build(&cfg, &KernelConfig::DEFAULT, vb).unwrap();
        let x = Tensor::randn(0f32, 1.0, (3, 1, 32, 32), &dev).unwrap();
        let channels = model.forward_t(&x, true).unwrap().dim(1).unwrap();
        let probe = Tensor::randn(0f32, 1.0, (3, channels, 32, 32), &dev).unwrap();
        // not linear in the output, so the loss's own backward matters
        let loss = |o: &Tensor| (o * &probe)?.tanh()?.sum_all();
        let want = loss(&model.forward_t(&x, true).unwrap()).unwrap().backward().unwrap();
        let step = forward_backward(Backward::Tape, || model.forward_t(&x, true), loss).unwrap();
        assert_eq!(step.backward, Backward::Tape, "{arch}: the tape covers the network");
        let (l, got) = (step.loss, step.grads);
        assert!(l.to_scalar::<f32>().unwrap().is_finite());
        // The conv biases before a BatchNorm cancel in the normalisation:
        // both gradients are rounding noise around zero, small against
        // the largest gradient (as in the fused layer's test).
        let max_abs = |t: &Tensor| t.abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
        let vars = vm.all_vars();
        let scale = vars
            .iter()
            .filter_map(|v| want.get(v.as_tensor()).map(max_abs))
            .fold(0f32, f32::max);
        // (BatchNorm's running statistics are variables without one)
        let mut compared = 0;
        for v in &vars {
            match (got.get(v.as_tensor()), want.get(v.as_tensor())) {
                (Some(g), Some(w)) if max_abs(w) <= 1e-4 * scale => {
                    assert!(
                        max_abs(g) <= 1e-4 * scale,
                        "{arch}: variable {:?}: {} against {scale}",
                        v.dims(),
                        max_abs(g)
                    );
                }
                (Some(g), Some(w)) => {
                    let e = max_rel(g, w);
                    assert!(e < 1e-5, "{arch}: variable {:?}: {e}", v.dims());
                    compared += 1;
                }
                (None, None) => {}
                (g, _) => panic!(
                    "{arch}: variable {:?}: gradient only from the tape: {}",
                    v.dims(),
                    g.is_some()
                ),
            }
        }
        assert!(compared > 10, "{arch}: {compared} gradients compared");
    }
}
