//! Long-lived SQLite connections, each lent to one caller at a time.
//!
//! Statements run in place on the borrowing task (see [`super::lite`]). Waiting for a
//! connection is asynchronous: a caller queues (in order) for a permit, one per connection,
//! and then takes the first free connection, so the fewest connections stay busy and no
//! runtime thread blocks on another's statement.
//!
//! A write transaction ([`WriteTx`]) begins with `BEGIN IMMEDIATE`, which takes SQLite's write
//! lock up front, and ends with `COMMIT`; if its owner drops it first (an error, a cancelled
//! request), it is rolled back on the spot.

use std::ops::Deref;
use std::sync::Arc;
use std::time::Duration;

use rusqlite::Connection;
use tokio::sync::{Mutex, OwnedMutexGuard, OwnedSemaphorePermit, Semaphore};

use super::Result;
use super::lite::{db_err, is_busy};

/// The longest sleep between two tries for a write lock held by another process.
const MAX_BUSY_PAUSE: Duration = Duration::from_millis(50);

/// A fixed set of connections.
#[derive(Debug)]
pub(super) struct Conns {
    slots: Vec<Arc<Mutex<Connection>>>,
    permits: Arc<Semaphore>,
}

/// A connection taken, with the permit that let its taker in. The guard is declared first so
/// that it is released first: whoever gets the permit next finds the connection free.
struct Lent {
    guard: OwnedMutexGuard<Connection>,
    _permit: OwnedSemaphorePermit,
}

impl Conns {
    pub(super) fn new(conns: Vec<Connection>) -> Self {
        assert!(!conns.is_empty(), "a connection set needs a connection");
        Self {
            permits: Arc::new(Semaphore::new(conns.len())),
            slots: conns.into_iter().map(|c| Arc::new(Mutex::new(c))).collect(),
        }
    }

    /// A connection (no transaction is ever left open on one).
    pub(super) async fn take(&self) -> Result<Conn> {
        let permit = Arc::clone(&self.permits)
            .acquire_owned()
            .await
            .expect("the permits are never closed");
        // With a permit, at most `slots - 1` others hold one, and each holds at most one
        // connection: one is free (the fallback only waits if that ever stops being true).
        let guard = match self
            .slots
            .iter()
            .find_map(|s| Arc::clone(s).try_lock_owned().ok())
        {
            Some(g) => g,
            None => Arc::clone(&self.slots[0]).lock_owned().await,
        };
        Ok(Conn(Lent {
            guard,
            _permit: permit,
        }))
    }

    /// A write transaction: `BEGIN IMMEDIATE` takes SQLite's write lock up front. While another
    /// process holds the lock (the connection answers "busy" at once when its busy timeout is
    /// zero), it tries again after a sleep, for up to `busy_wait`, without holding a thread.
    pub(super) async fn begin(&self, busy_wait: Duration) -> Result<WriteTx> {
        let Conn(lent) = self.take().await?;
        let deadline = tokio::time::Instant::now() + busy_wait;
        let mut pause = Duration::from_millis(1);
        loop {
            match lent.guard.execute_batch("BEGIN IMMEDIATE") {
                Ok(()) => return Ok(WriteTx(Some(lent))),
                Err(e) if is_busy(&e) && tokio::time::Instant::now() + pause < deadline => {
                    tokio::time::sleep(pause).await;
                    pause = (pause * 2).min(MAX_BUSY_PAUSE);
                }
                Err(e) => return Err(db_err(e)),
            }
        }
    }
}

/// A connection on loan; derefs to the connection, to run statements on.
pub(super) struct Conn(Lent);

impl Deref for Conn {
    type Target = Connection;
    fn deref(&self) -> &Connection {
        &self.0.guard
    }
}

/// A write transaction on a connection on loan. End it with [`WriteTx::commit`]; dropping it
/// rolls back.
pub(super) struct WriteTx(Option<Lent>);

impl WriteTx {
    fn conn(&self) -> &Connection {
        self.0
            .as_ref()
            .expect("a transaction is used until it ends")
            .guard
            .deref()
    }

