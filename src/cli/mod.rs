//! Command line: clap arguments, validated configs, one file per subcommand.

#[allow(dead_code)]
pub mod serve;
