//! Callers and what they may do: bearer tokens (stored only as SHA-256 hashes), roles, tenant
//! scopes and operation limits, and the one authorization check every RPC passes through
//! before any key is touched.

pub mod cert;
pub mod rate;
pub mod token;

use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, Mutex};

use crate::clock::SharedClock;
use crate::domain::TenantId;
use crate::error::{Error, Result};
use crate::store::KeyStore;

pub use token::{IssuedToken, TokenSpec, hash_token, issue_token};

/// A caller's role.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// Manages tenants, keys and tokens, and may do everything else.
    Admin,
    /// Application services: the data plane (and reading tenants) for the tenants in scope.
    Service,
    /// Reads the audit of the tenants in scope.
    Auditor,
}

impl Role {
    /// Parses `admin`, `service` or `auditor`.
    pub fn parse(name: &str) -> Option<Self> {
        match name {
            "admin" => Some(Role::Admin),
            "service" => Some(Role::Service),
            "auditor" => Some(Role::Auditor),
            _ => None,
        }
    }

    /// The stored name.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Admin => "admin",
            Role::Service => "service",
            Role::Auditor => "auditor",
        }
    }
}

/// Which tenants a caller may act for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TenantScope {
    /// Every tenant.
    All,
    /// Only these.
    Only(BTreeSet<String>),
}

impl TenantScope {
    /// Parses `*` or a comma-separated list.
    pub fn parse(text: &str) -> Self {
        if text.trim() == "*" {
            TenantScope::All
        } else {
            TenantScope::Only(
                text.split(',')
                    .map(str::trim)
                    .filter(|s| !s.is_empty())
                    .map(str::to_owned)
                    .collect(),
            )
        }
    }

    /// True if the scope includes `tenant`.
    pub fn allows(&self, tenant: &str) -> bool {
        match self {
            TenantScope::All => true,
            TenantScope::Only(set) => set.contains(tenant),
        }
    }
}

/// An RPC, as the authorization layer and the audit name it: the one list of RPCs is
/// [`crate::audit::operation::Rpc`], which also holds their stored names.
pub use crate::audit::operation::Rpc as Operation;

impl Operation {
    /// The permission name a `service` token's `--operations` list uses for a data-plane
    /// call; `None` for calls outside the data plane.
    pub fn data_permission(self) -> Option<&'static str> {
        match self {
            Operation::Encrypt | Operation::EncryptBatch => Some("encrypt"),
            Operation::Decrypt | Operation::DecryptBatch => Some("decrypt"),
            Operation::GenerateDataKey => Some("generate-data-key"),
            // Its own scope: a token that may only mint wrapped keys (for a writer that
            // stores them for others to open) cannot obtain any key in plaintext.
            Operation::GenerateDataKeyWithoutPlaintext => {
                Some("generate-data-key-without-plaintext")
            }
            Operation::DecryptDataKey => Some("decrypt-data-key"),
            Operation::Rewrap | Operation::RewrapBatch => Some("rewrap"),
            Operation::ComputeBlindIndex => Some("compute-blind-index"),
            Operation::EncryptDeterministic | Operation::EncryptBatchDeterministic => {
                Some("encrypt-deterministic")
            }
            _ => None,
        }
    }
}

/// Every data-plane permission name.
pub const DATA_PERMISSIONS: &[&str] = &[
    "encrypt",
    "decrypt",
    "generate-data-key",
    "decrypt-data-key",
    "rewrap",
    "generate-data-key-without-plaintext",
    "compute-blind-index",
    "encrypt-deterministic",
];

/// The credential a caller proved.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Credential {
    /// A bearer token; [`Caller::token_id`] is its public id.
    Token,
    /// A verified client certificate mapped by `[[tls_callers]]`; [`Caller::token_id`] is the
    /// certificate identity (SAN or subject CN) that matched.
    Certificate,
}

/// An authenticated caller.
#[derive(Debug, Clone)]
pub struct Caller {
    /// The token's public id, or the certificate identity (see [`Caller::credential`]).
    pub token_id: String,
    /// How the caller authenticated.
    pub credential: Credential,
    /// The role.
    pub role: Role,
    /// The tenants it may act for.
    pub tenants: TenantScope,
    /// Data-plane permissions it is limited to; `None` = all of its role's.
    pub operations: Option<BTreeSet<String>>,
    /// Unix seconds after which the token is refused.
    pub expires_at: Option<i64>,
    /// [`Caller::audit_name`], formatted once when the caller is made (the authenticator
    /// caches callers, so a call does not format its caller's name again).
    audit_name: String,
}

