//! `indiciactl`: see [`indicia_client::cli`].

use std::process::ExitCode;

use clap::Parser;
use indicia_client::cli::{run, Args};

fn main() -> ExitCode {
    let args = Args::parse();
    let stdout = std::io::stdout();
    match run(args, &mut stdout.lock()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            #[allow(clippy::print_stderr)]
            {
                eprintln!("indiciactl: {err}");
            }
            ExitCode::from(err.exit_code())
        }
    }
}
