//! Tern management alone (run `tern-signal` separately with the same TERN_PEER_TOKEN_SECRET).
fn main() -> std::process::ExitCode {
    tern_management::cli::main_with(false)
}
