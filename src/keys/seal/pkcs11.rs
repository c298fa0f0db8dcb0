//! The PKCS#11 root: an AES-256 key generated inside a token (sensitive, non-extractable)
//! seals the keyring's file key. The token does the sealing: CKM_AES_GCM with the header's
//! binding lines as AAD where the module offers it, else CKM_AES_KEY_WRAP_PAD (RFC 5649).
//! Only start-up and the `keyring` commands talk to the token; the data plane never does.
//!
//! The module is loaded by the `cryptoki` crate (libloading); this crate stays free of
//! `unsafe`.

use std::path::PathBuf;

use cryptoki::context::{CInitializeArgs, CInitializeFlags, Pkcs11};
use cryptoki::error::{Error as CkError, RvError};
use cryptoki::mechanism::aead::GcmParams;
use cryptoki::mechanism::{Mechanism, MechanismType};
use cryptoki::object::{Attribute, AttributeType, KeyType, ObjectClass, ObjectHandle};
use cryptoki::session::{Session, UserType};
use cryptoki::slot::Slot;
use cryptoki::types::AuthPin;
use zeroize::{Zeroize, Zeroizing};

use super::SecretSource;
use super::header::{RootParams, TokenMechanism, TokenSeal, check_label};
use crate::crypto::aead::NONCE_LEN;
use crate::crypto::secret::{KEY_LEN, SecretKey};
use crate::error::{Error, Result};

/// Where the root key is and how to log in. No PIN is held here, only where to read it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pkcs11Config {
    /// Path of the vendor's PKCS#11 module (a shared library).
    pub module: Option<PathBuf>,
    /// Token label; when unsealing, the label in the header is used if this is unset.
    pub token: Option<String>,
    /// Slot number, instead of a token label.
    pub slot: Option<u64>,
    /// Label (CKA_LABEL) of the root key; when unsealing, the header's if unset.
    pub key: Option<String>,
    /// Where the user PIN comes from (a file or an environment variable).
    pub pin: Option<SecretSource>,
    /// The sealing mechanism; `None` picks AES-GCM when the token offers it.
    pub mechanism: Option<TokenMechanism>,
}

fn fail(text: String) -> Error {
    Error::FailedPrecondition(text)
}

/// A logged-in session on the token that holds the root key.
struct Token {
    // Dropped before `ctx` is finalized.
    session: Option<Session>,
    ctx: Pkcs11,
    slot: Slot,
    label: String,
}

impl Drop for Token {
    fn drop(&mut self) {
        drop(self.session.take());
        let _ = self.ctx.clone().finalize();
    }
}

impl Token {
    fn session(&self) -> Result<&Session> {
        self.session
            .as_ref()
            .ok_or_else(|| Error::internal("PKCS#11 session closed"))
    }

