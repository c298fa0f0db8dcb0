//! Client commands that talk to a running server: `tenant …`, `encrypt`, `decrypt`.

use std::future::Future;
use std::io::{Read, Write};
use std::path::PathBuf;
use std::process::ExitCode;

use base64::Engine;
use clap::{Args, Subcommand};
use tonic::metadata::MetadataValue;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Identity};
use zeroize::Zeroizing;

use crate::error::{Error, Result};
use crate::pb;
use crate::pb::audit_service_client::AuditServiceClient;
use crate::pb::key_service_client::KeyServiceClient;
use crate::pb::tenant_service_client::TenantServiceClient;

/// Where the server is and how to authenticate.
#[derive(Debug, Clone, Args)]
pub struct ClientArgs {
    /// Server address.
    #[arg(
        long,
        default_value = "http://127.0.0.1:50051",
        env = "TENANT_KMS_ADDR"
    )]
    pub addr: String,
    /// File holding the bearer token.
    #[arg(
        long,
        default_value = "./data/admin.token",
        env = "TENANT_KMS_TOKEN_FILE"
    )]
    pub token_file: PathBuf,
    /// CA certificate (PEM) that the server's certificate must chain to (https addresses).
    #[arg(long, env = "TENANT_KMS_CA_CERT")]
    pub ca_cert: Option<PathBuf>,
    /// Client certificate (PEM) for mutual TLS; needs --client-key. When the server maps it
    /// to a caller, a missing token file is not an error.
    #[arg(long, requires = "client_key", env = "TENANT_KMS_CLIENT_CERT")]
    pub client_cert: Option<PathBuf>,
    /// Private key (PEM) of --client-cert.
    #[arg(long, requires = "client_cert", env = "TENANT_KMS_CLIENT_KEY")]
    pub client_key: Option<PathBuf>,
}

type Authed = InterceptedService<Channel, Bearer>;

/// Adds `authorization: Bearer <token>` to every request (nothing when the caller is named by
/// its client certificate alone).
#[derive(Clone)]
pub struct Bearer(Option<MetadataValue<tonic::metadata::Ascii>>);

impl tonic::service::Interceptor for Bearer {
    fn call(
        &mut self,
        mut request: tonic::Request<()>,
    ) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(value) = &self.0 {
            request
                .metadata_mut()
                .insert("authorization", value.clone());
        }
        Ok(request)
    }
}

impl ClientArgs {
    fn bearer(&self) -> Result<Bearer> {
        if self.client_cert.is_some() && !self.token_file.exists() {
            return Ok(Bearer(None));
        }
        let token = Zeroizing::new(std::fs::read_to_string(&self.token_file).map_err(|e| {
            Error::InvalidArgument(format!(
                "cannot read token file {}: {e}",
                self.token_file.display()
            ))
        })?);
        let mut value: MetadataValue<tonic::metadata::Ascii> = format!("Bearer {}", token.trim())
            .parse()
            .map_err(|_| Error::InvalidArgument("the token file holds no valid token".into()))?;
        value.set_sensitive(true);
        Ok(Bearer(Some(value)))
    }

    /// TLS settings for an https address: the named CA (no OS roots: a KMS is reached through
    /// a private CA) and, for mTLS, the client identity.
    fn tls(&self) -> Result<Option<ClientTlsConfig>> {
        let https = self.addr.starts_with("https://");
        if !https {
            if self.ca_cert.is_some() || self.client_cert.is_some() {
                return Err(Error::InvalidArgument(
                    "--ca-cert and --client-cert need an https:// --addr".into(),
                ));
            }
            return Ok(None);
        }
        let read = |path: &PathBuf| {
            std::fs::read(path)
                .map(Zeroizing::new)
                .map_err(|e| Error::InvalidArgument(format!("cannot read {}: {e}", path.display())))
        };
        let ca = self
            .ca_cert
            .as_ref()
            .ok_or_else(|| Error::InvalidArgument("an https:// --addr needs --ca-cert".into()))?;
        let mut config =
            ClientTlsConfig::new().ca_certificate(Certificate::from_pem(read(ca)?.as_slice()));
        if let (Some(cert), Some(key)) = (&self.client_cert, &self.client_key) {
            config = config.identity(Identity::from_pem(
                read(cert)?.as_slice(),
                read(key)?.as_slice(),
            ));
        }
        Ok(Some(config))
    }

