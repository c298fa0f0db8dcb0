//! `tenantkms.v1.KeyService`: the data plane.
//!
//! Each handler: start a [`Call`], authenticate and authorize, parse input into domain types,
//! take the tenant's keys from the cache (loading them on the blocking pool on a miss), seal or
//! open, and finish the call (audit first, answer second). Batches handle each item on its own,
//! and run their crypto on the blocking pool when they are large enough to stall the async
//! threads.

use std::sync::Arc;

use tonic::{Request, Response, Status};
use tracing::Instrument;

use super::call::{self, Call};
use super::state::AppState;
use super::{blocking, status};
use crate::auth::Operation;
use crate::crypto::envelope::{self, Purpose};
use crate::crypto::format;
use crate::crypto::secret::{SecretBytes, SecretKey};
use crate::domain::{Context, TenantId};
use crate::error::{Error, Result};
use crate::keys::EncryptGrant;
use crate::keys::cache::TenantEntry;
use crate::pb;
use crate::pb::key_service_server::KeyService;

/// Batches with more items than this run their crypto on the blocking pool.
const INLINE_BATCH_ITEMS: usize = 32;

/// The KeyService implementation.
pub struct KeyServiceImpl {
    state: Arc<AppState>,
}

impl KeyServiceImpl {
    /// A service over the shared state.
    pub fn new(state: Arc<AppState>) -> Self {
        Self { state }
    }

    /// The tenant's key snapshot; it must be active to serve crypto.
    async fn active_entry(&self, tenant: &TenantId) -> Result<Arc<TenantEntry>> {
        let entry = match self.state.keys.cached(tenant) {
            Some(entry) => entry,
            None => {
                let keys = Arc::clone(&self.state.keys);
                let tenant = tenant.clone();
                blocking(move || keys.tenant(&tenant)).await?
            }
        };
        entry.require_active()?;
        Ok(entry)
    }

    /// Permission to seal `count` values (reserving budget or rotating on the blocking pool
    /// only when the in-memory reservation is spent). A rotation forced by the nonce budget
    /// is audited (caller `server:nonce-budget`) before the grant is used.
    async fn grant(&self, entry: Arc<TenantEntry>, count: u64) -> Result<EncryptGrant> {
        let entry = match EncryptGrant::from_reservation(entry, count) {
            Ok(grant) => return Ok(grant),
            Err(entry) => entry,
        };
        let keys = Arc::clone(&self.state.keys);
        let grant = blocking(move || keys.grant_encryptions(entry, count)).await?;
        if let Some(from) = grant.rotated_from() {
            let record = call::system_record(
                "server:nonce-budget",
                &grant.entry().record.tenant_id,
                Operation::RotateTenantKey,
                vec![from, grant.version()],
                crate::audit::Outcome::Ok,
                format!("nonce budget of version {from} reached"),
            );
            self.state.audit.append(record).await?;
        }
        Ok(grant)
    }

    /// Refuses an EncryptBatch whose answer could exceed the message limit, before any
    /// nonce budget is spent or any value sealed (issue 13: such a batch was sealed, audited
    /// `ok` and then failed to encode, so the caller got nothing for the nonces it spent).
    /// The bound is exact for the payloads (a ciphertext is the plaintext plus
    /// [`format::MIN_LEN`]; an item error is its client message) plus an upper bound on
    /// protobuf framing per item.
    fn check_encrypt_batch_answer(
        &self,
        call: &Call,
        prepared: &[Result<Prepared<SecretBytes>>],
    ) -> Result<()> {
        // Tag and length varint (at most 1 + 5 bytes) of the repeated result, the oneof
        // member, the ciphertext or message, and the key version or code (at most 1 + 5).
        const FRAMING_PER_ITEM: usize = 4 * 6;
        let answer = prepared
            .iter()
            .map(|item| {
                FRAMING_PER_ITEM
                    + match item {
                        Ok(item) => item.data.expose_secret().len() + format::MIN_LEN,
                        Err(e) => status::client_message(e, &call.request_id).len(),
                    }
            })
            .fold(0usize, usize::saturating_add);
        let limit = self.state.options.limits.max_message_bytes;
        if answer > limit {
            return Err(Error::ResourceExhausted(format!(
                "the answer to this batch would be up to {answer} bytes, over the {limit}-byte \
                 message limit; split the batch"
            )));
        }
        Ok(())
    }

