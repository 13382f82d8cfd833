//! Safetensors checkpoints, written atomically, read with errors that name
//! the file.

use std::collections::HashMap;
use std::path::Path;

use candle_core::{Device, Tensor};
use candle_nn::VarMap;

use crate::error::{Result, TrainError};

/// The metadata key holding the optimiser step a checkpoint was saved after.
const STEPS_KEY: &str = "cmr.optimizer_steps";

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

/// Read every tensor of a safetensors file onto `device`, and the optimiser
/// step count it was saved with, if any. A missing, truncated or corrupt file
/// is an error naming it.
pub fn load_tensors(path: &Path, device: &Device) -> Result<(HashMap<String, Tensor>, Option<u64>)> {
    let bytes = std::fs::read(path).map_err(|e| TrainError::io(path, e))?;
    let bad =
        |e: &dyn std::fmt::Display| TrainError::checkpoint(path, format!("not a readable safetensors file ({e})"));
    let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes).map_err(|e| bad(&e))?;
    let steps = meta
        .metadata()
        .as_ref()
        .and_then(|m| m.get(STEPS_KEY))
        .and_then(|s| s.parse().ok());
    let tensors = candle_core::safetensors::load_buffer(&bytes, device).map_err(|e| bad(&e))?;
    Ok((tensors, steps))
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
    let data = varmap.data().lock().expect("var map lock");
    let device = data.values().next().map(|v| v.device().clone()).unwrap_or(Device::Cpu);
    let (tensors, steps) = load_tensors(path, &device)?;
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
        var.set(&t.to_dtype(var.dtype())?)?;
    }
    Ok(steps)
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

        // truncated
        let bytes = std::fs::read(&path).unwrap();
        std::fs::write(&path, &bytes[..bytes.len() - 5]).unwrap();
        let err = load_varmap(&path, &vm2).unwrap_err().to_string();
        assert!(err.contains("w.safetensors") && err.contains("safetensors"), "{err}");
    }
}
