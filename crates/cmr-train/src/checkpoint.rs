//! Safetensors checkpoints, written atomically, read with errors that name
//! the file.

use std::collections::HashMap;
use std::path::Path;

use candle_core::{Device, Tensor};
use candle_nn::VarMap;

use crate::error::{Result, TrainError};

/// The metadata key holding the optimiser step a checkpoint was saved after.
const STEPS_KEY: &str = "cmr.optimizer_steps";
/// The metadata key of a training checkpoint's progress (`TrainState` JSON).
const STATE_KEY: &str = "cmr.state";
/// Name prefixes of a training checkpoint's tensor sets.
const WEIGHTS_PREFIX: &str = "weights/";
const OPTIMIZER_PREFIX: &str = "optimizer/";
const EMA_PREFIX: &str = "ema/";
/// The largest safetensors header read (the format's own bound is 100 MB).
const MAX_HEADER: u64 = 100_000_000;

/// Write `tensors` to `path` as safetensors, atomically (temp file + rename),
/// recording the optimiser step count when given.
pub fn save_tensors(path: &Path, tensors: &HashMap<String, Tensor>, steps: Option<u64>) -> Result<()> {
    let mut sorted: Vec<(&String, &Tensor)> = tensors.iter().collect();
    sorted.sort_by(|a, b| a.0.cmp(b.0));
    let metadata = steps.map(|s| HashMap::from([(STEPS_KEY.to_string(), s.to_string())]));
    let bytes = safetensors::tensor::serialize(sorted, metadata).map_err(|e| TrainError::checkpoint(path, e))?;
    cmr_data::write_atomic(path, &bytes)?;
    Ok(())
}

/// A training checkpoint: everything one optimiser step left, in one file, so
/// that it is replaced by a single atomic rename (never half from one step
/// and half from another).
#[derive(Debug)]
pub struct Checkpoint {
    /// The network's variables (weights and BatchNorm statistics).
    pub weights: HashMap<String, Tensor>,
    /// The optimiser's state tensors.
    pub optimizer: HashMap<String, Tensor>,
    /// The moving average of the weights (empty without `ema`).
    pub ema: HashMap<String, Tensor>,
    /// Optimiser steps taken.
    pub steps: u64,
    /// The run's progress as JSON (`TrainState`).
    pub state: String,
}

impl Checkpoint {
    /// Write the checkpoint to `path` atomically.
    pub fn save(&self, path: &Path) -> Result<()> {
        let mut all: HashMap<String, Tensor> = HashMap::new();
        for (prefix, set) in [
            (WEIGHTS_PREFIX, &self.weights),
            (OPTIMIZER_PREFIX, &self.optimizer),
            (EMA_PREFIX, &self.ema),
        ] {
            for (k, v) in set {
                all.insert(format!("{prefix}{k}"), v.clone());
            }
        }
        let mut sorted: Vec<(&String, &Tensor)> = all.iter().collect();
        sorted.sort_by(|a, b| a.0.cmp(b.0));
        let metadata = HashMap::from([
            (STEPS_KEY.to_string(), self.steps.to_string()),
            (STATE_KEY.to_string(), self.state.clone()),
        ]);
        let bytes =
            safetensors::tensor::serialize(sorted, Some(metadata)).map_err(|e| TrainError::checkpoint(path, e))?;
        cmr_data::write_atomic(path, &bytes)?;
        Ok(())
    }

    /// Read the checkpoint at `path` onto `device`: a truncated or corrupt
    /// file, or one that is not a training checkpoint, is an error naming it.
    pub fn load(path: &Path, device: &Device) -> Result<Self> {
        let (tensors, meta) = load_with_metadata(path, device)?;
        let steps = meta
            .get(STEPS_KEY)
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| TrainError::checkpoint(path, "not a training checkpoint (no step count)"))?;
        let state = meta
            .get(STATE_KEY)
            .cloned()
            .ok_or_else(|| TrainError::checkpoint(path, "not a training checkpoint (no progress record)"))?;
        let mut weights = HashMap::new();
        let mut optimizer = HashMap::new();
        let mut ema = HashMap::new();
        for (k, v) in tensors {
            if let Some(name) = k.strip_prefix(WEIGHTS_PREFIX) {
                weights.insert(name.to_string(), v);
            } else if let Some(name) = k.strip_prefix(OPTIMIZER_PREFIX) {
                optimizer.insert(name.to_string(), v);
            } else if let Some(name) = k.strip_prefix(EMA_PREFIX) {
                ema.insert(name.to_string(), v);
            } else {
                return Err(TrainError::checkpoint(path, format!("unexpected tensor {k:?}")));
            }
        }
        Ok(Self {
            weights,
            optimizer,
            ema,
            steps,
            state,
        })
    }

    /// The progress record of the checkpoint at `path`, read from its header
    /// alone (the tensors are not read).
    pub fn read_state(path: &Path) -> Result<String> {
        let meta = read_header_metadata(path)?;
        meta.get(STATE_KEY)
            .cloned()
            .ok_or_else(|| TrainError::checkpoint(path, "not a training checkpoint (no progress record)"))
    }
}

