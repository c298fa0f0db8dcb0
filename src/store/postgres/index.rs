//! [`IndexDefinitionStore`] for [`PostgresKeyStore`]: the `blind_indexes` table. Racing
//! declarations of one name (from any node) are serialized by a transaction-scoped advisory
//! lock on the name, so the declaration rule sees every committed definition of it.
use super::connect::off_runtime;

use postgres::GenericClient;

use super::connect::map_error;
use super::store::PostgresKeyStore;
use crate::crypto::blind_index::Normalization;
use crate::domain::TenantId;
use crate::domain::index::{self, Declaration, IndexDefinition, IndexName, IndexScope};
use crate::error::{Error, Result};
use crate::store::IndexDefinitionStore;

const COLUMNS: &str = "scope, name, bits, normalization, created_at";

fn definition_from_row(row: &postgres::Row) -> Result<IndexDefinition> {
    let bad = |what: &str| Error::internal(format!("key store: invalid blind index {what}"));
    let scope: String = row.try_get(0).map_err(map_error)?;
    let name: String = row.try_get(1).map_err(map_error)?;
    let bits: i64 = row.try_get(2).map_err(map_error)?;
    let normalization: String = row.try_get(3).map_err(map_error)?;
    Ok(IndexDefinition {
        scope: IndexScope::from_stored(&scope).map_err(|_| bad("scope"))?,
        name: IndexName::parse(&name).map_err(|_| bad("name"))?,
        bits: u16::try_from(bits).map_err(|_| bad("bits"))?,
        normalization: Normalization::parse(&normalization).ok_or_else(|| bad("normalization"))?,
        created_at: row.try_get(4).map_err(map_error)?,
    })
}

/// Every stored definition of `name` that could serve a tenant of `scope`.
fn same_name(
    client: &mut impl GenericClient,
    name: &IndexName,
    scope: &IndexScope,
) -> Result<Vec<IndexDefinition>> {
    let rows = match scope {
        IndexScope::AllTenants => client.query(
            &format!("SELECT {COLUMNS} FROM blind_indexes WHERE name = $1"),
            &[&name.as_str()],
        ),
        IndexScope::Tenant(tenant) => client.query(
            &format!(
                "SELECT {COLUMNS} FROM blind_indexes WHERE name = $1 AND scope IN ('*', $2) \
                 ORDER BY (scope = '*') DESC"
            ),
            &[&name.as_str(), &tenant.as_str()],
        ),
    }
    .map_err(map_error)?;
    rows.iter().map(definition_from_row).collect()
}

impl IndexDefinitionStore for PostgresKeyStore {
    fn declare_index(&self, definition: &IndexDefinition) -> Result<IndexDefinition> {
        off_runtime(|| {
            self.write_plain("index", |tx| {
                tx.execute(
                    "SELECT pg_advisory_xact_lock(hashtext('tenant-kms/blind-index/' || $1))",
                    &[&definition.name.as_str()],
                )
                .map_err(map_error)?;
                let existing = same_name(tx, &definition.name, &definition.scope)?;
                match index::check_declaration(&existing, definition)? {
                    Declaration::InForce(current) => Ok(current),
                    Declaration::Insert => {
                        tx.execute(
                            "INSERT INTO blind_indexes (scope, name, bits, normalization, created_at) \
                             VALUES ($1, $2, $3, $4, $5)",
                            &[
                                &definition.scope.stored(),
                                &definition.name.as_str(),
                                &i64::from(definition.bits),
                                &definition.normalization.name(),
                                &definition.created_at,
                            ],
                        )
                        .map_err(map_error)?;
                        Ok(definition.clone())
                    }
                }
            })
        })
    }

    fn index_definition(
        &self,
        tenant: &TenantId,
        name: &IndexName,
    ) -> Result<Option<IndexDefinition>> {
        off_runtime(|| {
            let scope = IndexScope::Tenant(tenant.clone());
            let mut conn = self.pool().get()?;
            same_name(&mut *conn, name, &scope).map(index::in_force)
        })
    }

    fn list_index_definitions(&self, tenant: Option<&TenantId>) -> Result<Vec<IndexDefinition>> {
        off_runtime(|| {
            let mut conn = self.pool().get()?;
            let all: Vec<IndexDefinition> = conn
                .query(
                    &format!(
                        "SELECT {COLUMNS} FROM blind_indexes WHERE $1::text IS NULL \
                         OR scope IN ('*', $1) ORDER BY name, (scope = '*') DESC, scope"
                    ),
                    &[&tenant.map(TenantId::as_str)],
                )
                .map_err(map_error)?
                .iter()
                .map(definition_from_row)
                .collect::<Result<_>>()?;
            drop(conn);
            if tenant.is_none() {
                return Ok(all);
            }
            // One per name: the definition in force for the tenant.
            let mut out: Vec<IndexDefinition> = Vec::with_capacity(all.len());
            let mut group: Vec<IndexDefinition> = Vec::new();
            for d in all {
                if group.first().is_some_and(|g| g.name != d.name) {
                    out.extend(index::in_force(std::mem::take(&mut group)));
                }
                group.push(d);
            }
            out.extend(index::in_force(group));
            Ok(out)
        })
    }
}
