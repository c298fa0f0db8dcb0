//! `tenantkms.v1.TenantService`: tenants, key versions, lifecycle and rotation policy.
//! Every change drops the tenant's cached keys before it is acknowledged.

use std::sync::Arc;

use crate::telemetry::InCallExt;
use tonic::{Request, Response, Status};

use super::call::Call;
use super::state::AppState;
use super::{blocking, containment, convert, status};
use crate::auth::Operation;
use crate::domain::TenantId;
use crate::domain::index::{IndexDefinition, IndexName, IndexScope};
use crate::domain::lifecycle::{self, TenantTransition, VersionTransition};
use crate::error::{Error, Result};
use crate::keys::KeyManager;
use crate::pb;
use crate::pb::tenant_service_server::TenantService;
use crate::store::TenantRecord;

/// Default and largest page of ListTenants.
const DEFAULT_PAGE: usize = 100;
const MAX_PAGE: usize = 1000;

/// The TenantService implementation.
pub struct TenantServiceImpl {
    state: Arc<AppState>,
}

impl TenantServiceImpl {
    /// A service over the shared state.
    pub fn new(state: Arc<AppState>) -> Self {
        Self { state }
    }

    /// Admits the call for `tenant_id`, runs `work` on the blocking pool with the key manager,
    /// and finishes the call.
    ///
    /// The whole call runs in its own task, shielded from the caller's deadline: once a
    /// change has been handed to the key store it completes, and its audit record says what
    /// really happened (e.g. `ok`), even if the caller was already told DEADLINE_EXCEEDED.
    /// Without the shield a cut-off change could land with a record saying it did not.
    async fn tenant_call<R: prost::Message + 'static>(
        &self,
        mut call: Call,
        tenant_id: &str,
        work: impl FnOnce(&KeyManager, &TenantId) -> Result<R> + Send + 'static,
    ) -> Result<Response<R>, Status> {
        let state = Arc::clone(&self.state);
        let tenant_id = tenant_id.to_owned();
        let request_id = call.request_id.clone();
        let task = tokio::spawn(async move {
            let span = call.span();
            let result = async {
                let tenant = call.admit(&state, &tenant_id).await?;
                let keys = Arc::clone(&state.keys);
                blocking(move || work(&keys, &tenant)).await
            }
            .in_call(span)
            .await;
            call.finish(&state, result).await
        });
        task.await.unwrap_or_else(|e| {
            Err(status::to_status(
                &Error::Internal(format!("tenant call task failed: {e}")),
                &request_id,
            ))
        })
    }

    async fn transition(
        &self,
        tenant_id: String,
        call: Call,
        transition: TenantTransition,
    ) -> Result<Response<pb::Tenant>, Status> {
        self.tenant_call(call, &tenant_id, move |keys, tenant| {
            keys.transition(tenant, transition)
                .map(|r| convert::tenant(&r))
        })
        .await
    }
}

