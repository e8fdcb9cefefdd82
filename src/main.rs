//! The `insitu-blk` binary: parse the command line, run the subcommand, map errors to exit codes.
mod cli;

fn main() {}
