//! Per-tenant export and import: one tenant's metadata and wrapped key versions in a file
//! MAC'd under a key derived from the master key and bound to the tenant id, and the plan that
//! puts exactly that tenant back (new, or rolled back to the export) without touching any
//! other.
//!
//! Rolling back keeps what is newer than the export rather than losing it: versions the
//! store has and the export lacks stay, DISABLED (their keys kept, their numbers never
//! reused); versions destroyed since the export stay destroyed.
//!
//! # File format
//!
//! `<body>\n<mac>\n`: `body` is one line of JSON ([`TenantExport`]); `mac` is the lower-case
//! hex HMAC-SHA256 of `lp(label) ‖ body` under the key derived from master version
//! `mac_master_version` with label [`labels::TENANT_EXPORT`] and the tenant id as binding
//! ([`super::mac`]). Any byte changed anywhere fails; so does a file relabelled for another
//! tenant, since its key is another tenant's. Wrapped keys stay wrapped (and each is bound to
//! its tenant and version by its own AAD): the file is useless without the master keyring.

use base64::Engine;
use serde::{Deserialize, Serialize};

use super::ledger::LedgerContents;
use super::mac::MacKey;
use super::manifest::{MasterCheck, check_keyring};
use crate::crypto::labels;
use crate::domain::{KeyVersionState, TenantId, TenantState, unix_now};
use crate::error::{Error, Result};
use crate::keys::MasterKeyring;
use crate::keys::wrapping::{TenantKeyWrapping, UnwrapFailure};
use crate::store::{KeyStore, KeyVersionRecord, TenantRecord, WrappedTenantKey};

/// The format name and version written into every export.
pub const FORMAT: &str = "tenant-kms-tenant-export/1";

/// The tenant's row, as exported.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExportedTenant {
    /// `ACTIVE`, `SUSPENDED` or `PENDING_DELETION`.
    pub state: String,
    /// The primary version.
    pub primary_version: u32,
    /// Unix seconds.
    pub created_at: i64,
    /// Rotation period (0: by budget or on demand only).
    pub rotation_period_seconds: u64,
    /// Nonce budget per version.
    pub max_encryptions: u64,
    /// When a pending deletion becomes destruction.
    pub deletion_time: Option<i64>,
}

/// One key version, as exported.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExportedVersion {
    /// Version number.
    pub version: u32,
    /// `ENABLED`, `DISABLED` or `DESTROYED`.
    pub state: String,
    /// Unix seconds.
    pub created_at: i64,
    /// Encryptions reserved so far.
    pub encryptions: u64,
    /// The master version wrapping the key (absent once destroyed).
    pub master_version: Option<u32>,
    /// The wrapped key, base64 (absent once destroyed).
    pub wrapped_key: Option<String>,
}

/// The body of an export file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TenantExport {
    /// [`FORMAT`].
    pub format: String,
    /// The tenant; also the MAC key's binding.
    pub tenant_id: String,
    /// Unix seconds.
    pub exported_at: i64,
    /// The master version whose derived key MACs the file.
    pub mac_master_version: u32,
    /// Check values of the master versions the file's keys are wrapped under.
    pub master_keys: Vec<MasterCheck>,
    /// The tenant's row.
    pub tenant: ExportedTenant,
    /// Its key versions, oldest first.
    pub versions: Vec<ExportedVersion>,
}

fn tenant_state_name(state: TenantState) -> &'static str {
    match state {
        TenantState::Active => "ACTIVE",
        TenantState::Suspended => "SUSPENDED",
        TenantState::PendingDeletion => "PENDING_DELETION",
        TenantState::Destroyed => "DESTROYED",
    }
}

fn version_state_name(state: KeyVersionState) -> &'static str {
    match state {
        KeyVersionState::Enabled => "ENABLED",
        KeyVersionState::Disabled => "DISABLED",
        KeyVersionState::Destroyed => "DESTROYED",
    }
}

fn invalid(why: &str) -> Error {
    Error::FailedPrecondition(format!(
        "not a valid tenant export: {why}; nothing was changed"
    ))
}

