//! Which key store a process uses: the embedded SQLite files of the data directory (the
//! default, nothing to install) or a shared PostgreSQL (several nodes, issue 14).

use super::postgres::PgOptions;

/// The environment variable naming the store when `--store` is not given. Unlike the command
/// line (visible in `ps`), it may carry a password.
pub const STORE_ENV: &str = "TENANT_KMS_STORE";

/// The key-store backend.
#[derive(Debug, Clone, Default)]
pub enum StoreBackend {
    /// `keys.db` in the data directory.
    #[default]
    Sqlite,
    /// A PostgreSQL database shared by every node.
    Postgres(PgOptions),
}

impl StoreBackend {
    /// The backend a store setting names: empty or `sqlite` is the embedded default; anything
    /// else must be a PostgreSQL connection string (`postgres://…`, `postgresql://…` or the
    /// key=value form).
    pub fn from_setting(setting: Option<&str>) -> Self {
        match setting.map(str::trim) {
            None | Some("") | Some("sqlite") => StoreBackend::Sqlite,
            Some(url) => StoreBackend::Postgres(PgOptions::new(url)),
        }
    }

    /// The PostgreSQL options, if that is the backend.
    pub fn postgres(&self) -> Option<&PgOptions> {
        match self {
            StoreBackend::Sqlite => None,
            StoreBackend::Postgres(options) => Some(options),
        }
    }

    /// The PostgreSQL options to change, if that is the backend.
    pub fn postgres_mut(&mut self) -> Option<&mut PgOptions> {
        match self {
            StoreBackend::Sqlite => None,
            StoreBackend::Postgres(options) => Some(options),
        }
    }
}
