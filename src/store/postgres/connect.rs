//! Connecting to PostgreSQL: [`PgOptions`] (what `--store` and its settings name), [`PgPool`]
//! (a bounded pool of blocking connections, opened with start-up retry and back-off) and
//! [`map_error`] (the one place a database error becomes ours).
//!
//! Why blocking: the store traits are synchronous, like SQLite's, and the service already runs
//! them on `spawn_blocking`; the `postgres` crate (rust-postgres) gives a blocking client over
//! tokio-postgres, and r2d2 pools it. Connection loss is [`Error::Unavailable`]: the call fails
//! closed and the next one takes a fresh connection, so a node rides out a database restart or
//! failover without restarting itself.

use std::path::PathBuf;
use std::str::FromStr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use postgres::config::{Host, SslMode};
use r2d2_postgres::PostgresConnectionManager;
use tokio_postgres_rustls::MakeRustlsConnect;
use zeroize::Zeroizing;

use crate::error::{Error, Result};

/// The environment variable a password may come from (libpq's name), when no password file is
/// given and the store URL carries none.
pub const PASSWORD_ENV: &str = "PGPASSWORD";

/// Default size of the connection pool.
pub const DEFAULT_POOL_SIZE: u32 = 16;
/// Default time one connection attempt may take.
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// How long [`PgPool::connect`] keeps retrying at start while the database is not reachable.
pub const DEFAULT_STARTUP_WAIT: Duration = Duration::from_secs(600);
/// Longest pause between two start-up attempts.
const MAX_BACKOFF: Duration = Duration::from_secs(5);
/// First pause between two start-up attempts (doubled up to [`MAX_BACKOFF`]).
const FIRST_BACKOFF: Duration = Duration::from_millis(100);

/// Where the PostgreSQL store is and how to reach it. `Debug` never shows a password.
#[derive(Clone)]
pub struct PgOptions {
    /// A libpq connection string, URL (`postgres://user@host1:5432,host2:5432/db?…`) or
    /// key=value form; several hosts with `target_session_attrs=read-write` pick the primary.
    /// A password in it is accepted only from the config file or `TENANT_KMS_STORE` (the
    /// command line refuses it: `ps` would show it).
    pub url: Zeroizing<String>,
    /// A file (mode 0600 or stricter) whose first line is the password; else `PGPASSWORD`;
    /// else the URL's.
    pub password_file: Option<PathBuf>,
    /// CA certificate(s) (PEM) the server's certificate must chain to; given, TLS is
    /// required and verified. Without it the connection is plaintext (and a URL asking for
    /// `sslmode=require` is refused).
    pub tls_ca: Option<PathBuf>,
    /// Most connections open at once.
    pub pool_size: u32,
    /// Longest one connection attempt (and one wait for a free pooled connection) may take.
    pub connect_timeout: Duration,
    /// How long the first connection keeps being retried at start (the database may come up
    /// after the node).
    pub startup_wait: Duration,
    /// The schema every connection works in (`search_path`) instead of the role's default:
    /// `migrate-store` builds its copy in a staging schema of its own and publishes it at the
    /// end ([`super::staging`]). `None` for everything else.
    pub search_path: Option<String>,
}

impl std::fmt::Debug for PgOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PgOptions")
            .field("url", &redacted_url(&self.url))
            .field("password_file", &self.password_file)
            .field("tls_ca", &self.tls_ca)
            .field("pool_size", &self.pool_size)
            .field("connect_timeout", &self.connect_timeout)
            .finish_non_exhaustive()
    }
}

impl PgOptions {
    /// Options for `url` with the defaults.
    pub fn new(url: impl Into<String>) -> Self {
        Self {
            url: Zeroizing::new(url.into()),
            password_file: None,
            tls_ca: None,
            pool_size: DEFAULT_POOL_SIZE,
            connect_timeout: DEFAULT_CONNECT_TIMEOUT,
            startup_wait: DEFAULT_STARTUP_WAIT,
            search_path: None,
        }
    }

