//! `edgepack`: the command line. Each command is a thin call into the libraries; format and
//! math logic live in `edgepack-converters`, recipes in `edgepack-recipes`.

mod args;
mod build_cmd;
mod commands;
mod deploy_cmd;
mod eval_cmd;
mod export_cmd;
mod finetune_cmd;
mod model_cmd;
mod progress;
mod rag_cmd;
mod targets_cmd;

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    let cli = commands::Cli::parse();
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("EDGEPACK_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_ansi(std::env::var_os("NO_COLOR").is_none())
        .without_time()
        .with_target(false)
        .init();
    match commands::run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) if e.downcast_ref::<build_cmd::GateFailed>().is_some() => {
            eprintln!("error: {e:#}");
            ExitCode::from(3)
        }
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
