//! `tenantkms.v1.AuditService`: reading the audit log and verifying its chain. Reads go to the
//! state's reader log (its own connection for SQLite, never the writer's) on the blocking
//! pool.

use std::sync::Arc;

use crate::telemetry::InCallExt;
use tonic::{Request, Response, Status};

use super::call::Call;
use super::state::AppState;
use super::{blocking, convert};
use crate::audit::{ListFilter, MergeCursor, MergedRecord};
use crate::auth::{Operation, TenantScope};
use crate::domain::TenantId;
use crate::error::{Error, Result};
use crate::pb;
use crate::pb::audit_service_server::AuditService;

const DEFAULT_PAGE: usize = 100;
const MAX_PAGE: usize = 1000;

/// The AuditService implementation.
pub struct AuditServiceImpl {
    state: Arc<AppState>,
}

impl AuditServiceImpl {
    /// A service over the shared state.
    pub fn new(state: Arc<AppState>) -> Self {
        Self { state }
    }
}

#[tonic::async_trait]
impl AuditService for AuditServiceImpl {
    async fn list_audit_events(
        &self,
        request: Request<pb::ListAuditEventsRequest>,
    ) -> Result<Response<pb::ListAuditEventsResponse>, Status> {
        let mut call = Call::begin(&request, Operation::ListAuditEvents);
        let req = request.into_inner();
        let span = call.span();
        let result = async {
            let tenant = if req.tenant_id.is_empty() {
                let caller = call.admit_global(&self.state).await?;
                if caller.tenants != TenantScope::All {
                    return Err(Error::PermissionDenied(
                        "this token is limited to some tenants: name one in tenant_id".into(),
                    ));
                }
                String::new()
            } else {
                call.admit(&self.state, &req.tenant_id)
                    .await?
                    .as_str()
                    .to_owned()
            };
            let limit = match req.page_size {
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
                    MergeCursor::parse(&req.page_token)
                        .ok_or_else(|| Error::InvalidArgument("page_token is invalid".into()))?,
                )
            };
            let filter = ListFilter {
                tenant_id: tenant,
                since_micros: req.since.as_ref().map(convert::micros_of),
                until_micros: req.until.as_ref().map(convert::micros_of),
                operation: req.operation,
                limit: limit + 1,
                ..ListFilter::default()
            };
            let reader = Arc::clone(&self.state.audit_reader);
            // Every node's chain, merged in time order (one chain on SQLite).
            let rows = blocking(move || reader.list_merged(&filter, after.as_ref())).await?;
            let more = rows.len() > limit;
            let next_page_token = if more {
                rows.get(limit - 1)
                    .map(|m| m.cursor().token())
                    .unwrap_or_default()
            } else {
                String::new()
            };
            let events: Vec<pb::AuditEvent> = rows
                .into_iter()
                .take(limit)
                .map(
                    |MergedRecord {
                         chain,
                         seq,
                         record: r,
                     }| pb::AuditEvent {
                        seq,
                        node_id: chain,
                        time: Some(convert::timestamp_micros(r.time_micros)),
                        request_id: r.request_id,
                        caller: r.caller,
                        peer: r.peer,
                        tenant_id: r.tenant_id,
                        operation: r.operation,
                        contexts: r.contexts,
                        key_versions: r.key_versions,
                        item_count: r.item_count,
                        outcome: r.outcome.as_str().to_owned(),
                        aad_fingerprint: r.aad_fingerprint,
                        detail: r.detail,
                        trace_parent: r.trace_parent,
                    },
                )
                .collect();
            call.item_count = events.len() as u32;
            Ok(pb::ListAuditEventsResponse {
                events,
                next_page_token,
            })
        }
        .in_call(span)
        .await;
        call.finish(&self.state, result).await
    }

    async fn verify_audit_chain(
        &self,
        request: Request<pb::VerifyAuditChainRequest>,
    ) -> Result<Response<pb::VerifyAuditChainResponse>, Status> {
        let mut call = Call::begin(&request, Operation::VerifyAuditChain);
        let span = call.span();
        let result = async {
            call.admit_global(&self.state).await?;
            let reader = Arc::clone(&self.state.audit_reader);
            let report = blocking(move || reader.verify()).await?;
            Ok(pb::VerifyAuditChainResponse {
                ok: report.ok,
                records_checked: report.records_checked,
                first_bad_seq: report.first_bad_seq,
            })
        }
        .in_call(span)
        .await;
        call.finish(&self.state, result).await
    }

    async fn get_usage(
        &self,
        request: Request<pb::GetUsageRequest>,
    ) -> Result<Response<pb::GetUsageResponse>, Status> {
        let mut call = Call::begin(&request, Operation::GetUsage);
        let req = request.into_inner();
        let span = call.span();
        let result = async {
            let tenant = call.admit(&self.state, &req.tenant_id).await?;
            super::usage_query::get_usage(&self.state, &tenant, &req).await
        }
        .in_call(span)
        .await;
        call.finish(&self.state, result).await
    }
}

/// Parses a tenant filter (used by the export command).
pub fn parse_tenant_filter(raw: &str) -> Result<String> {
    if raw.is_empty() {
        return Ok(String::new());
    }
    Ok(TenantId::parse(raw)?.as_str().to_owned())
}
