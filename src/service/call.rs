//! The frame of one request: its id, peer and caller, the fields of its audit record, and the
//! finish that makes the record durable before the answer goes out.
//!
//! Authentication: a bearer token (`authorization: Bearer …`) when the request carries one;
//! otherwise a verified client certificate listed in `[[tls_callers]]`; otherwise the call is
//! UNAUTHENTICATED. A request with a token is judged by the token alone: a bad token is not
//! rescued by a good certificate. After authentication the caller's rate limit is charged
//! (for a failed authentication, the peer address's), before anything else happens.
//!
//! Every call leaves one audit record: [`Call::finish`] writes it durably before answering,
//! and a call dropped before its finish (its deadline passed, or the client went away) writes
//! one from `Drop` with outcome `deadline_exceeded` or `cancelled`, without waiting (no answer
//! goes out, so there is nothing to hold back).

use std::sync::Arc;
use std::time::Instant;

use tonic::{Request, Response, Status};
use zeroize::Zeroizing;

use super::admission::Ticket;
use super::guard::{AdmissionHandle, RequestDeadline};
use super::refusals::{RefusalKind, RefusalsHandle, peer_ip};
use super::state::AppState;
use super::status;
use crate::audit::writer::CallInFlight;
use crate::audit::{AuditRecord, Operation as AuditOperation, Outcome};
use crate::auth::{Caller, Operation, authorize};
use crate::domain::{Context, TenantId};
use crate::error::Result;

/// Most contexts listed in one audit record (batches may name many).
const MAX_AUDITED_CONTEXTS: usize = 16;

/// One request in flight.
pub struct Call {
    /// Random id, returned to the caller in `x-request-id` and in error messages.
    pub request_id: String,
    operation: Operation,
    peer: String,
    bearer: Option<Zeroizing<String>>,
    peer_certs: Option<Arc<Vec<tonic::transport::CertificateDer<'static>>>>,
    deadline: Option<tokio::time::Instant>,
    /// The server's admission counter (absent only outside the guard, e.g. in unit tests).
    admission: Option<AdmissionHandle>,
    /// This call's place under the concurrency cap, taken once the caller is authenticated
    /// and held until the call is dropped.
    _ticket: Option<Ticket>,
    /// The call was refused a place under the cap: it is answered without an audit record
    /// (it touched nothing, and an overload must not be turned into audit writes).
    unaudited: bool,
    /// The server's refusal counters (absent only outside the guard).
    refusals: Option<RefusalsHandle>,
    /// The call proved no identity: instead of its own record it is counted in the
    /// aggregated refusal audit (see `refusals`) when it finishes.
    aggregated: Option<RefusalKind>,
    /// Set once the call is admitted to the audit path, and counted from then among the
    /// audit writer's calls in flight (so no other caller commits a batch of one in place
    /// while this call is about to append); the call appends its record through it. A call
    /// dropped with it set and `finished` unset writes its record from `Drop`.
    audit: Option<CallInFlight>,
    finished: bool,
    caller: Option<Arc<Caller>>,
    /// A known token that was refused (revoked, expired), as the audit names it.
    refused_as: Option<String>,
    tenant: Option<TenantId>,
    contexts: Vec<String>,
    key_versions: Vec<u32>,
    /// Items in the request.
    pub item_count: u32,
    /// Failed items of a batch.
    pub failed_items: u32,
    /// Items of a batch whose ciphertext did not open (the tampering detector's input).
    pub failed_opens: u32,
    aad_fingerprint: String,
    /// Encoded size of the request, for usage accounting.
    request_bytes: u64,
    started: Instant,
    /// The tracing span every log line of this call is emitted in (carries the request id,
    /// the tenant once known, and the caller's trace), made only once a line or the trace
    /// exporter needs it (`telemetry`).
    span: crate::telemetry::CallSpan,
    /// The caller's valid W3C `traceparent`, carried into the audit record.
    trace: Option<super::traceparent::TraceParent>,
}

/// A fresh random request id (16 lower-case hex digits, 64 bits from the thread's CSPRNG).
pub(crate) fn new_request_id() -> String {
    crate::domain::hex::lower_hex(&rand::random::<[u8; 8]>())
}

