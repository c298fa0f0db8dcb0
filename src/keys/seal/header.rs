//! The header of a sealed keyring file (docs/FORMAT.md, "Sealed master keyring").
//!
//! A sealed file is text: `name: value` header lines in a fixed order, an `end` line, then the
//! base64 body. The header bytes, exactly as stored, are the AAD of the body, and parsing is
//! canonical (the parsed header must serialize back to the same bytes), so a changed, added,
//! dropped or reordered header line makes the body fail to open.

use crate::crypto::aead::NONCE_LEN;
use crate::error::{Error, Result};

/// First line of every sealed keyring file.
pub const MAGIC: &str = "tenant-kms sealed keyring v1";
/// Length of the check value (bytes).
pub const CHECK_LEN: usize = 16;
/// Length of the Argon2id salt (bytes).
pub const SALT_LEN: usize = 16;

/// Argon2id parameters (RFC 9106) as stored in the header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Argon2Params {
    /// Memory in KiB (`m`).
    pub m_kib: u32,
    /// Passes (`t`).
    pub t: u32,
    /// Lanes (`p`).
    pub p: u32,
    /// Random salt, [`SALT_LEN`] bytes.
    pub salt: Vec<u8>,
}

/// How a PKCS#11 token sealed the file key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TokenMechanism {
    /// CKM_AES_GCM with the header's binding lines as AAD.
    AesGcm,
    /// CKM_AES_KEY_WRAP_PAD (RFC 5649).
    AesKeyWrapPad,
}

impl TokenMechanism {
    /// The name used in the header and on the command line.
    pub fn name(self) -> &'static str {
        match self {
            Self::AesGcm => "aes-gcm",
            Self::AesKeyWrapPad => "aes-key-wrap-pad",
        }
    }

    fn parse(text: &str) -> Option<Self> {
        match text {
            "aes-gcm" => Some(Self::AesGcm),
            "aes-key-wrap-pad" => Some(Self::AesKeyWrapPad),
            _ => None,
        }
    }
}

/// The file key as sealed by a PKCS#11 token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenSeal {
    /// The mechanism the token used.
    pub mechanism: TokenMechanism,
    /// Label of the token that sealed the file key.
    pub token: String,
    /// Label (CKA_LABEL) of the root key in that token.
    pub key: String,
    /// The GCM IV (AES-GCM only).
    pub iv: Option<[u8; NONCE_LEN]>,
    /// The file key sealed by the token (GCM ciphertext with tag, or RFC 5649 wrapping).
    pub sealed_key: Vec<u8>,
}

/// What unlocks the file key: the root of trust and its parameters.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RootParams {
    /// The file key is Argon2id(passphrase, salt).
    Passphrase(Argon2Params),
    /// The file key is random and sealed by a PKCS#11 token.
    Pkcs11(TokenSeal),
}

impl RootParams {
    /// The method name (`passphrase` or `pkcs11`).
    pub fn method(&self) -> &'static str {
        match self {
            Self::Passphrase(_) => "passphrase",
            Self::Pkcs11(_) => "pkcs11",
        }
    }

    /// The header lines that name the method and its parameters, through `key:` for a token:
    /// for PKCS#11 with AES-GCM these bytes are the AAD the token authenticates.
    pub fn binding(&self) -> String {
        let mut out = format!("{MAGIC}\nmethod: {}\n", self.method());
        match self {
            Self::Passphrase(a) => out.push_str(&format!(
                "kdf: argon2id\nargon2-m-kib: {}\nargon2-t: {}\nargon2-p: {}\n",
                a.m_kib, a.t, a.p
            )),
            Self::Pkcs11(s) => out.push_str(&format!(
                "mechanism: {}\ntoken: {}\nkey: {}\n",
                s.mechanism.name(),
                s.token,
                s.key
            )),
        }
        out
    }

    /// Every line that determines the file key (binding, salt or IV and sealed key): two
    /// headers with equal `key_lines` hold the same file key.
    pub fn key_lines(&self) -> String {
        let mut out = self.binding();
        match self {
            Self::Passphrase(a) => out.push_str(&format!("salt: {}\n", hex::encode(&a.salt))),
            Self::Pkcs11(s) => {
                if let Some(iv) = &s.iv {
                    out.push_str(&format!("iv: {}\n", hex::encode(iv)));
                }
                out.push_str(&format!("sealed-key: {}\n", hex::encode(&s.sealed_key)));
            }
        }
        out
    }
}

/// A parsed header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    /// The root of trust and its parameters.
    pub root: RootParams,
    /// Check value of the file key (tells a wrong root key from a damaged body).
    pub check: [u8; CHECK_LEN],
    /// Nonce of the body's AES-256-GCM.
    pub nonce: [u8; NONCE_LEN],
}

impl Header {
    /// The header bytes, through the `end` line: stored at the top of the file and used as
    /// the body's AAD.
    pub fn encode(&self) -> String {
        format!(
            "{}check: {}\nnonce: {}\nend\n",
            self.root.key_lines(),
            hex::encode(self.check),
            hex::encode(self.nonce)
        )
    }
}

/// True if `text` starts like a sealed keyring (whatever follows).
pub fn is_sealed(text: &[u8]) -> bool {
    text.starts_with(MAGIC.as_bytes())
}

/// A label must fit on one header line.
pub fn check_label(what: &str, label: &str) -> Result<()> {
    if label.is_empty() || label.len() > 64 || label.chars().any(char::is_control) {
        return Err(Error::InvalidArgument(format!(
            "{what} must be 1 to 64 characters without control characters"
        )));
    }
    Ok(())
}

