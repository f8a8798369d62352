//! The `oonode` command line: parses arguments, starts tracing, runs the subcommand
//! (`cli/`) on a tokio runtime and exits with its status.

use std::process::ExitCode;

use clap::Parser;

mod cli;

/// glibc raises its mmap threshold each time a large buffer is freed, so later large
/// buffers (request bodies, files) come from the heap and stay there once freed: 131 MB
/// stayed after a burst of 20 MB uploads (3.3x idle). A fixed threshold keeps them on
/// mmap, given back on free: 42 MB after the same burst (benches/memory.py; mimalloc,
/// also tried, kept 157 MB for seconds and idled higher).
#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn return_large_buffers() {
    // SAFETY: mallopt only sets a parameter of glibc's allocator; it runs first thing in
    // main, before any other thread exists.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 128 * 1024);
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn return_large_buffers() {}

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
    return_large_buffers();
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
