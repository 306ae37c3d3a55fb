//! Tern management alone (run `tern-signal` separately with the same TERN_PEER_TOKEN_SECRET).
#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    tern_management::cli::main_with(false)
}
