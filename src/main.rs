//! The `oonode` command line: parses arguments, starts tracing, runs the subcommand
//! (`cli/`) on a tokio runtime and exits with its status.

use std::process::ExitCode;

use clap::Parser;

mod cli;

/// jemalloc, not glibc's malloc: see Cargo.toml for why. Its configuration, read once
/// when it starts: freed pages go back to the system within about a second (a background
/// thread purges them), so memory after a burst of large bodies falls back as it did with
/// glibc and a fixed mmap threshold (benches/memory.py: 1.2x idle 5 s after, both).
/// `MALLOC_CONF`-style text; `_RJEM_MALLOC_CONF` in the environment overrides it.
#[cfg(target_os = "linux")]
mod allocator {
    #[global_allocator]
    static ALLOC: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

    /// jemalloc reads this C string (a `const char *`) by its prefixed name.
    #[allow(non_upper_case_globals)]
    #[export_name = "_rjem_malloc_conf"]
    pub static malloc_conf: &[u8; 60] =
        b"background_thread:true,dirty_decay_ms:1000,muzzy_decay_ms:0\0";
}

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
    cli::init_tracing(cli.command.log_format());
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(cli::run(cli.command))
}
