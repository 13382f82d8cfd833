//! One module per subcommand.

pub mod eval;
pub mod info;
pub mod predict;
pub mod submit;
pub mod train;

use anyhow::Context;
use candle_core::Device;
use cmr_train::{DeviceSpec, PredictOptions, Predictor, device_name};

use crate::args::{DeviceArg, InferenceArgs};

/// Open the device of `--device` (or `fallback`), saying which.
pub fn open_device(arg: &DeviceArg, fallback: DeviceSpec) -> anyhow::Result<Device> {
    let spec = arg.device.unwrap_or(fallback);
    let device = spec.open().with_context(|| format!("opening device {spec}"))?;
    tracing::debug!("running on {}", device_name(&device));
    Ok(device)
}

/// Load `--model` for inference with the options of `args`.
pub fn load_predictor(model: &str, args: &InferenceArgs) -> anyhow::Result<Predictor> {
    let path = crate::models::resolve(model)?;
    let device = open_device(&args.device, DeviceSpec::Auto)?;
    let options = PredictOptions {
        tta: args.tta,
        clean: args.clean,
        batch_size: args.batch_size.max(1),
    };
    let predictor =
        Predictor::load(&path, &device, options).with_context(|| format!("loading model {}", path.display()))?;
    tracing::info!(
        "model {} ({}, {} px)",
        path.display(),
        predictor.config().model.architecture().display_name(),
        predictor.config().data.size
    );
    Ok(predictor)
}
