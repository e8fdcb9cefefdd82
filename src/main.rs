//! The `insitu-blk` binary: parse the command line, run the subcommand, map errors to exit codes.
mod cli;

use std::process::ExitCode;

fn main() -> ExitCode {
    match cli::parse(std::env::args_os()) {
        Ok(args) => cli::run(args),
        Err(code) => code,
    }
}
