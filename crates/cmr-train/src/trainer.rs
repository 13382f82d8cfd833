//! The training loop: shuffled, augmented batches, an optimiser step per
//! batch, validation, the best model kept, checkpoints for an exact resume.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use candle_core::{DType, Device, ModuleT, Tensor};
use candle_nn::VarMap;
use cmr_data::{BatchPlan, Dataset, SplitRecord, Splits};
use cmr_kernels::forward_backward;
use cmr_models::{Model, build, is_running_stat};

use crate::checkpoint::{Checkpoint, load_tensors, load_varmap, save_varmap, set_varmap, varmap_tensors};
use crate::config::{ConfigChanges, Keep, TrainConfig};
use crate::ema::Ema;
use crate::error::{Result, TrainError};
use crate::init::seeded_var_builder;
use crate::log::{EpochRecord, MetricsLog};
use crate::optim::Optimizer;
use crate::plot::draw_curves;
use crate::predict::{PredictOptions, Predictor};
use crate::run::{Best, RunDir, TrainState};
use crate::strategy::{is_improvement, should_stop_early, validates_at};

/// Progress callbacks (the CLI draws bars with them). All default to nothing.
pub trait Observer {
    /// An epoch (1-based) of `epochs` starts with `batches` batches, of which
    /// `done` are already done (after a resume).
    fn epoch_start(&mut self, _epoch: usize, _epochs: usize, _batches: usize, _done: usize) {}
    /// A batch finished with this loss.
    fn batch_end(&mut self, _batch: usize, _loss: f64) {}
    /// An epoch finished; `improved` when it is the new best model.
    fn epoch_end(&mut self, _record: &EpochRecord, _improved: bool) {}
    /// Cross-validation: fold `fold` (0-based) of `k` starts, with
    /// `epochs_done` of its epochs already done.
    fn fold_start(&mut self, _fold: usize, _k: usize, _epochs_done: usize) {}
}

/// An observer that ignores everything.
#[derive(Debug, Default)]
pub struct Quiet;

impl Observer for Quiet {}

/// How `fit` ended.
#[derive(Clone, Debug, PartialEq)]
pub enum Outcome {
    /// All epochs ran.
    Finished { best: Option<Best> },
    /// Early stopping ended the run after `epochs` epochs.
    StoppedEarly { epochs: usize, best: Option<Best> },
    /// The stop flag was raised; the run is saved and can be resumed.
    Interrupted { epoch: usize, batches_done: usize },
}

/// Load a dataset root for `config`: its images fitted to `data.size`, the
/// validation split from `val/` or held out of `train/` by the seed.
pub fn load_splits(root: &Path, config: &TrainConfig) -> Result<Splits> {
    let dataset = Dataset::open(root, config.data.load_options())?;
    Ok(Splits::from_dataset(
        &dataset,
        config.data.val_fraction,
        config.seed,
        config.data.grouping,
    )?)
}

/// A batch loss above this means the run has diverged (cross-entropy and
/// soft Dice start near 1–2; only weights blown up by too high a rate give
/// 1e6).
const DIVERGED: f64 = 1e6;

/// A training run in progress.
#[allow(missing_debug_implementations)] // candle's VarMap has no Debug
pub struct Trainer {
    config: TrainConfig,
    run: RunDir,
    device: Device,
    varmap: VarMap,
    model: Model,
    optim: Optimizer,
    state: TrainState,
    log: MetricsLog,
    other_data: OtherData,
    /// The moving average of the weights (`ema` in the recipe).
    ema: Option<Ema>,
}

/// What `fit` does when the run's `splits.json` names other data than it is
/// given.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum OtherData {
    /// Stop with an error saying how the data differ.
    #[default]
    Refuse,
    /// Go on: record the new split, and forget the best score when the
    /// validation slices changed (it was measured on others).
    Allow,
}

/// The moving average the recipe asks for, starting at `varmap`'s weights.
fn averaged(config: &TrainConfig, varmap: &VarMap, device: &Device) -> Result<Option<Ema>> {
    config
        .ema
        .map(|e| Ema::new(e, &config.model, &config.kernels, varmap, device))
        .transpose()
}

fn trainable(varmap: &VarMap) -> BTreeMap<String, candle_core::Var> {
    let data = varmap.data().lock().expect("var map lock");
    data.iter()
        .filter(|(name, _)| !is_running_stat(name))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect()
}

