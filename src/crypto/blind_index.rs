//! Blind indexes (DESIGN §9, docs/FORMAT.md "Blind indexes"): a keyed, truncated hash of a
//! normalized value, stored beside the value's ciphertext so a column can be searched for
//! equality without the database seeing the value.
//!
//! `index = truncate_bits(HMAC-SHA256(IK, normalize(value)), bits)` (RFC 2104 HMAC with
//! SHA-256, FIPS 180-4), where the index key is
//! `IK = HKDF-SHA256(TK_v, info = lp("tenant-kms/v1/blind-index") ‖ lp(tenant) ‖ lp(index))`
//! (RFC 5869, no salt). The tenant key version, the tenant and the index name each give an
//! unrelated key, so the same value has unrelated indexes across them.

use std::borrow::Cow;

use ring::hmac;
use unicode_normalization::UnicodeNormalization;

use super::CryptoError;
use super::kdf;
use super::labels::{self, push_length_prefixed};
use super::secret::SecretKey;

/// The shortest index, in bits.
pub const MIN_BITS: u16 = 8;
/// The longest index, in bits (all of HMAC-SHA256).
pub const MAX_BITS: u16 = 256;

/// How a value is normalized before it is hashed. Part of an index's definition: the stored
/// name of each variant ([`Normalization::name`]) never changes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Normalization {
    /// The value's bytes as given (any bytes, not only UTF-8).
    Exact,
    /// For emails and names (docs/FORMAT.md): the value must be UTF-8; leading and trailing
    /// characters with the Unicode `White_Space` property are removed, then the text is put in
    /// NFD, full Unicode case folding (CaseFolding.txt statuses C and F) is applied, and the
    /// result is put in NFC. NFD before folding is Unicode's canonical caseless match (D145),
    /// so composed and decomposed spellings of the same text match.
    CaseFoldTrim,
}

impl Normalization {
    /// Every normalization, for listings and tests.
    pub const ALL: &'static [Normalization] = &[Normalization::Exact, Normalization::CaseFoldTrim];

    /// The stored and wire name (`exact`, `casefold_trim`).
    pub const fn name(self) -> &'static str {
        match self {
            Normalization::Exact => "exact",
            Normalization::CaseFoldTrim => "casefold_trim",
        }
    }

    /// The normalization a name names.
    pub fn parse(name: &str) -> Option<Self> {
        Self::ALL.iter().copied().find(|n| n.name() == name)
    }

    /// The bytes that are hashed. [`Normalization::CaseFoldTrim`] fails on input that is not
    /// UTF-8 (the service refuses it with INVALID_ARGUMENT, it never guesses an encoding).
    pub fn apply(self, value: &[u8]) -> Result<Cow<'_, [u8]>, CryptoError> {
        match self {
            Normalization::Exact => Ok(Cow::Borrowed(value)),
            Normalization::CaseFoldTrim => {
                let text = std::str::from_utf8(value).map_err(|_| CryptoError)?;
                // `str::trim` removes exactly the characters with the White_Space property.
                let decomposed: String = text.trim().nfd().collect();
                let folded = unicase::UniCase::unicode(decomposed.as_str()).to_folded_case();
                Ok(Cow::Owned(folded.nfc().collect::<String>().into_bytes()))
            }
        }
    }
}

/// Checks an index length in bits: 8 to 256.
pub fn check_bits(bits: u32) -> Result<u16, CryptoError> {
    u16::try_from(bits)
        .ok()
        .filter(|b| (MIN_BITS..=MAX_BITS).contains(b))
        .ok_or(CryptoError)
}

/// The HKDF info of an index key: `lp(BLIND_INDEX) ‖ lp(tenant_id) ‖ lp(index_name)`.
pub fn index_key_info(tenant_id: &str, index_name: &str) -> Vec<u8> {
    let mut info = Vec::with_capacity(labels::BLIND_INDEX.len() + tenant_id.len() + 64);
    push_length_prefixed(&mut info, labels::BLIND_INDEX);
    push_length_prefixed(&mut info, tenant_id.as_bytes());
    push_length_prefixed(&mut info, index_name.as_bytes());
    info
}

/// An index key (IK) with its HMAC state prepared, ready to compute many indexes.
///
/// Not `Clone`, not `Debug`. ring keeps the prepared HMAC state in its own type, which does not
/// zeroize on drop (as for [`super::aead::AeadKey`]; SECURITY.md).
pub struct IndexKey(hmac::Key);

impl IndexKey {
    /// Derives the index key of (tenant key version, tenant, index name) by HKDF-SHA256.
    pub fn derive(
        tenant_key: &SecretKey,
        tenant_id: &str,
        index_name: &str,
    ) -> Result<Self, CryptoError> {
        let ik = kdf::derive_key(tenant_key, &index_key_info(tenant_id, index_name))?;
        Ok(Self(hmac::Key::new(hmac::HMAC_SHA256, ik.expose_secret())))
    }

    /// The index of an already normalized value: HMAC-SHA256 truncated to `bits`
    /// (see [`truncate_bits`]). `bits` must have passed [`check_bits`].
    pub fn compute(&self, bits: u16, normalized: &[u8]) -> Result<Vec<u8>, CryptoError> {
        let tag = hmac::sign(&self.0, normalized);
        truncate_bits(tag.as_ref(), bits)
    }
}

