//! Log set-up: `-v`/`-q` choose the default filter, `RUST_LOG` overrides it.
//! Logs go to stderr; stdout is for results (tables, JSON). A training run
//! also keeps what the terminal shows at the default level in its folder
//! (`train.log`, from [`also_to`] on, whatever `-q` or `RUST_LOG` say; more
//! with `-v`): the same events, with times, appended line by line (a log, not
//! a result: a crash leaves it ending at its last whole line).

use std::fs::File;
use std::io::Write;
use std::path::Path;
use std::sync::Mutex;

use tracing_subscriber::EnvFilter;
use tracing_subscriber::fmt::MakeWriter;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;

/// Our crates at `info` (`debug`, `trace` with -v, -vv; `warn`, `error` with
/// -q, -qq), everything else at `warn`.
fn default_filter(verbose: u8, quiet: u8) -> String {
    let ours = match (verbose, quiet) {
        (0, 0) => "info",
        (1, _) => "debug",
        (v, _) if v >= 2 => "trace",
        (_, 1) => "warn",
        _ => "error",
    };
    let others = if verbose >= 2 { "debug" } else { "warn" };
    format!("{others},cmr={ours},cmr_cli={ours},cmr_train={ours},cmr_data={ours},cmr_models={ours},cmr_loss={ours}")
}

/// The run's log file, once there is one.
static RUN_LOG: Mutex<Option<File>> = Mutex::new(None);

/// Writes to the run's log file when one is set, nowhere otherwise.
struct RunLog;

impl Write for RunLog {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let mut file = RUN_LOG.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        match file.as_mut() {
            Some(f) => f.write_all(buf).map(|()| buf.len()),
            None => Ok(buf.len()),
        }
    }

    fn flush(&mut self) -> std::io::Result<()> {
        let mut file = RUN_LOG.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        file.as_mut().map_or(Ok(()), File::flush)
    }
}

impl<'a> MakeWriter<'a> for RunLog {
    type Writer = RunLog;
    fn make_writer(&'a self) -> Self::Writer {
        RunLog
    }
}

pub fn init(verbose: u8, quiet: u8) {
    let filter =
        || EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default_filter(verbose, quiet)));
    let terminal = tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        .with_target(verbose > 0)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .without_time();
    let file = tracing_subscriber::fmt::layer()
        .with_writer(RunLog)
        .with_target(false)
        .with_ansi(false);
    tracing_subscriber::registry()
        .with(tracing_subscriber::filter::Filtered::new(terminal, filter()))
        // the run's log keeps the default level whatever -q or RUST_LOG say
        .with(tracing_subscriber::filter::Filtered::new(
            file,
            EnvFilter::new(default_filter(verbose, 0)),
        ))
        .init();
}

/// From now on, also append the log to `path` (a run's `train.log`).
pub fn also_to(path: &Path) -> anyhow::Result<()> {
    use anyhow::Context;
    let file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .with_context(|| format!("opening {}", path.display()))?;
    *RUN_LOG.lock().unwrap_or_else(std::sync::PoisonError::into_inner) = Some(file);
    Ok(())
}