/// The `__metadata__` of the safetensors file at `path`, from its header.
fn read_header_metadata(path: &Path) -> Result<HashMap<String, String>> {
    use std::io::Read;
    let bad = |m: String| TrainError::checkpoint(path, format!("not a readable safetensors file ({m})"));
    let mut file = std::fs::File::open(path).map_err(|e| TrainError::io(path, e))?;
    let mut len = [0u8; 8];
    file.read_exact(&mut len).map_err(|e| bad(format!("header: {e}")))?;
    let n = u64::from_le_bytes(len);
    if n > MAX_HEADER {
        return Err(bad(format!("header of {n} bytes claimed")));
    }
    let mut header = vec![0u8; n as usize];
    file.read_exact(&mut header).map_err(|e| bad(format!("header: {e}")))?;
    let value: serde_json::Value = serde_json::from_slice(&header).map_err(|e| bad(format!("header: {e}")))?;
    let mut out = HashMap::new();
    if let Some(meta) = value.get("__metadata__").and_then(|m| m.as_object()) {
        for (k, v) in meta {
            let Some(v) = v.as_str() else {
                return Err(bad(format!("metadata {k:?} is not a string")));
            };
            out.insert(k.clone(), v.to_string());
        }
    }
    Ok(out)
}

/// Every tensor of a safetensors file and its metadata.
fn load_with_metadata(path: &Path, device: &Device) -> Result<(HashMap<String, Tensor>, HashMap<String, String>)> {
    let bytes = std::fs::read(path).map_err(|e| TrainError::io(path, e))?;
    let bad =
        |e: &dyn std::fmt::Display| TrainError::checkpoint(path, format!("not a readable safetensors file ({e})"));
    let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes).map_err(|e| bad(&e))?;
    let meta = meta.metadata().clone().unwrap_or_default();
    let tensors = candle_core::safetensors::load_buffer(&bytes, device).map_err(|e| bad(&e))?;
    Ok((tensors, meta))
}

/// Read every tensor of a safetensors file onto `device`, and the optimiser
/// step count it was saved with, if any. A missing, truncated or corrupt file
/// is an error naming it.
pub fn load_tensors(path: &Path, device: &Device) -> Result<(HashMap<String, Tensor>, Option<u64>)> {
    let (tensors, meta) = load_with_metadata(path, device)?;
    Ok((tensors, meta.get(STEPS_KEY).and_then(|s| s.parse().ok())))
}

/// The tensors of a `VarMap` by name (weights and BatchNorm statistics).
pub fn varmap_tensors(varmap: &VarMap) -> HashMap<String, Tensor> {
    let data = varmap.data().lock().expect("var map lock");
    data.iter().map(|(k, v)| (k.clone(), v.as_tensor().clone())).collect()
}

/// Save a `VarMap` atomically.
pub fn save_varmap(path: &Path, varmap: &VarMap) -> Result<()> {
    save_tensors(path, &varmap_tensors(varmap), None)
}

/// Set every variable of `varmap` from the checkpoint at `path`. The names and
/// shapes must match exactly: a missing or extra tensor, or one of another
/// shape, is an error naming the file and the tensor (a checkpoint of another
/// architecture or width fails here). Returns the step count saved with it.
pub fn load_varmap(path: &Path, varmap: &VarMap) -> Result<Option<u64>> {
    let device = varmap_device(varmap);
    let (tensors, steps) = load_tensors(path, &device)?;
    set_varmap(varmap, &tensors, path)?;
    Ok(steps)
}

/// The device of a `VarMap`'s variables (the CPU when it has none).
pub fn varmap_device(varmap: &VarMap) -> Device {
    let data = varmap.data().lock().expect("var map lock");
    data.values().next().map(|v| v.device().clone()).unwrap_or(Device::Cpu)
}

