//! `tenant-kms tenant …`: tenants, their key versions and rotation policy through a running
//! server. Each command prints the answer as one JSON line ([`super::json`]).

use std::future::Future;
use std::process::ExitCode;

use clap::{Args, Subcommand};

use super::client::{ClientArgs, answer, runtime};
use super::json;
use crate::error::{Error, Result};
use tenant_kms_client::pb;

/// `tenant …` subcommands.
#[derive(Debug, Subcommand)]
pub enum TenantCommand {
    /// Create a tenant (with key version 1).
    Create(TenantIdArgs),
    /// Show a tenant.
    Get(TenantIdArgs),
    /// List tenants.
    List(ClientArgs),
    /// Suspend a tenant: crypto calls are refused until resumed.
    Suspend(TenantIdArgs),
    /// Resume a suspended tenant.
    Resume(TenantIdArgs),
    /// Schedule a tenant's crypto-shredding after a waiting window.
    Delete(DeleteArgs),
    /// Cancel a scheduled deletion.
    CancelDelete(TenantIdArgs),
    /// List a tenant's key versions (metadata only).
    Versions(TenantIdArgs),
    /// Rotate a tenant's key through the server.
    Rotate(TenantIdArgs),
    /// Disable a key version: values under it stop decrypting until it is enabled again
    /// (the primary cannot be disabled).
    DisableVersion(VersionArgs),
    /// Enable a disabled key version again.
    EnableVersion(VersionArgs),
    /// Destroy a disabled key version: its key bytes are deleted; values under it never
    /// decrypt again. Irreversible.
    DestroyVersion(VersionArgs),
    /// Set a tenant's rotation policy (what `rotate --due` and the server act on).
    SetPolicy(PolicyArgs),
    /// Show a tenant's rotation policy.
    GetPolicy(TenantIdArgs),
    /// Write a tenant's metadata and wrapped keys to a MAC'd file (offline, on a data dir).
    Export(super::backup::TenantExportArgs),
    /// Restore exactly one tenant from an export file (offline, on a data dir).
    Import(super::backup::TenantImportArgs),
}

impl TenantCommand {
    /// The client flags of a command that talks to a server (`None` for export and import).
    pub fn client(&self) -> Option<&ClientArgs> {
        match self {
            Self::List(c) => Some(c),
            Self::Create(a)
            | Self::Get(a)
            | Self::Suspend(a)
            | Self::Resume(a)
            | Self::CancelDelete(a)
            | Self::Versions(a)
            | Self::Rotate(a)
            | Self::GetPolicy(a) => Some(&a.client),
            Self::Delete(a) => Some(&a.client),
            Self::DisableVersion(a) | Self::EnableVersion(a) | Self::DestroyVersion(a) => {
                Some(&a.client)
            }
            Self::SetPolicy(a) => Some(&a.client),
            Self::Export(_) | Self::Import(_) => None,
        }
    }
}

/// A tenant id and the client arguments.
#[derive(Debug, Args)]
pub struct TenantIdArgs {
    /// The tenant id.
    pub tenant_id: String,
    #[command(flatten)]
    client: ClientArgs,
}

/// A tenant id, a key version and the client arguments.
#[derive(Debug, Args)]
pub struct VersionArgs {
    /// The tenant id.
    pub tenant_id: String,
    /// The key version (1 or more).
    #[arg(value_parser = clap::value_parser!(u32).range(1..))]
    pub version: u32,
    #[command(flatten)]
    client: ClientArgs,
}

/// Arguments of `tenant delete`.
#[derive(Debug, Args)]
pub struct DeleteArgs {
    /// The tenant id.
    pub tenant_id: String,
    /// Waiting window before the keys are destroyed, e.g. 7d (default: the server's, 7 days).
    #[arg(long, value_parser = duration_seconds)]
    pub window: Option<u64>,
    #[command(flatten)]
    client: ClientArgs,
}

/// Arguments of `tenant set-policy`.
#[derive(Debug, Args)]
#[command(group(clap::ArgGroup::new("policy").required(true).multiple(true)
    .args(["rotation_period", "max_encryptions"])))]
pub struct PolicyArgs {
    /// The tenant id.
    pub tenant_id: String,
    /// Rotate when the primary version is older than this, e.g. 90d; 0s: never by age.
    #[arg(long, value_parser = duration_seconds)]
    pub rotation_period: Option<u64>,
    /// Rotate before the primary version has sealed this many values; 0: the server's
    /// default budget.
    #[arg(long)]
    pub max_encryptions: Option<u64>,
    #[command(flatten)]
    client: ClientArgs,
}

/// A duration flag (`7d`, `12h`, `0s`) in seconds, checked while parsing so a bad one is a
/// usage error.
pub fn duration_seconds(text: &str) -> std::result::Result<u64, String> {
    crate::config::parse_duration_seconds(text).map_err(|e| e.to_string())
}

/// A TenantService call that answers with a message printed as one JSON line by `render`.
async fn print_call<R, F>(
    client: &ClientArgs,
    rpc: impl FnOnce(tenant_kms_client::Client) -> F,
    render: impl Fn(&R) -> serde_json::Value,
) -> Result<()>
where
    F: Future<Output = tenant_kms_client::Result<R>>,
{
    json::print(&render(&client.call(rpc).await?));
    Ok(())
}

