//! Security over real gRPC: the authorization table (role × operation × tenant × token
//! state), audited denials, existence hiding, revocation and expiry across processes, TLS and
//! mTLS with generated certificates, rate limits, the concurrency cap, deadlines, unknown
//! request fields, process hardening, the trace-log leak walkthrough and the compile-time
//! trait assertions on secret types.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use crate::common;

use std::collections::HashMap;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use common::tls::{Pki, tls_channel};
use common::*;
use tenant_kms::audit::{AuditRecord, Durability, ListFilter};
use tenant_kms::auth::{Role, TokenSpec, issue_token};
use tenant_kms::pb;
use tenant_kms::pb::key_service_client::KeyServiceClient;
use tenant_kms::pb::tenant_service_client::TenantServiceClient;
use tenant_kms::service::TlsFiles;
use tonic::Code;
use tonic::transport::Channel;

// ---------------------------------------------------------------------------------------------
// Compile-time leak-proofing: secret types cannot be printed, cloned or compared.

mod trait_assertions {
    use std::fmt::{Debug, Display};
    use std::hash::Hash;

    use static_assertions::assert_not_impl_any;
    use tenant_kms::audit::ChainKeys;
    use tenant_kms::auth::IssuedToken;
    use tenant_kms::crypto::aead::AeadKey;
    use tenant_kms::crypto::secret::{SecretBytes, SecretKey};
    use tenant_kms::keys::cache::{CachedVersion, TenantEntry};
    use tenant_kms::keys::master::MasterKeyring;
    use tenant_kms::pb;

    assert_not_impl_any!(SecretKey: Debug, Display, Clone, PartialEq, Hash);
    assert_not_impl_any!(SecretBytes: Debug, Display, Clone, PartialEq, Hash);
    assert_not_impl_any!(AeadKey: Debug, Display, Clone, PartialEq, Hash);
    assert_not_impl_any!(MasterKeyring: Debug, Display, Clone, PartialEq, Hash);
    assert_not_impl_any!(ChainKeys: Debug, Display, Clone, PartialEq, Hash);
    assert_not_impl_any!(IssuedToken: Debug, Display, Clone, PartialEq, Hash);
    assert_not_impl_any!(CachedVersion: Debug, Display, Clone, PartialEq, Hash);
    assert_not_impl_any!(TenantEntry: Debug, Display, Clone, PartialEq, Hash);

    // Generated messages that carry plaintext or key bytes have no Debug (build.rs
    // `skip_debug`), so `{:?}` of a request or response cannot leak them. prost derives
    // Clone and PartialEq on every message and tonic needs them; these buffers are plain
    // `Vec<u8>` that are not zeroized (SECURITY.md says so).
    assert_not_impl_any!(pb::EncryptRequest: Debug, Display);
    assert_not_impl_any!(pb::EncryptBatchItem: Debug, Display);
    assert_not_impl_any!(pb::EncryptBatchRequest: Debug, Display);
    assert_not_impl_any!(pb::DecryptResponse: Debug, Display);
    assert_not_impl_any!(pb::DecryptBatchResult: Debug, Display);
    assert_not_impl_any!(pb::DecryptBatchResponse: Debug, Display);
    assert_not_impl_any!(pb::GenerateDataKeyResponse: Debug, Display);
    assert_not_impl_any!(pb::DecryptDataKeyResponse: Debug, Display);
}

// ---------------------------------------------------------------------------------------------
// Helpers.

/// Issues a token directly into the server's store; returns (secret, id).
fn issue(
    server: &TestServer,
    role: Role,
    tenants: &str,
    operations: &str,
    ttl_seconds: Option<u64>,
) -> (String, String) {
    let issued = issue_token(
        server.state.keys.store().as_ref(),
        &TokenSpec {
            name: "test".into(),
            role,
            tenants: tenants.into(),
            operations: operations.into(),
            ttl_seconds,
        },
        server.state.options.clock.as_ref(),
    )
    .unwrap();
    (issued.secret.as_str().to_owned(), issued.record.id.clone())
}

/// Every audit record so far.
fn audit_records(server: &TestServer) -> Vec<AuditRecord> {
    server
        .state
        .audit_reader
        .list(&ListFilter {
            limit: 1_000_000,
            ..Default::default()
        })
        .unwrap()
        .into_iter()
        .map(|(_, r)| r)
        .collect()
}

