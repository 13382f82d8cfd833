//! An exponential moving average of a network's variables (`ema` in the
//! recipe): after every optimiser step each averaged variable becomes
//! `decay · average + (1 − decay) · live`, BatchNorm's running statistics
//! included. Validation, `model.safetensors` and so every prediction use the
//! average; training steps the live weights. The average starts at the
//! initial weights and is saved in each checkpoint, so a resume is exact.

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

    /// One step of the average, after an optimiser step.
    pub(crate) fn update(&self) -> Result<()> {
        let d = self.decay;
        for (avg, live) in &self.pairs {
            let next = ((avg.as_tensor() * d)? + (live.as_tensor() * (1.0 - d))?)?;
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