impl TenantServiceImpl {
    /// Containment RPCs: admits a call naming no tenant (an all-tenant token; the admin role
    /// decides), runs `work` on the blocking pool with the caller's audit name, appends the
    /// steps' own audit records (quarantine, release, each suspension) and finishes the call.
    /// Shielded from the caller's deadline like [`Self::tenant_call`].
    async fn containment_call<R: prost::Message + Send + 'static>(
        &self,
        mut call: Call,
        work: impl FnOnce(&KeyManager, &str) -> Result<(R, Vec<crate::audit::AuditRecord>)>
        + Send
        + 'static,
    ) -> Result<Response<R>, Status> {
        let state = Arc::clone(&self.state);
        let request_id = call.request_id.clone();
        let task = tokio::spawn(async move {
            let span = call.span();
            let result = async {
                let caller = call.admit_global(&state).await?.audit_name().to_owned();
                let keys = Arc::clone(&state.keys);
                let (answer, records) = blocking(move || work(&keys, &caller)).await?;
                // The store changed: the next call of the token must see it.
                state.auth.clear();
                for record in records {
                    state.audit.append(record).await?;
                }
                Ok(answer)
            }
            .in_call(span)
            .await;
            call.finish(&state, result).await
        });
        task.await.unwrap_or_else(|e| {
            Err(status::to_status(
                &Error::Internal(format!("containment call task failed: {e}")),
                &request_id,
            ))
        })
    }

    /// Searchable columns: runs a blind-index definition call like [`Self::tenant_call`]
    /// (shielded from the caller's deadline once admitted), for one tenant or, with an empty
    /// `tenant_id`, for every tenant (which needs an all-tenants token). The index name, when
    /// valid, is noted for the audit record.
    async fn index_call<R: prost::Message + 'static>(
        &self,
        mut call: Call,
        tenant_id: &str,
        index_name: Option<String>,
        work: impl FnOnce(&KeyManager, Option<&TenantId>) -> Result<R> + Send + 'static,
    ) -> Result<Response<R>, Status> {
        let state = Arc::clone(&self.state);
        let tenant_id = tenant_id.to_owned();
        let request_id = call.request_id.clone();
        let task = tokio::spawn(async move {
            let span = call.span();
            let result = async {
                let tenant = if tenant_id.is_empty() {
                    call.admit_global(&state).await?;
                    None
                } else {
                    Some(call.admit(&state, &tenant_id).await?)
                };
                if let Some(name) = index_name.as_deref().and_then(|n| IndexName::parse(n).ok()) {
                    call.note_index(&name);
                }
                let keys = Arc::clone(&state.keys);
                blocking(move || work(&keys, tenant.as_ref())).await
            }
            .in_call(span)
            .await;
            call.finish(&state, result).await
        });
        task.await.unwrap_or_else(|e| {
            Err(status::to_status(
                &Error::Internal(format!("index call task failed: {e}")),
                &request_id,
            ))
        })
    }
}

/// A blind index definition on the wire.
fn convert_index_definition(d: &IndexDefinition) -> pb::BlindIndexDefinition {
    pb::BlindIndexDefinition {
        name: d.name.as_str().to_owned(),
        bits: u32::from(d.bits),
        normalization: d.normalization.name().to_owned(),
        tenant_id: match &d.scope {
            IndexScope::AllTenants => String::new(),
            IndexScope::Tenant(t) => t.as_str().to_owned(),
        },
        created_at: Some(convert::timestamp(d.created_at)),
    }
}

/// A tenant's row, unless it is destroyed: every call naming a destroyed tenant gets
/// FAILED_PRECONDITION "tenant destroyed" (its tombstone stays visible in ListTenants and its
/// history in the audit).
fn live_tenant(keys: &KeyManager, tenant: &TenantId) -> Result<TenantRecord> {
    let record = keys
        .store()
        .tenant(tenant)?
        .ok_or(Error::NotFound("tenant"))?;
    lifecycle::require_not_destroyed(record.state)?;
    Ok(record)
}

/// Parses a version number (0 is never a version).
fn version_of(version: u32) -> Result<u32> {
    if version == 0 {
        return Err(Error::InvalidArgument("version must be 1 or more".into()));
    }
    Ok(version)
}

#[tonic::async_trait]
impl TenantService for TenantServiceImpl {
    async fn create_tenant(
        &self,
        request: Request<pb::CreateTenantRequest>,
    ) -> Result<Response<pb::Tenant>, Status> {
        let call = Call::begin(&request, Operation::CreateTenant);
        let req = request.into_inner();
        self.tenant_call(call, &req.tenant_id, |keys, tenant| {
            keys.create_tenant(tenant).map(|r| convert::tenant(&r))
        })
        .await
    }

    async fn get_tenant(
        &self,
        request: Request<pb::GetTenantRequest>,
    ) -> Result<Response<pb::Tenant>, Status> {
        let call = Call::begin(&request, Operation::GetTenant);
        let req = request.into_inner();
        self.tenant_call(call, &req.tenant_id, |keys, tenant| {
            let record = live_tenant(keys, tenant)?;
            Ok(convert::tenant(&record))
        })
        .await
    }

