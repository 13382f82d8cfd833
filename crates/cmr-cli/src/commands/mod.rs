//! One module per subcommand.

pub mod deform;
pub mod eval;
pub mod eval_volumes;
pub mod info;
pub mod measure;
pub mod predict;
pub mod submit;
pub mod train;

use std::path::{Path, PathBuf};

use anyhow::Context;
use candle_core::Device;
use cmr_loss::PostProcess;
use cmr_models::KernelConfig;
use cmr_models::backend::{MatrixUnit, Precision};
use cmr_train::{CvDir, DeviceSpec, PredictOptions, Predictor, Tta, device_name, ensemble_members};

use crate::args::{DeviceArg, InferenceArgs, PrecisionChoice, TtaChoice};

/// Open the device of `--device` (or `fallback`), saying which.
pub fn open_device(arg: &DeviceArg, fallback: DeviceSpec) -> anyhow::Result<Device> {
    let spec = arg.device.unwrap_or(fallback);
    let device = spec.open().with_context(|| format!("opening device {spec}"))?;
    tracing::debug!("running on {}", device_name(&device));
    Ok(device)
}

/// The inference options of `args`. `--clean` applies `recorded` (the
/// clean-up a cross-validation decided for its model) where there is one, the
/// largest component of every class otherwise.
pub fn predict_options(args: &InferenceArgs, recorded: Option<PostProcess>) -> anyhow::Result<PredictOptions> {
    Ok(PredictOptions {
        tta: match args.tta {
            None | Some(TtaChoice::None) => Tta::None,
            Some(TtaChoice::Flips) => Tta::Flips,
            Some(TtaChoice::All) => Tta::Dihedral,
        },
        clean: if args.clean {
            recorded.unwrap_or(PostProcess::LARGEST)
        } else {
            PostProcess::NONE
        },
        batch_size: args.batch_size.max(1),
        kernels: KernelConfig {
            precision: precision(args.precision),
            ..crate::env::kernels(KernelConfig::default())?.unwrap_or_default()
        },
    })
}

/// The precision `--precision` asks for on this CPU, said once. `auto` is
/// bf16 on AMX only: AVX512-BF16's dot products were measured slower than
/// the f32 kernels (BENCHMARKS.md), so they run only when asked for.
pub fn precision(choice: PrecisionChoice) -> Precision {
    let unit = cmr_models::backend::matrix_unit();
    let chosen = match choice {
        PrecisionChoice::Auto if unit == MatrixUnit::Amx => Precision::Bf16,
        PrecisionChoice::Auto | PrecisionChoice::F32 => Precision::F32,
        PrecisionChoice::Bf16 => Precision::Bf16,
    };
    match (chosen, unit) {
        (Precision::Bf16, MatrixUnit::Amx) => {
            tracing::info!("precision: bf16 products on the AMX-BF16 tiles, f32 sums (--precision f32 for f32)")
        }
        (Precision::Bf16, MatrixUnit::Avx512Bf16) => tracing::warn!(
            "precision: bf16 products on AVX512-BF16 dot products, f32 sums: this CPU has no AMX, and the dot \
             products are slower than f32 (--precision f32 or auto for f32)"
        ),
        (Precision::Bf16, MatrixUnit::None) => tracing::warn!(
            "--precision bf16: this CPU has {unit} (or Linux did not grant its tiles): the convolutions run in f32"
        ),
        (Precision::F32, _) => tracing::info!("precision: f32 (this CPU has {unit})"),
    }
    chosen
}

/// The models `--model` names: each comma-separated entry resolved (a
/// shipped name, a path), a cross-validation folder expanded to its folds.
pub fn model_members(model: &str) -> anyhow::Result<Vec<PathBuf>> {
    let mut members = Vec::new();
    for name in model.split(',').map(str::trim) {
        let path = crate::models::resolve(name)?;
        members.extend(ensemble_members(&path).with_context(|| format!("reading {}", path.display()))?);
    }
    Ok(members)
}

/// The clean-up recorded for `--model` when it names one cross-validation
/// folder that has decided one (`cmr eval --decide-clean`).
pub fn recorded_clean(model: &str) -> anyhow::Result<Option<PostProcess>> {
    if model.contains(',') {
        return Ok(None);
    }
    let path = crate::models::resolve(model.trim())?;
    if !CvDir::is_cv(&path) {
        return Ok(None);
    }
    let (cv, _) = CvDir::open(&path)?;
    Ok(cv.read_clean()?.map(|d| d.chosen))
}

/// The recorded split of the run a member path (run folder or weights file)
/// belongs to, if it has one.
pub fn member_split(member: &Path) -> anyhow::Result<Option<cmr_data::SplitRecord>> {
    let run = if member.is_dir() {
        member
    } else {
        member.parent().unwrap_or(Path::new("."))
    };
    Ok(cmr_data::SplitRecord::read(&run.join(cmr_train::RunDir::SPLITS))?)
}

/// Load `--model` for inference with the options of `args`: one model, or an
/// ensemble of every model a comma-separated list names (a cross-validation
/// folder stands for its fold models).
pub fn load_predictor(model: &str, args: &InferenceArgs) -> anyhow::Result<Predictor> {
    load_members(&model_members(model)?, model, args)
}

/// Load the models `members` (what `model` named) as one predictor.
pub fn load_members(members: &[PathBuf], model: &str, args: &InferenceArgs) -> anyhow::Result<Predictor> {
    let device = open_device(&args.device, DeviceSpec::Auto)?;
    let options = predict_options(args, recorded_clean(model)?)?;
    let predictor =
        Predictor::load_ensemble(members, &device, options).with_context(|| format!("loading model {model}"))?;
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
    if !options.clean.is_none() {
        tracing::info!("clean-up: {}", options.clean);
    }
    Ok(predictor)
}
