//! Command-line arguments: every clap type of the `cmr` binary.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand, ValueEnum};
use cmr_models::Architecture;
use cmr_train::{DeviceSpec, TrainPreset};

/// Cardiac MR segmentation: train, evaluate and run SegNet, U-Net and U-Net 3+
/// on short-axis slices (background, right ventricle, myocardium, left
/// ventricle).
#[derive(Debug, Parser)]
#[command(name = "cmr", version, about, long_about = None, propagate_version = true)]
pub struct Cli {
    /// More log output (-v: debug, -vv: trace). RUST_LOG overrides.
    #[arg(short, long, action = clap::ArgAction::Count, global = true)]
    pub verbose: u8,
    /// Less log output (-q: warnings and errors only, -qq: errors only).
    #[arg(short, long, action = clap::ArgAction::Count, global = true, conflicts_with = "verbose")]
    pub quiet: u8,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Train a network on a dataset and keep the best model on validation.
    Train(TrainArgs),
    /// Evaluate a model: Dice, IoU, HD95 and noise number per class.
    Eval(EvalArgs),
    /// Predict masks (PNG, optional overlays and run-length CSV), or segment
    /// NIfTI volumes (`<name>_seg.nii.gz`).
    Predict(PredictArgs),
    /// The heart's clinical numbers from segmented volumes: LV and RV
    /// volumes, EDV, ESV, stroke volume, ejection fraction, myocardial mass.
    Measure(MeasureArgs),
    /// Write the competition's run-length CSV from a folder of masks.
    Submit(SubmitArgs),
    /// Parameters, size and forward FLOPs of a network.
    Info(InfoArgs),
    /// Write a seeded deformed copy of a labelled split (the one `eval
    /// --deform` scores): elastic warp, rotation up to ±30°, scale 0.8–1.2,
    /// gamma, noise and bias field, image and mask warped together.
    Deform(DeformArgs),
}

#[derive(Debug, Args)]
#[command(
    after_help = "Example:\n  cmr deform --data data/cmr-2021/train --out deformed --seed 1\n  cmr eval --model unet3plus --data deformed"
)]
pub struct DeformArgs {
    /// A labelled split folder (image/, mask/), or a dataset root (its train/).
    #[arg(long, value_name = "DIR")]
    pub data: PathBuf,
    /// Output folder: image/<id>.png and mask/<id>_mask.png.
    #[arg(long, value_name = "DIR")]
    pub out: PathBuf,
    /// Seed of the deformations (the same seed gives the same copy).
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Images are padded/cropped to this side before deforming and back after.
    #[arg(long, default_value_t = 96)]
    pub size: usize,
}

/// Where to run.
#[derive(Debug, Args)]
pub struct DeviceArg {
    /// Device: auto (CUDA, then Metal, then CPU), cpu, cuda, cuda:N or metal.
    #[arg(long, value_parser = parse_device)]
    pub device: Option<DeviceSpec>,
}

fn parse_device(s: &str) -> Result<DeviceSpec, String> {
    s.parse()
}

fn parse_arch(s: &str) -> Result<Architecture, String> {
    s.parse()
}

/// Augmentation recipes for `--augment`.
/// How `--overlay` draws the classes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum OverlayChoice {
    /// The class colour blended into each region.
    Fill,
    /// Each region's boundary only.
    Outline,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum AugmentChoice {
    /// No augmentation.
    None,
    /// The report's five: flips, rotation by 90°, brightness, contrast.
    Report,
    /// The report's five plus random affine, gamma and noise.
    Strong,
    /// What scanners and hearts do: rotation by any angle, scale, elastic
    /// deformation, bias field, blur, low resolution, gamma, noise, on top of
    /// the report's five.
    Robust,
}

/// Which slices `eval` scores.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum SplitChoice {
    /// Every slice of --data.
    All,
    /// The model's recorded validation slices only.
    Val,
}

/// The precision of the convolutions' products, for `--precision`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum PrecisionChoice {
    /// bf16 where this CPU has a bf16 matrix engine (AMX-BF16), f32
    /// elsewhere (AVX512-BF16 alone is slower than f32).
    Auto,
    /// f32 products everywhere.
    F32,
    /// bf16 operands and f32 sums on the AMX tiles, else on AVX512-BF16 dot
    /// products (f32 where the CPU has neither, with a warning).
    Bf16,
}

