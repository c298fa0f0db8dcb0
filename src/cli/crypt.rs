//! Cryptographic client commands through a running server: `encrypt`, `decrypt`, `rewrap`,
//! `datakey generate|decrypt`, and the batch commands `encrypt-batch`, `decrypt-batch`,
//! `rewrap-batch` that read JSON lines on stdin and print one result line per input line.

use std::io::{BufRead, Read, Write};
use std::process::ExitCode;

use base64::Engine;
use clap::{Args, Subcommand};
use serde::Deserialize;
use serde_json::{Value, json};
use zeroize::Zeroizing;

use super::client::{ClientArgs, runtime};
use super::json;
use crate::error::{Error, Result};
use tenant_kms_client::pb;

/// The flags naming what a value is bound to.
#[derive(Debug, Args)]
pub struct BindingArgs {
    /// Tenant id.
    #[arg(long)]
    tenant: String,
    /// Context, e.g. crm.contacts.email.
    #[arg(long)]
    context: String,
    /// Additional authenticated data (UTF-8), e.g. the row id.
    #[arg(long, default_value = "")]
    aad: String,
}

/// Arguments of `encrypt`.
#[derive(Debug, Args)]
pub struct EncryptArgs {
    #[command(flatten)]
    binding: BindingArgs,
    /// Seal deterministically (AES-256-SIV): equal values give equal ciphertexts, which a
    /// database can compare; reveals equality (docs/SEARCHABLE.md).
    #[arg(long)]
    deterministic: bool,
    /// Also compute this declared blind index of the value (repeatable).
    #[arg(long = "blind-index", value_name = "NAME")]
    blind_indexes: Vec<String>,
    /// Also seal under every other enabled key version (lookups during a rotation).
    #[arg(long)]
    all_versions: bool,
    /// Print the whole answer as one JSON line instead of the base64 ciphertext.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    client: ClientArgs,
}

/// Arguments of `decrypt`.
#[derive(Debug, Args)]
pub struct DecryptArgs {
    #[command(flatten)]
    binding: BindingArgs,
    /// Print the answer as one JSON line (plaintext in base64) instead of the raw plaintext.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    client: ClientArgs,
}

/// Arguments of `rewrap`.
#[derive(Debug, Args)]
pub struct RewrapArgs {
    #[command(flatten)]
    binding: BindingArgs,
    /// Also compute this declared blind index of the value (repeatable).
    #[arg(long = "blind-index", value_name = "NAME")]
    blind_indexes: Vec<String>,
    /// Print the whole answer as one JSON line instead of the base64 ciphertext.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    client: ClientArgs,
}

/// `datakey` subcommands.
#[derive(Debug, Subcommand)]
pub enum DataKeyCommand {
    /// Generate a data key for envelope encryption: prints one JSON line with the plaintext
    /// key and the wrapped key (base64); store the wrapped one beside the data.
    Generate(GenerateArgs),
    /// Unwrap a wrapped data key read (base64) from stdin: prints one JSON line with the
    /// plaintext key (base64).
    Decrypt(DataKeyDecryptArgs),
}

/// Arguments of `datakey generate`.
#[derive(Debug, Args)]
pub struct GenerateArgs {
    /// Tenant id.
    #[arg(long)]
    tenant: String,
    /// Context the key serves, e.g. files.invoices.
    #[arg(long)]
    context: String,
    /// Return the key wrapped only (GenerateDataKeyWithoutPlaintext), for a component that
    /// stores keys for others and never needs one in plaintext.
    #[arg(long)]
    without_plaintext: bool,
    /// With --without-plaintext: additional authenticated data (UTF-8) the wrapped key is
    /// bound to; `datakey decrypt` needs the same --aad.
    #[arg(long, requires = "without_plaintext")]
    aad: Option<String>,
    #[command(flatten)]
    client: ClientArgs,
}

/// Arguments of `datakey decrypt`.
#[derive(Debug, Args)]
pub struct DataKeyDecryptArgs {
    #[command(flatten)]
    binding: BindingArgs,
    #[command(flatten)]
    client: ClientArgs,
}

