//! Sealed master keyrings: the keyring file encrypted under a root of trust (docs/FORMAT.md,
//! "Sealed master keyring"; docs/OPERATIONS.md, "Root of trust").
//!
//! A sealed file is a header and a body. The body is the plain keyring text, encrypted with
//! AES-256-GCM (ring) under a key derived from a 256-bit **file key**, with the header bytes
//! as AAD. The file key comes from the root: Argon2id of a passphrase, or a random key sealed
//! by an AES-256 key inside a PKCS#11 token. Only the keyring file changes: the key hierarchy,
//! the derivations and the wire format are the same whether or not the keyring is sealed.
//!
//! The unsealed text exists only in zeroizing buffers (in a process whose memory `serve`
//! locks first, `hardening.rs`), never in a file. A [`RootKey`] keeps the file key it opened,
//! so reloading the keyring (a `rotate --master` seen while serving) and re-sealing it with a
//! new version never go back to the token or Argon2id: nothing on the data plane reaches the
//! HSM.

pub mod header;
pub mod passphrase;
pub mod pkcs11;

use std::io::{BufRead, Write};
use std::path::PathBuf;
use std::sync::Mutex;

use base64::Engine;
use base64::engine::general_purpose::STANDARD as BASE64;
use zeroize::Zeroizing;

use self::header::{CHECK_LEN, Header, RootParams};
use crate::crypto::aead::{AeadKey, random_nonce};
use crate::crypto::envelope::constant_time_eq;
use crate::crypto::kdf::derive_key;
use crate::crypto::labels;
use crate::crypto::secret::SecretKey;
use crate::error::{Error, Result};
use crate::fsutil;

/// Where a secret (PIN, passphrase) is read from. Never a command-line value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SecretSource {
    /// A file (mode 0600 or stricter, e.g. a systemd credential); one trailing newline is
    /// dropped.
    File(PathBuf),
    /// An environment variable.
    Env(String),
    /// The controlling terminal (`/dev/tty`), echo off.
    Terminal,
}

impl SecretSource {
    /// Reads the secret into a zeroizing string; `what` names it in errors and the prompt.
    pub fn read(&self, what: &str) -> Result<Zeroizing<String>> {
        let mut text = match self {
            Self::File(path) => {
                fsutil::check_private(path)?;
                Zeroizing::new(std::fs::read_to_string(path).map_err(|e| {
                    Error::FailedPrecondition(format!(
                        "cannot read {what} from {}: {e}",
                        path.display()
                    ))
                })?)
            }
            Self::Env(var) => Zeroizing::new(std::env::var(var).map_err(|_| {
                Error::FailedPrecondition(format!("{what}: environment variable {var} is not set"))
            })?),
            Self::Terminal => read_from_terminal(what)?,
        };
        if text.ends_with('\n') {
            text.pop();
            if text.ends_with('\r') {
                text.pop();
            }
        }
        if text.is_empty() {
            return Err(Error::FailedPrecondition(format!("{what} is empty")));
        }
        Ok(text)
    }
}

/// Prompts on `/dev/tty` with echo off (restored afterwards, also on error).
fn read_from_terminal(what: &str) -> Result<Zeroizing<String>> {
    let tty = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/tty")
        .map_err(|e| {
            Error::FailedPrecondition(format!(
                "{what}: no terminal to ask on ({e}); use a file or an environment variable"
            ))
        })?;
    // Refused rather than read with the secret shown on screen.
    let echo = terminal::echo_off(&tty).ok_or_else(|| {
        Error::FailedPrecondition(format!(
            "{what}: cannot turn terminal echo off; use a file or an environment variable"
        ))
    })?;
    let mut out = &tty;
    let _ = write!(out, "{what}: ");
    let _ = out.flush();
    let mut line = Zeroizing::new(String::new());
    let read = std::io::BufReader::new(&tty).read_line(&mut line);
    let _ = writeln!(out);
    terminal::restore(&tty, &echo);
    read.map_err(|e| Error::FailedPrecondition(format!("{what}: cannot read the terminal: {e}")))?;
    Ok(line)
}

#[cfg(target_os = "linux")]
mod terminal {
    use rustix::termios::{LocalModes, OptionalActions, Termios, tcgetattr, tcsetattr};

