//! A real PostgreSQL for the tests (issue 14, item 7): a private cluster per test binary in a
//! temporary directory on a free loopback port, made with `initdb` and `pg_ctl` of Debian's
//! `postgresql-15` (run as the `postgres` OS user when the tests run as root), or the server
//! named by `TENANT_KMS_TEST_POSTGRES_URL`. A missing server fails the test with a clear
//! message; nothing is skipped.
//!
//! - [`fresh_database`]: a new, empty database per call (so tests never share state) on the
//!   binary's shared cluster, started on first use and stopped when the test process exits
//!   (statics have no destructors, so a small reaper process waits for this one to die).
//! - [`PgCluster`]: a cluster of a test's own, which it may [`PgCluster::stop`] and
//!   [`PgCluster::start`] again (the database-restart tests).
//!
//! The load generator (`bench/`, `--postgres`) includes this same file (`#[path]`) to start its
//! cluster, with durable settings ([`PgCluster::with_settings`]) instead of the tests' fast
//! ones, so there is one copy of the start-up code.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU32, Ordering};

/// Where Debian's `postgresql-15` puts `initdb` and `pg_ctl`.
pub const BIN_DIR: &str = "/usr/lib/postgresql/15/bin";
/// An external server to use instead of a private cluster: a `postgres://` URL of a role that
/// may create databases.
pub const URL_ENV: &str = "TENANT_KMS_TEST_POSTGRES_URL";
/// The superuser of a private cluster.
const SUPERUSER: &str = "postgres";
/// The settings the tests' clusters run with: no fsync and no full-page writes (a test's data
/// need not survive a power loss, and the tests run faster).
pub const TEST_SETTINGS: &str = "-c fsync=off -c full_page_writes=off";

/// A private PostgreSQL cluster in a temporary directory, on a free loopback port, with
/// password (SCRAM) authentication over TCP. Stopped (immediately) when dropped, or by its
/// reaper when the test process dies.
pub struct PgCluster {
    root: PathBuf,
    data: PathBuf,
    port: u16,
    password: String,
    /// `-c name=value` settings beyond the address, port and socket directory.
    settings: String,
    running: bool,
    _temp: tempfile::TempDir,
}

impl PgCluster {
    /// Makes and starts a new cluster with [`TEST_SETTINGS`]. Panics, saying what to install,
    /// when the server package is missing.
    pub fn new() -> Self {
        Self::with_settings(TEST_SETTINGS)
    }

    /// Makes and starts a new cluster with `settings` (`-c name=value …`, e.g. none for
    /// PostgreSQL's durable defaults). Panics, saying what to install, when the server package
    /// is missing.
    pub fn with_settings(settings: &str) -> Self {
        let initdb = Path::new(BIN_DIR).join("initdb");
        assert!(
            initdb.exists(),
            "PostgreSQL server binaries not found at {BIN_DIR}: install postgresql-15 \
             (apt-get install postgresql-15) or set {URL_ENV} to a server's URL"
        );
        let temp = tempfile::Builder::new()
            .prefix("kms-pg")
            .tempdir()
            .expect("temp dir");
        let root = temp.path().to_path_buf();
        let data = root.join("data");
        let password = random_hex();
        let pwfile = root.join("pw");
        std::fs::write(&pwfile, &password).expect("password file");
        if is_root() {
            run_status(
                Command::new("chown")
                    .args(["-R", "postgres:postgres"])
                    .arg(&root),
                "chown the cluster directory to postgres",
            );
        }
        run_status(
            as_postgres(&initdb)
                .args([
                    "--auth-local=trust",
                    "--auth-host=scram-sha-256",
                    "-U",
                    SUPERUSER,
                ])
                .arg(format!("--pwfile={}", pwfile.display()))
                .args(["-E", "UTF8", "--no-sync", "-D"])
                .arg(&data),
            "initdb",
        );
        let mut cluster = Self {
            root,
            data,
            port: 0,
            password,
            settings: settings.to_owned(),
            running: false,
            _temp: temp,
        };
        cluster.port = free_port();
        spawn_reaper(&cluster.data, &cluster.root);
        cluster.start();
        cluster
    }

