//! `tenant-kms completions <shell>` and `tenant-kms man`: shell completions (clap_complete)
//! and man pages (clap_mangen) generated from the same clap definitions that parse the
//! command line, so they cannot drift from it.

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::Args;

use crate::error::{Error, Result};

/// Arguments of `completions`.
#[derive(Debug, Args)]
pub struct CompletionsArgs {
    /// The shell: bash, zsh, fish, elvish or powershell.
    shell: clap_complete::Shell,
}

/// Arguments of `man`.
#[derive(Debug, Args)]
pub struct ManArgs {
    /// Write tenant-kms.1 and one page per subcommand (tenant-kms-encrypt.1, …) into this
    /// directory instead of printing the main page.
    #[arg(long)]
    out_dir: Option<PathBuf>,
}

/// Prints the completion script for `shell`.
pub fn run_completions(args: CompletionsArgs) -> Result<ExitCode> {
    let mut out = Vec::new();
    clap_complete::generate(args.shell, &mut super::command(), "tenant-kms", &mut out);
    write_stdout(&out)
}

/// Prints the main man page, or writes every page into `--out-dir`.
pub fn run_man(args: ManArgs) -> Result<ExitCode> {
    let command = super::command();
    if let Some(dir) = args.out_dir {
        std::fs::create_dir_all(&dir)
            .and_then(|()| clap_mangen::generate_to(command, &dir))
            .map_err(|e| Error::Internal(format!("cannot write {}: {e}", dir.display())))?;
        return Ok(ExitCode::SUCCESS);
    }
    let mut out = Vec::new();
    clap_mangen::Man::new(command)
        .render(&mut out)
        .map_err(|e| Error::Internal(format!("rendering the man page: {e}")))?;
    write_stdout(&out)
}

/// Writes the page or script to stdout. A reader that stops early (`tenant-kms man | head`)
/// closes the pipe: that ends the output quietly with success, as other CLIs do (Rust
/// ignores SIGPIPE, so the write reports the broken pipe instead of killing us).
fn write_stdout(bytes: &[u8]) -> Result<ExitCode> {
    let mut out = std::io::stdout().lock();
    match out.write_all(bytes).and_then(|()| out.flush()) {
        Ok(()) => Ok(ExitCode::SUCCESS),
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(ExitCode::SUCCESS),
        Err(e) => Err(Error::Internal(format!("cannot write stdout: {e}"))),
    }
}