/// Runs a `tenant …` subcommand.
pub fn run(command: TenantCommand) -> Result<ExitCode> {
    // Export and import work on a data directory, not through a server.
    let command = match command {
        TenantCommand::Export(args) => return super::backup::run_tenant_export(args),
        TenantCommand::Import(args) => return super::backup::run_tenant_import(args),
        other => other,
    };
    runtime()?.block_on(run_online(command))?;
    Ok(ExitCode::SUCCESS)
}

async fn run_online(command: TenantCommand) -> Result<()> {
    use TenantCommand as T;
    match command {
        T::Create(a) => {
            let r = pb::CreateTenantRequest {
                tenant_id: a.tenant_id,
            };
            print_call(
                &a.client,
                |c| async move { c.create_tenant(r).await },
                json::tenant,
            )
            .await
        }
        T::Get(a) => {
            let r = pb::GetTenantRequest {
                tenant_id: a.tenant_id,
            };
            print_call(
                &a.client,
                |c| async move { c.get_tenant(r).await },
                json::tenant,
            )
            .await
        }
        T::GetPolicy(a) => {
            let r = pb::GetTenantRequest {
                tenant_id: a.tenant_id,
            };
            let policy = |t: &pb::Tenant| {
                serde_json::json!({
                    "tenant_id": t.tenant_id,
                    "rotation_policy": t.rotation_policy.as_ref().map(json::rotation_policy),
                })
            };
            print_call(&a.client, |c| async move { c.get_tenant(r).await }, policy).await
        }
        T::SetPolicy(a) => {
            // An unnamed half of the policy keeps its current value.
            let get = pb::GetTenantRequest {
                tenant_id: a.tenant_id.clone(),
            };
            let current = a
                .client
                .call(|c| async move { c.get_tenant(get).await })
                .await?
                .rotation_policy
                .unwrap_or_default();
            let r = pb::SetRotationPolicyRequest {
                tenant_id: a.tenant_id.clone(),
                rotation_period_seconds: a
                    .rotation_period
                    .unwrap_or(current.rotation_period_seconds),
                max_encryptions: a.max_encryptions.unwrap_or(current.max_encryptions),
            };
            print_call(
                &a.client,
                |c| async move { c.set_rotation_policy(r).await },
                json::tenant,
            )
            .await
        }
        T::List(client) => {
            let tenants = client.connect().await?;
            let mut page_token = String::new();
            loop {
                let page = answer(
                    tenants
                        .list_tenants(pb::ListTenantsRequest {
                            page_size: 1000,
                            page_token,
                        })
                        .await,
                )?;
                for t in &page.tenants {
                    json::print(&json::tenant(t));
                }
                if page.next_page_token.is_empty() {
                    return Ok(());
                }
                page_token = page.next_page_token;
            }
        }
        T::Suspend(a) => {
            let r = pb::SuspendTenantRequest {
                tenant_id: a.tenant_id,
            };
            print_call(
                &a.client,
                |c| async move { c.suspend_tenant(r).await },
                json::tenant,
            )
            .await
        }
        T::Resume(a) => {
            let r = pb::ResumeTenantRequest {
                tenant_id: a.tenant_id,
            };
            print_call(
                &a.client,
                |c| async move { c.resume_tenant(r).await },
                json::tenant,
            )
            .await
        }
        T::Delete(a) => {
            let r = pb::ScheduleTenantDeletionRequest {
                tenant_id: a.tenant_id,
                waiting_period_seconds: a.window,
            };
            print_call(
                &a.client,
                |c| async move { c.schedule_tenant_deletion(r).await },
                json::tenant,
            )
            .await
        }
        T::CancelDelete(a) => {
            let r = pb::CancelTenantDeletionRequest {
                tenant_id: a.tenant_id,
            };
            print_call(
                &a.client,
                |c| async move { c.cancel_tenant_deletion(r).await },
                json::tenant,
            )
            .await
        }
        T::Rotate(a) => {
            let r = pb::RotateTenantKeyRequest {
                tenant_id: a.tenant_id,
            };
            print_call(
                &a.client,
                |c| async move { c.rotate_tenant_key(r).await },
                json::tenant,
            )
            .await
        }
        T::Versions(a) => {
            let r = pb::ListKeyVersionsRequest {
                tenant_id: a.tenant_id,
            };
            let versions = a
                .client
                .call(|c| async move { c.list_key_versions(r).await })
                .await?;
            for v in &versions.versions {
                json::print(&json::key_version(v));
            }
            Ok(())
        }
        T::DisableVersion(a) => {
            let r = pb::DisableKeyVersionRequest {
                tenant_id: a.tenant_id,
                version: a.version,
            };
            print_call(
                &a.client,
                |c| async move { c.disable_key_version(r).await },
                json::key_version,
            )
            .await
        }
        T::EnableVersion(a) => {
            let r = pb::EnableKeyVersionRequest {
                tenant_id: a.tenant_id,
                version: a.version,
            };
            print_call(
                &a.client,
                |c| async move { c.enable_key_version(r).await },
                json::key_version,
            )
            .await
        }
        T::DestroyVersion(a) => {
            let r = pb::DestroyKeyVersionRequest {
                tenant_id: a.tenant_id,
                version: a.version,
            };
            print_call(
                &a.client,
                |c| async move { c.destroy_key_version(r).await },
                json::key_version,
            )
            .await
        }
        T::Export(_) | T::Import(_) => Err(Error::internal("export and import run offline")),
    }
}