/// Set every variable of `varmap` from `tensors` (read from `path`), with the
/// checks of [`load_varmap`].
pub fn set_varmap(varmap: &VarMap, tensors: &HashMap<String, Tensor>, path: &Path) -> Result<()> {
    let data = varmap.data().lock().expect("var map lock");
    if let Some(extra) = tensors.keys().find(|k| !data.contains_key(*k)) {
        return Err(TrainError::checkpoint(
            path,
            format!("unexpected tensor {extra:?}: a checkpoint of another network?"),
        ));
    }
    for (name, var) in data.iter() {
        let Some(t) = tensors.get(name) else {
            return Err(TrainError::checkpoint(
                path,
                format!("tensor {name:?} is missing: a checkpoint of another network?"),
            ));
        };
        if t.dims() != var.dims() {
            return Err(TrainError::checkpoint(
                path,
                format!(
                    "tensor {name:?} has shape {:?}, the network expects {:?}",
                    t.dims(),
                    var.dims()
                ),
            ));
        }
        if !t.dtype().is_float() {
            return Err(TrainError::checkpoint(
                path,
                format!(
                    "tensor {name:?} holds {:?} values, not floating point: not a model's weights",
                    t.dtype()
                ),
            ));
        }
        let t = t.to_dtype(var.dtype())?;
        let values = t.flatten_all()?.to_dtype(candle_core::DType::F32)?.to_vec1::<f32>()?;
        if let Some(bad) = values.iter().find(|v| !v.is_finite()) {
            let count = values.iter().filter(|v| !v.is_finite()).count();
            return Err(TrainError::checkpoint(
                path,
                format!(
                    "tensor {name:?} holds {count} non-finite value{} (such as {bad}): a broken model",
                    if count == 1 { "" } else { "s" }
                ),
            ));
        }
        var.set(&t)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::DType;

    #[test]
    fn save_load_round_trip_and_errors() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("w.safetensors");
        let dev = Device::Cpu;
        let vm = VarMap::new();
        vm.get(
            (2, 3),
            "a.weight",
            candle_nn::Init::Randn { mean: 0., stdev: 1. },
            DType::F32,
            &dev,
        )
        .unwrap();
        vm.get(3, "a.bias", candle_nn::Init::Const(0.5), DType::F32, &dev)
            .unwrap();
        save_varmap(&path, &vm).unwrap();

        let vm2 = VarMap::new();
        vm2.get((2, 3), "a.weight", candle_nn::Init::Const(0.), DType::F32, &dev)
            .unwrap();
        vm2.get(3, "a.bias", candle_nn::Init::Const(0.), DType::F32, &dev)
            .unwrap();
        load_varmap(&path, &vm2).unwrap();
        let a = varmap_tensors(&vm);
        let b = varmap_tensors(&vm2);
        for k in ["a.weight", "a.bias"] {
            let d = (&a[k] - &b[k])
                .unwrap()
                .abs()
                .unwrap()
                .sum_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap();
            assert_eq!(d, 0.0);
        }

        // another shape
        let vm3 = VarMap::new();
        vm3.get((3, 3), "a.weight", candle_nn::Init::Const(0.), DType::F32, &dev)
            .unwrap();
        vm3.get(3, "a.bias", candle_nn::Init::Const(0.), DType::F32, &dev)
            .unwrap();
        let err = load_varmap(&path, &vm3).unwrap_err().to_string();
        assert!(err.contains("w.safetensors") && err.contains("a.weight"), "{err}");

        // NaN weights, integer weights
        let mut bad = varmap_tensors(&vm);
        let w = bad["a.weight"].clone();
        bad.insert("a.weight".into(), (w * f64::NAN).unwrap());
        save_tensors(&path, &bad, None).unwrap();
        let err = load_varmap(&path, &vm2).unwrap_err().to_string();
        assert!(err.contains("a.weight") && err.contains("non-finite"), "{err}");
        let mut ints = varmap_tensors(&vm);
        ints.insert("a.bias".into(), Tensor::new(&[1i64, 2, 3], &dev).unwrap());
        save_tensors(&path, &ints, None).unwrap();
        let err = load_varmap(&path, &vm2).unwrap_err().to_string();
        assert!(err.contains("a.bias") && err.contains("I64"), "{err}");
        save_varmap(&path, &vm).unwrap();

        // truncated
        let bytes = std::fs::read(&path).unwrap();
        std::fs::write(&path, &bytes[..bytes.len() - 5]).unwrap();
        let err = load_varmap(&path, &vm2).unwrap_err().to_string();
        assert!(err.contains("w.safetensors") && err.contains("safetensors"), "{err}");
    }
}
