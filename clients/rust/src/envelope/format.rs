//! The envelope format's bytes (docs/ENVELOPE.md): the header, the per-message segment key
//! and the segment nonces. Pure: no I/O, no network.

use ring::aead::{self, Aad, LessSafeKey, Nonce, UnboundKey};
use ring::hkdf;
use zeroize::Zeroizing;

use crate::error::{Error, Result};

/// The first bytes of every envelope.
pub const MAGIC: &[u8; 8] = b"tkms-env";
/// The format version this code writes and reads.
pub const VERSION: u8 = 1;
/// HKDF-SHA256 info label of the segment key (docs/ENVELOPE.md section 3).
pub const SEGMENT_KEY_LABEL: &[u8] = b"tenant-kms/v1/envelope-segment-key";
/// Bytes of the per-message random salt.
pub const SALT_LEN: usize = 32;
/// AES-256-GCM tag bytes at the end of every segment.
pub const TAG_LEN: usize = 16;
/// Bytes of a data key.
pub const KEY_LEN: usize = 32;
/// Segment sizes a header may declare (plaintext bytes per segment).
pub const SEGMENT_SIZES: std::ops::RangeInclusive<u32> = 16..=(16 << 20);
/// The segment size the writer uses unless told otherwise: 64 KiB.
pub const DEFAULT_SEGMENT_SIZE: u32 = 64 << 10;
/// Longest tenant id, context and wrapped key a header may carry.
pub const MAX_FIELD_LEN: usize = 1024;
/// Segments per message: the index is 32 bits in the nonce.
pub const MAX_SEGMENTS: u64 = 1 << 32;

/// A 256-bit data key in plaintext: zeroized on drop, no `Debug`, `Clone` or comparison.
pub struct DataKey(Zeroizing<[u8; KEY_LEN]>);

impl DataKey {
    /// Takes the 32 key bytes the server returned; any other length is refused.
    pub fn from_slice(bytes: &[u8]) -> Result<Self> {
        let bytes: [u8; KEY_LEN] = bytes
            .try_into()
            .map_err(|_| Error::Format("a data key is 32 bytes".into()))?;
        Ok(Self(Zeroizing::new(bytes)))
    }

    /// A second zeroizing copy, for the cache to hand out while keeping its own.
    pub(crate) fn duplicate(&self) -> Self {
        Self(Zeroizing::new(*self.0))
    }

    /// The key bytes (explicitly: nothing prints or copies them implicitly).
    pub fn expose(&self) -> &[u8; KEY_LEN] {
        &self.0
    }
}

/// An envelope header: everything a reader needs besides the data key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    /// Plaintext bytes per segment (the last segment may hold fewer).
    pub segment_size: u32,
    /// Random per message: makes the segment key unique to the message.
    pub salt: [u8; SALT_LEN],
    /// The tenant whose key wraps the data key.
    pub tenant_id: String,
    /// The context the data key was generated under.
    pub context: String,
    /// The data key as GenerateDataKey returned it wrapped (v1 format, opaque here).
    pub wrapped_key: Vec<u8>,
}

impl Header {
    /// The header's bytes (docs/ENVELOPE.md section 2).
    pub fn encode(&self) -> Result<Vec<u8>> {
        if !SEGMENT_SIZES.contains(&self.segment_size) {
            return Err(Error::Format("segment size out of range".into()));
        }
        let mut out = Vec::with_capacity(64 + self.wrapped_key.len());
        out.extend_from_slice(MAGIC);
        out.push(VERSION);
        out.extend_from_slice(&self.segment_size.to_be_bytes());
        out.extend_from_slice(&self.salt);
        for field in [
            self.tenant_id.as_bytes(),
            self.context.as_bytes(),
            &self.wrapped_key,
        ] {
            let len = u16::try_from(field.len())
                .ok()
                .filter(|&n| n > 0 && usize::from(n) <= MAX_FIELD_LEN)
                .ok_or_else(|| Error::Format("a header field is empty or too long".into()))?;
            out.extend_from_slice(&len.to_be_bytes());
            out.extend_from_slice(field);
        }
        Ok(out)
    }

