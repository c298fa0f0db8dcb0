//! Compiles the service's protos (`../../proto`, the one copy) into client stubs with a
//! pure-Rust protobuf compiler (protox), so the build needs no system `protoc`.

use std::path::PathBuf;

/// Messages that carry plaintext or key bytes: no `Debug` (the server's list, one copy).
const SECRET_MESSAGES: &[&str] = include!("../../proto/secret_messages.rs");

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let proto_dir = PathBuf::from("../../proto");
    let files = [
        "tenantkms/v1/keys.proto",
        "tenantkms/v1/tenants.proto",
        "tenantkms/v1/audit.proto",
    ];
    for file in &files {
        println!("cargo:rerun-if-changed=../../proto/{file}");
    }
    println!("cargo:rerun-if-changed=../../proto/secret_messages.rs");
    let descriptors = protox::compile(files, [&proto_dir])?;
    let out_dir = PathBuf::from(std::env::var("OUT_DIR")?);
    let descriptor_path = out_dir.join("tenantkms_client_descriptor.bin");
    std::fs::write(
        &descriptor_path,
        prost::Message::encode_to_vec(&descriptors),
    )?;
    let mut builder = tonic_prost_build::configure()
        .build_server(false)
        .file_descriptor_set_path(&descriptor_path)
        .skip_protoc_run();
    for message in SECRET_MESSAGES {
        builder = builder.skip_debug([*message]);
    }
    builder.compile_protos(&files, &["../../proto"])?;
    Ok(())
}