    /// Turns echo off; returns the settings to restore.
    pub fn echo_off(tty: &std::fs::File) -> Option<Termios> {
        let saved = tcgetattr(tty).ok()?;
        let mut quiet = saved.clone();
        quiet.local_modes.remove(LocalModes::ECHO);
        tcsetattr(tty, OptionalActions::Now, &quiet).ok()?;
        Some(saved)
    }

    pub fn restore(tty: &std::fs::File, saved: &Termios) {
        let _ = tcsetattr(tty, OptionalActions::Now, saved);
    }
}

#[cfg(not(target_os = "linux"))]
mod terminal {
    /// Echo is not turned off on this OS: the caller refuses.
    pub fn echo_off(_: &std::fs::File) -> Option<()> {
        None
    }
    pub fn restore(_: &std::fs::File, _: &()) {}
}

/// The root of trust a keyring is (or is to be) sealed under. Holds no secret, only where
/// to find it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RootKeyConfig {
    /// An AES-256 key in a PKCS#11 token.
    Pkcs11(pkcs11::Pkcs11Config),
    /// A passphrase through Argon2id; the costs apply to new sealings (unsealing reads them
    /// from the header).
    Passphrase {
        /// Where the passphrase comes from.
        source: SecretSource,
        /// Argon2id memory in KiB for new sealings.
        m_kib: u32,
        /// Argon2id passes for new sealings.
        t: u32,
        /// Argon2id lanes for new sealings.
        p: u32,
    },
}

impl RootKeyConfig {
    /// The method name as on the command line (`pkcs11`, `passphrase`).
    pub fn method(&self) -> &'static str {
        match self {
            Self::Pkcs11(_) => "pkcs11",
            Self::Passphrase { .. } => "passphrase",
        }
    }
}

/// A root of trust and the file key it last opened (so the token or Argon2id is asked once
/// per process, see the module docs).
pub struct RootKey {
    config: RootKeyConfig,
    /// The `key_lines` of the header whose file key is cached, and that key.
    opened: Mutex<Option<(String, SecretKey)>>,
}

impl std::fmt::Debug for RootKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RootKey")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

/// The body key and the check value, both derived from the file key (HKDF-SHA256, labels in
/// `crypto::labels`), so the check value reveals nothing usable about the body key.
fn body_key_and_check(file_key: &SecretKey) -> Result<(AeadKey, [u8; CHECK_LEN])> {
    let crypto = |_| Error::internal("sealed keyring key derivation failed");
    let body = derive_key(file_key, labels::SEALED_KEYRING_BODY).map_err(crypto)?;
    let check_key = derive_key(file_key, labels::SEALED_KEYRING_CHECK).map_err(crypto)?;
    let mut check = [0u8; CHECK_LEN];
    check.copy_from_slice(&check_key.expose_secret()[..CHECK_LEN]);
    Ok((AeadKey::new(&body).map_err(crypto)?, check))
}

/// Encrypts `plaintext` under `file_key` and returns the whole sealed file.
fn seal_body(file_key: &SecretKey, root: RootParams, plaintext: &[u8]) -> Result<String> {
    let (key, check) = body_key_and_check(file_key)?;
    let header = Header {
        root,
        check,
        nonce: random_nonce(),
    };
    let aad = header.encode();
    // Encrypted in place, with room for the tag so no reallocation leaves a plaintext copy:
    // after the call the buffer holds only ciphertext.
    let mut buffer = Vec::with_capacity(plaintext.len() + crate::crypto::aead::TAG_LEN);
    buffer.extend_from_slice(plaintext);
    key.seal_in_place(&header.nonce, aad.as_bytes(), &mut buffer)
        .map_err(|_| Error::internal("sealed keyring encryption failed"))?;
    Ok(format!("{aad}{}\n", BASE64.encode(&buffer)))
}

/// Why an opened file key did not open the body.
enum OpenFailure {
    /// The check value differs: not the key the file was sealed with.
    WrongKey,
    /// The key is right but the body (or header) does not authenticate.
    Altered,
}

