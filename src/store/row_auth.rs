//! Authenticated key-store rows: the canonical encodings, the key and the MAC checks that make
//! a security-relevant row (a token, a tenant, a key version) impossible to forge, widen, move
//! or roll back for someone who can write the key store but does not hold the master key.
//!
//! Pure and backend-agnostic (no SQL, no I/O): the SQLite store persists an opaque `mac` and a
//! `generation` per row plus one row anchor and calls this module; a PostgreSQL store does the
//! same. docs/FORMAT.md ("Key-store row MACs") specifies the bytes.
//!
//! - **Key.** [`RowKey`] = HKDF-SHA256 (RFC 5869) of the audit secret with info
//!   [`labels::ROW_MAC`]. The audit secret is random, stored only wrapped under the master key
//!   (AES-256-GCM), and re-wrapped, never replaced, by a master-key rotation: so rotating or
//!   retiring master versions leaves every row MAC valid, and a writer without the master key
//!   cannot learn the key.
//! - **Row MAC.** HMAC-SHA256 (RFC 2104) over `lp(label) ‖ lp(table) ‖ lp(primary key…) ‖
//!   lp(generation) ‖ lp(column)…`, every part length-prefixed (so no field boundary can shift)
//!   and the row's identity first (so a MAC cannot move to another row or table). The
//!   generation is the store-wide write counter at the row's last write: two writes of the same
//!   content get different MACs.
//! - **Anchor.** One MAC'd anchor per store: the write counter and [`RowDigest`], the sum
//!   modulo 2^512 of a keyed 512-bit element of every row MAC (an incremental set hash, as
//!   Bellare–Micciancio's AdHash). Every write updates it in the same transaction; a full check
//!   compares it with the rows. A row deleted, inserted or replaced by an earlier genuine copy
//!   (with its genuine MAC) changes the sum, and the anchor's own MAC stops a writer fixing it.

use ring::hmac;

use super::{KeyVersionRecord, TenantRecord, TokenRecord};
use crate::crypto::labels::{self, push_length_prefixed};
use crate::crypto::secret::SecretKey;
use crate::crypto::{CryptoError, kdf};
use crate::domain::TenantId;
use crate::error::Error;

/// Length of a row MAC (HMAC-SHA256).
pub const MAC_LEN: usize = 32;
/// Length of the row digest (a sum modulo 2^512).
pub const DIGEST_LEN: usize = 64;

/// Table names as they enter the encodings (part of the format: never rename).
pub const TENANTS: &str = "tenants";
/// See [`TENANTS`].
pub const KEY_VERSIONS: &str = "key_versions";
/// See [`TENANTS`].
pub const TOKENS: &str = "tokens";
/// The anchor's "table" in its encoding.
pub const ANCHOR: &str = "row_anchor";
/// The domain of the digest elements (a row MAC's keyed 512-bit image).
const DIGEST_ELEMENT: &str = "digest-element";

/// The keys that MAC key-store rows and make their digest elements. Not `Debug`, not
/// `Clone`; the bytes are zeroized on drop.
pub struct RowKey {
    mac: SecretKey,
    element: SecretKey,
}

impl RowKey {
    /// Derives the row keys from the audit secret (HKDF-SHA256, RFC 5869): the MAC key with
    /// info [`labels::ROW_MAC`], the digest-element key with info `lp(ROW_MAC) ‖
    /// lp("digest-element")`. The audit chain keys derive from the same secret under other
    /// labels, so all these keys are independent.
    pub fn derive(audit_secret: &SecretKey) -> Result<Self, CryptoError> {
        let mut info = Vec::new();
        push_length_prefixed(&mut info, labels::ROW_MAC);
        push_length_prefixed(&mut info, DIGEST_ELEMENT.as_bytes());
        Ok(Self {
            mac: kdf::derive_key(audit_secret, labels::ROW_MAC)?,
            element: kdf::derive_key(audit_secret, &info)?,
        })
    }

    fn hmac_key(&self) -> hmac::Key {
        hmac::Key::new(hmac::HMAC_SHA256, self.mac.expose_secret())
    }