    async fn list_tenants(
        &self,
        request: Request<pb::ListTenantsRequest>,
    ) -> Result<Response<pb::ListTenantsResponse>, Status> {
        let mut call = Call::begin(&request, Operation::ListTenants);
        let req = request.into_inner();
        let span = call.span();
        let result = async {
            call.admit_global(&self.state).await?;
            let size = match req.page_size {
                0 => DEFAULT_PAGE,
                n if n < 0 => {
                    return Err(Error::InvalidArgument(
                        "page_size must not be negative".into(),
                    ));
                }
                n => (n as usize).min(MAX_PAGE),
            };
            let after = if req.page_token.is_empty() {
                None
            } else {
                Some(
                    TenantId::parse(&req.page_token)
                        .map_err(|_| Error::InvalidArgument("page_token is invalid".into()))?,
                )
            };
            let keys = Arc::clone(&self.state.keys);
            let tenants: Vec<TenantRecord> =
                blocking(move || keys.store().list_tenants(after.as_ref(), size + 1)).await?;
            let more = tenants.len() > size;
            let page: Vec<pb::Tenant> = tenants.iter().take(size).map(convert::tenant).collect();
            let next_page_token = if more {
                page.last().map(|t| t.tenant_id.clone()).unwrap_or_default()
            } else {
                String::new()
            };
            call.item_count = page.len() as u32;
            Ok(pb::ListTenantsResponse {
                tenants: page,
                next_page_token,
            })
        }
        .in_call(span)
        .await;
        call.finish(&self.state, result).await
    }

    async fn rotate_tenant_key(
        &self,
        request: Request<pb::RotateTenantKeyRequest>,
    ) -> Result<Response<pb::Tenant>, Status> {
        let call = Call::begin(&request, Operation::RotateTenantKey);
        let req = request.into_inner();
        self.tenant_call(call, &req.tenant_id, |keys, tenant| {
            keys.rotate(tenant).map(|r| convert::tenant(&r))
        })
        .await
    }

    async fn list_key_versions(
        &self,
        request: Request<pb::ListKeyVersionsRequest>,
    ) -> Result<Response<pb::ListKeyVersionsResponse>, Status> {
        let call = Call::begin(&request, Operation::ListKeyVersions);
        let req = request.into_inner();
        self.tenant_call(call, &req.tenant_id, |keys, tenant| {
            let record = live_tenant(keys, tenant)?;
            let versions = keys.store().key_versions(tenant)?;
            Ok(pb::ListKeyVersionsResponse {
                versions: versions
                    .iter()
                    .map(|v| convert::key_version(v, record.primary_version))
                    .collect(),
            })
        })
        .await
    }

    async fn disable_key_version(
        &self,
        request: Request<pb::DisableKeyVersionRequest>,
    ) -> Result<Response<pb::KeyVersion>, Status> {
        let call = Call::begin(&request, Operation::DisableKeyVersion);
        let req = request.into_inner();
        let version = req.version;
        self.tenant_call(call, &req.tenant_id, move |keys, tenant| {
            let version = version_of(version)?;
            let record = keys.set_version_state(tenant, version, VersionTransition::Disable)?;
            Ok(convert::key_version(&record, 0))
        })
        .await
    }

    async fn enable_key_version(
        &self,
        request: Request<pb::EnableKeyVersionRequest>,
    ) -> Result<Response<pb::KeyVersion>, Status> {
        let call = Call::begin(&request, Operation::EnableKeyVersion);
        let req = request.into_inner();
        let version = req.version;
        self.tenant_call(call, &req.tenant_id, move |keys, tenant| {
            let version = version_of(version)?;
            let record = keys.set_version_state(tenant, version, VersionTransition::Enable)?;
            let primary = keys
                .store()
                .tenant(tenant)?
                .map_or(0, |t| t.primary_version);
            Ok(convert::key_version(&record, primary))
        })
        .await
    }

