//! The passphrase root: the file key is Argon2id (RFC 9106) of the passphrase and a random
//! salt, with the parameters read from the header, so stronger defaults later (or the small
//! ones tests write into their own headers) never make an older file unreadable.

use argon2::{Algorithm, Argon2, Params, Version};
use zeroize::Zeroizing;

use super::header::{Argon2Params, SALT_LEN};
use crate::crypto::secret::{KEY_LEN, SecretKey};
use crate::error::{Error, Result};

/// Default memory: 64 MiB (RFC 9106 §4, second recommended option).
pub const DEFAULT_M_KIB: u32 = 64 * 1024;
/// Default passes.
pub const DEFAULT_T: u32 = 3;
/// Default lanes.
pub const DEFAULT_P: u32 = 1;

/// Largest memory a header may ask for (4 GiB): a damaged or hostile header cannot make the
/// start allocate without bound.
const MAX_M_KIB: u32 = 4 * 1024 * 1024;
/// Most passes a header may ask for.
const MAX_T: u32 = 64;
/// Most lanes a header may ask for.
const MAX_P: u32 = 64;

/// Fresh parameters for a new sealing: the given cost (defaults above) and a random salt.
pub fn new_params(m_kib: u32, t: u32, p: u32) -> Result<Argon2Params> {
    let mut salt = vec![0u8; SALT_LEN];
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut salt)
        .map_err(|_| Error::internal("CSPRNG failed"))?;
    let params = Argon2Params { m_kib, t, p, salt };
    argon2_params(&params)?;
    Ok(params)
}

fn argon2_params(params: &Argon2Params) -> Result<Params> {
    if params.m_kib > MAX_M_KIB || params.t > MAX_T || params.p > MAX_P {
        return Err(Error::FailedPrecondition(format!(
            "Argon2id parameters m={} KiB, t={}, p={} exceed the limits (m <= {MAX_M_KIB}, \
             t <= {MAX_T}, p <= {MAX_P})",
            params.m_kib, params.t, params.p
        )));
    }
    Params::new(params.m_kib, params.t, params.p, Some(KEY_LEN)).map_err(|e| {
        Error::FailedPrecondition(format!(
            "Argon2id parameters m={} KiB, t={}, p={} are invalid: {e}",
            params.m_kib, params.t, params.p
        ))
    })
}

/// The file key: Argon2id(passphrase, salt) under the header's parameters.
pub fn derive(passphrase: &[u8], params: &Argon2Params) -> Result<SecretKey> {
    if passphrase.is_empty() {
        return Err(Error::FailedPrecondition("the passphrase is empty".into()));
    }
    let argon = Argon2::new(Algorithm::Argon2id, Version::V0x13, argon2_params(params)?);
    let mut out = Zeroizing::new([0u8; KEY_LEN]);
    argon
        .hash_password_into(passphrase, &params.salt, out.as_mut())
        .map_err(|e| Error::FailedPrecondition(format!("Argon2id failed: {e}")))?;
    Ok(SecretKey::from_zeroizing(out))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn derivation_depends_on_passphrase_salt_and_cost() {
        let params = new_params(64, 1, 1).unwrap();
        let a = derive(b"correct horse", &params).unwrap();
        let again = derive(b"correct horse", &params).unwrap();
        assert_eq!(a.expose_secret(), again.expose_secret());
        let other_pass = derive(b"correct horsf", &params).unwrap();
        assert_ne!(a.expose_secret(), other_pass.expose_secret());
        let mut other_cost = params.clone();
        other_cost.t = 2;
        assert_ne!(
            a.expose_secret(),
            derive(b"correct horse", &other_cost)
                .unwrap()
                .expose_secret()
        );
        let mut other_salt = params;
        other_salt.salt[0] ^= 1;
        assert_ne!(
            a.expose_secret(),
            derive(b"correct horse", &other_salt)
                .unwrap()
                .expose_secret()
        );
    }

    #[test]
    fn hostile_or_empty_inputs_are_refused() {
        let params = Argon2Params {
            m_kib: 32,
            t: 3,
            p: 4,
            salt: vec![2; 16],
        };
        let key = derive(&[1; 32], &params).unwrap();
        assert_eq!(key.expose_secret().len(), KEY_LEN);
        let hostile = Argon2Params {
            m_kib: u32::MAX,
            ..params
        };
        assert!(derive(b"x", &hostile).is_err());
        assert!(derive(b"", &new_params(64, 1, 1).unwrap()).is_err());
    }
}