    /// HMAC-SHA256 of an encoding made by this module.
    fn mac(&self, encoding: &[u8]) -> [u8; MAC_LEN] {
        let mut out = [0u8; MAC_LEN];
        out.copy_from_slice(hmac::sign(&self.hmac_key(), encoding).as_ref());
        out
    }

    /// Checks `stored` against the MAC of `encoding` in constant time (ring's `hmac::verify`).
    fn check(
        &self,
        encoding: &[u8],
        stored: &[u8],
        what: impl FnOnce() -> String,
    ) -> Result<(), Error> {
        hmac::verify(&self.hmac_key(), encoding, stored).map_err(|_| {
            let what = what();
            // The row's identity only: never a column value, a MAC or a key.
            tracing::error!(row = %what, "key-store row failed its MAC check");
            Error::StoreIntegrity(format!("{what}: MAC mismatch (edited, moved or forged)"))
        })
    }

    /// The MAC of a tenant row written at `generation`.
    pub fn tenant_mac(&self, tenant: &TenantRecord, generation: u64) -> [u8; MAC_LEN] {
        self.mac(&tenant_encoding(tenant, generation))
    }

    /// Checks a loaded tenant row: [`Error::StoreIntegrity`] unless `stored` is its MAC.
    pub fn verify_tenant(
        &self,
        tenant: &TenantRecord,
        generation: u64,
        stored: &[u8],
    ) -> Result<(), Error> {
        self.check(&tenant_encoding(tenant, generation), stored, || {
            format!("{TENANTS} row {}", tenant.tenant_id)
        })
    }

    /// The MAC of a key-version row (its metadata; the wrapped key is bound by its own AEAD).
    pub fn key_version_mac(
        &self,
        tenant: &TenantId,
        version: &KeyVersionRecord,
        generation: u64,
    ) -> [u8; MAC_LEN] {
        self.mac(&key_version_encoding(tenant, version, generation))
    }

    /// Checks a loaded key-version row.
    pub fn verify_key_version(
        &self,
        tenant: &TenantId,
        version: &KeyVersionRecord,
        generation: u64,
        stored: &[u8],
    ) -> Result<(), Error> {
        self.check(
            &key_version_encoding(tenant, version, generation),
            stored,
            || format!("{KEY_VERSIONS} row {tenant} v{}", version.version),
        )
    }

    /// The MAC of a token row.
    pub fn token_mac(&self, token: &TokenRecord, generation: u64) -> [u8; MAC_LEN] {
        self.mac(&token_encoding(token, generation))
    }

    /// Checks a loaded token row.
    pub fn verify_token(
        &self,
        token: &TokenRecord,
        generation: u64,
        stored: &[u8],
    ) -> Result<(), Error> {
        self.check(&token_encoding(token, generation), stored, || {
            format!("{TOKENS} row {}", token.id)
        })
    }

    /// The MAC of the anchor: the write counter and the digest of every row MAC.
    pub fn anchor_mac(&self, anchor: &Anchor) -> [u8; MAC_LEN] {
        self.mac(&anchor_encoding(anchor))
    }

    /// Checks a loaded anchor.
    pub fn verify_anchor(&self, anchor: &Anchor, stored: &[u8]) -> Result<(), Error> {
        self.check(&anchor_encoding(anchor), stored, || ANCHOR.to_owned())
    }

    /// The digest element of a stored row MAC: HMAC-SHA512 (RFC 2104, FIPS 180-4) of the
    /// stored bytes under the element key, 64 bytes. Any stored bytes (even a malformed MAC)
    /// have one, so adding and removing a row's element always cancel.
    fn element(&self, stored_mac: &[u8]) -> [u8; DIGEST_LEN] {
        let key = hmac::Key::new(hmac::HMAC_SHA512, self.element.expose_secret());
        let mut out = [0u8; DIGEST_LEN];
        out.copy_from_slice(hmac::sign(&key, stored_mac).as_ref());
        out
    }
}

