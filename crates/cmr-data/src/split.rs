//! Train/validation splits: the `val/` folder when there is one, otherwise a
//! seeded, deterministic hold-out of `train/`; and k folds for
//! cross-validation. Both go by patient ([`Grouping`]): the slices of one
//! heart never sit on both sides of a split.

use std::collections::{BTreeMap, BTreeSet};

use rand::seq::SliceRandom;
use serde::{Deserialize, Serialize};

use crate::dataset::{Dataset, Sample};
use crate::error::{DataError, Result};
use crate::rng::{purpose, stream};

/// Which slices come from one patient.
///
/// The CMR 2021 set does not name its patients, but its slices come in pairs:
/// `cmr(2k−1)` and `cmr(2k)` are the same slice position of one heart at two
/// phases of the cardiac cycle (each one's most similar image among the 100 is
/// its partner, correlation 0.67–0.95, against at most 0.65 for any other), so
/// its presets group them as [`Grouping::Consecutive`] with `size = 2`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum Grouping {
    /// Every slice is a patient of its own (what runs made before grouping
    /// existed did, hence the default when a config does not say).
    #[default]
    Slice,
    /// Ids ending in a number `N` belong to patient `(N − 1) / size`: runs of
    /// `size` consecutive numbers. An id without a trailing number is a
    /// patient of its own.
    Consecutive { size: u32 },
    /// Slices of a volume dataset (`<case>_zNN`, as [`crate::volume_samples`]
    /// names them): the patient is the case without its `_frameMM` (ACDC's
    /// frames of one heart), so no heart is split.
    Volume,
}

/// `id` without a trailing `<marker><digits>`, if it has one.
fn strip_numbered<'a>(id: &'a str, marker: &str) -> &'a str {
    match id.rsplit_once(marker) {
        Some((head, n)) if !head.is_empty() && !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()) => head,
        _ => id,
    }
}

/// The case of a volume slice's sample id (`<case>_zNN` → `<case>`, as
/// [`crate::volume_samples`] names them); another id as it is.
pub fn slice_case(id: &str) -> &str {
    strip_numbered(id, "_z")
}

impl Grouping {
    /// The patient key of a slice id.
    pub fn patient(&self, id: &str) -> String {
        match *self {
            Self::Slice => id.to_owned(),
            Self::Consecutive { size } => {
                let digits = id.len() - id.trim_end_matches(|c: char| c.is_ascii_digit()).len();
                let (stem, number) = id.split_at(id.len() - digits);
                match number.parse::<u64>() {
                    Ok(n) if n >= 1 && size >= 1 => format!("{stem}#{}", (n - 1) / u64::from(size)),
                    _ => id.to_owned(),
                }
            }
            Self::Volume => strip_numbered(slice_case(id), "_frame").to_owned(),
        }
    }

    pub fn validate(&self) -> Result<()> {
        match *self {
            Self::Consecutive { size: 0 } => Err(DataError::Config(
                "data.grouping: consecutive groups need size >= 1".into(),
            )),
            _ => Ok(()),
        }
    }

    /// Sample indices grouped by patient, groups in order of first appearance.
    fn groups<'a>(&self, ids: impl Iterator<Item = &'a str>) -> Vec<Vec<usize>> {
        let mut index: BTreeMap<String, usize> = BTreeMap::new();
        let mut groups: Vec<Vec<usize>> = Vec::new();
        for (i, id) in ids.enumerate() {
            let g = *index.entry(self.patient(id)).or_insert_with(|| {
                groups.push(Vec::new());
                groups.len() - 1
            });
            groups[g].push(i);
        }
        groups
    }
}

impl std::fmt::Display for Grouping {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Slice => write!(f, "by slice"),
            Self::Consecutive { size } => write!(f, "by patient ({size} consecutive slices each)"),
            Self::Volume => write!(f, "by patient (the volumes of one heart)"),
        }
    }
}

/// Where the validation samples came from.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum ValSource {
    /// The dataset's `val/` folder.
    Folder,
    /// A seeded hold-out of `train/`.
    HeldOut { fraction: f64, seed: u64 },
    /// Fold `fold` (0-based) of a `k`-fold cross-validation of `train/`.
    Fold { fold: usize, k: usize, seed: u64 },
}

