//! `tenant-kms selftest`: runs every cryptographic self-test suite embedded in the binary
//! (known answers, RFC 5869, Wycheproof AES-GCM and HKDF-SHA256, our wire-format vectors) and
//! prints a table of suites, counts and results on stdout.
//!
//! Exit codes: 0 every suite passed, 1 a suite failed (the failed cases are listed).

use std::process::ExitCode;

use clap::Args;

use super::EXIT_FAILURE;
use crate::error::Result;
use crate::selftest;

/// Flags of `selftest`.
#[derive(Debug, Args)]
pub struct SelftestArgs {
    /// Run only the power-on subset the server runs at start.
    #[arg(long)]
    power_on: bool,
}

/// Runs the suites and prints the table.
pub fn run(args: SelftestArgs) -> Result<ExitCode> {
    let reports = if args.power_on {
        selftest::power_on_reports()
    } else {
        selftest::full()
    };
    print!("{}", selftest::Table(&reports));
    match selftest::first_failure(&reports) {
        Ok(()) => Ok(ExitCode::SUCCESS),
        Err(failure) => {
            eprintln!("tenant-kms: {failure}");
            Ok(ExitCode::from(EXIT_FAILURE))
        }
    }
}
