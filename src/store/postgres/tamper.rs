//! The test seam of a database administrator without the master key ([`RowTamper`], feature
//! `test-seams`): raw reads and writes of tenant, key-version and token rows, bypassing the
//! row MACs, the anchor and the change log, so the contract suite's tamper checks run against
//! PostgreSQL too.
use super::connect::off_runtime;

use postgres::types::{ToSql, Type};

use super::connect::map_error;
use super::store::PostgresKeyStore;
use crate::error::{Error, Result};
use crate::store::{RawValue, RowRef, RowTamper};

/// Table, WHERE clause and key values of a row.
fn target(row: &RowRef) -> (&'static str, &'static str, Vec<Box<dyn ToSql + Sync>>) {
    match row {
        RowRef::Tenant(id) => (
            "tenants",
            "tenant_id = $1",
            vec![Box::new(id.as_str().to_owned())],
        ),
        RowRef::KeyVersion(id, v) => (
            "key_versions",
            "tenant_id = $1 AND version = $2",
            vec![Box::new(id.as_str().to_owned()), Box::new(i64::from(*v))],
        ),
        RowRef::Token(id) => ("tokens", "id = $1", vec![Box::new(id.clone())]),
    }
}

/// A column name from a test, used only if it is a plain identifier.
fn checked_name(name: &str) -> Result<&str> {
    if !name.is_empty() && name.chars().all(|c| c.is_ascii_lowercase() || c == '_') {
        Ok(name)
    } else {
        Err(Error::InvalidArgument(format!(
            "invalid column name {name:?}"
        )))
    }
}

/// A value as a parameter (NULL is written literally: its type comes from the column).
fn param(value: &RawValue) -> Option<Box<dyn ToSql + Sync>> {
    match value {
        RawValue::Null => None,
        RawValue::Integer(v) => Some(Box::new(*v)),
        RawValue::Text(t) => Some(Box::new(t.clone())),
        RawValue::Blob(b) => Some(Box::new(b.clone())),
    }
}

/// `$n` for a value, or `NULL`.
fn placeholder(value: &RawValue, params: &mut Vec<Box<dyn ToSql + Sync>>) -> String {
    match param(value) {
        None => "NULL".into(),
        Some(p) => {
            params.push(p);
            format!("${}", params.len())
        }
    }
}

fn refs(params: &[Box<dyn ToSql + Sync>]) -> Vec<&(dyn ToSql + Sync)> {
    params.iter().map(|p| p.as_ref()).collect()
}

impl RowTamper for PostgresKeyStore {
    fn raw_row(&self, row: &RowRef) -> Result<Option<Vec<(String, RawValue)>>> {
        off_runtime(|| {
            let (table, condition, key) = target(row);
            let mut conn = self.pool().get()?;
            let Some(found) = conn
                .query_opt(
                    &format!("SELECT * FROM {table} WHERE {condition}"),
                    &refs(&key),
                )
                .map_err(map_error)?
            else {
                return Ok(None);
            };
            found
                .columns()
                .iter()
                .enumerate()
                .map(|(i, column)| {
                    let value = match *column.type_() {
                        Type::INT8 => found
                            .try_get::<_, Option<i64>>(i)
                            .map(|v| v.map_or(RawValue::Null, RawValue::Integer)),
                        Type::INT4 => found
                            .try_get::<_, Option<i32>>(i)
                            .map(|v| v.map_or(RawValue::Null, |v| RawValue::Integer(v.into()))),
                        Type::BYTEA => found
                            .try_get::<_, Option<Vec<u8>>>(i)
                            .map(|v| v.map_or(RawValue::Null, RawValue::Blob)),
                        _ => found
                            .try_get::<_, Option<String>>(i)
                            .map(|v| v.map_or(RawValue::Null, RawValue::Text)),
                    }
                    .map_err(map_error)?;
                    Ok((column.name().to_owned(), value))
                })
                .collect::<Result<Vec<_>>>()
                .map(Some)
        })
    }

    fn raw_update(&self, row: &RowRef, columns: &[(String, RawValue)]) -> Result<()> {
        off_runtime(|| {
            let (table, condition, mut params) = target(row);
            let mut sets = Vec::with_capacity(columns.len());
            for (name, value) in columns {
                let name = checked_name(name)?;
                sets.push(format!("{name} = {}", placeholder(value, &mut params)));
            }
            let mut conn = self.pool().get()?;
            conn.execute(
                &format!("UPDATE {table} SET {} WHERE {condition}", sets.join(", ")),
                &refs(&params),
            )
            .map_err(map_error)?;
            Ok(())
        })
    }

    fn raw_insert(&self, row: &RowRef, columns: &[(String, RawValue)]) -> Result<()> {
        off_runtime(|| {
            let (table, _, _) = target(row);
            let mut params = Vec::new();
            let mut names = Vec::with_capacity(columns.len());
            let mut marks = Vec::with_capacity(columns.len());
            for (name, value) in columns {
                names.push(checked_name(name)?);
                marks.push(placeholder(value, &mut params));
            }
            let mut conn = self.pool().get()?;
            conn.execute(
                &format!(
                    "INSERT INTO {table} ({}) VALUES ({})",
                    names.join(", "),
                    marks.join(", ")
                ),
                &refs(&params),
            )
            .map_err(map_error)?;
            Ok(())
        })
    }
}