/// Test-time augmentation for `--tta`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum TtaChoice {
    /// The eight flips and rotations of the square (what a bare --tta means).
    All,
    /// The four flips only.
    Flips,
    /// No test-time augmentation.
    None,
}

/// Losses for `--loss`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum LossChoice {
    /// The report's soft Dice over the foreground classes.
    SoftDice,
    /// Cross-entropy over pixels.
    Ce,
    /// Soft Dice + cross-entropy, equal weights.
    DiceCe,
}

#[derive(Debug, Args)]
#[command(after_help = "Examples:
  cmr train --arch unet3plus --data data/cmr-2021                      the cpu preset
  cmr train --arch unet3plus --data data/cmr-2021 --folds 5            5-fold cross-validation
  cmr train --arch unet3plus --data data/cmr-2021 --folds-from cv --pseudo-labels-from cv --epochs 100
                                                  self-training on test/, each fold taught by cv's
  cmr train --arch unet --data data/cmr-2021 --preset seed --epochs 50 --out runs/u
  cmr train --resume runs/u --data data/cmr-2021                       continue where it stopped
  cmr train --config recipe.toml --data data/cmr-2021                  any config.json key in TOML")]
pub struct TrainArgs {
    /// Network: segnet, unet or unet3plus. Taken from --config or the run when
    /// omitted there.
    #[arg(long, value_parser = parse_arch, required_unless_present_any = ["resume", "config"])]
    pub arch: Option<Architecture>,
    /// Dataset root holding train/ (and optionally val/; without it a seeded
    /// 20 % of train/ is held out for validation).
    #[arg(long, value_name = "DIR")]
    pub data: PathBuf,
    /// Recipe to start from: `cpu` (narrow networks, minutes on a laptop) or
    /// `seed` (the report: full widths, 200 epochs).
    #[arg(long, default_value = "cpu", value_parser = parse_train_preset, conflicts_with = "resume")]
    pub preset: TrainPreset,
    /// TOML file laid over the preset (any TrainConfig key); flags win over it.
    #[arg(long, value_name = "FILE", conflicts_with = "resume")]
    pub config: Option<PathBuf>,
    /// New run folder [default: runs/<arch>-<preset>, numbered if taken].
    #[arg(long, value_name = "RUN", conflicts_with = "resume")]
    pub out: Option<PathBuf>,
    /// Continue the run in this folder from its last checkpoint. Its recipe
    /// stays: only the number of epochs, the validation interval, the
    /// patience and the device may change (recorded in its config.json); a
    /// flag that would change anything else is refused.
    #[arg(long, value_name = "RUN")]
    pub resume: Option<PathBuf>,
    /// With --resume: continue even if --data is not the data the run
    /// recorded in splits.json (the new split is recorded, and the best
    /// score forgotten when the validation slices changed).
    #[arg(long, requires = "resume")]
    pub allow_other_data: bool,
    /// Number of epochs (with --resume: the new total) [default: the
    /// preset's: cpu 80, 200 for unet3plus; seed 200].
    #[arg(long)]
    pub epochs: Option<usize>,
    /// k-fold cross-validation over train/: K runs in one folder (fold-0 …
    /// fold-K-1, cv.json, summary.json), folds seeded and by patient. Resume
    /// it with --resume FOLDER; `cmr eval --model FOLDER` scores it.
    #[arg(long, value_name = "K", conflicts_with = "resume")]
    pub folds: Option<usize>,
    /// Cross-validate with the folds of this cross-validation folder (another
    /// seed or recipe on the same folds: `cmr eval --model CV1,CV2` then
    /// scores their fold ensembles, cross-validated).
    #[arg(long, value_name = "CV", conflicts_with = "resume")]
    pub folds_from: Option<PathBuf>,
    /// Self-training: the dataset's unlabelled test/ images join each fold's
    /// training slices, labelled (with eight-view TTA) by the same fold of
    /// this finished cross-validation, whose folds must be this one's (so no
    /// teacher saw the slices its fold is scored on). The labels are kept in
    /// each fold's pseudo/ folder. Needs --folds-from (the teacher's folds).
    #[arg(long, value_name = "CV", requires = "folds_from")]
    pub pseudo_labels_from: Option<PathBuf>,
    /// Slices per optimiser step [default: the preset's: 8].
    #[arg(long)]
    pub batch_size: Option<usize>,
    /// Base learning rate [default: the preset's: cpu 2e-3 (Adam, cosine
    /// schedule), seed 1e-3 (Adam, halved every 20 epochs)].
    #[arg(long)]
    pub lr: Option<f64>,
    /// Seed of weights, split, folds, shuffling and augmentation [default: the
    /// preset's: 42].
    #[arg(long)]
    pub seed: Option<u64>,
    #[arg(long, value_enum)]
    pub loss: Option<LossChoice>,
    #[arg(long, value_enum)]
    pub augment: Option<AugmentChoice>,
    /// U-Net 3+ only: train with the UNet 3+ paper's deep supervision (a
    /// side output from every decoder stage below the top and from the
    /// deepest encoder, in the loss with weights 1, 1/2, 1/4, …; inference
    /// uses the main output only)
    #[arg(long)]
    pub deep_supervision: bool,
    /// Validate and keep a moving average of the weights, updated after
    /// every step with this decay (0.99: about the last 100 steps), instead
    /// of the live weights.
    #[arg(long, value_name = "DECAY")]
    pub ema: Option<f64>,
    /// Validate every N epochs (and after the last).
    #[arg(long, value_name = "N")]
    pub val_every: Option<usize>,
    /// Stop after N validations without improvement.
    #[arg(long, value_name = "N")]
    pub patience: Option<usize>,
    /// The convolutions' products: f32, bf16 on the CPU's bf16 unit (AMX,
    /// else AVX512-BF16: the forward pass and the input gradients; weight
    /// gradients, BatchNorm, the loss and the weights stay f32), or auto
    /// (bf16 where the CPU has AMX-BF16) [default: f32, or the run's;
    /// recorded in config.json as kernels.precision]
    #[arg(long, value_enum, value_name = "P")]
    pub precision: Option<PrecisionChoice>,
    #[command(flatten)]
    pub device: DeviceArg,
}

