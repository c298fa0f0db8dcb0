//! Compiles `proto/tenantkms/bench/v1/bench.proto` (package `tenantkms.bench.v1`) with the
//! pure-Rust protox, so the build needs no system `protoc`. The product's build script does
//! not know this file: no benchmark service is compiled into the product.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let file = "tenantkms/bench/v1/bench.proto";
    println!("cargo:rerun-if-changed=proto/{file}");
    let descriptors = protox::compile([file], ["proto"])?;
    tonic_prost_build::configure()
        // Decodes like the real RPCs (requests strictly), so the baseline pays what they pay.
        .codec_path("tenant_kms::service::codec::StrictCodec")
        .compile_fds(descriptors)?;
    Ok(())
}