    async fn destroy_key_version(
        &self,
        request: Request<pb::DestroyKeyVersionRequest>,
    ) -> Result<Response<pb::KeyVersion>, Status> {
        let call = Call::begin(&request, Operation::DestroyKeyVersion);
        let req = request.into_inner();
        let version = req.version;
        self.tenant_call(call, &req.tenant_id, move |keys, tenant| {
            let version = version_of(version)?;
            let record = keys.set_version_state(tenant, version, VersionTransition::Destroy)?;
            Ok(convert::key_version(&record, 0))
        })
        .await
    }

    async fn set_rotation_policy(
        &self,
        request: Request<pb::SetRotationPolicyRequest>,
    ) -> Result<Response<pb::Tenant>, Status> {
        let call = Call::begin(&request, Operation::SetRotationPolicy);
        let req = request.into_inner();
        let (period, max) = (req.rotation_period_seconds, req.max_encryptions);
        self.tenant_call(call, &req.tenant_id, move |keys, tenant| {
            crate::domain::bounded_duration("rotation_period_seconds", period)?;
            if max > keys.policy().default_max_encryptions.max(1 << 32) {
                return Err(Error::InvalidArgument(
                    "max_encryptions may not exceed 2^32 (NIST SP 800-38D random-nonce bound)"
                        .into(),
                ));
            }
            keys.set_rotation_policy(tenant, period, max)
                .map(|r| convert::tenant(&r))
        })
        .await
    }

    async fn suspend_tenant(
        &self,
        request: Request<pb::SuspendTenantRequest>,
    ) -> Result<Response<pb::Tenant>, Status> {
        let call = Call::begin(&request, Operation::SuspendTenant);
        let req = request.into_inner();
        self.transition(req.tenant_id, call, TenantTransition::Suspend)
            .await
    }

    async fn resume_tenant(
        &self,
        request: Request<pb::ResumeTenantRequest>,
    ) -> Result<Response<pb::Tenant>, Status> {
        let call = Call::begin(&request, Operation::ResumeTenant);
        let req = request.into_inner();
        self.transition(req.tenant_id, call, TenantTransition::Resume)
            .await
    }

    async fn schedule_tenant_deletion(
        &self,
        request: Request<pb::ScheduleTenantDeletionRequest>,
    ) -> Result<Response<pb::Tenant>, Status> {
        let call = Call::begin(&request, Operation::ScheduleTenantDeletion);
        let req = request.into_inner();
        let min = self.state.options.min_deletion_window_seconds;
        let waiting = req
            .waiting_period_seconds
            .unwrap_or(self.state.options.default_deletion_window_seconds);
        self.tenant_call(call, &req.tenant_id, move |keys, tenant| {
            crate::domain::bounded_duration("waiting_period_seconds", waiting)?;
            if waiting < min {
                return Err(Error::InvalidArgument(format!(
                    "waiting_period_seconds must be at least {min} (the server's \
                     --min-deletion-window)"
                )));
            }
            let at = keys
                .clock()
                .now_unix()
                .saturating_add(i64::try_from(waiting).unwrap_or(i64::MAX));
            let record = keys.transition(
                tenant,
                TenantTransition::ScheduleDeletion { deletion_time: at },
            )?;
            // A zero-length window (drills, tests) shreds at once.
            let record = if waiting == 0 {
                keys.destroy_tenant(tenant)?
            } else {
                record
            };
            Ok(convert::tenant(&record))
        })
        .await
    }

    async fn cancel_tenant_deletion(
        &self,
        request: Request<pb::CancelTenantDeletionRequest>,
    ) -> Result<Response<pb::Tenant>, Status> {
        let call = Call::begin(&request, Operation::CancelTenantDeletion);
        let req = request.into_inner();
        self.tenant_call(call, &req.tenant_id, |keys, tenant| {
            keys.cancel_deletion(tenant).map(|r| convert::tenant(&r))
        })
        .await
    }

