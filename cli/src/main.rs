//! `edgepack`: the command line. Each command is a thin call into the libraries; format and
//! math logic live in `edgepack-converters`, recipes in `edgepack-recipes`.

mod args;
mod build_cmd;
mod commands;
mod deploy_cmd;
mod eval_cmd;
mod export_cmd;
mod finetune_cmd;
mod mender_cmd;
mod model_cmd;
mod progress;
mod rag_cmd;
mod targets_cmd;

use std::process::ExitCode;

use clap::Parser;

/// On SIGINT, SIGTERM or SIGHUP: remove the temporary outputs being written, then end as the
/// signal would (128 + its number). Without this a Ctrl-C during an export left a hidden
/// `.out.gguf.<pid>.tmp` of the model's size behind.
fn clean_up_on_signals() {
    use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};
    let Ok(mut signals) = signal_hook::iterator::Signals::new([SIGINT, SIGTERM, SIGHUP]) else {
        return;
    };
    std::thread::spawn(move || {
        if let Some(sig) = signals.forever().next() {
            edgepack_converters::io::remove_temporaries();
            std::process::exit(128 + sig);
        }
    });
}

fn main() -> ExitCode {
    clean_up_on_signals();
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