    async fn channel(&self) -> Result<Channel> {
        let mut endpoint = Channel::from_shared(self.addr.clone())
            .map_err(|_| Error::InvalidArgument(format!("invalid address {}", self.addr)))?;
        if let Some(tls) = self.tls()? {
            endpoint = endpoint
                .tls_config(tls)
                .map_err(|e| Error::InvalidArgument(format!("TLS settings: {e}")))?;
        }
        endpoint
            .connect()
            .await
            .map_err(|e| Error::Unavailable(format!("cannot connect to {}: {e}", self.addr)))
    }

    /// A KeyService client.
    pub async fn keys(&self) -> Result<KeyServiceClient<Authed>> {
        Ok(KeyServiceClient::with_interceptor(
            self.channel().await?,
            self.bearer()?,
        ))
    }

    /// A TenantService client.
    pub async fn tenants(&self) -> Result<TenantServiceClient<Authed>> {
        Ok(TenantServiceClient::with_interceptor(
            self.channel().await?,
            self.bearer()?,
        ))
    }

    /// Connects, makes one KeyService call and returns its answer; a refusal becomes the
    /// command's error.
    pub(super) async fn key_call<R, F>(
        &self,
        rpc: impl FnOnce(KeyServiceClient<Authed>) -> F,
    ) -> Result<R>
    where
        F: Future<Output = std::result::Result<tonic::Response<R>, tonic::Status>>,
    {
        answer(rpc(self.keys().await?).await)
    }

    /// [`Self::key_call`] for the TenantService.
    pub(super) async fn tenant_call<R, F>(
        &self,
        rpc: impl FnOnce(TenantServiceClient<Authed>) -> F,
    ) -> Result<R>
    where
        F: Future<Output = std::result::Result<tonic::Response<R>, tonic::Status>>,
    {
        answer(rpc(self.tenants().await?).await)
    }

    /// [`Self::key_call`] for the AuditService.
    pub(super) async fn audit_call<R, F>(
        &self,
        rpc: impl FnOnce(AuditServiceClient<Authed>) -> F,
    ) -> Result<R>
    where
        F: Future<Output = std::result::Result<tonic::Response<R>, tonic::Status>>,
    {
        let client = AuditServiceClient::with_interceptor(self.channel().await?, self.bearer()?);
        answer(rpc(client).await)
    }

    /// A TenantService call that answers with a tenant, printed as one JSON line.
    async fn print_tenant<F>(
        &self,
        rpc: impl FnOnce(TenantServiceClient<Authed>) -> F,
    ) -> Result<()>
    where
        F: Future<Output = std::result::Result<tonic::Response<pb::Tenant>, tonic::Status>>,
    {
        print_json(&tenant_json(&self.tenant_call(rpc).await?));
        Ok(())
    }
}

/// A call's answer, or its refusal as the command's error.
fn answer<R>(reply: std::result::Result<tonic::Response<R>, tonic::Status>) -> Result<R> {
    reply.map(tonic::Response::into_inner).map_err(status_error)
}

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
    /// Write a tenant's metadata and wrapped keys to a MAC'd file (offline, on a data dir).
    Export(super::backup::TenantExportArgs),
    /// Restore exactly one tenant from an export file (offline, on a data dir).
    Import(super::backup::TenantImportArgs),
}

/// A tenant id and the client arguments.
#[derive(Debug, Args)]
pub struct TenantIdArgs {
    /// The tenant id.
    pub tenant_id: String,
    #[command(flatten)]
    client: ClientArgs,
}

/// Arguments of `tenant delete`.
#[derive(Debug, Args)]
pub struct DeleteArgs {
    /// The tenant id.
    pub tenant_id: String,
    /// Waiting window before the keys are destroyed, e.g. 7d (default: the server's, 7 days).
    #[arg(long)]
    pub window: Option<String>,
    #[command(flatten)]
    client: ClientArgs,
}

/// Arguments of `encrypt`.
#[derive(Debug, Args)]
pub struct EncryptArgs {
    /// Tenant id.
    #[arg(long)]
    tenant: String,
    /// Context, e.g. crm.contacts.email.
    #[arg(long)]
    context: String,
    /// Additional authenticated data (UTF-8), e.g. the row id.
    #[arg(long, default_value = "")]
    aad: String,
    /// Seal deterministically (AES-256-SIV): equal values give equal ciphertexts, which a
    /// database can compare; reveals equality (docs/SEARCHABLE.md).
    #[arg(long)]
    deterministic: bool,
    #[command(flatten)]
    client: ClientArgs,
}