fn parse_side(s: &str) -> Result<usize, String> {
    let n: usize = s.parse().map_err(|e| format!("{s:?}: {e}"))?;
    if n == 0 || n > cmr_train::MAX_SIZE {
        return Err(format!("{n}: the side must be from 1 to {}", cmr_train::MAX_SIZE));
    }
    Ok(n)
}

fn parse_train_preset(s: &str) -> Result<TrainPreset, String> {
    s.parse()
}

/// How predictions are made.
#[derive(Debug, Args)]
pub struct InferenceArgs {
    /// Test-time augmentation: average the softmax over the eight flips and
    /// rotations of the square (`--tta` or `--tta all`) or the four flips
    /// (`--tta flips`).
    #[arg(long, value_enum, num_args = 0..=1, default_missing_value = "all", value_name = "VIEWS")]
    pub tta: Option<TtaChoice>,
    /// Clean up connected components: the rule per class that a
    /// cross-validation decided for its model (`eval --decide-clean`), or
    /// else keep the largest component of each class.
    #[arg(long)]
    pub clean: bool,
    /// Images per forward pass.
    #[arg(long, default_value_t = 8)]
    pub batch_size: usize,
    /// The convolutions' products: bf16 on the CPU's bf16 unit (AMX, else
    /// AVX512-BF16) with f32 sums, f32, or auto (bf16 where the CPU has
    /// AMX-BF16).
    #[arg(long, value_enum, default_value_t = PrecisionChoice::Auto, value_name = "P")]
    pub precision: PrecisionChoice,
    #[command(flatten)]
    pub device: DeviceArg,
}