/// The store's row anchor: how many MAC'd writes it has seen and the digest of every row MAC
/// it holds.
#[derive(Clone, PartialEq, Eq)]
pub struct Anchor {
    /// The write counter: the generation of the last row written (never decreases).
    pub counter: u64,
    /// The sum of the rows' digest elements.
    pub digest: RowDigest,
}

impl Anchor {
    /// The anchor of an empty store.
    pub fn empty() -> Self {
        Self {
            counter: 0,
            digest: RowDigest::zero(),
        }
    }

    /// The generation for the next row written: the counter moved up by one.
    pub fn next_generation(&mut self) -> u64 {
        self.counter = self.counter.saturating_add(1);
        self.counter
    }

    /// Accounts for a row MAC now stored.
    pub fn add(&mut self, key: &RowKey, stored_mac: &[u8]) {
        self.digest.add(&key.element(stored_mac));
    }

    /// Accounts for a row MAC no longer stored (deleted or overwritten).
    pub fn remove(&mut self, key: &RowKey, stored_mac: &[u8]) {
        self.digest.sub(&key.element(stored_mac));
    }
}

/// A sum modulo 2^512 of digest elements (big-endian bytes). Addition, not XOR: with XOR a
/// writer holding enough earlier genuine MACs could solve a linear system to make a rollback
/// cancel out; a modular sum leaves only generalized-birthday attacks, which need far more
/// observed genuine row versions than a store ever writes.
#[derive(Clone, PartialEq, Eq)]
pub struct RowDigest(pub [u8; DIGEST_LEN]);

impl RowDigest {
    /// The digest of no rows.
    pub fn zero() -> Self {
        Self([0u8; DIGEST_LEN])
    }

    fn add(&mut self, element: &[u8; DIGEST_LEN]) {
        let mut carry = 0u16;
        for (a, b) in self.0.iter_mut().zip(element).rev() {
            let sum = u16::from(*a) + u16::from(*b) + carry;
            *a = (sum & 0xff) as u8;
            carry = sum >> 8;
        }
    }

    fn sub(&mut self, element: &[u8; DIGEST_LEN]) {
        let mut borrow = 0i16;
        for (a, b) in self.0.iter_mut().zip(element).rev() {
            let mut diff = i16::from(*a) - i16::from(*b) - borrow;
            borrow = i16::from(diff < 0);
            if diff < 0 {
                diff += 256;
            }
            *a = diff as u8;
        }
    }

    /// Parses stored digest bytes; `None` unless exactly [`DIGEST_LEN`] bytes.
    pub fn from_slice(bytes: &[u8]) -> Option<Self> {
        bytes.try_into().ok().map(Self)
    }
}

/// Starts an encoding: the label, the table, then the primary key parts.
fn start(table: &str, key_parts: &[&[u8]]) -> Vec<u8> {
    let mut out = Vec::with_capacity(256);
    push_length_prefixed(&mut out, labels::ROW_MAC);
    push_length_prefixed(&mut out, table.as_bytes());
    for part in key_parts {
        push_length_prefixed(&mut out, part);
    }
    out
}

fn push_u64(out: &mut Vec<u8>, value: u64) {
    push_length_prefixed(out, &value.to_be_bytes());
}

fn push_i64(out: &mut Vec<u8>, value: i64) {
    push_length_prefixed(out, &value.to_be_bytes());
}

/// `None` is an empty part, `Some` eight bytes: the lengths tell them apart.
fn push_opt_i64(out: &mut Vec<u8>, value: Option<i64>) {
    match value {
        Some(v) => push_i64(out, v),
        None => push_length_prefixed(out, &[]),
    }
}

