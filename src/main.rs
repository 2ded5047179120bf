//! `portless`: the binary. CLI and configuration, Docker discovery, cluster
//! sync, the admin API, and the wiring of the dns, router and netplane
//! libraries. Only this crate knows Docker.

mod catalog;
mod config;

use clap::Parser;

fn main() {
    let cli = match config::Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            let code = if e.use_stderr() {
                config::EXIT_CONFIG
            } else {
                0
            };
            let _ = e.print();
            std::process::exit(code);
        }
    };
    match cli.command {
        config::Command::Run(args) => match args.resolve() {
            Ok(cfg) => println!("{cfg:?}"),
            Err(e) => {
                eprintln!("portless: {e}");
                std::process::exit(config::EXIT_CONFIG);
            }
        },
        _ => {}
    }
}
