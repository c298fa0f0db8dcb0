//! The scenarios: what one call of each sends, the echo call of the same shape, and the
//! drivers that send them.

use std::collections::HashMap;
use std::sync::Arc;

use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use serde::Serialize;
use tonic::metadata::{Ascii, MetadataValue};
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;

use super::load::Driver;
use crate::pb as echo_pb;
use crate::pb::bench_service_client::BenchServiceClient;
use tenant_kms::crypto::format::MIN_LEN;
use tenant_kms::error::{Error, Result};
use tenant_kms::pb;
use tenant_kms::pb::key_service_client::KeyServiceClient;

/// One kind of load.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(tag = "kind", content = "bytes_or_items", rename_all = "kebab-case")]
pub enum Scenario {
    /// Unary Encrypt of a value of this many bytes.
    Encrypt(usize),
    /// Unary Decrypt of a value of this many bytes.
    Decrypt(usize),
    /// EncryptBatch of this many 64-byte values.
    Batch(usize),
    /// GenerateDataKey.
    GenerateDataKey,
    /// Rewrap of a 64-byte value.
    Rewrap,
    /// The churn soak (see `churn`).
    Churn,
    /// Searchable columns: ComputeBlindIndex of this many 32-byte values (index
    /// [`BLIND_INDEX`], declared for every tenant before the run).
    BlindIndex(usize),
    /// Searchable columns: deterministic (AES-256-SIV) EncryptBatch of this many 64-byte values.
    DeterministicBatch(usize),
}

/// The blind index the `blind-index-N` scenario computes: 32 bits, `exact`.
pub const BLIND_INDEX: &str = "bench-email";
/// Bytes of each value a `blind-index-N` call carries (an email's size).
pub const BLIND_INDEX_VALUE_BYTES: usize = 32;

/// Bytes of each value batches carry.
pub const BATCH_FIELD_BYTES: usize = 64;
/// Bytes of the value Rewrap carries.
pub const REWRAP_FIELD_BYTES: usize = 64;
/// The context every bench call names.
pub const CONTEXT: &str = "bench.customers.email";
/// The caller AAD every bench call sends (a row id's size).
pub const AAD: &[u8] = b"row-0000001234";

fn parse_size(text: &str) -> Option<usize> {
    let (digits, scale) = match text.strip_suffix(['k', 'K']) {
        Some(d) => (d, 1024),
        None => (text, 1),
    };
    digits.parse::<usize>().ok().map(|n| n * scale)
}

impl Scenario {
    /// Parses a scenario name: `encrypt-64`, `encrypt-4k`, `decrypt-64`, `decrypt-4k`,
    /// `batch-100`, `batch-1000`, `generate-data-key`, `rewrap`, `churn` (any size works:
    /// `encrypt-1k`, `batch-10`).
    pub fn parse(name: &str) -> Result<Self> {
        let name = name.trim();
        let bad = || Error::InvalidArgument(format!("unknown scenario '{name}'"));
        if let Some(size) = name.strip_prefix("encrypt-") {
            return parse_size(size).map(Scenario::Encrypt).ok_or_else(bad);
        }
        if let Some(size) = name.strip_prefix("decrypt-") {
            return parse_size(size).map(Scenario::Decrypt).ok_or_else(bad);
        }
        if let Some(items) = name.strip_prefix("blind-index-") {
            return parse_size(items)
                .filter(|n| *n > 0)
                .map(Scenario::BlindIndex)
                .ok_or_else(bad);
        }
        if let Some(items) = name.strip_prefix("det-batch-") {
            return parse_size(items)
                .filter(|n| *n > 0)
                .map(Scenario::DeterministicBatch)
                .ok_or_else(bad);
        }
        if let Some(items) = name.strip_prefix("batch-") {
            return parse_size(items)
                .filter(|n| *n > 0)
                .map(Scenario::Batch)
                .ok_or_else(bad);
        }
        match name {
            "generate-data-key" => Ok(Scenario::GenerateDataKey),
            "rewrap" => Ok(Scenario::Rewrap),
            "churn" => Ok(Scenario::Churn),
            _ => Err(bad()),
        }
    }

    /// The scenario's name as `parse` reads it.
    pub fn name(&self) -> String {
        let size = |n: usize| {
            if n >= 1024 && n.is_multiple_of(1024) {
                format!("{}k", n / 1024)
            } else {
                n.to_string()
            }
        };
        match self {
            Scenario::Encrypt(n) => format!("encrypt-{}", size(*n)),
            Scenario::Decrypt(n) => format!("decrypt-{}", size(*n)),
            Scenario::Batch(n) => format!("batch-{n}"),
            Scenario::GenerateDataKey => "generate-data-key".into(),
            Scenario::Rewrap => "rewrap".into(),
            Scenario::Churn => "churn".into(),
            Scenario::BlindIndex(n) => format!("blind-index-{n}"),
            Scenario::DeterministicBatch(n) => format!("det-batch-{n}"),
        }
    }

