//! Containment of a suspected compromised caller (issue 16): quarantine its token (refused
//! PERMISSION_DENIED until an admin releases it; stored with the token, so it survives a
//! restart and holds in every process sharing the key store), and suspend every tenant the
//! token could reach. Nothing is ever destroyed: a release and `ResumeTenant` undo it all.
//!
//! Used by `tenant-kms token quarantine|release|contain` on a data directory (the running
//! server sees the key-store change at its next call) and by the server itself when a
//! detector is configured to quarantine (`anomaly_quarantine`). Each step leaves an audit
//! record: `TokenQuarantine`, `TokenRelease`, and one `SuspendTenant` per suspended tenant
//! (in that tenant's own history, so its per-tenant export shows why it was suspended).

use crate::audit::operation::{Rpc, Task};
use crate::audit::{AuditRecord, Outcome};
use crate::auth::TenantScope;
use crate::domain::lifecycle::TenantTransition;
use crate::domain::{TenantId, TenantState};
use crate::error::{Error, Result};
use crate::keys::KeyManager;

/// What a containment did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Contained {
    /// The token was quarantined now (false: it already was).
    pub quarantined: bool,
    /// Tenants suspended now.
    pub suspended: Vec<String>,
    /// Tenants in the token's scope that were not ACTIVE (left as they were), with their state.
    pub left: Vec<(String, String)>,
}

/// Quarantines (`quarantine`) or releases token `id`; the audit record of the step by
/// `caller`, and whether the token's state changed. NOT_FOUND if there is no such token.
/// Blocking.
pub fn set_quarantine(
    keys: &KeyManager,
    id: &str,
    quarantine: bool,
    caller: &str,
    why: &str,
) -> Result<(bool, AuditRecord)> {
    let store = keys.store();
    if !store.list_tokens()?.iter().any(|t| t.id == id) {
        return Err(Error::NotFound("no token with that id"));
    }
    let at = quarantine.then(|| keys.clock().now_unix());
    let changed = store.set_token_quarantine(id, at)?;
    let (task, verb) = if quarantine {
        (Task::TokenQuarantine, "quarantined")
    } else {
        (Task::TokenRelease, "released")
    };
    let detail = if changed {
        format!("token {id} {verb}: {why}")
    } else {
        format!("token {id} was already {verb}; nothing changed")
    };
    Ok((
        changed,
        AuditRecord::local(task, caller, Outcome::Ok).detail(detail),
    ))
}

/// Quarantines token `id` and suspends every ACTIVE tenant in its scope; what was done and
/// the audit records of every step, by `caller`. Blocking.
pub fn contain(keys: &KeyManager, id: &str, caller: &str) -> Result<(Contained, Vec<AuditRecord>)> {
    let token = keys
        .store()
        .list_tokens()?
        .into_iter()
        .find(|t| t.id == id)
        .ok_or(Error::NotFound("no token with that id"))?;
    let (quarantined, record) = set_quarantine(keys, id, true, caller, "contained")?;
    let mut records = vec![record];
    let mut done = Contained {
        quarantined,
        ..Contained::default()
    };
    for tenant in reachable(keys, &TenantScope::parse(&token.tenants))? {
        let state = keys.store().tenant(&tenant)?.map(|t| t.state);
        match state {
            Some(TenantState::Active) => {
                keys.transition(&tenant, TenantTransition::Suspend)?;
                records.push(
                    AuditRecord::local(Rpc::SuspendTenant, caller, Outcome::Ok)
                        .tenant(tenant.as_str())
                        .detail(format!("contained: token {id} may act for this tenant")),
                );
                done.suspended.push(tenant.as_str().to_owned());
            }
            Some(other) => done
                .left
                .push((tenant.as_str().to_owned(), other.name().to_owned())),
            None => done
                .left
                .push((tenant.as_str().to_owned(), "absent".to_owned())),
        }
    }
    Ok((done, records))
}

/// The tenants a scope reaches: every tenant of the store for `*`, the listed ones otherwise.
fn reachable(keys: &KeyManager, scope: &TenantScope) -> Result<Vec<TenantId>> {
    match scope {
        TenantScope::Only(set) => set.iter().map(|t| TenantId::parse(t)).collect(),
        TenantScope::All => {
            let mut all = Vec::new();
            let mut after: Option<TenantId> = None;
            loop {
                let page = keys.store().list_tenants(after.as_ref(), 1000)?;
                let Some(last) = page.last() else {
                    break;
                };
                after = Some(last.tenant_id.clone());
                all.extend(page.into_iter().map(|t| t.tenant_id));
            }
            Ok(all)
        }
    }
}