/// Waits (bounded) until an audit record with this request id exists.
async fn audit_record_for(server: &TestServer, request_id: &str) -> AuditRecord {
    for _ in 0..200 {
        if let Some(r) = audit_records(server)
            .into_iter()
            .find(|r| r.request_id == request_id)
        {
            return r;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    panic!("no audit record for request {request_id}");
}

fn request_id(status: &tonic::Status) -> String {
    status
        .metadata()
        .get("x-request-id")
        .expect("denials carry the request id")
        .to_str()
        .unwrap()
        .to_owned()
}

// ---------------------------------------------------------------------------------------------
// The authorization table.

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Op {
    Encrypt,
    Decrypt,
    EncryptBatch,
    DecryptBatch,
    GenerateDataKey,
    DecryptDataKey,
    Rewrap,
    RewrapBatch,
    CreateTenant,
    GetTenant,
    ListTenants,
    RotateTenantKey,
    ListKeyVersions,
    DisableKeyVersion,
    EnableKeyVersion,
    DestroyKeyVersion,
    SetRotationPolicy,
    SuspendTenant,
    ResumeTenant,
    ScheduleTenantDeletion,
    CancelTenantDeletion,
    ListAuditEvents,
    VerifyAuditChain,
}

const ALL_OPS: &[Op] = &[
    Op::Encrypt,
    Op::Decrypt,
    Op::EncryptBatch,
    Op::DecryptBatch,
    Op::GenerateDataKey,
    Op::DecryptDataKey,
    Op::Rewrap,
    Op::RewrapBatch,
    Op::CreateTenant,
    Op::GetTenant,
    Op::ListTenants,
    Op::RotateTenantKey,
    Op::ListKeyVersions,
    Op::DisableKeyVersion,
    Op::EnableKeyVersion,
    Op::DestroyKeyVersion,
    Op::SetRotationPolicy,
    Op::SuspendTenant,
    Op::ResumeTenant,
    Op::ScheduleTenantDeletion,
    Op::CancelTenantDeletion,
    Op::ListAuditEvents,
    Op::VerifyAuditChain,
];

impl Op {
    /// Calls that name no tenant (they cover all tenants).
    fn global(self) -> bool {
        matches!(self, Op::ListTenants | Op::VerifyAuditChain)
    }

    /// The data-plane permission, if any.
    fn permission(self) -> Option<&'static str> {
        Some(match self {
            Op::Encrypt | Op::EncryptBatch => "encrypt",
            Op::Decrypt | Op::DecryptBatch => "decrypt",
            Op::GenerateDataKey => "generate-data-key",
            Op::DecryptDataKey => "decrypt-data-key",
            Op::Rewrap | Op::RewrapBatch => "rewrap",
            _ => return None,
        })
    }

    fn role_allows(self, role: Role) -> bool {
        match role {
            Role::Admin => true,
            Role::Service => {
                self.permission().is_some() || matches!(self, Op::GetTenant | Op::ListKeyVersions)
            }
            Role::Auditor => matches!(self, Op::ListAuditEvents | Op::VerifyAuditChain),
        }
    }

    /// The status an authorized caller gets on an existing, active tenant with the table's
    /// arguments.
    fn authorized_code(self) -> Code {
        match self {
            Op::CreateTenant => Code::AlreadyExists,
            Op::ResumeTenant | Op::CancelTenantDeletion => Code::FailedPrecondition,
            Op::DisableKeyVersion | Op::EnableKeyVersion | Op::DestroyKeyVersion => Code::NotFound,
            _ => Code::Ok,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum TokenState {
    Valid,
    Expired,
    Revoked,
}

struct Case {
    name: &'static str,
    role: Role,
    all_tenants: bool,
    operations: Option<&'static str>,
    state: TokenState,
}

/// Ciphertext and wrapped data key of a tenant, for the calls that need them.
struct Fixture {
    ciphertext: Vec<u8>,
    wrapped_key: Vec<u8>,
}

struct Clients {
    keys: Keys,
    tenants: Tenants,
    audit: Audit,
}

/// Runs one operation for `tenant` with valid arguments; returns the status code and message.
async fn run_op(c: &mut Clients, op: Op, tenant: &str, f: &Fixture) -> (Code, String) {
    let t = tenant.to_owned();
    let result: Result<(), tonic::Status> = match op {
        Op::Encrypt => c
            .keys
            .encrypt(encrypt_request(&t, "ctx", b"v", b""))
            .await
            .map(drop),
        Op::Decrypt => c
            .keys
            .decrypt(pb::DecryptRequest {
                tenant_id: t,
                context: "ctx".into(),
                ciphertext: f.ciphertext.clone(),
                aad: vec![],
            })
            .await
            .map(drop),
        Op::EncryptBatch => c
            .keys
            .encrypt_batch(pb::EncryptBatchRequest {
                tenant_id: t,
                items: vec![pb::EncryptBatchItem {
                    context: "ctx".into(),
                    plaintext: b"v".to_vec(),
                    aad: vec![],
                    ..Default::default()
                }],
                ..Default::default()
            })
            .await
            .map(drop),
        Op::DecryptBatch => c
            .keys
            .decrypt_batch(pb::DecryptBatchRequest {
                tenant_id: t,
                items: vec![pb::DecryptBatchItem {
                    context: "ctx".into(),
                    ciphertext: f.ciphertext.clone(),
                    aad: vec![],
                }],
            })
            .await
            .map(drop),
        Op::GenerateDataKey => c
            .keys
            .generate_data_key(pb::GenerateDataKeyRequest {
                tenant_id: t,
                context: "ctx".into(),
            })
            .await
            .map(drop),
        Op::DecryptDataKey => decrypt_data_key(&mut c.keys, &t, "ctx", &f.wrapped_key)
            .await
            .map(drop),
        Op::Rewrap => c
            .keys
            .rewrap(pb::RewrapRequest {
                tenant_id: t,
                context: "ctx".into(),
                ciphertext: f.ciphertext.clone(),
                aad: vec![],
                ..Default::default()
            })
            .await
            .map(drop),
        Op::RewrapBatch => c
            .keys
            .rewrap_batch(pb::RewrapBatchRequest {
                tenant_id: t,
                items: vec![pb::RewrapBatchItem {
                    context: "ctx".into(),
                    ciphertext: f.ciphertext.clone(),
                    aad: vec![],
                    ..Default::default()
                }],
            })
            .await
            .map(drop),
        Op::CreateTenant => try_create_tenant(&mut c.tenants, &t).await.map(drop),
        Op::GetTenant => get_tenant(&mut c.tenants, &t).await.map(drop),
        Op::ListTenants => c
            .tenants
            .list_tenants(pb::ListTenantsRequest::default())
            .await
            .map(drop),
        Op::RotateTenantKey => rotate_tenant(&mut c.tenants, &t).await.map(drop),
        Op::ListKeyVersions => c
            .tenants
            .list_key_versions(pb::ListKeyVersionsRequest { tenant_id: t })
            .await
            .map(drop),
        Op::DisableKeyVersion => c
            .tenants
            .disable_key_version(pb::DisableKeyVersionRequest {
                tenant_id: t,
                version: 999,
            })
            .await
            .map(drop),
        Op::EnableKeyVersion => c
            .tenants
            .enable_key_version(pb::EnableKeyVersionRequest {
                tenant_id: t,
                version: 999,
            })
            .await
            .map(drop),
        Op::DestroyKeyVersion => c
            .tenants
            .destroy_key_version(pb::DestroyKeyVersionRequest {
                tenant_id: t,
                version: 999,
            })
            .await
            .map(drop),
        Op::SetRotationPolicy => set_rotation_policy(&mut c.tenants, &t, 0, 1 << 30)
            .await
            .map(drop),
        Op::SuspendTenant => suspend_tenant(&mut c.tenants, &t).await.map(drop),
        Op::ResumeTenant => resume_tenant(&mut c.tenants, &t).await.map(drop),
        Op::ScheduleTenantDeletion => schedule_deletion(&mut c.tenants, &t, Some(86_400))
            .await
            .map(drop),
        Op::CancelTenantDeletion => cancel_deletion(&mut c.tenants, &t).await.map(drop),
        Op::ListAuditEvents => c
            .audit
            .list_audit_events(pb::ListAuditEventsRequest {
                tenant_id: t,
                page_size: 1,
                ..Default::default()
            })
            .await
            .map(drop),
        Op::VerifyAuditChain => c
            .audit
            .verify_audit_chain(pb::VerifyAuditChainRequest {})
            .await
            .map(drop),
    };
    match result {
        Ok(()) => (Code::Ok, String::new()),
        Err(status) => {
            let code = status.code();
            if matches!(code, Code::PermissionDenied | Code::Unauthenticated) {
                (
                    code,
                    format!("{}\u{0}{}", status.message(), request_id(&status)),
                )
            } else {
                (code, status.message().to_owned())
            }
        }
    }
}

/// Puts a tenant back the way the table expects it after a state-changing call succeeded.
async fn restore(admin: &mut Tenants, op: Op, tenant: &str) {
    match op {
        Op::SuspendTenant => {
            resume_tenant(admin, tenant).await.unwrap();
        }
        Op::ScheduleTenantDeletion => {
            cancel_deletion(admin, tenant).await.unwrap();
        }
        _ => {}
    }
}

#[tokio::test]
async fn authorization_table_over_grpc() {
    let server = TestServer::start_configured(|o| o.durability = Durability::Process).await;
    let (mut admin_keys, mut admin_tenants, _) = server.clients().await;
    let mut fixtures = HashMap::new();
    for tenant in ["in", "out"] {
        create_tenant(&mut admin_tenants, tenant).await;
        let ciphertext = encrypt(&mut admin_keys, tenant, "ctx", b"v", b"")
            .await
            .ciphertext;
        let wrapped_key = generate_data_key(&mut admin_keys, tenant, "ctx")
            .await
            .wrapped_key;
        fixtures.insert(
            tenant,
            Fixture {
                ciphertext,
                wrapped_key,
            },
        );
    }
    let cases = [
        Case {
            name: "admin scoped",
            role: Role::Admin,
            all_tenants: false,
            operations: None,
            state: TokenState::Valid,
        },
        Case {
            name: "admin all tenants",
            role: Role::Admin,
            all_tenants: true,
            operations: None,
            state: TokenState::Valid,
        },
        Case {
            name: "service",
            role: Role::Service,
            all_tenants: false,
            operations: None,
            state: TokenState::Valid,
        },
        Case {
            name: "service encrypt-only",
            role: Role::Service,
            all_tenants: false,
            operations: Some("encrypt"),
            state: TokenState::Valid,
        },
        Case {
            name: "auditor scoped",
            role: Role::Auditor,
            all_tenants: false,
            operations: None,
            state: TokenState::Valid,
        },
        Case {
            name: "auditor all tenants",
            role: Role::Auditor,
            all_tenants: true,
            operations: None,
            state: TokenState::Valid,
        },
        Case {
            name: "service expired",
            role: Role::Service,
            all_tenants: false,
            operations: None,
            state: TokenState::Expired,
        },
        Case {
            name: "service revoked",
            role: Role::Service,
            all_tenants: false,
            operations: None,
            state: TokenState::Revoked,
        },
        Case {
            name: "admin revoked",
            role: Role::Admin,
            all_tenants: true,
            operations: None,
            state: TokenState::Revoked,
        },
    ];
    // (request id, the caller the audit must name, the outcome it must record)
    let mut denials: Vec<(String, String, &'static str)> = Vec::new();
    let mut rows = 0;
    for case in &cases {
        let ttl = (case.state == TokenState::Expired).then_some(0);
        let scope = if case.all_tenants { "*" } else { "in" };
        let (secret, id) = issue(
            &server,
            case.role,
            scope,
            case.operations.unwrap_or("*"),
            ttl,
        );
        let audit_name = match case.state {
            TokenState::Valid => format!("token:{id}"),
            TokenState::Expired => format!("token:{id} (expired)"),
            TokenState::Revoked => {
                assert!(
                    server
                        .state
                        .keys
                        .store()
                        .revoke_token(&id, server.state.options.clock.now_unix())
                        .unwrap()
                );
                format!("token:{id} (revoked)")
            }
        };
        let (keys, tenants, audit) = server.clients_with(Some(&secret)).await;
        let mut clients = Clients {
            keys,
            tenants,
            audit,
        };
        for &op in ALL_OPS {
            let tenants_to_try: &[&str] = if op.global() {
                &["in"]
            } else if case.all_tenants {
                &["in", "out"]
            } else {
                &["in", "out", "ghost"]
            };
            let mut outside_answer = None;
            for &tenant in tenants_to_try {
                let in_scope = case.all_tenants || tenant == "in";
                let expected = if case.state != TokenState::Valid {
                    Code::Unauthenticated
                } else if !op.role_allows(case.role)
                    || op
                        .permission()
                        .is_some_and(|p| case.operations.is_some_and(|ops| ops != p))
                    || (op.global() && !case.all_tenants)
                    || (!op.global() && !in_scope)
                {
                    Code::PermissionDenied
                } else {
                    op.authorized_code()
                };
                let fixture = fixtures.get(tenant).unwrap_or(&fixtures["in"]);
                let (code, message) = run_op(&mut clients, op, tenant, fixture).await;
                assert_eq!(
                    code, expected,
                    "{} calling {op:?} on {tenant}: {message}",
                    case.name
                );
                rows += 1;
                if code == Code::Ok {
                    restore(&mut admin_tenants, op, tenant).await;
                }
                if matches!(code, Code::PermissionDenied | Code::Unauthenticated) {
                    let (text, id) = message.split_once('\u{0}').unwrap();
                    let outcome = if code == Code::PermissionDenied {
                        "denied"
                    } else {
                        "unauthenticated"
                    };
                    denials.push((id.to_owned(), audit_name.clone(), outcome));
                    // An existing tenant outside the scope and one that does not exist get the
                    // same answer, word for word.
                    if !in_scope {
                        match &outside_answer {
                            None => outside_answer = Some((code, text.to_owned())),
                            Some(first) => assert_eq!(
                                first,
                                &(code, text.to_owned()),
                                "{} {op:?}: 'out' and 'ghost' must be indistinguishable",
                                case.name
                            ),
                        }
                    }
                }
            }
        }
    }
    assert!(rows > 400, "the table ran {rows} rows");
    let records: HashMap<String, AuditRecord> = audit_records(&server)
        .into_iter()
        .map(|r| (r.request_id.clone(), r))
        .collect();
    for (request_id, caller, outcome) in &denials {
        let record = records
            .get(request_id)
            .unwrap_or_else(|| panic!("denial {request_id} was not audited"));
        assert_eq!(&record.caller, caller, "denial {request_id}");
        assert_eq!(record.outcome.as_str(), *outcome, "denial {request_id}");
    }
    assert!(denials.len() > 200, "{} denials checked", denials.len());
}

#[tokio::test]
async fn scoped_callers_may_not_list_or_verify_everything() {
    let server = TestServer::start().await;
    let (_, mut admin_tenants, _) = server.clients().await;
    create_tenant(&mut admin_tenants, "a").await;
    let (auditor, _) = issue(&server, Role::Auditor, "a", "*", None);
    let (_, _, mut audit) = server.clients_with(Some(&auditor)).await;
    // Its own tenant's audit: yes.
    audit
        .list_audit_events(pb::ListAuditEventsRequest {
            tenant_id: "a".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    // Every tenant's audit, or the whole chain's size: no.
    let err = audit
        .list_audit_events(pb::ListAuditEventsRequest::default())
        .await
        .status_err();
    assert_eq!(err.code(), Code::PermissionDenied);
    let err = audit
        .verify_audit_chain(pb::VerifyAuditChainRequest {})
        .await
        .status_err();
    assert_eq!(err.code(), Code::PermissionDenied);
}

// ---------------------------------------------------------------------------------------------
// Revocation and expiry across processes, with the real binary and the CLI.

fn cli_token(data_dir: &Path, args: &[&str]) -> (String, String) {
    cli_token_on(data_dir, args, None)
}

/// `token create` (on `clock` if given); returns (secret, id).
fn cli_token_on(data_dir: &Path, args: &[&str], clock: Option<&ProcessClock>) -> (String, String) {
    let mut all = vec!["token", "create", "--data-dir", data_dir.to_str().unwrap()];
    all.extend_from_slice(args);
    let (code, stdout, stderr) = match clock {
        Some(clock) => run_cli_on_clock(&all, clock),
        None => run_cli(&all),
    };
    assert_eq!(code, 0, "{stderr}");
    let token = stdout.trim().to_owned();
    assert!(
        token.starts_with("tkms_") && !token.contains('\n'),
        "{stdout}"
    );
    let id = stderr
        .split_whitespace()
        .skip_while(|w| *w != "token")
        .nth(1)
        .unwrap()
        .to_owned();
    (token, id)
}

#[tokio::test]
async fn revocation_and_expiry_take_effect_on_the_next_call_across_processes() {
    let temp = tempfile::tempdir().unwrap();
    let dir = temp.path().join("data");
    // On a clock the test moves (real time until the expiry part).
    let clock = ProcessClock::new();
    let server = BinaryServer::start_on_clock(&dir, &[], &clock).await;
    let (_, mut tenants, _) = clients(&server.url(), Some(&server.admin_token())).await;
    create_tenant(&mut tenants, "acme").await;

    // Created while the server runs: usable at once.
    let (token, id) = cli_token(&dir, &["--role", "service", "--tenants", "acme"]);
    let (mut keys, _, _) = clients(&server.url(), Some(&token)).await;
    encrypt(&mut keys, "acme", "ctx", b"x", b"").await;
    encrypt(&mut keys, "acme", "ctx", b"x", b"").await; // now cached in the server
    let (code, _, stderr) = run_cli(&["token", "revoke", &id, "--data-dir", dir.to_str().unwrap()]);
    assert_eq!(code, 0, "{stderr}");
    let err = keys
        .encrypt(encrypt_request("acme", "ctx", b"x", b""))
        .await
        .status_err();
    assert_eq!(
        err.code(),
        Code::Unauthenticated,
        "the very next call after revoke"
    );

    // Expiry: the token works, then stops at its expiry without any store change. The
    // server and the token command share a clock the test moves, so the hour passes at once.
    let (token, _) = cli_token_on(
        &dir,
        &["--role", "service", "--tenants", "acme", "--ttl", "1h"],
        Some(&clock),
    );
    let (mut keys, _, _) = clients(&server.url(), Some(&token)).await;
    encrypt(&mut keys, "acme", "ctx", b"x", b"").await; // now cached in the server
    clock.advance(3000);
    encrypt(&mut keys, "acme", "ctx", b"x", b"").await;
    clock.advance(600);
    let err = keys
        .encrypt(encrypt_request("acme", "ctx", b"x", b""))
        .await
        .status_err();
    assert_eq!(
        err.code(),
        Code::Unauthenticated,
        "the first call past expiry"
    );
    server.terminate().await;
}

#[tokio::test]
async fn token_expiry_is_exact_to_the_second_on_the_injected_clock() {
    let clock = ManualClock::starting_now();
    let server = TestServer::start_on_clock(&clock).await;
    let (_, mut tenants, _) = server.clients().await;
    create_tenant(&mut tenants, "acme").await;
    let (token, id) = issue(&server, Role::Service, "acme", "*", Some(60));
    let (mut keys, _, _) = server.clients_with(Some(&token)).await;
    encrypt(&mut keys, "acme", "ctx", b"x", b"").await;
    // One second before expiry the cached caller still works ...
    clock.advance(Duration::from_secs(59));
    encrypt(&mut keys, "acme", "ctx", b"x", b"").await;
    // ... and at the expiry second it does not, and the denial names the expired token.
    clock.advance(Duration::from_secs(1));
    let err = keys
        .encrypt(encrypt_request("acme", "ctx", b"x", b""))
        .await
        .status_err();
    assert_eq!(err.code(), Code::Unauthenticated);
    let record = audit_record_for(&server, &request_id(&err)).await;
    assert_eq!(record.caller, format!("token:{id} (expired)"));
    // A clock set back (an NTP step) makes it valid again: expiry is a comparison, not a
    // latch.
    clock.set_micros(clock.now_micros() - 2_000_000);
    encrypt(&mut keys, "acme", "ctx", b"x", b"").await;
}

// ---------------------------------------------------------------------------------------------
// TLS and mTLS with generated certificates.

/// A TLS server on a fresh data dir: server certificate from `pki`, client CA optional,
/// `[[tls_callers]]` entries given.
async fn tls_server(pki: &Pki, client_ca: bool, callers: &str) -> TestServer {
    let server_pem = pki.issue(&["localhost"], true, false);
    let files = TlsFiles {
        cert: pki.write("server.pem", &server_pem.cert),
        key: pki.write("server.key", &server_pem.key),
        client_ca: client_ca.then(|| pki.write("ca.pem", &pki.ca_pem)),
    };
    let config: tenant_kms::config::FileConfig = toml::from_str(callers).unwrap();
    let tls_callers = config.tls_callers().unwrap();
    TestServer::start_configured(move |o| {
        o.tls = Some(files);
        o.tls_callers = tls_callers;
    })
    .await
}

async fn tls_keys(channel: Channel, token: Option<&str>) -> Keys {
    KeyServiceClient::with_interceptor(channel, Auth(token.map(str::to_owned)))
}

#[tokio::test]
async fn tls_serves_tokens_and_refuses_plaintext() {
    let pki = Pki::new("test CA");
    let server = tls_server(&pki, false, "").await;
    let channel = tls_channel(server.addr, &pki.ca_pem, None).await.unwrap();
    let mut tenants = TenantServiceClient::with_interceptor(
        channel.clone(),
        Auth(Some(server.admin_token.clone())),
    );
    create_tenant(&mut tenants, "acme").await;
    let mut keys = tls_keys(channel, Some(&server.admin_token)).await;
    let ct = encrypt(&mut keys, "acme", "ctx", b"over tls", b"").await;
    assert_eq!(
        decrypt(&mut keys, "acme", "ctx", &ct.ciphertext, b"")
            .await
            .unwrap()
            .plaintext,
        b"over tls"
    );
    // A plaintext HTTP/2 client gets no answer from the service.
    let plain = Channel::from_shared(server.url()).unwrap().connect().await;
    if let Ok(plain) = plain {
        let mut plain_keys = tls_keys(plain, Some(&server.admin_token)).await;
        assert!(
            plain_keys
                .encrypt(encrypt_request("acme", "ctx", b"x", b""))
                .await
                .is_err()
        );
    }
    // A server certificate from another CA is refused by the client.
    let other = Pki::new("other CA");
    let refused = match tls_channel(server.addr, &other.ca_pem, None).await {
        Err(_) => true,
        Ok(channel) => tls_keys(channel, Some(&server.admin_token))
            .await
            .get_tenant_probe()
            .await
            .is_err(),
    };
    assert!(refused);
}

/// A call that fails unless the connection is up and authorized.
trait Probe {
    async fn get_tenant_probe(&mut self) -> Result<(), tonic::Status>;
}

impl Probe for Keys {
    async fn get_tenant_probe(&mut self) -> Result<(), tonic::Status> {
        self.encrypt(encrypt_request("acme", "ctx", b"probe", b""))
            .await
            .map(drop)
    }
}

const MAPPED_CALLERS: &str = r#"
[[tls_callers]]
identity = "ingest.svc.internal"
role = "service"
tenants = ["acme"]
operations = ["encrypt"]

[[tls_callers]]
identity = "ops-admin"
role = "admin"
tenants = ["*"]
"#;

#[tokio::test]
async fn mtls_refuses_missing_foreign_and_expired_client_certificates() {
    let pki = Pki::new("clients CA");
    let server = tls_server(&pki, true, MAPPED_CALLERS).await;
    let before = server.audit_count();
    let other = Pki::new("another CA");
    let foreign = other.issue(&["ingest.svc.internal"], false, false);
    let expired = pki.issue(&["ingest.svc.internal"], false, true);
    for (what, client) in [
        ("no client certificate", None),
        ("a certificate from another CA", Some(&foreign)),
        ("an expired certificate", Some(&expired)),
    ] {
        // TLS 1.3 clients finish their side before the server judges their certificate, so
        // the refusal may surface at connect or at the first call; either way no call reaches
        // the service (nothing is audited) and the admin token does not help.
        let outcome = match tls_channel(server.addr, &pki.ca_pem, client).await {
            Err(_) => None,
            Ok(channel) => Some(
                tls_keys(channel, Some(&server.admin_token))
                    .await
                    .get_tenant_probe()
                    .await,
            ),
        };
        match outcome {
            None => {}
            Some(Ok(())) => panic!("{what}: the call went through"),
            Some(Err(status)) => {
                assert!(
                    status.metadata().get("x-request-id").is_none(),
                    "{what}: the service answered ({status:?}) instead of the handshake failing"
                );
            }
        }
    }
    assert_eq!(
        server.audit_count(),
        before,
        "no refused handshake reached a handler"
    );
}

#[tokio::test]
async fn mtls_mapped_certificate_acts_as_its_caller() {
    let pki = Pki::new("clients CA");
    let server = tls_server(&pki, true, MAPPED_CALLERS).await;
    let ops = pki.issue(&["ops-admin"], false, false);
    let ingest = pki.issue(&["ingest.svc.internal"], false, false);
    let stranger = pki.issue(&["stranger.svc.internal"], false, false);

    // The admin certificate alone (no token) manages tenants.
    let channel = tls_channel(server.addr, &pki.ca_pem, Some(&ops))
        .await
        .unwrap();
    let mut tenants = TenantServiceClient::with_interceptor(channel, Auth(None));
    create_tenant(&mut tenants, "acme").await;
    create_tenant(&mut tenants, "globex").await;

    // The ingest certificate: encrypt for acme only, nothing else.
    let channel = tls_channel(server.addr, &pki.ca_pem, Some(&ingest))
        .await
        .unwrap();
    let mut keys = tls_keys(channel, None).await;
    let ct = encrypt(&mut keys, "acme", "ctx", b"v", b"").await;
    let denied = decrypt(&mut keys, "acme", "ctx", &ct.ciphertext, b"")
        .await
        .status_err();
    assert_eq!(denied.code(), Code::PermissionDenied);
    let record = audit_record_for(&server, &request_id(&denied)).await;
    assert_eq!(record.caller, "cert:ingest.svc.internal");
    assert_eq!(record.outcome.as_str(), "denied");
    let other_tenant = keys
        .encrypt(encrypt_request("globex", "ctx", b"v", b""))
        .await
        .status_err();
    assert_eq!(other_tenant.code(), Code::PermissionDenied);

    // A valid but unmapped certificate names nobody: a token is still needed.
    let channel = tls_channel(server.addr, &pki.ca_pem, Some(&stranger))
        .await
        .unwrap();
    let mut anonymous = tls_keys(channel.clone(), None).await;
    let err = anonymous.get_tenant_probe().await.status_err();
    assert_eq!(err.code(), Code::Unauthenticated);
    let mut with_token = tls_keys(channel, Some(&server.admin_token)).await;
    with_token.get_tenant_probe().await.unwrap();

    // A token beats the certificate: a bad token is not rescued by a mapped certificate.
    let channel = tls_channel(server.addr, &pki.ca_pem, Some(&ops))
        .await
        .unwrap();
    let mut bad_token = tls_keys(channel, Some("tkms_not-a-token")).await;
    let err = bad_token.get_tenant_probe().await.status_err();
    assert_eq!(err.code(), Code::Unauthenticated);

    // The CLI's TLS flags: --ca-cert, --client-cert, --client-key (no token file).
    let files = (
        pki.write("cli-ca.pem", &pki.ca_pem),
        pki.write("cli.pem", &ingest.cert),
        pki.write("cli.key", &ingest.key),
    );
    let mut child = Command::new(BIN)
        .args(["encrypt", "--tenant", "acme", "--context", "ctx"])
        .args([
            "--addr",
            &format!("https://localhost:{}", server.addr.port()),
        ])
        .arg("--ca-cert")
        .arg(&files.0)
        .arg("--client-cert")
        .arg(&files.1)
        .arg("--client-key")
        .arg(&files.2)
        // No token at all: run where no ./data/admin.token can be picked up by default.
        .current_dir(pki.dir.path())
        .env_remove("TENANT_KMS_TOKEN")
        .env_remove("TENANT_KMS_TOKEN_FILE")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::Write;
    child
        .stdin
        .take()
        .unwrap()
        .write_all(b"from the cli")
        .unwrap();
    let output = tokio::task::spawn_blocking(move || child.wait_with_output())
        .await
        .unwrap()
        .unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(!output.stdout.is_empty());
}

// ---------------------------------------------------------------------------------------------
// Abuse limits.

#[tokio::test]
async fn rate_limit_refuses_the_fourth_call_with_retry_info() {
    let server = TestServer::start_configured(|o| {
        o.limits.rate_limit = tenant_kms::auth::rate::RateLimit {
            per_second: 0.01,
            burst: 3,
        };
    })
    .await;
    let (_, mut admin, _) = server.clients().await;
    create_tenant(&mut admin, "acme").await;
    let (token, id) = issue(&server, Role::Service, "acme", "*", None);
    let (mut keys, _, _) = server.clients_with(Some(&token)).await;
    for _ in 0..3 {
        encrypt(&mut keys, "acme", "ctx", b"v", b"").await;
    }
    let err = keys.get_tenant_probe().await.status_err();
    assert_eq!(err.code(), Code::ResourceExhausted, "{}", err.message());
    let retry_ms: u64 = err
        .metadata()
        .get(tenant_kms::service::status::RETRY_AFTER_MS)
        .unwrap()
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!(
        retry_ms > 1000,
        "one token at 0.01/s is ~100 s away: {retry_ms}"
    );
    use tonic_types::StatusExt;
    let info = err.get_details_retry_info().expect("google.rpc.RetryInfo");
    assert!(info.retry_delay.unwrap() > Duration::from_secs(1));
    let record = audit_record_for(&server, &request_id(&err)).await;
    assert_eq!(record.caller, format!("token:{id}"));
    assert_eq!(record.outcome.as_str(), "exhausted");
    // Per caller: another token is unaffected.
    let (other, _) = issue(&server, Role::Service, "acme", "*", None);
    let (mut other_keys, _, _) = server.clients_with(Some(&other)).await;
    encrypt(&mut other_keys, "acme", "ctx", b"v", b"").await;
    // Failed authentications are limited per peer address.
    let (mut nobody, _, _) = server.clients_with(Some("tkms_bogus")).await;
    let mut codes = Vec::new();
    for _ in 0..4 {
        codes.push(nobody.get_tenant_probe().await.status_err().code());
    }
    assert_eq!(
        codes,
        [
            Code::Unauthenticated,
            Code::Unauthenticated,
            Code::Unauthenticated,
            Code::ResourceExhausted
        ]
    );
}

/// Holds SQLite's write lock on a database until dropped, so the server's writes to it wait.
struct WriteLock(rusqlite::Connection);

impl WriteLock {
    fn take(path: &Path) -> Self {
        let conn = rusqlite::Connection::open(path).unwrap();
        conn.execute_batch("BEGIN IMMEDIATE").unwrap();
        Self(conn)
    }

    fn release(self) {
        self.0.execute_batch("ROLLBACK").unwrap();
    }
}

#[tokio::test]
async fn concurrency_cap_refuses_instead_of_queueing() {
    let server = TestServer::start_configured(|o| o.limits.max_concurrent_requests = 1).await;
    let (_, mut admin, _) = server.clients().await;
    create_tenant(&mut admin, "acme").await;
    let token = server.admin_token.clone();
    // While audit.db is locked, the call holding the only permit cannot finish; the other
    // one is refused at once instead of waiting behind it.
    let lock = WriteLock::take(&server.data_dir.join("audit.db"));
    let url = server.url();
    let mut calls = tokio::task::JoinSet::new();
    for _ in 0..2 {
        let (url, token) = (url.clone(), token.clone());
        calls.spawn(async move {
            let (mut keys, _, _) = clients(&url, Some(&token)).await;
            keys.get_tenant_probe().await
        });
    }
    let first = calls.join_next().await.unwrap().unwrap().status_err();
    assert_eq!(first.code(), Code::ResourceExhausted, "{}", first.message());
    assert!(first.metadata().get("retry-after-ms").is_some());
    lock.release();
    calls.join_next().await.unwrap().unwrap().unwrap();
}

/// A unary call over a bare HTTP/2 client with an optional `grpc-timeout` header. tonic's
/// `Channel` would also enforce the header on the client side and answer CANCELLED itself
/// when its own timer wins the race; this client leaves the deadline to the server.
async fn raw_unary<Req, Resp>(
    addr: std::net::SocketAddr,
    token: &str,
    path: &'static str,
    message: Req,
    timeout: Option<&str>,
) -> Result<Resp, tonic::Status>
where
    Req: prost::Message + Send + Sync + 'static,
    Resp: prost::Message + Default + Send + Sync + 'static,
{
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .http2_only(true)
        .build_http::<tonic::body::Body>();
    let origin: tonic::codegen::http::Uri = format!("http://{addr}").parse().unwrap();
    let mut grpc = tonic::client::Grpc::with_origin(client, origin);
    grpc.ready().await.unwrap();
    let mut request = tonic::Request::new(message);
    request
        .metadata_mut()
        .insert("authorization", format!("Bearer {token}").parse().unwrap());
    if let Some(timeout) = timeout {
        request
            .metadata_mut()
            .insert("grpc-timeout", timeout.parse().unwrap());
    }
    grpc.unary(
        request,
        path.parse().unwrap(),
        tonic_prost::ProstCodec::<Req, Resp>::new(),
    )
    .await
    .map(|r| r.into_inner())
}

/// Waits (bounded) for the audit record of `operation` on `tenant`.
async fn audit_record_of(server: &TestServer, operation: &str, tenant: &str) -> AuditRecord {
    for _ in 0..200 {
        if let Some(r) = audit_records(server)
            .into_iter()
            .find(|r| r.operation == operation && r.tenant_id == tenant)
        {
            return r;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    panic!("no audit record of {operation} on {tenant}");
}

#[tokio::test]
async fn caller_deadline_is_honoured_with_deadline_exceeded_and_audited() {
    let server = TestServer::start().await;
    let (_, mut tenants, _) = server.clients().await;
    create_tenant(&mut tenants, "acme").await;
    // The key store is locked, so the first Encrypt (which must reserve nonce budget in the
    // store) cannot finish; the caller's grpc-timeout (300 ms, far below the server's 60 s
    // cap) ends it before its audit record, so the record comes from Drop.
    let lock = WriteLock::take(&server.data_dir.join("keys.db"));
    let started = std::time::Instant::now();
    let err = raw_unary::<_, pb::EncryptResponse>(
        server.addr,
        &server.admin_token,
        "/tenantkms.v1.KeyService/Encrypt",
        encrypt_request("acme", "ctx", b"v", b""),
        Some("300m"),
    )
    .await
    .status_err();
    assert_eq!(err.code(), Code::DeadlineExceeded, "{}", err.message());
    assert!(
        err.message().contains("deadline exceeded"),
        "{}",
        err.message()
    );
    assert!(started.elapsed() < Duration::from_secs(5));
    let record = audit_record_of(&server, "Encrypt", "acme").await;
    assert_eq!(record.outcome.as_str(), "deadline_exceeded");
    assert!(record.caller.starts_with("token:"), "{}", record.caller);
    // Let the abandoned reservation finish before the next part (it holds the store).
    lock.release();
    encrypt(&mut server.clients().await.0, "acme", "ctx", b"v", b"").await;

    // A control-plane change cut off by its deadline is shielded: it completes once the store
    // is free, and its record says so, although the caller heard DEADLINE_EXCEEDED.
    let lock = WriteLock::take(&server.data_dir.join("keys.db"));
    let err = raw_unary::<_, pb::Tenant>(
        server.addr,
        &server.admin_token,
        "/tenantkms.v1.TenantService/CreateTenant",
        pb::CreateTenantRequest {
            tenant_id: "late".into(),
        },
        Some("300m"),
    )
    .await
    .status_err();
    assert_eq!(err.code(), Code::DeadlineExceeded, "{}", err.message());
    lock.release();
    let record = audit_record_of(&server, "CreateTenant", "late").await;
    assert_eq!(record.outcome.as_str(), "ok");
    get_tenant(&mut tenants, "late").await.unwrap();
}

#[tokio::test]
async fn server_request_timeout_caps_every_call() {
    let server =
        TestServer::start_configured(|o| o.limits.request_timeout = Duration::from_millis(300))
            .await;
    let (_, mut tenants, _) = server.clients().await;
    create_tenant(&mut tenants, "acme").await;
    // No grpc-timeout at all (and then a generous one): the server's cap still applies.
    // Here the call is cut off while its record is being made durable (audit.db locked): no
    // result goes out, and the record, already queued, is written once the lock goes.
    let lock = WriteLock::take(&server.data_dir.join("audit.db"));
    for timeout in [None, Some("10S")] {
        let err = raw_unary::<_, pb::EncryptResponse>(
            server.addr,
            &server.admin_token,
            "/tenantkms.v1.KeyService/Encrypt",
            encrypt_request("acme", "ctx", b"v", b""),
            timeout,
        )
        .await
        .status_err();
        assert_eq!(err.code(), Code::DeadlineExceeded, "{}", err.message());
    }
    lock.release();
    let record = audit_record_of(&server, "Encrypt", "acme").await;
    assert_eq!(
        record.outcome.as_str(),
        "ok",
        "the record says what happened to the keys"
    );
}

// ---------------------------------------------------------------------------------------------
// Unknown request fields.

/// `EncryptRequest` as a newer client might send it: one field this server does not know.
#[derive(Clone, PartialEq, prost::Message)]
struct EncryptRequestFromTheFuture {
    #[prost(string, tag = "1")]
    tenant_id: String,
    #[prost(string, tag = "2")]
    context: String,
    #[prost(bytes = "vec", tag = "3")]
    plaintext: Vec<u8>,
    #[prost(bytes = "vec", tag = "4")]
    aad: Vec<u8>,
    #[prost(string, tag = "99")]
    key_spec: String,
}

async fn raw_encrypt(
    channel: Channel,
    token: &str,
    message: EncryptRequestFromTheFuture,
) -> Result<pb::EncryptResponse, tonic::Status> {
    let mut grpc = tonic::client::Grpc::new(channel);
    grpc.ready().await.unwrap();
    let mut request = tonic::Request::new(message);
    request
        .metadata_mut()
        .insert("authorization", format!("Bearer {token}").parse().unwrap());
    let codec = tonic_prost::ProstCodec::<EncryptRequestFromTheFuture, pb::EncryptResponse>::new();
    grpc.unary(
        request,
        "/tenantkms.v1.KeyService/Encrypt".parse().unwrap(),
        codec,
    )
    .await
    .map(|r| r.into_inner())
}

#[tokio::test]
async fn unknown_request_fields_are_refused_not_ignored() {
    let server = TestServer::start().await;
    let (_, mut tenants, _) = server.clients().await;
    create_tenant(&mut tenants, "acme").await;
    let channel = connect(&server.url()).await;
    let known = EncryptRequestFromTheFuture {
        tenant_id: "acme".into(),
        context: "ctx".into(),
        plaintext: b"v".to_vec(),
        aad: vec![],
        key_spec: String::new(),
    };
    raw_encrypt(channel.clone(), &server.admin_token, known.clone())
        .await
        .unwrap();
    let err = raw_encrypt(
        channel,
        &server.admin_token,
        EncryptRequestFromTheFuture {
            key_spec: "AES_128".into(),
            ..known
        },
    )
    .await
    .status_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().contains("does not use"), "{}", err.message());
}

// ---------------------------------------------------------------------------------------------
// Process hardening and the trace-log leak walkthrough (real binary).

/// `tenant-kms serve` with stderr into a file (a pipe would fill up at trace level).
struct LoggedServer {
    child: std::process::Child,
    addr: std::net::SocketAddr,
}

impl LoggedServer {
    async fn start(data_dir: &Path, log: &Path, level: &str) -> Self {
        let child = Command::new(BIN)
            .arg("serve")
            .arg("--data-dir")
            .arg(data_dir)
            .args(["--listen", "127.0.0.1:0", "--log", level])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(log).unwrap())
            .spawn()
            .unwrap();
        // The ready line comes once the data directory is open and the port bound.
        let (child, addr) = await_listening(child, Some(log.to_path_buf())).await;
        Self { child, addr }
    }

    fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    async fn stop(mut self) {
        let _ = Command::new("kill")
            .arg("-TERM")
            .arg(self.child.id().to_string())
            .status();
        let mut child = std::mem::replace(&mut self.child, Command::new("true").spawn().unwrap());
        tokio::task::spawn_blocking(move || child.wait())
            .await
            .unwrap()
            .unwrap();
    }
}

impl Drop for LoggedServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[tokio::test]
async fn serve_disables_core_dumps_and_locks_memory_or_warns() {
    let temp = tempfile::tempdir().unwrap();
    let log = temp.path().join("serve.log");
    let server = LoggedServer::start(&temp.path().join("data"), &log, "info").await;
    let limits = std::fs::read_to_string(format!("/proc/{}/limits", server.child.id())).unwrap();
    let core = limits
        .lines()
        .find(|l| l.starts_with("Max core file size"))
        .unwrap();
    assert_eq!(
        core.split_whitespace().nth(4),
        Some("0"),
        "core dumps must be off: {core}"
    );
    let status = std::fs::read_to_string(format!("/proc/{}/status", server.child.id())).unwrap();
    let locked_kb: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmLck:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    server.stop().await;
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(
        locked_kb > 0 || text.contains("memory is NOT locked"),
        "either memory is locked or the log says it is not: {text}"
    );
    assert!(text.contains("process hardening applied"), "{text}");
}

#[tokio::test]
async fn trace_log_of_a_full_walkthrough_holds_no_secret() {
    use base64::Engine;
    let temp = tempfile::tempdir().unwrap();
    let dir = temp.path().join("data");
    let log = temp.path().join("trace.log");
    let server = LoggedServer::start(&dir, &log, "trace").await;
    let admin = std::fs::read_to_string(dir.join("admin.token"))
        .unwrap()
        .trim()
        .to_owned();
    let (service, _) = cli_token(&dir, &["--role", "service", "--tenants", "acme"]);
    let (auditor, _) = cli_token(&dir, &["--role", "auditor", "--tenants", "acme"]);
    let (_, mut tenants, _) = clients(&server.url(), Some(&admin)).await;
    let (mut keys, _, _) = clients(&server.url(), Some(&service)).await;
    let (_, _, mut audit) = clients(&server.url(), Some(&auditor)).await;

    let plaintexts: Vec<Vec<u8>> = (0..4)
        .map(|i| format!("PLAINTEXT-canary-{i}-q8Zr3x").into_bytes())
        .collect();
    let aads: Vec<Vec<u8>> = (0..4)
        .map(|i| format!("AAD-canary-{i}-Lm2pW").into_bytes())
        .collect();
    let mut secrets: Vec<(String, Vec<u8>)> = vec![
        ("admin token".into(), admin.clone().into_bytes()),
        ("service token".into(), service.clone().into_bytes()),
        ("auditor token".into(), auditor.clone().into_bytes()),
    ];
    for (i, p) in plaintexts.iter().enumerate() {
        secrets.push((format!("plaintext {i}"), p.clone()));
    }
    for (i, a) in aads.iter().enumerate() {
        secrets.push((format!("aad {i}"), a.clone()));
    }

    create_tenant(&mut tenants, "acme").await;
    let one = encrypt(&mut keys, "acme", "crm.email", &plaintexts[0], &aads[0]).await;
    let back = decrypt(&mut keys, "acme", "crm.email", &one.ciphertext, &aads[0])
        .await
        .unwrap();
    assert_eq!(back.plaintext, plaintexts[0]);
    let batch = keys
        .encrypt_batch(pb::EncryptBatchRequest {
            tenant_id: "acme".into(),
            items: (1..3)
                .map(|i| pb::EncryptBatchItem {
                    context: "crm.phone".into(),
                    plaintext: plaintexts[i].clone(),
                    aad: aads[i].clone(),
                    ..Default::default()
                })
                .collect(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let cts: Vec<Vec<u8>> = batch
        .results
        .into_iter()
        .map(|r| match r.result.unwrap() {
            pb::encrypt_batch_result::Result::Output(o) => o.ciphertext,
            pb::encrypt_batch_result::Result::Error(e) => panic!("{}", e.message),
        })
        .collect();
    keys.decrypt_batch(pb::DecryptBatchRequest {
        tenant_id: "acme".into(),
        items: cts
            .iter()
            .enumerate()
            .map(|(i, ct)| pb::DecryptBatchItem {
                context: "crm.phone".into(),
                ciphertext: ct.clone(),
                aad: aads[i + 1].clone(),
            })
            .collect(),
    })
    .await
    .unwrap();
    let data_key = generate_data_key(&mut keys, "acme", "files").await;
    let unwrapped = decrypt_data_key(&mut keys, "acme", "files", &data_key.wrapped_key)
        .await
        .unwrap();
    assert_eq!(unwrapped.plaintext_key, data_key.plaintext_key);
    secrets.push(("data key".into(), data_key.plaintext_key.clone()));
    rotate_tenant(&mut tenants, "acme").await.unwrap();
    let three = encrypt(&mut keys, "acme", "crm.email", &plaintexts[3], &aads[3]).await;
    keys.rewrap(pb::RewrapRequest {
        tenant_id: "acme".into(),
        context: "crm.email".into(),
        ciphertext: one.ciphertext.clone(),
        aad: aads[0].clone(),
        ..Default::default()
    })
    .await
    .unwrap();
    keys.rewrap_batch(pb::RewrapBatchRequest {
        tenant_id: "acme".into(),
        items: vec![pb::RewrapBatchItem {
            context: "crm.email".into(),
            ciphertext: three.ciphertext,
            aad: aads[3].clone(),
            ..Default::default()
        }],
    })
    .await
    .unwrap();
    // A failing decrypt with the right AAD and a wrong one, so error paths are logged too.
    let _ = decrypt(&mut keys, "acme", "crm.email", &one.ciphertext, b"wrong").await;
    let events = audit
        .list_audit_events(pb::ListAuditEventsRequest {
            tenant_id: "acme".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .events;
    assert!(events.len() >= 10);
    server.stop().await;

    // The master key too (hex, as the keyring stores it).
    let keyring = std::fs::read_to_string(dir.join("master.keyring")).unwrap();
    for line in keyring.lines().filter(|l| !l.starts_with('#')) {
        if let Some(hex_key) = line.split_whitespace().nth(1) {
            secrets.push(("master key (hex)".into(), hex_key.as_bytes().to_vec()));
        }
    }

    let text = std::fs::read(&log).unwrap();
    assert!(
        text.len() > 10_000,
        "trace logging was on ({} bytes)",
        text.len()
    );
    let b64 = base64::engine::general_purpose::STANDARD;
    for (what, secret) in &secrets {
        let forms = [
            secret.clone(),
            hex::encode(secret).into_bytes(),
            b64.encode(secret).into_bytes(),
            format!("{secret:?}").into_bytes(),
        ];
        for form in forms {
            assert!(
                !text.windows(form.len()).any(|w| w == form.as_slice()),
                "{what} appears in the trace log"
            );
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Admission under hostile clients (issue 13, item 1).

/// Opens streams on one raw HTTP/2 connection, each sending the headers of an Encrypt call
/// (with a garbage token) and the first bytes of a body it never finishes, until the server's
/// stream limit stops it or `want` are open. Returns the pending responses and the send halves
/// (kept so the streams stay open), and the stream limit the server advertised.
async fn stalled_streams(
    addr: std::net::SocketAddr,
    want: usize,
) -> (
    Vec<h2::client::ResponseFuture>,
    Vec<h2::SendStream<prost::bytes::Bytes>>,
    usize,
) {
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let (mut sender, mut connection) = h2::client::handshake(tcp).await.unwrap();
    // A ping's answer comes after the server's SETTINGS, so the limit is known afterwards.
    let mut ping = connection.ping_pong().unwrap();
    let driver = tokio::spawn(async move {
        let pong = ping.ping(h2::Ping::opaque());
        tokio::select! {
            _ = pong => {}
            _ = &mut connection => panic!("connection closed before the ping's answer"),
        }
        let advertised = connection.max_concurrent_send_streams();
        tokio::spawn(connection);
        advertised
    });
    let advertised = driver.await.unwrap();
    let (mut responses, mut bodies) = (Vec::new(), Vec::new());
    while responses.len() < want {
        sender = match tokio::time::timeout(Duration::from_millis(300), sender.ready()).await {
            Ok(ready) => ready.unwrap(),
            Err(_) => break, // the server's limit is reached: no more streams on it
        };
        let request = tonic::codegen::http::Request::post(format!(
            "http://{addr}/tenantkms.v1.KeyService/Encrypt"
        ))
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .header("authorization", "Bearer not-a-token")
        .body(())
        .unwrap();
        let (response, mut body) = sender.send_request(request, false).unwrap();
        // A prefix announcing 100 bytes, then only 10 of them.
        let mut partial = vec![0u8, 0, 0, 0, 100];
        partial.extend_from_slice(&[0u8; 10]);
        body.send_data(partial.into(), false).unwrap();
        responses.push(response);
        bodies.push(body);
    }
    (responses, bodies, advertised)
}

#[tokio::test]
async fn stalled_streams_from_one_connection_lock_nobody_out() {
    let body_timeout = Duration::from_millis(1500);
    let server = TestServer::start_configured(|o| {
        // Far fewer places than the attacker has streams: half-sent requests take none.
        o.limits.max_concurrent_requests = 16;
        o.limits.body_timeout = body_timeout;
    })
    .await;
    let (_, mut admin, _) = server.clients().await;
    create_tenant(&mut admin, "acme").await;
    let (service_token, _) = issue(&server, Role::Service, "acme", "encrypt,decrypt", None);

    let started = std::time::Instant::now();
    // 300 streams: the client keeps those beyond the advertised limit waiting to open until
    // earlier ones end, so they reach the server in waves of at most the limit.
    let (responses, bodies, advertised) = stalled_streams(server.addr, 300).await;
    let limit = tenant_kms::service::server::MAX_STREAMS_PER_CONNECTION as usize;
    assert_eq!(advertised, limit, "the server advertises its stream limit");
    assert_eq!(responses.len(), 300);

    // While they stall, the admin and a service caller are served.
    get_tenant(&mut admin, "acme").await.unwrap();
    let (mut keys, _, _) = server.clients_with(Some(&service_token)).await;
    encrypt(&mut keys, "acme", "ctx", b"value", b"").await;

    // Every stalled stream is ended once the body deadline passes (not the 60 s request
    // timeout), with DEADLINE_EXCEEDED.
    for response in responses {
        let response = tokio::time::timeout(Duration::from_secs(20), response)
            .await
            .expect("a stalled stream was not ended")
            .unwrap();
        let status = response.headers().get("grpc-status").unwrap();
        assert_eq!(status, "4", "DEADLINE_EXCEEDED");
    }
    // Three waves (128 + 128 + 44), each ended by the body deadline.
    assert!(
        started.elapsed() >= body_timeout * 3,
        "{:?}",
        started.elapsed()
    );
    assert!(started.elapsed() < Duration::from_secs(30));
    drop(bodies);
    // Nothing stalled reached the audit: no caller was authenticated, no key touched.
    assert!(
        audit_records(&server)
            .iter()
            .all(|r| r.caller != "anonymous"),
        "half-sent requests are not audited"
    );
}

#[tokio::test]
async fn one_caller_with_many_calls_in_flight_cannot_make_another_fail() {
    let server = TestServer::start_configured(|o| o.limits.max_concurrent_requests = 64).await;
    let (_, mut admin, _) = server.clients().await;
    create_tenant(&mut admin, "acme").await;
    let (hog, _) = issue(&server, Role::Service, "acme", "encrypt", None);
    let (other, _) = issue(&server, Role::Service, "acme", "encrypt", None);

    // With audit.db locked, admitted calls cannot finish: they stay in flight.
    let lock = WriteLock::take(&server.data_dir.join("audit.db"));
    let url = server.url();
    let mut hog_calls = tokio::task::JoinSet::new();
    for _ in 0..4 {
        let (keys, _, _) = clients(&url, Some(&hog)).await;
        for _ in 0..50 {
            let mut keys = keys.clone();
            hog_calls.spawn(async move { keys.get_tenant_probe().await });
        }
    }
    // 200 calls against 64 places: the hog is held to 48 (the cap less its quarter kept for
    // others), and its other 152 calls are refused at once.
    let mut refused = 0;
    while refused < 152 {
        let result = tokio::time::timeout(Duration::from_secs(30), hog_calls.join_next())
            .await
            .expect("hog calls neither refused nor stuck")
            .unwrap()
            .unwrap();
        let err = result.status_err();
        assert_eq!(err.code(), Code::ResourceExhausted, "{}", err.message());
        refused += 1;
    }
    // The other caller and the admin are admitted while the hog holds its 48.
    let mut other_call = tokio::spawn({
        let url = url.clone();
        async move {
            let (mut keys, _, _) = clients(&url, Some(&other)).await;
            keys.get_tenant_probe().await
        }
    });
    let mut admin_call = tokio::spawn({
        let (url, token) = (url.clone(), server.admin_token.clone());
        async move {
            let (_, mut tenants, _) = clients(&url, Some(&token)).await;
            get_tenant(&mut tenants, "acme").await.map(drop)
        }
    });
    // A refusal would come at once; admitted, they wait for the audit lock instead.
    for call in [&mut other_call, &mut admin_call] {
        assert!(
            tokio::time::timeout(Duration::from_millis(500), call)
                .await
                .is_err(),
            "the call was answered while the audit was locked (refused)"
        );
    }
    lock.release();
    other_call.await.unwrap().unwrap();
    admin_call.await.unwrap().unwrap();
    let mut served = 0;
    while let Some(result) = hog_calls.join_next().await {
        result.unwrap().unwrap();
        served += 1;
    }
    assert_eq!(served, 48);
}