/// The blind index of a raw value: normalizes it as `normalization` says, then
/// [`IndexKey::compute`]s it. A normalized copy (case folding makes one) is zeroized after use.
pub fn index_of(
    key: &IndexKey,
    bits: u16,
    normalization: Normalization,
    value: &[u8],
) -> Result<Vec<u8>, CryptoError> {
    match normalization.apply(value)? {
        Cow::Borrowed(same) => key.compute(bits, same),
        Cow::Owned(copy) => key.compute(bits, &zeroize::Zeroizing::new(copy)),
    }
}

/// The first `bits` bits of `mac`, most significant bit of each byte first: `ceil(bits / 8)`
/// bytes, of which the last keeps its `bits mod 8` most significant bits (all 8 when `bits` is
/// a multiple of 8) and has the others zero. E.g. 12 bits of `ab cd …` are `ab c0`.
pub fn truncate_bits(mac: &[u8], bits: u16) -> Result<Vec<u8>, CryptoError> {
    let bits = usize::from(bits);
    if bits == 0 || bits > mac.len() * 8 {
        return Err(CryptoError);
    }
    let mut out = mac.get(..bits.div_ceil(8)).ok_or(CryptoError)?.to_vec();
    let keep = bits % 8;
    if keep != 0
        && let Some(last) = out.last_mut()
    {
        *last &= 0xffu8 << (8 - keep);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    static_assertions::assert_not_impl_any!(IndexKey: std::fmt::Debug, Clone);

    #[test]
    fn truncation_keeps_exactly_the_leading_bits() {
        let mac = [0xabu8, 0xcd, 0xef, 0xff];
        assert_eq!(truncate_bits(&mac, 8).unwrap(), vec![0xab]);
        assert_eq!(truncate_bits(&mac, 9).unwrap(), vec![0xab, 0x80]);
        assert_eq!(truncate_bits(&mac, 12).unwrap(), vec![0xab, 0xc0]);
        assert_eq!(truncate_bits(&mac, 15).unwrap(), vec![0xab, 0xcc]);
        assert_eq!(truncate_bits(&mac, 16).unwrap(), vec![0xab, 0xcd]);
        assert_eq!(truncate_bits(&mac, 32).unwrap(), mac.to_vec());
        assert!(truncate_bits(&mac, 33).is_err());
        assert!(truncate_bits(&mac, 0).is_err());
    }

    #[test]
    fn bits_range_is_8_to_256() {
        assert!(check_bits(7).is_err());
        assert_eq!(check_bits(8).unwrap(), 8);
        assert_eq!(check_bits(256).unwrap(), 256);
        assert!(check_bits(257).is_err());
        assert!(check_bits(u32::MAX).is_err());
    }

    #[test]
    fn index_is_hmac_of_the_derived_key() {
        let tk = SecretKey::from_slice(&[7u8; 32]).unwrap();
        let ik = kdf::derive_key(&tk, &index_key_info("acme", "email")).unwrap();
        let raw = hmac::sign(
            &hmac::Key::new(hmac::HMAC_SHA256, ik.expose_secret()),
            b"a@b.c",
        );
        let key = IndexKey::derive(&tk, "acme", "email").unwrap();
        assert_eq!(key.compute(256, b"a@b.c").unwrap(), raw.as_ref());
        assert_eq!(key.compute(20, b"a@b.c").unwrap()[..2], raw.as_ref()[..2]);
        let other = IndexKey::derive(&tk, "acme", "name").unwrap();
        assert_ne!(other.compute(256, b"a@b.c").unwrap(), raw.as_ref());
        let other = IndexKey::derive(&tk, "acmf", "email").unwrap();
        assert_ne!(other.compute(256, b"a@b.c").unwrap(), raw.as_ref());
    }

    #[test]
    fn casefold_trim_normalizes_case_space_and_composition() {
        let norm = |s: &str| {
            String::from_utf8(
                Normalization::CaseFoldTrim
                    .apply(s.as_bytes())
                    .unwrap()
                    .to_vec(),
            )
            .unwrap()
        };
        assert_eq!(norm("  Alice@Example.COM\t\n"), "alice@example.com");
        // Full folding (status F): ß → ss; final sigma folds like sigma.
        assert_eq!(norm("Straße"), "strasse");
        assert_eq!(norm("ΟΔΟΣ"), norm("οδος"));
        // Composed (U+00C9) and decomposed (E + U+0301) spellings agree, in NFC.
        assert_eq!(norm("\u{c9}cole"), "\u{e9}cole");
        assert_eq!(norm("E\u{301}cole"), "\u{e9}cole");
        // White_Space only: U+200B (zero width space) is not White_Space and stays.
        assert_eq!(norm("\u{3000}x\u{85}"), "x");
        assert_eq!(norm("\u{200b}x"), "\u{200b}x");
        assert!(Normalization::CaseFoldTrim.apply(&[0xff, 0xfe]).is_err());
        assert_eq!(
            Normalization::Exact.apply(&[0xff, b'A']).unwrap().as_ref(),
            &[0xff, b'A']
        );
    }

    #[test]
    fn normalization_names_parse_back() {
        for n in Normalization::ALL {
            assert_eq!(Normalization::parse(n.name()), Some(*n));
        }
        assert_eq!(Normalization::parse("EXACT"), None);
    }
}
