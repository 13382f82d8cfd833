//! Learning-rate schedules, as pure functions of the epoch.

use serde::{Deserialize, Serialize};

use crate::error::{Result, TrainError};

/// How the learning rate changes from epoch to epoch (it is constant within
/// an epoch). In JSON/TOML: `{"kind": "step", "step_size": 20, "gamma": 0.5}`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum Schedule {
    /// The base rate throughout.
    #[default]
    Constant,
    /// PyTorch's `StepLR`: multiply by `gamma` every `step_size` epochs.
    Step { step_size: usize, gamma: f64 },
    /// Linear warm-up over `warmup_epochs` (from `base / warmup_epochs`),
    /// then a half cosine from the base rate down to `min_lr` at the last epoch.
    Cosine {
        #[serde(default)]
        warmup_epochs: usize,
        #[serde(default)]
        min_lr: f64,
    },
    /// `base · (1 − epoch / epochs)^power` (nnU-Net uses power 0.9).
    Poly { power: f64 },
}

impl Schedule {
    /// The learning rate of `epoch` (0-based) of `epochs`.
    pub fn lr(&self, base: f64, epoch: usize, epochs: usize) -> f64 {
        match *self {
            Self::Constant => base,
            Self::Step { step_size, gamma } => base * gamma.powi((epoch / step_size.max(1)) as i32),
            Self::Cosine { warmup_epochs, min_lr } => {
                if epoch < warmup_epochs {
                    return base * (epoch + 1) as f64 / warmup_epochs as f64;
                }
                let span = epochs.saturating_sub(warmup_epochs).saturating_sub(1).max(1);
                let t = ((epoch - warmup_epochs) as f64 / span as f64).min(1.0);
                min_lr + (base - min_lr) * 0.5 * (1.0 + (std::f64::consts::PI * t).cos())
            }
            Self::Poly { power } => base * (1.0 - epoch as f64 / epochs.max(1) as f64).max(0.0).powf(power),
        }
    }

    pub fn validate(&self) -> Result<()> {
        match *self {
            Self::Step { step_size, gamma } if step_size == 0 || !(gamma > 0.0 && gamma.is_finite()) => {
                Err(TrainError::Config(format!(
                    "step schedule needs step_size ≥ 1 and gamma > 0, got {step_size} and {gamma}"
                )))
            }
            Self::Cosine { min_lr, .. } if !(min_lr >= 0.0 && min_lr.is_finite()) => {
                Err(TrainError::Config(format!("cosine min_lr must be ≥ 0, got {min_lr}")))
            }
            Self::Poly { power } if !(power > 0.0 && power.is_finite()) => {
                Err(TrainError::Config(format!("poly power must be > 0, got {power}")))
            }
            _ => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn step_halves_every_twenty_epochs() {
        let s = Schedule::Step {
            step_size: 20,
            gamma: 0.5,
        };
        assert_eq!(s.lr(1e-3, 0, 200), 1e-3);
        assert_eq!(s.lr(1e-3, 19, 200), 1e-3);
        assert_eq!(s.lr(1e-3, 20, 200), 5e-4);
        assert_eq!(s.lr(1e-3, 45, 200), 2.5e-4);
    }

    #[test]
    fn cosine_warms_up_then_decays_to_min() {
        let s = Schedule::Cosine {
            warmup_epochs: 4,
            min_lr: 1e-5,
        };
        assert!((s.lr(1e-3, 0, 24) - 2.5e-4).abs() < 1e-12);
        assert!((s.lr(1e-3, 3, 24) - 1e-3).abs() < 1e-12);
        assert!((s.lr(1e-3, 4, 24) - 1e-3).abs() < 1e-12);
        assert!((s.lr(1e-3, 23, 24) - 1e-5).abs() < 1e-12);
        let mid = s.lr(1e-3, 4 + 19 / 2, 24);
        assert!(mid < 1e-3 && mid > 1e-5);
    }

    #[test]
    fn poly_decays_to_zero() {
        let s = Schedule::Poly { power: 1.0 };
        assert_eq!(s.lr(1.0, 0, 10), 1.0);
        assert!((s.lr(1.0, 5, 10) - 0.5).abs() < 1e-12);
        assert!(s.validate().is_ok());
        assert!(Schedule::Poly { power: 0.0 }.validate().is_err());
        assert!(
            Schedule::Step {
                step_size: 0,
                gamma: 0.5
            }
            .validate()
            .is_err()
        );
    }
}
