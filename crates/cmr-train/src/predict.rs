//! Inference: probabilities (averaged over an ensemble's members and over the
//! views of test-time augmentation), label masks (optionally cleaned to the
//! largest component per class), evaluation.

use std::path::{Path, PathBuf};

use candle_core::{DType, Device, ModuleT, Tensor};
use candle_nn::{VarMap, ops::softmax};
use cmr_data::{BatchPlan, Mask, Plane, Sample};
use cmr_loss::{LabelMap, Loss, MetricsAccumulator, PostProcess};
use cmr_models::{KernelConfig, Model, build};
use serde::{Deserialize, Serialize};

use crate::checkpoint::load_varmap;
use crate::config::TrainConfig;
use crate::error::{Result, TrainError};
use crate::init::seeded_var_builder;
use crate::run::RunDir;

/// Test-time augmentation: the views of an image whose softmax outputs are
/// averaged, each mapped back to the image's own frame first.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Tta {
    /// The image as it is.
    #[default]
    None,
    /// The four flips: none, left-right, up-down, both.
    Flips,
    /// The eight symmetries of the square: the four flips, each with and
    /// without a transpose (every rotation by a multiple of 90° and every
    /// mirror). Needs square inputs, which fitted images are.
    Dihedral,
}

/// One view: transpose, then mirror left-right, then up-down.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct View {
    transpose: bool,
    hflip: bool,
    vflip: bool,
}

impl View {
    /// `[B, C, H, W]` → the view.
    fn forward(self, x: &Tensor) -> Result<Tensor> {
        // flips take contiguous tensors: transpose into a copy first
        let mut y = if self.transpose {
            x.transpose(2, 3)?.contiguous()?
        } else {
            x.clone()
        };
        if self.hflip {
            y = y.flip(&[3])?;
        }
        if self.vflip {
            y = y.flip(&[2])?;
        }
        Ok(y.contiguous()?)
    }

    /// The view's output → the image's frame (the inverse of `forward`).
    fn back(self, y: &Tensor) -> Result<Tensor> {
        let mut x = y.clone();
        if self.vflip {
            x = x.flip(&[2])?;
        }
        if self.hflip {
            x = x.flip(&[3])?;
        }
        if self.transpose {
            x = x.transpose(2, 3)?;
        }
        Ok(x.contiguous()?)
    }
}

impl Tta {
    fn views(self) -> Vec<View> {
        let transposes: &[bool] = match self {
            Self::None => {
                return vec![View {
                    transpose: false,
                    hflip: false,
                    vflip: false,
                }];
            }
            Self::Flips => &[false],
            Self::Dihedral => &[false, true],
        };
        let mut out = Vec::new();
        for &transpose in transposes {
            for (hflip, vflip) in [(false, false), (true, false), (false, true), (true, true)] {
                out.push(View {
                    transpose,
                    hflip,
                    vflip,
                });
            }
        }
        out
    }

    /// How many forward passes per image and member.
    pub fn num_views(self) -> usize {
        self.views().len()
    }

    pub fn is_active(self) -> bool {
        self != Self::None
    }
}

impl std::fmt::Display for Tta {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::None => "none",
            Self::Flips => "flips (4 views)",
            Self::Dihedral => "flips and rotations (8 views)",
        })
    }
}

/// Inference options.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PredictOptions {
    /// Test-time augmentation.
    pub tta: Tta,
    /// Clean-up of each class's connected components
    /// ([`PostProcess::LARGEST`] keeps the largest of each).
    pub clean: PostProcess,
    pub batch_size: usize,
    /// Which CPU kernels run the networks.
    pub kernels: KernelConfig,
}