    /// The parsed connection settings with the password and TLS mode resolved.
    fn config(&self) -> Result<postgres::Config> {
        let mut config = postgres::Config::from_str(&self.url).map_err(|e| {
            Error::InvalidArgument(format!(
                "the store URL {} is not a PostgreSQL connection string: {e}",
                redacted_url(&self.url)
            ))
        })?;
        if let Some(password) = self.password()? {
            config.password(password.as_bytes());
        }
        config.connect_timeout(self.connect_timeout);
        if config.get_application_name().is_none() {
            config.application_name("tenant-kms");
        }
        if let Some(schema) = &self.search_path {
            // Kept after any options of the connection string; the name is ours, never input.
            let options = match config.get_options() {
                Some(given) => format!("{given} -c search_path={schema}"),
                None => format!("-c search_path={schema}"),
            };
            config.options(&options);
        }
        match (&self.tls_ca, config.get_ssl_mode()) {
            (Some(_), SslMode::Disable) => {
                return Err(Error::InvalidArgument(
                    "--store-tls-ca is set but the store URL says sslmode=disable".into(),
                ));
            }
            (Some(_), _) => {
                config.ssl_mode(SslMode::Require);
            }
            (None, SslMode::Require) => {
                return Err(Error::InvalidArgument(
                    "the store URL requires TLS: name the CA that signs the server's \
                     certificate with --store-tls-ca (or store_tls_ca)"
                        .into(),
                ));
            }
            (None, _) => {
                config.ssl_mode(SslMode::Disable);
                check_plaintext_password(&config)?;
            }
        }
        Ok(config)
    }

    /// The password from the file, else `PGPASSWORD`, else none (the URL's stays).
    fn password(&self) -> Result<Option<Zeroizing<String>>> {
        if let Some(path) = &self.password_file {
            crate::fsutil::check_private(path)?;
            let text = Zeroizing::new(std::fs::read_to_string(path).map_err(|e| {
                Error::FailedPrecondition(format!(
                    "cannot read the store password file {}: {e}",
                    path.display()
                ))
            })?);
            let line = text.lines().next().unwrap_or("");
            if line.is_empty() {
                return Err(Error::FailedPrecondition(format!(
                    "the store password file {} is empty",
                    path.display()
                )));
            }
            return Ok(Some(Zeroizing::new(line.to_owned())));
        }
        Ok(std::env::var(PASSWORD_ENV)
            .ok()
            .filter(|p| !p.is_empty())
            .map(Zeroizing::new))
    }

    /// Where the store is, for logs: hosts, ports and database, never a password.
    pub fn describe(&self) -> String {
        match postgres::Config::from_str(&self.url) {
            Ok(config) => describe(&config),
            Err(_) => redacted_url(&self.url),
        }
    }
}

/// The rule for a password without TLS (no `--store-tls-ca`): refused when any host is
/// reached over TCP at an address that is not loopback (the password, or a SCRAM exchange an
/// eavesdropper can attack offline, would cross the network in the clear); allowed with a
/// warning over loopback TCP (only this machine sees it); allowed silently over Unix sockets.
fn check_plaintext_password(config: &postgres::Config) -> Result<()> {
    if config.get_password().is_none() {
        return Ok(());
    }
    let addrs = config.get_hostaddrs();
    let mut tcp = false;
    for (i, host) in config.get_hosts().iter().enumerate() {
        // `hostaddr`, when given, is where the connection really goes.
        let loopback = match (addrs.get(i), host) {
            (Some(addr), _) => addr.is_loopback(),
            (None, Host::Tcp(name)) => is_loopback_name(name),
            (None, Host::Unix(_)) => continue,
        };
        if !loopback {
            return Err(Error::InvalidArgument(format!(
                "the store URL sends a password to {} over TCP without TLS: name the CA                  that signs the server's certificate with --store-tls-ca (or store_tls_ca),                  or connect over loopback or a Unix socket",
                describe(config)
            )));
        }
        tcp = true;
    }
    if tcp {
        tracing::warn!(
            target_db = %describe(config),
            "the PostgreSQL password goes over loopback TCP without TLS; set --store-tls-ca              to encrypt it"
        );
    }
    Ok(())
}