    /// Loads the module, finds the token (by slot, else label, else `header_token`), opens a
    /// session and logs in as the user.
    fn open(config: &Pkcs11Config, header_token: Option<&str>, read_write: bool) -> Result<Self> {
        let module = config.module.as_ref().ok_or_else(|| {
            Error::InvalidArgument("--seal pkcs11 needs --pkcs11-module (the module path)".into())
        })?;
        let ctx = Pkcs11::new(module).map_err(|e| {
            fail(format!(
                "cannot load the PKCS#11 module {}: {e} (is the HSM client installed, and the \
                 path right?)",
                module.display()
            ))
        })?;
        ctx.initialize(CInitializeArgs::new(CInitializeFlags::OS_LOCKING_OK))
            .map_err(|e| {
                fail(format!(
                    "the PKCS#11 module {} failed to initialize: {e}",
                    module.display()
                ))
            })?;
        let mut token = Self {
            session: None,
            ctx,
            slot: Slot::try_from(0u64).map_err(|_| Error::internal("slot 0"))?,
            label: String::new(),
        };
        let slots = token
            .ctx
            .get_slots_with_token()
            .map_err(|e| fail(format!("the PKCS#11 module lists no slots: {e}")))?;
        let mut labels = Vec::new();
        let wanted = config.token.as_deref().or(header_token);
        let mut found = None;
        for slot in slots {
            let label = token
                .ctx
                .get_token_info(slot)
                .map(|info| info.label().trim_end().to_owned())
                .unwrap_or_default();
            let hit = match config.slot {
                Some(n) => slot.id() == n,
                None => wanted == Some(label.as_str()),
            };
            if hit {
                found = Some((slot, label));
                break;
            }
            labels.push(label);
        }
        let Some((slot, label)) = found else {
            return Err(fail(match config.slot {
                Some(n) => format!("the PKCS#11 module has no token in slot {n}"),
                None => match wanted {
                    Some(w) => format!(
                        "the PKCS#11 module has no token labelled '{w}' (tokens present: {labels:?})"
                    ),
                    None => "--seal pkcs11 needs --pkcs11-token or --pkcs11-slot".into(),
                },
            }));
        };
        token.slot = slot;
        token.label = label;
        let session = if read_write {
            token.ctx.open_rw_session(slot)
        } else {
            token.ctx.open_ro_session(slot)
        }
        .map_err(|e| {
            fail(format!(
                "cannot open a session on token '{}': {e}",
                token.label
            ))
        })?;
        let pin_source = config.pin.as_ref().ok_or_else(|| {
            Error::InvalidArgument(
                "--seal pkcs11 needs the user PIN: --pkcs11-pin-file or --pkcs11-pin-env".into(),
            )
        })?;
        let pin = pin_source.read("the PKCS#11 user PIN")?;
        let pin = AuthPin::from(String::from(pin.as_str()));
        session
            .login(UserType::User, Some(&pin))
            .map_err(|e| match e {
                CkError::Pkcs11(RvError::PinIncorrect, _) => fail(format!(
                    "wrong PIN for token '{}' (CKR_PIN_INCORRECT)",
                    token.label
                )),
                CkError::Pkcs11(RvError::PinLocked, _) => fail(format!(
                    "the user PIN of token '{}' is locked (CKR_PIN_LOCKED): too many wrong PINs",
                    token.label
                )),
                other => fail(format!("cannot log in to token '{}': {other}", token.label)),
            })?;
        token.session = Some(session);
        Ok(token)
    }

    /// Every object with this label, of any class (a private key under the root key's label
    /// is reported as a key of the wrong type, not as a missing key).
    fn keys_labelled(&self, label: &str) -> Result<Vec<ObjectHandle>> {
        self.session()?
            .find_objects(&[Attribute::Label(label.as_bytes().to_vec())])
            .map_err(|e| fail(format!("cannot search token '{}': {e}", self.label)))
    }

    /// The root key: exactly one secret key with this label, AES-256, sensitive and not
    /// extractable.
    fn root_key(&self, label: &str) -> Result<ObjectHandle> {
        let handles = self.keys_labelled(label)?;
        if handles.is_empty() {
            return Err(fail(format!(
                "token '{}' holds no key labelled '{label}' (deleted, or never created: \
                 tenant-kms keyring init-hsm-key)",
                self.label
            )));
        }
        let session = self.session()?;
        let secret_keys: Vec<ObjectHandle> = handles
            .iter()
            .copied()
            .filter(|h| {
                session
                    .get_attributes(*h, &[AttributeType::Class])
                    .is_ok_and(|a| a.contains(&Attribute::Class(ObjectClass::SECRET_KEY)))
            })
            .collect();
        let handle = match secret_keys.as_slice() {
            [one] => *one,
            [] => {
                return Err(fail(format!(
                    "key '{label}' in token '{}' is of the wrong type: a root key must be an \
                     AES-256 secret key, sensitive and not extractable (found {} object(s) \
                     labelled '{label}', none a secret key: a key pair?)",
                    self.label,
                    handles.len()
                )));
            }
            _ => {
                return Err(fail(format!(
                    "token '{}' holds {} secret keys labelled '{label}'; the label must name \
                     one key",
                    self.label,
                    secret_keys.len()
                )));
            }
        };
        let attributes = self
            .session()?
            .get_attributes(
                handle,
                &[
                    AttributeType::Class,
                    AttributeType::KeyType,
                    AttributeType::ValueLen,
                    AttributeType::Sensitive,
                    AttributeType::Extractable,
                ],
            )
            .map_err(|e| fail(format!("cannot read the attributes of key '{label}': {e}")))?;
        let (mut secret, mut aes, mut len) = (false, false, 0u64);
        let (mut sensitive, mut extractable) = (false, true);
        for attribute in attributes {
            match attribute {
                Attribute::Class(c) => secret = c == ObjectClass::SECRET_KEY,
                Attribute::KeyType(t) => aes = t == KeyType::AES,
                Attribute::ValueLen(l) => len = l.into(),
                Attribute::Sensitive(s) => sensitive = s,
                Attribute::Extractable(x) => extractable = x,
                _ => {}
            }
        }
        if !secret || !aes || len != KEY_LEN as u64 || !sensitive || extractable {
            return Err(fail(format!(
                "key '{label}' in token '{}' is of the wrong type: a root key must be an AES-256 \
                 secret key, sensitive and not extractable (found: secret key {secret}, AES \
                 {aes}, {len} bytes, sensitive {sensitive}, extractable {extractable})",
                self.label
            )));
        }
        Ok(handle)
    }