    /// Starts the (stopped) cluster again on its port and waits until it accepts connections.
    pub fn start(&mut self) {
        if self.running {
            return;
        }
        let options = format!(
            "-c listen_addresses=127.0.0.1 -c port={} -c unix_socket_directories={} \
             -c shared_buffers=32MB -c max_connections=300 {}",
            self.port,
            self.root.display(),
            self.settings
        );
        run_status(
            as_postgres(&Path::new(BIN_DIR).join("pg_ctl"))
                .arg("-D")
                .arg(&self.data)
                .arg("-l")
                .arg(self.root.join("server.log"))
                .args(["-w", "-t", "120", "-o", &options, "start"]),
            "pg_ctl start",
        );
        self.running = true;
    }

    /// Stops the cluster (fast shutdown: open connections are closed, committed work kept).
    pub fn stop(&mut self) {
        if !self.running {
            return;
        }
        run_status(
            as_postgres(&Path::new(BIN_DIR).join("pg_ctl"))
                .arg("-D")
                .arg(&self.data)
                .args(["-w", "-t", "120", "-m", "fast", "stop"]),
            "pg_ctl stop",
        );
        self.running = false;
    }

    /// The loopback port it listens on.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The process id of the running server's postmaster (its backends are its children),
    /// from `postmaster.pid`.
    pub fn postmaster_pid(&self) -> Option<u32> {
        let text = std::fs::read_to_string(self.data.join("postmaster.pid")).ok()?;
        text.lines().next()?.trim().parse().ok()
    }

    /// The superuser's password.
    pub fn password(&self) -> &str {
        &self.password
    }

    /// A URL of database `db` as the superuser, password included.
    pub fn url(&self, db: &str) -> String {
        format!(
            "postgres://{SUPERUSER}:{}@127.0.0.1:{}/{db}",
            self.password, self.port
        )
    }

    /// A URL of database `db` without the password (give it with a password file).
    pub fn url_without_password(&self, db: &str) -> String {
        format!("postgres://{SUPERUSER}@127.0.0.1:{}/{db}", self.port)
    }

    /// Creates a new empty database and returns its name.
    pub fn create_database(&self) -> String {
        create_database(&self.url("postgres"))
    }

    /// The server's log file (`pg_ctl -l`): with `-c log_statement=all`, one line per
    /// statement executed, i.e. per round trip of a client that sends one statement each.
    pub fn server_log(&self) -> PathBuf {
        self.root.join("server.log")
    }

    /// The cluster's data directory (its relation files are under `base/`).
    pub fn data_dir(&self) -> &Path {
        &self.data
    }

    /// Runs `sql` as the superuser on database `db`.
    pub fn execute(&self, db: &str, sql: &str) {
        let url = self.url(db);
        let sql = sql.to_owned();
        tenant_kms::store::postgres::off_runtime(move || {
            let mut client = ::postgres::Client::connect(&url, ::postgres::NoTls)
                .unwrap_or_else(|e| panic!("cannot connect to the test PostgreSQL: {e}"));
            client
                .batch_execute(&sql)
                .unwrap_or_else(|e| panic!("{sql}: {e}"));
        });
    }

    /// A plain-SQL dump of database `db` (`pg_dump`), as a file in the cluster's directory.
    pub fn dump(&self, db: &str) -> PathBuf {
        let file = self.root.join(format!("{db}-{}.sql", random_hex()));
        run_status(
            as_postgres(&Path::new(BIN_DIR).join("pg_dump"))
                .args(self.socket_args())
                .args(["-U", SUPERUSER, "--no-owner", "-f"])
                .arg(&file)
                .arg(db),
            "pg_dump",
        );
        file
    }

    /// Drops database `db` and creates it again from `dump` (`psql -f`), as an operator
    /// restoring a backup does.
    pub fn restore(&self, db: &str, dump: &Path) {
        self.execute("postgres", &format!("DROP DATABASE {db} WITH (FORCE)"));
        self.execute("postgres", &format!("CREATE DATABASE {db}"));
        run_status(
            as_postgres(&Path::new(BIN_DIR).join("psql"))
                .args(self.socket_args())
                .args(["-U", SUPERUSER, "-q", "-v", "ON_ERROR_STOP=1", "-f"])
                .arg(dump)
                .arg(db),
            "psql (restore)",
        );
    }

