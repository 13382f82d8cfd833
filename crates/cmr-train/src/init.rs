//! Seeded weight initialisation.
//!
//! candle's CPU random generator cannot be seeded, so a `VarMap` filled by
//! candle would start every run from different weights. This backend fills a
//! `VarMap` instead from a stream keyed by (seed, tensor name), following the
//! distribution each block asks for (PyTorch's defaults): the same seed gives
//! the same initial weights, whatever order the tensors are created in.

use candle_core::{DType, Device, Result, Shape, Tensor, Var};
use candle_nn::var_builder::SimpleBackend;
use candle_nn::{Init, VarBuilder, VarMap};
use cmr_data::{hash_str, purpose, stream};
use rand::Rng;
use rand_distr::{Distribution, StandardNormal};

/// A `VarMap` whose missing variables are drawn from seeded streams.
#[derive(Clone)]
struct SeededVarMap {
    varmap: VarMap,
    seed: u64,
}

fn sample(init: Init, shape: &Shape, seed: u64, name: &str) -> Vec<f64> {
    let n = shape.elem_count();
    let mut rng = stream(seed, &[purpose::INIT, hash_str(name)]);
    let uniform = |lo: f64, up: f64, rng: &mut cmr_data::StreamRng| lo + (up - lo) * rng.random::<f64>();
    match init {
        Init::Const(v) => vec![v; n],
        Init::Uniform { lo, up } => (0..n).map(|_| uniform(lo, up, &mut rng)).collect(),
        Init::Randn { mean, stdev } => (0..n)
            .map(|_| {
                let z: f64 = StandardNormal.sample(&mut rng);
                mean + stdev * z
            })
            .collect(),
        Init::Kaiming {
            dist,
            fan,
            non_linearity,
        } => {
            let std = non_linearity.gain() / (fan.for_shape(shape) as f64).sqrt();
            match dist {
                candle_nn::init::NormalOrUniform::Uniform => {
                    let bound = 3f64.sqrt() * std;
                    (0..n).map(|_| uniform(-bound, bound, &mut rng)).collect()
                }
                candle_nn::init::NormalOrUniform::Normal => (0..n)
                    .map(|_| {
                        let z: f64 = StandardNormal.sample(&mut rng);
                        std * z
                    })
                    .collect(),
            }
        }
    }
}

impl SimpleBackend for SeededVarMap {
    fn get(&self, s: Shape, name: &str, h: Init, dtype: DType, dev: &Device) -> Result<Tensor> {
        let mut data = self.varmap.data().lock().expect("var map lock");
        if let Some(v) = data.get(name) {
            if v.shape() != &s {
                candle_core::bail!("shape mismatch on {name}: {s:?} <> {:?}", v.shape())
            }
            return Ok(v.as_tensor().clone());
        }
        let values = sample(h, &s, self.seed, name);
        let t = Tensor::from_vec(values, s, dev)?.to_dtype(dtype)?;
        let var = Var::from_tensor(&t)?;
        let out = var.as_tensor().clone();
        data.insert(name.to_string(), var);
        Ok(out)
    }

    fn get_unchecked(&self, name: &str, _dtype: DType, _dev: &Device) -> Result<Tensor> {
        candle_core::bail!("{name}: a seeded var map needs a shape")
    }

    fn contains_tensor(&self, name: &str) -> bool {
        self.varmap.data().lock().expect("var map lock").contains_key(name)
    }
}

/// A `VarBuilder` that creates the network's variables in `varmap`, drawing
/// each from the stream of (`seed`, its name).
pub fn seeded_var_builder(varmap: &VarMap, seed: u64, dtype: DType, device: &Device) -> VarBuilder<'static> {
    let backend = SeededVarMap {
        varmap: varmap.clone(),
        seed,
    };
    VarBuilder::from_backend(Box::new(backend), dtype, device.clone())
}

#[cfg(test)]
mod tests {
    use super::*;
    use cmr_models::{Architecture, ModelConfig, Preset, build};

    fn weights(seed: u64) -> std::collections::BTreeMap<String, Vec<f32>> {
        let vm = VarMap::new();
        let cfg = ModelConfig::preset(Architecture::UNet, Preset::Small);
        build(
            &cfg,
            &Default::default(),
            seeded_var_builder(&vm, seed, DType::F32, &Device::Cpu),
        )
        .unwrap();
        let data = vm.data().lock().unwrap();
        data.iter()
            .map(|(k, v)| {
                (
                    k.clone(),
                    v.as_tensor().flatten_all().unwrap().to_vec1::<f32>().unwrap(),
                )
            })
            .collect()
    }

    #[test]
    fn same_seed_same_weights_other_seed_other_weights() {
        let a = weights(1);
        assert_eq!(a, weights(1));
        let b = weights(2);
        assert_ne!(a["enc.0.0.conv.weight"], b["enc.0.0.conv.weight"]);
        // BatchNorm starts at weight 1, bias 0, running variance 1
        assert!(a["enc.0.0.bn.weight"].iter().all(|&v| v == 1.0));
        assert!(a["enc.0.0.bn.running_var"].iter().all(|&v| v == 1.0));
        // PyTorch's default conv init: uniform within ±1/√fan_in (fan_in = 1·3·3)
        let w = &a["enc.0.0.conv.weight"];
        assert!(w.iter().all(|v| v.abs() <= 1.0 / 3.0));
        assert!(w.iter().any(|v| v.abs() > 0.25));
    }
}