    /// AES-GCM if the token can encrypt and decrypt with it, else AES key wrap with padding.
    fn detect_mechanism(&self) -> Result<TokenMechanism> {
        let offers = |kind: MechanismType, wrap: bool| {
            self.ctx
                .get_mechanism_info(self.slot, kind)
                .map(|info| {
                    if wrap {
                        info.wrap() && info.unwrap()
                    } else {
                        info.encrypt() && info.decrypt()
                    }
                })
                .unwrap_or(false)
        };
        if offers(MechanismType::AES_GCM, false) {
            Ok(TokenMechanism::AesGcm)
        } else if offers(MechanismType::AES_KEY_WRAP_PAD, true) {
            Ok(TokenMechanism::AesKeyWrapPad)
        } else {
            Err(fail(format!(
                "token '{}' offers neither CKM_AES_GCM nor CKM_AES_KEY_WRAP_PAD",
                self.label
            )))
        }
    }
}

fn required<'a>(value: &'a Option<String>, flag: &str) -> Result<&'a str> {
    value
        .as_deref()
        .ok_or_else(|| Error::InvalidArgument(format!("--seal pkcs11 needs {flag}")))
}

/// Generates the root key in the token: AES-256, on the token, private, sensitive, never
/// extractable, allowed to encrypt/decrypt and wrap/unwrap. Refuses if the label is taken.
/// Returns the token's label.
pub fn generate_root_key(config: &Pkcs11Config) -> Result<String> {
    let label = required(&config.key, "--pkcs11-key (the root key's label)")?;
    check_label("--pkcs11-key", label)?;
    let token = Token::open(config, None, true)?;
    if !token.keys_labelled(label)?.is_empty() {
        return Err(fail(format!(
            "token '{}' already holds a key labelled '{label}'; choose another label",
            token.label
        )));
    }
    token
        .session()?
        .generate_key(
            &Mechanism::AesKeyGen,
            &[
                Attribute::Class(ObjectClass::SECRET_KEY),
                Attribute::KeyType(KeyType::AES),
                Attribute::ValueLen((KEY_LEN as u64).into()),
                Attribute::Token(true),
                Attribute::Private(true),
                Attribute::Sensitive(true),
                Attribute::Extractable(false),
                Attribute::Encrypt(true),
                Attribute::Decrypt(true),
                Attribute::Wrap(true),
                Attribute::Unwrap(true),
                Attribute::Label(label.as_bytes().to_vec()),
            ],
        )
        .map_err(|e| {
            fail(format!(
                "token '{}' could not generate the AES-256 key '{label}': {e}",
                token.label
            ))
        })?;
    Ok(token.label.clone())
}

/// Template of the short-lived session object that carries the file key through C_WrapKey /
/// C_UnwrapKey (AES key wrap path only): never on the token, readable so we can take it back.
fn file_key_template() -> Vec<Attribute> {
    vec![
        Attribute::Class(ObjectClass::SECRET_KEY),
        Attribute::KeyType(KeyType::GENERIC_SECRET),
        Attribute::Token(false),
        Attribute::Sensitive(false),
        Attribute::Extractable(true),
    ]
}