/// The training loss of the network's output. With deep supervision
/// (U-Net 3+'s side outputs, `[B, classes·n, H, W]` with the main logits
/// first) the loss of each output, weighted 1, 1/2, 1/4, … from the main one
/// down and normalised to sum 1 (nnU-Net's weights); otherwise the loss of
/// the logits.
pub(crate) fn training_loss(cfg: &TrainConfig, logits: &Tensor, masks: &Tensor) -> Result<Tensor> {
    let classes = cfg.model.num_classes();
    let outputs = logits.dim(1)? / classes.max(1);
    if outputs <= 1 {
        return Ok(cfg.loss.compute(logits, masks, &cfg.kernels)?);
    }
    let weights: Vec<f64> = (0..outputs).map(|i| 0.5f64.powi(i as i32)).collect();
    let total: f64 = weights.iter().sum();
    let mut sum: Option<Tensor> = None;
    for (i, w) in weights.iter().enumerate() {
        let part = logits.narrow(1, i * classes, classes)?;
        let l = (cfg.loss.compute(&part, masks, &cfg.kernels)? * (w / total))?;
        sum = Some(match sum {
            None => l,
            Some(s) => (s + l)?,
        });
    }
    sum.ok_or_else(|| TrainError::Config("no output to compute a loss of".into()))
}

impl Trainer {
    /// Start a run in the new folder `out`: validate the configuration, write
    /// `config.json`, initialise the network from the seed.
    pub fn create(config: TrainConfig, out: &Path, device: Device) -> Result<Self> {
        config.validate()?;
        let varmap = VarMap::new();
        let model = build(
            &config.model,
            &config.kernels,
            seeded_var_builder(&varmap, config.seed, DType::F32, &device),
        )?;
        let optim = Optimizer::new(config.optim.clone(), trainable(&varmap))?;
        let ema = averaged(&config, &varmap, &device)?;
        let run = RunDir::create(out, &config)?;
        Ok(Self {
            config,
            run,
            device,
            varmap,
            model,
            optim,
            state: TrainState::default(),
            log: MetricsLog::default(),
            other_data: OtherData::Refuse,
            ema,
        })
    }