    /// Items per call.
    pub fn items(&self) -> u64 {
        match self {
            Scenario::Batch(n) | Scenario::BlindIndex(n) | Scenario::DeterministicBatch(n) => {
                *n as u64
            }
            _ => 1,
        }
    }

    /// Bytes of the value each item seals or opens (the raw-seal baseline's size).
    pub fn field_bytes(&self) -> usize {
        match self {
            Scenario::Encrypt(n) | Scenario::Decrypt(n) => *n,
            Scenario::Batch(_) | Scenario::DeterministicBatch(_) => BATCH_FIELD_BYTES,
            Scenario::BlindIndex(_) => BLIND_INDEX_VALUE_BYTES,
            Scenario::GenerateDataKey => tenant_kms::crypto::secret::KEY_LEN,
            Scenario::Rewrap | Scenario::Churn => REWRAP_FIELD_BYTES,
        }
    }

    /// The plaintext size whose ciphertexts must be prepared before the run, if any.
    pub fn needs_ciphertexts(&self) -> Option<usize> {
        match self {
            Scenario::Decrypt(n) => Some(*n),
            Scenario::Rewrap => Some(REWRAP_FIELD_BYTES),
            _ => None,
        }
    }
}

/// Adds a fixed `authorization` header (prepared once) to every request.
#[derive(Clone)]
pub struct Bearer(pub MetadataValue<Ascii>);

impl tonic::service::Interceptor for Bearer {
    fn call(
        &mut self,
        mut request: tonic::Request<()>,
    ) -> std::result::Result<tonic::Request<()>, tonic::Status> {
        request
            .metadata_mut()
            .insert("authorization", self.0.clone());
        Ok(request)
    }
}

impl Bearer {
    /// The header for a token.
    pub fn new(token: &str) -> Result<Self> {
        let mut value: MetadataValue<Ascii> = format!("Bearer {}", token.trim())
            .parse()
            .map_err(|_| Error::InvalidArgument("the token is not a valid header value".into()))?;
        value.set_sensitive(true);
        Ok(Self(value))
    }
}

/// An authenticated KeyService client.
pub type KeyClient = KeyServiceClient<InterceptedService<Channel, Bearer>>;
/// An echo client (it sends the same header, so requests weigh the same).
pub type EchoClient = BenchServiceClient<InterceptedService<Channel, Bearer>>;

/// Builds clients over a channel, with message limits large enough for big batches.
pub fn key_client(channel: Channel, bearer: Bearer) -> KeyClient {
    KeyServiceClient::with_interceptor(channel, bearer)
        .max_decoding_message_size(64 << 20)
        .max_encoding_message_size(64 << 20)
}

/// The echo client over a channel.
pub fn echo_client(channel: Channel, bearer: Bearer) -> EchoClient {
    BenchServiceClient::with_interceptor(channel, bearer)
        .max_decoding_message_size(64 << 20)
        .max_encoding_message_size(64 << 20)
}

/// What every call of a run draws from: the tenants (uniformly at random) and ciphertexts
/// prepared for Decrypt and Rewrap.
pub struct Workload {
    /// Tenant ids.
    pub tenants: Vec<String>,
    /// Prepared ciphertexts by plaintext size: (tenant index, ciphertext).
    pub ciphertexts: HashMap<usize, Vec<(usize, Vec<u8>)>>,
}

/// How many tenants get a prepared ciphertext (Decrypt and Rewrap draw from these).
pub const PREPARED_TENANTS: usize = 1000;

impl Workload {
    /// Encrypts one value of `size` bytes for each of the first [`PREPARED_TENANTS`] tenants.
    pub async fn prepare(&mut self, client: &mut KeyClient, size: usize) -> Result<()> {
        if self.ciphertexts.contains_key(&size) {
            return Ok(());
        }
        let mut prepared = Vec::new();
        for (index, tenant) in self.tenants.iter().take(PREPARED_TENANTS).enumerate() {
            let response = client
                .encrypt(pb::EncryptRequest {
                    tenant_id: tenant.clone(),
                    context: CONTEXT.into(),
                    plaintext: vec![0x5a; size],
                    aad: AAD.to_vec(),
                    ..Default::default()
                })
                .await
                .map_err(|s| {
                    Error::Unavailable(format!("preparing ciphertexts: {}", s.message()))
                })?;
            prepared.push((index, response.into_inner().ciphertext));
        }
        self.ciphertexts.insert(size, prepared);
        Ok(())
    }
}