impl std::fmt::Display for ValSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Folder => write!(f, "the val/ folder"),
            Self::HeldOut { fraction, seed } => {
                write!(f, "a {:.0} % hold-out of train/ (seed {seed})", fraction * 100.0)
            }
            Self::Fold { fold, k, seed } => write!(f, "fold {fold} of a {k}-fold split of train/ (seed {seed})"),
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

/// Split `samples` into (kept, held out) by patient: whole patients, in an
/// order drawn from a stream of `seed`, are held out until at least
/// `round(fraction · n)` samples are (at least one patient, and at least one
/// kept). Both parts keep the input order. With [`Grouping::Slice`] exactly
/// `round(fraction · n)` samples are held out.
pub fn hold_out(
    samples: Vec<Sample>,
    fraction: f64,
    seed: u64,
    grouping: Grouping,
) -> Result<(Vec<Sample>, Vec<Sample>)> {
    if !(fraction > 0.0 && fraction < 1.0) {
        return Err(DataError::Config(format!(
            "validation fraction must be in (0, 1), got {fraction}"
        )));
    }
    let n = samples.len();
    let groups = grouping.groups(samples.iter().map(|s| s.id.as_str()));
    if groups.len() < 2 {
        return Err(DataError::Config(format!(
            "cannot hold out validation samples from {n} training sample(s) of {} patient(s)",
            groups.len()
        )));
    }
    let target = ((fraction * n as f64).round() as usize).max(1);
    let mut order: Vec<usize> = (0..groups.len()).collect();
    order.shuffle(&mut stream(seed, &[purpose::SPLIT]));
    let mut held = vec![false; n];
    let mut count = 0;
    for &g in &order[..groups.len() - 1] {
        if count >= target {
            break;
        }
        for &i in &groups[g] {
            held[i] = true;
        }
        count += groups[g].len();
    }
    let (mut kept, mut out) = (Vec::with_capacity(n - count), Vec::with_capacity(count));
    for (s, h) in samples.into_iter().zip(held) {
        if h { out.push(s) } else { kept.push(s) }
    }
    Ok((kept, out))
}

/// The folds of a k-fold cross-validation: which ids each fold validates on.
///
/// Patients are dealt, in an order drawn from the seed, each to the fold with
/// the fewest samples so far (the lowest-numbered on a tie): every sample is
/// validated exactly once, the folds are disjoint and differ in size by at
/// most one patient, and the same samples, `k`, seed and grouping give the
/// same folds.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Folds {
    pub k: usize,
    pub seed: u64,
    pub grouping: Grouping,
    /// The validation ids of each fold, in the input order.
    pub val: Vec<Vec<String>>,
}

impl Folds {
    /// Deal `samples` into `k` folds. Needs `2 <= k <= patients` and unique ids.
    pub fn new(samples: &[Sample], k: usize, seed: u64, grouping: Grouping) -> Result<Self> {
        grouping.validate()?;
        let ids: BTreeSet<&str> = samples.iter().map(|s| s.id.as_str()).collect();
        if ids.len() != samples.len() {
            return Err(DataError::Config("cross-validation needs unique sample ids".into()));
        }
        let groups = grouping.groups(samples.iter().map(|s| s.id.as_str()));
        if k < 2 || k > groups.len() {
            return Err(DataError::Config(format!(
                "{k} folds of {} sample(s) from {} patient(s): need 2 <= folds <= patients",
                samples.len(),
                groups.len()
            )));
        }
        let mut order: Vec<usize> = (0..groups.len()).collect();
        order.shuffle(&mut stream(seed, &[purpose::FOLDS, k as u64]));
        let mut fold_of = vec![0usize; samples.len()];
        let mut sizes = vec![0usize; k];
        for g in order {
            let f = (0..k).min_by_key(|&f| (sizes[f], f)).unwrap_or(0);
            sizes[f] += groups[g].len();
            for &i in &groups[g] {
                fold_of[i] = f;
            }
        }
        let mut val = vec![Vec::new(); k];
        for (s, &f) in samples.iter().zip(&fold_of) {
            val[f].push(s.id.clone());
        }
        Ok(Self { k, seed, grouping, val })
    }

