//! Compiles `proto/tenantkms/v1/*.proto` into Rust with a pure-Rust protobuf compiler
//! (protox), so the build needs no system `protoc`.

use std::path::PathBuf;

/// Messages that carry plaintext or key bytes (the list is shared with the Rust client).
const SECRET_MESSAGES: &[&str] = include!("proto/secret_messages.rs");

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let proto_dir = PathBuf::from("proto");
    let files = [
        "tenantkms/v1/keys.proto",
        "tenantkms/v1/tenants.proto",
        "tenantkms/v1/audit.proto",
    ];
    for file in &files {
        println!("cargo:rerun-if-changed=proto/{file}");
    }
    println!("cargo:rerun-if-changed=proto/secret_messages.rs");
    let descriptors = protox::compile(files, [&proto_dir])?;
    let out_dir = PathBuf::from(std::env::var("OUT_DIR")?);
    let descriptor_path = out_dir.join("tenantkms_descriptor.bin");
    std::fs::write(
        &descriptor_path,
        prost::Message::encode_to_vec(&descriptors),
    )?;

    write_strictness(&descriptors, &out_dir.join("strictness.rs"))?;

    let mut builder = tonic_prost_build::configure()
        .file_descriptor_set_path(&descriptor_path)
        .skip_protoc_run()
        // Refuses request fields the server does not know (src/service/codec.rs).
        .codec_path("crate::service::codec::StrictCodec");
    for message in SECRET_MESSAGES {
        builder = builder.skip_debug([*message]);
    }
    builder.compile_protos(&files, &["proto"])?;
    Ok(())
}

/// Writes `impl Strictness` for every RPC input (strict) and output (lenient) type, so the
/// codec refuses unknown fields in requests only (src/service/codec.rs).
fn write_strictness(
    descriptors: &prost_types::FileDescriptorSet,
    path: &std::path::Path,
) -> Result<(), Box<dyn std::error::Error>> {
    let mut strict = std::collections::BTreeMap::new();
    for file in &descriptors.file {
        for service in &file.service {
            for method in &service.method {
                for (name, is_input) in [(method.input_type(), true), (method.output_type(), false)]
                {
                    let name = name.trim_start_matches(".tenantkms.v1.").to_owned();
                    *strict.entry(name).or_insert(false) |= is_input;
                }
            }
        }
    }
    let mut code = String::new();
    for (name, is_strict) in strict {
        code.push_str(&format!(
            "impl crate::service::codec::Strictness for {name} {{ const STRICT: bool = {is_strict}; }}\n"
        ));
    }
    std::fs::write(path, code)?;
    Ok(())
}