/// Sends one scenario's calls, either the real RPC or its echo of the same shape.
pub struct RpcDriver {
    scenario: Scenario,
    keys: KeyClient,
    echo: EchoClient,
    echo_mode: bool,
    work: Arc<Workload>,
    rng: SmallRng,
    plaintext: Vec<u8>,
}

impl RpcDriver {
    /// A driver for one slot.
    pub fn new(
        scenario: Scenario,
        keys: KeyClient,
        echo: EchoClient,
        echo_mode: bool,
        work: Arc<Workload>,
        seed: u64,
    ) -> Self {
        Self {
            plaintext: vec![0xa5; scenario.field_bytes()],
            scenario,
            keys,
            echo,
            echo_mode,
            work,
            rng: SmallRng::seed_from_u64(seed),
        }
    }

    fn tenant(&mut self) -> String {
        let index = self.rng.random_range(0..self.work.tenants.len().max(1));
        self.work.tenants.get(index).cloned().unwrap_or_default()
    }

    fn prepared(&mut self, size: usize) -> std::result::Result<(String, Vec<u8>), String> {
        let list = self
            .work
            .ciphertexts
            .get(&size)
            .ok_or("no prepared ciphertexts")?;
        let (index, ciphertext) = &list[self.rng.random_range(0..list.len().max(1))];
        Ok((
            self.work.tenants.get(*index).cloned().unwrap_or_default(),
            ciphertext.clone(),
        ))
    }

    async fn real(&mut self) -> std::result::Result<u64, String> {
        let status = |s: tonic::Status| format!("{:?}: {}", s.code(), s.message());
        match self.scenario {
            Scenario::Encrypt(_) => {
                let request = pb::EncryptRequest {
                    tenant_id: self.tenant(),
                    context: CONTEXT.into(),
                    plaintext: self.plaintext.clone(),
                    aad: AAD.to_vec(),
                    ..Default::default()
                };
                self.keys.encrypt(request).await.map_err(status)?;
                Ok(1)
            }
            Scenario::Decrypt(size) => {
                let (tenant_id, ciphertext) = self.prepared(size)?;
                let request = pb::DecryptRequest {
                    tenant_id,
                    context: CONTEXT.into(),
                    ciphertext,
                    aad: AAD.to_vec(),
                };
                self.keys.decrypt(request).await.map_err(status)?;
                Ok(1)
            }
            Scenario::Rewrap | Scenario::Churn => {
                let (tenant_id, ciphertext) = self.prepared(REWRAP_FIELD_BYTES)?;
                let request = pb::RewrapRequest {
                    tenant_id,
                    context: CONTEXT.into(),
                    ciphertext,
                    aad: AAD.to_vec(),
                    ..Default::default()
                };
                self.keys.rewrap(request).await.map_err(status)?;
                Ok(1)
            }
            Scenario::Batch(n) => {
                let items = (0..n)
                    .map(|_| pb::EncryptBatchItem {
                        context: CONTEXT.into(),
                        plaintext: self.plaintext.clone(),
                        aad: AAD.to_vec(),
                        ..Default::default()
                    })
                    .collect();
                let request = pb::EncryptBatchRequest {
                    tenant_id: self.tenant(),
                    items,
                    ..Default::default()
                };
                let response = self.keys.encrypt_batch(request).await.map_err(status)?;
                let results = response.into_inner().results;
                let ok = results
                    .iter()
                    .filter(|r| {
                        matches!(r.result, Some(pb::encrypt_batch_result::Result::Output(_)))
                    })
                    .count();
                if ok != n {
                    return Err(format!("{} of {n} batch items failed", n - ok));
                }
                Ok(n as u64)
            }
            Scenario::DeterministicBatch(n) => {
                let items = (0..n)
                    .map(|_| pb::EncryptBatchItem {
                        context: CONTEXT.into(),
                        plaintext: self.plaintext.clone(),
                        aad: AAD.to_vec(),
                        ..Default::default()
                    })
                    .collect();
                let request = pb::EncryptBatchRequest {
                    tenant_id: self.tenant(),
                    items,
                    deterministic: true,
                    ..Default::default()
                };
                let response = self.keys.encrypt_batch(request).await.map_err(status)?;
                let ok = response
                    .into_inner()
                    .results
                    .iter()
                    .filter(|r| {
                        matches!(r.result, Some(pb::encrypt_batch_result::Result::Output(_)))
                    })
                    .count();
                if ok != n {
                    return Err(format!("{} of {n} batch items failed", n - ok));
                }
                Ok(n as u64)
            }
            Scenario::BlindIndex(n) => {
                let request = pb::ComputeBlindIndexRequest {
                    tenant_id: self.tenant(),
                    index_name: BLIND_INDEX.into(),
                    values: (0..n).map(|_| self.plaintext.clone()).collect(),
                    all_enabled_versions: false,
                };
                let response = self
                    .keys
                    .compute_blind_index(request)
                    .await
                    .map_err(status)?;
                let ok = response
                    .into_inner()
                    .results
                    .iter()
                    .filter(|r| {
                        matches!(
                            r.result,
                            Some(pb::compute_blind_index_result::Result::Output(_))
                        )
                    })
                    .count();
                if ok != n {
                    return Err(format!("{} of {n} values failed", n - ok));
                }
                Ok(n as u64)
            }
            Scenario::GenerateDataKey => {
                let request = pb::GenerateDataKeyRequest {
                    tenant_id: self.tenant(),
                    context: CONTEXT.into(),
                };
                self.keys.generate_data_key(request).await.map_err(status)?;
                Ok(1)
            }
        }
    }

