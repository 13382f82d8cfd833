//! The three networks against the PyTorch reference: parameter counts, output
//! shapes, sizes, FLOPs and weight names.

#![allow(clippy::unwrap_used)]

use candle_core::{DType, Device, ModuleT, Tensor};
use candle_nn::{VarBuilder, VarMap};
use cmr_models::{Architecture, KernelConfig, ModelConfig, Preset, build, forward_flops, parameter_count};

#[test]
fn parameter_counts_equal_the_pytorch_references() {
    let expect = [
        (Architecture::UNet, 7_702_020),
        (Architecture::UNet3Plus, 8_203_972),
        (Architecture::SegNet, 29_444_164),
    ];
    for (arch, n) in expect {
        let cfg = ModelConfig::preset(arch, Preset::Seed);
        assert_eq!(parameter_count(&cfg).unwrap(), n, "{arch}");
    }
}

#[test]
fn forward_flops_match_the_hand_count() {
    // U-Net at 96×96: 10.32 GFLOPs (encoder 3.75, decoder 6.57), U-Net 3+ 32.9, SegNet 11.3
    let g = |a| forward_flops(&ModelConfig::preset(a, Preset::Seed), 96, 96) as f64 / 1e9;
    assert!(
        (g(Architecture::UNet) - 10.32).abs() < 0.01,
        "{}",
        g(Architecture::UNet)
    );
    assert!(
        (g(Architecture::UNet3Plus) - 32.9).abs() < 0.1,
        "{}",
        g(Architecture::UNet3Plus)
    );
    assert!(
        (g(Architecture::SegNet) - 11.3).abs() < 0.1,
        "{}",
        g(Architecture::SegNet)
    );
}

fn run(cfg: &ModelConfig, b: usize, h: usize, w: usize, train: bool) -> Vec<usize> {
    let dev = Device::Cpu;
    let varmap = VarMap::new();
    let model = build(
        cfg,
        &KernelConfig::DEFAULT,
        VarBuilder::from_varmap(&varmap, DType::F32, &dev),
    )
    .unwrap();
    let x = Tensor::randn(0f32, 1.0, (b, 1, h, w), &dev).unwrap();
    let y = model.forward_t(&x, train).unwrap();
    let v = y.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    assert!(v.iter().all(|x| x.is_finite()));
    y.dims().to_vec()
}

#[test]
fn small_networks_give_four_class_logits_at_several_sizes() {
    for arch in Architecture::ALL {
        let cfg = ModelConfig::preset(arch, Preset::Small);
        assert_eq!(run(&cfg, 2, 96, 96, true), vec![2, 4, 96, 96], "{arch}");
        assert_eq!(run(&cfg, 1, 64, 128, false), vec![1, 4, 64, 128], "{arch}");
        assert_eq!(run(&cfg, 1, 128, 128, false), vec![1, 4, 128, 128], "{arch}");
    }
}

#[test]
fn seed_networks_give_four_class_logits() {
    for arch in Architecture::ALL {
        let cfg = ModelConfig::preset(arch, Preset::Seed);
        assert_eq!(run(&cfg, 1, 96, 96, false), vec![1, 4, 96, 96], "{arch}");
    }
}

#[test]
fn depth_five_unets_work() {
    let mut u = cmr_models::UNetConfig::small();
    u.filters = vec![8, 16, 32, 64, 128];
    assert_eq!(run(&ModelConfig::UNet(u), 1, 96, 96, true), vec![1, 4, 96, 96]);
    let mut p = cmr_models::UNet3PlusConfig::small();
    p.filters = vec![8, 16, 32, 64, 128];
    p.branch_channels = 8;
    assert_eq!(run(&ModelConfig::UNet3Plus(p), 1, 96, 96, true), vec![1, 4, 96, 96]);
}