/// Seals `file_key` with the root key; the returned seal names the token, key and mechanism.
pub fn seal_file_key(config: &Pkcs11Config, file_key: &SecretKey) -> Result<TokenSeal> {
    let label = required(&config.key, "--pkcs11-key (the root key's label)")?.to_owned();
    check_label("--pkcs11-key", &label)?;
    let token = Token::open(config, None, false)?;
    check_label("the token label", &token.label)?;
    let root = token.root_key(&label)?;
    let mechanism = match config.mechanism {
        Some(m) => m,
        None => token.detect_mechanism()?,
    };
    let mut seal = TokenSeal {
        mechanism,
        token: token.label.clone(),
        key: label,
        iv: None,
        sealed_key: Vec::new(),
    };
    let session = token.session()?;
    let refused = |e: CkError| {
        fail(format!(
            "token '{}' refused to seal with {}: {e}",
            token.label,
            mechanism.name()
        ))
    };
    match mechanism {
        TokenMechanism::AesGcm => {
            let binding = RootParams::Pkcs11(seal.clone()).binding();
            let mut iv = crate::crypto::aead::random_nonce();
            let params =
                GcmParams::new(&mut iv, binding.as_bytes(), 128u64.into()).map_err(refused)?;
            seal.sealed_key = session
                .encrypt(&Mechanism::AesGcm(params), root, file_key.expose_secret())
                .map_err(refused)?;
            // Read after the call: a token that makes its own IV writes it back here.
            seal.iv = Some(iv);
        }
        TokenMechanism::AesKeyWrapPad => {
            let mut template = file_key_template();
            template.push(Attribute::Value(file_key.expose_secret().to_vec()));
            let object = session.create_object(&template).map_err(refused);
            for attribute in &mut template {
                if let Attribute::Value(v) = attribute {
                    v.zeroize();
                }
            }
            let object = object?;
            let wrapped = session.wrap_key(&Mechanism::AesKeyWrapPad, root, object);
            let _ = session.destroy_object(object);
            seal.sealed_key = wrapped.map_err(refused)?;
        }
    }
    Ok(seal)
}

/// Opens the file key sealed in `seal` (a header's), with the token and key the header names
/// unless the configuration names others.
pub fn unseal_file_key(config: &Pkcs11Config, seal: &TokenSeal) -> Result<SecretKey> {
    let label = config.key.clone().unwrap_or_else(|| seal.key.clone());
    let token = Token::open(config, Some(&seal.token), false)?;
    let root = token.root_key(&label)?;
    let session = token.session()?;
    let not_this_key = |e: CkError| {
        fail(format!(
            "the key '{label}' in token '{}' does not unseal this keyring: it is not the key \
             that sealed it (a different token or a regenerated key), or the keyring's \
             header was altered ({e})",
            token.label
        ))
    };
    let bytes: Zeroizing<Vec<u8>> = match seal.mechanism {
        TokenMechanism::AesGcm => {
            let mut iv: [u8; NONCE_LEN] = seal
                .iv
                .ok_or_else(|| fail("sealed keyring: aes-gcm without an iv".into()))?;
            let binding = RootParams::Pkcs11(seal.clone()).binding();
            let params =
                GcmParams::new(&mut iv, binding.as_bytes(), 128u64.into()).map_err(not_this_key)?;
            Zeroizing::new(
                session
                    .decrypt(&Mechanism::AesGcm(params), root, &seal.sealed_key)
                    .map_err(not_this_key)?,
            )
        }
        TokenMechanism::AesKeyWrapPad => {
            let object = session
                .unwrap_key(
                    &Mechanism::AesKeyWrapPad,
                    root,
                    &seal.sealed_key,
                    &file_key_template(),
                )
                .map_err(not_this_key)?;
            let value = session.get_attributes(object, &[AttributeType::Value]);
            let _ = session.destroy_object(object);
            let mut out = Zeroizing::new(Vec::new());
            for attribute in value.map_err(not_this_key)? {
                if let Attribute::Value(mut v) = attribute {
                    out.extend_from_slice(&v);
                    v.zeroize();
                }
            }
            out
        }
    };
    SecretKey::from_slice(&bytes).map_err(|_| {
        fail(format!(
            "token '{}' returned a file key of {} bytes, not {KEY_LEN}",
            token.label,
            bytes.len()
        ))
    })
}