    fn check_value_len(&self, what: &str, len: usize) -> Result<()> {
        let limit = self.state.options.limits.max_field_bytes;
        if len > limit {
            return Err(Error::InvalidArgument(format!(
                "{what} is {len} bytes; the limit is {limit}"
            )));
        }
        Ok(())
    }

    fn check_ciphertext_len(&self, what: &str, len: usize) -> Result<()> {
        self.check_value_len(what, len.saturating_sub(format::MIN_LEN))
    }

    /// Runs one data-plane call: admits the caller for `tenant_id`, runs `body` in the
    /// call's span with the parsed tenant, and finishes the call (audit first, answer
    /// second), so no handler can skip a step or reorder them.
    async fn data_call<R>(
        &self,
        mut call: Call,
        tenant_id: &str,
        body: impl AsyncFnOnce(&mut Call, TenantId) -> Result<R>,
    ) -> Result<Response<R>, Status> {
        let span = call.span();
        let result = async {
            let tenant = call.admit(&self.state, tenant_id).await?;
            body(&mut call, tenant).await
        }
        .instrument(span)
        .await;
        call.finish(&self.state, result).await
    }

    /// Validates a batch: its item count (the whole call fails), then each item on its own
    /// (an invalid item fails alone, with its own error): its context, its data with
    /// `check_data`, its AAD. The valid items' contexts are noted for the audit record.
    fn prepare_batch<T>(
        &self,
        call: &mut Call,
        items: impl ExactSizeIterator<Item = (String, T, Vec<u8>)>,
        check_data: impl Fn(&T) -> Result<()>,
    ) -> Result<Vec<Result<Prepared<T>>>> {
        call.item_count = self.check_batch_len(items.len())?;
        let prepared: Vec<Result<Prepared<T>>> = items
            .map(|(context, data, aad)| {
                let context = Context::parse(&context)?;
                check_data(&data)?;
                self.check_value_len("aad", aad.len())?;
                Ok(Prepared { context, aad, data })
            })
            .collect();
        for item in prepared.iter().flatten() {
            call.note_context(&item.context);
        }
        Ok(prepared)
    }

    /// [`Self::prepare_batch`] for items that carry a ciphertext (decrypt and rewrap).
    fn prepare_ciphertexts(
        &self,
        call: &mut Call,
        items: impl ExactSizeIterator<Item = (String, Vec<u8>, Vec<u8>)>,
    ) -> Result<Vec<Result<Prepared<Vec<u8>>>>> {
        self.prepare_batch(call, items, |ciphertext| {
            self.check_ciphertext_len("ciphertext", ciphertext.len())
        })
    }

    fn check_batch_len(&self, len: usize) -> Result<u32> {
        let limit = self.state.options.limits.max_batch_items;
        if len == 0 || len > limit {
            return Err(Error::InvalidArgument(format!(
                "items must hold 1 to {limit} entries, not {len}"
            )));
        }
        Ok(len as u32)
    }
}

/// Seals one value under a grant.
fn seal(
    grant: &EncryptGrant,
    purpose: Purpose,
    tenant: &TenantId,
    context: &Context,
    aad: &[u8],
    plaintext: &[u8],
) -> Result<Vec<u8>> {
    let key = grant
        .entry()
        .value_key(grant.version(), purpose, context.as_str())?;
    envelope::seal_value(
        &key,
        purpose,
        grant.version(),
        tenant.as_str(),
        context.as_str(),
        aad,
        plaintext,
    )
    .map_err(|_| Error::internal("seal failed"))
}

/// Opens one v1 ciphertext with whichever version its header names.
fn open(
    entry: &TenantEntry,
    purpose: Purpose,
    tenant: &TenantId,
    context: &Context,
    aad: &[u8],
    ciphertext: &[u8],
) -> Result<(SecretBytes, u32)> {
    let parsed = format::parse(ciphertext).map_err(Error::failed_open)?;
    let version = parsed.header.key_version;
    let key = entry.value_key(version, purpose, context.as_str())?;
    let plaintext = envelope::open_value(
        &key,
        purpose,
        &parsed,
        tenant.as_str(),
        context.as_str(),
        aad,
    )
    .map_err(Error::failed_open)?;
    Ok((plaintext, version))
}

