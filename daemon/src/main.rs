//! `indiciad`: the indicia appliance. See [`indiciad::service`].

fn main() -> std::process::ExitCode {
    indiciad::service::main_with(std::env::args_os())
}
