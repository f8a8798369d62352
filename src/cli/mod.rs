//! The binary's subcommands that are not the library's job: code only the CLI uses.

pub(crate) mod testnet;
