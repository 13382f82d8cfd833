//! Training, checkpoints and inference for the `cmr` networks.
//!
//! [`TrainConfig`] is the whole recipe (model, data, augmentation, loss,
//! optimiser, schedule, epochs, seed, device), written next to every model.
//! [`Trainer`] runs the loop in a run folder ([`RunDir`]) and can resume it
//! exactly, and [`train_folds`] runs a k-fold cross-validation ([`CvDir`]);
//! [`Predictor`] runs a trained model or an ensemble (with optional flip or
//! flip-and-rotation TTA and largest-component clean-up) and evaluates it. The optimisers are our own
//! ([`Optimizer`]) so that their state is checkpointed. This crate chooses no
//! paths: callers give it the run folder and the data root.

mod checkpoint;
mod config;
mod cv;
mod device;
mod ema;
mod error;
mod init;
mod log;
mod optim;
mod plot;
mod predict;
mod pseudo;
pub mod report;
mod run;
mod schedule;
mod strategy;
mod trainer;

pub use checkpoint::{Checkpoint, load_tensors, load_varmap, save_tensors, save_varmap, set_varmap, varmap_tensors};
pub use config::{ConfigChanges, DataConfig, EarlyStopping, Keep, MAX_SIZE, TrainConfig, TrainPreset};
pub use cv::{
    CleanDecision, CvDir, CvOutcome, CvReport, CvSpec, CvSummary, FoldStatus, FoldSummary, MeanSd, decide_clean_up,
    ensemble_members, evaluate_fold_ensembles, evaluate_folds, train_folds,
};
pub use device::{DeviceSpec, HAS_CUDA, HAS_METAL, device_name};
pub use ema::EmaConfig;
pub use error::{Result, TrainError};
pub use init::seeded_var_builder;
pub use log::{CSV_HEADER, EpochRecord, MetricsLog};
pub use optim::{OptimConfig, Optimizer};
pub use plot::{draw_curves, register_font as register_plot_font};
pub use predict::{Evaluation, PredictOptions, Predictor, Tta, resolve_model};
pub use pseudo::{PSEUDO_DIR, PseudoLabels, check_teacher, pseudo_labelled};
pub use run::{Best, RunDir, TrainState};
pub use schedule::Schedule;
pub use strategy::{is_improvement, should_stop_early, validates_at};
pub use trainer::{Observer, OtherData, Outcome, Quiet, Trainer, load_splits};