fn open_body(
    file_key: &SecretKey,
    header: &Header,
    raw_header: &str,
    body: &str,
) -> std::result::Result<Zeroizing<Vec<u8>>, OpenFailure> {
    let (key, check) = body_key_and_check(file_key).map_err(|_| OpenFailure::Altered)?;
    if !constant_time_eq(&check, &header.check) {
        return Err(OpenFailure::WrongKey);
    }
    let mut buffer = Zeroizing::new(
        BASE64
            .decode(body.trim_end())
            .map_err(|_| OpenFailure::Altered)?,
    );
    let len = key
        .open_in_place(&header.nonce, raw_header.as_bytes(), &mut buffer)
        .map_err(|_| OpenFailure::Altered)?
        .len();
    buffer.truncate(len);
    Ok(buffer)
}

fn altered() -> Error {
    Error::FailedPrecondition(
        "sealed keyring: the file was altered or damaged (the body does not authenticate under \
         its header); restore it from a backup"
            .into(),
    )
}

impl RootKey {
    /// A root with nothing opened yet.
    pub fn new(config: RootKeyConfig) -> Self {
        Self {
            config,
            opened: Mutex::new(None),
        }
    }

    /// Where the root key is.
    pub fn config(&self) -> &RootKeyConfig {
        &self.config
    }

    fn remember(&self, key_lines: String, file_key: SecretKey) {
        *self.opened.lock().unwrap_or_else(|p| p.into_inner()) = Some((key_lines, file_key));
    }

    /// Seals keyring text under a new file key (fresh salt, or a fresh random key sealed by
    /// the token): the first sealing, or a re-sealing under another root.
    pub fn seal_new(&self, plaintext: &[u8]) -> Result<String> {
        let (root, file_key) = match &self.config {
            RootKeyConfig::Passphrase {
                source,
                m_kib,
                t,
                p,
            } => {
                let params = passphrase::new_params(*m_kib, *t, *p)?;
                let secret = source.read("new passphrase")?;
                // Typed by hand: a typo here would seal the keyring under an unknown
                // passphrase, so it is asked twice.
                if *source == SecretSource::Terminal
                    && *source.read("new passphrase (again)")? != *secret
                {
                    return Err(Error::InvalidArgument(
                        "the two passphrases differ; nothing was sealed".into(),
                    ));
                }
                let key = passphrase::derive(secret.as_bytes(), &params)?;
                (RootParams::Passphrase(params), key)
            }
            RootKeyConfig::Pkcs11(config) => {
                let key = SecretKey::generate().map_err(|_| Error::internal("CSPRNG failed"))?;
                let seal = pkcs11::seal_file_key(config, &key)?;
                (RootParams::Pkcs11(seal), key)
            }
        };
        let sealed = seal_body(&file_key, root.clone(), plaintext)?;
        self.remember(root.key_lines(), file_key);
        Ok(sealed)
    }

    /// Seals new keyring text under the file key of `previous` (the same sealed file, before
    /// a change such as `rotate --master`), opening it first if not yet opened.
    pub fn reseal(&self, previous: &str, plaintext: &[u8]) -> Result<String> {
        let (header, _, _) = header::parse(previous)?;
        self.unseal(previous)?;
        let opened = self.opened.lock().unwrap_or_else(|p| p.into_inner());
        match opened.as_ref() {
            Some((lines, key)) if *lines == header.root.key_lines() => {
                seal_body(key, header.root, plaintext)
            }
            _ => Err(Error::internal("sealed keyring file key not opened")),
        }
    }

