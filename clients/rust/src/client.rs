//! [`Client`]: one typed method per RPC of the three services, each under the retry policy.

use tonic::metadata::{Ascii, MetadataValue};
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;

use crate::error::{Error, Result};
use crate::pb;
use crate::pb::audit_service_client::AuditServiceClient;
use crate::pb::key_service_client::KeyServiceClient;
use crate::pb::tenant_service_client::TenantServiceClient;
use crate::retry::{Idempotency, RetryPolicy};

/// Adds `authorization: Bearer <token>` to every request (nothing when the caller is named
/// by its client certificate alone). The value is marked sensitive, so tonic never logs it.
/// The one place a token becomes a header: the CLI and its drill use it for their own stubs.
#[derive(Clone, Default)]
pub struct Bearer(pub(crate) Option<MetadataValue<Ascii>>);

impl Bearer {
    /// The header for `token`, surrounding white space ignored (token files end with a
    /// newline), marked sensitive. A token that cannot be header text is refused (the error
    /// does not repeat it).
    pub fn new(token: &str) -> Result<Self> {
        let mut value: MetadataValue<Ascii> = format!("Bearer {}", token.trim())
            .parse()
            .map_err(|_| Error::Config("the token is not printable ASCII".into()))?;
        value.set_sensitive(true);
        Ok(Self(Some(value)))
    }

    /// No header: the caller is named by its client certificate.
    pub fn none() -> Self {
        Self(None)
    }

    /// Whether a token is set.
    pub fn is_set(&self) -> bool {
        self.0.is_some()
    }
}

impl tonic::service::Interceptor for Bearer {
    fn call(
        &mut self,
        mut request: tonic::Request<()>,
    ) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(value) = &self.0 {
            request
                .metadata_mut()
                .insert("authorization", value.clone());
        }
        Ok(request)
    }
}

/// A channel that authenticates every call.
pub type AuthedChannel = InterceptedService<Channel, Bearer>;

/// Largest message the client sends or accepts (the server's own default cap is lower; a
/// batch answer may approach it).
const MAX_MESSAGE_BYTES: usize = 64 << 20;

/// A connection to one tenant-kms server. Cheap to clone (clones share the connection);
/// safe to use from many tasks at once.
#[derive(Clone)]
pub struct Client {
    keys: KeyServiceClient<AuthedChannel>,
    tenants: TenantServiceClient<AuthedChannel>,
    audit: AuditServiceClient<AuthedChannel>,
    retry: RetryPolicy,
}

/// One method per RPC: `$name(request) -> response`, run under the retry policy with the
/// RPC's idempotency (module `retry` says which RPCs are which, and why).
macro_rules! rpcs {
    ($($service:ident . $name:ident($request:ty) -> $response:ty, $idempotency:ident;)*) => {
        $(
            #[doc = concat!("Calls `", stringify!($name), "` (see the proto for its status codes); ")]
            #[doc = concat!("retried as [`Idempotency::", stringify!($idempotency), "`].")]
            pub async fn $name(&self, request: $request) -> Result<$response> {
                let stub = self.$service.clone();
                let answer = self
                    .retry
                    .run(Idempotency::$idempotency, || {
                        let mut stub = stub.clone();
                        let request = request.clone();
                        async move { stub.$name(request).await }
                    })
                    .await?;
                Ok(answer.into_inner())
            }
        )*
    };
}

impl Client {
    pub(crate) fn new(channel: Channel, bearer: Bearer, retry: RetryPolicy) -> Self {
        Self {
            keys: KeyServiceClient::with_interceptor(channel.clone(), bearer.clone())
                .max_decoding_message_size(MAX_MESSAGE_BYTES)
                .max_encoding_message_size(MAX_MESSAGE_BYTES),
            tenants: TenantServiceClient::with_interceptor(channel.clone(), bearer.clone()),
            audit: AuditServiceClient::with_interceptor(channel, bearer)
                .max_decoding_message_size(MAX_MESSAGE_BYTES),
            retry,
        }
    }