    /// Continue the run in `dir` from its last checkpoint, with the settings
    /// `changes` names changed (and recorded in its `config.json`). A run
    /// stopped before its first checkpoint starts again from its first step,
    /// as it would have run. The run's lock is taken first: a run another
    /// process is training is refused.
    pub fn resume(dir: &Path, device: Device, changes: &ConfigChanges) -> Result<Self> {
        let (mut run, mut config) = RunDir::open(dir)?;
        run.lock()?;
        changes.apply(&mut config);
        config.validate()?;
        let varmap = VarMap::new();
        let model = build(
            &config.model,
            &config.kernels,
            seeded_var_builder(&varmap, config.seed, DType::F32, &device),
        )?;
        let mut optim = Optimizer::new(config.optim.clone(), trainable(&varmap))?;
        let ema = averaged(&config, &varmap, &device)?;
        let state = if run.file(RunDir::CHECKPOINT).exists() {
            let path = run.file(RunDir::CHECKPOINT);
            let checkpoint = Checkpoint::load(&path, &device)?;
            let state = TrainState::from_json(&checkpoint.state, &path)?;
            if checkpoint.steps != state.optimizer_steps {
                return Err(TrainError::checkpoint(
                    &path,
                    format!(
                        "its tensors are of step {} but its progress record says step {}",
                        checkpoint.steps, state.optimizer_steps
                    ),
                ));
            }
            set_varmap(&varmap, &checkpoint.weights, &path)?;
            optim
                .load_state(checkpoint.optimizer, checkpoint.steps)
                .map_err(|e| TrainError::checkpoint(&path, e))?;
            match (&ema, checkpoint.ema.is_empty()) {
                (Some(e), false) => set_varmap(e.varmap(), &checkpoint.ema, &path)?,
                (None, true) => {}
                (Some(_), true) => {
                    return Err(TrainError::checkpoint(
                        &path,
                        "the recipe averages the weights (ema) but the checkpoint holds no average",
                    ));
                }
                (None, false) => {
                    return Err(TrainError::checkpoint(
                        &path,
                        "the checkpoint holds averaged weights but the recipe has no ema",
                    ));
                }
            }
            state
        } else if let Some(state) = run.read_state()? {
            // a run from before checkpoint.safetensors: three files
            let last = run.file(RunDir::LAST);
            let last_steps = load_varmap(&last, &varmap)?;
            let opt_path = run.file(RunDir::OPTIMIZER);
            let (tensors, opt_steps) = load_tensors(&opt_path, &device)?;
            for (path, steps) in [(&last, last_steps), (&opt_path, opt_steps)] {
                if steps != Some(state.optimizer_steps) {
                    let saved = steps.map_or("no step count".to_string(), |s| format!("step {s}"));
                    return Err(TrainError::checkpoint(
                        path,
                        format!(
                            "saved after {saved} but {} says step {} (interrupted while saving?)",
                            RunDir::STATE,
                            state.optimizer_steps
                        ),
                    ));
                }
            }
            optim
                .load_state(tensors, state.optimizer_steps)
                .map_err(|e| TrainError::checkpoint(&opt_path, e))?;
            if ema.is_some() {
                return Err(TrainError::checkpoint(
                    &opt_path,
                    "a run in the old three-file layout has no averaged weights, yet its recipe has ema",
                ));
            }
            state
        } else {
            tracing::info!(
                "{}: stopped before its first checkpoint: starting again from the first step",
                dir.display()
            );
            TrainState::default()
        };
        let log = MetricsLog::read(&run.file(RunDir::METRICS))?;
        let mut trainer = Self {
            config,
            run,
            device,
            varmap,
            model,
            optim,
            state,
            log,
            other_data: OtherData::Refuse,
            ema,
        };
        if trainer.log.records.len() > trainer.state.epochs_done {
            // rows of epochs the checkpoint does not have: they are trained again
            trainer.log.records.truncate(trainer.state.epochs_done);
            trainer.log.write(&trainer.run.file(RunDir::METRICS))?;
        }
        if trainer.state.finished && trainer.state.epochs_done < trainer.config.epochs && changes.epochs.is_some() {
            trainer.state.finished = false;
        }
        // the config may have changed (more epochs): keep the file true
        cmr_data::write_atomic(&trainer.run.file(RunDir::CONFIG), trainer.config.to_json().as_bytes())?;
        Ok(trainer)
    }

    pub fn config(&self) -> &TrainConfig {
        &self.config
    }

    /// Whether `fit` may continue on data other than the run recorded.
    pub fn set_other_data(&mut self, other: OtherData) {
        self.other_data = other;
    }

