//! Blind index definitions (docs/SEARCHABLE.md): what a declared index is, and the one rule
//! for declaring one. A definition is never silently changed: declaring a name again with the
//! same bits and normalization is a no-op that returns the definition in force; with anything
//! else it is refused (a changed definition is a new index name).

use std::fmt;

use crate::crypto::blind_index::{self, Normalization};
use crate::domain::TenantId;
use crate::error::Error;

/// Longest index name, in characters.
pub const MAX_INDEX_NAME_LEN: usize = 64;

/// An index name: 1–64 characters of `[a-z0-9][a-z0-9_.-]*`. It is part of the index key's
/// derivation (docs/FORMAT.md), so it is as strict as a tenant id.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct IndexName(String);

impl IndexName {
    /// Parses an index name, or says what is wrong with it.
    pub fn parse(raw: &str) -> Result<Self, Error> {
        let first_ok = |c: u8| c.is_ascii_lowercase() || c.is_ascii_digit();
        let rest_ok = |c: u8| first_ok(c) || matches!(c, b'_' | b'.' | b'-');
        let ok = match raw.as_bytes().split_first() {
            None => false,
            Some((first, rest)) => {
                raw.len() <= MAX_INDEX_NAME_LEN
                    && first_ok(*first)
                    && rest.iter().all(|c| rest_ok(*c))
            }
        };
        if ok {
            Ok(Self(raw.to_owned()))
        } else {
            Err(Error::InvalidArgument(
                "index name must be 1-64 characters of [a-z0-9][a-z0-9_.-]*".into(),
            ))
        }
    }

    /// The name.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for IndexName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Which tenants a definition serves.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum IndexScope {
    /// Every tenant, present and future.
    AllTenants,
    /// One tenant.
    Tenant(TenantId),
}

impl IndexScope {
    /// The stored form: `*` for every tenant, else the tenant id (which cannot be `*`).
    pub fn stored(&self) -> &str {
        match self {
            IndexScope::AllTenants => "*",
            IndexScope::Tenant(t) => t.as_str(),
        }
    }

    /// The scope a stored form names.
    pub fn from_stored(stored: &str) -> Result<Self, Error> {
        if stored == "*" {
            Ok(IndexScope::AllTenants)
        } else {
            TenantId::parse(stored).map(IndexScope::Tenant)
        }
    }
}

/// A declared blind index.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IndexDefinition {
    /// Its name (part of the index key's derivation).
    pub name: IndexName,
    /// Output length, 8–256 bits.
    pub bits: u16,
    /// How values are normalized before hashing.
    pub normalization: Normalization,
    /// Which tenants it serves.
    pub scope: IndexScope,
    /// Unix seconds.
    pub created_at: i64,
}

impl IndexDefinition {
    /// A definition from its wire fields, validated: name, bits (8–256), normalization name.
    pub fn parse(
        name: &str,
        bits: u32,
        normalization: &str,
        scope: IndexScope,
        created_at: i64,
    ) -> Result<Self, Error> {
        let name = IndexName::parse(name)?;
        let bits = blind_index::check_bits(bits).map_err(|_| {
            Error::InvalidArgument(format!(
                "bits must be {} to {}, not {bits}",
                blind_index::MIN_BITS,
                blind_index::MAX_BITS
            ))
        })?;
        let normalization = Normalization::parse(normalization).ok_or_else(|| {
            Error::InvalidArgument(format!(
                "normalization must be one of: {}",
                Normalization::ALL
                    .iter()
                    .map(|n| n.name())
                    .collect::<Vec<_>>()
                    .join(", ")
            ))
        })?;
        Ok(Self {
            name,
            bits,
            normalization,
            scope,
            created_at,
        })
    }

    /// Whether two definitions compute the same thing (scope and time aside).
    pub fn same_output(&self, other: &IndexDefinition) -> bool {
        self.name == other.name
            && self.bits == other.bits
            && self.normalization == other.normalization
    }
}

/// What declaring a definition does, as [`check_declaration`] decides it.
#[derive(Debug, PartialEq, Eq)]
pub enum Declaration {
    /// Store the new definition.
    Insert,
    /// An identical definition is already in force for that scope: change nothing and
    /// return it.
    InForce(IndexDefinition),
}

