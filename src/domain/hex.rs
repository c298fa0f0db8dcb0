//! Lower-case hex text of bytes, for values made on every call (request ids, the audit
//! record's AAD fingerprint). `hex::encode` builds its string char by char through an
//! iterator; filling a buffer of the right size with `hex::encode_to_slice` measured about
//! half the instructions (a digit-by-digit `String::push` loop measured in between).

/// `bytes` as lower-case hex, exactly as `hex::encode` writes them.
pub fn lower_hex(bytes: &[u8]) -> String {
    let mut text = vec![0u8; bytes.len() * 2];
    // Neither step can fail (the buffer is twice the input, hex digits are ASCII); the
    // fallback keeps the function total without a panic.
    hex::encode_to_slice(bytes, &mut text)
        .ok()
        .and_then(|()| String::from_utf8(text).ok())
        .unwrap_or_else(|| hex::encode(bytes))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_text_as_hex_encode() {
        for len in [0usize, 1, 8, 16, 33] {
            let bytes: Vec<u8> = (0..len).map(|i| (i * 37 + 11) as u8).collect();
            assert_eq!(lower_hex(&bytes), hex::encode(&bytes));
        }
        assert_eq!(lower_hex(&[0x00, 0xab, 0xff]), "00abff");
    }
}