#[derive(Debug, Args)]
#[command(after_help = eval_help())]
pub struct EvalArgs {
    /// A run folder, a cross-validation folder, a .safetensors with
    /// config.json beside it, or a shipped model's name (segnet, unet,
    /// unet3plus: embedded in the binary; $CMR_MODELS_DIR/<name> and
    /// ./models/<name> come first); several, comma-separated, make an
    /// ensemble.
    #[arg(long, value_name = "M", required_unless_present = "pred")]
    pub model: Option<String>,
    /// Score a folder of predicted masks instead of a model (<id>_mask.png,
    /// as `cmr predict` writes them, or from any other tool) against the
    /// masks of the split folder --data, and write summary.json into it
    /// (per case, per class, the mean and the foreground mean). Or a
    /// run-length CSV (rows <id>_mask1…3, as `cmr predict --csv` and `cmr
    /// submit` write it), decoded at the true masks' size.
    #[arg(long, value_name = "DIR", conflicts_with_all = ["model", "deform", "decide_clean", "tta", "clean"])]
    pub pred: Option<PathBuf>,
    /// A labelled split folder (image/, mask/), or a dataset root: then, for a
    /// cross-validation folder (or several on the same folds), each fold's
    /// model (ensemble) on its own validation slices of train/; otherwise its
    /// val/ split, or the model's own held-out part of train/. Or a labelled
    /// volume dataset (ACDC: patientNNN/patientNNN_frameMM[_gt].nii.gz and
    /// Info.cfg; nnU-Net: imagesTr/<case>_0000.nii.gz, labelsTr/): 3-D Dice
    /// and HD95 in mm per case, and per patient EDV, ESV, EF and myocardial
    /// mass against the labels' (with --pred DIR: <case>_seg.nii.gz or
    /// <case>.nii.gz segmentations from any tool).
    #[arg(long, value_name = "DIR")]
    pub data: PathBuf,
    /// Score deformed copies of the images instead (elastic warp, rotation up
    /// to ±30°, scale 0.8–1.2, gamma, noise, bias field; image and mask warped
    /// together), drawn from this seed.
    #[arg(long, value_name = "SEED")]
    pub deform: Option<u64>,
    /// `val`: only the model's own validation slices (from its splits.json)
    /// among those of --data; `all`: every slice given (a model's training
    /// slices among them are warned about).
    #[arg(long, value_enum, default_value = "all")]
    pub split: SplitChoice,
    /// For a cross-validation folder: decide per class, out of fold, which
    /// clean-up helps (keep all, the largest component, or for RV and LV the
    /// components touching the myocardium), print the table and record the
    /// choice in the folder (postprocess.json), which --clean then applies.
    #[arg(long)]
    pub decide_clean: bool,
    /// Print one JSON object instead of the table.
    #[arg(long)]
    pub json: bool,
    /// Also write DIR/report.html, one self-contained page (opens from disk):
    /// the summary per class with the metrics' definitions, each class's
    /// Dice as a box plot, the pixel confusion matrix, and every slice as
    /// image | truth | prediction | errors with its Dice, worst first.
    #[arg(long, value_name = "DIR")]
    pub report: Option<PathBuf>,
    /// Also list every image's scores (table) or include them (JSON).
    #[arg(long)]
    pub per_image: bool,
    #[command(flatten)]
    pub inference: InferenceArgs,
}

#[derive(Debug, Args)]
#[command(after_help = "Examples:
  cmr predict --model unet3plus --input data/cmr-2021/test --out masks --tta --clean --csv submission.csv
  cmr predict --model runs/u --input scan.png --out masks --overlay
  cmr predict --model runs/unet3plus-cpu-cv5,runs/unet-cpu-cv5 --input images/ --out masks")]
pub struct PredictArgs {
    /// A run folder, a cross-validation folder (its folds' ensemble), a
    /// .safetensors with config.json beside it, or a shipped model's name
    /// (segnet, unet, unet3plus: embedded in the binary; $CMR_MODELS_DIR/<name>
    /// and ./models/<name> come first); several, comma-separated, make an
    /// ensemble.
    #[arg(long, value_name = "M")]
    pub model: String,
    /// A PNG, a folder of PNGs, or a split folder (its image/); or a NIfTI
    /// volume (.nii, .nii.gz: 3-D slices or a 4-D cine) or a folder of them,
    /// each segmented slice by slice into <name>_seg.nii.gz.
    #[arg(long, value_name = "DIR|PNG")]
    pub input: PathBuf,
    /// Output folder for <id>_mask.png (values 0..3), created if needed.
    #[arg(long, value_name = "DIR")]
    pub out: PathBuf,
    /// Also write <id>_probabilities.safetensors: one f32 tensor
    /// `probabilities` [classes, H, W] at the image's size (background, RV,
    /// Myo, LV), the softmax averaged over the ensemble and the TTA views,
    /// before any clean-up: for ensembling outside cmr.
    #[arg(long)]
    pub save_probabilities: bool,
    /// Also write <id>_overlay.png: the image upscaled (--overlay-scale),
    /// RV, Myo and LV tinted (`fill`, the default) or outlined (`outline`)
    /// in a colour-blind-safe palette, a legend under it; for a split folder
    /// with masks, its true mask's overlay on the left, the prediction's on
    /// the right.
    #[arg(long, value_enum, value_name = "STYLE", num_args = 0..=1, default_missing_value = "fill")]
    pub overlay: Option<OverlayChoice>,
    /// Output pixels per image pixel in overlays (nearest neighbour).
    #[arg(long, value_name = "N", default_value_t = 4, value_parser = clap::value_parser!(u16).range(1..=16))]
    pub overlay_scale: u16,
    /// Also write the competition's run-length CSV here.
    #[arg(long, value_name = "FILE")]
    pub csv: Option<PathBuf>,
    #[command(flatten)]
    pub inference: InferenceArgs,
}