/// Arguments of the batch commands.
#[derive(Debug, Args)]
pub struct BatchArgs {
    /// Tenant id.
    #[arg(long)]
    tenant: String,
    /// Lines sent per call (at most the server's max_batch_items).
    #[arg(long, default_value_t = 1000, value_parser = clap::value_parser!(u32).range(1..=10_000))]
    chunk: u32,
    #[command(flatten)]
    client: ClientArgs,
}

/// Arguments of `encrypt-batch`.
#[derive(Debug, Args)]
pub struct EncryptBatchArgs {
    #[command(flatten)]
    batch: BatchArgs,
    /// Seal every value deterministically (AES-256-SIV).
    #[arg(long)]
    deterministic: bool,
    /// Also seal every value under every other enabled key version.
    #[arg(long)]
    all_versions: bool,
}

impl EncryptArgs {
    /// The client flags.
    pub fn client(&self) -> &ClientArgs {
        &self.client
    }
}
impl DecryptArgs {
    /// The client flags.
    pub fn client(&self) -> &ClientArgs {
        &self.client
    }
}
impl RewrapArgs {
    /// The client flags.
    pub fn client(&self) -> &ClientArgs {
        &self.client
    }
}
impl DataKeyCommand {
    /// The client flags.
    pub fn client(&self) -> &ClientArgs {
        match self {
            Self::Generate(a) => &a.client,
            Self::Decrypt(a) => &a.client,
        }
    }
}
impl BatchArgs {
    /// The client flags.
    pub fn client(&self) -> &ClientArgs {
        &self.client
    }
}
impl EncryptBatchArgs {
    /// The client flags.
    pub fn client(&self) -> &ClientArgs {
        &self.batch.client
    }
}

fn read_stdin() -> Result<Zeroizing<Vec<u8>>> {
    let mut data = Zeroizing::new(Vec::new());
    std::io::stdin()
        .read_to_end(&mut data)
        .map_err(|e| Error::Internal(format!("cannot read stdin: {e}")))?;
    Ok(data)
}

/// Base64 from stdin (surrounding white space ignored); anything else is a usage error.
fn read_stdin_base64(what: &str) -> Result<Vec<u8>> {
    let text = read_stdin()?;
    let text = std::str::from_utf8(&text).unwrap_or("\u{0}");
    base64::engine::general_purpose::STANDARD
        .decode(text.trim())
        .map_err(|_| Error::InvalidArgument(format!("stdin must hold the {what} in base64")))
}

fn print_base64(bytes: &[u8]) {
    let _ = writeln!(
        std::io::stdout(),
        "{}",
        base64::engine::general_purpose::STANDARD.encode(bytes)
    );
}

/// `encrypt`: plaintext on stdin, base64 ciphertext (or `--json`) on stdout.
pub fn run_encrypt(args: EncryptArgs) -> Result<ExitCode> {
    args.client.check()?;
    let plaintext = read_stdin()?;
    runtime()?.block_on(async move {
        let request = pb::EncryptRequest {
            tenant_id: args.binding.tenant,
            context: args.binding.context,
            plaintext: plaintext.to_vec(),
            aad: args.binding.aad.into_bytes(),
            deterministic: args.deterministic,
            blind_indexes: args.blind_indexes,
            all_enabled_versions: args.all_versions,
        };
        let response = args
            .client
            .call(|c| async move { c.encrypt(request).await })
            .await?;
        if args.json {
            json::print(&json::encrypt_response(&response));
        } else {
            print_base64(&response.ciphertext);
            let _ = writeln!(std::io::stderr(), "key version {}", response.key_version);
        }
        Ok(ExitCode::SUCCESS)
    })
}

