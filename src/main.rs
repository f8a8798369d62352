//! The `oonode` command line: parses arguments, starts tracing, runs the subcommand
//! (`cli/`) on a tokio runtime and exits with its status.

use std::io::IsTerminal;
use std::process::ExitCode;

use clap::Parser;

mod cli;

#[derive(Parser)]
#[command(
    name = "oonode",
    version,
    about = "Make an AI agent reachable on the network with one call"
)]
struct Cli {
    #[command(subcommand)]
    command: cli::Command,
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => return cli::parse_error(e),
    };
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| {
                "info,libp2p_swarm=warn,libp2p_quic=warn,libp2p_tcp=warn".into()
            }),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .init();
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(cli::run(cli.command))
}