fn bad(why: &str) -> Error {
    Error::FailedPrecondition(format!("sealed keyring: {why}"))
}

fn fixed<const N: usize>(hex_text: &str, what: &str) -> Result<[u8; N]> {
    let mut out = [0u8; N];
    hex::decode_to_slice(hex_text, &mut out)
        .map_err(|_| bad(&format!("{what} is not {} hex digits", 2 * N)))?;
    Ok(out)
}

fn number(text: &str, what: &str) -> Result<u32> {
    text.parse()
        .map_err(|_| bad(&format!("{what} is not a number")))
}

/// Splits a sealed file into its header (parsed), the raw header bytes and the body.
pub fn parse(text: &str) -> Result<(Header, &str, &str)> {
    let end = text
        .find("\nend\n")
        .ok_or_else(|| bad("no 'end' line closes the header"))?;
    let (raw, body) = text.split_at(end + "\nend\n".len());
    let mut lines = raw.lines();
    if lines.next() != Some(MAGIC) {
        return Err(bad("the first line is not the sealed keyring magic line"));
    }
    let mut fields = std::collections::HashMap::new();
    for line in lines {
        if line == "end" {
            break;
        }
        let (name, value) = line
            .split_once(": ")
            .ok_or_else(|| bad("a header line is not 'name: value'"))?;
        if fields.insert(name, value).is_some() {
            return Err(bad(&format!("header field '{name}' appears twice")));
        }
    }
    let field = |name: &str| {
        fields
            .get(name)
            .copied()
            .ok_or_else(|| bad(&format!("header field '{name}' is missing")))
    };
    let root = match field("method")? {
        "passphrase" => {
            if field("kdf")? != "argon2id" {
                return Err(bad("the only passphrase KDF is argon2id"));
            }
            let salt = hex::decode(field("salt")?).map_err(|_| bad("salt is not hex"))?;
            RootParams::Passphrase(Argon2Params {
                m_kib: number(field("argon2-m-kib")?, "argon2-m-kib")?,
                t: number(field("argon2-t")?, "argon2-t")?,
                p: number(field("argon2-p")?, "argon2-p")?,
                salt,
            })
        }
        "pkcs11" => {
            let mechanism = TokenMechanism::parse(field("mechanism")?)
                .ok_or_else(|| bad("mechanism is neither aes-gcm nor aes-key-wrap-pad"))?;
            let iv = match mechanism {
                TokenMechanism::AesGcm => Some(fixed(field("iv")?, "iv")?),
                TokenMechanism::AesKeyWrapPad => None,
            };
            RootParams::Pkcs11(TokenSeal {
                mechanism,
                token: field("token")?.to_owned(),
                key: field("key")?.to_owned(),
                iv,
                sealed_key: hex::decode(field("sealed-key")?)
                    .map_err(|_| bad("sealed-key is not hex"))?,
            })
        }
        other => {
            return Err(bad(&format!(
                "unknown sealing method '{other}' (known: pkcs11, passphrase)"
            )));
        }
    };
    let header = Header {
        root,
        check: fixed(field("check")?, "check")?,
        nonce: fixed(field("nonce")?, "nonce")?,
    };
    // Canonical form: a header that does not serialize back to the same bytes (an unknown,
    // reordered or reformatted line) is refused, so the stored bytes are the ones authenticated.
    if header.encode() != raw {
        return Err(bad(
            "the header is not in canonical form (a line was added, reordered or changed)",
        ));
    }
    Ok((header, raw, body))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn token_header() -> Header {
        Header {
            root: RootParams::Pkcs11(TokenSeal {
                mechanism: TokenMechanism::AesGcm,
                token: "kms token".into(),
                key: "root".into(),
                iv: Some([7; NONCE_LEN]),
                sealed_key: vec![1, 2, 3],
            }),
            check: [9; CHECK_LEN],
            nonce: [5; NONCE_LEN],
        }
    }

    #[test]
    fn round_trips_and_splits_body() {
        for header in [
            token_header(),
            Header {
                root: RootParams::Passphrase(Argon2Params {
                    m_kib: 65536,
                    t: 3,
                    p: 1,
                    salt: vec![4; SALT_LEN],
                }),
                check: [1; CHECK_LEN],
                nonce: [2; NONCE_LEN],
            },
        ] {
            let text = format!("{}Ym9keQ==\n", header.encode());
            assert!(is_sealed(text.as_bytes()));
            let (parsed, raw, body) = parse(&text).unwrap();
            assert_eq!(parsed, header);
            assert_eq!(raw, header.encode());
            assert_eq!(body, "Ym9keQ==\n");
        }
    }

    #[test]
    fn non_canonical_headers_are_refused() {
        let good = token_header().encode();
        let cases = [
            good.replace("key: root\n", "key: root\nextra: 1\n"),
            good.replace("method: pkcs11\n", "")
                .replacen("mechanism", "method: pkcs11\nmechanism", 1)
                .replace(
                    "token: kms token\nkey: root\n",
                    "key: root\ntoken: kms token\n",
                ),
            good.replace("check: ", "check:  "),
            good.replace("end\n", ""),
            good.replace("aes-gcm", "aes-ccm"),
            good.replace(MAGIC, "tenant-kms sealed keyring v9"),
        ];
        for case in cases {
            assert!(parse(&case).is_err(), "accepted:\n{case}");
        }
    }
}