    /// Record the split in `splits.json` on the first call; later, compare
    /// with the record and refuse (or, if allowed, accept) other data.
    fn check_split(&mut self, splits: &Splits) -> Result<()> {
        let path = self.run.file(RunDir::SPLITS);
        let record = SplitRecord::of(splits);
        let Some(old) = SplitRecord::read(&path)? else {
            return Ok(record.write(&path)?);
        };
        let Some(diff) = old.difference(&record) else {
            return Ok(());
        };
        match self.other_data {
            OtherData::Refuse => Err(TrainError::Run {
                path: path.clone(),
                message: format!(
                    "this run trained on other data: {diff} (give the data it trained on, or allow other data)"
                ),
            }),
            OtherData::Allow => {
                tracing::warn!("{}: continuing on other data: {diff}", path.display());
                if old.val != record.val && self.state.best.take().is_some() {
                    tracing::warn!("the validation slices changed: the best score so far is forgotten");
                    self.state.validations_since_best = 0;
                }
                Ok(record.write(&path)?)
            }
        }
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    pub fn run(&self) -> &RunDir {
        &self.run
    }

    pub fn state(&self) -> &TrainState {
        &self.state
    }

    pub fn model(&self) -> &Model {
        &self.model
    }

    pub fn varmap(&self) -> &VarMap {
        &self.varmap
    }

    /// The variables that are validated and kept as the model: the moving
    /// average with `ema`, else the live ones.
    pub fn kept_varmap(&self) -> &VarMap {
        self.ema.as_ref().map_or(&self.varmap, Ema::varmap)
    }

    fn kept_model(&self) -> &Model {
        self.ema.as_ref().map_or(&self.model, Ema::model)
    }

    pub fn records(&self) -> &[EpochRecord] {
        &self.log.records
    }

    /// Save the step's checkpoint (one file, one rename), then its readable
    /// copy `state.json`; the files of an older run's checkpoint go.
    fn save_checkpoint(&self) -> Result<()> {
        let (optimizer, steps) = self.optim.state();
        Checkpoint {
            weights: varmap_tensors(&self.varmap),
            optimizer,
            ema: self.ema.as_ref().map(Ema::tensors).unwrap_or_default(),
            steps,
            state: self.state.to_json(),
        }
        .save(&self.run.file(RunDir::CHECKPOINT))?;
        self.run.write_state(&self.state)?;
        for old in [RunDir::LAST, RunDir::OPTIMIZER] {
            let path = self.run.file(old);
            if path.exists() {
                std::fs::remove_file(&path).map_err(|e| TrainError::io(&path, e))?;
            }
        }
        Ok(())
    }

    /// Train until the configured number of epochs, early stopping, or
    /// `stop` being raised (checked after every step). The first call records
    /// the split in `splits.json`; a later one (a resume) on other data is
    /// refused unless [`OtherData::Allow`] was set.
    pub fn fit(&mut self, splits: &Splits, observer: &mut dyn Observer, stop: &AtomicBool) -> Result<Outcome> {
        self.check_split(splits)?;
        let cfg = self.config.clone();
        let plan = BatchPlan {
            batch_size: cfg.batch_size,
            shuffle: true,
            augment: cfg.data.augment.is_active().then_some(cfg.data.augment),
            normalization: cfg.data.normalization,
            seed: cfg.seed,
        };
        let n_batches = plan.num_batches(splits.train.len());
        let mut warned_off_tape = false;
        while self.state.epochs_done < cfg.epochs && !self.state.finished {
            let epoch = self.state.epochs_done;
            let lr = cfg.schedule.lr(cfg.optim.lr(), epoch, cfg.epochs);
            let first = self.state.batches_done;
            observer.epoch_start(epoch + 1, cfg.epochs, n_batches, first);
            let started = Instant::now();
            for (i, batch) in plan
                .batches_from(&splits.train, epoch as u64, first, &self.device)?
                .enumerate()
            {
                let index = first + i;
                let batch = batch?;
                let masks = batch.masks()?;
                // On the CPU kernels the backward pass runs on their tape
                // (no zero tensor and addition per gradient, as candle's
                // `Tensor::backward` makes); elsewhere by candle.
                let backward = cfg.kernels.backward_for(&batch.images);
                let step = forward_backward(
                    backward,
                    || Ok::<_, TrainError>(self.model.forward_t(&batch.images, true)?),
                    |logits| training_loss(&cfg, logits, masks),
                )?;
                if step.backward != backward && !warned_off_tape {
                    warned_off_tape = true;
                    tracing::warn!(
                        "the network has an op the kernels' tape does not carry: its backward pass runs on candle's, slower"
                    );
                }
                let (loss, grads) = (step.loss, step.grads);
                let value = f64::from(loss.to_dtype(DType::F32)?.to_scalar::<f32>()?);
                // non-finite, or far past any loss a learning run has (the
                // losses start near 1–2): the run has diverged
                if !value.is_finite() || value > DIVERGED {
                    return Err(TrainError::NonFinite {
                        value,
                        epoch: epoch + 1,
                        batch: index + 1,
                    });
                }
                // A data-parallel run would all-reduce `grads` here.
                self.optim.step(&grads, lr)?;
                if let Some(ema) = &self.ema {
                    ema.update(self.optim.steps())?;
                }
                self.state.batches_done = index + 1;
                self.state.partial_loss_sum += value;
                self.state.optimizer_steps = self.optim.steps();
                observer.batch_end(index + 1, value);
                if stop.load(Ordering::SeqCst) && index + 1 < n_batches {
                    self.state.partial_seconds += started.elapsed().as_secs_f64();
                    self.save_checkpoint()?;
                    return Ok(Outcome::Interrupted {
                        epoch: epoch + 1,
                        batches_done: index + 1,
                    });
                }
            }
            let train_loss = self.state.partial_loss_sum / n_batches as f64;
            let mut record = EpochRecord {
                epoch: epoch + 1,
                lr,
                train_loss,
                val_loss: None,
                val_dice: None,
                val_mean_dice: None,
                seconds: 0.0,
            };
            let mut improved = false;
            if validates_at(epoch + 1, cfg.val_every, cfg.epochs) {
                let predictor = Predictor::new(
                    self.kept_model().clone(),
                    cfg.clone(),
                    self.device.clone(),
                    PredictOptions {
                        batch_size: cfg.batch_size.max(8),
                        kernels: cfg.kernels,
                        ..PredictOptions::default()
                    },
                );
                let eval = predictor.evaluate(&splits.val, Some(&cfg.loss))?;
                let report = eval.metrics.report();
                record.val_loss = eval.loss;
                record.val_dice = Some([report.classes[0].dice, report.classes[1].dice, report.classes[2].dice]);
                record.val_mean_dice = Some(report.mean_dice);
                let min_delta = cfg.early_stopping.as_ref().map_or(0.0, |e| e.min_delta);
                if cfg.keep == Keep::Last {
                    save_varmap(&self.run.file(RunDir::BEST), self.kept_varmap())?;
                }
                if is_improvement(
                    self.state.best.as_ref().map(|b| b.mean_dice),
                    report.mean_dice,
                    min_delta,
                ) {
                    improved = true;
                    if cfg.keep == Keep::Best {
                        save_varmap(&self.run.file(RunDir::BEST), self.kept_varmap())?;
                    }
                    self.state.best = Some(Best {
                        epoch: epoch + 1,
                        mean_dice: report.mean_dice,
                    });
                    self.state.validations_since_best = 0;
                } else {
                    self.state.validations_since_best += 1;
                }
            }
            record.seconds = self.state.partial_seconds + started.elapsed().as_secs_f64();
            self.state.epochs_done = epoch + 1;
            self.state.batches_done = 0;
            self.state.partial_loss_sum = 0.0;
            self.state.partial_seconds = 0.0;
            let stop_early = cfg
                .early_stopping
                .as_ref()
                .is_some_and(|e| should_stop_early(self.state.validations_since_best, e.patience));
            self.state.finished = self.state.epochs_done >= cfg.epochs || stop_early;
            self.log.records.push(record.clone());
            self.log.write(&self.run.file(RunDir::METRICS))?;
            if let Err(e) = draw_curves(&self.run.file(RunDir::CURVES), &self.log.records) {
                tracing::warn!("{e}");
            }
            self.save_checkpoint()?;
            observer.epoch_end(&record, improved);
            if stop_early {
                return Ok(Outcome::StoppedEarly {
                    epochs: self.state.epochs_done,
                    best: self.state.best.clone(),
                });
            }
            if stop.load(Ordering::SeqCst) && !self.state.finished {
                return Ok(Outcome::Interrupted {
                    epoch: epoch + 1,
                    batches_done: n_batches,
                });
            }
        }
        Ok(Outcome::Finished {
            best: self.state.best.clone(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;
    use cmr_models::{Architecture, KernelConfig};

    use crate::TrainPreset;

    /// Deep supervision's loss on a hand case: two outputs weigh 2/3 and
    /// 1/3; an output stacked on itself has its own loss; one output is the
    /// plain loss. Both kernel settings (fused and expression losses).
    #[test]
    fn deep_supervision_weighs_the_outputs() {
        let dev = Device::Cpu;
        for kernels in [KernelConfig::DEFAULT, KernelConfig::off()] {
            let mut cfg = TrainConfig::preset(TrainPreset::Cpu, Architecture::UNet3Plus);
            cfg.kernels = kernels;
            let a = Tensor::randn(0f32, 1.0, (2, 4, 8, 8), &dev).unwrap();
            let b = Tensor::randn(0f32, 1.0, (2, 4, 8, 8), &dev).unwrap();
            let masks = Tensor::rand(0f32, 4.0, (2, 8, 8), &dev)
                .unwrap()
                .floor()
                .unwrap()
                .to_dtype(DType::U32)
                .unwrap();
            let loss = |t: &Tensor| f64::from(training_loss(&cfg, t, &masks).unwrap().to_scalar::<f32>().unwrap());
            let (la, lb) = (loss(&a), loss(&b));
            let both = loss(&Tensor::cat(&[&a, &b], 1).unwrap());
            assert!((both - (2.0 * la + lb) / 3.0).abs() < 1e-5, "{both} vs {la}, {lb}");
            let twice = loss(&Tensor::cat(&[&a, &a], 1).unwrap());
            assert!((twice - la).abs() < 1e-5, "{twice} vs {la}");
        }
    }
}