impl Caller {
    /// A caller proved by `credential` for `token_id` (see the fields).
    pub fn new(
        token_id: String,
        credential: Credential,
        role: Role,
        tenants: TenantScope,
        operations: Option<BTreeSet<String>>,
        expires_at: Option<i64>,
    ) -> Self {
        let audit_name = match credential {
            Credential::Token => format!("token:{token_id}"),
            Credential::Certificate => format!("cert:{token_id}"),
        };
        Self {
            token_id,
            credential,
            role,
            tenants,
            operations,
            expires_at,
            audit_name,
        }
    }

    /// How the audit names this caller: `token:<id>` or `cert:<identity>`.
    pub fn audit_name(&self) -> &str {
        &self.audit_name
    }
}

/// The one authorization decision: may `caller` run `operation` on `tenant` (None for calls
/// that name no tenant)? Denials say what is missing, never whether a tenant exists: the
/// decision reads only the caller and the request, never the store, so it is taken before any
/// lookup and an out-of-scope tenant gets PERMISSION_DENIED whether it exists or not.
///
/// The rules:
/// - `admin` may call everything; `service` the data plane plus the metadata reads
///   `GetTenant` and `ListKeyVersions` (no key material; a re-encryption job needs the primary
///   version); `auditor` only `ListAuditEvents` and `VerifyAuditChain`.
/// - a service token's `--operations` list narrows its data-plane calls (metadata reads stay
///   allowed);
/// - a call naming a tenant needs that tenant in scope;
/// - a call naming no tenant (`ListTenants`, `VerifyAuditChain`, an unfiltered
///   `ListAuditEvents`) covers every tenant, so it needs an all-tenants scope: a scoped caller
///   would otherwise learn other tenants' names or activity.
pub fn authorize(caller: &Caller, operation: Operation, tenant: Option<&TenantId>) -> Result<()> {
    let deny = |why: &str| Err(Error::PermissionDenied(why.to_owned()));
    let role_allows = match caller.role {
        Role::Admin => true,
        Role::Service => {
            operation.data_permission().is_some()
                || matches!(
                    operation,
                    Operation::GetTenant | Operation::ListKeyVersions | Operation::ListBlindIndexes
                )
        }
        Role::Auditor => matches!(
            operation,
            Operation::ListAuditEvents | Operation::VerifyAuditChain | Operation::GetUsage
        ),
    };
    if !role_allows {
        return deny(&format!(
            "the {} role may not call {}",
            caller.role.as_str(),
            operation.name()
        ));
    }
    if let (Some(allowed), Some(permission)) = (&caller.operations, operation.data_permission())
        && !allowed.contains(permission)
    {
        return deny(&format!("this token may not {permission}"));
    }
    match tenant {
        Some(tenant) if !caller.tenants.allows(tenant.as_str()) => {
            deny("this token may not act for that tenant")
        }
        None if caller.tenants != TenantScope::All => deny(&format!(
            "{} covers every tenant; this token is limited to some tenants",
            operation.name()
        )),
        _ => Ok(()),
    }
}

/// Turns bearer tokens into callers, caching what the store said until it changes.
pub struct Authenticator {
    store: Arc<dyn KeyStore>,
    cache: Mutex<TokenCache>,
    /// The time token expiry is checked against.
    clock: SharedClock,
}

/// Callers by token hash, and how many times the cache was dropped for a store change.
#[derive(Default)]
struct TokenCache {
    callers: HashMap<[u8; 32], Arc<Caller>>,
    /// Bumped by [`Authenticator::clear`]: a lookup that read the store before a clear may
    /// have read the row as it was before the change the clear is for (a revocation), so it
    /// answers its own call, which began before, but does not enter the cache.
    epoch: u64,
}

/// Most tokens remembered before the cache starts over.
const MAX_CACHED_TOKENS: usize = 10_000;

impl Authenticator {
    /// An authenticator over the store's tokens; a token counts as expired once `clock`
    /// reaches its expiry time.
    pub fn new(store: Arc<dyn KeyStore>, clock: SharedClock) -> Self {
        Self {
            store,
            cache: Mutex::new(TokenCache::default()),
            clock,
        }
    }

