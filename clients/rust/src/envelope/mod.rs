//! Envelope encryption done locally: large values and files are sealed on the caller's side
//! under a data key from GenerateDataKey, in the streaming format of docs/ENVELOPE.md, so
//! neither the data nor its size goes to the KMS and a file need not fit in memory.
//!
//! - [`format`]: header, segment key, nonces (the bytes).
//! - [`stream`]: `std::io` writer and reader of one envelope, one segment in memory.
//! - [`cache`]: the bounded data-key cache (age, messages and bytes per key).
//! - [`Envelope`]: the helper tying them to a [`Client`].

pub mod cache;
pub mod format;
pub mod stream;

use std::fs::{File, OpenOptions};
use std::io::{BufReader, BufWriter, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use ring::rand::SecureRandom;
use zeroize::Zeroizing;

use crate::client::Client;
use crate::error::{Error, Result};
use crate::pb;
use cache::DataKeyCache;
use format::{DataKey, Header, SALT_LEN};
use stream::{DecryptingReader, EncryptingWriter};

/// Seals and opens envelopes through one [`Client`]. Cheap to clone (clones share the
/// cache).
#[derive(Clone)]
pub struct Envelope {
    client: Client,
    cache: Option<Arc<Mutex<DataKeyCache>>>,
    segment_size: u32,
}

impl Envelope {
    /// A helper with no cache (one GenerateDataKey per message, one DecryptDataKey per
    /// opened message) and 64 KiB segments.
    pub fn new(client: Client) -> Self {
        Self {
            client,
            cache: None,
            segment_size: format::DEFAULT_SEGMENT_SIZE,
        }
    }

    /// Re-uses data keys within `cache`'s limits (see [`cache`] for what that trades).
    pub fn with_cache(mut self, cache: DataKeyCache) -> Self {
        self.cache = Some(Arc::new(Mutex::new(cache)));
        self
    }

    /// Plaintext bytes per segment of the envelopes this helper writes (16 B to 16 MiB).
    pub fn with_segment_size(mut self, segment_size: u32) -> Result<Self> {
        if !format::SEGMENT_SIZES.contains(&segment_size) {
            return Err(Error::Config(format!(
                "segment size {segment_size} is outside 16 B to 16 MiB"
            )));
        }
        self.segment_size = segment_size;
        Ok(self)
    }

    fn with_cache_locked<T>(&self, f: impl FnOnce(&mut DataKeyCache) -> T) -> Option<T> {
        let cache = self.cache.as_ref()?;
        // A panic elsewhere while holding the lock leaves the map consistent (each method
        // finishes its one change before returning), so a poisoned lock is still usable.
        let mut guard = cache
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        Some(f(&mut guard))
    }

    /// A data key and its wrapped form for one message of `length` bytes: from the cache,
    /// else fresh from GenerateDataKey (and then cached).
    async fn encryption_key(
        &self,
        tenant: &str,
        context: &str,
        length: Option<u64>,
    ) -> Result<(DataKey, Vec<u8>)> {
        if let Some(Some(hit)) =
            self.with_cache_locked(|c| c.encryption_key(tenant, context, length))
        {
            return Ok(hit);
        }
        let mut answer = self
            .client
            .generate_data_key(pb::GenerateDataKeyRequest {
                tenant_id: tenant.to_owned(),
                context: context.to_owned(),
            })
            .await?;
        let raw = Zeroizing::new(std::mem::take(&mut answer.plaintext_key));
        let key = DataKey::from_slice(&raw)?;
        self.with_cache_locked(|c| {
            c.insert_encryption_key(tenant, context, &key, &answer.wrapped_key, length)
        });
        Ok((key, answer.wrapped_key))
    }

    /// The data key of `header` (which must name `tenant` and `context`): from the cache,
    /// else from DecryptDataKey (and then cached).
    async fn decryption_key(
        &self,
        tenant: &str,
        context: &str,
        header: &Header,
    ) -> Result<DataKey> {
        if header.tenant_id != tenant || header.context != context {
            return Err(Error::Format(format!(
                "the envelope is for tenant {:?} and context {:?}, not {tenant:?} and {context:?}",
                header.tenant_id, header.context
            )));
        }
        if let Some(Some(hit)) =
            self.with_cache_locked(|c| c.decryption_key(tenant, context, &header.wrapped_key))
        {
            return Ok(hit);
        }
        let mut answer = self
            .client
            .decrypt_data_key(pb::DecryptDataKeyRequest {
                tenant_id: tenant.to_owned(),
                context: context.to_owned(),
                wrapped_key: header.wrapped_key.clone(),
                ..Default::default()
            })
            .await?;
        let raw = Zeroizing::new(std::mem::take(&mut answer.plaintext_key));
        let key = DataKey::from_slice(&raw)?;
        self.with_cache_locked(|c| {
            c.insert_decryption_key(tenant, context, &header.wrapped_key, &key)
        });
        Ok(key)
    }

    fn header(&self, tenant: &str, context: &str, wrapped_key: Vec<u8>) -> Result<Header> {
        let mut salt = [0u8; SALT_LEN];
        ring::rand::SystemRandom::new()
            .fill(&mut salt)
            .map_err(|_| Error::Io(std::io::Error::other("the system random source failed")))?;
        Ok(Header {
            segment_size: self.segment_size,
            salt,
            tenant_id: tenant.to_owned(),
            context: context.to_owned(),
            wrapped_key,
        })
    }

    /// Starts an envelope on `output` for (tenant, context): writes the header and returns
    /// the writer to stream the plaintext into; call [`EncryptingWriter::finish`] at the end.
    /// Give `length` when known: only then may a cached key be used, and the writer refuses
    /// any other number of bytes.
    pub async fn encryptor<W: Write>(
        &self,
        tenant: &str,
        context: &str,
        output: W,
        length: Option<u64>,
    ) -> Result<EncryptingWriter<W>> {
        let (key, wrapped) = self.encryption_key(tenant, context, length).await?;
        EncryptingWriter::new(
            output,
            &key,
            &self.header(tenant, context, wrapped)?,
            length,
        )
    }

    /// Reads an envelope's header from `input` and returns the reader of its plaintext
    /// (see [`DecryptingReader`] for when the output counts as valid). The header must name
    /// `tenant` and `context`.
    pub async fn decryptor<R: Read>(
        &self,
        tenant: &str,
        context: &str,
        mut input: R,
    ) -> Result<DecryptingReader<R>> {
        let (header, bytes) = stream::read_header(&mut input)?;
        let key = self.decryption_key(tenant, context, &header).await?;
        DecryptingReader::new(input, &key, &header, &bytes)
    }

    /// Seals a value held in memory.
    pub async fn encrypt_value(
        &self,
        tenant: &str,
        context: &str,
        plaintext: &[u8],
    ) -> Result<Vec<u8>> {
        let mut writer = self
            .encryptor(tenant, context, Vec::new(), Some(plaintext.len() as u64))
            .await?;
        writer.write_all(plaintext)?;
        writer.finish()
    }

    /// Opens a value sealed by [`Envelope::encrypt_value`] (or any envelope) for (tenant,
    /// context).
    pub async fn decrypt_value(
        &self,
        tenant: &str,
        context: &str,
        envelope: &[u8],
    ) -> Result<Zeroizing<Vec<u8>>> {
        let mut reader = self.decryptor(tenant, context, envelope).await?;
        let mut plaintext = Zeroizing::new(Vec::new());
        reader.read_to_end(&mut plaintext)?;
        Ok(plaintext)
    }

    /// Seals the file `src` into `dst`, streaming; returns the plaintext length. As with
    /// [`Envelope::decrypt_file`], the output goes to a temporary file renamed to `dst` only
    /// when complete. The file I/O runs on tokio's blocking pool.
    pub async fn encrypt_file(
        &self,
        tenant: &str,
        context: &str,
        src: impl AsRef<Path>,
        dst: impl AsRef<Path>,
    ) -> Result<u64> {
        let (src, dst) = (src.as_ref(), dst.as_ref());
        let input = File::open(src)?;
        let length = input.metadata()?.len();
        let temporary = temporary_beside(dst)?;
        let output = create_private(&temporary)?;
        let writer = match self
            .encryptor(tenant, context, BufWriter::new(output), Some(length))
            .await
        {
            Ok(writer) => writer,
            Err(e) => {
                let _ = std::fs::remove_file(&temporary);
                return Err(e);
            }
        };
        let dst = dst.to_path_buf();
        blocking(move || {
            let mut writer = writer;
            let sealed = std::io::copy(&mut BufReader::new(input), &mut writer)
                .map_err(Error::from)
                .and_then(|copied| Ok((copied, writer.finish()?)));
            match sealed {
                Ok((copied, output)) => finish_file(output, &temporary, &dst).map(|()| copied),
                Err(e) => {
                    let _ = std::fs::remove_file(&temporary);
                    Err(e)
                }
            }
        })
        .await
    }

    /// Opens the envelope file `src` into `dst`, streaming. The plaintext goes to a
    /// temporary file beside `dst` (mode 0600) that is renamed to `dst` only once the whole
    /// envelope has opened: `dst` never holds a truncated or forged plaintext.
    pub async fn decrypt_file(
        &self,
        tenant: &str,
        context: &str,
        src: impl AsRef<Path>,
        dst: impl AsRef<Path>,
    ) -> Result<u64> {
        let (src, dst) = (src.as_ref(), dst.as_ref());
        let reader = self
            .decryptor(tenant, context, BufReader::new(File::open(src)?))
            .await?;
        let temporary = temporary_beside(dst)?;
        let dst = dst.to_path_buf();
        blocking(move || {
            let mut reader = reader;
            let mut output = BufWriter::new(create_private(&temporary)?);
            let written = std::io::copy(&mut reader, &mut output);
            match written {
                Ok(written) => finish_file(output, &temporary, &dst).map(|()| written),
                Err(e) => {
                    drop(output);
                    let _ = std::fs::remove_file(&temporary);
                    Err(e.into())
                }
            }
        })
        .await
    }
}

/// Flushes and syncs a finished temporary file and renames it to `dst`; removes it instead
/// when that fails.
fn finish_file(output: BufWriter<File>, temporary: &Path, dst: &Path) -> Result<()> {
    let done = output
        .into_inner()
        .map_err(|e| Error::Io(e.into_error()))
        .and_then(|file| Ok(file.sync_all()?))
        .and_then(|()| Ok(std::fs::rename(temporary, dst)?));
    if done.is_err() {
        let _ = std::fs::remove_file(temporary);
    }
    done
}

/// Creates a new file readable by its owner only (it may hold plaintext); an existing file
/// of that name is an error (the names are random).
fn create_private(path: &Path) -> Result<File> {
    let mut options = OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    Ok(options.open(path)?)
}

fn temporary_beside(dst: &Path) -> Result<PathBuf> {
    let name = dst
        .file_name()
        .ok_or_else(|| Error::Config(format!("{} names no file", dst.display())))?;
    let mut suffix = [0u8; 8];
    ring::rand::SystemRandom::new()
        .fill(&mut suffix)
        .map_err(|_| Error::Io(std::io::Error::other("the system random source failed")))?;
    let suffix: String = suffix.iter().map(|b| format!("{b:02x}")).collect();
    let mut temporary = name.to_os_string();
    temporary.push(format!(".partial-{suffix}"));
    Ok(dst.with_file_name(temporary))
}

async fn blocking<T: Send + 'static>(
    work: impl FnOnce() -> Result<T> + Send + 'static,
) -> Result<T> {
    tokio::task::spawn_blocking(work)
        .await
        .map_err(|e| Error::Io(std::io::Error::other(format!("file task: {e}"))))?
}

#[cfg(test)]
mod vectors;
