//! All-in-one Tern server: management (API, console, agent gRPC) and signal in one process.
fn main() -> std::process::ExitCode {
    tern_management::cli::main_with(true)
}