/// Runs per-item work inline or, for large batches, on the blocking pool.
async fn run_items<I, O>(
    items: Vec<I>,
    work: impl Fn(I) -> Result<O> + Send + 'static,
) -> Result<Vec<Result<O>>>
where
    I: Send + 'static,
    O: Send + 'static,
{
    if items.len() <= INLINE_BATCH_ITEMS {
        Ok(items.into_iter().map(work).collect())
    } else {
        blocking(move || Ok(items.into_iter().map(work).collect())).await
    }
}

fn item_error(call: &mut Call, error: &Error) -> pb::ItemError {
    call.failed_items += 1;
    pb::ItemError {
        code: status::code(error) as i32,
        message: status::client_message(error, &call.request_id),
    }
}

/// A batch item after validation: its context and its owned fields.
struct Prepared<T> {
    context: Context,
    aad: Vec<u8>,
    data: T,
}

#[tonic::async_trait]
impl KeyService for KeyServiceImpl {
    async fn encrypt(
        &self,
        request: Request<pb::EncryptRequest>,
    ) -> Result<Response<pb::EncryptResponse>, Status> {
        let call = Call::begin(&request, Operation::Encrypt);
        let req = request.into_inner();
        let plaintext = SecretBytes::new(req.plaintext);
        self.data_call(call, &req.tenant_id, async |call, tenant| {
            let context = Context::parse(&req.context)?;
            call.note_context(&context);
            self.check_value_len("plaintext", plaintext.expose_secret().len())?;
            self.check_value_len("aad", req.aad.len())?;
            call.note_aad(&self.state, &req.aad);
            let entry = self.active_entry(&tenant).await?;
            let grant = self.grant(entry, 1).await?;
            call.note_version(grant.version());
            let ciphertext = seal(
                &grant,
                Purpose::Field,
                &tenant,
                &context,
                &req.aad,
                plaintext.expose_secret(),
            )?;
            Ok(pb::EncryptResponse {
                ciphertext,
                key_version: grant.version(),
            })
        })
        .await
    }

    async fn decrypt(
        &self,
        request: Request<pb::DecryptRequest>,
    ) -> Result<Response<pb::DecryptResponse>, Status> {
        let call = Call::begin(&request, Operation::Decrypt);
        let req = request.into_inner();
        self.data_call(call, &req.tenant_id, async |call, tenant| {
            let context = Context::parse(&req.context)?;
            call.note_context(&context);
            self.check_ciphertext_len("ciphertext", req.ciphertext.len())?;
            self.check_value_len("aad", req.aad.len())?;
            call.note_aad(&self.state, &req.aad);
            if let Ok(parsed) = format::parse(&req.ciphertext) {
                call.note_version(parsed.header.key_version);
            }
            let entry = self.active_entry(&tenant).await?;
            let (plaintext, version) = open(
                &entry,
                Purpose::Field,
                &tenant,
                &context,
                &req.aad,
                &req.ciphertext,
            )?;
            Ok(pb::DecryptResponse {
                plaintext: plaintext.into_unprotected_vec(),
                key_version: version,
            })
        })
        .await
    }

    async fn encrypt_batch(
        &self,
        request: Request<pb::EncryptBatchRequest>,
    ) -> Result<Response<pb::EncryptBatchResponse>, Status> {
        let call = Call::begin(&request, Operation::EncryptBatch);
        let req = request.into_inner();
        self.data_call(call, &req.tenant_id, async |call, tenant| {
            let items = req
                .items
                .into_iter()
                .map(|item| (item.context, SecretBytes::new(item.plaintext), item.aad));
            let prepared = self.prepare_batch(call, items, |plaintext| {
                self.check_value_len("plaintext", plaintext.expose_secret().len())
            })?;
            self.check_encrypt_batch_answer(call, &prepared)?;
            let valid = prepared.iter().filter(|p| p.is_ok()).count() as u64;
            let grant = if valid > 0 {
                let entry = self.active_entry(&tenant).await?;
                let grant = self.grant(entry, valid).await?;
                call.note_version(grant.version());
                Some(Arc::new(grant))
            } else {
                None
            };
            let outputs = run_items(prepared, move |item| {
                let item = item?;
                let grant = grant
                    .as_ref()
                    .ok_or_else(|| Error::internal("no grant for a valid item"))?;
                let ciphertext = seal(
                    grant,
                    Purpose::Field,
                    &tenant,
                    &item.context,
                    &item.aad,
                    item.data.expose_secret(),
                )?;
                Ok(pb::EncryptResponse {
                    ciphertext,
                    key_version: grant.version(),
                })
            })
            .await?;
            let results = outputs
                .into_iter()
                .map(|output| pb::EncryptBatchResult {
                    result: Some(match output {
                        Ok(o) => pb::encrypt_batch_result::Result::Output(o),
                        Err(e) => pb::encrypt_batch_result::Result::Error(item_error(call, &e)),
                    }),
                })
                .collect();
            Ok(pb::EncryptBatchResponse { results })
        })
        .await
    }

