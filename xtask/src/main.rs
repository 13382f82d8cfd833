//! `cargo xtask`: developer tasks. See `cargo xtask --help`.

// The binaries' one reader of the environment, shared with `cmr`.
#[path = "../../crates/cmr-cli/src/env.rs"]
mod env;

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand};
use cmr_models::{Architecture, KernelConfig};
use cmr_train::{DeviceSpec, TrainPreset};
use xtask::download::{DEFAULT_URL, Installed, Source, install, verify_installed};
use xtask::reproduce::ReproduceOptions;

/// Developer tasks of the cmr workspace.
#[derive(Debug, Parser)]
#[command(name = "cargo xtask", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Fetch the CMR dataset, verify every file, install it into data/.
    Download(DownloadArgs),
    /// The whole pipeline: data, training, validation, test predictions,
    /// submission.csv and REPORT.md.
    Reproduce(ReproduceArgs),
    /// Run the tests of every crate (one cargo test -p A -p B …: one build), as CI does.
    Test(TestArgs),
    /// Time the training step and inference of the three networks, next to
    /// the PyTorch reference when a Python with torch is available.
    Bench(BenchArgs),
    /// Feed every parser of outside data (PNG, run-length CSV, TOML recipes,
    /// config.json, state.json, safetensors) mutated inputs: no panic, hang
    /// or unbounded allocation. `cargo xtask test` runs 300 cases of each.
    Fuzz(FuzzArgs),
}

#[derive(Debug, clap::Args)]
#[command(after_help = "Examples:
  cargo xtask fuzz --seconds 600     ten minutes over all parsers
  cargo xtask fuzz --cases 5000 --seed 7")]
struct FuzzArgs {
    /// Run for this long in all (the time split evenly over the parsers).
    #[arg(long, conflicts_with = "cases")]
    seconds: Option<u64>,
    /// Cases per parser.
    #[arg(long, default_value_t = 1000)]
    cases: usize,
    /// Seed of the mutations (a failure replays from its seed).
    #[arg(long, default_value_t = 1)]
    seed: u64,
}

// The fuzz harness bounds each case's allocations: count them.
#[global_allocator]
static ALLOCATOR: xtask::fuzz::Counting = xtask::fuzz::Counting;

#[derive(Debug, clap::Args)]
struct BenchArgs {
    /// Timed pairs per row: one run of ours and one of PyTorch's, back to
    /// back (which goes first swaps every pair), after a warm-up run of each.
    /// Each side's figure is its median; the speed of a shared or virtual
    /// machine drifts over minutes, so only runs seconds apart are compared.
    #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u32).range(1..))]
    runs: u32,
    /// Threads for both sides.
    #[arg(long, default_value_t = 2)]
    threads: usize,
    #[arg(long, value_delimiter = ',', default_value = "unet,unet3plus,segnet",
          value_parser = clap::builder::PossibleValuesParser::new(["unet", "unet3plus", "segnet"]))]
    archs: Vec<String>,
    /// seed (the report's widths) and/or small.
    #[arg(long, value_delimiter = ',', default_value = "seed,small",
          value_parser = clap::builder::PossibleValuesParser::new(["seed", "small"]))]
    widths: Vec<String>,
    /// Rows of each network: "train b4", "train b8", "infer b1", "infer b20".
    #[arg(long, value_delimiter = ',', default_value = "train b4,train b8,infer b1,infer b20",
          value_parser = clap::builder::PossibleValuesParser::new(xtask::bench::WHATS))]
    what: Vec<String>,
    /// Python with torch [default: $CMR_TORCH_PYTHON, else python3].
    #[arg(long)]
    python: Option<String>,
    /// Skip the peers: our side alone.
    #[arg(long)]
    no_torch: bool,
    /// The peers, each a column: torch (PyTorch f32 eager), torch-bf16
    /// (PyTorch bf16 autocast, channels-last), onnx (ONNX Runtime f32,
    /// inference rows).
    #[arg(long, value_delimiter = ',', default_value = "torch",
          value_parser = clap::builder::PossibleValuesParser::new(xtask::bench::Peer::NAMES))]
    peers: Vec<String>,
    /// Our side's precision: f32, or bf16 on the CPU's bf16 unit (AMX tiles, else AVX512-BF16).
    #[arg(long, default_value = "f32", value_parser = ["f32", "bf16"])]
    precision: String,
    /// Compare with another build of our step benchmark instead of PyTorch:
    /// the path of its binary (`cargo bench -p cmr-models --bench step
    /// --no-run` prints it), e.g. one built from the commit before a change.
    #[arg(long, value_name = "STEP_BINARY", conflicts_with_all = ["python", "no_torch", "peers"])]
    against: Option<PathBuf>,
}

#[derive(Debug, clap::Args)]
struct ReproduceArgs {
    /// Recipe: cpu (narrow networks, under an hour on two cores) or seed (the report's).
    #[arg(long, default_value = "cpu", value_parser = |s: &str| s.parse::<TrainPreset>())]
    preset: TrainPreset,
    /// Networks to train, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "segnet,unet,unet3plus", value_parser = |s: &str| s.parse::<Architecture>())]
    archs: Vec<Architecture>,
    /// Install the data from a local folder or archive if it is not installed yet.
    #[arg(long, value_name = "DIR|ARCHIVE")]
    from: Option<PathBuf>,
    /// Output folder [default: target/reproduce/<preset>].
    #[arg(long)]
    out: Option<PathBuf>,
    /// Folds of the cross-validation of each network.
    #[arg(long, default_value_t = 5)]
    folds: usize,
    /// Epochs per network instead of the preset's (short runs).
    #[arg(long)]
    epochs: Option<usize>,
    /// Train on the first N training slices only (short runs).
    #[arg(long, value_name = "N")]
    train_limit: Option<usize>,
    /// Predict the first N test images only (short runs).
    #[arg(long, value_name = "N")]
    test_limit: Option<usize>,
    /// Device: auto, cpu, cuda[:N] or metal.
    #[arg(long, default_value = "auto", value_parser = |s: &str| s.parse::<DeviceSpec>())]
    device: DeviceSpec,
    /// Copy the trained models into models/ (with a README of their scores).
    #[arg(long)]
    ship: bool,
}

