//! Inference: probabilities (optionally averaged over flips), label masks
//! (optionally cleaned to the largest component per class), evaluation.

use std::path::{Path, PathBuf};

use candle_core::{DType, Device, ModuleT, Tensor};
use candle_nn::{VarMap, ops::softmax};
use cmr_data::{BatchPlan, Mask, Plane, Sample};
use cmr_loss::{LabelMap, Loss, MetricsAccumulator, keep_largest_components};
use cmr_models::{Model, build};

use crate::checkpoint::load_varmap;
use crate::config::TrainConfig;
use crate::error::{Result, TrainError};
use crate::init::seeded_var_builder;
use crate::run::RunDir;

/// Inference options.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PredictOptions {
    /// Average the softmax over the four flips (none, left-right, up-down,
    /// both).
    pub tta: bool,
    /// Keep only the largest 8-connected component of each class.
    pub clean: bool,
    pub batch_size: usize,
}

impl Default for PredictOptions {
    fn default() -> Self {
        Self {
            tta: false,
            clean: false,
            batch_size: 8,
        }
    }
}

/// Where a model's weights and configuration are: `path` is a run folder
/// (its `model.safetensors` and `config.json`) or a `.safetensors` file with a
/// `config.json` beside it.
pub fn resolve_model(path: &Path) -> Result<(PathBuf, PathBuf)> {
    let (weights, config) = if path.is_dir() {
        (path.join(RunDir::BEST), path.join(RunDir::CONFIG))
    } else {
        let dir = path.parent().unwrap_or(Path::new("."));
        (path.to_path_buf(), dir.join(RunDir::CONFIG))
    };
    if !weights.is_file() {
        return Err(TrainError::Run {
            path: path.to_path_buf(),
            message: format!("no model weights at {}", weights.display()),
        });
    }
    if !config.is_file() {
        return Err(TrainError::Run {
            path: path.to_path_buf(),
            message: format!(
                "no {} beside the weights (expected {})",
                RunDir::CONFIG,
                config.display()
            ),
        });
    }
    Ok((weights, config))
}

/// A trained network ready for inference.
#[derive(Clone, Debug)]
pub struct Predictor {
    model: Model,
    config: TrainConfig,
    device: Device,
    options: PredictOptions,
}

impl Predictor {
    pub fn new(model: Model, config: TrainConfig, device: Device, options: PredictOptions) -> Self {
        Self {
            model,
            config,
            device,
            options,
        }
    }

    /// Load the model at `path` (see [`resolve_model`]) onto `device`.
    pub fn load(path: &Path, device: &Device, options: PredictOptions) -> Result<Self> {
        let (weights, config_path) = resolve_model(path)?;
        let config = TrainConfig::read_json(&config_path)?;
        config.model.validate()?;
        let varmap = VarMap::new();
        let model = build(&config.model, seeded_var_builder(&varmap, 0, DType::F32, device))?;
        load_varmap(&weights, &varmap)?;
        Ok(Self::new(model, config, device.clone(), options))
    }

    pub fn config(&self) -> &TrainConfig {
        &self.config
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    fn plan(&self) -> BatchPlan {
        BatchPlan::eval(self.options.batch_size.max(1), self.config.data.normalization)
    }

    /// Class probabilities `[B, C, H, W]` of normalised images `[B, 1, H, W]`;
    /// with TTA the mean over the four flips, each flipped back.
    pub fn probabilities(&self, images: &Tensor) -> Result<Tensor> {
        let forward = |x: &Tensor| -> Result<Tensor> { Ok(softmax(&self.model.forward_t(x, false)?, 1)?) };
        if !self.options.tta {
            return forward(images);
        }
        let mut sum = forward(images)?;
        for dims in [&[3usize][..], &[2], &[2, 3]] {
            sum = (sum + forward(&images.flip(dims)?)?.flip(dims)?)?;
        }
        Ok((sum / 4.0)?)
    }

    /// Label masks from probabilities, cleaned if asked.
    fn masks_of(&self, probs: &Tensor) -> Result<Vec<Mask>> {
        let (b, _, h, w) = probs.dims4()?;
        let labels = probs.argmax(1)?.to_dtype(DType::U8)?.to_device(&Device::Cpu)?;
        let flat = labels.flatten_all()?.to_vec1::<u8>()?;
        let mut out = Vec::with_capacity(b);
        for chunk in flat.chunks(h * w) {
            let mut data = chunk.to_vec();
            if self.options.clean {
                keep_largest_components(&mut data, h, w, &[1, 2, 3]);
            }
            out.push(Plane::from_vec(h, w, data).expect("argmax has h × w labels"));
        }
        Ok(out)
    }

    /// Predict `samples`, giving masks at the input size (map them back with
    /// `Plane::unfit(sample.original)`). `progress` is called after each
    /// batch with the number of images done.
    pub fn predict(&self, samples: &[Sample], mut progress: impl FnMut(usize)) -> Result<Vec<Mask>> {
        let plan = self.plan();
        let mut out = Vec::with_capacity(samples.len());
        for batch in plan.batches(samples, 0, &self.device)? {
            let batch = batch?;
            out.extend(self.masks_of(&self.probabilities(&batch.images)?)?);
            progress(out.len());
        }
        Ok(out)
    }

    /// Metrics of the predictions of labelled `samples` and, when `loss` is
    /// given (and TTA is off), the mean batch loss.
    pub fn evaluate(&self, samples: &[Sample], loss: Option<&Loss>) -> Result<Evaluation> {
        let plan = self.plan();
        let mut acc = MetricsAccumulator::new();
        let (mut loss_sum, mut batches) = (0.0, 0usize);
        // the evaluation plan keeps the sample order
        let mut next = 0;
        for batch in plan.batches(samples, 0, &self.device)? {
            let batch = batch?;
            let masks = batch.masks()?;
            let probs = match loss {
                Some(loss) if !self.options.tta => {
                    let logits = self.model.forward_t(&batch.images, false)?;
                    loss_sum += f64::from(loss.compute(&logits, masks)?.to_dtype(DType::F32)?.to_scalar::<f32>()?);
                    batches += 1;
                    softmax(&logits, 1)?
                }
                _ => self.probabilities(&batch.images)?,
            };
            let preds = self.masks_of(&probs)?;
            for (pred, id) in preds.iter().zip(&batch.ids) {
                let sample = &samples[next];
                next += 1;
                let gt = sample.mask.as_ref().ok_or_else(|| TrainError::Run {
                    path: sample.path.clone(),
                    message: "cannot evaluate an image without its mask".into(),
                })?;
                acc.add(
                    id,
                    LabelMap::new(pred.data(), pred.height(), pred.width())?,
                    LabelMap::new(gt.data(), gt.height(), gt.width())?,
                )?;
            }
        }
        Ok(Evaluation {
            loss: (batches > 0).then(|| loss_sum / batches as f64),
            metrics: acc,
        })
    }
}

/// What [`Predictor::evaluate`] found.
#[derive(Clone, Debug)]
pub struct Evaluation {
    pub metrics: MetricsAccumulator,
    pub loss: Option<f64>,
}