    async fn decrypt_batch(
        &self,
        request: Request<pb::DecryptBatchRequest>,
    ) -> Result<Response<pb::DecryptBatchResponse>, Status> {
        let call = Call::begin(&request, Operation::DecryptBatch);
        let req = request.into_inner();
        self.data_call(call, &req.tenant_id, async |call, tenant| {
            let items = req
                .items
                .into_iter()
                .map(|item| (item.context, item.ciphertext, item.aad));
            let prepared = self.prepare_ciphertexts(call, items)?;
            let entry = self.active_entry(&tenant).await?;
            let outputs = run_items(prepared, move |item| {
                let item = item?;
                open(
                    &entry,
                    Purpose::Field,
                    &tenant,
                    &item.context,
                    &item.aad,
                    &item.data,
                )
            })
            .await?;
            let results = outputs
                .into_iter()
                .map(|output| pb::DecryptBatchResult {
                    result: Some(match output {
                        Ok((plaintext, version)) => {
                            call.note_version(version);
                            pb::decrypt_batch_result::Result::Output(pb::DecryptResponse {
                                plaintext: plaintext.into_unprotected_vec(),
                                key_version: version,
                            })
                        }
                        Err(e) => pb::decrypt_batch_result::Result::Error(item_error(call, &e)),
                    }),
                })
                .collect();
            Ok(pb::DecryptBatchResponse { results })
        })
        .await
    }

    async fn generate_data_key(
        &self,
        request: Request<pb::GenerateDataKeyRequest>,
    ) -> Result<Response<pb::GenerateDataKeyResponse>, Status> {
        let call = Call::begin(&request, Operation::GenerateDataKey);
        let req = request.into_inner();
        self.data_call(call, &req.tenant_id, async |call, tenant| {
            let context = Context::parse(&req.context)?;
            call.note_context(&context);
            let entry = self.active_entry(&tenant).await?;
            let grant = self.grant(entry, 1).await?;
            call.note_version(grant.version());
            let data_key = SecretKey::generate().map_err(|_| Error::internal("CSPRNG failed"))?;
            let wrapped_key = seal(
                &grant,
                Purpose::DataKey,
                &tenant,
                &context,
                b"",
                data_key.expose_secret(),
            )?;
            Ok(pb::GenerateDataKeyResponse {
                plaintext_key: data_key.expose_secret().to_vec(),
                wrapped_key,
                key_version: grant.version(),
            })
        })
        .await
    }

    async fn decrypt_data_key(
        &self,
        request: Request<pb::DecryptDataKeyRequest>,
    ) -> Result<Response<pb::DecryptDataKeyResponse>, Status> {
        let call = Call::begin(&request, Operation::DecryptDataKey);
        let req = request.into_inner();
        self.data_call(call, &req.tenant_id, async |call, tenant| {
            let context = Context::parse(&req.context)?;
            call.note_context(&context);
            self.check_ciphertext_len("wrapped_key", req.wrapped_key.len())?;
            self.check_value_len("aad", req.aad.len())?;
            call.note_aad(&self.state, &req.aad);
            if let Ok(parsed) = format::parse(&req.wrapped_key) {
                call.note_version(parsed.header.key_version);
            }
            let entry = self.active_entry(&tenant).await?;
            let (plaintext_key, version) = open(
                &entry,
                Purpose::DataKey,
                &tenant,
                &context,
                &req.aad,
                &req.wrapped_key,
            )?;
            Ok(pb::DecryptDataKeyResponse {
                plaintext_key: plaintext_key.into_unprotected_vec(),
                key_version: version,
            })
        })
        .await
    }

