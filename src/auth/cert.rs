//! Client certificates as credentials: a verified client certificate whose identity is listed
//! in the configuration's `[[tls_callers]]` table acts as a caller with that entry's role,
//! tenant scope and operations, in place of a bearer token.
//!
//! The certificate chain, validity period and key usage were already checked by rustls
//! against `--client-ca` during the handshake (a certificate that fails never reaches a
//! handler). This module only *names* the caller: a certificate's identities are its SAN DNS
//! names and SAN URIs (e.g. SPIFFE ids), or, only when it has no such SAN, its subject common
//! name (RFC 6125 §6.4.4 treats the CN as a fallback). Matching is exact and case-sensitive; a
//! wildcard SAN matches only an entry spelled with the same wildcard. A certificate that
//! matches two different entries names no caller (ambiguous), so the order of entries never
//! decides who a caller is.

use std::collections::BTreeSet;

use super::{Caller, Credential, DATA_PERMISSIONS, Role, TenantScope};
use crate::domain::TenantId;
use crate::error::{Error, Result};

/// One `[[tls_callers]]` entry after validation.
#[derive(Debug, Clone)]
pub struct TlsCallerRule {
    /// The certificate identity (SAN DNS name, SAN URI, or subject CN) it matches exactly.
    pub identity: String,
    /// The role granted.
    pub role: Role,
    /// The tenants granted.
    pub tenants: TenantScope,
    /// Data-plane permissions it is limited to (service only); `None` = all of its role's.
    pub operations: Option<BTreeSet<String>>,
}

impl TlsCallerRule {
    /// Validates an entry: a known role, valid tenant ids (or `*`), known operations and
    /// only for the service role, a non-empty identity.
    pub fn new(
        identity: &str,
        role: &str,
        tenants: &[String],
        operations: Option<&[String]>,
    ) -> Result<Self> {
        let bad = |why: String| Err(Error::InvalidArgument(format!("tls_callers: {why}")));
        if identity.trim().is_empty() {
            return bad("identity must not be empty".into());
        }
        let Some(role) = Role::parse(role) else {
            return bad(format!(
                "{identity}: role must be admin, service or auditor"
            ));
        };
        let tenants = if tenants.iter().any(|t| t == "*") {
            TenantScope::All
        } else if tenants.is_empty() {
            return bad(format!("{identity}: name tenants (or \"*\")"));
        } else {
            let mut set = BTreeSet::new();
            for t in tenants {
                set.insert(TenantId::parse(t)?.as_str().to_owned());
            }
            TenantScope::Only(set)
        };
        let operations = match operations {
            None => None,
            Some(_) if role != Role::Service => {
                return bad(format!(
                    "{identity}: operations apply to the service role only"
                ));
            }
            Some(list) => {
                let mut set = BTreeSet::new();
                for op in list {
                    if !DATA_PERMISSIONS.contains(&op.as_str()) {
                        return bad(format!("{identity}: unknown operation '{op}'"));
                    }
                    set.insert(op.clone());
                }
                Some(set)
            }
        };
        Ok(Self {
            identity: identity.to_owned(),
            role,
            tenants,
            operations,
        })
    }
}

/// The `[[tls_callers]]` table: certificate identity → caller.
#[derive(Debug, Clone, Default)]
pub struct TlsCallers {
    rules: Vec<TlsCallerRule>,
}

impl TlsCallers {
    /// A table of validated entries; two entries with the same identity are refused.
    pub fn new(rules: Vec<TlsCallerRule>) -> Result<Self> {
        let mut seen = BTreeSet::new();
        for rule in &rules {
            if !seen.insert(rule.identity.as_str()) {
                return Err(Error::InvalidArgument(format!(
                    "tls_callers: identity {} is listed twice",
                    rule.identity
                )));
            }
        }
        Ok(Self { rules })
    }

    /// True if no certificate can name a caller.
    pub fn is_empty(&self) -> bool {
        self.rules.is_empty()
    }

    /// The caller a verified end-entity certificate (DER) names: `Ok(None)` if none of its
    /// identities is listed, UNAUTHENTICATED if it cannot be parsed or matches two entries.
    pub fn caller_for(&self, end_entity_der: &[u8]) -> Result<Option<Caller>> {
        let identities = certificate_identities(end_entity_der)?;
        let mut matched = self
            .rules
            .iter()
            .filter(|rule| identities.contains(&rule.identity));
        let Some(rule) = matched.next() else {
            return Ok(None);
        };
        if matched.next().is_some() {
            tracing::warn!("a client certificate matches two tls_callers entries: refused");
            return Err(Error::Unauthenticated);
        }
        Ok(Some(Caller::new(
            rule.identity.clone(),
            Credential::Certificate,
            rule.role,
            rule.tenants.clone(),
            rule.operations.clone(),
            None,
        )))
    }
}

