//! `tenantkms.v1.KeyService`: the data plane.
//!
//! Each handler: start a [`Call`], authenticate and authorize, parse input into domain types,
//! take the tenant's keys from the cache (loading them on the blocking pool on a miss), seal or
//! open, and finish the call (audit first, answer second). Batches handle each item on its own,
//! and run their crypto on the blocking pool when they are large enough to stall the async
//! threads.

use std::sync::Arc;

use crate::telemetry::InCallExt;
use tonic::{Request, Response, Status};

use super::call::{self, Call};
use super::state::AppState;
use super::{blocking, status};
use crate::auth::Operation;
use crate::crypto::blind_index::{self, Normalization};
use crate::crypto::envelope::{self, Purpose};
use crate::crypto::format::{self, Algorithm};
use crate::crypto::secret::{SecretBytes, SecretKey};
use crate::crypto::siv;
use crate::domain::index::{IndexDefinition, IndexName};
use crate::domain::{Context, TenantId};
use crate::error::{Error, Result};
use crate::keys::EncryptGrant;
use crate::keys::cache::TenantEntry;
use crate::pb;
use crate::pb::key_service_server::KeyService;

/// Batches with more items than this run their crypto on the blocking pool.
const INLINE_BATCH_ITEMS: usize = 32;

/// Most blind indexes one value may name, and most different ones one call may name.
const MAX_INDEXES_PER_VALUE: usize = 8;

/// Most blind index definitions kept in memory before the cache starts over.
const MAX_CACHED_DEFINITIONS: usize = 4096;

/// The KeyService implementation.
pub struct KeyServiceImpl {
    state: Arc<AppState>,
    /// Blind index definitions found in force, by (tenant, name). A definition in force for a
    /// tenant never changes and is never removed (`domain::index::check_declaration`), so a
    /// cached one is never stale, even when another process declares indexes.
    definitions: std::sync::Mutex<std::collections::HashMap<(String, String), IndexDefinition>>,
}

impl KeyServiceImpl {
    /// A service over the shared state.
    pub fn new(state: Arc<AppState>) -> Self {
        Self {
            state,
            definitions: std::sync::Mutex::default(),
        }
    }

