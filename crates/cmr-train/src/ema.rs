//! An exponential moving average of a network's variables (`ema` in the
//! recipe), BatchNorm's running statistics included: after optimiser step
//! `t` the average is `Σ_{s ≤ t} decay^(t−s) · w_s` over the weights after
//! each step, normalised by `Σ decay^(t−s) = (1 − decay^t) / (1 − decay)`
//! (Adam's bias correction), so the initial weights leave no trace and the
//! first validations are of a trained network. In place:
//! `average += β_t · (live − average)` with `β_t = (1 − decay) / (1 − decay^t)`
//! (1 at the first step). Validation, `model.safetensors` and so every
//! prediction use the average; training steps the live weights. The average
//! is saved in each checkpoint, so a resume is exact.

use std::collections::HashMap;

use candle_core::{Device, Tensor, Var};
use candle_nn::VarMap;
use cmr_models::{KernelConfig, Model, ModelConfig, build};
use serde::{Deserialize, Serialize};

use crate::checkpoint::varmap_tensors;
use crate::error::{Result, TrainError};
use crate::init::seeded_var_builder;

/// `ema`: the moving average's settings.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EmaConfig {
    /// The weight of the old average at each step, in (0, 1): about the
    /// last `1 / (1 − decay)` steps are averaged.
    pub decay: f64,
}

impl EmaConfig {
    pub fn validate(&self) -> Result<()> {
        if !(self.decay > 0.0 && self.decay < 1.0) {
            return Err(TrainError::Config(format!(
                "ema.decay must be between 0 and 1 (exclusive), got {}",
                self.decay
            )));
        }
        Ok(())
    }
}

/// The averaged copy of a network: its own variables and a model built on
/// them, paired by name with the live variables they follow.
pub(crate) struct Ema {
    decay: f64,
    varmap: VarMap,
    model: Model,
    /// (average, live) for every variable.
    pairs: Vec<(Var, Var)>,
}

impl Ema {
    /// An average of the network whose variables are `live`, starting equal
    /// to them.
    pub(crate) fn new(
        config: EmaConfig,
        model: &ModelConfig,
        kernels: &KernelConfig,
        live: &VarMap,
        device: &Device,
    ) -> Result<Self> {
        let varmap = VarMap::new();
        // the seed is irrelevant: every variable is set from `live` below
        let averaged = build(
            model,
            kernels,
            seeded_var_builder(&varmap, 0, candle_core::DType::F32, device),
        )?;
        // the two networks are built alike: every variable has its twin
        let pairs = {
            let avg = varmap.data().lock().expect("var map lock");
            let live = live.data().lock().expect("var map lock");
            let mut pairs: Vec<(Var, Var)> = Vec::with_capacity(avg.len());
            for (name, a) in avg.iter() {
                let l = live.get(name).ok_or_else(|| {
                    TrainError::Config(format!(
                        "the averaged network has a variable {name:?} the live one lacks"
                    ))
                })?;
                a.set(l.as_tensor())?;
                pairs.push((a.clone(), l.clone()));
            }
            pairs
        };
        Ok(Self {
            decay: config.decay,
            varmap,
            model: averaged,
            pairs,
        })
    }

    /// The average after optimiser step `step` (1-based).
    pub(crate) fn update(&self, step: u64) -> Result<()> {
        let beta = step_weight(self.decay, step);
        for (avg, live) in &self.pairs {
            let next = ((avg.as_tensor() * (1.0 - beta))? + (live.as_tensor() * beta)?)?;
            avg.set(&next)?;
        }
        Ok(())
    }

    pub(crate) fn varmap(&self) -> &VarMap {
        &self.varmap
    }

    pub(crate) fn model(&self) -> &Model {
        &self.model
    }

    pub(crate) fn tensors(&self) -> HashMap<String, Tensor> {
        varmap_tensors(&self.varmap)
    }
}

/// `β_t = (1 − decay) / (1 − decay^t)`: the weight of the newest weights in
/// the normalised average after step `t` (1 at the first).
fn step_weight(decay: f64, step: u64) -> f64 {
    let t = i32::try_from(step.max(1)).unwrap_or(i32::MAX);
    (1.0 - decay) / (1.0 - decay.powi(t))
}

#[cfg(test)]
mod tests {
    use super::step_weight;

    #[test]
    fn the_recursive_weights_give_the_normalised_average() {
        // average of w_1..w_t weighted decay^(t−s), by the recursion and directly
        let d: f64 = 0.8;
        let w = [3.0, -1.0, 4.0, 1.5, -5.0, 9.0];
        let mut avg = 0.0;
        for (i, x) in w.iter().enumerate() {
            let t = i as u64 + 1;
            avg += step_weight(d, t) * (x - avg);
            let direct: f64 = w[..=i]
                .iter()
                .enumerate()
                .map(|(s, x)| d.powi((i - s) as i32) * x)
                .sum::<f64>()
                / (0..=i).map(|s| d.powi(s as i32)).sum::<f64>();
            assert!((avg - direct).abs() < 1e-12, "step {t}: {avg} vs {direct}");
        }
        assert_eq!(step_weight(d, 1), 1.0);
        // far along, the plain exponential average's weight
        assert!((step_weight(d, 500) - (1.0 - d)).abs() < 1e-12);
    }
}
