//! Wall-clock time, injected.
//!
//! Everything that decides by the calendar asks a [`Clock`] it was given instead of the
//! operating system: the key manager (key-version creation times, which rotation age is
//! measured from; whether a deletion window has passed), token expiry in
//! [`crate::auth::Authenticator`], the deletion window a `ScheduleTenantDeletion` sets, the
//! server's deletion reaper, and `rotate --due`. The clock travels in
//! [`crate::service::ServiceOptions::clock`], so one value reaches all of them.
//!
//! - [`SystemClock`] is the only clock a production build can use; it reads the OS clock
//!   through [`crate::domain::unix_now`] and [`crate::domain::unix_now_micros`].
//! - [`ManualClock`] stands still until told to move. It exists in every build because only
//!   code can construct it (no flag, file or environment value selects it), so a test can
//!   step over a seven-day deletion window in a microsecond instead of sleeping through it.
//! - With the `test-seams` feature (integration-test builds only), a process started with
//!   [`TEST_CLOCK_ENV`] naming a file runs [`OffsetFileClock`]: the system clock plus the
//!   number of seconds in that file. That is how a test moves the time of a `serve` child
//!   process and of the CLI commands it runs. A build without the feature ignores the value:
//!   no production knob fakes time.
//!
//! Monotonic durations (rate limits, request deadlines, timings) use `Instant` and are not
//! wall-clock decisions; they stay outside this seam.

use std::fmt::Debug;
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::Duration;

/// A source of wall-clock time (Unix epoch, UTC).
///
/// Implementations never panic and never go backwards by themselves (a [`ManualClock`] goes
/// back only when a test sets it back).
pub trait Clock: Send + Sync + Debug {
    /// Microseconds since the Unix epoch, now.
    fn now_micros(&self) -> i64;

    /// Whole seconds since the Unix epoch, now (rounded down).
    fn now_unix(&self) -> i64 {
        self.now_micros().div_euclid(1_000_000)
    }
}

/// `micros` (since the Unix epoch) in RFC 3339 with microseconds, UTC; empty for a time
/// before 1970 or past year 9999 (which only a forged or corrupt value holds: the formatter
/// would panic on it).
pub fn rfc3339_micros(micros: i64) -> String {
    u64::try_from(micros)
        .ok()
        .filter(|&us| us < 253_402_300_800_000_000)
        .map(|us| std::time::UNIX_EPOCH + Duration::from_micros(us))
        .map(|t| humantime::format_rfc3339_micros(t).to_string())
        .unwrap_or_default()
}

/// A clock shared by everything one service or command opens.
pub type SharedClock = Arc<dyn Clock>;

/// The operating system's clock: what every production build runs on.
#[derive(Debug, Clone, Copy, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now_micros(&self) -> i64 {
        crate::domain::unix_now_micros()
    }

    fn now_unix(&self) -> i64 {
        crate::domain::unix_now()
    }
}

/// The system clock as a [`SharedClock`].
pub fn system() -> SharedClock {
    Arc::new(SystemClock)
}

/// A clock that moves only when told: [`ManualClock::advance`] or [`ManualClock::set_micros`].
///
/// Shared through an `Arc`; every holder sees a move at once (the time is one atomic).
#[derive(Debug)]
pub struct ManualClock {
    micros: AtomicI64,
}

impl ManualClock {
    /// A clock standing at `micros` since the Unix epoch.
    pub fn at_micros(micros: i64) -> Arc<Self> {
        Arc::new(Self {
            micros: AtomicI64::new(micros),
        })
    }

    /// A clock standing at the system time of its creation: times it gives look real (and
    /// order correctly against records written by other processes), but do not move.
    pub fn starting_now() -> Arc<Self> {
        Self::at_micros(SystemClock.now_micros())
    }

    /// Moves the clock forward by `by` (saturating).
    pub fn advance(&self, by: Duration) {
        let by = i64::try_from(by.as_micros()).unwrap_or(i64::MAX);
        // fetch_update with a closure that always returns Some cannot fail.
        let _ = self
            .micros
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |now| {
                Some(now.saturating_add(by))
            });
    }

    /// Sets the clock to `micros` since the Unix epoch (backwards too, to test that case).
    pub fn set_micros(&self, micros: i64) {
        self.micros.store(micros, Ordering::SeqCst);
    }
}

impl Clock for ManualClock {
    fn now_micros(&self) -> i64 {
        self.micros.load(Ordering::SeqCst)
    }
}

