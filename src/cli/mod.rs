//! Command line: clap arguments, validated configs, one file per subcommand.

pub mod serve;
