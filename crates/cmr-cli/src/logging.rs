//! Log set-up: `-v`/`-q` choose the default filter, `RUST_LOG` overrides it.
//! Logs go to stderr; stdout is for results (tables, JSON).

use tracing_subscriber::EnvFilter;

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

pub fn init(verbose: u8, quiet: u8) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default_filter(verbose, quiet)));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(verbose > 0)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .without_time()
        .init();
}