/// The environment value that, in `test-seams` builds only, names the file of an
/// [`OffsetFileClock`].
pub const TEST_CLOCK_ENV: &str = "TENANT_KMS_TEST_CLOCK_FILE";

/// The clock a command of the `tenant-kms` binary runs on: the system clock, or in a
/// `test-seams` build started with [`TEST_CLOCK_ENV`] set, an [`OffsetFileClock`] on that file.
pub fn process_clock() -> SharedClock {
    #[cfg(feature = "test-seams")]
    if let Some(path) = std::env::var_os(TEST_CLOCK_ENV) {
        tracing::warn!(
            path = %std::path::Path::new(&path).display(),
            "test build: wall-clock time is the system clock plus the offset in this file"
        );
        return Arc::new(OffsetFileClock::new(path.into()));
    }
    system()
}

/// The system clock plus a whole number of seconds read from a file at every call, so that
/// a test can move the time of processes it started (a `serve` child, CLI commands) by
/// rewriting one file. Exists only in `test-seams` builds.
///
/// The file holds a signed decimal number of seconds (surrounding white space ignored). A
/// missing or unreadable file counts as 0, so a test that never writes it runs on real time.
#[cfg(feature = "test-seams")]
#[derive(Debug)]
pub struct OffsetFileClock {
    path: std::path::PathBuf,
}

#[cfg(feature = "test-seams")]
impl OffsetFileClock {
    /// A clock reading its offset from `path`.
    pub fn new(path: std::path::PathBuf) -> Self {
        Self { path }
    }

    fn offset_seconds(&self) -> i64 {
        std::fs::read_to_string(&self.path)
            .ok()
            .and_then(|text| text.trim().parse().ok())
            .unwrap_or(0)
    }
}

#[cfg(feature = "test-seams")]
impl Clock for OffsetFileClock {
    fn now_micros(&self) -> i64 {
        SystemClock
            .now_micros()
            .saturating_add(self.offset_seconds().saturating_mul(1_000_000))
    }

    fn now_unix(&self) -> i64 {
        SystemClock.now_unix().saturating_add(self.offset_seconds())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn manual_clock_moves_only_when_told_and_is_shared() {
        let clock = ManualClock::at_micros(1_700_000_000_500_000);
        let shared: SharedClock = clock.clone();
        assert_eq!(shared.now_unix(), 1_700_000_000);
        assert_eq!(shared.now_micros(), 1_700_000_000_500_000);
        clock.advance(Duration::from_millis(600));
        assert_eq!(shared.now_micros(), 1_700_000_001_100_000);
        assert_eq!(shared.now_unix(), 1_700_000_001);
        clock.advance(Duration::from_secs(7 * 86_400));
        assert_eq!(shared.now_unix(), 1_700_000_001 + 7 * 86_400);
        clock.set_micros(-1);
        assert_eq!(
            shared.now_unix(),
            -1,
            "seconds round down, before the epoch too"
        );
        clock.set_micros(i64::MAX - 1);
        clock.advance(Duration::from_secs(1));
        assert_eq!(shared.now_micros(), i64::MAX, "saturates");
    }

    #[test]
    fn system_clock_agrees_with_the_domain_functions() {
        let before = crate::domain::unix_now_micros();
        let micros = SystemClock.now_micros();
        let seconds = SystemClock.now_unix();
        let after = crate::domain::unix_now_micros();
        assert!(before <= micros && micros <= after);
        assert!(before / 1_000_000 <= seconds && seconds <= after / 1_000_000);
    }

    #[test]
    fn starting_now_stands_still() {
        let clock = ManualClock::starting_now();
        let first = clock.now_micros();
        assert!((first - crate::domain::unix_now_micros()).abs() < 60_000_000);
        assert_eq!(clock.now_micros(), first);
    }

    #[cfg(feature = "test-seams")]
    #[test]
    fn offset_file_clock_adds_the_files_seconds() {
        let dir = std::env::temp_dir().join(format!("tkms-clock-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("offset");
        let clock = OffsetFileClock::new(path.clone());
        let real = SystemClock.now_unix();
        assert!(
            (clock.now_unix() - real).abs() <= 1,
            "a missing file is no offset"
        );
        std::fs::write(&path, " 86400\n").unwrap();
        assert!((clock.now_unix() - real - 86_400).abs() <= 1);
        assert!((clock.now_micros() / 1_000_000 - real - 86_400).abs() <= 1);
        std::fs::write(&path, "-60").unwrap();
        assert!((clock.now_unix() - real + 60).abs() <= 1);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
