//! Optimisers owned here so that their state can be checkpointed: Adam,
//! AdamW and SGD with momentum (optionally Nesterov), each with weight decay.
//!
//! Parameters are the model's `Var`s by name, BatchNorm running statistics
//! left out. State tensors are named `<slot>.<parameter name>` (`m.`, `v.`,
//! `momentum.`) and the step count is kept with them, so a resumed run takes
//! exactly the steps it would have taken.

use std::collections::{BTreeMap, HashMap};

use candle_core::backprop::GradStore;
use candle_core::{Tensor, Var};
use serde::{Deserialize, Serialize};

use crate::error::{Result, TrainError};

fn beta1() -> f64 {
    0.9
}
fn beta2() -> f64 {
    0.999
}
fn adam_eps() -> f64 {
    1e-8
}
fn adamw_decay() -> f64 {
    1e-2
}
fn sgd_momentum() -> f64 {
    0.9
}

/// The optimiser and its hyper-parameters. In JSON/TOML:
/// `{"kind": "adam", "lr": 0.001}`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum OptimConfig {
    /// Adam; `weight_decay` is L2 added to the gradient (PyTorch's `Adam`).
    Adam {
        lr: f64,
        #[serde(default = "beta1")]
        beta1: f64,
        #[serde(default = "beta2")]
        beta2: f64,
        #[serde(default = "adam_eps")]
        eps: f64,
        #[serde(default)]
        weight_decay: f64,
    },
    /// AdamW: decoupled weight decay.
    #[serde(rename = "adamw")]
    AdamW {
        lr: f64,
        #[serde(default = "beta1")]
        beta1: f64,
        #[serde(default = "beta2")]
        beta2: f64,
        #[serde(default = "adam_eps")]
        eps: f64,
        #[serde(default = "adamw_decay")]
        weight_decay: f64,
    },
    /// SGD with momentum (PyTorch's formulation), optionally Nesterov.
    Sgd {
        lr: f64,
        #[serde(default = "sgd_momentum")]
        momentum: f64,
        #[serde(default)]
        nesterov: bool,
        #[serde(default)]
        weight_decay: f64,
    },
}

impl Default for OptimConfig {
    fn default() -> Self {
        Self::adam(1e-3)
    }
}

impl OptimConfig {
    pub fn adam(lr: f64) -> Self {
        Self::Adam {
            lr,
            beta1: beta1(),
            beta2: beta2(),
            eps: adam_eps(),
            weight_decay: 0.0,
        }
    }

    /// The base learning rate.
    pub fn lr(&self) -> f64 {
        match *self {
            Self::Adam { lr, .. } | Self::AdamW { lr, .. } | Self::Sgd { lr, .. } => lr,
        }
    }

    /// Set the base learning rate.
    pub fn set_lr(&mut self, new: f64) {
        match self {
            Self::Adam { lr, .. } | Self::AdamW { lr, .. } | Self::Sgd { lr, .. } => *lr = new,
        }
    }

    pub fn name(&self) -> &'static str {
        match self {
            Self::Adam { .. } => "Adam",
            Self::AdamW { .. } => "AdamW",
            Self::Sgd { nesterov: true, .. } => "SGD (Nesterov)",
            Self::Sgd { .. } => "SGD",
        }
    }

    pub fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(TrainError::Config(format!("optimiser: {m}")));
        let lr = self.lr();
        if !(lr > 0.0 && lr.is_finite()) {
            return bad(format!("lr must be positive, got {lr}"));
        }
        match *self {
            Self::Adam {
                beta1,
                beta2,
                eps,
                weight_decay,
                ..
            }
            | Self::AdamW {
                beta1,
                beta2,
                eps,
                weight_decay,
                ..
            } => {
                if !((0.0..1.0).contains(&beta1) && (0.0..1.0).contains(&beta2)) {
                    return bad(format!("betas must be in [0, 1), got {beta1} and {beta2}"));
                }
                if !(eps > 0.0 && weight_decay >= 0.0) {
                    return bad(format!(
                        "eps must be > 0 and weight_decay ≥ 0, got {eps} and {weight_decay}"
                    ));
                }
            }
            Self::Sgd {
                momentum,
                nesterov,
                weight_decay,
                ..
            } => {
                if !((0.0..1.0).contains(&momentum) && weight_decay >= 0.0) {
                    return bad(format!(
                        "momentum must be in [0, 1) and weight_decay ≥ 0, got {momentum}, {weight_decay}"
                    ));
                }
                if nesterov && momentum == 0.0 {
                    return bad("Nesterov needs a positive momentum".into());
                }
            }
        }
        Ok(())
    }
}