    fn cached_definitions(
        &self,
    ) -> std::sync::MutexGuard<'_, std::collections::HashMap<(String, String), IndexDefinition>>
    {
        // A poisoned lock only means a panic elsewhere; the map is consistent between
        // statements.
        self.definitions
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The blind index definition of `name` in force for `tenant`; NOT_FOUND if none.
    async fn index_definition(
        &self,
        tenant: &TenantId,
        name: &IndexName,
    ) -> Result<IndexDefinition> {
        let key = (tenant.as_str().to_owned(), name.as_str().to_owned());
        if let Some(found) = self.cached_definitions().get(&key) {
            return Ok(found.clone());
        }
        let keys = Arc::clone(&self.state.keys);
        let (t, n) = (tenant.clone(), name.clone());
        let found = blocking(move || keys.store().index_definition(&t, &n))
            .await?
            .ok_or(Error::NotFound("blind index"))?;
        let mut cache = self.cached_definitions();
        if cache.len() >= MAX_CACHED_DEFINITIONS {
            cache.clear();
        }
        cache.insert(key, found.clone());
        Ok(found)
    }

    /// Parses and resolves the blind index names a request asks for (at most
    /// [`MAX_INDEXES_PER_VALUE`] different ones per call), notes them for the audit record, and checks
    /// that the caller may also compute blind indexes. Nothing is asked: nothing is checked.
    async fn resolve_indexes<'a>(
        &self,
        call: &mut Call,
        tenant: &TenantId,
        names: impl Iterator<Item = &'a String>,
    ) -> Result<Vec<IndexDefinition>> {
        let mut out: Vec<IndexDefinition> = Vec::new();
        for raw in names {
            if out.is_empty() {
                call.authorize_also(Operation::ComputeBlindIndex)?;
            }
            let name = IndexName::parse(raw)?;
            if out.iter().any(|d| d.name == name) {
                continue;
            }
            // Bounded before any lookup, so a long list costs nothing but its parsing.
            if out.len() == MAX_INDEXES_PER_VALUE {
                return Err(Error::InvalidArgument(format!(
                    "a call may name at most {MAX_INDEXES_PER_VALUE} different blind indexes"
                )));
            }
            call.note_index(&name);
            out.push(self.index_definition(tenant, &name).await?);
        }
        Ok(out)
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

    /// Seals one field value under the tenant's primary version: deterministically (no nonce,
    /// no budget) or under a fresh grant. Returns the ciphertext, the version that sealed it and
    /// the key snapshot it was sealed with (a grant may have rotated to a new one).
    async fn seal_field(
        &self,
        entry: Arc<TenantEntry>,
        deterministic: bool,
        tenant: &TenantId,
        context: &Context,
        aad: &[u8],
        plaintext: &[u8],
    ) -> Result<(Vec<u8>, u32, Arc<TenantEntry>)> {
        if deterministic {
            let version = entry.record.primary_version;
            let ciphertext = seal_deterministic(&entry, version, tenant, context, aad, plaintext)?;
            return Ok((ciphertext, version, entry));
        }
        let grant = self.grant(entry, 1).await?;
        let ciphertext = seal(&grant, Purpose::Field, tenant, context, aad, plaintext)?;
        Ok((ciphertext, grant.version(), Arc::clone(grant.entry())))
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
        prepared: &[Result<Prepared<EncryptItem>>],
        deterministic: bool,
        versions: usize,
    ) -> Result<()> {
        // Searchable columns: a deterministic value is sealed once per answered version, and
        // each blind index (at most 32 bytes, its name at most 64) is returned once per
        // version, with its own framing.
        let copies = if deterministic { versions } else { 1 };
        // Tag and length varint (at most 1 + 5 bytes) of the repeated result, the oneof
        // member, the ciphertext or message, and the key version or code (at most 1 + 5).
        const FRAMING_PER_ITEM: usize = 4 * 6;
        let answer = prepared
            .iter()
            .map(|item| {
                FRAMING_PER_ITEM
                    + match item {
                        Ok(item) => {
                            (item.data.0.expose_secret().len() + format::MIN_LEN) * copies
                                + FRAMING_PER_ITEM * (copies - 1)
                                + item.data.1.len() * versions * (32 + 64 + 16)
                        }
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
    async fn data_call<R: prost::Message>(
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
        .in_call(span)
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

/// The indexes of `definitions` that a value asks for by name (names resolved already).
fn indexes_named(definitions: &[IndexDefinition], names: &[String]) -> Result<Vec<usize>> {
    if names.len() > MAX_INDEXES_PER_VALUE {
        return Err(Error::InvalidArgument(format!(
            "blind_indexes may name at most {MAX_INDEXES_PER_VALUE} indexes"
        )));
    }
    let mut out = Vec::with_capacity(names.len());
    for name in names {
        let i = definitions
            .iter()
            .position(|d| d.name.as_str() == name)
            .ok_or_else(|| Error::internal("blind index not resolved"))?;
        if !out.contains(&i) {
            out.push(i);
        }
    }
    Ok(out)
}

/// Refuses, before anything is sealed, a value that an index's normalization cannot take
/// (case folding needs UTF-8 text).
fn check_normalizable<'a>(
    definitions: impl IntoIterator<Item = &'a IndexDefinition>,
    value: &[u8],
) -> Result<()> {
    for d in definitions {
        if d.normalization == Normalization::CaseFoldTrim && std::str::from_utf8(value).is_err() {
            return Err(Error::InvalidArgument(format!(
                "blind index {} normalizes with casefold_trim, which needs UTF-8 text",
                d.name
            )));
        }
    }
    Ok(())
}

/// The blind indexes of one value: for each definition, under each of `versions`.
fn blind_indexes<'a>(
    entry: &TenantEntry,
    versions: &[u32],
    definitions: impl IntoIterator<Item = &'a IndexDefinition>,
    value: &[u8],
) -> Result<Vec<pb::BlindIndex>> {
    let mut out = Vec::new();
    for d in definitions {
        for &version in versions {
            let key = entry.index_key(version, d.name.as_str())?;
            let index =
                blind_index::index_of(&key, d.bits, d.normalization, value).map_err(|_| {
                    Error::InvalidArgument(format!(
                        "blind index {} normalizes with casefold_trim, which needs UTF-8 text",
                        d.name
                    ))
                })?;
            out.push(pb::BlindIndex {
                index_name: d.name.as_str().to_owned(),
                key_version: version,
                index,
            });
        }
    }
    Ok(out)
}

/// The versions a searchable answer covers: the one that sealed, or every enabled version
/// (that one first, then the others newest first).
fn answer_versions(entry: &TenantEntry, version: u32, all: bool) -> Vec<u32> {
    if !all {
        return vec![version];
    }
    let mut versions = vec![version];
    versions.extend(
        entry
            .enabled_versions()
            .into_iter()
            .filter(|v| *v != version),
    );
    versions
}

/// Seals one value deterministically (algorithm 3, AES-256-SIV) under `version`. SIV takes no
/// nonce, so this spends no nonce budget (docs/SEARCHABLE.md).
fn seal_deterministic(
    entry: &TenantEntry,
    version: u32,
    tenant: &TenantId,
    context: &Context,
    aad: &[u8],
    plaintext: &[u8],
) -> Result<Vec<u8>> {
    let key = entry.deterministic_key(version, context.as_str())?;
    siv::seal_deterministic(
        &key,
        version,
        tenant.as_str(),
        context.as_str(),
        aad,
        plaintext,
    )
    .map_err(|_| Error::internal("deterministic seal failed"))
}

/// A deterministic value's other enabled versions' ciphertexts (`all_enabled_versions`).
fn other_versions(
    entry: &TenantEntry,
    versions: &[u32],
    tenant: &TenantId,
    context: &Context,
    aad: &[u8],
    plaintext: &[u8],
) -> Result<Vec<pb::VersionedCiphertext>> {
    versions
        .iter()
        .skip(1)
        .map(|&version| {
            Ok(pb::VersionedCiphertext {
                key_version: version,
                ciphertext: seal_deterministic(entry, version, tenant, context, aad, plaintext)?,
            })
        })
        .collect()
}

/// Whether a ciphertext is a deterministic value (algorithm 3); a rewrap keeps the mode.
fn is_deterministic(ciphertext: &[u8]) -> bool {
    format::parse(ciphertext).is_ok_and(|p| p.header.algorithm == Algorithm::DeterministicValue)
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
    if purpose == Purpose::Field && parsed.header.algorithm == Algorithm::DeterministicValue {
        let key = entry.deterministic_key(version, context.as_str())?;
        let plaintext =
            siv::open_deterministic(&key, &parsed, tenant.as_str(), context.as_str(), aad)
                .map_err(Error::failed_open)?;
        return Ok((plaintext, version));
    }
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
    if matches!(error, Error::DecryptFailed) {
        call.failed_opens += 1;
    }
    pb::ItemError {
        code: status::code(error) as i32,
        message: status::client_message(error, &call.request_id),
    }
}

/// An EncryptBatch item's data: its plaintext and the blind index names it asks for.
type EncryptItem = (SecretBytes, Vec<String>);

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
        // A deterministic seal is its own operation (audit, token scopes): it reveals equality.
        let operation = if request.get_ref().deterministic {
            Operation::EncryptDeterministic
        } else {
            Operation::Encrypt
        };
        let call = Call::begin(&request, operation);
        let req = request.into_inner();
        let plaintext = SecretBytes::new(req.plaintext);
        self.data_call(call, &req.tenant_id, async |call, tenant| {
            let context = Context::parse(&req.context)?;
            call.note_context(&context);
            self.check_value_len("plaintext", plaintext.expose_secret().len())?;
            self.check_value_len("aad", req.aad.len())?;
            call.note_aad(&self.state, &req.aad);
            let definitions = self
                .resolve_indexes(call, &tenant, req.blind_indexes.iter())
                .await?;
            indexes_named(&definitions, &req.blind_indexes)?;
            check_normalizable(&definitions, plaintext.expose_secret())?;
            let entry = self.active_entry(&tenant).await?;
            let (ciphertext, version, entry) = self
                .seal_field(
                    entry,
                    req.deterministic,
                    &tenant,
                    &context,
                    &req.aad,
                    plaintext.expose_secret(),
                )
                .await?;
            call.note_version(version);
            let versions = answer_versions(&entry, version, req.all_enabled_versions);
            if req.deterministic || !definitions.is_empty() {
                versions.iter().for_each(|v| call.note_version(*v));
            }
            let other_versions = if req.deterministic {
                other_versions(
                    &entry,
                    &versions,
                    &tenant,
                    &context,
                    &req.aad,
                    plaintext.expose_secret(),
                )?
            } else {
                Vec::new()
            };
            let blind_indexes =
                blind_indexes(&entry, &versions, &definitions, plaintext.expose_secret())?;
            Ok(pb::EncryptResponse {
                ciphertext,
                key_version: version,
                blind_indexes,
                other_versions,
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
        let operation = if request.get_ref().deterministic {
            Operation::EncryptBatchDeterministic
        } else {
            Operation::EncryptBatch
        };
        let call = Call::begin(&request, operation);
        let req = request.into_inner();
        let deterministic = req.deterministic;
        let all_versions = req.all_enabled_versions;
        self.data_call(call, &req.tenant_id, async |call, tenant| {
            self.check_batch_len(req.items.len())?;
            let definitions = Arc::new(
                self.resolve_indexes(
                    call,
                    &tenant,
                    req.items.iter().flat_map(|i| i.blind_indexes.iter()),
                )
                .await?,
            );
            let items = req.items.into_iter().map(|item| {
                (
                    item.context,
                    (SecretBytes::new(item.plaintext), item.blind_indexes),
                    item.aad,
                )
            });
            let prepared = self.prepare_batch(call, items, |(plaintext, names)| {
                self.check_value_len("plaintext", plaintext.expose_secret().len())?;
                let named = indexes_named(&definitions, names)?;
                check_normalizable(
                    named.iter().filter_map(|i| definitions.get(*i)),
                    plaintext.expose_secret(),
                )
            })?;
            let valid = prepared.iter().filter(|p| p.is_ok()).count() as u64;
            let entry = if valid > 0 {
                Some(self.active_entry(&tenant).await?)
            } else {
                None
            };
            // Every enabled version, plus one for a rotation the grant below may make.
            let answered = match &entry {
                Some(entry) if all_versions => entry.enabled_versions().len() + 1,
                _ => 1,
            };
            self.check_encrypt_batch_answer(call, &prepared, deterministic, answered)?;
            // A deterministic seal takes no nonce, so it reserves no nonce budget.
            let sealer = match entry {
                None => None,
                Some(entry) if deterministic => {
                    let version = entry.record.primary_version;
                    Some((entry, version, None))
                }
                Some(entry) => {
                    let grant = self.grant(entry, valid).await?;
                    Some((
                        Arc::clone(grant.entry()),
                        grant.version(),
                        Some(Arc::new(grant)),
                    ))
                }
            };
            let versions = match &sealer {
                Some((entry, version, _)) => {
                    let versions = answer_versions(entry, *version, all_versions);
                    call.note_version(*version);
                    if deterministic || !definitions.is_empty() {
                        versions.iter().for_each(|v| call.note_version(*v));
                    }
                    versions
                }
                None => Vec::new(),
            };
            let outputs = run_items(prepared, move |item| {
                let item = item?;
                let (plaintext, names) = &item.data;
                let (entry, version, grant) = sealer
                    .as_ref()
                    .ok_or_else(|| Error::internal("no sealer for a valid item"))?;
                let ciphertext = match grant {
                    Some(grant) => seal(
                        grant,
                        Purpose::Field,
                        &tenant,
                        &item.context,
                        &item.aad,
                        plaintext.expose_secret(),
                    )?,
                    None => seal_deterministic(
                        entry,
                        *version,
                        &tenant,
                        &item.context,
                        &item.aad,
                        plaintext.expose_secret(),
                    )?,
                };
                let other_versions = if grant.is_none() {
                    other_versions(
                        entry,
                        &versions,
                        &tenant,
                        &item.context,
                        &item.aad,
                        plaintext.expose_secret(),
                    )?
                } else {
                    Vec::new()
                };
                let named = indexes_named(&definitions, names)?;
                let blind_indexes = blind_indexes(
                    entry,
                    &versions,
                    named.iter().filter_map(|i| definitions.get(*i)),
                    plaintext.expose_secret(),
                )?;
                Ok(pb::EncryptResponse {
                    ciphertext,
                    key_version: *version,
                    blind_indexes,
                    other_versions,
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
            let definitions = self
                .resolve_indexes(call, &tenant, req.blind_indexes.iter())
                .await?;
            indexes_named(&definitions, &req.blind_indexes)?;
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
            check_normalizable(&definitions, plaintext.expose_secret())?;
            let (ciphertext, version, entry) = self
                .seal_field(
                    entry,
                    is_deterministic(&req.ciphertext),
                    &tenant,
                    &context,
                    &req.aad,
                    plaintext.expose_secret(),
                )
                .await?;
            call.note_version(version);
            let blind_indexes =
                blind_indexes(&entry, &[version], &definitions, plaintext.expose_secret())?;
            Ok(pb::RewrapResponse {
                ciphertext,
                key_version: version,
                blind_indexes,
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
            self.check_batch_len(req.items.len())?;
            let definitions = Arc::new(
                self.resolve_indexes(
                    call,
                    &tenant,
                    req.items.iter().flat_map(|i| i.blind_indexes.iter()),
                )
                .await?,
            );
            let items = req.items.into_iter().map(|item| {
                (
                    item.context,
                    (item.ciphertext, item.blind_indexes),
                    item.aad,
                )
            });
            let prepared = self.prepare_batch(call, items, |(ciphertext, names)| {
                self.check_ciphertext_len("ciphertext", ciphertext.len())?;
                indexes_named(&definitions, names).map(|_| ())
            })?;
            // Deterministic values re-seal without a nonce: only the others reserve budget.
            let randomized = prepared
                .iter()
                .flatten()
                .filter(|p| !is_deterministic(&p.data.0))
                .count() as u64;
            let entry = self.active_entry(&tenant).await?;
            let grant = if randomized > 0 {
                let grant = self.grant(Arc::clone(&entry), randomized).await?;
                call.note_version(grant.version());
                Some(Arc::new(grant))
            } else {
                call.note_version(entry.record.primary_version);
                None
            };
            let outputs = run_items(prepared, move |item| {
                let item = item?;
                let (ciphertext, names) = &item.data;
                let (plaintext, old_version) = open(
                    &entry,
                    Purpose::Field,
                    &tenant,
                    &item.context,
                    &item.aad,
                    ciphertext,
                )?;
                let named = indexes_named(&definitions, names)?;
                check_normalizable(
                    named.iter().filter_map(|i| definitions.get(*i)),
                    plaintext.expose_secret(),
                )?;
                let (new_ciphertext, version, sealed_by) = if is_deterministic(ciphertext) {
                    let version = entry.record.primary_version;
                    let sealed = seal_deterministic(
                        &entry,
                        version,
                        &tenant,
                        &item.context,
                        &item.aad,
                        plaintext.expose_secret(),
                    )?;
                    (sealed, version, Arc::clone(&entry))
                } else {
                    let grant = grant
                        .as_ref()
                        .ok_or_else(|| Error::internal("no grant for a valid item"))?;
                    let sealed = seal(
                        grant,
                        Purpose::Field,
                        &tenant,
                        &item.context,
                        &item.aad,
                        plaintext.expose_secret(),
                    )?;
                    (sealed, grant.version(), Arc::clone(grant.entry()))
                };
                let blind_indexes = blind_indexes(
                    &sealed_by,
                    &[version],
                    named.iter().filter_map(|i| definitions.get(*i)),
                    plaintext.expose_secret(),
                )?;
                Ok((
                    pb::RewrapResponse {
                        ciphertext: new_ciphertext,
                        key_version: version,
                        blind_indexes,
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
                            call.note_version(o.key_version);
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

    async fn compute_blind_index(
        &self,
        request: Request<pb::ComputeBlindIndexRequest>,
    ) -> Result<Response<pb::ComputeBlindIndexResponse>, Status> {
        let call = Call::begin(&request, Operation::ComputeBlindIndex);
        let req = request.into_inner();
        let values: Vec<SecretBytes> = req.values.into_iter().map(SecretBytes::new).collect();
        self.data_call(call, &req.tenant_id, async |call, tenant| {
            call.item_count = self.check_batch_len(values.len())?;
            let name = IndexName::parse(&req.index_name)?;
            call.note_index(&name);
            let entry = self.active_entry(&tenant).await?;
            let definition = Arc::new(self.index_definition(&tenant, &name).await?);
            let versions = answer_versions(
                &entry,
                entry.record.primary_version,
                req.all_enabled_versions,
            );
            versions.iter().for_each(|v| call.note_version(*v));
            let limit = self.state.options.limits.max_field_bytes;
            let outputs = run_items(values, move |value| {
                let len = value.expose_secret().len();
                if len > limit {
                    return Err(Error::InvalidArgument(format!(
                        "value is {len} bytes; the limit is {limit}"
                    )));
                }
                blind_indexes(
                    &entry,
                    &versions,
                    std::iter::once(definition.as_ref()),
                    value.expose_secret(),
                )
            })
            .await?;
            let results = outputs
                .into_iter()
                .map(|output| pb::ComputeBlindIndexResult {
                    result: Some(match output {
                        Ok(indexes) => {
                            pb::compute_blind_index_result::Result::Output(pb::BlindIndexes {
                                indexes,
                            })
                        }
                        Err(e) => {
                            pb::compute_blind_index_result::Result::Error(item_error(call, &e))
                        }
                    }),
                })
                .collect();
            Ok(pb::ComputeBlindIndexResponse { results })
        })
        .await
    }
}
