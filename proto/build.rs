//! Compiles the protocol files with protox (pure Rust), so no `protoc` binary is needed.
fn main() -> Result<(), Box<dyn std::error::Error>> {
    let files = ["proto/management.proto", "proto/signal.proto"];
    for f in &files {
        println!("cargo:rerun-if-changed={f}");
    }
    let fds = protox::compile(files, ["proto"])?;
    tonic_prost_build::configure()
        // Secret-bearing messages get hand-written, redacting Debug impls (src/redact.rs).
        .skip_debug([
            ".tern.management.v1.LoginRequest",
            ".tern.management.v1.LoginResponse",
            ".tern.management.v1.TurnServer",
            ".tern.management.v1.TcpRelay",
        ])
        // Hashable, so that map deltas compare rules by value rather than by their encoding.
        .type_attribute(".tern.management.v1.FirewallRule", "#[derive(Eq, Hash)]")
        .compile_fds(fds)?;
    Ok(())
}
