//! One module per subcommand.

pub mod deform;
pub mod eval;
pub mod info;
pub mod predict;
pub mod submit;
pub mod train;

use anyhow::Context;
use candle_core::Device;
use cmr_train::{DeviceSpec, PredictOptions, Predictor, Tta, device_name, ensemble_members};

use crate::args::{DeviceArg, InferenceArgs, TtaChoice};

/// Open the device of `--device` (or `fallback`), saying which.
pub fn open_device(arg: &DeviceArg, fallback: DeviceSpec) -> anyhow::Result<Device> {
    let spec = arg.device.unwrap_or(fallback);
    let device = spec.open().with_context(|| format!("opening device {spec}"))?;
    tracing::debug!("running on {}", device_name(&device));
    Ok(device)
}

/// The inference options of `args`.
pub fn predict_options(args: &InferenceArgs) -> PredictOptions {
    PredictOptions {
        tta: match args.tta {
            None | Some(TtaChoice::None) => Tta::None,
            Some(TtaChoice::Flips) => Tta::Flips,
            Some(TtaChoice::All) => Tta::Dihedral,
        },
        clean: args.clean,
        batch_size: args.batch_size.max(1),
    }
}

/// Load `--model` for inference with the options of `args`: one model, or an
/// ensemble of every model a comma-separated list names (a cross-validation
/// folder stands for its fold models).
pub fn load_predictor(model: &str, args: &InferenceArgs) -> anyhow::Result<Predictor> {
    let mut members = Vec::new();
    for name in model.split(',').map(str::trim) {
        let path = crate::models::resolve(name)?;
        members.extend(ensemble_members(&path).with_context(|| format!("reading {}", path.display()))?);
    }
    let device = open_device(&args.device, DeviceSpec::Auto)?;
    let options = predict_options(args);
    let predictor =
        Predictor::load_ensemble(&members, &device, options).with_context(|| format!("loading model {model}"))?;
    let arch = predictor.config().model.architecture().display_name();
    if members.len() == 1 {
        tracing::info!(
            "model {} ({arch}, {} px)",
            members[0].display(),
            predictor.config().data.size
        );
    } else {
        tracing::info!(
            "ensemble of {} models from {model} ({arch} first, {} px)",
            members.len(),
            predictor.config().data.size
        );
    }
    if options.tta.is_active() {
        tracing::info!("test-time augmentation: {}", options.tta);
    }
    Ok(predictor)
}
