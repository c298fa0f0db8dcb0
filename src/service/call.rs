//! The frame of one request: its id, peer and caller, the fields of its audit record, and the
//! finish that makes the record durable before the answer goes out.

use std::sync::Arc;

use tonic::{Request, Response, Status};
use zeroize::Zeroizing;

use super::state::AppState;
use super::status;
use crate::audit::{AuditRecord, Outcome};
use crate::auth::{Caller, Operation, authorize};
use crate::domain::{Context, TenantId, unix_now_micros};
use crate::error::{Error, Result};

/// Most contexts listed in one audit record (batches may name many).
const MAX_AUDITED_CONTEXTS: usize = 16;

/// One request in flight.
pub struct Call {
    /// Random id, returned to the caller in `x-request-id` and in error messages.
    pub request_id: String,
    operation: Operation,
    peer: String,
    bearer: Option<Zeroizing<String>>,
    caller: Option<Arc<Caller>>,
    tenant: Option<TenantId>,
    contexts: Vec<String>,
    key_versions: Vec<u32>,
    /// Items in the request.
    pub item_count: u32,
    /// Failed items of a batch.
    pub failed_items: u32,
    aad_fingerprint: String,
}

fn new_request_id() -> String {
    let mut id = [0u8; 8];
    rand::RngCore::fill_bytes(&mut rand::rng(), &mut id);
    hex::encode(id)
}

impl Call {
    /// Starts a call: records the peer and takes the bearer token out of the metadata.
    pub fn begin<T>(request: &Request<T>, operation: Operation) -> Self {
        let bearer = request
            .metadata()
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| {
                v.strip_prefix("Bearer ")
                    .or_else(|| v.strip_prefix("bearer "))
            })
            .map(|t| Zeroizing::new(t.trim().to_owned()));
        Self {
            request_id: new_request_id(),
            operation,
            peer: request
                .remote_addr()
                .map_or_else(|| "unknown".to_owned(), |a| a.to_string()),
            bearer,
            caller: None,
            tenant: None,
            contexts: Vec::new(),
            key_versions: Vec::new(),
            item_count: 1,
            failed_items: 0,
            aad_fingerprint: String::new(),
        }
    }

    /// Authenticates the bearer token (after dropping caches if another process changed the
    /// store).
    pub fn authenticate(&mut self, state: &AppState) -> Result<Arc<Caller>> {
        state.refresh()?;
        let bearer = self.bearer.take();
        let caller = state
            .auth
            .authenticate(bearer.as_ref().map(|b| b.as_str()))?;
        self.caller = Some(Arc::clone(&caller));
        Ok(caller)
    }

    /// Authenticates, parses the tenant id and authorizes the call for it.
    pub fn admit(&mut self, state: &AppState, tenant_id: &str) -> Result<TenantId> {
        let caller = self.authenticate(state)?;
        let tenant = TenantId::parse(tenant_id)?;
        self.tenant = Some(tenant.clone());
        authorize(&caller, self.operation, Some(&tenant))?;
        Ok(tenant)
    }

    /// Authenticates and authorizes a call that names no tenant.
    pub fn admit_global(&mut self, state: &AppState) -> Result<Arc<Caller>> {
        let caller = self.authenticate(state)?;
        authorize(&caller, self.operation, None)?;
        Ok(caller)
    }

    /// Notes a context for the audit record (distinct, bounded).
    pub fn note_context(&mut self, context: &Context) {
        if self.contexts.len() < MAX_AUDITED_CONTEXTS
            && !self.contexts.iter().any(|c| c == context.as_str())
        {
            self.contexts.push(context.as_str().to_owned());
        }
    }

    /// Notes a key version for the audit record (distinct).
    pub fn note_version(&mut self, version: u32) {
        if !self.key_versions.contains(&version) {
            self.key_versions.push(version);
        }
    }

    /// Notes the caller AAD, as its keyed fingerprint only.
    pub fn note_aad(&mut self, state: &AppState, aad: &[u8]) {
        self.aad_fingerprint = state.audit.keys().aad_fingerprint(aad);
    }

    /// Writes the audit record and waits until it is durable, then answers. If the record
    /// cannot be written the caller gets UNAVAILABLE and no result (fail closed).
    pub async fn finish<R>(
        self,
        state: &AppState,
        result: Result<R>,
    ) -> Result<Response<R>, Status> {
        let (outcome, detail) = match &result {
            Ok(_) if self.failed_items > 0 => (
                Outcome::Partial,
                format!("{} of {} items failed", self.failed_items, self.item_count),
            ),
            Ok(_) => (Outcome::Ok, String::new()),
            Err(e) => (
                status::outcome(e),
                status::client_message(e, &self.request_id),
            ),
        };
        let record = AuditRecord {
            time_micros: unix_now_micros(),
            request_id: self.request_id.clone(),
            caller: self
                .caller
                .as_ref()
                .map_or_else(|| "anonymous".to_owned(), |c| c.audit_name()),
            peer: self.peer,
            tenant_id: self
                .tenant
                .as_ref()
                .map(|t| t.as_str().to_owned())
                .unwrap_or_default(),
            operation: self.operation.name().to_owned(),
            contexts: self.contexts,
            key_versions: self.key_versions,
            item_count: self.item_count,
            outcome,
            aad_fingerprint: self.aad_fingerprint,
            detail,
        };
        if let Err(e) = state.audit.append(record).await {
            drop(result);
            return Err(status::to_status(&e, &self.request_id));
        }
        match result {
            Ok(value) => {
                let mut response = Response::new(value);
                if let Ok(id) = self.request_id.parse() {
                    response.metadata_mut().insert("x-request-id", id);
                }
                Ok(response)
            }
            Err(e) => Err(status::to_status(&e, &self.request_id)),
        }
    }
}

/// An audit record for something the service does by itself rather than at a caller's
/// request (an automatic rotation, a due destruction); `caller` says what did it, e.g.
/// `server:reaper`.
pub fn system_record(
    caller: &str,
    tenant: &TenantId,
    operation: &str,
    key_versions: Vec<u32>,
    outcome: Outcome,
    detail: String,
) -> AuditRecord {
    AuditRecord {
        time_micros: unix_now_micros(),
        request_id: String::new(),
        caller: caller.to_owned(),
        peer: "local".into(),
        tenant_id: tenant.as_str().to_owned(),
        operation: operation.to_owned(),
        contexts: Vec::new(),
        key_versions,
        item_count: 1,
        outcome,
        aad_fingerprint: String::new(),
        detail,
    }
}

/// The error for a request field we do not use being set (rejected, not ignored).
pub fn unused_field(name: &str) -> Error {
    Error::InvalidArgument(format!(
        "field {name} is not used by this call and must be empty"
    ))
}
