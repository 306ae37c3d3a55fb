//! All-in-one Tern server: management (API, console, agent gRPC) and signal in one process.
#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    tern_management::cli::main_with(true)
}
