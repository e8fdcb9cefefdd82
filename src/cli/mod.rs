//! Command line: clap arguments, validated configs, one file per subcommand.