/// Whether a host name is this machine's loopback (`localhost` or a loopback address).
fn is_loopback_name(name: &str) -> bool {
    name.eq_ignore_ascii_case("localhost")
        || name
            .trim_start_matches('[')
            .trim_end_matches(']')
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

/// Whether a connection string given on the command line carries a password (refused there:
/// every user of the machine can read a process's arguments).
pub fn has_password(url: &str) -> bool {
    postgres::Config::from_str(url).is_ok_and(|c| c.get_password().is_some())
}

/// `host:port,host:port/db` of a parsed configuration.
fn describe(config: &postgres::Config) -> String {
    let ports = config.get_ports();
    let hosts: Vec<String> = config
        .get_hosts()
        .iter()
        .enumerate()
        .map(|(i, host)| {
            let port = ports.get(i).or(ports.first()).copied().unwrap_or(5432);
            match host {
                Host::Tcp(name) => format!("{name}:{port}"),
                Host::Unix(path) => format!("{}:{port}", path.display()),
            }
        })
        .collect();
    format!(
        "{}/{}",
        hosts.join(","),
        config.get_dbname().unwrap_or("(default database)")
    )
}

/// A connection string with any `user:password@` password and `password=` value hidden.
fn redacted_url(url: &str) -> String {
    match postgres::Config::from_str(url) {
        Ok(config) => format!("postgres://{}", describe(&config)),
        Err(_) => "(unparsable connection string)".into(),
    }
}

/// The connection manager of the pool: every connection goes through rustls (with the ring
/// provider), or plaintext when the options name no CA.
type Manager = PostgresConnectionManager<MakeRustlsConnect>;

/// A connection taken from a [`PgPool`]; back in the pool when dropped (or closed, if broken).
pub type PgConnection = r2d2::PooledConnection<Manager>;

/// A bounded pool of blocking PostgreSQL connections. Cheap to clone (one shared pool).
#[derive(Clone)]
pub struct PgPool {
    pool: r2d2::Pool<Manager>,
    target: Arc<str>,
    /// What the pool's connections are made from, for [`PgPool::dedicated`].
    config: Arc<postgres::Config>,
    tls: MakeRustlsConnect,
}

impl std::fmt::Debug for PgPool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PgPool")
            .field("target", &self.target)
            .finish_non_exhaustive()
    }
}

impl PgPool {
    /// Opens the pool. The first connection is retried with back-off (100 ms doubling to 5 s)
    /// for up to `startup_wait` while the database cannot be reached or is still starting,
    /// each wait logged with its reason; an authentication failure or an unknown database is
    /// refused at once. Blocking: call it off the async threads.
    pub fn connect(options: &PgOptions) -> Result<Self> {
        let config = options.config()?;
        let target: Arc<str> = describe(&config).into();
        let tls = tls_connector(options)?;
        let started = Instant::now();
        let mut backoff = FIRST_BACKOFF;
        let mut attempt = 1u32;
        loop {
            match config.connect(tls.clone()) {
                Ok(client) => {
                    drop(client);
                    break;
                }
                Err(e) if retryable(&e) && started.elapsed() < options.startup_wait => {
                    tracing::warn!(
                        target_db = %target,
                        attempt,
                        retry_in_ms = u64::try_from(backoff.as_millis()).unwrap_or(u64::MAX),
                        error = %error_text(&e),
                        "waiting for PostgreSQL: not reachable yet, retrying"
                    );
                    std::thread::sleep(backoff);
                    backoff = (backoff * 2).min(MAX_BACKOFF);
                    attempt += 1;
                }
                Err(e) => {
                    return Err(Error::FailedPrecondition(format!(
                        "cannot connect to PostgreSQL at {target}: {}",
                        error_text(&e)
                    )));
                }
            }
        }
        if attempt > 1 {
            tracing::info!(target_db = %target, attempt, "connected to PostgreSQL");
        }
        let pool = r2d2::Pool::builder()
            .max_size(options.pool_size.max(1))
            // No idle connections demanded: a database that goes away later must not make the
            // pool's own maintenance fail anything; connections are opened on demand.
            .min_idle(Some(0))
            // A broken connection shows as an error on the call that uses it (UNAVAILABLE) and
            // is dropped on return (`has_broken`), so no round trip is spent per checkout.
            .test_on_check_out(false)
            .connection_timeout(options.connect_timeout)
            .error_handler(Box::new(LogErrors))
            .build_unchecked(PostgresConnectionManager::new(config.clone(), tls.clone()));
        Ok(Self {
            pool,
            target,
            config: Arc::new(config),
            tls,
        })
    }

