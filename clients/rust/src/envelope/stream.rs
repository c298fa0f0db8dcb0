//! Streaming encryption and decryption of one envelope through `std::io` (docs/ENVELOPE.md
//! section 4): memory use is one segment, whatever the message's length.

use std::io::{self, Read, Write};

use zeroize::{Zeroize, Zeroizing};

use super::format::{DataKey, Header, SegmentKey, TAG_LEN};
use crate::error::{Error, Result};

/// Writes an envelope: the header at once, then each segment as soon as it is known not to
/// be the last. [`EncryptingWriter::finish`] seals the last segment; an envelope whose writer
/// was dropped without it does not open (it reads as truncated).
pub struct EncryptingWriter<W: Write> {
    inner: W,
    key: SegmentKey,
    segment_size: usize,
    buffer: Zeroizing<Vec<u8>>,
    index: u64,
    remaining: Option<u64>,
}

impl<W: Write> EncryptingWriter<W> {
    /// Writes `header` to `inner` and returns the writer of its segments under `data_key`.
    /// With `length`, writing more than that many bytes fails (the cache charged exactly
    /// `length` bytes to the data key; see [`super::cache`]).
    pub fn new(
        mut inner: W,
        data_key: &DataKey,
        header: &Header,
        length: Option<u64>,
    ) -> Result<Self> {
        let header_bytes = header.encode()?;
        let key = SegmentKey::derive(data_key, &header_bytes)?;
        inner.write_all(&header_bytes)?;
        let segment_size = usize::try_from(header.segment_size)
            .map_err(|_| Error::Format("segment size".into()))?;
        Ok(Self {
            inner,
            key,
            segment_size,
            // Sized for a sealed segment, so sealing never reallocates (a reallocation would
            // leave a plaintext copy behind in freed memory).
            buffer: Zeroizing::new(Vec::with_capacity(segment_size + TAG_LEN)),
            index: 0,
            remaining: length,
        })
    }

    fn emit(&mut self, last: bool) -> Result<()> {
        self.key.seal(self.index, last, &mut self.buffer)?;
        self.inner.write_all(&self.buffer)?;
        self.buffer.zeroize();
        self.index += 1;
        Ok(())
    }

    /// Seals the last segment, flushes, and returns the inner writer.
    pub fn finish(mut self) -> Result<W> {
        if self.remaining.is_some_and(|left| left > 0) {
            return Err(Error::Format(
                "the input ended before the length it declared".into(),
            ));
        }
        self.emit(true)?;
        self.inner.flush()?;
        Ok(self.inner)
    }
}

