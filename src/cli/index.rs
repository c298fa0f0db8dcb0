//! `tenant-kms index …`: blind index definitions and computations through a running server
//! (docs/SEARCHABLE.md). Output for scripts is one JSON object per line on stdout.

use std::io::BufRead;
use std::process::ExitCode;

use clap::{Args, Subcommand};

use super::client::{ClientArgs, runtime};
use super::json;
use crate::error::{Error, Result};
use tenant_kms_client::pb;

/// `index` subcommands.
#[derive(Debug, Subcommand)]
pub enum IndexCommand {
    /// Declare a blind index for one tenant (--tenant) or for every tenant. Declaring the same
    /// definition again is a no-op; the same name with another definition is refused.
    Declare(DeclareArgs),
    /// List the definitions in force for a tenant (--tenant), or every definition.
    List(ListArgs),
    /// Compute the blind indexes of values read from stdin, one per line (the line ending is
    /// not part of the value); prints one JSON line per value: `{"output":{"indexes":[…]}}`
    /// (indexes in base64) or `{"error":{…}}`.
    Compute(ComputeArgs),
}

impl IndexCommand {
    /// The client flags.
    pub fn client(&self) -> &ClientArgs {
        match self {
            Self::Declare(a) => &a.client,
            Self::List(a) => &a.client,
            Self::Compute(a) => &a.client,
        }
    }
}

/// Arguments of `index declare`.
#[derive(Debug, Args)]
pub struct DeclareArgs {
    /// The tenant it serves; every tenant when absent.
    #[arg(long)]
    tenant: Option<String>,
    /// Index name, 1-64 characters of [a-z0-9][a-z0-9_.-]*.
    #[arg(long)]
    name: String,
    /// Output length in bits, 8-256 (docs/SEARCHABLE.md has a table for choosing it).
    #[arg(long)]
    bits: u32,
    /// `exact` or `casefold_trim` (docs/FORMAT.md).
    #[arg(long, default_value = "exact")]
    normalization: String,
    #[command(flatten)]
    client: ClientArgs,
}

/// Arguments of `index list`.
#[derive(Debug, Args)]
pub struct ListArgs {
    /// A tenant: the definitions in force for it; absent: every definition.
    #[arg(long)]
    tenant: Option<String>,
    #[command(flatten)]
    client: ClientArgs,
}

/// Arguments of `index compute`.
#[derive(Debug, Args)]
pub struct ComputeArgs {
    /// Tenant id.
    #[arg(long)]
    tenant: String,
    /// Declared index name.
    #[arg(long)]
    index: String,
    /// Under every enabled key version, not only the primary (lookups during a rotation).
    #[arg(long)]
    all_versions: bool,
    #[command(flatten)]
    client: ClientArgs,
}

/// Runs an `index` subcommand.
pub fn run(command: IndexCommand) -> Result<ExitCode> {
    command.client().check()?;
    runtime()?.block_on(async move {
        match command {
            IndexCommand::Declare(a) => {
                let request = pb::DeclareBlindIndexRequest {
                    tenant_id: a.tenant.unwrap_or_default(),
                    name: a.name,
                    bits: a.bits,
                    normalization: a.normalization,
                };
                let d = a
                    .client
                    .call(|c| async move { c.declare_blind_index(request).await })
                    .await?;
                json::print(&json::definition(&d));
            }
            IndexCommand::List(a) => {
                let request = pb::ListBlindIndexesRequest {
                    tenant_id: a.tenant.unwrap_or_default(),
                };
                let list = a
                    .client
                    .call(|c| async move { c.list_blind_indexes(request).await })
                    .await?;
                for d in &list.definitions {
                    json::print(&json::definition(d));
                }
            }
            IndexCommand::Compute(a) => {
                let mut values = Vec::new();
                for line in std::io::stdin().lock().lines() {
                    let line = line
                        .map_err(|e| Error::Internal(format!("cannot read stdin: {e}")))?;
                    values.push(line.into_bytes());
                }
                let request = pb::ComputeBlindIndexRequest {
                    tenant_id: a.tenant,
                    index_name: a.index,
                    values,
                    all_enabled_versions: a.all_versions,
                };
                let answer = a
                    .client
                    .call(|c| async move { c.compute_blind_index(request).await })
                    .await?;
                let mut failed = false;
                for r in &answer.results {
                    use pb::compute_blind_index_result::Result as R;
                    let (line, ok) = json::result(
                        r.result.as_ref().map(|r| match r {
                            R::Output(o) => Ok(o),
                            R::Error(e) => Err(e),
                        }),
                        |o: &pb::BlindIndexes| {
                            serde_json::json!({
                                "indexes": o.indexes.iter().map(json::blind_index).collect::<Vec<_>>(),
                            })
                        },
                    );
                    failed |= !ok;
                    json::print(&line);
                }
                if failed {
                    return Ok(ExitCode::from(super::EXIT_FAILURE));
                }
            }
        }
        Ok(ExitCode::SUCCESS)
    })
}