    /// Parses a header from the start of `input`; returns it with its length in bytes, or
    /// `Ok(None)` when `input` is a prefix of a header that may still be completed.
    pub fn parse(input: &[u8]) -> Result<Option<(Header, usize)>> {
        let mut reader = Cursor { input, at: 0 };
        let Some(magic) = reader.take(MAGIC.len()) else {
            return prefix_of(input, MAGIC).map(|()| None);
        };
        if magic != MAGIC {
            return Err(Error::Format("wrong magic".into()));
        }
        let Some(version) = reader.take(1) else {
            return Ok(None);
        };
        if version != [VERSION] {
            return Err(Error::Format(format!(
                "unsupported version {}",
                version.first().copied().unwrap_or_default()
            )));
        }
        let Some(size) = reader.take(4) else {
            return Ok(None);
        };
        let segment_size = u32::from_be_bytes([size[0], size[1], size[2], size[3]]);
        if !SEGMENT_SIZES.contains(&segment_size) {
            return Err(Error::Format("segment size out of range".into()));
        }
        let Some(salt) = reader.take(SALT_LEN) else {
            return Ok(None);
        };
        let mut salt_bytes = [0u8; SALT_LEN];
        salt_bytes.copy_from_slice(salt);
        let mut fields: Vec<Vec<u8>> = Vec::with_capacity(3);
        for _ in 0..3 {
            let Some(len) = reader.take(2) else {
                return Ok(None);
            };
            let len = usize::from(u16::from_be_bytes([len[0], len[1]]));
            if len == 0 || len > MAX_FIELD_LEN {
                return Err(Error::Format("a header field is empty or too long".into()));
            }
            let Some(field) = reader.take(len) else {
                return Ok(None);
            };
            fields.push(field.to_vec());
        }
        let text = |bytes: Vec<u8>| {
            String::from_utf8(bytes).map_err(|_| Error::Format("a header name is not UTF-8".into()))
        };
        let mut fields = fields.into_iter();
        let (Some(tenant), Some(context), Some(wrapped_key)) =
            (fields.next(), fields.next(), fields.next())
        else {
            return Err(Error::Format("header fields".into()));
        };
        let header = Header {
            segment_size,
            salt: salt_bytes,
            tenant_id: text(tenant)?,
            context: text(context)?,
            wrapped_key,
        };
        Ok(Some((header, reader.at)))
    }
}

/// Refuses `input` unless it is a prefix of `whole`.
fn prefix_of(input: &[u8], whole: &[u8]) -> Result<()> {
    if whole.starts_with(input) {
        Ok(())
    } else {
        Err(Error::Format("wrong magic".into()))
    }
}

struct Cursor<'a> {
    input: &'a [u8],
    at: usize,
}

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        let end = self.at.checked_add(n)?;
        let slice = self.input.get(self.at..end)?;
        self.at = end;
        Some(slice)
    }
}

/// The AES-256-GCM key of one message's segments:
/// `HKDF-SHA256(ikm = data key, salt = none, info = lp(label) ‖ header bytes)` (RFC 5869).
/// The whole header is in the derivation, so a changed header (another salt, tenant,
/// context, wrapped key or segment size) gives another key and the first segment fails.
pub struct SegmentKey(LessSafeKey);

impl SegmentKey {
    /// Derives the key of the message whose header bytes are `header`.
    pub fn derive(data_key: &DataKey, header: &[u8]) -> Result<Self> {
        let bytes = segment_key_bytes(data_key, header)?;
        let key = UnboundKey::new(&aead::AES_256_GCM, &bytes[..])
            .map_err(|_| Error::Format("key".into()))?;
        Ok(Self(LessSafeKey::new(key)))
    }

    /// Seals segment `index` in place (the tag is appended): AES-256-GCM (NIST SP 800-38D)
    /// with the STREAM nonce of [`segment_nonce`] and no additional data.
    pub fn seal(&self, index: u64, last: bool, segment: &mut Vec<u8>) -> Result<()> {
        self.0
            .seal_in_place_append_tag(nonce(index, last)?, Aad::empty(), segment)
            .map_err(|_| Error::Format("segment too large".into()))
    }

    /// Opens segment `index` in place and returns its plaintext length; any failure is
    /// [`Error::Decrypt`].
    pub fn open(&self, index: u64, last: bool, segment: &mut [u8]) -> Result<usize> {
        let nonce = nonce(index, last).map_err(|_| Error::Decrypt)?;
        self.0
            .open_in_place(nonce, Aad::empty(), segment)
            .map(|plain| plain.len())
            .map_err(|_| Error::Decrypt)
    }
}

