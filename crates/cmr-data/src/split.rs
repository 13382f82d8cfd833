//! Train/validation splits: the `val/` folder when there is one, otherwise a
//! seeded, deterministic hold-out of `train/`.

use rand::seq::SliceRandom;
use serde::{Deserialize, Serialize};

use crate::dataset::{Dataset, Sample};
use crate::error::{DataError, Result};
use crate::rng::{purpose, stream};

/// Where the validation samples came from.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum ValSource {
    /// The dataset's `val/` folder.
    Folder,
    /// A seeded hold-out of `train/`.
    HeldOut { fraction: f64, seed: u64 },
}

impl std::fmt::Display for ValSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Folder => write!(f, "the val/ folder"),
            Self::HeldOut { fraction, seed } => {
                write!(f, "a {:.0} % hold-out of train/ (seed {seed})", fraction * 100.0)
            }
        }
    }
}

/// Training and validation samples.
#[derive(Clone, Debug)]
pub struct Splits {
    pub train: Vec<Sample>,
    pub val: Vec<Sample>,
    pub source: ValSource,
}

/// Split `samples` into (kept, held out): `round(fraction · n)` samples, at
/// least one and at most `n − 1`, chosen by a stream of `seed`. Both parts keep
/// the input order.
pub fn hold_out(samples: Vec<Sample>, fraction: f64, seed: u64) -> Result<(Vec<Sample>, Vec<Sample>)> {
    if !(fraction > 0.0 && fraction < 1.0) {
        return Err(DataError::Config(format!(
            "validation fraction must be in (0, 1), got {fraction}"
        )));
    }
    let n = samples.len();
    if n < 2 {
        return Err(DataError::Config(format!(
            "cannot hold out validation samples from {n} training sample(s)"
        )));
    }
    let k = ((fraction * n as f64).round() as usize).clamp(1, n - 1);
    let mut order: Vec<usize> = (0..n).collect();
    order.shuffle(&mut stream(seed, &[purpose::SPLIT]));
    let mut held = vec![false; n];
    for &i in &order[..k] {
        held[i] = true;
    }
    let (mut kept, mut out) = (Vec::with_capacity(n - k), Vec::with_capacity(k));
    for (s, h) in samples.into_iter().zip(held) {
        if h { out.push(s) } else { kept.push(s) }
    }
    Ok((kept, out))
}

impl Splits {
    /// Validation from `val/` when the dataset has it, else a hold-out of
    /// `fraction` of `train/` by `seed`.
    pub fn from_dataset(dataset: &Dataset, fraction: f64, seed: u64) -> Result<Self> {
        match &dataset.val {
            Some(val) => Ok(Self {
                train: dataset.train.clone(),
                val: val.clone(),
                source: ValSource::Folder,
            }),
            None => {
                let (train, val) = hold_out(dataset.train.clone(), fraction, seed)?;
                Ok(Self {
                    train,
                    val,
                    source: ValSource::HeldOut { fraction, seed },
                })
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::plane::{Plane, Size};

    fn samples(n: usize) -> Vec<Sample> {
        (0..n)
            .map(|i| Sample {
                id: format!("s{i}"),
                image: Plane::zeros(2, 2),
                mask: None,
                original: Size { height: 2, width: 2 },
                path: format!("s{i}.png").into(),
            })
            .collect()
    }

    fn ids(s: &[Sample]) -> Vec<String> {
        s.iter().map(|s| s.id.clone()).collect()
    }

    #[test]
    fn hold_out_is_seeded_disjoint_and_sized() {
        let (a_train, a_val) = hold_out(samples(100), 0.2, 42).unwrap();
        let (b_train, b_val) = hold_out(samples(100), 0.2, 42).unwrap();
        let (_, c_val) = hold_out(samples(100), 0.2, 43).unwrap();
        assert_eq!(a_val.len(), 20);
        assert_eq!(a_train.len(), 80);
        assert_eq!(ids(&a_val), ids(&b_val));
        assert_eq!(ids(&a_train), ids(&b_train));
        assert_ne!(ids(&a_val), ids(&c_val));
        let all: std::collections::BTreeSet<_> = ids(&a_train).into_iter().chain(ids(&a_val)).collect();
        assert_eq!(all.len(), 100);
    }

    #[test]
    fn hold_out_rejects_bad_fractions() {
        assert!(hold_out(samples(10), 0.0, 1).is_err());
        assert!(hold_out(samples(10), 1.0, 1).is_err());
        assert!(hold_out(samples(1), 0.5, 1).is_err());
        let (t, v) = hold_out(samples(3), 0.01, 1).unwrap();
        assert_eq!((t.len(), v.len()), (2, 1));
    }
}