/// The one rule for declaring `new`, given every stored definition with the same name that
/// could serve a tenant it serves: for a one-tenant declaration, that tenant's own and the
/// all-tenants one; for an all-tenants declaration, every one of that name.
///
/// Any of them computing something else refuses the declaration (ALREADY_EXISTS): a tenant
/// would otherwise get a different index under the same name. An identical one in force for
/// the whole scope makes it a no-op.
pub fn check_declaration(
    existing: &[IndexDefinition],
    new: &IndexDefinition,
) -> Result<Declaration, Error> {
    if existing.iter().any(|e| !e.same_output(new)) {
        return Err(Error::AlreadyExists(
            "a blind index of that name with another definition (a new definition needs a new \
             name)",
        ));
    }
    let covering = existing
        .iter()
        .find(|e| e.scope == new.scope || e.scope == IndexScope::AllTenants);
    Ok(match covering {
        Some(e) => Declaration::InForce(e.clone()),
        None => Declaration::Insert,
    })
}

/// Of the definitions of one name visible to a tenant, the one in force: the tenant's own,
/// else the all-tenants one.
pub fn in_force(definitions: Vec<IndexDefinition>) -> Option<IndexDefinition> {
    let mut all = None;
    for d in definitions {
        match d.scope {
            IndexScope::Tenant(_) => return Some(d),
            IndexScope::AllTenants => all = Some(d),
        }
    }
    all
}

#[cfg(test)]
mod tests {
    use super::*;

    fn def(name: &str, bits: u32, norm: &str, scope: IndexScope) -> IndexDefinition {
        IndexDefinition::parse(name, bits, norm, scope, 1).unwrap()
    }

    fn acme() -> IndexScope {
        IndexScope::Tenant(TenantId::parse("acme").unwrap())
    }

    #[test]
    fn parse_refuses_bad_fields() {
        assert!(IndexDefinition::parse("email", 7, "exact", IndexScope::AllTenants, 0).is_err());
        assert!(IndexDefinition::parse("email", 257, "exact", IndexScope::AllTenants, 0).is_err());
        assert!(IndexDefinition::parse("Email", 32, "exact", IndexScope::AllTenants, 0).is_err());
        assert!(IndexDefinition::parse("", 32, "exact", IndexScope::AllTenants, 0).is_err());
        assert!(IndexDefinition::parse("email", 32, "lower", IndexScope::AllTenants, 0).is_err());
        assert!(IndexDefinition::parse("crm.email_v2", 8, "casefold_trim", acme(), 0).is_ok());
        assert_eq!(
            IndexScope::from_stored("*").unwrap(),
            IndexScope::AllTenants
        );
        assert_eq!(IndexScope::from_stored(acme().stored()).unwrap(), acme());
    }

    #[test]
    fn declaration_table() {
        let all32 = def("email", 32, "exact", IndexScope::AllTenants);
        let acme32 = def("email", 32, "exact", acme());
        let acme16 = def("email", 16, "exact", acme());
        let acme32_fold = def("email", 32, "casefold_trim", acme());
        // (stored, declared, Ok(None) = insert / Ok(Some(d)) = d in force / Err = refused)
        type Case<'a> = (
            &'a [IndexDefinition],
            &'a IndexDefinition,
            Result<Option<&'a IndexDefinition>, ()>,
        );
        let cases: &[Case<'_>] = &[
            (&[], &acme32, Ok(None)),
            (&[], &all32, Ok(None)),
            (std::slice::from_ref(&acme32), &acme32, Ok(Some(&acme32))),
            (std::slice::from_ref(&all32), &acme32, Ok(Some(&all32))),
            (std::slice::from_ref(&acme32), &all32, Ok(None)),
            (std::slice::from_ref(&acme32), &acme16, Err(())),
            (std::slice::from_ref(&acme32), &acme32_fold, Err(())),
            (std::slice::from_ref(&all32), &acme16, Err(())),
            (std::slice::from_ref(&acme16), &all32, Err(())),
        ];
        for (i, (existing, new, want)) in cases.iter().enumerate() {
            let got = check_declaration(existing, new);
            match (got, want) {
                (Ok(Declaration::Insert), Ok(None)) => {}
                (Ok(Declaration::InForce(d)), Ok(Some(w))) => assert_eq!(&d, *w, "case {i}"),
                (Err(Error::AlreadyExists(_)), Err(())) => {}
                (got, want) => panic!("case {i}: got {got:?}, want {want:?}"),
            }
        }
    }

    #[test]
    fn the_tenants_own_definition_is_in_force() {
        let all = def("email", 32, "exact", IndexScope::AllTenants);
        let own = def("email", 32, "exact", acme());
        assert_eq!(in_force(vec![all.clone(), own.clone()]), Some(own.clone()));
        assert_eq!(in_force(vec![own.clone(), all.clone()]), Some(own));
        assert_eq!(in_force(vec![all.clone()]), Some(all));
        assert_eq!(in_force(vec![]), None);
    }
}