/// Writes the export of tenant `id` from `store`: the file's bytes.
pub fn export(store: &dyn KeyStore, ring: &MasterKeyring, id: &TenantId) -> Result<Vec<u8>> {
    let tenant = store.tenant(id)?.ok_or(Error::NotFound("tenant"))?;
    if tenant.state == TenantState::Destroyed {
        return Err(Error::FailedPrecondition(format!(
            "tenant {id} is destroyed: there is nothing to export"
        )));
    }
    let versions = store.key_versions(id)?;
    let records = store.master_versions()?;
    let mut used: Vec<u32> = versions
        .iter()
        .filter_map(|v| v.wrapped.as_ref().map(|w| w.master_version))
        .collect();
    used.push(ring.primary_version());
    used.sort_unstable();
    used.dedup();
    let master_keys = records
        .iter()
        .filter(|r| used.contains(&r.version))
        .map(MasterCheck::from_record)
        .collect();
    let body = TenantExport {
        format: FORMAT.to_owned(),
        tenant_id: id.as_str().to_owned(),
        exported_at: unix_now(),
        mac_master_version: ring.primary_version(),
        master_keys,
        tenant: ExportedTenant {
            state: tenant_state_name(tenant.state).to_owned(),
            primary_version: tenant.primary_version,
            created_at: tenant.created_at,
            rotation_period_seconds: tenant.rotation_period_seconds,
            max_encryptions: tenant.max_encryptions,
            deletion_time: tenant.deletion_time,
        },
        versions: versions
            .iter()
            .map(|v| ExportedVersion {
                version: v.version,
                state: version_state_name(v.state).to_owned(),
                created_at: v.created_at,
                encryptions: v.encryptions,
                master_version: v.wrapped.as_ref().map(|w| w.master_version),
                wrapped_key: v
                    .wrapped
                    .as_ref()
                    .map(|w| base64::engine::general_purpose::STANDARD.encode(&w.bytes)),
            })
            .collect(),
    };
    let mut out = serde_json::to_vec(&body).map_err(Error::internal)?;
    let key = export_mac_key(ring, body.mac_master_version, id)?;
    let mac = hex::encode(key.sign(labels::TENANT_EXPORT, &out));
    out.push(b'\n');
    out.extend_from_slice(mac.as_bytes());
    out.push(b'\n');
    Ok(out)
}

/// The MAC key of a tenant export: derived from master version `master_version` and bound
/// to the tenant id, so a file made for one tenant never verifies as another's.
fn export_mac_key(ring: &MasterKeyring, master_version: u32, id: &TenantId) -> Result<MacKey> {
    MacKey::from_keyring(
        ring,
        labels::TENANT_EXPORT,
        master_version,
        id.as_str().as_bytes(),
    )
}

/// Parses an export file and verifies its MAC for the tenant it names (and, with `expected`,
/// that this is the tenant the operator means), and its check values against the keyring.
pub fn parse_verified(
    bytes: &[u8],
    ring: &MasterKeyring,
    expected: Option<&TenantId>,
) -> Result<TenantExport> {
    let text = std::str::from_utf8(bytes).map_err(|_| invalid("not UTF-8 text"))?;
    let (body, mac) = text
        .strip_suffix('\n')
        .and_then(|t| t.rsplit_once('\n'))
        .ok_or_else(|| invalid("no MAC line"))?;
    let export: TenantExport =
        serde_json::from_str(body).map_err(|_| invalid("altered or truncated"))?;
    if export.format != FORMAT {
        return Err(invalid(&format!(
            "format {} is not {FORMAT}",
            export.format
        )));
    }
    let id = TenantId::parse(&export.tenant_id).map_err(|_| invalid("bad tenant id"))?;
    if let Some(expected) = expected
        && expected != &id
    {
        return Err(Error::FailedPrecondition(format!(
            "the file is bound to tenant {id}, not {expected}; nothing was changed"
        )));
    }
    let key = export_mac_key(ring, export.mac_master_version, &id)?;
    if !key.verify_hex(labels::TENANT_EXPORT, body.as_bytes(), mac) {
        return Err(Error::FailedPrecondition(format!(
            "the tenant export does not verify for tenant {id}: the file was altered, or it \
             is bound to another tenant id, or it was made with another master keyring; \
             nothing was changed"
        )));
    }
    check_keyring(&export.master_keys, ring, "the tenant export")?;
    Ok(export)
}

/// What importing a verified export will do.
pub struct ImportPlan {
    /// The tenant row to write.
    pub tenant: TenantRecord,
    /// The versions to write, keys re-wrapped under the primary master version.
    pub versions: Vec<KeyVersionRecord>,
    /// Whether the tenant exists in the store (rolled back) or not (new).
    pub existed: bool,
    /// Versions in the store but not in the export (newer than it): kept, DISABLED, so their
    /// keys are not lost by an import of an old export (re-enable or destroy them by hand),
    /// and their numbers are never reused.
    pub disabled_newer: Vec<u32>,
    /// Versions in the export that were destroyed since: imported as destroyed, without key.
    pub kept_destroyed: Vec<u32>,
}

fn parse_tenant_state(name: &str) -> Result<TenantState> {
    match name {
        "ACTIVE" => Ok(TenantState::Active),
        "SUSPENDED" => Ok(TenantState::Suspended),
        "PENDING_DELETION" => Ok(TenantState::PendingDeletion),
        _ => Err(invalid("bad tenant state")),
    }
}

fn parse_version_state(name: &str) -> Result<KeyVersionState> {
    match name {
        "ENABLED" => Ok(KeyVersionState::Enabled),
        "DISABLED" => Ok(KeyVersionState::Disabled),
        "DESTROYED" => Ok(KeyVersionState::Destroyed),
        _ => Err(invalid("bad key version state")),
    }
}

