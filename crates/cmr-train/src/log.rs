//! The per-epoch metrics log (`metrics.csv`).

use std::path::Path;

use serde::Serialize;

use crate::error::{Result, TrainError};

/// One epoch's row. Validation columns are empty for epochs that were not
/// validated.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct EpochRecord {
    /// 1-based.
    pub epoch: usize,
    pub lr: f64,
    pub train_loss: f64,
    pub val_loss: Option<f64>,
    /// Validation Dice of RV, Myo, LV.
    pub val_dice: Option<[f64; 3]>,
    pub val_mean_dice: Option<f64>,
    pub seconds: f64,
}

pub const CSV_HEADER: &str =
    "epoch,lr,train_loss,val_loss,val_dice_rv,val_dice_myo,val_dice_lv,val_dice_mean,epoch_seconds";

/// Values are written in Rust's shortest round-trip form, so that a resumed
/// run's rows equal an uninterrupted run's.
fn opt(v: Option<f64>) -> String {
    v.map(|x| x.to_string()).unwrap_or_default()
}

impl EpochRecord {
    pub fn to_csv_row(&self) -> String {
        let d = self.val_dice.map(|d| d.map(Some)).unwrap_or([None; 3]);
        format!(
            "{},{},{},{},{},{},{},{},{:.3}",
            self.epoch,
            self.lr,
            self.train_loss,
            opt(self.val_loss),
            opt(d[0]),
            opt(d[1]),
            opt(d[2]),
            opt(self.val_mean_dice),
            self.seconds
        )
    }

    fn parse(line: &str) -> Option<Self> {
        let f: Vec<&str> = line.split(',').collect();
        if f.len() != 9 {
            return None;
        }
        let o = |s: &str| {
            if s.is_empty() {
                Some(None)
            } else {
                s.parse::<f64>().ok().map(Some)
            }
        };
        let (rv, myo, lv) = (o(f[4])?, o(f[5])?, o(f[6])?);
        Some(Self {
            epoch: f[0].parse().ok()?,
            lr: f[1].parse().ok()?,
            train_loss: f[2].parse().ok()?,
            val_loss: o(f[3])?,
            val_dice: match (rv, myo, lv) {
                (Some(a), Some(b), Some(c)) => Some([a, b, c]),
                _ => None,
            },
            val_mean_dice: o(f[7])?,
            seconds: f[8].parse().ok()?,
        })
    }
}

/// All rows so far.
#[derive(Clone, Debug, Default)]
pub struct MetricsLog {
    pub records: Vec<EpochRecord>,
}

impl MetricsLog {
    pub fn to_csv(&self) -> String {
        let mut s = String::from(CSV_HEADER);
        s.push('\n');
        for r in &self.records {
            s.push_str(&r.to_csv_row());
            s.push('\n');
        }
        s
    }

    /// Rewrite the whole file atomically.
    pub fn write(&self, path: &Path) -> Result<()> {
        cmr_data::write_atomic(path, self.to_csv().as_bytes())?;
        Ok(())
    }

    /// Read a log written by [`MetricsLog::write`]; a missing file is empty.
    pub fn read(path: &Path) -> Result<Self> {
        if !path.exists() {
            return Ok(Self::default());
        }
        let text = std::fs::read_to_string(path).map_err(|e| TrainError::io(path, e))?;
        let mut records = Vec::new();
        for (i, line) in text.lines().enumerate().skip(1) {
            if line.trim().is_empty() {
                continue;
            }
            let r = EpochRecord::parse(line).ok_or_else(|| TrainError::ConfigFile {
                path: path.to_path_buf(),
                message: format!("line {}: not a metrics row", i + 1),
            })?;
            records.push(r);
        }
        Ok(Self { records })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn csv_round_trip() {
        let log = MetricsLog {
            records: vec![
                EpochRecord {
                    epoch: 1,
                    lr: 1e-3,
                    train_loss: 0.5,
                    val_loss: Some(0.4),
                    val_dice: Some([0.7, 0.8, 0.9]),
                    val_mean_dice: Some(0.8),
                    seconds: 12.5,
                },
                EpochRecord {
                    epoch: 2,
                    lr: 5e-4,
                    train_loss: 0.25,
                    val_loss: None,
                    val_dice: None,
                    val_mean_dice: None,
                    seconds: 11.0,
                },
            ],
        };
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("m.csv");
        log.write(&p).unwrap();
        let text = std::fs::read_to_string(&p).unwrap();
        assert!(text.starts_with(CSV_HEADER));
        assert!(text.contains("\n2,0.0005,0.25,,,,,,11.000\n"), "{text}");
        assert_eq!(MetricsLog::read(&p).unwrap().records, log.records);
    }
}
