//! `tenant-kms usage --tenant T [--since TIME] [--until TIME] [--json]`: a tenant's usage over
//! a time range through a running server (`AuditService.GetUsage`; an admin or auditor
//! token). Prints a table for people, or with `--json` one JSON document.

use std::process::ExitCode;

use clap::Args;

use super::audit::parse_time;
use super::client::{ClientArgs, runtime};
use super::json;
use crate::error::Result;
use tenant_kms_client::pb;

/// Arguments of `usage`.
#[derive(Debug, Args)]
pub struct UsageArgs {
    /// The tenant.
    #[arg(long)]
    tenant: String,
    /// From this time (RFC 3339 or a date like 2026-11-01), inclusive, rounded down to its
    /// minute. Default: from the beginning.
    #[arg(long)]
    since: Option<String>,
    /// Until this time (RFC 3339 or a date), exclusive, rounded up to a minute. Default: now.
    #[arg(long)]
    until: Option<String>,
    /// Print JSON instead of a table.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    client: ClientArgs,
}

fn timestamp(text: &Option<String>) -> Result<Option<prost_types::Timestamp>> {
    text.as_deref()
        .map(|t| parse_time(t).map(crate::service::convert::timestamp_micros))
        .transpose()
}

/// The answer as one JSON document (field names as in the proto).
fn usage_json(tenant: &str, u: &pb::GetUsageResponse) -> serde_json::Value {
    let entries: Vec<serde_json::Value> = u
        .entries
        .iter()
        .map(|e| {
            serde_json::json!({
                "caller": e.caller,
                "operation": e.operation,
                "outcome": e.outcome,
                "calls": json::u64_(e.calls),
                "items": json::u64_(e.items),
                "failed_items": json::u64_(e.failed_items),
                "request_bytes": json::u64_(e.request_bytes),
                "response_bytes": json::u64_(e.response_bytes),
            })
        })
        .collect();
    serde_json::json!({
        "tenant_id": tenant,
        "since": json::timestamp(&u.since),
        "until": json::timestamp(&u.until),
        "calls": json::u64_(u.calls),
        "items": json::u64_(u.items),
        "request_bytes": json::u64_(u.request_bytes),
        "response_bytes": json::u64_(u.response_bytes),
        "denials": json::u64_(u.denials),
        "decrypt_failures": json::u64_(u.decrypt_failures),
        "entries": entries,
    })
}

fn print_table(tenant: &str, u: &pb::GetUsageResponse) {
    println!(
        "usage of tenant {tenant} from {} until {}",
        text_time(&u.since),
        text_time(&u.until)
    );
    println!(
        "{:<28} {:<32} {:<20} {:>10} {:>10} {:>8} {:>12} {:>12}",
        "CALLER", "OPERATION", "OUTCOME", "CALLS", "ITEMS", "FAILED", "REQ_BYTES", "RESP_BYTES"
    );
    for e in &u.entries {
        println!(
            "{:<28} {:<32} {:<20} {:>10} {:>10} {:>8} {:>12} {:>12}",
            e.caller,
            e.operation,
            e.outcome,
            e.calls,
            e.items,
            e.failed_items,
            e.request_bytes,
            e.response_bytes
        );
    }
    println!(
        "total: {} calls, {} items, {} denials, {} decrypt failures, {} request bytes, {} \
         response bytes",
        u.calls, u.items, u.denials, u.decrypt_failures, u.request_bytes, u.response_bytes
    );
}

/// Runs `usage`.
pub fn run(args: UsageArgs) -> Result<ExitCode> {
    let request = pb::GetUsageRequest {
        tenant_id: args.tenant.clone(),
        since: timestamp(&args.since)?,
        until: timestamp(&args.until)?,
    };
    let usage = runtime()?.block_on(
        args.client
            .call(|c| async move { c.get_usage(request).await }),
    )?;
    if args.json {
        json::print(&usage_json(&args.tenant, &usage));
    } else {
        print_table(&args.tenant, &usage);
    }
    Ok(ExitCode::SUCCESS)
}

/// A time as the table prints it: RFC 3339, or `-` when the server sent none.
fn text_time(ts: &Option<prost_types::Timestamp>) -> String {
    match json::timestamp(ts) {
        serde_json::Value::String(text) => text,
        _ => "-".to_owned(),
    }
}