    /// Drops cached callers (after the store changed: a revocation, a quarantine). No lookup
    /// that began before this returns enters the cache afterwards.
    pub fn clear(&self) {
        let mut cache = self.lock_cache();
        cache.callers.clear();
        cache.epoch += 1;
    }

    fn lock_cache(&self) -> std::sync::MutexGuard<'_, TokenCache> {
        // A map and a counter: a panic elsewhere cannot leave them half-updated.
        self.cache.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The cached caller for `hash`, and the cache's epoch as of this lookup.
    fn cached(&self, hash: &[u8; 32]) -> (Option<Arc<Caller>>, u64) {
        let cache = self.lock_cache();
        (cache.callers.get(hash).cloned(), cache.epoch)
    }

    /// Caches `caller`, read from the store by a lookup that began at `epoch`, unless the
    /// cache was dropped since.
    fn remember(&self, hash: [u8; 32], caller: &Arc<Caller>, epoch: u64) {
        let mut cache = self.lock_cache();
        if cache.epoch != epoch {
            return;
        }
        if cache.callers.len() >= MAX_CACHED_TOKENS {
            cache.callers.clear();
        }
        cache.callers.insert(hash, Arc::clone(caller));
    }

    /// The caller holding `token`, if it is known, unexpired and unrevoked.
    pub fn authenticate(&self, token: Option<&str>) -> Result<Arc<Caller>> {
        self.check(token).map_err(|refused| refused.error)
    }

    /// Like [`Authenticator::authenticate`], but a refusal of a token the store knows (revoked
    /// or expired) names it, so the audit can record who kept using a dead token.
    pub fn check(&self, token: Option<&str>) -> std::result::Result<Arc<Caller>, Refused> {
        let unknown = |error: Error| Refused {
            error,
            known_token: None,
        };
        let token = token.ok_or(Error::Unauthenticated).map_err(unknown)?;
        let hash = hash_token(token);
        let (cached, epoch) = self.cached(&hash);
        let caller = match cached {
            Some(caller) => caller,
            None => {
                let record = self
                    .store
                    .token_by_hash(&hash)
                    .map_err(unknown)?
                    .ok_or(Error::Unauthenticated)
                    .map_err(unknown)?;
                if record.revoked_at.is_some() {
                    return Err(Refused {
                        error: Error::Unauthenticated,
                        known_token: Some(format!("token:{} (revoked)", record.id)),
                    });
                }
                // Not cached: a release is a store change, seen at the next call (the
                // cache is dropped on every change) without a restart.
                if record.quarantined_at.is_some() {
                    return Err(Refused {
                        error: Error::PermissionDenied(format!(
                            "this token is quarantined after suspected misuse; an admin must \
                             release it (tenant-kms token release {})",
                            record.id
                        )),
                        known_token: Some(format!("token:{} (quarantined)", record.id)),
                    });
                }
                let role = Role::parse(&record.role)
                    .ok_or_else(|| Error::internal("token with an unknown role"))
                    .map_err(unknown)?;
                let operations = (record.operations.trim() != "*").then(|| {
                    record
                        .operations
                        .split(',')
                        .map(str::trim)
                        .filter(|s| !s.is_empty())
                        .map(str::to_owned)
                        .collect()
                });
                let caller = Arc::new(Caller::new(
                    record.id,
                    Credential::Token,
                    role,
                    TenantScope::parse(&record.tenants),
                    operations,
                    record.expires_at,
                ));
                self.remember(hash, &caller, epoch);
                caller
            }
        };
        // Checked on every call, cached or not: expiry needs no store change to take effect.
        if caller
            .expires_at
            .is_some_and(|at| at <= self.clock.now_unix())
        {
            return Err(Refused {
                error: Error::Unauthenticated,
                known_token: Some(format!("token:{} (expired)", caller.token_id)),
            });
        }
        Ok(caller)
    }
}

