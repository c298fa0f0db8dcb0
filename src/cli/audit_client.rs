//! `tenant-kms audit list` and `audit verify-chain`: the audit log through a running server
//! (ListAuditEvents, VerifyAuditChain), for operators who hold an auditor token but not the
//! data directory. Output: one JSON line per event, or the verification as one JSON line.

use std::process::ExitCode;

use clap::Args;

use super::client::{ClientArgs, answer, runtime};
use super::json;
use crate::error::Result;
use tenant_kms_client::pb;

/// Arguments of `audit list`.
#[derive(Debug, Args)]
pub struct ListArgs {
    /// Only this tenant.
    #[arg(long)]
    tenant: Option<String>,
    /// From this time (RFC 3339, e.g. 2026-11-01T00:00:00Z, or a date), inclusive.
    #[arg(long, value_parser = rfc3339)]
    since: Option<prost_types::Timestamp>,
    /// Until this time (RFC 3339 or a date), exclusive.
    #[arg(long, value_parser = rfc3339)]
    until: Option<prost_types::Timestamp>,
    /// Only this operation, e.g. Encrypt.
    #[arg(long)]
    operation: Option<String>,
    #[command(flatten)]
    pub(super) client: ClientArgs,
}

/// A time flag ([`super::audit::time_arg`]: RFC 3339 or a date) as a protobuf timestamp,
/// checked while parsing (a bad one is a usage error).
fn rfc3339(text: &str) -> std::result::Result<prost_types::Timestamp, String> {
    let since_epoch = super::audit::time_arg(text)?;
    Ok(prost_types::Timestamp {
        seconds: i64::try_from(since_epoch.as_secs()).unwrap_or(i64::MAX),
        nanos: i32::try_from(since_epoch.subsec_nanos()).unwrap_or(0),
    })
}

/// Runs `audit list`: every matching event, page by page, one JSON line each.
pub fn run_list(args: ListArgs) -> Result<ExitCode> {
    args.client.check()?;
    runtime()?.block_on(async move {
        let audit = args.client.connect().await?;
        let mut page_token = String::new();
        loop {
            let page = answer(
                audit
                    .list_audit_events(pb::ListAuditEventsRequest {
                        tenant_id: args.tenant.clone().unwrap_or_default(),
                        since: args.since,
                        until: args.until,
                        operation: args.operation.clone().unwrap_or_default(),
                        page_size: 1000,
                        page_token,
                    })
                    .await,
            )?;
            for event in &page.events {
                json::print(&json::audit_event(event));
            }
            if page.next_page_token.is_empty() {
                return Ok(ExitCode::SUCCESS);
            }
            page_token = page.next_page_token;
        }
    })
}

/// Runs `audit verify-chain`: the server walks its audit chain; exit 0 when whole, 1 when
/// not (the first bad record named).
pub fn run_verify_chain(client: ClientArgs) -> Result<ExitCode> {
    client.check()?;
    runtime()?.block_on(async move {
        let audit = client.connect().await?;
        let r = answer(
            audit
                .verify_audit_chain(pb::VerifyAuditChainRequest::default())
                .await,
        )?;
        json::print(&serde_json::json!({
            "ok": r.ok,
            "records_checked": json::u64_(r.records_checked),
            "first_bad_seq": json::u64_(r.first_bad_seq),
        }));
        Ok(if r.ok {
            ExitCode::SUCCESS
        } else {
            ExitCode::from(super::EXIT_FAILURE)
        })
    })
}