impl Default for PredictOptions {
    fn default() -> Self {
        Self {
            tta: Tta::None,
            clean: PostProcess::NONE,
            batch_size: 8,
            kernels: KernelConfig::default(),
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

/// A trained network, or an ensemble of them, ready for inference.
///
/// An ensemble's prediction is the mean of its members' softmax outputs (each
/// already averaged over the TTA views); the members must agree on the input
/// size, normalisation and classes, and may differ in architecture.
#[derive(Clone, Debug)]
pub struct Predictor {
    members: Vec<Model>,
    /// The first member's configuration (input size and normalisation, which
    /// every member shares).
    config: TrainConfig,
    device: Device,
    options: PredictOptions,
}

/// Read one model's configuration and weights.
fn load_member(path: &Path, device: &Device, kernels: &KernelConfig) -> Result<(Model, TrainConfig)> {
    let (weights, config_path) = resolve_model(path)?;
    let config = TrainConfig::read_json(&config_path)?;
    config.model.validate()?;
    let varmap = VarMap::new();
    let model = build(
        &config.model,
        kernels,
        seeded_var_builder(&varmap, 0, DType::F32, device),
    )?;
    load_varmap(&weights, &varmap)?;
    Ok((model, config))
}

impl Predictor {
    pub fn new(model: Model, config: TrainConfig, device: Device, options: PredictOptions) -> Self {
        Self {
            members: vec![model],
            config,
            device,
            options,
        }
    }

    /// An ensemble of `members` sharing `config`'s input size and
    /// normalisation. Panics on an empty list (a programming error).
    pub fn from_members(members: Vec<Model>, config: TrainConfig, device: Device, options: PredictOptions) -> Self {
        assert!(!members.is_empty(), "an ensemble needs at least one member");
        Self {
            members,
            config,
            device,
            options,
        }
    }

    /// Load the model at `path` (see [`resolve_model`]) onto `device`.
    pub fn load(path: &Path, device: &Device, options: PredictOptions) -> Result<Self> {
        Self::load_ensemble(&[path.to_path_buf()], device, options)
    }

    /// Load an ensemble of the models at `paths` (each as [`resolve_model`]
    /// takes it). Members that disagree on input size, normalisation or
    /// number of classes are refused, naming the first that does.
    pub fn load_ensemble(paths: &[PathBuf], device: &Device, options: PredictOptions) -> Result<Self> {
        let Some((first, rest)) = paths.split_first() else {
            return Err(TrainError::Config("an ensemble needs at least one model".into()));
        };
        let (model, config) = load_member(first, device, &options.kernels)?;
        let mut members = vec![model];
        for path in rest {
            let (model, other) = load_member(path, device, &options.kernels)?;
            let key = |c: &TrainConfig| (c.data.size, c.data.normalization, c.model.num_classes());
            if key(&other) != key(&config) {
                return Err(TrainError::Run {
                    path: path.clone(),
                    message: format!(
                        "cannot join an ensemble with {}: input size, normalisation or classes differ ({:?} against {:?})",
                        first.display(),
                        key(&other),
                        key(&config)
                    ),
                });
            }
            members.push(model);
        }
        Ok(Self {
            members,
            config,
            device: device.clone(),
            options,
        })
    }

    pub fn options(&self) -> &PredictOptions {
        &self.options
    }

    /// The models averaged.
    pub fn members(&self) -> &[Model] {
        &self.members
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

    /// Class probabilities `[B, C, H, W]` of normalised images `[B, 1, H, W]`:
    /// the mean over members and TTA views of the softmax, each view mapped
    /// back to the image's frame.
    pub fn probabilities(&self, images: &Tensor) -> Result<Tensor> {
        let views = self.options.tta.views();
        let mut sum: Option<Tensor> = None;
        for model in &self.members {
            for &view in &views {
                let p = view.back(&softmax(&model.forward_t(&view.forward(images)?, false)?, 1)?)?;
                sum = Some(match sum {
                    Some(s) => (s + p)?,
                    None => p,
                });
            }
        }
        let sum = sum.expect("an ensemble has at least one member and one view");
        let n = (self.members.len() * views.len()) as f64;
        if n == 1.0 { Ok(sum) } else { Ok((sum / n)?) }
    }

    /// Label masks from probabilities, cleaned if asked.
    fn masks_of(&self, probs: &Tensor) -> Result<Vec<Mask>> {
        let (b, _, h, w) = probs.dims4()?;
        let labels = probs.argmax(1)?.to_dtype(DType::U8)?.to_device(&Device::Cpu)?;
        let flat = labels.flatten_all()?.to_vec1::<u8>()?;
        let mut out = Vec::with_capacity(b);
        for chunk in flat.chunks(h * w) {
            let mut data = chunk.to_vec();
            self.options.clean.apply(&mut data, h, w);
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

    /// [`Predictor::predict`], with each image's class probabilities (the
    /// softmax averaged over members and TTA views, before any clean-up):
    /// `[classes, h, w]` flat, at the network's input size.
    pub fn predict_probabilities(
        &self,
        samples: &[Sample],
        mut progress: impl FnMut(usize),
    ) -> Result<Vec<(Mask, Vec<f32>)>> {
        let plan = self.plan();
        let mut out = Vec::with_capacity(samples.len());
        for batch in plan.batches(samples, 0, &self.device)? {
            let batch = batch?;
            let probs = self.probabilities(&batch.images)?;
            let masks = self.masks_of(&probs)?;
            let flat = probs
                .to_dtype(DType::F32)?
                .to_device(&Device::Cpu)?
                .flatten_all()?
                .to_vec1::<f32>()?;
            let per = flat.len() / masks.len().max(1);
            out.extend(masks.into_iter().zip(flat.chunks(per).map(<[f32]>::to_vec)));
            progress(out.len());
        }
        Ok(out)
    }

    /// Metrics of the predictions of labelled `samples` and, when `loss` is
    /// given (for a single model without TTA), the mean batch loss.
    pub fn evaluate(&self, samples: &[Sample], loss: Option<&Loss>) -> Result<Evaluation> {
        let plan = self.plan();
        let mut acc = MetricsAccumulator::new();
        let mut predicted = Vec::with_capacity(samples.len());
        let (mut loss_sum, mut batches) = (0.0, 0usize);
        // the evaluation plan keeps the sample order
        let mut next = 0;
        for batch in plan.batches(samples, 0, &self.device)? {
            let batch = batch?;
            let masks = batch.masks()?;
            let probs = match loss {
                Some(loss) if !self.options.tta.is_active() && self.members.len() == 1 => {
                    let logits = self.members[0].forward_t(&batch.images, false)?;
                    loss_sum += f64::from(
                        loss.compute(&logits, masks, &self.options.kernels)?
                            .to_dtype(DType::F32)?
                            .to_scalar::<f32>()?,
                    );
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
            predicted.extend(preds);
        }
        Ok(Evaluation {
            loss: (batches > 0).then(|| loss_sum / batches as f64),
            metrics: acc,
            masks: predicted,
        })
    }
}

/// What [`Predictor::evaluate`] found.
#[derive(Clone, Debug)]
pub struct Evaluation {
    pub metrics: MetricsAccumulator,
    pub loss: Option<f64>,
    /// The predicted masks, in the samples' order, at the network's size.
    pub masks: Vec<Mask>,
}
