//! The change log (issue 14): every committed change of the key store is a row of
//! `kms_changes`, numbered in commit order by the `kms_change_head` row its transaction
//! locks. Each node follows the log by polling (the source of truth: it works through
//! PgBouncer and survives dropped notifications) and is woken early by LISTEN/NOTIFY. A change
//! by another writer moves the store's change generation, so the service drops its caches
//! (tenants, keys, tokens) before the next call is served, and re-checks the row anchor.
//!
//! Fail closed: a node that has not confirmed, within the staleness bound, that it read the
//! log to its end answers [`Error::Unavailable`] from
//! [`ChangeDetection::try_change_generation`](crate::store::ChangeDetection), which the
//! service asks before every call: it cannot serve a token another node revoked or a key
//! another node destroyed past the bound.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, Weak};
use std::time::{Duration, Instant};

use postgres::GenericClient;
use postgres::fallible_iterator::FallibleIterator;

use super::connect::{PgPool, map_error};
use crate::error::{Error, Result};

/// The NOTIFY channel of the change log.
pub(super) const CHANNEL: &str = "kms_changes";

/// Change kinds that other nodes need not drop their caches for: a nonce-budget reservation
/// only raises a count each node reserves atomically in SQL.
const QUIET_KINDS: &[&str] = &["budget"];

/// How often the follow thread re-checks the row anchor against every row MAC even when no
/// other node wrote (a database writer's direct edit leaves no change-log entry).
pub(super) const ROW_RECHECK_EVERY: Duration = Duration::from_secs(30);

/// Every this many changes, the log drops all but the last [`KEEP`].
const PRUNE_EVERY: i64 = 1000;
/// Changes kept in the log.
const KEEP: i64 = 10_000;

/// How long the follower waits between polls: a quarter of the bound (so three polls can
/// fail before the bound passes), between 20 ms and 250 ms.
fn poll_interval(bound: Duration) -> Duration {
    (bound / 4).clamp(Duration::from_millis(20), Duration::from_millis(250))
}

/// Appends a change to the log inside the caller's transaction (which must commit it with
/// the change it describes), numbered after every committed one, and notifies the followers
/// (delivered at commit).
pub(super) fn record(
    tx: &mut impl GenericClient,
    writer: i64,
    node_id: &str,
    kind: &str,
    tenant: Option<&str>,
) -> Result<()> {
    let row = tx
        .query_one(
            "UPDATE kms_change_head SET seq = seq + 1 WHERE id = 1 RETURNING seq",
            &[],
        )
        .map_err(map_error)?;
    let seq: i64 = row.try_get(0).map_err(map_error)?;
    tx.execute(
        "INSERT INTO kms_changes (seq, writer, node_id, kind, tenant_id) \
         VALUES ($1, $2, $3, $4, $5)",
        &[&seq, &writer, &node_id, &kind, &tenant],
    )
    .map_err(map_error)?;
    tx.execute("SELECT pg_notify($1, '')", &[&CHANNEL])
        .map_err(map_error)?;
    if seq % PRUNE_EVERY == 0 {
        // Bounded size: a follower that lags by more than KEEP changes counts the missing
        // rows as changes by others (see `Follower::poll`), so pruning loses no signal.
        tx.execute("DELETE FROM kms_changes WHERE seq <= $1", &[&(seq - KEEP)])
            .map_err(map_error)?;
    }
    Ok(())
}

/// What a node knows of the change log.
pub(super) struct Follower {
    /// This store handle's writer id (its own changes are not changes "elsewhere").
    writer: i64,
    /// The staleness bound.
    bound: Duration,
    /// The last sequence number read, and the generation (changes by others seen so far).
    position: Mutex<Position>,
    /// The generation, readable without the lock.
    generation: AtomicU64,
    /// When the last successful poll began, in microseconds since `epoch`.
    confirmed_micros: AtomicU64,
    epoch: Instant,
}

struct Position {
    seq: i64,
    generation: u64,
}

/// What a poll found.
pub(super) struct Polled {
    /// The generation after the poll.
    pub generation: u64,
    /// Whether another writer changed something since the previous poll.
    pub foreign: bool,
}

impl Follower {
    /// A follower positioned at the log's current end (what came before is not a change
    /// relative to this handle: it reads the store afresh).
    pub fn start(client: &mut impl GenericClient, writer: i64, bound: Duration) -> Result<Self> {
        let began = Instant::now();
        let seq: i64 = client
            .query_one("SELECT seq FROM kms_change_head WHERE id = 1", &[])
            .map_err(map_error)?
            .try_get(0)
            .map_err(map_error)?;
        let follower = Self {
            writer,
            bound,
            position: Mutex::new(Position { seq, generation: 0 }),
            generation: AtomicU64::new(0),
            confirmed_micros: AtomicU64::new(0),
            epoch: began,
        };
        follower.confirm(began);
        Ok(follower)
    }

    fn confirm(&self, began: Instant) {
        let micros = u64::try_from(began.duration_since(self.epoch).as_micros()).unwrap_or(0);
        self.confirmed_micros.fetch_max(micros, Ordering::AcqRel);
    }