    /// The first column of the first row `sql` returns on database `db`, as text (`None`
    /// for no row or NULL).
    pub fn query_text(&self, db: &str, sql: &str) -> Option<String> {
        let url = self.url(db);
        let sql = sql.to_owned();
        tenant_kms::store::postgres::off_runtime(move || {
            let mut client = ::postgres::Client::connect(&url, ::postgres::NoTls)
                .unwrap_or_else(|e| panic!("cannot connect to the test PostgreSQL: {e}"));
            client
                .query_opt(&sql, &[])
                .unwrap_or_else(|e| panic!("{sql}: {e}"))
                .and_then(|row| row.get::<_, Option<String>>(0))
        })
    }

    /// A streaming standby of this (running) cluster: a base backup with `pg_basebackup -R`
    /// (which writes `standby.signal` and the `primary_conninfo` that follows this cluster
    /// over its Unix socket) in a directory of its own, started on a free port. The same
    /// superuser password (the backup copies the roles).
    pub fn standby(&self) -> PgCluster {
        let temp = tempfile::Builder::new()
            .prefix("kms-pg-standby")
            .tempdir()
            .expect("temp dir");
        let root = temp.path().to_path_buf();
        let data = root.join("data");
        if is_root() {
            run_status(
                Command::new("chown")
                    .args(["-R", "postgres:postgres"])
                    .arg(&root),
                "chown the standby directory to postgres",
            );
        }
        run_status(
            as_postgres(&Path::new(BIN_DIR).join("pg_basebackup"))
                .args(self.socket_args())
                .args(["-U", SUPERUSER, "-R", "-X", "stream", "-c", "fast", "-D"])
                .arg(&data),
            "pg_basebackup",
        );
        let mut standby = PgCluster {
            root,
            data,
            port: free_port(),
            password: self.password.clone(),
            running: false,
            settings: self.settings.clone(),
            _temp: temp,
        };
        spawn_reaper(&standby.data, &standby.root);
        standby.start();
        standby
    }

    /// Makes every commit wait until a standby has it (`synchronous_standby_names = '*'`,
    /// `synchronous_commit = on`, the default), once a standby streams; waits until one is
    /// synchronous.
    pub fn require_synchronous_standby(&self) {
        self.execute(
            "postgres",
            "ALTER SYSTEM SET synchronous_standby_names = '*'",
        );
        self.execute("postgres", "ALTER SYSTEM SET synchronous_commit = 'on'");
        self.execute("postgres", "SELECT pg_reload_conf()");
        let started = std::time::Instant::now();
        while self
            .query_text(
                "postgres",
                "SELECT sync_state FROM pg_stat_replication WHERE sync_state = 'sync'",
            )
            .is_none()
        {
            assert!(
                started.elapsed() < std::time::Duration::from_secs(60),
                "no standby became synchronous"
            );
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
    }

    /// Kills the postmaster with SIGKILL (a lost machine): its PID from `postmaster.pid`.
    /// The backends die with it (they notice the postmaster is gone).
    pub fn kill9(&mut self) {
        let pid_file = std::fs::read_to_string(self.data.join("postmaster.pid"))
            .expect("postmaster.pid of a running cluster");
        let pid = pid_file
            .lines()
            .next()
            .and_then(|l| l.trim().parse::<i32>().ok())
            .expect("a PID on the first line of postmaster.pid");
        run_status(
            Command::new("kill").args(["-9", &pid.to_string()]),
            "kill -9 the postmaster",
        );
        self.running = false;
    }

    /// Promotes this standby to a primary (`pg_ctl promote`), waiting until it takes writes.
    pub fn promote(&self) {
        run_status(
            as_postgres(&Path::new(BIN_DIR).join("pg_ctl"))
                .arg("-D")
                .arg(&self.data)
                .args(["-w", "-t", "120", "promote"]),
            "pg_ctl promote",
        );
    }

    /// Connection arguments of the client tools: the Unix socket (trusted locally).
    fn socket_args(&self) -> Vec<String> {
        vec![
            "-h".into(),
            self.root.display().to_string(),
            "-p".into(),
            self.port.to_string(),
        ]
    }
}

impl Drop for PgCluster {
    fn drop(&mut self) {
        if self.running {
            let _ = as_postgres(&Path::new(BIN_DIR).join("pg_ctl"))
                .arg("-D")
                .arg(&self.data)
                .args(["-w", "-m", "immediate", "stop"])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status();
        }
    }
}

/// The server the binary's tests share.
enum Shared {
    External(String),
    Local(PgCluster),
}

fn shared() -> &'static Shared {
    static SHARED: OnceLock<Shared> = OnceLock::new();
    SHARED.get_or_init(|| match std::env::var(URL_ENV) {
        Ok(url) if !url.trim().is_empty() => Shared::External(url),
        _ => Shared::Local(PgCluster::new()),
    })
}

