//! [`IndexDefinitionStore`] for [`SqliteKeyStore`]: the `blind_indexes` table (migration 5).

use rusqlite::{Connection, Row, params};

use super::{SqliteKeyStore, sql_error};
use crate::crypto::blind_index::Normalization;
use crate::domain::TenantId;
use crate::domain::index::{self, Declaration, IndexDefinition, IndexName, IndexScope};
use crate::error::Result;
use crate::store::IndexDefinitionStore;

const COLUMNS: &str = "scope, name, bits, normalization, created_at";

fn definition_from_row(row: &Row<'_>) -> rusqlite::Result<IndexDefinition> {
    let bad = |i: usize, what: &str| {
        rusqlite::Error::FromSqlConversionFailure(
            i,
            rusqlite::types::Type::Text,
            format!("invalid blind index {what}").into(),
        )
    };
    let scope: String = row.get(0)?;
    let name: String = row.get(1)?;
    let bits: i64 = row.get(2)?;
    let normalization: String = row.get(3)?;
    Ok(IndexDefinition {
        scope: IndexScope::from_stored(&scope).map_err(|_| bad(0, "scope"))?,
        name: IndexName::parse(&name).map_err(|_| bad(1, "name"))?,
        bits: u16::try_from(bits).map_err(|_| bad(2, "bits"))?,
        normalization: Normalization::parse(&normalization)
            .ok_or_else(|| bad(3, "normalization"))?,
        created_at: row.get(4)?,
    })
}

/// Every stored definition of `name` that could serve a tenant of `scope`.
fn same_name(
    conn: &Connection,
    name: &IndexName,
    scope: &IndexScope,
) -> rusqlite::Result<Vec<IndexDefinition>> {
    match scope {
        IndexScope::AllTenants => {
            let mut stmt = conn.prepare_cached(&format!(
                "SELECT {COLUMNS} FROM blind_indexes WHERE name = ?1"
            ))?;
            stmt.query_map(params![name.as_str()], definition_from_row)?
                .collect()
        }
        IndexScope::Tenant(tenant) => {
            let mut stmt = conn.prepare_cached(&format!(
                "SELECT {COLUMNS} FROM blind_indexes WHERE name = ?1 AND scope IN ('*', ?2) \
                 ORDER BY scope = '*' DESC"
            ))?;
            stmt.query_map(params![name.as_str(), tenant.as_str()], definition_from_row)?
                .collect()
        }
    }
}

impl IndexDefinitionStore for SqliteKeyStore {
    fn declare_index(&self, definition: &IndexDefinition) -> Result<IndexDefinition> {
        self.write(|tx| {
            let existing = same_name(tx, &definition.name, &definition.scope).map_err(sql_error)?;
            match index::check_declaration(&existing, definition)? {
                Declaration::InForce(current) => Ok(current),
                Declaration::Insert => {
                    tx.execute(
                        "INSERT INTO blind_indexes (scope, name, bits, normalization, created_at) \
                         VALUES (?1, ?2, ?3, ?4, ?5)",
                        params![
                            definition.scope.stored(),
                            definition.name.as_str(),
                            i64::from(definition.bits),
                            definition.normalization.name(),
                            definition.created_at
                        ],
                    )
                    .map_err(sql_error)?;
                    Ok(definition.clone())
                }
            }
        })
    }

    fn index_definition(
        &self,
        tenant: &TenantId,
        name: &IndexName,
    ) -> Result<Option<IndexDefinition>> {
        let scope = IndexScope::Tenant(tenant.clone());
        self.read(|conn| same_name(conn, name, &scope))
            .map(index::in_force)
    }

    fn list_index_definitions(&self, tenant: Option<&TenantId>) -> Result<Vec<IndexDefinition>> {
        let all = self.read(|conn| {
            let mut stmt = conn.prepare_cached(&format!(
                "SELECT {COLUMNS} FROM blind_indexes WHERE ?1 IS NULL OR scope IN ('*', ?1) \
                 ORDER BY name, scope = '*' DESC, scope"
            ))?;
            stmt.query_map(params![tenant.map(TenantId::as_str)], definition_from_row)?
                .collect::<rusqlite::Result<Vec<_>>>()
        })?;
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
    }
}
