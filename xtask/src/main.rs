//! `cargo xtask`: developer tasks. See `cargo xtask --help`.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand};
use xtask::download::{DEFAULT_URL, Installed, Source, install};

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
    /// Run the tests crate by crate (cargo test -p …), as CI does.
    Test(TestArgs),
}

#[derive(Debug, clap::Args)]
struct TestArgs {
    /// Only these packages (default: all, lowest layer first).
    #[arg(short, long = "package")]
    packages: Vec<String>,
    /// Passed on to each `cargo test` (after `--`).
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

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .without_time()
        .init();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Download(args) => download(args),
        Command::Test(args) => xtask::testall::run(&args.packages, &args.extra),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