    async fn generate_data_key_without_plaintext(
        &self,
        request: Request<pb::GenerateDataKeyWithoutPlaintextRequest>,
    ) -> Result<Response<pb::GenerateDataKeyWithoutPlaintextResponse>, Status> {
        let call = Call::begin(&request, Operation::GenerateDataKeyWithoutPlaintext);
        let req = request.into_inner();
        self.data_call(call, &req.tenant_id, async |call, tenant| {
            let context = Context::parse(&req.context)?;
            call.note_context(&context);
            self.check_value_len("aad", req.aad.len())?;
            call.note_aad(&self.state, &req.aad);
            let entry = self.active_entry(&tenant).await?;
            let grant = self.grant(entry, 1).await?;
            call.note_version(grant.version());
            // Generated and sealed like GenerateDataKey's, then dropped (zeroized): only the
            // wrapped form leaves, for a caller that stores it and opens it later (or lets
            // another service open it) with DecryptDataKey and the same aad.
            let data_key = SecretKey::generate().map_err(|_| Error::internal("CSPRNG failed"))?;
            let wrapped_key = seal(
                &grant,
                Purpose::DataKey,
                &tenant,
                &context,
                &req.aad,
                data_key.expose_secret(),
            )?;
            Ok(pb::GenerateDataKeyWithoutPlaintextResponse {
                wrapped_key,
                key_version: grant.version(),
            })
        })
        .await
    }

    async fn rewrap(
        &self,
        request: Request<pb::RewrapRequest>,
    ) -> Result<Response<pb::RewrapResponse>, Status> {
        let call = Call::begin(&request, Operation::Rewrap);
        let req = request.into_inner();
        self.data_call(call, &req.tenant_id, async |call, tenant| {
            let context = Context::parse(&req.context)?;
            call.note_context(&context);
            self.check_ciphertext_len("ciphertext", req.ciphertext.len())?;
            self.check_value_len("aad", req.aad.len())?;
            call.note_aad(&self.state, &req.aad);
            let entry = self.active_entry(&tenant).await?;
            let (plaintext, old_version) = open(
                &entry,
                Purpose::Field,
                &tenant,
                &context,
                &req.aad,
                &req.ciphertext,
            )?;
            call.note_version(old_version);
            let grant = self.grant(entry, 1).await?;
            call.note_version(grant.version());
            let ciphertext = seal(
                &grant,
                Purpose::Field,
                &tenant,
                &context,
                &req.aad,
                plaintext.expose_secret(),
            )?;
            Ok(pb::RewrapResponse {
                ciphertext,
                key_version: grant.version(),
            })
        })
        .await
    }

    async fn rewrap_batch(
        &self,
        request: Request<pb::RewrapBatchRequest>,
    ) -> Result<Response<pb::RewrapBatchResponse>, Status> {
        let call = Call::begin(&request, Operation::RewrapBatch);
        let req = request.into_inner();
        self.data_call(call, &req.tenant_id, async |call, tenant| {
            let items = req
                .items
                .into_iter()
                .map(|item| (item.context, item.ciphertext, item.aad));
            let prepared = self.prepare_ciphertexts(call, items)?;
            let valid = prepared.iter().filter(|p| p.is_ok()).count() as u64;
            let entry = self.active_entry(&tenant).await?;
            let grant = if valid > 0 {
                let grant = self.grant(Arc::clone(&entry), valid).await?;
                call.note_version(grant.version());
                Some(Arc::new(grant))
            } else {
                None
            };
            let outputs = run_items(prepared, move |item| {
                let item = item?;
                let (plaintext, old_version) = open(
                    &entry,
                    Purpose::Field,
                    &tenant,
                    &item.context,
                    &item.aad,
                    &item.data,
                )?;
                let grant = grant
                    .as_ref()
                    .ok_or_else(|| Error::internal("no grant for a valid item"))?;
                let ciphertext = seal(
                    grant,
                    Purpose::Field,
                    &tenant,
                    &item.context,
                    &item.aad,
                    plaintext.expose_secret(),
                )?;
                Ok((
                    pb::RewrapResponse {
                        ciphertext,
                        key_version: grant.version(),
                    },
                    old_version,
                ))
            })
            .await?;
            let results = outputs
                .into_iter()
                .map(|output| pb::RewrapBatchResult {
                    result: Some(match output {
                        Ok((o, old_version)) => {
                            call.note_version(old_version);
                            pb::rewrap_batch_result::Result::Output(o)
                        }
                        Err(e) => pb::rewrap_batch_result::Result::Error(item_error(call, &e)),
                    }),
                })
                .collect();
            Ok(pb::RewrapBatchResponse { results })
        })
        .await
    }
}