impl Call {
    /// Starts a call: records the peer and takes the bearer token out of the metadata.
    pub fn begin<T: prost::Message>(request: &Request<T>, operation: Operation) -> Self {
        let bearer = request
            .metadata()
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| {
                v.strip_prefix("Bearer ")
                    .or_else(|| v.strip_prefix("bearer "))
            })
            .map(|t| Zeroizing::new(t.trim().to_owned()));
        let request_id = new_request_id();
        // An invalid traceparent is ignored (W3C Trace Context): the call goes on untraced.
        let trace = request
            .metadata()
            .get("traceparent")
            .and_then(|v| v.to_str().ok())
            .and_then(super::traceparent::TraceParent::parse);
        // The tenant is filled in once parsed (`admit`), so every later line names it.
        let span = crate::telemetry::CallSpan::new(
            &request_id,
            operation.name(),
            trace.as_ref().map(|t| crate::telemetry::RemoteParent {
                trace_id: &t.trace_id,
                span_id: &t.parent_id,
                flags: t.flags,
            }),
        );
        Self {
            span,
            trace,
            request_id,
            operation,
            peer: super::connections::peer_text(request.remote_addr()),
            bearer,
            peer_certs: request.peer_certs(),
            deadline: request.extensions().get::<RequestDeadline>().map(|d| d.0),
            admission: request.extensions().get::<AdmissionHandle>().cloned(),
            _ticket: None,
            unaudited: false,
            refusals: request.extensions().get::<RefusalsHandle>().cloned(),
            aggregated: None,
            audit: None,
            finished: false,
            caller: None,
            refused_as: None,
            tenant: None,
            contexts: Vec::new(),
            key_versions: Vec::new(),
            item_count: 1,
            failed_items: 0,
            failed_opens: 0,
            aad_fingerprint: String::new(),
            request_bytes: request.get_ref().encoded_len() as u64,
            started: Instant::now(),
        }
    }

    /// Authenticates the caller (see the module docs; token caches are dropped first if
    /// another process changed the store), takes its place under the concurrency cap (see
    /// `admission`) and charges its rate limit.
    pub fn authenticate(&mut self, state: &AppState) -> Result<Arc<Caller>> {
        let identified = self.identify(state);
        if let (Ok(caller), Some(admission)) = (&identified, &self.admission) {
            match admission.0.admit(caller.audit_name()) {
                Ok(ticket) => self._ticket = Some(ticket),
                Err(refused) => {
                    tracing::debug!(parent: &self.span.span(), "request refused: {}", refused.0);
                    self.unaudited = true;
                    return Err(crate::error::Error::RetryLater {
                        reason: refused.0,
                        retry_after_ms: 100,
                    });
                }
            }
        }
        let caller = match identified {
            Ok(caller) => caller,
            Err(e) => return Err(self.refuse(state, e)),
        };
        self.audit = Some(state.audit.begin_call());
        self.caller = Some(Arc::clone(&caller));
        let name = caller.audit_name();
        state
            .detectors
            .check_throttle(name)
            .map_err(|wait| crate::error::Error::RetryLater {
                reason: "this caller is throttled after an anomaly was detected in its calls; \
                         an operator can see why in the audit log (operation Anomaly)"
                    .to_owned(),
                retry_after_ms: u64::try_from(wait.as_millis()).unwrap_or(u64::MAX).max(1),
            })?;
        self.charge(state, name)?;
        Ok(caller)
    }

    /// A failed authentication. Charged, as every failed authentication is, to the rate
    /// limit of the peer's address (so guessing is throttled), and (see `refusals`) to the
    /// refusal budget of the peer, or of the dead token it presented. A call that proved no
    /// identity is counted in the aggregated audit instead of writing its own record, and so
    /// is a dead token's call past its budget; other dead-token calls keep their own record.
    /// Store failures keep their own record too (they are the server's fault).
    fn refuse(&mut self, state: &AppState, error: crate::error::Error) -> crate::error::Error {
        let peer_key = format!("peer:{}", peer_ip(&self.peer));
        let refusals = self
            .refusals
            .clone()
            .filter(|_| matches!(error, crate::error::Error::Unauthenticated));
        let Some(refusals) = refusals else {
            self.audit = Some(state.audit.begin_call());
            return self.charge(state, &peer_key).err().unwrap_or(error);
        };
        let budget_key = self.refused_as.clone().unwrap_or_else(|| peer_key.clone());
        let over_budget = refusals.0.charge(&budget_key).err().map(|wait| {
            let budget = refusals.0.budget();
            crate::error::Error::RetryLater {
                reason: format!(
                    "too many refused authentications from this peer (limit {} per second, \
                     burst {})",
                    budget.per_second, budget.burst
                ),
                retry_after_ms: u64::try_from(wait.as_millis()).unwrap_or(u64::MAX).max(1),
            }
        });
        let answer = self
            .charge(state, &peer_key)
            .err()
            .or(over_budget)
            .unwrap_or(error);
        let dead_token_within_budget =
            self.refused_as.is_some() && !matches!(answer, crate::error::Error::RetryLater { .. });
        if dead_token_within_budget {
            self.audit = Some(state.audit.begin_call());
        } else {
            self.aggregated = Some(RefusalKind::Unauthenticated);
        }
        answer
    }

    fn identify(&mut self, state: &AppState) -> Result<Arc<Caller>> {
        if let Some(bearer) = self.bearer.take() {
            return state.auth.check(Some(bearer.as_str())).map_err(|refused| {
                self.refused_as = refused.known_token;
                refused.error
            });
        }
        if let Some(end_entity) = self.peer_certs.as_ref().and_then(|c| c.first())
            && let Some(caller) = state.options.tls_callers.caller_for(end_entity.as_ref())?
        {
            return Ok(Arc::new(caller));
        }
        Err(crate::error::Error::Unauthenticated)
    }

    fn charge(&self, state: &AppState, key: &str) -> Result<()> {
        state.limiter.check(key).map_err(|wait| {
            let retry_after_ms = u64::try_from(wait.as_millis()).unwrap_or(u64::MAX).max(1);
            crate::error::Error::RetryLater {
                reason: format!(
                    "rate limit of {} calls per second (burst {}) reached for this caller",
                    state.limiter.limit().per_second,
                    state.limiter.limit().burst
                ),
                retry_after_ms,
            }
        })
    }

    /// The span of this call: handlers run their work in it (`InCallExt::in_call`), so every
    /// log line written on behalf of the call carries its request id.
    pub fn span(&self) -> crate::telemetry::CallSpan {
        self.span.clone()
    }

    /// Authenticates, parses the tenant id and authorizes the call for it.
    pub async fn admit(&mut self, state: &AppState, tenant_id: &str) -> Result<TenantId> {
        state.refresh().await?;
        let caller = self.authenticate(state)?;
        let tenant = TenantId::parse(tenant_id)?;
        self.span.record_tenant(tenant.as_str());
        self.tenant = Some(tenant.clone());
        authorize(&caller, self.operation, Some(&tenant))?;
        Ok(tenant)
    }

    /// Authenticates and authorizes a call that names no tenant.
    pub async fn admit_global(&mut self, state: &AppState) -> Result<Arc<Caller>> {
        state.refresh().await?;
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

    /// Searchable columns: authorizes an admitted call for a second operation it also
    /// performs (an Encrypt or Rewrap that computes blind indexes also needs
    /// `ComputeBlindIndex`), for the same tenant.
    pub fn authorize_also(&self, operation: Operation) -> Result<()> {
        let caller = self
            .caller
            .as_ref()
            .ok_or(crate::error::Error::Unauthenticated)?;
        authorize(caller, operation, self.tenant.as_ref())
    }

    /// Searchable columns: notes a blind index name for the audit record, among the
    /// contexts, as `blind-index:NAME`.
    pub fn note_index(&mut self, name: &crate::domain::index::IndexName) {
        let noted = format!("blind-index:{name}");
        if self.contexts.len() < MAX_AUDITED_CONTEXTS && !self.contexts.contains(&noted) {
            self.contexts.push(noted);
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
    pub async fn finish<R: prost::Message>(
        mut self,
        state: &AppState,
        result: Result<R>,
    ) -> Result<Response<R>, Status> {
        self.finished = true;
        let result = match (self.aggregated, self.refusals.clone(), result) {
            (Some(kind), Some(refusals), Err(e)) => {
                // The answer is settled before awaiting, so the error is not held across it.
                let answer = status::to_status(&e, &self.request_id);
                let outcome = status::outcome(&e);
                drop(e);
                let caller = self
                    .refused_as
                    .take()
                    .unwrap_or_else(|| "anonymous".to_owned());
                let recorded = refusals
                    .0
                    .record(
                        kind,
                        peer_ip(&self.peer),
                        &caller,
                        self.operation.name(),
                        &self.request_id,
                    )
                    .await;
                crate::metrics::global().rpc(
                    self.operation,
                    outcome.as_str(),
                    self.started.elapsed(),
                );
                return Err(match recorded {
                    Ok(()) => answer,
                    Err(audit_error) => status::to_status(&audit_error, &self.request_id),
                });
            }
            (_, _, result) => result,
        };
        if self.unaudited
            && let Err(e) = &result
        {
            crate::metrics::global().rpc(
                self.operation,
                Outcome::Exhausted.as_str(),
                self.started.elapsed(),
            );
            return Err(status::to_status(e, &self.request_id));
        }
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
        // No detail in the log: messages are secret-free, but one line per call at debug is
        // enough to follow a request id through the log.
        tracing::debug!(parent: &self.span.span(), outcome = outcome.as_str(), "call finished");
        let record = self.record(outcome, detail);
        let appended = match self.audit.take() {
            Some(audit) => audit.append(record).await,
            // Never admitted to the audit path (refused before its caller was known).
            None => state.audit.append(record).await,
        };
        let counted_outcome = if appended.is_ok() {
            outcome.as_str()
        } else {
            "unavailable"
        };
        crate::metrics::global().rpc(self.operation, counted_outcome, self.started.elapsed());
        self.count_usage(state, counted_outcome, &result, appended.is_ok());
        if let Err(e) = appended {
            drop(result);
            return Err(status::to_status(&e, &self.request_id));
        }
        // Settled before awaiting: the result itself is not held across the await.
        let seen = Seen::of(&result);
        self.detect(state, seen).await;
        match result {
            Ok(value) => {
                let mut response = Response::new(value);
                // The id's last use: its buffer becomes the header's without a copy.
                let id = std::mem::take(&mut self.request_id);
                if let Some(id) = status::request_id_value(id) {
                    response.metadata_mut().insert("x-request-id", id);
                }
                Ok(response)
            }
            Err(e) => Err(status::to_status(&e, &self.request_id)),
        }
    }
}

impl Call {
    /// Shows this finished call to the anomaly detectors and records what they found
    /// (`service::anomaly`). Calls that proved no identity are not shown (the refusal audit
    /// counts them).
    async fn detect(&self, state: &AppState, seen: Seen) {
        let Some(caller) = &self.caller else {
            return;
        };
        let name = caller.audit_name();
        let decrypting = self.operation.opens_ciphertext();
        let failed_opens = if seen.failed_open {
            1
        } else {
            u64::from(self.failed_opens)
        };
        let decrypted = if seen.ok && decrypting {
            u64::from(self.item_count.saturating_sub(self.failed_items))
        } else {
            0
        };
        let peer = peer_ip(&self.peer);
        // Over mTLS the client certificate is part of the peer (only named when `new_peer` is
        // on; each certificate is parsed once, then found by its bytes).
        let certificate = self
            .peer_certs
            .as_ref()
            .and_then(|certs| certs.first())
            .filter(|_| state.detectors.is_on(crate::detect::Detector::NewPeer))
            .map(|der| state.detectors.peer_certificate(der.as_ref()));
        let findings = state.detectors.observe(&crate::detect::Observation {
            caller: name,
            tenant: self.tenant.as_ref().map(TenantId::as_str),
            peer,
            peer_certificate: certificate.as_deref(),
            decrypted,
            failed_opens,
            refused: seen.refused,
            created_tenant: self.operation == Operation::CreateTenant && seen.ok,
        });
        if !findings.is_empty() {
            super::anomaly::report(state, findings, peer, &self.request_id).await;
        }
    }

    /// Counts this call in the server's usage accounting (calls naming a tenant, by an
    /// authenticated caller, only: usage is queried per tenant).
    fn count_usage<R: prost::Message>(
        &self,
        state: &AppState,
        outcome: &'static str,
        result: &Result<R>,
        answered: bool,
    ) {
        let (Some(tenant), Some(caller)) = (&self.tenant, &self.caller) else {
            return;
        };
        let response_bytes = match result {
            Ok(value) if answered => value.encoded_len() as u64,
            _ => 0,
        };
        state.usage.record(
            tenant.as_str(),
            caller.audit_name(),
            self.operation.name(),
            outcome,
            &crate::usage::UsageCounts {
                calls: 1,
                items: u64::from(self.item_count),
                failed_items: u64::from(self.failed_items),
                request_bytes: self.request_bytes,
                response_bytes,
            },
        );
    }

    /// The audit record of this call with the given outcome (moves the collected fields out).
    fn record(&mut self, outcome: Outcome, detail: String) -> AuditRecord {
        let caller = match (&self.caller, self.refused_as.take()) {
            (Some(caller), _) => caller.audit_name().to_owned(),
            (None, Some(refused)) => refused,
            (None, None) => "anonymous".to_owned(),
        };
        AuditRecord::new(self.operation, caller, self.peer.clone(), outcome)
            .request_id(self.request_id.clone())
            .trace_parent(self.trace.as_ref().map(|t| t.header()).unwrap_or_default())
            .tenant(
                self.tenant
                    .as_ref()
                    .map(|t| t.as_str().to_owned())
                    .unwrap_or_default(),
            )
            .contexts(std::mem::take(&mut self.contexts))
            .versions(std::mem::take(&mut self.key_versions))
            .items(self.item_count)
            .aad_fingerprint(std::mem::take(&mut self.aad_fingerprint))
            .detail(detail)
    }
}

/// What the detectors need to know of a call's result.
#[derive(Debug, Clone, Copy)]
struct Seen {
    ok: bool,
    /// Answered with the generic decryption failure (a ciphertext that did not open).
    failed_open: bool,
    /// Answered PERMISSION_DENIED or NOT_FOUND.
    refused: bool,
}

impl Seen {
    fn of<R>(result: &Result<R>) -> Self {
        use crate::error::Error;
        Self {
            ok: result.is_ok(),
            failed_open: matches!(result, Err(Error::DecryptFailed)),
            refused: matches!(result, Err(Error::PermissionDenied(_) | Error::NotFound(_))),
        }
    }
}

impl Drop for Call {
    /// A call dropped before [`Call::finish`] (deadline passed, client gone) still leaves its
    /// audit record. It is queued without waiting: no answer carrying a result goes out.
    fn drop(&mut self) {
        if self.finished {
            return;
        }
        let Some(audit) = self.audit.take() else {
            return; // never admitted: nothing was looked at
        };
        let deadline_passed = self
            .deadline
            .is_some_and(|d| d <= tokio::time::Instant::now());
        let (outcome, detail) = if deadline_passed {
            (
                Outcome::DeadlineExceeded,
                "deadline passed before the answer; none was sent",
            )
        } else {
            (
                Outcome::Cancelled,
                "the caller went away before the answer; none was sent",
            )
        };
        let record = self.record(outcome, detail.to_owned());
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            runtime.spawn(async move {
                if let Err(e) = audit.append(record).await {
                    tracing::error!(error = %e, "could not audit an abandoned call");
                }
            });
        }
    }
}

/// An audit record for something the service does by itself rather than at a caller's
/// request (an automatic rotation, a due destruction); `caller` says what did it, e.g.
/// `server:reaper`.
pub fn system_record(
    caller: &str,
    tenant: &TenantId,
    operation: impl Into<AuditOperation>,
    key_versions: Vec<u32>,
    outcome: Outcome,
    detail: String,
) -> AuditRecord {
    AuditRecord::local(operation, caller, outcome)
        .tenant(tenant.as_str())
        .versions(key_versions)
        .detail(detail)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_ids_are_sixteen_lower_case_hex_digits_and_differ() {
        let ids: Vec<String> = (0..64).map(|_| new_request_id()).collect();
        for id in &ids {
            assert_eq!(id.len(), 16, "{id}");
            assert!(
                id.bytes()
                    .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)),
                "{id}"
            );
        }
        let distinct: std::collections::HashSet<&String> = ids.iter().collect();
        assert_eq!(distinct.len(), ids.len());
        // Every digit position takes more than one value: no nibble is stuck.
        for position in 0..16 {
            let values: std::collections::HashSet<u8> =
                ids.iter().map(|id| id.as_bytes()[position]).collect();
            assert!(values.len() > 1, "digit {position} never changed");
        }
    }
}