/// `decrypt`: base64 ciphertext on stdin, plaintext (or `--json`) on stdout.
pub fn run_decrypt(args: DecryptArgs) -> Result<ExitCode> {
    args.client.check()?;
    let ciphertext = read_stdin_base64("ciphertext")?;
    runtime()?.block_on(async move {
        let request = pb::DecryptRequest {
            tenant_id: args.binding.tenant,
            context: args.binding.context,
            ciphertext,
            aad: args.binding.aad.into_bytes(),
        };
        let response = args
            .client
            .call(|c| async move { c.decrypt(request).await })
            .await?;
        let plaintext = Zeroizing::new(response.plaintext);
        if args.json {
            json::print(&json!({
                "plaintext": json::bytes(&plaintext),
                "key_version": response.key_version,
            }));
            return Ok(ExitCode::SUCCESS);
        }
        std::io::stdout()
            .write_all(&plaintext)
            .and_then(|()| std::io::stdout().flush())
            .map_err(|e| Error::Internal(format!("cannot write stdout: {e}")))?;
        Ok(ExitCode::SUCCESS)
    })
}

/// `rewrap`: base64 ciphertext on stdin, the same value sealed under the primary version on
/// stdout; the plaintext never leaves the server.
pub fn run_rewrap(args: RewrapArgs) -> Result<ExitCode> {
    args.client.check()?;
    let ciphertext = read_stdin_base64("ciphertext")?;
    runtime()?.block_on(async move {
        let request = pb::RewrapRequest {
            tenant_id: args.binding.tenant,
            context: args.binding.context,
            ciphertext,
            aad: args.binding.aad.into_bytes(),
            blind_indexes: args.blind_indexes,
        };
        let response = args
            .client
            .call(|c| async move { c.rewrap(request).await })
            .await?;
        if args.json {
            json::print(&json::rewrap_response(&response));
        } else {
            print_base64(&response.ciphertext);
        }
        Ok(ExitCode::SUCCESS)
    })
}

/// `datakey generate|decrypt`.
pub fn run_datakey(command: DataKeyCommand) -> Result<ExitCode> {
    command.client().check()?;
    let wrapped = match &command {
        DataKeyCommand::Decrypt(_) => read_stdin_base64("wrapped key")?,
        DataKeyCommand::Generate(_) => Vec::new(),
    };
    runtime()?.block_on(async move {
        match command {
            DataKeyCommand::Generate(a) if a.without_plaintext => {
                let request = pb::GenerateDataKeyWithoutPlaintextRequest {
                    tenant_id: a.tenant,
                    context: a.context,
                    aad: a.aad.unwrap_or_default().into_bytes(),
                };
                let r = a
                    .client
                    .call(|c| async move { c.generate_data_key_without_plaintext(request).await })
                    .await?;
                json::print(&json!({
                    "wrapped_key": json::bytes(&r.wrapped_key),
                    "key_version": r.key_version,
                }));
            }
            DataKeyCommand::Generate(a) => {
                let request = pb::GenerateDataKeyRequest {
                    tenant_id: a.tenant,
                    context: a.context,
                };
                let r = a
                    .client
                    .call(|c| async move { c.generate_data_key(request).await })
                    .await?;
                let key = Zeroizing::new(r.plaintext_key);
                json::print(&json!({
                    "plaintext_key": json::bytes(&key),
                    "wrapped_key": json::bytes(&r.wrapped_key),
                    "key_version": r.key_version,
                }));
            }
            DataKeyCommand::Decrypt(a) => {
                let request = pb::DecryptDataKeyRequest {
                    tenant_id: a.binding.tenant,
                    context: a.binding.context,
                    wrapped_key: wrapped,
                    aad: a.binding.aad.into_bytes(),
                };
                let r = a
                    .client
                    .call(|c| async move { c.decrypt_data_key(request).await })
                    .await?;
                let key = Zeroizing::new(r.plaintext_key);
                json::print(&json!({
                    "plaintext_key": json::bytes(&key),
                    "key_version": r.key_version,
                }));
            }
        }
        Ok(ExitCode::SUCCESS)
    })
}