/// Arguments of `decrypt`.
#[derive(Debug, Args)]
pub struct DecryptArgs {
    /// Tenant id.
    #[arg(long)]
    tenant: String,
    /// Context the value was encrypted under.
    #[arg(long)]
    context: String,
    /// Additional authenticated data given at encryption.
    #[arg(long, default_value = "")]
    aad: String,
    #[command(flatten)]
    client: ClientArgs,
}

pub(super) fn runtime() -> Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| Error::Internal(format!("tokio runtime: {e}")))
}

fn status_error(status: tonic::Status) -> Error {
    Error::FailedPrecondition(format!("{:?}: {}", status.code(), status.message()))
}

fn state_name(code: i32) -> &'static str {
    match pb::TenantState::try_from(code) {
        Ok(pb::TenantState::Active) => "ACTIVE",
        Ok(pb::TenantState::Suspended) => "SUSPENDED",
        Ok(pb::TenantState::PendingDeletion) => "PENDING_DELETION",
        Ok(pb::TenantState::Destroyed) => "DESTROYED",
        _ => "UNSPECIFIED",
    }
}

/// RFC 3339 text of a timestamp; a time before 1970 or after 9999 (which a server should
/// never send) prints as its raw seconds instead of panicking in the formatter.
pub(super) fn rfc3339(ts: &Option<prost_types::Timestamp>) -> String {
    ts.as_ref()
        .map(|t| {
            u64::try_from(t.seconds)
                .ok()
                .filter(|&s| s <= 253_402_300_799)
                .map(|s| {
                    humantime::format_rfc3339_seconds(
                        std::time::UNIX_EPOCH + std::time::Duration::from_secs(s),
                    )
                    .to_string()
                })
                .unwrap_or_else(|| format!("{}s since the epoch", t.seconds))
        })
        .unwrap_or_default()
}

fn tenant_json(t: &pb::Tenant) -> serde_json::Value {
    serde_json::json!({
        "tenant_id": t.tenant_id,
        "state": state_name(t.state),
        "primary_version": t.primary_version,
        "created_at": rfc3339(&t.created_at),
        "rotation_period_seconds": t.rotation_policy.as_ref().map(|p| p.rotation_period_seconds),
        "max_encryptions": t.rotation_policy.as_ref().map(|p| p.max_encryptions),
        "deletion_time": rfc3339(&t.deletion_time),
        "destroyed_at": rfc3339(&t.destroyed_at),
    })
}

pub(super) fn print_json(value: &serde_json::Value) {
    println!("{value}");
}

