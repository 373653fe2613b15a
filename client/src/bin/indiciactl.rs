//! `indiciactl`: see [`indicia_client::cli`].

fn main() -> std::process::ExitCode {
    indicia_client::cli::main()
}