/// Base64 fields of an input line (protobuf JSON `bytes`).
mod b64 {
    use base64::Engine;
    use serde::Deserialize;

    pub fn decode<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        let text = zeroize::Zeroizing::new(String::deserialize(d)?);
        base64::engine::general_purpose::STANDARD
            .decode(text.as_bytes())
            .map_err(|_| serde::de::Error::custom("not base64"))
    }
}

/// An input line of `encrypt-batch`: an `EncryptBatchItem` in protobuf JSON.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct EncryptLine {
    context: String,
    #[serde(default, deserialize_with = "b64::decode")]
    plaintext: Vec<u8>,
    #[serde(default, deserialize_with = "b64::decode")]
    aad: Vec<u8>,
    #[serde(default, alias = "blindIndexes")]
    blind_indexes: Vec<String>,
}

/// An input line of `decrypt-batch` and `rewrap-batch`: a `DecryptBatchItem` or
/// `RewrapBatchItem` in protobuf JSON.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CiphertextLine {
    context: String,
    #[serde(deserialize_with = "b64::decode")]
    ciphertext: Vec<u8>,
    #[serde(default, deserialize_with = "b64::decode")]
    aad: Vec<u8>,
    #[serde(default, alias = "blindIndexes")]
    blind_indexes: Vec<String>,
}

/// `google.rpc.Code` INVALID_ARGUMENT, for an input line that does not parse.
const INVALID_ARGUMENT: i32 = 3;

/// Reads JSON lines from stdin in chunks of `chunk`, sends each chunk's well-formed lines in
/// one call, and prints one result line per input line, in order: the item's result, or an
/// INVALID_ARGUMENT error for a line that does not parse (which is not sent). Returns whether
/// every line succeeded. A refused call ends the run with its error.
async fn run_batch<L: serde::de::DeserializeOwned>(
    chunk: u32,
    mut call: impl AsyncFnMut(Vec<L>) -> Result<Vec<(Value, bool)>>,
) -> Result<bool> {
    let chunk = usize::try_from(chunk).unwrap_or(1000);
    let mut lines = std::io::stdin().lock().lines();
    let mut all_ok = true;
    let mut line_no = 0_u64;
    loop {
        let mut parsed: Vec<std::result::Result<L, String>> = Vec::new();
        for line in lines.by_ref().take(chunk) {
            let line = Zeroizing::new(
                line.map_err(|e| Error::Internal(format!("cannot read stdin: {e}")))?,
            );
            line_no += 1;
            parsed.push(serde_json::from_str::<L>(&line).map_err(|e| {
                format!(
                    "line {line_no}: not a valid item: {}",
                    e.to_string().split(" at line").next().unwrap_or_default()
                )
            }));
        }
        if parsed.is_empty() {
            return Ok(all_ok);
        }
        let mut items = Vec::new();
        let mut shape = Vec::with_capacity(parsed.len());
        for p in parsed {
            match p {
                Ok(item) => {
                    items.push(item);
                    shape.push(None);
                }
                Err(message) => shape.push(Some(message)),
            }
        }
        let mut results = if items.is_empty() {
            Vec::new()
        } else {
            call(items).await?
        }
        .into_iter();
        for bad in shape {
            let (value, ok) = match bad {
                Some(message) => (
                    json!({ "error": { "code": INVALID_ARGUMENT, "message": message } }),
                    false,
                ),
                None => results.next().unwrap_or_else(|| {
                    (
                        json!({ "error": { "code": 13, "message": "the server sent no result" } }),
                        false,
                    )
                }),
            };
            all_ok &= ok;
            json::print(&value);
        }
    }
}

fn exit(all_ok: bool) -> ExitCode {
    if all_ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(super::EXIT_FAILURE)
    }
}