    /// The generated KeyService stub, for what the typed methods do not cover (per-call
    /// metadata such as `traceparent`); calls through it are not retried.
    pub fn key_service(&self) -> KeyServiceClient<AuthedChannel> {
        self.keys.clone()
    }

    /// The generated TenantService stub (not retried).
    pub fn tenant_service(&self) -> TenantServiceClient<AuthedChannel> {
        self.tenants.clone()
    }

    /// The generated AuditService stub (not retried).
    pub fn audit_service(&self) -> AuditServiceClient<AuthedChannel> {
        self.audit.clone()
    }

    /// The retry policy the typed methods run under.
    pub fn retry_policy(&self) -> &RetryPolicy {
        &self.retry
    }

    rpcs! {
        keys.encrypt(pb::EncryptRequest) -> pb::EncryptResponse, Idempotent;
        keys.decrypt(pb::DecryptRequest) -> pb::DecryptResponse, Idempotent;
        keys.encrypt_batch(pb::EncryptBatchRequest) -> pb::EncryptBatchResponse, Idempotent;
        keys.decrypt_batch(pb::DecryptBatchRequest) -> pb::DecryptBatchResponse, Idempotent;
        keys.generate_data_key(pb::GenerateDataKeyRequest) -> pb::GenerateDataKeyResponse, Idempotent;
        keys.decrypt_data_key(pb::DecryptDataKeyRequest) -> pb::DecryptDataKeyResponse, Idempotent;
        keys.rewrap(pb::RewrapRequest) -> pb::RewrapResponse, Idempotent;
        keys.rewrap_batch(pb::RewrapBatchRequest) -> pb::RewrapBatchResponse, Idempotent;
        keys.generate_data_key_without_plaintext(pb::GenerateDataKeyWithoutPlaintextRequest)
            -> pb::GenerateDataKeyWithoutPlaintextResponse, Idempotent;
        keys.compute_blind_index(pb::ComputeBlindIndexRequest) -> pb::ComputeBlindIndexResponse, Idempotent;

        tenants.create_tenant(pb::CreateTenantRequest) -> pb::Tenant, NotIdempotent;
        tenants.get_tenant(pb::GetTenantRequest) -> pb::Tenant, Idempotent;
        tenants.list_tenants(pb::ListTenantsRequest) -> pb::ListTenantsResponse, Idempotent;
        tenants.rotate_tenant_key(pb::RotateTenantKeyRequest) -> pb::Tenant, NotIdempotent;
        tenants.list_key_versions(pb::ListKeyVersionsRequest) -> pb::ListKeyVersionsResponse, Idempotent;
        tenants.disable_key_version(pb::DisableKeyVersionRequest) -> pb::KeyVersion, NotIdempotent;
        tenants.enable_key_version(pb::EnableKeyVersionRequest) -> pb::KeyVersion, NotIdempotent;
        tenants.destroy_key_version(pb::DestroyKeyVersionRequest) -> pb::KeyVersion, NotIdempotent;
        tenants.set_rotation_policy(pb::SetRotationPolicyRequest) -> pb::Tenant, Idempotent;
        tenants.suspend_tenant(pb::SuspendTenantRequest) -> pb::Tenant, NotIdempotent;
        tenants.resume_tenant(pb::ResumeTenantRequest) -> pb::Tenant, NotIdempotent;
        tenants.schedule_tenant_deletion(pb::ScheduleTenantDeletionRequest) -> pb::Tenant, NotIdempotent;
        tenants.cancel_tenant_deletion(pb::CancelTenantDeletionRequest) -> pb::Tenant, NotIdempotent;
        tenants.declare_blind_index(pb::DeclareBlindIndexRequest) -> pb::BlindIndexDefinition, Idempotent;
        tenants.list_blind_indexes(pb::ListBlindIndexesRequest) -> pb::ListBlindIndexesResponse, Idempotent;

        audit.list_audit_events(pb::ListAuditEventsRequest) -> pb::ListAuditEventsResponse, Idempotent;
        audit.verify_audit_chain(pb::VerifyAuditChainRequest) -> pb::VerifyAuditChainResponse, Idempotent;
        audit.get_usage(pb::GetUsageRequest) -> pb::GetUsageResponse, Idempotent;
    }
}
