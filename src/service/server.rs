//! Serving: `run(listener, state, shutdown)` takes an already-bound listener and a shutdown
//! future, so tests start it on port 0 and stop it when they like.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tonic::server::NamedService;
use tonic::service::Routes;
use tonic::transport::Server;
use tonic::transport::server::TcpIncoming;
use tonic_health::ServingStatus;

use super::audit_service::AuditServiceImpl;
use super::connections::{Connections, WatchLayer};
use super::guard::GuardLayer;
use super::key_service::KeyServiceImpl;
use super::refusals::Refusals;
use super::rest::GatewayLayer;
use super::state::AppState;
use super::tenant_service::TenantServiceImpl;
use crate::domain::TenantId;
use crate::error::{Error, Result};
use crate::pb::audit_service_server::AuditServiceServer;
use crate::pb::key_service_server::KeyServiceServer;
use crate::pb::tenant_service_server::TenantServiceServer;

/// The encoded descriptor set of our protos, for server reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/tenantkms_descriptor.bin"));

/// How often the server looks for tenants whose deletion window has passed.
const REAPER_INTERVAL: Duration = Duration::from_secs(60);

/// Serves the three services plus `grpc.health.v1` and reflection on `listener`, and the same
/// services as an HTTP/JSON API with its OpenAPI document (`rest`) on the same port, until
/// `shutdown` completes; then in-flight calls finish and the audit writer is flushed.
pub async fn run(
    listener: TcpListener,
    state: Arc<AppState>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<()> {
    run_with(listener, state, shutdown, |_| Routes::default()).await
}

/// [`run`], also serving the services `extra` returns for the opened state, behind the same
/// layers (concurrency cap, deadlines, size refusals) and TLS as ours. The product serves
/// none; the bench crate adds its echo baseline this way, so no benchmark service is
/// compiled into this library. Reflection lists only this crate's services, and the extra
/// services are not marked in the health service: they are not part of the product's API.
pub async fn run_with(
    listener: TcpListener,
    state: Arc<AppState>,
    shutdown: impl Future<Output = ()> + Send + 'static,
    extra: impl FnOnce(&AppState) -> Routes,
) -> Result<()> {
    let max = state.options.limits.max_message_bytes;
    let (health_reporter, health_service) = tonic_health::server::health_reporter();
    let readiness = Readiness::new(health_reporter);
    readiness.set(ServingStatus::Serving).await;
    let follow_audit = tokio::spawn(Readiness::follow_audit(
        readiness.clone(),
        state.audit.writable(),
    ));
    // Both reflection versions: v1alpha is all that grpcurl before 1.8.8, Python's
    // grpcio-reflection, Evans and Postman speak. Each lists exactly what this server serves:
    // our three services, health, and both reflection services.
    let reflection = reflection_builder()
        .build_v1()
        .map_err(|e| Error::Internal(format!("reflection: {e}")))?;
    let reflection_v1alpha = reflection_builder()
        .build_v1alpha()
        .map_err(|e| Error::Internal(format!("reflection v1alpha: {e}")))?;
    // On shutdown the services turn NOT_SERVING first (watchers see it), then their health
    // streams end, so an open Watch does not hold the graceful stop open.
    let stopping = readiness.clone();
    let shutdown = async move {
        shutdown.await;
        stopping.shut_down().await;
    };

    let limits = &state.options.limits;
    // Refusals before authentication are audited in aggregate (issue 13): counted here,
    // flushed per window by a task, and drained when the server stops.
    let refusals = Refusals::new(
        limits.refusals,
        Arc::clone(&state.options.clock),
        state.audit.clone(),
    );
    let guard = GuardLayer::new(
        limits.max_concurrent_requests,
        limits.request_timeout,
        limits.body_timeout,
        max,
        limits.max_awaiting_body,
        Arc::clone(&refusals),
        state.audit.arrivals().clone(),
    );
    let connections = Connections::new(
        limits.send_timeout,
        limits.handshake_timeout,
        limits.max_unestablished_connections,
    );
    // The advertised stream limit bounds what one connection can hold open (issue 13: the
    // server advertised none, so one connection opened a thousand stalled streams).
    // HTTP/1.1 too, for the HTTP/JSON API (`rest`): curl, browsers' fetch and REST connectors
    // speak it; gRPC stays HTTP/2 (its framing needs trailers). With TLS, the handshake is
    // ours (`tls`), so that ALPN offers http/1.1 as well as h2.
    let builder = Server::builder()
        .max_concurrent_streams(MAX_STREAMS_PER_CONNECTION)
        .accept_http1(true);
    let tls = match &state.options.tls {
        Some(files) => Some(super::tls::server_config(files)?),
        None => None,
    };
    let reaper = tokio::spawn(reap_due_deletions(Arc::clone(&state)));
    let flusher = tokio::spawn(Arc::clone(&refusals).flush_periodically());
    let sweeper = tokio::spawn(Arc::clone(&connections).sweep_periodically());
    let usage_flusher = tokio::spawn(Arc::clone(&state.usage).flush_periodically());
    // Anomaly alerts are delivered by their own task: a slow endpoint never holds a call.
    let webhook = state
        .webhook
        .as_ref()
        .and_then(crate::webhook::Webhook::start);
    let streams = crate::audit::stream::Streams::start(
        &state.options.audit_stream,
        Arc::clone(&state.audit_reader),
        state.options.data_dir.clone(),
    );
    let watched = Arc::clone(&connections);
    let incoming = tokio_stream::StreamExt::map(
        TcpIncoming::from(listener).with_nodelay(Some(true)),
        move |accepted| accepted.map(|stream| watched.watch(stream)),
    );
    let router = builder
        .layer(WatchLayer(Arc::clone(&connections)))
        // HTTP/JSON calls become gRPC calls here and go down the same stack below (size
        // refusals, the guard, the services), so they are authenticated, authorized, admitted
        // and audited by the same code.
        .layer(GatewayLayer::new(max, limits.body_timeout)?)
        .layer(tower::util::MapResponseLayer::new(
            message_too_large_is_exhaustion,
        ))
        .layer(guard)
        // The extra routes go in first because tonic's builder only starts a router from a
        // `Routes`; ours are then added onto it by service name (names must not clash).
        .add_routes(extra(&state))
        .add_service(health_service)
        .add_service(reflection)
        .add_service(reflection_v1alpha)
        .add_service(
            KeyServiceServer::new(KeyServiceImpl::new(Arc::clone(&state)))
                .max_decoding_message_size(max)
                .max_encoding_message_size(max),
        )
        .add_service(
            TenantServiceServer::new(TenantServiceImpl::new(Arc::clone(&state)))
                .max_decoding_message_size(max)
                .max_encoding_message_size(max),
        )
        .add_service(
            AuditServiceServer::new(AuditServiceImpl::new(Arc::clone(&state)))
                .max_decoding_message_size(max)
                .max_encoding_message_size(max),
        );
    let served = match tls {
        Some(config) => {
            let incoming = super::tls::TlsIncoming::new(incoming, config, limits.handshake_timeout);
            router
                .serve_with_incoming_shutdown(incoming, shutdown)
                .await
        }
        None => {
            router
                .serve_with_incoming_shutdown(incoming, shutdown)
                .await
        }
    };
    reaper.abort();
    flusher.abort();
    sweeper.abort();
    usage_flusher.abort();
    if let (Some(task), Some(webhook)) = (webhook, state.webhook.as_ref()) {
        webhook.stop(task).await;
    }
    // What was counted since the last flush is written now, so a clean stop loses no usage.
    let usage = Arc::clone(&state.usage);
    if let Err(e) = super::blocking(move || usage.flush()).await {
        tracing::error!(error = %e, "could not write the last usage counts");
    }
    if let Err(e) = refusals.drain().await {
        tracing::error!(error = %e, "could not audit the last aggregated refusals");
    }
    follow_audit.abort();
    // The streams' cursors are persisted after every acknowledged batch: stopping loses
    // nothing; a delivery in progress is waited for (bounded by the sinks' timeouts).
    let _ = tokio::task::spawn_blocking(move || streams.stop()).await;
    served.map_err(|e| Error::Internal(format!("server: {e}")))
}

/// What a scrape of `/metrics` adds to the process registry for this server: the nonce-budget
/// gauges of its key cache, then its usage per tenant and caller.
pub fn metrics_extra(state: &AppState) -> crate::metrics::Extra {
    let budget = super::budget_metrics::nonce_budget(Arc::clone(&state.keys));
    let usage = Arc::clone(&state.usage);
    Arc::new(move || {
        let mut families = budget();
        families.extend(usage.families());
        families
    })
}

/// The names the health service answers for: the whole server (`""`, as the gRPC health
/// protocol defines it) and each of our services. Reflection and health themselves are not
/// listed: they serve whatever the audit store does.
pub const HEALTH_SERVICES: [&str; 4] = [
    "",
    <KeyServiceServer<KeyServiceImpl> as NamedService>::NAME,
    <TenantServiceServer<TenantServiceImpl> as NamedService>::NAME,
    <AuditServiceServer<AuditServiceImpl> as NamedService>::NAME,
];

/// The service names reflection lists beside ours (health and both reflection versions).
const INFRASTRUCTURE_SERVICES: [&str; 3] = [
    "grpc.health.v1.Health",
    "grpc.reflection.v1.ServerReflection",
    "grpc.reflection.v1alpha.ServerReflection",
];

/// A reflection builder naming exactly the services this server serves: every service of our
/// descriptor set plus [`INFRASTRUCTURE_SERVICES`] (by default each reflection version would
/// list only itself, not the other one nor health).
fn reflection_builder() -> tonic_reflection::server::Builder<'static> {
    let ours = HEALTH_SERVICES.iter().filter(|name| !name.is_empty());
    ours.chain(INFRASTRUCTURE_SERVICES.iter()).fold(
        tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
            // Each version's builder adds its own descriptors; both are needed for both to
            // describe every listed service (a file registered twice is kept once).
            .register_encoded_file_descriptor_set(tonic_reflection::pb::v1::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(
                tonic_reflection::pb::v1alpha::FILE_DESCRIPTOR_SET,
            ),
        |builder, name| builder.with_service_name(*name),
    )
}

/// The health statuses of [`HEALTH_SERVICES`], which move together: every call of every
/// service needs its audit record written, so they are ready or not as one.
#[derive(Clone)]
struct Readiness {
    reporter: tonic_health::server::HealthReporter,
    /// True once shutdown began. Held across each change of status, so that an audit store
    /// recovering during shutdown cannot turn SERVING back after shutdown's NOT_SERVING.
    stopping: Arc<tokio::sync::Mutex<bool>>,
}

impl Readiness {
    fn new(reporter: tonic_health::server::HealthReporter) -> Self {
        Self {
            reporter,
            stopping: Arc::new(tokio::sync::Mutex::new(false)),
        }
    }

    async fn set(&self, status: ServingStatus) {
        let stopping = self.stopping.lock().await;
        if !*stopping {
            self.set_all(status).await;
        }
    }

    async fn set_all(&self, status: ServingStatus) {
        for name in HEALTH_SERVICES {
            self.reporter.set_service_status(name, status).await;
        }
    }

    /// Follows the audit writer: NOT_SERVING from a failed commit (calls then fail closed
    /// with UNAVAILABLE) until a commit succeeds again.
    async fn follow_audit(self, mut writable: tokio::sync::watch::Receiver<bool>) {
        loop {
            let ok = *writable.borrow_and_update();
            if ok {
                tracing::info!("audit store writable: health SERVING");
                self.set(ServingStatus::Serving).await;
            } else {
                tracing::warn!("audit store cannot write: health NOT_SERVING");
                self.set(ServingStatus::NotServing).await;
            }
            if writable.changed().await.is_err() {
                return;
            }
        }
    }

    /// NOT_SERVING for good, then the statuses are removed so that open Watch streams end
    /// (after delivering NOT_SERVING) instead of keeping their connections open.
    async fn shut_down(self) {
        let mut stopping = self.stopping.lock().await;
        *stopping = true;
        self.set_all(ServingStatus::NotServing).await;
        let mut reporter = self.reporter.clone();
        for name in HEALTH_SERVICES {
            reporter.clear_service_status(name).await;
        }
    }
}

/// The HTTP/2 `SETTINGS_MAX_CONCURRENT_STREAMS` the server advertises: streams one
/// connection may have open at once. Clients multiplex more calls by waiting or by opening
/// more connections; gRPC clients do both by themselves.
pub const MAX_STREAMS_PER_CONNECTION: u32 = 128;

/// tonic reports a request over the message size limit as OUT_OF_RANGE; the gRPC status
/// code guide (and our API contract) say RESOURCE_EXHAUSTED. The handlers never return
/// OUT_OF_RANGE themselves, so every such status is a size refusal and is renamed here.
///
/// tonic also answers INTERNAL for request bodies that are not a whole gRPC message (issue
/// 13): an empty body, one that ends inside the 5-byte prefix or before the length its prefix
/// announces, and a compression flag other than 0 or 1. Those are the caller's fault, so they
/// become INVALID_ARGUMENT here, recognised by tonic's exact messages (they come from its
/// request decoder before any handler runs, in a trailers-only response). A compressed flag
/// without a `grpc-encoding` stays INTERNAL: the gRPC compression spec says it MUST.
fn message_too_large_is_exhaustion<B>(
    mut response: tonic::codegen::http::Response<B>,
) -> tonic::codegen::http::Response<B> {
    let out_of_range = (tonic::Code::OutOfRange as i32).to_string();
    let status = response.headers().get("grpc-status");
    if status.is_some_and(|v| v.as_bytes() == out_of_range.as_bytes()) {
        let exhausted = (tonic::Code::ResourceExhausted as i32).to_string();
        if let Ok(value) = exhausted.parse() {
            response.headers_mut().insert("grpc-status", value);
        }
    } else if status.is_some_and(|v| v.as_bytes() == b"13")
        && tonic::Status::from_header_map(response.headers())
            .is_some_and(|s| is_malformed_request_body(s.message()))
    {
        let headers = response.headers_mut();
        headers.insert(
            "grpc-status",
            tonic::codegen::http::HeaderValue::from_static("3"),
        );
        headers.insert(
            "grpc-message",
            tonic::codegen::http::HeaderValue::from_static(
                "the request body is not one complete gRPC message (empty, truncated, a wrong \
                 length prefix or an invalid compression flag)",
            ),
        );
    }
    response
}

/// Whether `message` is one of tonic's request-framing errors (tonic 0.14 `codec/decode.rs`
/// and `server/grpc.rs`).
fn is_malformed_request_body(message: &str) -> bool {
    message == "Missing request message."
        || message == "Unexpected EOF decoding stream."
        || message.starts_with("protocol error: received message with invalid compression flag")
}

/// Destroys tenants whose deletion window has passed, so shredding happens on time even when
/// no `rotate --due` cron job runs.
async fn reap_due_deletions(state: Arc<AppState>) {
    let mut tick = tokio::time::interval(REAPER_INTERVAL);
    loop {
        tick.tick().await;
        let keys = Arc::clone(&state.keys);
        let now = state.options.clock.now_unix();
        let due = super::blocking(move || {
            let store = keys.store();
            let due = store.tenants_due(now, crate::store::ROTATION_BUDGET_MARGIN)?;
            let horizon = now.saturating_add(crate::metrics::DELETION_CLOSING_HORIZON_SECONDS);
            let closing = store
                .tenants_due(horizon, crate::store::ROTATION_BUDGET_MARGIN)?
                .destroy;
            let closing = closing.iter().filter(|t| !due.destroy.contains(t)).count();
            crate::metrics::global().lifecycle(due.rotate.len() as u64, closing as u64);
            Ok(due.destroy)
        })
        .await;
        match due {
            Ok(tenants) => {
                for tenant in tenants {
                    destroy_audited(&state, tenant).await;
                }
            }
            Err(e) => tracing::warn!(error = %e, "could not look for due deletions"),
        }
    }
}

async fn destroy_audited(state: &Arc<AppState>, tenant: TenantId) {
    let keys = Arc::clone(&state.keys);
    let id = tenant.clone();
    let result = super::blocking(move || keys.destroy_tenant(&id)).await;
    let record = super::call::system_record(
        "server:reaper",
        &tenant,
        crate::audit::operation::Task::DestroyTenant,
        Vec::new(),
        match &result {
            Ok(_) => crate::audit::Outcome::Ok,
            Err(e) => super::status::outcome(e),
        },
        "deletion window passed".into(),
    );
    if let Err(e) = state.audit.append(record).await {
        tracing::error!(error = %e, tenant = %tenant, "could not audit a tenant destruction");
    }
    match result {
        Ok(_) => tracing::info!(tenant = %tenant, "tenant destroyed: deletion window passed"),
        Err(e) => tracing::warn!(tenant = %tenant, error = %e, "could not destroy tenant"),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;
    use prost::Message;

    /// Other languages' generators read these options; each file of our API carries them, with
    /// the import path README documents, so stubs generate without edits.
    #[test]
    fn every_proto_names_its_package_for_other_languages() {
        let set = prost_types::FileDescriptorSet::decode(FILE_DESCRIPTOR_SET).unwrap();
        let ours: Vec<_> = set
            .file
            .iter()
            .filter(|f| f.package() == "tenantkms.v1")
            .collect();
        assert_eq!(ours.len(), 3, "keys, tenants, audit");
        for file in ours {
            let options = file.options.as_ref().unwrap();
            assert_eq!(
                options.go_package(),
                "github.com/tenant-kms/tenant-kms/gen/go/tenantkms/v1;tenantkmsv1",
                "{}",
                file.name()
            );
            assert_eq!(options.java_package(), "io.tenantkms.v1", "{}", file.name());
            assert!(options.java_multiple_files(), "{}", file.name());
            assert_eq!(
                options.csharp_namespace(),
                "TenantKms.V1",
                "{}",
                file.name()
            );
            assert_eq!(options.php_namespace(), "TenantKms\\V1", "{}", file.name());
            assert_eq!(options.ruby_package(), "TenantKms::V1", "{}", file.name());
        }
    }
}