/// `encrypt-batch`.
pub fn run_encrypt_batch(args: EncryptBatchArgs) -> Result<ExitCode> {
    args.client().check()?;
    runtime()?.block_on(async move {
        let keys = args.batch.client.connect().await?;
        let tenant = args.batch.tenant.clone();
        let ok = run_batch(args.batch.chunk, async |lines: Vec<EncryptLine>| {
            let request = pb::EncryptBatchRequest {
                tenant_id: tenant.clone(),
                items: lines
                    .into_iter()
                    .map(|l| pb::EncryptBatchItem {
                        context: l.context,
                        plaintext: l.plaintext,
                        aad: l.aad,
                        blind_indexes: l.blind_indexes,
                    })
                    .collect(),
                deterministic: args.deterministic,
                all_enabled_versions: args.all_versions,
            };
            let answer = super::client::answer(keys.encrypt_batch(request).await)?;
            Ok(answer
                .results
                .iter()
                .map(|r| {
                    use pb::encrypt_batch_result::Result as R;
                    json::result(
                        r.result.as_ref().map(|r| match r {
                            R::Output(o) => Ok(o),
                            R::Error(e) => Err(e),
                        }),
                        json::encrypt_response,
                    )
                })
                .collect::<Vec<_>>())
        })
        .await?;
        Ok(exit(ok))
    })
}

/// `decrypt-batch`.
pub fn run_decrypt_batch(args: BatchArgs) -> Result<ExitCode> {
    args.client().check()?;
    runtime()?.block_on(async move {
        let keys = args.client.connect().await?;
        let tenant = args.tenant.clone();
        let ok = run_batch(args.chunk, async |lines: Vec<CiphertextLine>| {
            let request = pb::DecryptBatchRequest {
                tenant_id: tenant.clone(),
                items: lines
                    .into_iter()
                    .map(|l| pb::DecryptBatchItem {
                        context: l.context,
                        ciphertext: l.ciphertext,
                        aad: l.aad,
                    })
                    .collect(),
            };
            let mut answer = super::client::answer(keys.decrypt_batch(request).await)?;
            let lines: Vec<(Value, bool)> = answer
                .results
                .iter()
                .map(|r| {
                    use pb::decrypt_batch_result::Result as R;
                    json::result(
                        r.result.as_ref().map(|r| match r {
                            R::Output(o) => Ok(o),
                            R::Error(e) => Err(e),
                        }),
                        |o: &pb::DecryptResponse| {
                            json!({
                                "plaintext": json::bytes(&o.plaintext),
                                "key_version": o.key_version,
                            })
                        },
                    )
                })
                .collect();
            // The plaintexts live on in the printed lines only: wipe the answer's copies.
            for r in &mut answer.results {
                if let Some(pb::decrypt_batch_result::Result::Output(o)) = &mut r.result {
                    zeroize::Zeroize::zeroize(&mut o.plaintext);
                }
            }
            Ok(lines)
        })
        .await?;
        Ok(exit(ok))
    })
}

/// `rewrap-batch`.
pub fn run_rewrap_batch(args: BatchArgs) -> Result<ExitCode> {
    args.client().check()?;
    runtime()?.block_on(async move {
        let keys = args.client.connect().await?;
        let tenant = args.tenant.clone();
        let ok = run_batch(args.chunk, async |lines: Vec<CiphertextLine>| {
            let request = pb::RewrapBatchRequest {
                tenant_id: tenant.clone(),
                items: lines
                    .into_iter()
                    .map(|l| pb::RewrapBatchItem {
                        context: l.context,
                        ciphertext: l.ciphertext,
                        aad: l.aad,
                        blind_indexes: l.blind_indexes,
                    })
                    .collect(),
            };
            let answer = super::client::answer(keys.rewrap_batch(request).await)?;
            Ok(answer
                .results
                .iter()
                .map(|r| {
                    use pb::rewrap_batch_result::Result as R;
                    json::result(
                        r.result.as_ref().map(|r| match r {
                            R::Output(o) => Ok(o),
                            R::Error(e) => Err(e),
                        }),
                        json::rewrap_response,
                    )
                })
                .collect::<Vec<_>>())
        })
        .await?;
        Ok(exit(ok))
    })
}