/// An optimiser over named parameters, with checkpointable state.
#[derive(Debug)]
pub struct Optimizer {
    config: OptimConfig,
    /// Trainable parameters by name, in name order.
    params: BTreeMap<String, Var>,
    /// State tensors by `<slot>.<name>`.
    state: BTreeMap<String, Tensor>,
    steps: u64,
}

impl Optimizer {
    /// An optimiser over `params` (name → variable). Names ending in
    /// `running_mean`/`running_var` must already be left out.
    pub fn new(config: OptimConfig, params: BTreeMap<String, Var>) -> Result<Self> {
        config.validate()?;
        Ok(Self {
            config,
            params,
            state: BTreeMap::new(),
            steps: 0,
        })
    }

    pub fn config(&self) -> &OptimConfig {
        &self.config
    }

    /// Steps taken so far.
    pub fn steps(&self) -> u64 {
        self.steps
    }

    fn slot(&mut self, slot: &str, name: &str, like: &Tensor) -> Result<Tensor> {
        let key = format!("{slot}.{name}");
        match self.state.get(&key) {
            Some(t) => Ok(t.clone()),
            None => Ok(like.zeros_like()?),
        }
    }

    /// One update with learning rate `lr` from the gradients in `grads`.
    /// Parameters without a gradient are left as they are.
    pub fn step(&mut self, grads: &GradStore, lr: f64) -> Result<()> {
        self.steps += 1;
        let t = self.steps as i32;
        let params: Vec<(String, Var)> = self.params.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
        for (name, var) in params {
            let Some(g) = grads.get(var.as_tensor()) else { continue };
            // Detached: a gradient candle's own backward computed may still
            // carry its graph (ops on variables are tracked); kept in the
            // optimiser state, it would chain every step's activations to the
            // next (memory growing by gigabytes per epoch).
            let g = &g.detach();
            let p = &var.as_tensor().detach();
            match self.config.clone() {
                OptimConfig::Adam {
                    beta1,
                    beta2,
                    eps,
                    weight_decay,
                    ..
                }
                | OptimConfig::AdamW {
                    beta1,
                    beta2,
                    eps,
                    weight_decay,
                    ..
                } => {
                    let decoupled = matches!(self.config, OptimConfig::AdamW { .. });
                    let g = if !decoupled && weight_decay > 0.0 {
                        (g + (p * weight_decay)?)?
                    } else {
                        g.clone()
                    };
                    let m = ((self.slot("m", &name, p)? * beta1)? + (&g * (1.0 - beta1))?)?;
                    let v = ((self.slot("v", &name, p)? * beta2)? + (g.sqr()? * (1.0 - beta2))?)?;
                    let m_hat = (&m / (1.0 - beta1.powi(t)))?;
                    let v_hat = (&v / (1.0 - beta2.powi(t)))?;
                    let update = (m_hat / (v_hat.sqrt()? + eps)?)?;
                    let base = if decoupled && weight_decay > 0.0 {
                        (p * (1.0 - lr * weight_decay))?
                    } else {
                        p.clone()
                    };
                    var.set(&(base - (update * lr)?)?)?;
                    self.state.insert(format!("m.{name}"), m.detach());
                    self.state.insert(format!("v.{name}"), v.detach());
                }
                OptimConfig::Sgd {
                    momentum,
                    nesterov,
                    weight_decay,
                    ..
                } => {
                    let g = if weight_decay > 0.0 {
                        (g + (p * weight_decay)?)?
                    } else {
                        g.clone()
                    };
                    let g = if momentum > 0.0 {
                        let key = format!("momentum.{name}");
                        let buf = match self.state.get(&key) {
                            Some(b) => ((b * momentum)? + &g)?,
                            None => g.clone(),
                        };
                        let d = if nesterov {
                            (&g + (&buf * momentum)?)?
                        } else {
                            buf.clone()
                        };
                        self.state.insert(key, buf.detach());
                        d
                    } else {
                        g
                    };
                    var.set(&(p - (g * lr)?)?)?;
                }
            }
        }
        Ok(())
    }