    /// Reads the log past the last position. Every change committed before the call began is
    /// seen when it returns.
    pub fn poll(&self, client: &mut impl GenericClient) -> Result<Polled> {
        let began = Instant::now();
        // Plain values: a panic elsewhere cannot leave them half-updated.
        let mut position = self.position.lock().unwrap_or_else(|p| p.into_inner());
        let head: i64 = client
            .query_one("SELECT seq FROM kms_change_head WHERE id = 1", &[])
            .map_err(map_error)?
            .try_get(0)
            .map_err(map_error)?;
        let mut foreign = false;
        if head > position.seq {
            let rows = client
                .query(
                    "SELECT seq, writer, kind FROM kms_changes WHERE seq > $1 AND seq <= $2",
                    &[&position.seq, &head],
                )
                .map_err(map_error)?;
            // Rows pruned before this node read them count as changes by others.
            let expected = usize::try_from(head - position.seq).unwrap_or(usize::MAX);
            foreign = rows.len() < expected
                || rows.iter().any(|row| {
                    let writer: i64 = row.get(1);
                    let kind: &str = row.get(2);
                    writer != self.writer && !QUIET_KINDS.contains(&kind)
                });
            position.seq = head;
            if foreign {
                position.generation += 1;
                self.generation
                    .store(position.generation, Ordering::Release);
            }
        }
        self.confirm(began);
        Ok(Polled {
            generation: position.generation,
            foreign,
        })
    }

    /// The generation as of the last poll, or [`Error::Unavailable`] when no poll confirmed
    /// the log within the staleness bound (fail closed).
    pub fn current(&self) -> Result<u64> {
        let confirmed = Duration::from_micros(self.confirmed_micros.load(Ordering::Acquire));
        let age = self.epoch.elapsed().saturating_sub(confirmed);
        if age > self.bound {
            return Err(Error::Unavailable(
                "this node cannot confirm it has seen the latest key-store changes (the \
                 database is unreachable); retry later"
                    .into(),
            ));
        }
        Ok(self.generation.load(Ordering::Acquire))
    }

    /// The staleness bound.
    pub fn bound(&self) -> Duration {
        self.bound
    }
}

/// What the follow thread calls after a poll that saw another writer's change (the store
/// re-checks its row anchor).
pub(super) trait OnForeignChange: Send + Sync {
    /// Called on the follow thread after such a poll.
    fn foreign_change(&self);
    /// Whether the last re-check could not run to its end: the follow thread then calls
    /// [`OnForeignChange::foreign_change`] again after its next successful poll.
    fn recheck_owed(&self) -> bool;
}

/// Starts the thread that follows the log for `target` until it is dropped: polls every
/// [`poll_interval`], and sooner when a NOTIFY arrives on its own LISTEN connection. Without
/// that connection (the database is gone) it keeps polling through the pool, and re-opens
/// LISTEN when it can.
pub(super) fn spawn<T: OnForeignChange + 'static>(
    pool: PgPool,
    follower: Weak<Follower>,
    target: Weak<T>,
) -> Result<()> {
    std::thread::Builder::new()
        .name("kms-change-log".into())
        .spawn(move || follow(&pool, &follower, &target))
        .map(|_| ())
        .map_err(|e| Error::internal(format!("cannot start the change-log thread: {e}")))
}

fn follow<T: OnForeignChange>(pool: &PgPool, follower: &Weak<Follower>, target: &Weak<T>) {
    let mut listen: Option<postgres::Client> = None;
    let mut failing = false;
    let mut last_recheck = Instant::now();
    loop {
        let Some(me) = follower.upgrade() else {
            return;
        };
        let interval = poll_interval(me.bound());
        if listen.is_none() {
            listen = pool.dedicated().ok().and_then(|mut client| {
                client
                    .batch_execute(&format!("LISTEN {CHANNEL}"))
                    .ok()
                    .map(|()| client)
            });
        }
        let polled = match listen.as_mut() {
            Some(client) => me.poll(client),
            None => pool.get().and_then(|mut conn| me.poll(&mut *conn)),
        };
        match polled {
            Ok(polled) => {
                if failing {
                    tracing::info!("change log: following again");
                    failing = false;
                }
                if let Some(target) = target.upgrade()
                    && (polled.foreign
                        || last_recheck.elapsed() >= ROW_RECHECK_EVERY
                        || target.recheck_owed())
                {
                    last_recheck = Instant::now();
                    target.foreign_change();
                }
            }
            Err(e) => {
                if !failing {
                    tracing::warn!(error = %e, "change log: cannot read it; calls fail closed once the staleness bound passes");
                    failing = true;
                }
                listen = None;
            }
        }
        drop(me);
        let broken = match listen.as_mut() {
            Some(client) => {
                let mut notifications = client.notifications();
                // Drain what arrived during the poll (it is covered by the poll), then wait.
                while let Ok(Some(_)) = notifications.iter().next() {}
                notifications.timeout_iter(interval).next().is_err()
            }
            None => {
                std::thread::sleep(interval);
                false
            }
        };
        if broken {
            listen = None;
        }
    }
}
