//! The `cmr` binary: parse the command line, set up logging, dispatch.

mod args;
mod commands;
mod env;
mod logging;
mod models;
mod progress;
mod staged;
mod text;

use std::process::ExitCode;

use clap::Parser;

use crate::args::{Cli, Command};

fn main() -> ExitCode {
    let cli = Cli::parse();
    logging::init(cli.verbose, cli.quiet);
    // training allocates every activation afresh each step: keep the pages
    if !cmr_kernels::keep_freed_memory() {
        tracing::debug!("the allocator keeps its default settings");
    }
    cmr_train::register_plot_font(&env::plot_fonts());
    match run(cli) {
        Ok(code) => code,
        // the reader of our output went away (`cmr info | head`): nothing to say
        Err(err) if text::is_broken_pipe(&err) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("error: {}", text::describe(&err));
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.command {
        Command::Train(args) => commands::train::run(args),
        Command::Eval(args) => commands::eval::run(args),
        Command::Predict(args) => commands::predict::run(args),
        Command::Measure(args) => commands::measure::run(args),
        Command::Submit(args) => commands::submit::run(args),
        Command::Info(args) => commands::info::run(args),
        Command::Deform(args) => commands::deform::run(args),
    }
}
