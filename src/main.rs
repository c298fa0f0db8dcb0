//! The `tenant-kms` binary: see `tenant-kms --help`.

fn main() -> std::process::ExitCode {
    tenant_kms::cli::main()
}