    async fn declare_blind_index(
        &self,
        request: Request<pb::DeclareBlindIndexRequest>,
    ) -> Result<Response<pb::BlindIndexDefinition>, Status> {
        let call = Call::begin(&request, Operation::DeclareBlindIndex);
        let req = request.into_inner();
        let name = req.name.clone();
        self.index_call(call, &req.tenant_id, Some(name), move |keys, tenant| {
            let scope = match tenant {
                Some(tenant) => {
                    // A tenant's own index only for a tenant that exists and is not destroyed.
                    live_tenant(keys, tenant)?;
                    IndexScope::Tenant(tenant.clone())
                }
                None => IndexScope::AllTenants,
            };
            let definition = IndexDefinition::parse(
                &req.name,
                req.bits,
                &req.normalization,
                scope,
                keys.clock().now_unix(),
            )?;
            let in_force = keys.store().declare_index(&definition)?;
            Ok(convert_index_definition(&in_force))
        })
        .await
    }

    async fn quarantine_token(
        &self,
        request: Request<pb::QuarantineTokenRequest>,
    ) -> Result<Response<pb::QuarantineTokenResponse>, Status> {
        let call = Call::begin(&request, Operation::QuarantineToken);
        let id = request.into_inner().token_id;
        self.containment_call(call, move |keys, caller| {
            let (changed, record) = containment::set_quarantine(
                keys,
                &valid_token_id(&id)?,
                true,
                caller,
                "by an admin (QuarantineToken)",
            )?;
            Ok((pb::QuarantineTokenResponse { changed }, vec![record]))
        })
        .await
    }

    async fn release_token(
        &self,
        request: Request<pb::ReleaseTokenRequest>,
    ) -> Result<Response<pb::ReleaseTokenResponse>, Status> {
        let call = Call::begin(&request, Operation::ReleaseToken);
        let id = request.into_inner().token_id;
        self.containment_call(call, move |keys, caller| {
            let (changed, record) = containment::set_quarantine(
                keys,
                &valid_token_id(&id)?,
                false,
                caller,
                "by an admin (ReleaseToken)",
            )?;
            Ok((pb::ReleaseTokenResponse { changed }, vec![record]))
        })
        .await
    }

    async fn contain_token(
        &self,
        request: Request<pb::ContainTokenRequest>,
    ) -> Result<Response<pb::ContainTokenResponse>, Status> {
        let call = Call::begin(&request, Operation::ContainToken);
        let id = request.into_inner().token_id;
        self.containment_call(call, move |keys, caller| {
            let (done, records) = containment::contain(keys, &valid_token_id(&id)?, caller)?;
            Ok((
                pb::ContainTokenResponse {
                    quarantined: done.quarantined,
                    suspended_tenant_ids: done.suspended,
                    untouched_tenant_ids: done.left.into_iter().map(|(t, _)| t).collect(),
                },
                records,
            ))
        })
        .await
    }

    async fn list_blind_indexes(
        &self,
        request: Request<pb::ListBlindIndexesRequest>,
    ) -> Result<Response<pb::ListBlindIndexesResponse>, Status> {
        let call = Call::begin(&request, Operation::ListBlindIndexes);
        let req = request.into_inner();
        self.index_call(call, &req.tenant_id, None, move |keys, tenant| {
            if let Some(tenant) = tenant {
                live_tenant(keys, tenant)?;
            }
            let definitions = keys.store().list_index_definitions(tenant)?;
            Ok(pb::ListBlindIndexesResponse {
                definitions: definitions.iter().map(convert_index_definition).collect(),
            })
        })
        .await
    }
}

/// A token id as `token list` shows them (16 hex digits); INVALID_ARGUMENT otherwise, without
/// echoing the input (it might be a secret pasted by mistake).
fn valid_token_id(id: &str) -> Result<String> {
    if id.is_empty() || id.len() > 64 || !id.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(Error::InvalidArgument(
            "token_id must be a token's public id (hex, as `tenant-kms token list` shows it), \
             never its secret"
                .into(),
        ));
    }
    Ok(id.to_ascii_lowercase())
}