/// The checkpoint format: a few key names and shapes per network.
#[test]
fn weight_names_are_stable() {
    type Names = &'static [(&'static str, &'static [usize])];
    let cases: [(Architecture, Names); 3] = [
        (
            Architecture::UNet,
            &[
                ("enc.0.0.conv.weight", &[64, 1, 3, 3]),
                ("enc.3.1.bn.running_var", &[512]),
                ("dec.2.up.weight", &[512, 256, 2, 2]),
                ("dec.0.conv.0.conv.weight", &[64, 128, 3, 3]),
                ("head.weight", &[4, 64, 1, 1]),
            ],
        ),
        (
            Architecture::UNet3Plus,
            &[
                ("dec.2.branch.3.conv.weight", &[64, 512, 3, 3]),
                ("dec.0.branch.1.conv.weight", &[64, 256, 3, 3]),
                ("dec.1.fuse.conv.weight", &[256, 256, 3, 3]),
                ("head.weight", &[4, 256, 3, 3]),
            ],
        ),
        (
            Architecture::SegNet,
            &[
                ("enc.4.2.conv.weight", &[512, 512, 3, 3]),
                ("dec.3.2.conv.weight", &[256, 512, 3, 3]),
                ("dec.0.0.bn.weight", &[64]),
                ("head.weight", &[4, 64, 3, 3]),
            ],
        ),
    ];
    for (arch, names) in cases {
        let varmap = VarMap::new();
        build(
            &ModelConfig::preset(arch, Preset::Seed),
            &KernelConfig::DEFAULT,
            VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu),
        )
        .unwrap();
        let data = varmap.data().lock().unwrap();
        for (name, shape) in names {
            let v = data.get(*name).unwrap_or_else(|| panic!("{arch}: no {name}"));
            assert_eq!(v.dims(), *shape, "{arch} {name}");
        }
    }
}

#[test]
fn a_checkpoint_of_another_architecture_is_rejected() {
    let dev = Device::Cpu;
    let varmap = VarMap::new();
    build(
        &ModelConfig::preset(Architecture::UNet, Preset::Small),
        &KernelConfig::DEFAULT,
        VarBuilder::from_varmap(&varmap, DType::F32, &dev),
    )
    .unwrap();
    let tensors = varmap
        .data()
        .lock()
        .unwrap()
        .iter()
        .map(|(k, v)| (k.clone(), v.as_tensor().clone()))
        .collect();
    let vb = VarBuilder::from_tensors(tensors, DType::F32, &dev);
    assert!(
        build(
            &ModelConfig::preset(Architecture::UNet3Plus, Preset::Small),
            &KernelConfig::DEFAULT,
            vb.clone()
        )
        .is_err()
    );
    assert!(
        build(
            &ModelConfig::preset(Architecture::UNet, Preset::Seed),
            &KernelConfig::DEFAULT,
            vb.clone()
        )
        .is_err()
    );
    assert!(
        build(
            &ModelConfig::preset(Architecture::UNet, Preset::Small),
            &KernelConfig::DEFAULT,
            vb
        )
        .is_ok()
    );
}

/// Deep supervision adds one 3×3 head per level below the top (to the
/// classes), returns main and side logits stacked in training mode and the
/// main ones in inference; without it the saved configuration does not name
/// it (the shipped models' config.json stay as they are).
#[test]
fn unet3plus_deep_supervision() {
    let dev = Device::Cpu;
    let plain = cmr_models::UNet3PlusConfig::small();
    let mut deep = plain.clone();
    deep.deep_supervision = true;
    let (p, d) = (
        parameter_count(&ModelConfig::UNet3Plus(plain.clone())).unwrap(),
        parameter_count(&ModelConfig::UNet3Plus(deep.clone())).unwrap(),
    );
    // heads on the 64-channel decoder stages 1 and 2 and the 128-channel encoder output
    let stage = plain.stage_channels();
    let heads = 2 * (stage * 9 * 4 + 4) + (128 * 9 * 4 + 4);
    assert_eq!(d - p, heads);
    let varmap = VarMap::new();
    let cfg = ModelConfig::UNet3Plus(deep);
    let model = build(
        &cfg,
        &KernelConfig::DEFAULT,
        VarBuilder::from_varmap(&varmap, DType::F32, &dev),
    )
    .unwrap();
    let x = Tensor::randn(0f32, 1.0, (2, 1, 32, 32), &dev).unwrap();
    let train = model.forward_t(&x, true).unwrap();
    let eval = model.forward_t(&x, false).unwrap();
    assert_eq!(train.dims(), &[2, 16, 32, 32]);
    assert_eq!(eval.dims(), &[2, 4, 32, 32]);
    let json = serde_json::to_string(&ModelConfig::UNet3Plus(plain)).unwrap();
    assert!(!json.contains("deep_supervision"), "{json}");
    let back: ModelConfig = serde_json::from_str(&serde_json::to_string(&cfg).unwrap()).unwrap();
    assert_eq!(back, cfg);
}
