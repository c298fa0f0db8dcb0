//! The `tenant-kms-bench` binary: see `tenant-kms-bench --help`.

/// mimalloc, as in the `tenant-kms` binary: the server this binary runs under test must
/// allocate as the product does, or the figures would measure another allocator.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    tenant_kms_bench::cli::main()
}