/// Why a token was refused: the error for the client, and for the audit the token's id when
/// the store knows it (revoked, expired).
pub struct Refused {
    /// The error the client gets (UNAUTHENTICATED, or INTERNAL if the store failed).
    pub error: Error,
    /// `token:<id> (revoked|expired|quarantined)` for a token the store knows.
    pub known_token: Option<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A lookup that read a token's row before a revocation, and ends after the cache was
    /// dropped for it, answers its own call but leaves no entry: the next call reads the
    /// revoked row (without the epoch, it found the stale caller cached and was let in).
    #[test]
    fn a_lookup_that_began_before_a_clear_does_not_cache_its_caller() {
        use crate::store::TokenStore;
        let temp = tempfile::tempdir().unwrap();
        let store =
            Arc::new(crate::store::SqliteKeyStore::open(&temp.path().join("keys.db")).unwrap());
        crate::store::contract::install_test_row_key(&*store);
        let token = "tkms_lookup_race_token";
        store
            .insert_token(&crate::store::TokenRecord {
                id: "t1".into(),
                name: "race".into(),
                hash: hash_token(token),
                role: "service".into(),
                tenants: "*".into(),
                operations: "*".into(),
                created_at: 10,
                expires_at: None,
                revoked_at: None,
                quarantined_at: None,
            })
            .unwrap();
        let auth = Authenticator::new(store.clone(), crate::clock::system());
        let hash = hash_token(token);

        // A call's lookup begins: nothing cached; it reads the row, still valid.
        let (cached, epoch) = auth.cached(&hash);
        assert!(cached.is_none());
        let read_before = auth.authenticate(Some(token)).unwrap();
        // Another call authenticates and caches; then the revocation commits and the cache
        // is dropped for it; then the first lookup ends.
        assert!(store.revoke_token("t1", 20).unwrap());
        auth.clear();
        auth.remember(hash, &read_before, epoch);

        assert!(
            auth.cached(&hash).0.is_none(),
            "the stale caller was not cached"
        );
        let Err(refused) = auth.check(Some(token)) else {
            panic!("a revoked token is refused");
        };
        assert_eq!(refused.known_token.as_deref(), Some("token:t1 (revoked)"));
    }

    fn caller(role: Role, tenants: &str, ops: Option<&str>) -> Caller {
        Caller::new(
            "t".into(),
            Credential::Token,
            role,
            TenantScope::parse(tenants),
            ops.map(|o| o.split(',').map(str::to_owned).collect()),
            None,
        )
    }

    #[test]
    fn audit_names_say_how_the_caller_authenticated() {
        assert_eq!(caller(Role::Service, "*", None).audit_name(), "token:t");
        let cert = Caller::new(
            "svc.example".into(),
            Credential::Certificate,
            Role::Service,
            TenantScope::parse("*"),
            None,
            None,
        );
        assert_eq!(cert.audit_name(), "cert:svc.example");
    }

    #[test]
    fn roles_scopes_and_operations() {
        let a = TenantId::parse("a").unwrap();
        let b = TenantId::parse("b").unwrap();
        let admin = caller(Role::Admin, "*", None);
        assert!(authorize(&admin, Operation::CreateTenant, Some(&a)).is_ok());
        let service = caller(Role::Service, "a", Some("encrypt"));
        assert!(authorize(&service, Operation::Encrypt, Some(&a)).is_ok());
        assert!(authorize(&service, Operation::EncryptBatch, Some(&a)).is_ok());
        assert!(authorize(&service, Operation::Encrypt, Some(&b)).is_err());
        assert!(authorize(&service, Operation::Decrypt, Some(&a)).is_err());
        assert!(authorize(&service, Operation::CreateTenant, Some(&a)).is_err());
        let auditor = caller(Role::Auditor, "a", None);
        assert!(authorize(&auditor, Operation::ListAuditEvents, Some(&a)).is_ok());
        assert!(authorize(&auditor, Operation::ListAuditEvents, Some(&b)).is_err());
        assert!(authorize(&auditor, Operation::Encrypt, Some(&a)).is_err());
        let scoped_admin = caller(Role::Admin, "a", None);
        assert!(authorize(&scoped_admin, Operation::ListTenants, None).is_err());
        assert!(authorize(&auditor, Operation::VerifyAuditChain, None).is_err());
        let global_auditor = caller(Role::Auditor, "*", None);
        assert!(authorize(&global_auditor, Operation::VerifyAuditChain, None).is_ok());
        assert!(authorize(&service, Operation::GetTenant, Some(&a)).is_ok());
        assert!(authorize(&service, Operation::RotateTenantKey, Some(&a)).is_err());
    }
}