    /// A connection, waiting at most the connect timeout for a free one;
    /// [`Error::Unavailable`] when none can be had (the database is gone or the pool is
    /// exhausted).
    pub fn get(&self) -> Result<PgConnection> {
        self.pool.get().map_err(|e| {
            tracing::warn!(target_db = %self.target, error = %e, "no PostgreSQL connection");
            unreachable_error()
        })
    }

    /// A connection of its own, outside the pool (a LISTEN connection that waits for
    /// notifications for a long time).
    pub fn dedicated(&self) -> Result<postgres::Client> {
        self.config.connect(self.tls.clone()).map_err(map_error)
    }

    /// Where the pool connects, for logs (never a password).
    pub fn target(&self) -> &str {
        &self.target
    }

    /// Runs `f` in one transaction on a pooled connection and commits; rolled back when `f`
    /// fails (or the connection breaks).
    pub fn transaction<T>(
        &self,
        f: impl FnOnce(&mut postgres::Transaction<'_>) -> Result<T>,
    ) -> Result<T> {
        let mut conn = self.get()?;
        let mut tx = conn.transaction().map_err(map_error)?;
        let value = f(&mut tx)?;
        tx.commit().map_err(map_error)?;
        Ok(value)
    }
}

/// Logs what the pool's background connection attempts report (r2d2 would use the `log`
/// crate, which this service does not route).
#[derive(Debug)]
struct LogErrors;

impl r2d2::HandleError<postgres::Error> for LogErrors {
    fn handle_error(&self, error: postgres::Error) {
        tracing::warn!(error = %error_text(&error), "PostgreSQL connection attempt failed");
    }
}

/// The rustls connector: the named CA only (no OS roots), ring as the provider
/// (`crate::tls_client`, shared with the anomaly webhook).
fn tls_connector(options: &PgOptions) -> Result<MakeRustlsConnect> {
    let roots = match &options.tls_ca {
        Some(path) => crate::tls_client::roots_from_pem_file("the store CA", path)?,
        None => rustls::RootCertStore::empty(),
    };
    Ok(MakeRustlsConnect::new(crate::tls_client::client_config(
        roots,
    )?))
}

/// Whether a failed first connection may succeed later: the server is unreachable, closed the
/// connection, or is starting up / shutting down / in recovery (SQLSTATE class 08, 57P01–57P03).
fn retryable(e: &postgres::Error) -> bool {
    match e.as_db_error() {
        None => true,
        Some(db) => connection_lost_code(db.code()),
    }
}

/// SQLSTATEs that mean "the server, not the request": a connection exception (class 08), an
/// operator or crash shutdown, a server that cannot accept connections now, or a standby that
/// cannot take writes (a failover in progress: `read_only_sql_transaction`).
fn connection_lost_code(code: &postgres::error::SqlState) -> bool {
    use postgres::error::SqlState;
    code.code().starts_with("08")
        || *code == SqlState::ADMIN_SHUTDOWN
        || *code == SqlState::CRASH_SHUTDOWN
        || *code == SqlState::CANNOT_CONNECT_NOW
        || *code == SqlState::READ_ONLY_SQL_TRANSACTION
}

/// What every caller reads when the database cannot be reached: no host, no SQL.
fn unreachable_error() -> Error {
    Error::Unavailable("the key store database is unreachable; retry later".into())
}

/// The one mapping of a database error to ours:
/// - the connection is gone, cannot be made or timed out (an I/O error, a TLS failure, a
///   closed connection), or the server is shutting down, starting, or became a standby:
///   [`Error::Unavailable`] (the call fails closed; the pool replaces the connection);
/// - a serialization failure or deadlock: [`Error::ConcurrentChange`];
/// - anything else, from the server (a constraint, a missing table) or from the client (a
///   NULL or wrongly typed column, a value that does not convert, an unexpected row count):
///   [`Error::Internal`], as the SQLite backend maps its own (logged, never sent). Treating
///   those as UNAVAILABLE would invite retries of a fault no retry fixes.
///
/// The text kept is [`error_text`]'s: never a server DETAIL line, which can carry row values.
pub fn map_error(e: postgres::Error) -> Error {
    use postgres::error::SqlState;
    let lost = match e.as_db_error() {
        Some(db) => connection_lost_code(db.code()),
        None => connection_fault(&e),
    };
    if lost {
        tracing::warn!(error = %error_text(&e), "PostgreSQL connection lost or server unavailable");
        return unreachable_error();
    }
    if let Some(code) = e.code()
        && (*code == SqlState::T_R_SERIALIZATION_FAILURE
            || *code == SqlState::T_R_DEADLOCK_DETECTED)
    {
        return Error::ConcurrentChange;
    }
    Error::internal(format!("PostgreSQL: {}", error_text(&e)))
}

/// Whether a client-side error (no server error in it) is a fault of the connection: closed,
/// an I/O error reading, writing or connecting (the crate's `Io`, `Connect`, `Parse` and
/// `Encode` kinds carry a `std::io::Error`), a TLS handshake or a timeout. The crate keeps
/// its error kinds private; the last two are told by the crate's fixed texts for them.
fn connection_fault(e: &postgres::Error) -> bool {
    use std::error::Error as _;
    if e.is_closed() || e.source().is_some_and(|s| s.is::<std::io::Error>()) {
        return true;
    }
    let text = e.to_string();
    text.starts_with("error performing TLS handshake") || text == "timeout waiting for server"
}

/// What of a database error may be written to a log or an internal error: for a server
/// error only its SQLSTATE and primary message (its DETAIL, HINT and WHERE lines can quote
/// row values, e.g. the key of a duplicate row); for a client error the crate's text.
pub fn error_text(e: &postgres::Error) -> String {
    match e.as_db_error() {
        Some(db) => format!(
            "{} {} (SQLSTATE {})",
            db.severity(),
            db.message(),
            db.code().code()
        ),
        None => e.to_string(),
    }
}

thread_local! {
    /// Whether this thread is one of tokio's blocking-pool threads running
    /// [`on_blocking_pool`] work: it runs no async tasks, so the blocking client may run here.
    static ON_BLOCKING_POOL: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Runs `f` with this thread marked as free to block, so that [`off_runtime`] runs its work
/// in place instead of on a thread of its own. Call it only where no async task runs on this
/// thread: inside `tokio::task::spawn_blocking` (the service's `blocking` helper does), never
/// on an async worker thread. The mark is removed when `f` returns or panics.
pub fn on_blocking_pool<T>(f: impl FnOnce() -> T) -> T {
    /// Puts the previous mark back, also when `f` panics.
    struct Restore(bool);
    impl Drop for Restore {
        fn drop(&mut self) {
            ON_BLOCKING_POOL.with(|mark| mark.set(self.0));
        }
    }
    let _restore = Restore(ON_BLOCKING_POOL.with(|mark| mark.replace(true)));
    f()
}

/// Runs `f` where the blocking PostgreSQL client may block. That client drives its connection
/// with a runtime of its own, which tokio refuses to start on a thread that is running async
/// tasks (the server's handlers, `#[tokio::test]` bodies, start-up inside `main`'s runtime);
/// such callers get `f` run on a scoped thread of its own. Every other caller runs it in
/// place: a thread outside any runtime (the audit writer, the change-log follower, commands),
/// and a blocking-pool thread marked by [`on_blocking_pool`] (every store call the service
/// makes), so the hot path spawns no thread per call. A panic in `f` is carried back to the
/// caller unchanged.
pub fn off_runtime<T: Send>(f: impl FnOnce() -> T + Send) -> T {
    if ON_BLOCKING_POOL.with(std::cell::Cell::get) || tokio::runtime::Handle::try_current().is_err()
    {
        return f();
    }
    std::thread::scope(|scope| {
        scope
            .spawn(f)
            .join()
            .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_never_show() {
        let options = PgOptions::new("postgres://kms:s3cret@db1:5433,db2/kms");
        let shown = format!("{options:?} {}", options.describe());
        assert!(!shown.contains("s3cret"), "{shown}");
        assert!(shown.contains("db1:5433,db2:5432/kms"), "{shown}");
        assert!(has_password("postgres://kms:s3cret@db1/kms"));
        assert!(has_password("host=db1 password=x dbname=kms"));
        assert!(!has_password("postgres://kms@db1/kms"));
    }

    #[test]
    fn tls_mode_follows_the_ca() {
        let mut options = PgOptions::new("postgres://kms@db1/kms?sslmode=require");
        assert!(options.config().is_err());
        options.tls_ca = Some("/nonexistent.pem".into());
        assert_eq!(options.config().unwrap().get_ssl_mode(), SslMode::Require);
        let plain = PgOptions::new("postgres://kms@db1/kms");
        assert_eq!(plain.config().unwrap().get_ssl_mode(), SslMode::Disable);
    }

    #[test]
    fn off_runtime_hops_only_from_async_threads() {
        let here = std::thread::current().id();
        // Outside any runtime: in place.
        assert_eq!(off_runtime(|| std::thread::current().id()), here);
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .build()
            .unwrap();
        runtime.block_on(async {
            // On an async thread: a thread of its own.
            let on_worker = std::thread::current().id();
            assert_ne!(off_runtime(|| std::thread::current().id()), on_worker);
            // On the blocking pool through `on_blocking_pool`: in place, and the mark goes
            // away afterwards.
            let (pool_thread, ran_on, after) = tokio::task::spawn_blocking(|| {
                let me = std::thread::current().id();
                let ran_on = on_blocking_pool(|| off_runtime(|| std::thread::current().id()));
                let after = off_runtime(|| std::thread::current().id());
                (me, ran_on, after)
            })
            .await
            .unwrap();
            assert_eq!(ran_on, pool_thread);
            assert_ne!(after, pool_thread);
        });
    }

    #[test]
    fn a_password_without_tls_goes_only_over_loopback_or_a_socket() {
        for refused in [
            "postgres://kms:pw@db1/kms",
            "postgres://kms:pw@127.0.0.1:5432,db2:5432/kms",
            "host=localhost hostaddr=10.0.0.7 user=kms password=pw dbname=kms",
        ] {
            let err = PgOptions::new(refused).config().expect_err(refused);
            let text = err.to_string();
            assert!(
                matches!(err, Error::InvalidArgument(_)),
                "{refused}: {text}"
            );
            assert!(text.contains("--store-tls-ca"), "{refused}: {text}");
            assert!(!text.contains("pw@"), "{refused}: {text}");
        }
        for allowed in [
            "postgres://kms:pw@127.0.0.1/kms",
            "postgres://kms:pw@localhost:5433,[::1]:5434/kms",
            "host=/var/run/postgresql user=kms password=pw dbname=kms",
            // No password: nothing secret crosses the network.
            "postgres://kms@db1/kms",
        ] {
            assert!(PgOptions::new(allowed).config().is_ok(), "{allowed}");
        }
        // With TLS (a CA named) a remote host may take the password.
        let mut options = PgOptions::new("postgres://kms:pw@db1/kms");
        options.tls_ca = Some("/nonexistent.pem".into());
        assert!(options.config().is_ok());
    }

    #[test]
    fn only_connection_faults_are_unavailable() {
        // A connection that cannot be made (nothing listens on port 1): I/O, UNAVAILABLE.
        let refused =
            postgres::Config::from_str("host=127.0.0.1 port=1 user=kms connect_timeout=5")
                .unwrap()
                .connect(postgres::NoTls)
                .err()
                .expect("nothing listens on port 1");
        assert!(matches!(map_error(refused), Error::Unavailable(_)));
        assert!(matches!(
            map_error(postgres::Error::__private_api_timeout()),
            Error::Unavailable(_)
        ));
        // A client-side fault that no retry fixes (here: a malformed setting; a NULL or
        // wrongly typed column is the same kind, tested against the server in
        // tests/integration/postgres.rs): INTERNAL, not UNAVAILABLE.
        let malformed =
            postgres::Config::from_str("no_such_setting=1").expect_err("an unknown setting");
        let mapped = map_error(malformed);
        assert!(matches!(mapped, Error::Internal(_)), "{mapped:?}");
    }

    #[test]
    fn multi_host_read_write_parses() {
        let options =
            PgOptions::new("postgres://kms@db1:5432,db2:5432/kms?target_session_attrs=read-write");
        let config = options.config().unwrap();
        assert_eq!(config.get_hosts().len(), 2);
        assert_eq!(
            config.get_target_session_attrs(),
            postgres::config::TargetSessionAttrs::ReadWrite
        );
    }
}
