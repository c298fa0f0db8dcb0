//! A node's stable identity (issue 14): the name under which it writes its own audit chain
//! when several nodes share one PostgreSQL. Set with `--node-id`/`node_id`; otherwise made once
//! and kept in `<data-dir>/node.id`, so it survives restarts.

use std::path::Path;

use crate::error::{Error, Result};

/// The file in the data directory that keeps a generated node id.
pub const NODE_ID_FILE: &str = "node.id";

/// Longest node id.
pub const MAX_LEN: usize = 64;

/// Checks a node id: 1 to [`MAX_LEN`] characters of `A–Z a–z 0–9 . _ -` (it appears in audit
/// records, logs and file names, so nothing else is allowed).
pub fn parse(text: &str) -> Result<String> {
    let ok = !text.is_empty()
        && text.len() <= MAX_LEN
        && text
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
    if !ok {
        return Err(Error::InvalidArgument(format!(
            "node id '{}' is invalid: use 1 to {MAX_LEN} of A-Z a-z 0-9 . _ -",
            text.escape_debug()
        )));
    }
    Ok(text.to_owned())
}

/// The node id: `configured` if given, else the one kept in `data_dir` (created there, 0600,
/// on first use: `node-` and 16 random hex digits).
pub fn resolve(data_dir: &Path, configured: Option<&str>) -> Result<String> {
    if let Some(id) = configured {
        return parse(id);
    }
    let path = data_dir.join(NODE_ID_FILE);
    match std::fs::read_to_string(&path) {
        Ok(text) => parse(text.trim()).map_err(|e| {
            Error::FailedPrecondition(format!("{} holds no valid node id: {e}", path.display()))
        }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let mut random = [0u8; 8];
            rand::RngCore::fill_bytes(&mut rand::rng(), &mut random);
            let id = format!("node-{}", hex::encode(random));
            crate::fsutil::create_private_dir(data_dir)?;
            crate::fsutil::write_private_file(&path, format!("{id}\n").as_bytes())?;
            Ok(id)
        }
        Err(e) => Err(Error::FailedPrecondition(format!(
            "cannot read {}: {e}",
            path.display()
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_checked() {
        assert!(parse("node-a.1_B").is_ok());
        assert!(parse("").is_err());
        assert!(parse("a b").is_err());
        assert!(parse(&"x".repeat(MAX_LEN + 1)).is_err());
    }

    #[test]
    fn a_generated_id_survives_restarts() {
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("data");
        let first = resolve(&data, None).unwrap();
        assert!(first.starts_with("node-"), "{first}");
        assert_eq!(resolve(&data, None).unwrap(), first);
        assert_eq!(resolve(&data, Some("given")).unwrap(), "given");
        assert_eq!(resolve(&data, None).unwrap(), first);
    }
}