    pub(super) fn commit(mut self) -> Result<()> {
        let lent = self.0.take().expect("a transaction is used until it ends");
        if let Err(e) = lent.guard.execute_batch("COMMIT") {
            rollback(&lent.guard);
            return Err(db_err(e));
        }
        Ok(())
    }

    pub(super) fn rollback(mut self) {
        if let Some(lent) = self.0.take() {
            rollback(&lent.guard);
        }
    }
}

/// Rolls back whatever is open; "no transaction is active" (SQLite already rolled back after
/// the error) is not a failure.
fn rollback(c: &Connection) {
    if !c.is_autocommit()
        && let Err(e) = c.execute_batch("ROLLBACK")
    {
        tracing::warn!(error = %e, "rolling back an SQLite transaction failed");
    }
}

impl Deref for WriteTx {
    type Target = Connection;
    fn deref(&self) -> &Connection {
        self.conn()
    }
}

impl Drop for WriteTx {
    fn drop(&mut self) {
        if let Some(lent) = self.0.take() {
            rollback(&lent.guard);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn conns(n: usize) -> Conns {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.db");
        let mut out = Vec::new();
        for _ in 0..n {
            let c = Connection::open(&path).unwrap();
            c.execute_batch("PRAGMA journal_mode = WAL").unwrap();
            out.push(c);
        }
        out[0]
            .execute_batch("CREATE TABLE IF NOT EXISTS t (v INTEGER)")
            .unwrap();
        // The directory goes when the test process ends; the connections hold the files open.
        std::mem::forget(dir);
        Conns::new(out)
    }

    async fn count(c: &Conns) -> i64 {
        c.take()
            .await
            .unwrap()
            .query_row("SELECT COUNT(*) FROM t", [], |r| r.get(0))
            .unwrap()
    }

    fn insert(tx: &WriteTx) {
        tx.execute("INSERT INTO t (v) VALUES (1)", []).unwrap();
    }

    #[tokio::test]
    async fn committed_work_stays_and_rolled_back_work_goes() {
        let c = conns(1);
        let tx = c.begin(Duration::ZERO).await.unwrap();
        insert(&tx);
        tx.commit().unwrap();
        let tx = c.begin(Duration::ZERO).await.unwrap();
        insert(&tx);
        tx.rollback();
        assert_eq!(count(&c).await, 1);
    }

    #[tokio::test]
    async fn a_transaction_dropped_midway_is_rolled_back_at_once() {
        let c = conns(2);
        {
            let tx = c.begin(Duration::ZERO).await.unwrap();
            insert(&tx);
        }
        // The write lock is free again: another connection writes without waiting.
        let other = c.take().await.unwrap();
        other.execute("INSERT INTO t (v) VALUES (2)", []).unwrap();
        drop(other);
        assert_eq!(count(&c).await, 1);
        let tx = c.begin(Duration::ZERO).await.unwrap();
        insert(&tx);
        tx.commit().unwrap();
        assert_eq!(count(&c).await, 2);
    }

    #[tokio::test]
    async fn a_waiting_caller_gets_whichever_connection_comes_back_first() {
        let c = Arc::new(conns(2));
        let a = c.take().await.unwrap();
        let b = c.take().await.unwrap();
        let c2 = Arc::clone(&c);
        let waiter = tokio::spawn(async move { count(&c2).await });
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        assert!(!waiter.is_finished(), "both connections are lent");
        // The second connection comes back first; the waiter must not wait for the first.
        drop(b);
        let n = tokio::time::timeout(std::time::Duration::from_secs(5), waiter)
            .await
            .expect("the waiter got the returned connection")
            .unwrap();
        assert_eq!(n, 0);
        drop(a);
    }

    #[tokio::test]
    async fn a_free_connection_is_lent_while_another_is_taken() {
        let c = conns(2);
        let _held = c.take().await.unwrap();
        let got = tokio::time::timeout(std::time::Duration::from_secs(5), c.take()).await;
        assert!(got.is_ok(), "the second connection is free");
    }
}
