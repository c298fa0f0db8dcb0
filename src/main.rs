//! The `tenant-kms` binary: see `tenant-kms --help`.

/// mimalloc for the whole process: the request path allocates many small, short-lived
/// buffers across threads, where glibc malloc spent a third of the server's CPU on large
/// batches. Secrets do not depend on the allocator: they are zeroized by their owning types
/// before their memory is freed.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    tenant_kms::cli::main()
}