    async fn echo(&mut self) -> std::result::Result<u64, String> {
        // Same fields, same sizes; the response carries payloads of the real answer's size.
        let overhead = MIN_LEN;
        let request = match self.scenario {
            Scenario::Encrypt(n) => echo_pb::EchoRequest {
                tenant_id: self.tenant(),
                context: CONTEXT.into(),
                plaintext: self.plaintext.clone(),
                aad: AAD.to_vec(),
                items: Vec::new(),
                response_bytes: (n + overhead) as u32,
            },
            Scenario::Decrypt(n) => {
                let (tenant_id, ciphertext) = self.prepared(n)?;
                echo_pb::EchoRequest {
                    tenant_id,
                    context: CONTEXT.into(),
                    plaintext: ciphertext,
                    aad: AAD.to_vec(),
                    items: Vec::new(),
                    response_bytes: n as u32,
                }
            }
            Scenario::Rewrap | Scenario::Churn => {
                let (tenant_id, ciphertext) = self.prepared(REWRAP_FIELD_BYTES)?;
                echo_pb::EchoRequest {
                    tenant_id,
                    context: CONTEXT.into(),
                    plaintext: ciphertext,
                    aad: AAD.to_vec(),
                    items: Vec::new(),
                    response_bytes: (REWRAP_FIELD_BYTES + overhead) as u32,
                }
            }
            // Same shape: n values in, n answers of an index's size (4 bytes, with its name
            // and version) out.
            Scenario::BlindIndex(n) => echo_pb::EchoRequest {
                tenant_id: self.tenant(),
                context: BLIND_INDEX.into(),
                plaintext: Vec::new(),
                aad: Vec::new(),
                items: (0..n)
                    .map(|_| echo_pb::EchoItem {
                        context: String::new(),
                        plaintext: self.plaintext.clone(),
                        aad: Vec::new(),
                    })
                    .collect(),
                response_bytes: (4 + BLIND_INDEX.len() + 4) as u32,
            },
            Scenario::Batch(n) | Scenario::DeterministicBatch(n) => echo_pb::EchoRequest {
                tenant_id: self.tenant(),
                context: String::new(),
                plaintext: Vec::new(),
                aad: Vec::new(),
                items: (0..n)
                    .map(|_| echo_pb::EchoItem {
                        context: CONTEXT.into(),
                        plaintext: self.plaintext.clone(),
                        aad: AAD.to_vec(),
                    })
                    .collect(),
                response_bytes: (BATCH_FIELD_BYTES + overhead) as u32,
            },
            Scenario::GenerateDataKey => echo_pb::EchoRequest {
                tenant_id: self.tenant(),
                context: CONTEXT.into(),
                plaintext: Vec::new(),
                aad: Vec::new(),
                items: Vec::new(),
                // The plaintext key and the wrapped key together.
                response_bytes: (2 * tenant_kms::crypto::secret::KEY_LEN + overhead) as u32,
            },
        };
        let items = self.scenario.items();
        self.echo
            .echo(request)
            .await
            .map_err(|s| format!("{:?}: {}", s.code(), s.message()))?;
        Ok(items)
    }
}

impl Driver for RpcDriver {
    async fn call(&mut self) -> std::result::Result<u64, String> {
        if self.echo_mode {
            self.echo().await
        } else {
            self.real().await
        }
    }
}