    /// Opens a sealed file and returns the keyring text. Errors say which step failed.
    pub fn unseal(&self, file: &str) -> Result<Zeroizing<Vec<u8>>> {
        let (header, raw, body) = header::parse(file)?;
        if header.root.method() != self.config.method() {
            return Err(Error::FailedPrecondition(format!(
                "the keyring is sealed with {}, not {}: start with --seal {}",
                header.root.method(),
                self.config.method(),
                header.root.method()
            )));
        }
        let key_lines = header.root.key_lines();
        {
            let opened = self.opened.lock().unwrap_or_else(|p| p.into_inner());
            if let Some((lines, key)) = opened.as_ref()
                && *lines == key_lines
            {
                return open_body(key, &header, raw, body).map_err(|_| altered());
            }
        }
        let file_key = match (&self.config, &header.root) {
            (RootKeyConfig::Passphrase { source, .. }, RootParams::Passphrase(params)) => {
                let secret = source.read("passphrase")?;
                passphrase::derive(secret.as_bytes(), params)?
            }
            (RootKeyConfig::Pkcs11(config), RootParams::Pkcs11(seal)) => {
                pkcs11::unseal_file_key(config, seal)?
            }
            _ => return Err(Error::internal("sealing method mismatch")),
        };
        let text =
            open_body(&file_key, &header, raw, body).map_err(|e| match (e, &header.root) {
                (OpenFailure::WrongKey, RootParams::Passphrase(_)) => Error::FailedPrecondition(
                    "wrong passphrase for the sealed keyring (or its Argon2id parameters or salt \
                 were altered)"
                        .into(),
                ),
                (OpenFailure::WrongKey, RootParams::Pkcs11(_)) => Error::FailedPrecondition(
                    "the token returned a file key that does not match the keyring's check value: \
                 the header was altered"
                        .into(),
                ),
                (OpenFailure::Altered, _) => altered(),
            })?;
        self.remember(key_lines, file_key);
        Ok(text)
    }
}

/// True if the file at `path` starts like a sealed keyring (reads only its first line).
pub fn is_sealed_file(path: &std::path::Path) -> bool {
    let mut start = [0u8; header::MAGIC.len()];
    std::fs::File::open(path)
        .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut start))
        .is_ok_and(|()| header::is_sealed(&start))
}

/// What `keyring status` shows of a sealed file, without opening it.
pub fn describe(file: &str) -> Result<String> {
    let (header, _, _) = header::parse(file)?;
    Ok(match &header.root {
        RootParams::Passphrase(a) => format!(
            "sealed: passphrase (Argon2id m={} KiB, t={}, p={})",
            a.m_kib, a.t, a.p
        ),
        RootParams::Pkcs11(s) => format!(
            "sealed: pkcs11 (token '{}', key '{}', mechanism {})",
            s.token,
            s.key,
            s.mechanism.name()
        ),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn passphrase_root(dir: &std::path::Path, pass: &str) -> RootKey {
        let path = dir.join(format!("pass-{}", pass.len()));
        let _ = std::fs::remove_file(&path);
        fsutil::write_private_file(&path, format!("{pass}\n").as_bytes()).unwrap();
        RootKey::new(RootKeyConfig::Passphrase {
            source: SecretSource::File(path),
            m_kib: 64,
            t: 1,
            p: 1,
        })
    }

    #[test]
    fn passphrase_seal_round_trip_wrong_pass_and_tamper() {
        let dir = tempfile::tempdir().unwrap();
        let text = b"1 aabb\n";
        let sealed = passphrase_root(dir.path(), "right horse")
            .seal_new(text)
            .unwrap();
        assert!(!sealed.contains("aabb"));
        let fresh = passphrase_root(dir.path(), "right horse");
        assert_eq!(&fresh.unseal(&sealed).unwrap()[..], text);
        let wrong = passphrase_root(dir.path(), "wrong horse!");
        let err = wrong.unseal(&sealed).err().unwrap().to_string();
        assert!(err.contains("wrong passphrase"), "{err}");
        // A flipped body byte: right key, altered file.
        let (_, raw, body) = header::parse(&sealed).unwrap();
        let mut bytes = BASE64.decode(body.trim_end()).unwrap();
        bytes[0] ^= 1;
        let tampered = format!("{raw}{}\n", BASE64.encode(&bytes));
        let err = fresh.unseal(&tampered).err().unwrap().to_string();
        assert!(err.contains("altered"), "{err}");
        // Re-sealing keeps the file key and changes the nonce.
        let again = fresh.reseal(&sealed, b"1 aabb\n2 ccdd\n").unwrap();
        assert_ne!(
            header::parse(&again).unwrap().0.nonce,
            header::parse(&sealed).unwrap().0.nonce
        );
        let reopened = passphrase_root(dir.path(), "right horse");
        assert_eq!(&reopened.unseal(&again).unwrap()[..], b"1 aabb\n2 ccdd\n");
    }
}
