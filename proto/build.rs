//! Generates the Rust code for the protocols with prost-build and tonic-build, fed by protox
//! (a pure-Rust protobuf compiler), so no `protoc` is needed on the machine. The encoded
//! descriptor set of sandbox.proto is written beside the code for gRPC server reflection.

use prost::Message;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=guest.proto");
    println!("cargo:rerun-if-changed=sandbox.proto");
    let fds = protox::compile(["guest.proto"], ["."])?;
    prost_build::Config::new().compile_fds(fds)?;

    let fds = protox::compile(["sandbox.proto"], ["."])?;
    let out = std::path::PathBuf::from(std::env::var("OUT_DIR")?);
    std::fs::write(out.join("grove.v1.descriptor.bin"), fds.encode_to_vec())?;
    tonic_build::configure().build_client(true).build_server(true).compile_fds(fds)?;
    Ok(())
}