    /// Training (every other fold) and validation (fold `fold`) samples of
    /// `samples`, which must hold every id the folds name (the same data the
    /// folds were made from).
    pub fn split(&self, samples: &[Sample], fold: usize) -> Result<Splits> {
        let Some(val_ids) = self.val.get(fold) else {
            return Err(DataError::Config(format!("fold {fold} of {} does not exist", self.k)));
        };
        let all: BTreeSet<&str> = self.val.iter().flatten().map(String::as_str).collect();
        let present: BTreeSet<&str> = samples.iter().map(|s| s.id.as_str()).collect();
        if let Some(missing) = all.iter().find(|id| !present.contains(*id)) {
            return Err(DataError::Config(format!(
                "the folds name {missing}, which the data does not have (other data than the folds were made from?)"
            )));
        }
        if let Some(extra) = present.iter().find(|id| !all.contains(*id)) {
            return Err(DataError::Config(format!(
                "the data has {extra}, which no fold names (other data than the folds were made from?)"
            )));
        }
        let val_ids: BTreeSet<&str> = val_ids.iter().map(String::as_str).collect();
        let (val, train): (Vec<Sample>, Vec<Sample>) =
            samples.iter().cloned().partition(|s| val_ids.contains(s.id.as_str()));
        Ok(Splits {
            train,
            val,
            source: ValSource::Fold {
                fold,
                k: self.k,
                seed: self.seed,
            },
        })
    }

    /// The fold that validates on `id`, if any.
    pub fn fold_of(&self, id: &str) -> Option<usize> {
        self.val.iter().position(|f| f.iter().any(|v| v == id))
    }
}

impl Splits {
    /// Validation from `val/` when the dataset has it, else a hold-out of
    /// `fraction` of `train/` by `seed`, whole patients at a time.
    pub fn from_dataset(dataset: &Dataset, fraction: f64, seed: u64, grouping: Grouping) -> Result<Self> {
        match &dataset.val {
            Some(val) => Ok(Self {
                train: dataset.train.clone(),
                val: val.clone(),
                source: ValSource::Folder,
            }),
            None => {
                let (train, val) = hold_out(dataset.train.clone(), fraction, seed, grouping)?;
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
                id: format!("cmr{}", i + 1),
                image: Plane::zeros(2, 2),
                mask: None,
                original: Size { height: 2, width: 2 },
                path: format!("cmr{}.png", i + 1).into(),
            })
            .collect()
    }

    fn ids(s: &[Sample]) -> Vec<String> {
        s.iter().map(|s| s.id.clone()).collect()
    }

    #[test]
    fn hold_out_is_seeded_disjoint_and_sized() {
        let (a_train, a_val) = hold_out(samples(100), 0.2, 42, Grouping::Slice).unwrap();
        let (b_train, b_val) = hold_out(samples(100), 0.2, 42, Grouping::Slice).unwrap();
        let (_, c_val) = hold_out(samples(100), 0.2, 43, Grouping::Slice).unwrap();
        assert_eq!(a_val.len(), 20);
        assert_eq!(a_train.len(), 80);
        assert_eq!(ids(&a_val), ids(&b_val));
        assert_eq!(ids(&a_train), ids(&b_train));
        assert_ne!(ids(&a_val), ids(&c_val));
        let all: BTreeSet<_> = ids(&a_train).into_iter().chain(ids(&a_val)).collect();
        assert_eq!(all.len(), 100);
    }

    #[test]
    fn hold_out_rejects_bad_fractions() {
        assert!(hold_out(samples(10), 0.0, 1, Grouping::Slice).is_err());
        assert!(hold_out(samples(10), 1.0, 1, Grouping::Slice).is_err());
        assert!(hold_out(samples(1), 0.5, 1, Grouping::Slice).is_err());
        let (t, v) = hold_out(samples(3), 0.01, 1, Grouping::Slice).unwrap();
        assert_eq!((t.len(), v.len()), (2, 1));
    }

    fn pairs() -> Grouping {
        Grouping::Consecutive { size: 2 }
    }

