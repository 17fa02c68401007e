//! Compiles the protocol with protox (pure Rust), so no system `protoc` is needed.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let proto = "proto/magpie/agent/v1/agent.proto";
    println!("cargo:rerun-if-changed={proto}");
    let fds = protox::compile([proto], ["proto"])?;
    // The bulk byte fields decode as slices of the buffer they arrive in (prost's `Bytes`), not
    // as copies: every byte of a pull passes through them.
    let mut build = tonic_prost_build::configure();
    for field in ["ReadFilesResponse.data", "DeltaResponse.data", "FileFrame.data", "DeltaFrame.delta"] {
        build = build.bytes(format!(".magpie.agent.v1.{field}"));
    }
    build.compile_fds(fds)?;
    Ok(())
}