    /// The state to checkpoint: tensors by name, and the step count.
    pub fn state(&self) -> (HashMap<String, Tensor>, u64) {
        (
            self.state.iter().map(|(k, v)| (k.clone(), v.clone())).collect(),
            self.steps,
        )
    }

    /// Restore state saved by [`Optimizer::state`]. Every tensor must belong
    /// to a known parameter with its shape.
    pub fn load_state(&mut self, tensors: HashMap<String, Tensor>, steps: u64) -> Result<()> {
        let mut state = BTreeMap::new();
        for (key, t) in tensors {
            let Some((_, name)) = key.split_once('.') else {
                return Err(TrainError::Config(format!(
                    "optimiser state {key:?} has no slot prefix"
                )));
            };
            let Some(p) = self.params.get(name) else {
                return Err(TrainError::Config(format!(
                    "optimiser state {key:?} is for an unknown parameter"
                )));
            };
            if p.dims() != t.dims() {
                return Err(TrainError::Config(format!(
                    "optimiser state {key:?} has shape {:?}, its parameter {:?}",
                    t.dims(),
                    p.dims()
                )));
            }
            state.insert(key, t.to_device(p.device())?);
        }
        self.state = state;
        self.steps = steps;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device};

    /// Minimise `sum((x − 3)²)` from x = 0.
    fn run(cfg: OptimConfig, steps: usize) -> f64 {
        let x = Var::zeros(4, DType::F64, &Device::Cpu).unwrap();
        let mut opt = Optimizer::new(cfg.clone(), BTreeMap::from([("x".to_string(), x.clone())])).unwrap();
        for _ in 0..steps {
            let loss = (x.as_tensor() - 3.0).unwrap().sqr().unwrap().sum_all().unwrap();
            opt.step(&loss.backward().unwrap(), cfg.lr()).unwrap();
        }
        x.as_tensor().to_vec1::<f64>().unwrap()[0]
    }

    #[test]
    fn every_optimiser_converges() {
        assert!((run(OptimConfig::adam(0.1), 300) - 3.0).abs() < 1e-2);
        let adamw = OptimConfig::AdamW {
            lr: 0.1,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.0,
        };
        assert!((run(adamw, 300) - 3.0).abs() < 1e-2);
        let sgd = OptimConfig::Sgd {
            lr: 0.05,
            momentum: 0.9,
            nesterov: false,
            weight_decay: 0.0,
        };
        assert!((run(sgd, 200) - 3.0).abs() < 1e-3);
        let nesterov = OptimConfig::Sgd {
            lr: 0.05,
            momentum: 0.9,
            nesterov: true,
            weight_decay: 0.0,
        };
        assert!((run(nesterov, 200) - 3.0).abs() < 1e-3);
    }