    #[test]
    fn consecutive_patients_by_hand() {
        let g = pairs();
        assert_eq!(g.patient("cmr1"), g.patient("cmr2"));
        assert_ne!(g.patient("cmr2"), g.patient("cmr3"));
        assert_eq!(g.patient("cmr99"), g.patient("cmr100"));
        assert_eq!(g.patient("scan"), "scan");
        assert_eq!(g.patient("cmr0"), "cmr0");
        assert_eq!(Grouping::Slice.patient("cmr1"), "cmr1");
        assert!(Grouping::Consecutive { size: 0 }.validate().is_err());
    }

    #[test]
    fn volume_slices_go_by_patient() {
        let g = Grouping::Volume;
        assert_eq!(g.patient("patient001_frame01_z03"), "patient001");
        assert_eq!(g.patient("patient001_frame12_z10"), "patient001");
        assert_eq!(g.patient("heart7_z00"), "heart7");
        assert_eq!(g.patient("heart7"), "heart7");
        assert_eq!(g.patient("a_z"), "a_z");
        assert_eq!(g.patient("_z1"), "_z1");
        // saved as {"kind": "volume"}
        let json = serde_json::to_string(&g).unwrap();
        assert_eq!(json, r#"{"kind":"volume"}"#);
        assert_eq!(serde_json::from_str::<Grouping>(&json).unwrap(), g);
    }

    #[test]
    fn grouped_hold_out_keeps_patients_whole() {
        let (train, val) = hold_out(samples(100), 0.2, 42, pairs()).unwrap();
        assert_eq!(val.len(), 20);
        let g = pairs();
        let val_patients: BTreeSet<String> = val.iter().map(|s| g.patient(&s.id)).collect();
        assert!(train.iter().all(|s| !val_patients.contains(&g.patient(&s.id))));
        // an odd target takes whole patients: 21 -> 22
        let (_, val) = hold_out(samples(100), 0.21, 1, pairs()).unwrap();
        assert_eq!(val.len(), 22);
        assert!(hold_out(samples(2), 0.5, 1, pairs()).is_err());
    }

    #[test]
    fn folds_are_disjoint_cover_every_sample_once_and_repeat() {
        for (n, k, grouping) in [
            (100, 5, pairs()),
            (100, 5, Grouping::Slice),
            (17, 3, pairs()),
            (4, 2, pairs()),
        ] {
            let s = samples(n);
            let folds = Folds::new(&s, k, 42, grouping).unwrap();
            assert_eq!(folds.val.len(), k);
            let mut seen = BTreeMap::new();
            for (f, ids) in folds.val.iter().enumerate() {
                for id in ids {
                    assert!(seen.insert(id.clone(), f).is_none(), "{id} in two folds");
                }
            }
            assert_eq!(seen.len(), n);
            let sizes: Vec<usize> = folds.val.iter().map(Vec::len).collect();
            let (lo, hi) = (sizes.iter().min().unwrap(), sizes.iter().max().unwrap());
            assert!(hi - lo <= 2, "{sizes:?}");
            for f in 0..k {
                let sp = folds.split(&s, f).unwrap();
                assert_eq!(sp.val.len() + sp.train.len(), n);
                let patients: BTreeSet<String> = sp.val.iter().map(|x| grouping.patient(&x.id)).collect();
                assert!(sp.train.iter().all(|x| !patients.contains(&grouping.patient(&x.id))));
                assert!(sp.val.iter().all(|x| folds.fold_of(&x.id) == Some(f)));
            }
            assert_eq!(Folds::new(&s, k, 42, grouping).unwrap(), folds);
        }
        let s = samples(100);
        assert_ne!(
            Folds::new(&s, 5, 42, pairs()).unwrap().val,
            Folds::new(&s, 5, 43, pairs()).unwrap().val
        );
    }

    #[test]
    fn folds_reject_bad_counts_and_other_data() {
        let s = samples(10);
        assert!(Folds::new(&s, 1, 0, pairs()).is_err());
        assert!(Folds::new(&s, 6, 0, pairs()).is_err());
        assert!(Folds::new(&s, 5, 0, pairs()).is_ok());
        let folds = Folds::new(&s, 2, 0, pairs()).unwrap();
        assert!(folds.split(&s, 2).is_err());
        let err = folds.split(&samples(8), 0).unwrap_err().to_string();
        assert!(err.contains("does not have"), "{err}");
        let err = folds.split(&samples(12), 0).unwrap_err().to_string();
        assert!(err.contains("no fold names"), "{err}");
    }
}