/// Plans the import of a verified export into `store`: refuses a tenant destroyed in the
/// store or in the shred ledger, keeps every version destroyed since the export destroyed
/// (refusing if that is the export's primary), unwraps every key with the keyring (so a bad
/// key fails here, before anything changes) and re-wraps it under the primary master version.
pub fn plan_import(
    export: &TenantExport,
    ring: &MasterKeyring,
    store: &dyn KeyStore,
    ledger: &LedgerContents,
) -> Result<ImportPlan> {
    let id = TenantId::parse(&export.tenant_id).map_err(|_| invalid("bad tenant id"))?;
    let live = store.tenant(&id)?;
    if live
        .as_ref()
        .is_some_and(|t| t.state == TenantState::Destroyed)
    {
        return Err(Error::FailedPrecondition(format!(
            "tenant {id} is DESTROYED in the key store: a crypto-shredded tenant never comes \
             back; nothing was changed"
        )));
    }
    if ledger.tenant_destroyed(&id) {
        return Err(Error::FailedPrecondition(format!(
            "tenant {id} is recorded as destroyed in the shred ledger: a crypto-shredded \
             tenant never comes back; nothing was changed"
        )));
    }
    let live_versions = if live.is_some() {
        store.key_versions(&id)?
    } else {
        Vec::new()
    };
    let mut destroyed = ledger.versions_destroyed(&id);
    destroyed.extend(
        live_versions
            .iter()
            .filter(|v| v.state == KeyVersionState::Destroyed)
            .map(|v| v.version),
    );
    let wrapping = TenantKeyWrapping::new(ring)?;
    let primary = export.tenant.primary_version;
    let mut versions = Vec::with_capacity(export.versions.len());
    let mut kept_destroyed = Vec::new();
    for v in &export.versions {
        let exported_state = parse_version_state(&v.state)?;
        // The store writes the larger of this and its own counter, read in the import's
        // transaction (`store::counter_not_behind`): a server may reserve more between this
        // plan and that write.
        let encryptions = v.encryptions;
        if exported_state == KeyVersionState::Destroyed || destroyed.contains(&v.version) {
            if v.version == primary {
                return Err(Error::FailedPrecondition(format!(
                    "key version {} of tenant {id}, the export's primary, was destroyed since \
                     the export: importing it would bring it back; nothing was changed",
                    v.version
                )));
            }
            if exported_state != KeyVersionState::Destroyed {
                kept_destroyed.push(v.version);
            }
            versions.push(KeyVersionRecord {
                version: v.version,
                state: KeyVersionState::Destroyed,
                created_at: v.created_at,
                encryptions,
                wrapped: None,
            });
            continue;
        }
        let (Some(m), Some(b64)) = (v.master_version, &v.wrapped_key) else {
            return Err(invalid("a live key version has no wrapped key"));
        };
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(b64)
            .map_err(|_| invalid("a wrapped key is not base64"))?;
        let exported = WrappedTenantKey {
            master_version: m,
            bytes,
        };
        let tenant_key =
            wrapping
                .unwrap(&id, v.version, &exported)
                .map_err(|failure| match failure {
                    UnwrapFailure::MasterVersionMissing(_) => Error::FailedPrecondition(format!(
                        "key version {} is wrapped under master version {m}, which the keyring \
                     at hand no longer holds: the export cannot be read; nothing was changed",
                        v.version
                    )),
                    UnwrapFailure::DoesNotOpen => Error::FailedPrecondition(format!(
                        "key version {} of the export does not unwrap for tenant {id}; nothing \
                     was changed",
                        v.version
                    )),
                })?;
        versions.push(KeyVersionRecord {
            version: v.version,
            state: exported_state,
            created_at: v.created_at,
            encryptions,
            wrapped: Some(wrapping.wrap(&id, v.version, &tenant_key)?),
        });
    }
    if !versions
        .iter()
        .any(|v| v.version == primary && v.state == KeyVersionState::Enabled)
    {
        return Err(invalid("the primary version is missing or not enabled"));
    }
    let exported: Vec<u32> = versions.iter().map(|v| v.version).collect();
    let mut disabled_newer = Vec::new();
    for live in live_versions
        .iter()
        .filter(|v| !exported.contains(&v.version))
    {
        let state = match live.state {
            KeyVersionState::Destroyed => KeyVersionState::Destroyed,
            KeyVersionState::Enabled | KeyVersionState::Disabled => {
                disabled_newer.push(live.version);
                KeyVersionState::Disabled
            }
        };
        versions.push(KeyVersionRecord {
            state,
            ..live.clone()
        });
    }
    versions.sort_by_key(|v| v.version);
    Ok(ImportPlan {
        tenant: TenantRecord {
            tenant_id: id,
            state: parse_tenant_state(&export.tenant.state)?,
            primary_version: primary,
            created_at: export.tenant.created_at,
            rotation_period_seconds: export.tenant.rotation_period_seconds,
            max_encryptions: export.tenant.max_encryptions,
            deletion_time: export.tenant.deletion_time,
            destroyed_at: None,
        },
        versions,
        existed: live.is_some(),
        disabled_newer,
        kept_destroyed,
    })
}