/// The URL of a new, empty database on the binary's shared server (password included).
pub fn fresh_database() -> String {
    match shared() {
        Shared::External(url) => with_database(url, &create_database(url)),
        Shared::Local(cluster) => cluster.url(&cluster.create_database()),
    }
}

/// `url` with its database replaced by `db`.
fn with_database(url: &str, db: &str) -> String {
    let (base, query) = match url.split_once('?') {
        Some((base, query)) => (base, format!("?{query}")),
        None => (url, String::new()),
    };
    let (scheme, rest) = base.split_once("://").expect("a postgres:// URL");
    let authority = rest.split_once('/').map_or(rest, |(a, _)| a);
    format!("{scheme}://{authority}/{db}{query}")
}

/// Creates a database named uniquely for this process through `admin_url`; returns the name.
fn create_database(admin_url: &str) -> String {
    static NEXT: AtomicU32 = AtomicU32::new(1);
    let name = format!(
        "kms_test_{}_{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    );
    // Async tests call this too: the blocking client must run off their runtime.
    tenant_kms::store::postgres::off_runtime(|| {
        let mut client = ::postgres::Client::connect(admin_url, ::postgres::NoTls)
            .unwrap_or_else(|e| panic!("cannot connect to the test PostgreSQL: {e}"));
        client
            .batch_execute(&format!("CREATE DATABASE {name}"))
            .unwrap_or_else(|e| panic!("CREATE DATABASE {name}: {e}"));
    });
    name
}

fn is_root() -> bool {
    rustix::process::geteuid().is_root()
}

/// A command run as the `postgres` OS user when the tests run as root (the server refuses to
/// run as root), else as the current user.
fn as_postgres(program: &Path) -> Command {
    if is_root() {
        let mut command = Command::new("runuser");
        command.args(["-u", "postgres", "--"]).arg(program);
        command
    } else {
        Command::new(program)
    }
}

/// Runs `command`, panicking with its output when it fails.
fn run_status(command: &mut Command, what: &str) {
    let output = command
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("{what}: cannot run: {e}"));
    assert!(
        output.status.success(),
        "{what} failed ({}):\n{}\n{}",
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
}

/// A port nothing listens on now (the kernel's pick for port 0).
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port()
}

fn random_hex() -> String {
    rand::random::<[u8; 16]>()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// A process that outlives nothing: it waits for this test process to exit, then stops the
/// cluster at `data` at once and removes `root` (a static's cluster has no destructor).
fn spawn_reaper(data: &Path, root: &Path) {
    let pg_ctl = Path::new(BIN_DIR).join("pg_ctl");
    let stop = if is_root() {
        format!(
            "runuser -u postgres -- {} -D {} -m immediate stop",
            pg_ctl.display(),
            data.display()
        )
    } else {
        format!(
            "{} -D {} -m immediate stop",
            pg_ctl.display(),
            data.display()
        )
    };
    let script = format!(
        "while kill -0 {pid} 2>/dev/null; do sleep 1; done; {stop} >/dev/null 2>&1; rm -rf {root}",
        pid = std::process::id(),
        root = root.display()
    );
    let _ = Command::new("sh")
        .args(["-c", &script])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn();
}