#[derive(Debug, Args)]
#[command(after_help = "Examples:
  cmr measure --masks seg/patient001_4d_seg.nii.gz          a segmented cine: EDV, ESV, SV, EF, mass
  cmr measure --model unet3plus --input scans/ --csv numbers.csv --json")]
pub struct MeasureArgs {
    /// Segmentations to measure: a label volume (0 background, 1 RV, 2 Myo,
    /// 3 LV) or a folder of them (*.nii, *.nii.gz).
    #[arg(
        long,
        value_name = "PATH",
        required_unless_present = "model",
        conflicts_with = "model"
    )]
    pub masks: Option<PathBuf>,
    /// Segment --input with this model first (as `cmr predict` takes it).
    #[arg(long, value_name = "M", requires = "input")]
    pub model: Option<String>,
    /// The volumes to segment with --model: a .nii/.nii.gz or a folder.
    #[arg(long, value_name = "PATH")]
    pub input: Option<PathBuf>,
    /// Print one JSON object per volume (a list) instead of the table.
    #[arg(long)]
    pub json: bool,
    /// Also write one row per volume to this CSV file.
    #[arg(long, value_name = "FILE")]
    pub csv: Option<PathBuf>,
    #[command(flatten)]
    pub inference: InferenceArgs,
}

#[derive(Debug, Args)]
#[command(after_help = "Example:\n  cmr submit --masks masks --out submission.csv")]
pub struct SubmitArgs {
    /// Folder of <id>_mask.png files (values 0..3).
    #[arg(long, value_name = "DIR")]
    pub masks: PathBuf,
    /// The CSV to write (header id,encoding; three rows per mask).
    #[arg(long, value_name = "FILE")]
    pub out: PathBuf,
}

#[derive(Debug, Args)]
#[command(
    after_help = "Examples:\n  cmr info --arch unet3plus\n  cmr info --arch segnet --preset seed --json\n  cmr info --model unet3plus"
)]
pub struct InfoArgs {
    /// Network: segnet, unet or unet3plus.
    #[arg(long, value_parser = parse_arch, required_unless_present = "model", conflicts_with = "model")]
    pub arch: Option<Architecture>,
    /// Describe a trained model instead: a run or cross-validation folder, or
    /// a shipped model's name (architecture, parameters, training data,
    /// scores).
    #[arg(long, value_name = "M")]
    pub model: Option<String>,
    /// The training preset whose network to describe, as `cmr train
    /// --preset` names them: cpu (narrow widths, what `cmr train` trains by
    /// default) or seed (the report's widths).
    #[arg(long, default_value = "cpu", value_parser = parse_train_preset)]
    pub preset: TrainPreset,
    /// Input side for the FLOP count (a multiple of the network's, at most 1024).
    #[arg(long, default_value_t = 96, value_parser = parse_side)]
    pub size: usize,
    /// Print one JSON object (keys parameters, size_mb, gflops).
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub device: DeviceArg,
}

/// `cmr eval --help`'s epilogue: examples, then what each column means.
fn eval_help() -> String {
    let examples = "Examples:
  cmr eval --model runs/unet3plus-cpu-cv5 --data data/cmr-2021 --tta     cross-validated scores
  cmr eval --model runs/unet3plus-cpu-cv5 --data data/cmr-2021 --deform 1  the same on deformed copies
  cmr eval --model runs/cv-a,runs/cv-b --data data/cmr-2021              two CVs' fold ensembles
  cmr eval --model runs/a,runs/b --data data/cmr-2021/val                an ensemble of two runs
  cmr eval --model unet3plus --data some/labelled/split --json --tta --clean
  cmr eval --model unet3plus --data ACDC/database/training --per-image    volumes: 3-D Dice, HD95 mm, EF
  cmr eval --pred nnunet-out --data Dataset027_ACDC                      score another tool's segmentations";
    format!("{examples}\n\nMetrics:\n{}", cmr_loss::DEFINITIONS)
}