/// Runs a `tenant …` subcommand.
pub fn run_tenant(command: TenantCommand) -> Result<ExitCode> {
    // Export and import work on a data directory, not through a server.
    let command = match command {
        TenantCommand::Export(args) => return super::backup::run_tenant_export(args),
        TenantCommand::Import(args) => return super::backup::run_tenant_import(args),
        other => other,
    };
    runtime()?.block_on(async move {
        match command {
            TenantCommand::Create(a) => {
                a.client
                    .print_tenant(|mut c| async move {
                        c.create_tenant(pb::CreateTenantRequest {
                            tenant_id: a.tenant_id,
                        })
                        .await
                    })
                    .await?;
            }
            TenantCommand::Get(a) => {
                a.client
                    .print_tenant(|mut c| async move {
                        c.get_tenant(pb::GetTenantRequest {
                            tenant_id: a.tenant_id,
                        })
                        .await
                    })
                    .await?;
            }
            TenantCommand::List(client) => {
                let mut tenants = client.tenants().await?;
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
                        print_json(&tenant_json(t));
                    }
                    if page.next_page_token.is_empty() {
                        break;
                    }
                    page_token = page.next_page_token;
                }
            }
            TenantCommand::Suspend(a) => {
                a.client
                    .print_tenant(|mut c| async move {
                        c.suspend_tenant(pb::SuspendTenantRequest {
                            tenant_id: a.tenant_id,
                        })
                        .await
                    })
                    .await?;
            }
            TenantCommand::Resume(a) => {
                a.client
                    .print_tenant(|mut c| async move {
                        c.resume_tenant(pb::ResumeTenantRequest {
                            tenant_id: a.tenant_id,
                        })
                        .await
                    })
                    .await?;
            }
            TenantCommand::Delete(a) => {
                let waiting = a
                    .window
                    .as_deref()
                    .map(crate::config::parse_duration_seconds)
                    .transpose()?;
                a.client
                    .print_tenant(|mut c| async move {
                        c.schedule_tenant_deletion(pb::ScheduleTenantDeletionRequest {
                            tenant_id: a.tenant_id,
                            waiting_period_seconds: waiting,
                        })
                        .await
                    })
                    .await?;
            }
            TenantCommand::CancelDelete(a) => {
                a.client
                    .print_tenant(|mut c| async move {
                        c.cancel_tenant_deletion(pb::CancelTenantDeletionRequest {
                            tenant_id: a.tenant_id,
                        })
                        .await
                    })
                    .await?;
            }
            TenantCommand::Rotate(a) => {
                a.client
                    .print_tenant(|mut c| async move {
                        c.rotate_tenant_key(pb::RotateTenantKeyRequest {
                            tenant_id: a.tenant_id,
                        })
                        .await
                    })
                    .await?;
            }
            TenantCommand::Export(_) | TenantCommand::Import(_) => {
                return Err(Error::internal("export and import run offline"));
            }
            TenantCommand::Versions(a) => {
                let request = pb::ListKeyVersionsRequest {
                    tenant_id: a.tenant_id,
                };
                let versions = a
                    .client
                    .tenant_call(|mut c| async move { c.list_key_versions(request).await })
                    .await?;
                for v in versions.versions {
                    let state = match pb::KeyVersionState::try_from(v.state) {
                        Ok(pb::KeyVersionState::Enabled) => "ENABLED",
                        Ok(pb::KeyVersionState::Disabled) => "DISABLED",
                        Ok(pb::KeyVersionState::Destroyed) => "DESTROYED",
                        _ => "UNSPECIFIED",
                    };
                    print_json(&serde_json::json!({
                        "version": v.version,
                        "state": state,
                        "primary": v.primary,
                        "created_at": rfc3339(&v.created_at),
                        "encryptions": v.encryptions,
                    }));
                }
            }
        }
        Ok(ExitCode::SUCCESS)
    })
}

/// `encrypt`: plaintext on stdin, base64 ciphertext on stdout.
pub fn run_encrypt(args: EncryptArgs) -> Result<ExitCode> {
    let mut plaintext = Zeroizing::new(Vec::new());
    std::io::stdin()
        .read_to_end(&mut plaintext)
        .map_err(|e| Error::InvalidArgument(format!("cannot read stdin: {e}")))?;
    runtime()?.block_on(async move {
        let request = pb::EncryptRequest {
            tenant_id: args.tenant,
            context: args.context,
            plaintext: plaintext.to_vec(),
            aad: args.aad.into_bytes(),
            deterministic: args.deterministic,
            ..Default::default()
        };
        let response = args
            .client
            .key_call(|mut c| async move { c.encrypt(request).await })
            .await?;
        println!(
            "{}",
            base64::engine::general_purpose::STANDARD.encode(&response.ciphertext)
        );
        eprintln!("key version {}", response.key_version);
        Ok(ExitCode::SUCCESS)
    })
}

/// `decrypt`: base64 ciphertext on stdin, plaintext on stdout.
pub fn run_decrypt(args: DecryptArgs) -> Result<ExitCode> {
    let mut text = String::new();
    std::io::stdin()
        .read_to_string(&mut text)
        .map_err(|e| Error::InvalidArgument(format!("cannot read stdin: {e}")))?;
    let ciphertext = base64::engine::general_purpose::STANDARD
        .decode(text.trim())
        .map_err(|_| Error::InvalidArgument("stdin is not base64".into()))?;
    runtime()?.block_on(async move {
        let request = pb::DecryptRequest {
            tenant_id: args.tenant,
            context: args.context,
            ciphertext,
            aad: args.aad.into_bytes(),
        };
        let response = args
            .client
            .key_call(|mut c| async move { c.decrypt(request).await })
            .await?;
        let plaintext = Zeroizing::new(response.plaintext);
        std::io::stdout()
            .write_all(&plaintext)
            .and_then(|()| std::io::stdout().flush())
            .map_err(|e| Error::Internal(format!("cannot write stdout: {e}")))?;
        Ok(ExitCode::SUCCESS)
    })
}