/// The canonical bytes a tenant row's MAC covers: identity (table, tenant id), generation,
/// then every column: state, primary version, creation time, rotation policy, deletion time,
/// destruction time.
pub fn tenant_encoding(tenant: &TenantRecord, generation: u64) -> Vec<u8> {
    let mut out = start(TENANTS, &[tenant.tenant_id.as_str().as_bytes()]);
    push_u64(&mut out, generation);
    push_i64(&mut out, tenant.state.code());
    push_u64(&mut out, u64::from(tenant.primary_version));
    push_i64(&mut out, tenant.created_at);
    push_u64(&mut out, tenant.rotation_period_seconds);
    push_u64(&mut out, tenant.max_encryptions);
    push_opt_i64(&mut out, tenant.deletion_time);
    push_opt_i64(&mut out, tenant.destroyed_at);
    out
}

/// The canonical bytes a key-version row's MAC covers: identity (table, tenant id, version),
/// generation, state, creation time, reserved encryptions (the nonce budget count). The
/// wrapped key is not covered: its AES-GCM AAD already binds tenant, version and master
/// version, and it can only be deleted (a denial of service), never forged.
pub fn key_version_encoding(
    tenant: &TenantId,
    version: &KeyVersionRecord,
    generation: u64,
) -> Vec<u8> {
    let mut out = start(
        KEY_VERSIONS,
        &[tenant.as_str().as_bytes(), &version.version.to_be_bytes()],
    );
    push_u64(&mut out, generation);
    push_i64(&mut out, version.state.code());
    push_i64(&mut out, version.created_at);
    push_u64(&mut out, version.encryptions);
    out
}

/// The canonical bytes a token row's MAC covers: identity (table, token id), generation, then
/// name, hash, role, tenant scope, operations, creation, expiry and revocation times, and the
/// quarantine time when there is one.
pub fn token_encoding(token: &TokenRecord, generation: u64) -> Vec<u8> {
    let mut out = start(TOKENS, &[token.id.as_bytes()]);
    push_u64(&mut out, generation);
    push_length_prefixed(&mut out, token.name.as_bytes());
    push_length_prefixed(&mut out, &token.hash);
    push_length_prefixed(&mut out, token.role.as_bytes());
    push_length_prefixed(&mut out, token.tenants.as_bytes());
    push_length_prefixed(&mut out, token.operations.as_bytes());
    push_i64(&mut out, token.created_at);
    push_opt_i64(&mut out, token.expires_at);
    push_opt_i64(&mut out, token.revoked_at);
    // Added with quarantine (issue 16): only present when set, so rows MAC'd before it
    // still verify unchanged.
    if let Some(at) = token.quarantined_at {
        push_length_prefixed(&mut out, b"quarantined_at");
        push_i64(&mut out, at);
    }
    out
}