impl<W: Write> Write for EncryptingWriter<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if let Some(left) = &mut self.remaining {
            *left = left.checked_sub(buf.len() as u64).ok_or_else(|| {
                Error::Format("the input is longer than the length it declared".into())
            })?;
        }
        let mut rest = buf;
        while !rest.is_empty() {
            // A full segment is sealed only once more input arrives: until then it may be
            // the last one.
            if self.buffer.len() == self.segment_size {
                self.emit(false)?;
            }
            let take = (self.segment_size - self.buffer.len()).min(rest.len());
            let (now, later) = rest.split_at(take);
            self.buffer.extend_from_slice(now);
            rest = later;
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

/// Reads an envelope's header from `reader`, leaving it at the first segment; returns the
/// header and its bytes (the segment key's input).
pub fn read_header(reader: &mut impl Read) -> Result<(Header, Vec<u8>)> {
    // magic, version, segment size, salt; then three length-prefixed fields.
    let mut bytes = vec![0u8; 8 + 1 + 4 + super::format::SALT_LEN];
    read_exact(reader, &mut bytes)?;
    for _ in 0..3 {
        // Refuses a wrong magic, version or size before reading further.
        Header::parse(&bytes)?;
        let mut len = [0u8; 2];
        read_exact(reader, &mut len)?;
        bytes.extend_from_slice(&len);
        let len = usize::from(u16::from_be_bytes(len));
        if len == 0 || len > super::format::MAX_FIELD_LEN {
            return Err(Error::Format("a header field is empty or too long".into()));
        }
        let start = bytes.len();
        bytes.resize(start + len, 0);
        read_exact(reader, &mut bytes[start..])?;
    }
    match Header::parse(&bytes)? {
        Some((header, len)) if len == bytes.len() => Ok((header, bytes)),
        _ => Err(Error::Format("header".into())),
    }
}

fn read_exact(reader: &mut impl Read, buf: &mut [u8]) -> Result<()> {
    reader.read_exact(buf).map_err(|e| match e.kind() {
        io::ErrorKind::UnexpectedEof => Error::Format("truncated header".into()),
        _ => Error::Io(e),
    })
}

/// Reads the plaintext of an envelope whose header was read by [`read_header`]. Returns a
/// segment's bytes only after the segment authenticated; a truncated, reordered or extended
/// stream fails with [`Error::Decrypt`] (as an `io::Error` wrapping it) at the point it is
/// detected. Bytes already returned before a failure are authentic but incomplete: treat the
/// output as valid only once reading reached the end without error (the file helpers write to
/// a temporary file and rename it only then).
pub struct DecryptingReader<R: Read> {
    inner: R,
    key: SegmentKey,
    segment_size: usize,
    buffer: Zeroizing<Vec<u8>>,
    plain_len: usize,
    at: usize,
    index: u64,
    lookahead: Option<u8>,
    done: bool,
    failed: bool,
}

impl<R: Read> DecryptingReader<R> {
    /// The reader of the segments after `header_bytes` under `data_key`.
    pub fn new(inner: R, data_key: &DataKey, header: &Header, header_bytes: &[u8]) -> Result<Self> {
        let segment_size = usize::try_from(header.segment_size)
            .map_err(|_| Error::Format("segment size".into()))?;
        Ok(Self {
            inner,
            key: SegmentKey::derive(data_key, header_bytes)?,
            segment_size,
            buffer: Zeroizing::new(Vec::with_capacity(segment_size + TAG_LEN)),
            plain_len: 0,
            at: 0,
            index: 0,
            lookahead: None,
            done: false,
            failed: false,
        })
    }

    fn next_segment(&mut self) -> Result<()> {
        self.buffer.zeroize();
        let sealed = self.segment_size + TAG_LEN;
        if let Some(byte) = self.lookahead.take() {
            self.buffer.push(byte);
        }
        let want = (sealed - self.buffer.len()) as u64;
        (&mut self.inner).take(want).read_to_end(&mut self.buffer)?;
        // A segment is the last one when the input ends with it: a full segment needs one
        // byte of look-ahead to know.
        let last = if self.buffer.len() < sealed {
            true
        } else {
            let mut one = [0u8; 1];
            let n = loop {
                match self.inner.read(&mut one) {
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    other => break other?,
                }
            };
            if n == 1 {
                self.lookahead = Some(one[0]);
            }
            n == 0
        };
        // Only the first segment may be empty (an empty message); a later empty last segment
        // would be a second encoding of the same plaintext.
        if self.buffer.len() < TAG_LEN || (last && self.index > 0 && self.buffer.len() == TAG_LEN) {
            return Err(Error::Decrypt);
        }
        self.plain_len = self.key.open(self.index, last, &mut self.buffer)?;
        self.at = 0;
        self.index += 1;
        self.done = last;
        Ok(())
    }
}

impl<R: Read> Read for DecryptingReader<R> {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        if self.failed {
            return Err(Error::Decrypt.into());
        }
        while !out.is_empty() {
            if self.at < self.plain_len {
                let n = (self.plain_len - self.at).min(out.len());
                out[..n].copy_from_slice(&self.buffer[self.at..self.at + n]);
                self.at += n;
                return Ok(n);
            }
            if self.done {
                return Ok(0);
            }
            if let Err(e) = self.next_segment() {
                self.failed = true;
                self.buffer.zeroize();
                self.plain_len = 0;
                return Err(e.into());
            }
        }
        Ok(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::envelope::format::SALT_LEN;

    fn header(segment_size: u32) -> Header {
        Header {
            segment_size,
            salt: [9; SALT_LEN],
            tenant_id: "acme".into(),
            context: "crm.files".into(),
            wrapped_key: vec![0xAB; 40],
        }
    }

    fn seal(plaintext: &[u8], segment_size: u32) -> Vec<u8> {
        let key = DataKey::from_slice(&[3; 32]).unwrap();
        let mut writer =
            EncryptingWriter::new(Vec::new(), &key, &header(segment_size), None).unwrap();
        // Odd write sizes, so segment boundaries fall inside writes.
        for chunk in plaintext.chunks(7) {
            writer.write_all(chunk).unwrap();
        }
        writer.finish().unwrap()
    }

    fn open(sealed: &[u8]) -> Result<Vec<u8>> {
        let key = DataKey::from_slice(&[3; 32]).unwrap();
        let mut input = sealed;
        let (header, bytes) = read_header(&mut input)?;
        let mut reader = DecryptingReader::new(input, &key, &header, &bytes)?;
        let mut out = Vec::new();
        reader.read_to_end(&mut out)?;
        Ok(out)
    }

    #[test]
    fn round_trips_at_and_around_segment_boundaries() {
        for len in [0usize, 1, 15, 16, 17, 31, 32, 33, 100] {
            let plaintext: Vec<u8> = (0..len).map(|i| i as u8).collect();
            let sealed = seal(&plaintext, 16);
            let segments = len.max(1).div_ceil(16);
            assert_eq!(
                sealed.len(),
                header(16).encode().unwrap().len() + len + segments * TAG_LEN,
                "length {len}: one tag per segment, no empty trailing segment"
            );
            assert_eq!(open(&sealed).unwrap(), plaintext, "length {len}");
        }
    }

    #[test]
    fn truncation_reordering_extension_and_tampering_do_not_open() {
        let plaintext = vec![0x5A; 48];
        let sealed = seal(&plaintext, 16);
        let head = header(16).encode().unwrap().len();
        let seg = 16 + TAG_LEN;
        // Drop the last segment: the one before is not marked last.
        assert!(matches!(
            open(&sealed[..head + 2 * seg]),
            Err(Error::Decrypt)
        ));
        // Cut inside a segment.
        assert!(matches!(
            open(&sealed[..sealed.len() - 1]),
            Err(Error::Decrypt)
        ));
        // Swap segments 0 and 1.
        let mut swapped = sealed.clone();
        swapped[head..head + seg].copy_from_slice(&sealed[head + seg..head + 2 * seg]);
        swapped[head + seg..head + 2 * seg].copy_from_slice(&sealed[head..head + seg]);
        assert!(matches!(open(&swapped), Err(Error::Decrypt)));
        // Append a segment (a copy of the last) or one byte.
        let mut extended = sealed.clone();
        extended.extend_from_slice(&sealed[sealed.len() - seg..]);
        assert!(matches!(open(&extended), Err(Error::Decrypt)));
        let mut one_more = sealed.clone();
        one_more.push(0);
        assert!(matches!(open(&one_more), Err(Error::Decrypt)));
        // A changed header (here the context) derives another key.
        let mut other_context = sealed.clone();
        let at = sealed.windows(9).position(|w| w == b"crm.files").unwrap();
        other_context[at] = b'x';
        assert!(matches!(open(&other_context), Err(Error::Decrypt)));
        // A flipped ciphertext bit.
        let mut flipped = sealed.clone();
        flipped[head + 3] ^= 1;
        assert!(matches!(open(&flipped), Err(Error::Decrypt)));
        // Only the header: no last segment at all.
        assert!(matches!(open(&sealed[..head]), Err(Error::Decrypt)));
        assert!(matches!(open(&sealed[..head - 1]), Err(Error::Format(_))));
    }

    #[test]
    fn a_segment_from_another_message_does_not_open() {
        let a = seal(&[1; 32], 16);
        let key = DataKey::from_slice(&[3; 32]).unwrap();
        let mut other_salt = header(16);
        other_salt.salt = [10; SALT_LEN];
        let mut writer = EncryptingWriter::new(Vec::new(), &key, &other_salt, None).unwrap();
        writer.write_all(&[1; 32]).unwrap();
        let b = writer.finish().unwrap();
        let head = header(16).encode().unwrap().len();
        let mut spliced = a.clone();
        spliced[head..head + 32].copy_from_slice(&b[head..head + 32]);
        assert_ne!(spliced, a);
        assert!(matches!(open(&spliced), Err(Error::Decrypt)));
    }

    #[test]
    fn a_declared_length_is_enforced_both_ways() {
        let key = DataKey::from_slice(&[3; 32]).unwrap();
        let mut writer = EncryptingWriter::new(Vec::new(), &key, &header(16), Some(4)).unwrap();
        assert!(writer.write_all(b"12345").is_err());
        let mut writer = EncryptingWriter::new(Vec::new(), &key, &header(16), Some(4)).unwrap();
        writer.write_all(b"123").unwrap();
        assert!(writer.finish().is_err());
    }
}
