//! Compiles the .proto contracts with protox (pure Rust, so no protoc is needed to build).
use prost::Message;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let files = [
        "shopctrl/messaging/v1/common.proto",
        "shopctrl/messaging/v1/config.proto",
        "shopctrl/messaging/v1/conversations.proto",
        "shopctrl/messaging/v1/events.proto",
    ];
    let descriptors = protox::compile(files, ["."])?;
    let out = std::path::PathBuf::from(std::env::var("OUT_DIR")?);
    // compile_fds does not write the descriptor set itself; reflection needs it.
    std::fs::write(
        out.join("shopctrl_descriptor.bin"),
        descriptors.encode_to_vec(),
    )?;
    tonic_prost_build::configure().compile_fds(descriptors)?;
    println!("cargo:rerun-if-changed=shopctrl");
    Ok(())
}