/// The canonical bytes the anchor's MAC covers: its identity, the counter and the digest.
pub fn anchor_encoding(anchor: &Anchor) -> Vec<u8> {
    let mut out = start(ANCHOR, &[]);
    push_u64(&mut out, anchor.counter);
    push_length_prefixed(&mut out, &anchor.digest.0);
    out
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use crate::domain::{KeyVersionState, TenantState};

    fn key(byte: u8) -> RowKey {
        RowKey::derive(&SecretKey::from_slice(&[byte; 32]).unwrap()).unwrap()
    }

    fn tenant(id: &str) -> TenantRecord {
        TenantRecord {
            tenant_id: TenantId::parse(id).unwrap(),
            state: TenantState::Active,
            primary_version: 2,
            created_at: 100,
            rotation_period_seconds: 0,
            max_encryptions: 1000,
            deletion_time: None,
            destroyed_at: None,
        }
    }

    fn token(id: &str, name: &str, tenants: &str, operations: &str) -> TokenRecord {
        TokenRecord {
            id: id.into(),
            name: name.into(),
            hash: [7; 32],
            role: "service".into(),
            tenants: tenants.into(),
            operations: operations.into(),
            created_at: 5,
            expires_at: None,
            revoked_at: None,
            quarantined_at: None,
        }
    }

    fn version(v: u32, state: KeyVersionState, encryptions: u64) -> KeyVersionRecord {
        KeyVersionRecord {
            version: v,
            state,
            created_at: 9,
            encryptions,
            wrapped: None,
        }
    }

    #[test]
    fn field_boundaries_cannot_shift() {
        // Moving characters between adjacent text columns changes the encoding.
        let a = token_encoding(&token("t1", "ab", "c", "*"), 1);
        let b = token_encoding(&token("t1", "a", "bc", "*"), 1);
        let c = token_encoding(&token("t1a", "b", "c", "*"), 1);
        assert_ne!(a, b);
        assert_ne!(a, c);
        // A scope and an operation list that concatenate equally stay apart.
        let d = token_encoding(&token("t1", "n", "a,b", "encrypt"), 1);
        let e = token_encoding(&token("t1", "n", "a", ",bencrypt"), 1);
        assert_ne!(d, e);
        // None and Some(0) differ; an expiry is not a revocation.
        let mut x = token("t1", "n", "*", "*");
        let mut y = x.clone();
        x.expires_at = Some(0);
        y.revoked_at = Some(0);
        assert_ne!(token_encoding(&x, 1), token_encoding(&y, 1));
        assert_ne!(
            token_encoding(&x, 1),
            token_encoding(&token("t1", "n", "*", "*"), 1)
        );
    }

    #[test]
    fn quarantine_is_covered_and_old_rows_encode_as_before() {
        let plain = token("t1", "n", "*", "*");
        let mut quarantined = plain.clone();
        quarantined.quarantined_at = Some(7);
        // Lifting the mark in the database changes what the MAC covers: refused.
        assert_ne!(token_encoding(&plain, 1), token_encoding(&quarantined, 1));
        // A row never quarantined encodes exactly as before the column existed (ends with
        // the revocation field), so its stored MAC still verifies.
        let before = token_encoding(&plain, 1);
        let with_mark = token_encoding(&quarantined, 1);
        assert!(with_mark.starts_with(&before) && with_mark.len() > before.len());
    }

    #[test]
    fn identity_and_generation_are_covered() {
        let k = key(1);
        let a = tenant("alpha");
        let mac = k.tenant_mac(&a, 3);
        assert!(k.verify_tenant(&a, 3, &mac).is_ok());
        // Another row, another generation, another table, another key: refused.
        assert!(k.verify_tenant(&tenant("alphb"), 3, &mac).is_err());
        assert!(k.verify_tenant(&a, 4, &mac).is_err());
        assert!(key(2).verify_tenant(&a, 3, &mac).is_err());
        let v = version(2, KeyVersionState::Enabled, 0);
        let vmac = k.key_version_mac(&a.tenant_id, &v, 3);
        assert!(k.verify_key_version(&a.tenant_id, &v, 3, &vmac).is_ok());
        assert!(
            k.verify_key_version(
                &a.tenant_id,
                &version(1, KeyVersionState::Enabled, 0),
                3,
                &vmac
            )
            .is_err()
        );
        assert!(k.verify_tenant(&a, 3, &vmac).is_err());
        // Tenant "a" version 2 and tenant "a\0\0\0\x02"-like ids cannot collide: the id is
        // length-prefixed before the version.
        assert_ne!(
            key_version_encoding(&a.tenant_id, &v, 3),
            tenant_encoding(&a, 3)
        );
    }

    #[test]
    fn every_security_column_is_covered() {
        let k = key(1);
        let base = tenant("t");
        let mac = k.tenant_mac(&base, 1);
        let mut changes: Vec<TenantRecord> = Vec::new();
        let mut t = base.clone();
        t.state = TenantState::Suspended;
        changes.push(t);
        let mut t = base.clone();
        t.primary_version = 1;
        changes.push(t);
        let mut t = base.clone();
        t.max_encryptions += 1;
        changes.push(t);
        let mut t = base.clone();
        t.rotation_period_seconds = 1;
        changes.push(t);
        let mut t = base.clone();
        t.deletion_time = Some(1);
        changes.push(t);
        let mut t = base.clone();
        t.destroyed_at = Some(1);
        changes.push(t);
        let mut t = base.clone();
        t.created_at = 1;
        changes.push(t);
        for changed in &changes {
            assert!(k.verify_tenant(changed, 1, &mac).is_err());
        }
        let v = version(1, KeyVersionState::Disabled, 500);
        let vmac = k.key_version_mac(&base.tenant_id, &v, 1);
        for changed in [
            version(1, KeyVersionState::Enabled, 500),
            version(1, KeyVersionState::Disabled, 0),
        ] {
            assert!(
                k.verify_key_version(&base.tenant_id, &changed, 1, &vmac)
                    .is_err()
            );
        }
        let tok = token("i", "n", "a", "encrypt");
        let tmac = k.token_mac(&tok, 1);
        let mut admin = tok.clone();
        admin.role = "admin".into();
        let mut wide = tok.clone();
        wide.tenants = "*".into();
        let mut ops = tok.clone();
        ops.operations = "*".into();
        let mut revived = tok.clone();
        revived.revoked_at = Some(1);
        let mut hash = tok.clone();
        hash.hash[0] ^= 1;
        for changed in [admin, wide, ops, hash] {
            assert!(k.verify_token(&changed, 1, &tmac).is_err());
        }
        assert!(k.verify_token(&revived, 1, &tmac).is_err());
    }

    #[test]
    fn digest_tracks_the_set_of_macs() {
        let k = key(1);
        let mut anchor = Anchor::empty();
        let macs: Vec<[u8; MAC_LEN]> = (0..5u8).map(|i| [i; MAC_LEN]).collect();
        for mac in &macs {
            anchor.add(&k, mac);
        }
        // Order does not matter; removing what was added restores the sum.
        let mut other = Anchor::empty();
        for mac in macs.iter().rev() {
            other.add(&k, mac);
        }
        assert!(anchor.digest == other.digest);
        other.remove(&k, &macs[2]);
        assert!(anchor.digest != other.digest);
        other.add(&k, &[9; MAC_LEN]);
        assert!(
            anchor.digest != other.digest,
            "a substituted MAC changes the digest"
        );
        other.remove(&k, &[9; MAC_LEN]);
        other.add(&k, &macs[2]);
        assert!(anchor.digest == other.digest);
        // Subtraction wraps like addition (mod 2^512).
        let mut zero = Anchor::empty();
        zero.remove(&k, &macs[0]);
        zero.add(&k, &macs[0]);
        assert!(zero.digest == RowDigest::zero());
        // The anchor MAC covers counter and digest.
        let mac = k.anchor_mac(&anchor);
        assert!(k.verify_anchor(&anchor, &mac).is_ok());
        let mut bumped = anchor.clone();
        bumped.next_generation();
        assert!(k.verify_anchor(&bumped, &mac).is_err());
        assert!(
            k.verify_anchor(&other, &k.anchor_mac(&Anchor::empty()))
                .is_err()
        );
    }

    #[test]
    fn known_answer() {
        // Pins the encoding and the derivation (docs/FORMAT.md, "Key-store row MACs"): a
        // change here breaks every stored row MAC.
        let k = key(0x42);
        let t = tenant("acme");
        assert_eq!(
            hex::encode(tenant_encoding(&t, 7)),
            concat!(
                "00000015",
                "74656e616e742d6b6d732f76312f726f772d6d6163", // lp(label)
                "00000007",
                "74656e616e7473", // lp("tenants")
                "00000004",
                "61636d65", // lp("acme")
                "00000008",
                "0000000000000007", // generation
                "00000008",
                "0000000000000001", // state ACTIVE
                "00000008",
                "0000000000000002", // primary version
                "00000008",
                "0000000000000064", // created_at
                "00000008",
                "0000000000000000", // rotation period
                "00000008",
                "00000000000003e8", // max encryptions
                "00000000",         // deletion_time None
                "00000000",         // destroyed_at None
            )
        );
        // Computed independently (Python hmac/hashlib: HKDF-SHA256 then HMAC-SHA256).
        assert_eq!(
            hex::encode(k.tenant_mac(&t, 7)),
            "47c77d8d21a8152dce35195b7ba5299e31a7878e4ec459887fea3e8d1170cad4"
        );
    }
}
