//! What trained a model: the ids of its training and validation slices and a
//! fingerprint of their pixels, written as a run's `splits.json` (as
//! nnU-Net's `splits_final.json`), so that a resume on other data and a score
//! on training slices can be caught.

use std::collections::BTreeSet;
use std::path::Path;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::atomic::write_atomic;
use crate::dataset::Sample;
use crate::error::{DataError, Result};
use crate::split::{Splits, ValSource};

/// SHA-256 over the samples in id order: each id, its size, its pixels and its
/// mask's. Equal pixels give equal fingerprints whatever the files' encoding.
pub fn fingerprint<'a>(samples: impl IntoIterator<Item = &'a Sample>) -> String {
    let mut sorted: Vec<&Sample> = samples.into_iter().collect();
    sorted.sort_by(|a, b| a.id.cmp(&b.id));
    let mut h = Sha256::new();
    for s in sorted {
        h.update((s.id.len() as u64).to_le_bytes());
        h.update(s.id.as_bytes());
        h.update((s.image.height() as u64).to_le_bytes());
        h.update((s.image.width() as u64).to_le_bytes());
        h.update(s.image.data());
        match &s.mask {
            Some(m) => {
                h.update([1]);
                h.update(m.data());
            }
            None => h.update([0]),
        }
    }
    h.finalize().iter().map(|b| format!("{b:02x}")).collect()
}

/// `splits.json`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SplitRecord {
    pub source: ValSource,
    pub train: Vec<String>,
    pub val: Vec<String>,
    /// [`fingerprint`] of the training and validation samples together.
    pub sha256: String,
}

impl SplitRecord {
    pub fn of(splits: &Splits) -> Self {
        Self {
            source: splits.source.clone(),
            train: splits.train.iter().map(|s| s.id.clone()).collect(),
            val: splits.val.iter().map(|s| s.id.clone()).collect(),
            sha256: fingerprint(splits.train.iter().chain(&splits.val)),
        }
    }

    /// How `other` differs from `self`, in words; `None` when it does not.
    pub fn difference(&self, other: &Self) -> Option<String> {
        // ids of `a` that `b` lacks
        let missing = |a: &[String], b: &[String]| {
            let b: BTreeSet<&String> = b.iter().collect();
            a.iter().filter(|id| !b.contains(id)).count()
        };
        let (gone_t, gone_v) = (missing(&self.train, &other.train), missing(&self.val, &other.val));
        let (new_t, new_v) = (missing(&other.train, &self.train), missing(&other.val, &self.val));
        if gone_t + gone_v + new_t + new_v > 0 {
            return Some(format!(
                "{} training and {} validation slices recorded, {} and {} given: {gone_t} training and {gone_v} validation ids of the record are not among them, {new_t} and {new_v} are new",
                self.train.len(),
                self.val.len(),
                other.train.len(),
                other.val.len()
            ));
        }
        (self.sha256 != other.sha256).then(|| "the same ids, but their pixels differ (sha256)".to_string())
    }

    /// How many of `ids` this record trained on.
    pub fn trained_on<'a>(&self, ids: impl IntoIterator<Item = &'a str>) -> usize {
        let train: BTreeSet<&str> = self.train.iter().map(String::as_str).collect();
        ids.into_iter().filter(|id| train.contains(id)).count()
    }

    /// Read a `splits.json`; `None` when there is none.
    pub fn read(path: &Path) -> Result<Option<Self>> {
        if !path.exists() {
            return Ok(None);
        }
        let text = std::fs::read_to_string(path).map_err(|e| DataError::Io {
            path: path.to_path_buf(),
            source: e,
        })?;
        serde_json::from_str(&text)
            .map(Some)
            .map_err(|e| DataError::Config(format!("{}: {e}", path.display())))
    }

    pub fn write(&self, path: &Path) -> Result<()> {
        let text = serde_json::to_string_pretty(self).expect("a split record serialises");
        write_atomic(path, text.as_bytes())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::plane::{Plane, Size};

    fn sample(id: &str, v: u8) -> Sample {
        Sample {
            id: id.into(),
            image: Plane::from_fn(2, 2, |_, _| v),
            mask: Some(Plane::zeros(2, 2)),
            original: Size { height: 2, width: 2 },
            path: format!("{id}.png").into(),
        }
    }

    fn splits(val_value: u8) -> Splits {
        Splits {
            train: vec![sample("a", 1), sample("b", 2)],
            val: vec![sample("c", val_value)],
            source: ValSource::Folder,
        }
    }

    #[test]
    fn fingerprints_follow_pixels_not_order() {
        let (a, b) = (sample("a", 1), sample("b", 2));
        assert_eq!(fingerprint([&a, &b]), fingerprint([&b, &a]));
        assert_ne!(fingerprint([&a, &b]), fingerprint([&a, &sample("b", 3)]));
        assert_ne!(fingerprint([&a]), fingerprint([&sample("x", 1)]));
        assert_eq!(fingerprint([&a]).len(), 64);
    }

    #[test]
    fn differences_are_named_and_round_trip() {
        let r = SplitRecord::of(&splits(3));
        assert_eq!(r.difference(&SplitRecord::of(&splits(3))), None);
        let pixels = r.difference(&SplitRecord::of(&splits(4))).unwrap();
        assert!(pixels.contains("pixels differ"), "{pixels}");
        let mut moved = splits(3);
        moved.val.push(moved.train.remove(0));
        let ids = r.difference(&SplitRecord::of(&moved)).unwrap();
        assert!(
            ids.contains("1 training and 0 validation ids of the record are not among them, 0 and 1 are new"),
            "{ids}"
        );
        assert_eq!(r.trained_on(["a", "c", "z"]), 1);
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("splits.json");
        assert_eq!(SplitRecord::read(&path).unwrap(), None);
        r.write(&path).unwrap();
        assert_eq!(SplitRecord::read(&path).unwrap(), Some(r));
    }
}
