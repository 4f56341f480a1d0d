//! Generates the Rust code for the protocols with prost-build, fed by protox (a pure-Rust
//! protobuf compiler), so no `protoc` is needed on the machine.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=guest.proto");
    let fds = protox::compile(["guest.proto"], ["."])?;
    prost_build::Config::new().compile_fds(fds)?;
    Ok(())
}