    /// A gradient computed from a variable carries candle's graph; the
    /// optimiser state must not keep it (it would chain every step's graph to
    /// the next: memory growing without bound).
    #[test]
    fn optimiser_state_holds_no_graph() {
        let sgd = OptimConfig::Sgd {
            lr: 0.05,
            momentum: 0.9,
            nesterov: false,
            weight_decay: 0.1,
        };
        for cfg in [OptimConfig::adam(0.1), sgd] {
            let x = Var::ones(3, DType::F64, &Device::Cpu).unwrap();
            let mut opt = Optimizer::new(cfg.clone(), BTreeMap::from([("x".to_string(), x.clone())])).unwrap();
            for _ in 0..3 {
                // d/dx Σ x³ = 3x², computed by candle from x: a tracked tensor
                let loss = x.as_tensor().powf(3.0).unwrap().sum_all().unwrap();
                let grads = loss.backward().unwrap();
                assert!(
                    grads.get(x.as_tensor()).unwrap().track_op(),
                    "the premise: a tracked gradient"
                );
                opt.step(&grads, cfg.lr()).unwrap();
            }
            let (state, steps) = opt.state();
            assert_eq!(steps, 3);
            assert!(!state.is_empty());
            for (name, t) in state {
                assert!(!t.track_op(), "{name} keeps a graph");
            }
        }
    }

    #[test]
    fn first_adam_step_by_hand() {
        // gradient g = 2(x − 3) = −6 at x = 0: m̂ = g, v̂ = g², update = lr·g/(|g| + eps) ≈ −lr
        assert!((run(OptimConfig::adam(0.01), 1) - 0.01).abs() < 1e-8);
        // SGD, momentum ignored on the first step: x = 0 − 0.1·(−6) = 0.6
        let sgd = OptimConfig::Sgd {
            lr: 0.1,
            momentum: 0.9,
            nesterov: false,
            weight_decay: 0.0,
        };
        assert!((run(sgd.clone(), 1) - 0.6).abs() < 1e-12);
        // second step: g = 2(0.6 − 3) = −4.8, buf = 0.9·(−6) − 4.8 = −10.2, x = 0.6 + 1.02
        assert!((run(sgd, 2) - 1.62).abs() < 1e-12);
    }

    #[test]
    fn weight_decay_pulls_towards_zero() {
        let plain = OptimConfig::AdamW {
            lr: 0.1,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.0,
        };
        let decayed = OptimConfig::AdamW {
            lr: 0.1,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.5,
        };
        assert!(run(decayed, 300) < run(plain, 300) - 0.1);
    }

    #[test]
    fn state_round_trip_continues_exactly() {
        let cfg = OptimConfig::adam(0.05);
        let make = || {
            let x = Var::from_tensor(&Tensor::new(&[1.0f64, -2.0], &Device::Cpu).unwrap()).unwrap();
            let opt = Optimizer::new(cfg.clone(), BTreeMap::from([("x".to_string(), x.clone())])).unwrap();
            (x, opt)
        };
        let step = |x: &Var, opt: &mut Optimizer| {
            let loss = (x.as_tensor() * 2.0).unwrap().sin().unwrap().sum_all().unwrap();
            opt.step(&loss.backward().unwrap(), 0.05).unwrap();
        };
        let (x1, mut o1) = make();
        for _ in 0..4 {
            step(&x1, &mut o1);
        }
        let (x2, mut o2) = make();
        for _ in 0..2 {
            step(&x2, &mut o2);
        }
        let (tensors, steps) = o2.state();
        let (x3, mut o3) = make();
        x3.set(x2.as_tensor()).unwrap();
        o3.load_state(tensors, steps).unwrap();
        for _ in 0..2 {
            step(&x3, &mut o3);
        }
        assert_eq!(
            x1.as_tensor().to_vec1::<f64>().unwrap(),
            x3.as_tensor().to_vec1::<f64>().unwrap()
        );
        let bad = HashMap::from([("m.y".to_string(), Tensor::zeros(2, DType::F64, &Device::Cpu).unwrap())]);
        assert!(o3.load_state(bad, 1).is_err());
    }
}