/// The bytes of [`SegmentKey::derive`]'s key (the vectors record them).
pub(crate) fn segment_key_bytes(
    data_key: &DataKey,
    header: &[u8],
) -> Result<Zeroizing<[u8; KEY_LEN]>> {
    struct Len32;
    impl hkdf::KeyType for Len32 {
        fn len(&self) -> usize {
            KEY_LEN
        }
    }
    let label_len = u32::try_from(SEGMENT_KEY_LABEL.len())
        .map_err(|_| Error::Format("label".into()))?
        .to_be_bytes();
    let prk = hkdf::Salt::new(hkdf::HKDF_SHA256, &[]).extract(data_key.expose());
    let info = [&label_len[..], SEGMENT_KEY_LABEL, header];
    let okm = prk
        .expand(&info, Len32)
        .map_err(|_| Error::Format("key derivation".into()))?;
    let mut bytes = Zeroizing::new([0u8; KEY_LEN]);
    okm.fill(&mut bytes[..])
        .map_err(|_| Error::Format("key derivation".into()))?;
    Ok(bytes)
}

/// The nonce of segment `index`: seven zero bytes ‖ be32(index) ‖ one byte, 1 for the last
/// segment and 0 otherwise (the STREAM construction of Hoang, Reyhanitabar, Rogaway and
/// Vizár, "Online Authenticated-Encryption and its Nonce-Reuse Misuse-Resistance", 2015).
/// The key is unique per message, so a counter is a safe nonce; the index stops reordering
/// and dropping segments, the flag stops truncation at a segment boundary and appending.
pub fn segment_nonce(index: u64, last: bool) -> Result<[u8; 12]> {
    let index = u32::try_from(index).map_err(|_| Error::Format("too many segments".into()))?;
    let mut nonce = [0u8; 12];
    nonce[7..11].copy_from_slice(&index.to_be_bytes());
    nonce[11] = u8::from(last);
    Ok(nonce)
}

fn nonce(index: u64, last: bool) -> Result<Nonce> {
    Ok(Nonce::assume_unique_for_key(segment_nonce(index, last)?))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header() -> Header {
        Header {
            segment_size: 64,
            salt: [7; SALT_LEN],
            tenant_id: "acme".into(),
            context: "crm.files".into(),
            wrapped_key: vec![1, 2, 3],
        }
    }

    #[test]
    fn headers_round_trip_and_every_prefix_asks_for_more() {
        let bytes = header().encode().unwrap();
        let (parsed, len) = Header::parse(&bytes).unwrap().unwrap();
        assert_eq!(parsed, header());
        assert_eq!(len, bytes.len());
        for cut in 0..bytes.len() {
            assert!(
                Header::parse(&bytes[..cut]).unwrap().is_none(),
                "prefix {cut}"
            );
        }
        let mut longer = bytes.clone();
        longer.extend_from_slice(b"segments");
        assert_eq!(Header::parse(&longer).unwrap().unwrap().1, bytes.len());
    }

    #[test]
    fn bad_headers_are_refused() {
        let bytes = header().encode().unwrap();
        let mut wrong_magic = bytes.clone();
        wrong_magic[0] ^= 1;
        assert!(matches!(Header::parse(&wrong_magic), Err(Error::Format(_))));
        assert!(matches!(Header::parse(b"x"), Err(Error::Format(_))));
        let mut version = bytes.clone();
        version[8] = 2;
        assert!(matches!(Header::parse(&version), Err(Error::Format(_))));
        let mut size = bytes.clone();
        size[9..13].copy_from_slice(&(32u32 << 20).to_be_bytes());
        assert!(matches!(Header::parse(&size), Err(Error::Format(_))));
        let mut empty = header();
        empty.context.clear();
        assert!(empty.encode().is_err());
    }

    #[test]
    fn nonces_carry_index_and_last_flag() {
        assert_eq!(
            segment_nonce(0x0102_0304, true).unwrap(),
            [0, 0, 0, 0, 0, 0, 0, 1, 2, 3, 4, 1]
        );
        assert_eq!(segment_nonce(0, false).unwrap(), [0; 12]);
        assert!(segment_nonce(MAX_SEGMENTS, false).is_err());
    }
}