#[derive(Debug, clap::Args)]
struct TestArgs {
    /// Only these packages (default: all, lowest layer first).
    #[arg(short, long = "package")]
    packages: Vec<String>,
    /// Passed on to `cargo test` (after `--`).
    #[arg(last = true)]
    extra: Vec<String>,
}

#[derive(Debug, clap::Args)]
struct DownloadArgs {
    /// Install from a local folder or .tar.gz/.zip instead of downloading.
    #[arg(long, value_name = "DIR|ARCHIVE", conflicts_with = "url")]
    from: Option<PathBuf>,
    /// Download from this URL (a mirror of the archive) instead of the pinned one.
    #[arg(long)]
    url: Option<String>,
    /// Where to install [default: data/cmr-2021 in the workspace].
    #[arg(long)]
    dest: Option<PathBuf>,
    /// Reinstall even if a verified copy is already there.
    #[arg(long)]
    force: bool,
}

fn workspace_root() -> PathBuf {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
    root.canonicalize().unwrap_or(root)
}

fn download(args: DownloadArgs) -> anyhow::Result<()> {
    let source = match (&args.from, &args.url) {
        (Some(path), _) => Source::from_path(path)?,
        (None, Some(url)) => Source::Url(url.clone()),
        (None, None) => Source::Url(DEFAULT_URL.to_string()),
    };
    let dest = args
        .dest
        .clone()
        .unwrap_or_else(|| workspace_root().join("data/cmr-2021"));
    match install(&source, &dest, args.force).with_context(|| format!("installing into {}", dest.display()))? {
        Installed::AlreadyThere { files } => {
            tracing::info!("{}: already installed and verified ({files} files)", dest.display())
        }
        Installed::Fresh { files, .. } => tracing::info!("{}: installed {files} verified files", dest.display()),
    }
    Ok(())
}

fn reproduce(args: ReproduceArgs) -> anyhow::Result<()> {
    let data = workspace_root().join("data/cmr-2021");
    let source = match &args.from {
        Some(path) => Source::from_path(path)?,
        None => Source::Url(DEFAULT_URL.to_string()),
    };
    if args.from.is_some() || verify_installed(&data).is_err() {
        install(&source, &data, false).with_context(|| format!("installing the data into {}", data.display()))?;
    }
    let out = args
        .out
        .clone()
        .unwrap_or_else(|| workspace_root().join("target/reproduce").join(args.preset.name()));
    let opts = ReproduceOptions {
        preset: args.preset,
        archs: args.archs.clone(),
        data,
        out,
        folds: args.folds,
        epochs: args.epochs,
        train_limit: args.train_limit,
        test_limit: args.test_limit,
        device: args.device,
        kernels: env::kernels(KernelConfig::default())?.unwrap_or_default(),
    };
    let results = xtask::reproduce::run(&opts)?;
    if args.ship {
        let command: Vec<String> = std::env::args().skip(1).filter(|a| a != "--ship").collect();
        xtask::reproduce::ship(
            &opts,
            &results,
            &workspace_root().join("models"),
            &format!("cargo xtask {}", command.join(" ")),
        )?;
        tracing::info!("models/: {} models shipped", results.len());
    }
    Ok(())
}

fn main() -> ExitCode {
    // as `cmr` does: `reproduce` trains in this process
    cmr_kernels::keep_freed_memory();
    cmr_train::register_plot_font(&env::plot_fonts());
    let cli = Cli::parse();
    // the fuzz cases' warnings (a 16-bit image converted …) are noise there
    let default_filter = if matches!(cli.command, Command::Fuzz(_)) {
        "error,xtask=info"
    } else {
        "info"
    };
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_filter)),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .without_time()
        .init();
    let result = match cli.command {
        Command::Download(args) => download(args),
        Command::Reproduce(args) => reproduce(args),
        Command::Test(args) => xtask::testall::run(&args.packages, &args.extra),
        Command::Fuzz(args) => xtask::fuzz::run(args.seconds, args.cases, args.seed),
        Command::Bench(args) => xtask::bench::run(&xtask::bench::BenchOptions {
            runs: args.runs as usize,
            threads: args.threads,
            archs: args.archs,
            widths: args.widths,
            whats: args.what,
            python: args.python,
            peers: match (args.against, args.no_torch) {
                (Some(path), _) => vec![xtask::bench::Peer::Build(path)],
                (None, true) => Vec::new(),
                // (names clap has checked against Peer::NAMES)
                (None, false) => args
                    .peers
                    .iter()
                    .filter_map(|p| xtask::bench::Peer::parse(p).ok())
                    .collect(),
            },
            bf16: args.precision == "bf16",
        })
        .map(|table| {
            #[allow(clippy::print_stdout)]
            {
                println!("{table}");
            }
        }),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