/// The identities of a certificate: its SAN DNS names and URIs, or its subject CN when it has
/// no such SAN.
pub fn certificate_identities(der: &[u8]) -> Result<Vec<String>> {
    let der = tonic::transport::CertificateDer::from(der);
    let cert = webpki::EndEntityCert::try_from(&der).map_err(|_| Error::Unauthenticated)?;
    let mut ids: Vec<String> = cert
        .valid_dns_names()
        .chain(cert.valid_uri_names())
        .map(str::to_owned)
        .collect();
    if ids.is_empty()
        && let Some(cn) = common_name(cert.subject())
    {
        ids.push(cn);
    }
    Ok(ids)
}

/// The identity the `new_peer` detector keys a client certificate by (with the peer address):
/// its identities ([`certificate_identities`]: SAN DNS names and URIs, else the subject CN)
/// joined by commas, or, for a certificate with none of them, `sha256:` and its fingerprint.
///
/// Names rather than the fingerprint, so that renewing a certificate under the same names
/// (short-lived certificates are renewed often) is not a new peer, while a credential used
/// with another service's certificate is. The names are public (they are in the certificate).
pub fn peer_identity(der: &[u8]) -> String {
    match certificate_identities(der) {
        Ok(ids) if !ids.is_empty() => ids.join(","),
        _ => format!(
            "sha256:{}",
            hex::encode(ring::digest::digest(&ring::digest::SHA256, der))
        ),
    }
}

/// DER tag and content of the next element of `input`, and the rest (X.690 §8.1: one-byte tags,
/// short or long definite lengths).
fn next_tlv(input: &[u8]) -> Option<(u8, &[u8], &[u8])> {
    let (&tag, rest) = input.split_first()?;
    let (&first, rest) = rest.split_first()?;
    let (len, rest) = if first < 0x80 {
        (usize::from(first), rest)
    } else {
        let n = usize::from(first & 0x7f);
        if n == 0 || n > 4 || rest.len() < n {
            return None;
        }
        let (bytes, rest) = rest.split_at(n);
        (
            bytes
                .iter()
                .fold(0usize, |acc, b| (acc << 8) | usize::from(*b)),
            rest,
        )
    };
    if rest.len() < len {
        return None;
    }
    let (content, rest) = rest.split_at(len);
    Some((tag, content, rest))
}

/// The subject's common name (OID 2.5.4.3) from the content of a `Name` SEQUENCE, if it is a
/// UTF8String, PrintableString or IA5String.
fn common_name(mut name: &[u8]) -> Option<String> {
    const CN_OID: &[u8] = &[0x55, 0x04, 0x03];
    const SET: u8 = 0x31;
    const SEQUENCE: u8 = 0x30;
    const OID: u8 = 0x06;
    while !name.is_empty() {
        let (tag, mut rdn, rest) = next_tlv(name)?;
        name = rest;
        if tag != SET {
            return None;
        }
        while !rdn.is_empty() {
            let (tag, attribute, rest) = next_tlv(rdn)?;
            rdn = rest;
            if tag != SEQUENCE {
                return None;
            }
            let (tag, oid, value) = next_tlv(attribute)?;
            if tag == OID && oid == CN_OID {
                let (tag, text, _) = next_tlv(value)?;
                return match tag {
                    0x0c | 0x13 | 0x16 => String::from_utf8(text.to_vec()).ok(),
                    _ => None,
                };
            }
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rules_are_validated() {
        assert!(TlsCallerRule::new("a", "service", &["t".into()], None).is_ok());
        assert!(TlsCallerRule::new("a", "root", &["t".into()], None).is_err());
        assert!(TlsCallerRule::new("a", "service", &[], None).is_err());
        assert!(TlsCallerRule::new("", "service", &["*".into()], None).is_err());
        assert!(
            TlsCallerRule::new("a", "admin", &["*".into()], Some(&["encrypt".into()])).is_err()
        );
        assert!(TlsCallerRule::new("a", "service", &["*".into()], Some(&["fly".into()])).is_err());
        let rule = TlsCallerRule::new("a", "service", &["*".into()], None).unwrap();
        assert!(TlsCallers::new(vec![rule.clone(), rule]).is_err());
    }

    #[test]
    fn common_name_is_found_in_a_der_name() {
        // SET { SEQUENCE { OID 2.5.4.6 (C), PrintableString "DE" } },
        // SET { SEQUENCE { OID 2.5.4.3 (CN), UTF8String "svc" } }
        let name = [
            0x31, 0x0b, 0x30, 0x09, 0x06, 0x03, 0x55, 0x04, 0x06, 0x13, 0x02, b'D', b'E', 0x31,
            0x0c, 0x30, 0x0a, 0x06, 0x03, 0x55, 0x04, 0x03, 0x0c, 0x03, b's', b'v', b'c',
        ];
        assert_eq!(common_name(&name).as_deref(), Some("svc"));
        assert_eq!(common_name(&name[..13]), None);
        assert_eq!(common_name(&name[..20]), None, "truncated input is no name");
    }
}
