//! Long-lived SQLite connections, each lent to one caller at a time.
//!
//! An SQLite connection in sqlx lives on its own thread, and every command is a round trip to
//! it. sqlx's pool adds two more to every use: it pings a connection when it is taken and again
//! when it is given back (from a spawned task). On a busy router those pings were half of all
//! thread hand-offs, so the SQLite store keeps its connections here instead: taking one is an
//! in-process lock, giving it back is dropping the guard.
//!
//! A write transaction ([`WriteTx`]) is begun and ended with plain `BEGIN IMMEDIATE`, `COMMIT`
//! and `ROLLBACK`. If its owner is dropped before it ends (a cancelled request), the rollback is
//! sent from a spawned task, and the connection is marked so that whoever takes it next rolls
//! back first should that task not have run.

use std::ops::{Deref, DerefMut};
use std::sync::Arc;

use sqlx::sqlite::SqliteConnection;
use tokio::sync::{Mutex, OwnedMutexGuard, OwnedSemaphorePermit, Semaphore};

use super::Result;
use super::sql::db_err;

/// One connection and whether a transaction may still be open on it.
#[derive(Debug)]
pub(super) struct Slot {
    conn: SqliteConnection,
    /// A transaction was begun and not yet seen to end.
    open_tx: bool,
}

/// A fixed set of connections. Callers queue (in order) for a permit, one per connection, and
/// then take the first free connection, so the fewest threads stay busy.
#[derive(Debug)]
pub(super) struct Conns {
    slots: Vec<Arc<Mutex<Slot>>>,
    permits: Arc<Semaphore>,
}

/// A connection taken, with the permit that let its taker in. The guard is declared first so
/// that it is released first: whoever gets the permit next finds the connection free.
struct Lent {
    guard: OwnedMutexGuard<Slot>,
    _permit: OwnedSemaphorePermit,
}

impl Conns {
    pub(super) fn new(conns: Vec<SqliteConnection>) -> Self {
        assert!(!conns.is_empty(), "a connection set needs a connection");
        Self {
            permits: Arc::new(Semaphore::new(conns.len())),
            slots: conns
                .into_iter()
                .map(|conn| {
                    Arc::new(Mutex::new(Slot {
                        conn,
                        open_tx: false,
                    }))
                })
                .collect(),
        }
    }

    /// A connection with no transaction open on it.
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
        let mut lent = Lent {
            guard,
            _permit: permit,
        };
        if lent.guard.open_tx {
            rollback(&mut lent.guard).await?;
        }
        Ok(Conn(lent))
    }

    /// A write transaction: `BEGIN IMMEDIATE` takes SQLite's write lock up front.
    pub(super) async fn begin(&self, begin: &'static str) -> Result<WriteTx> {
        let Conn(mut lent) = self.take().await?;
        lent.guard.open_tx = true;
        if let Err(e) = sqlx::raw_sql(begin).execute(&mut lent.guard.conn).await {
            // BEGIN failed (busy): no transaction is open.
            lent.guard.open_tx = false;
            return Err(db_err(e));
        }
        Ok(WriteTx(Some(lent)))
    }
}

impl Conns {
    /// A write transaction whose `BEGIN IMMEDIATE` the caller sends at the head of its first
    /// statement (`"BEGIN IMMEDIATE; …"`), saving a round trip to the connection's thread. The
    /// transaction counts as open from now on, so an error anywhere, `BEGIN` included, is
    /// followed by a rollback.
    pub(super) async fn begin_deferred(&self) -> Result<WriteTx> {
        let Conn(mut lent) = self.take().await?;
        lent.guard.open_tx = true;
        Ok(WriteTx(Some(lent)))
    }
}

async fn rollback(slot: &mut Slot) -> Result<()> {
    match sqlx::raw_sql("ROLLBACK").execute(&mut slot.conn).await {
        Ok(_) => {}
        // "cannot rollback - no transaction is active": SQLite ended it already (an error
        // that rolls back by itself, or a COMMIT that went through before its caller left).
        Err(e) if e.to_string().contains("no transaction is active") => {}
        Err(e) => return Err(db_err(e)),
    }
    slot.open_tx = false;
    Ok(())
}

/// A connection on loan; derefs to the connection, to run statements on.
pub(super) struct Conn(Lent);

impl Deref for Conn {
    type Target = SqliteConnection;
    fn deref(&self) -> &SqliteConnection {
        &self.0.guard.conn
    }
}

impl DerefMut for Conn {
    fn deref_mut(&mut self) -> &mut SqliteConnection {
        &mut self.0.guard.conn
    }
}

/// A write transaction on a connection on loan. End it with [`WriteTx::commit`] or
/// [`WriteTx::rollback`]; dropping it rolls back.
pub(super) struct WriteTx(Option<Lent>);

impl WriteTx {
    fn slot(&mut self) -> &mut Slot {
        &mut self
            .0
            .as_mut()
            .expect("a transaction is used until it ends")
            .guard
    }

    pub(super) async fn commit(mut self) -> Result<()> {
        let slot = self.slot();
        match sqlx::raw_sql("COMMIT").execute(&mut slot.conn).await {
            Ok(_) => {
                slot.open_tx = false;
                Ok(())
            }
            Err(e) => {
                let _ = rollback(slot).await;
                Err(db_err(e))
            }
        }
    }

    pub(super) async fn rollback(mut self) -> Result<()> {
        rollback(self.slot()).await
    }

    /// Ends a transaction begun deferred, after its body: `Ok((value, true))` when the body's
    /// last statement ended with a `COMMIT` that went through, `Ok((value, false))` when the body
    /// kept nothing (rolled back now); after an error, rolled back at once.
    pub(super) async fn end<T>(mut self, r: Result<(T, bool)>) -> Result<T> {
        match r {
            Ok((value, true)) => {
                self.slot().open_tx = false;
                Ok(value)
            }
            Ok((value, false)) => {
                self.rollback().await?;
                Ok(value)
            }
            Err(e) => {
                let _ = self.rollback().await;
                Err(e)
            }
        }
    }
}

impl Deref for WriteTx {
    type Target = SqliteConnection;
    fn deref(&self) -> &SqliteConnection {
        &self
            .0
            .as_ref()
            .expect("a transaction is used until it ends")
            .guard
            .conn
    }
}

impl DerefMut for WriteTx {
    fn deref_mut(&mut self) -> &mut SqliteConnection {
        &mut self.slot().conn
    }
}

impl Drop for WriteTx {
    fn drop(&mut self) {
        let Some(mut lent) = self.0.take() else {
            return;
        };
        if !lent.guard.open_tx {
            return;
        }
        // Give the write lock back now rather than when the connection is next taken.
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            rt.spawn(async move {
                let _ = rollback(&mut lent.guard).await;
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use sqlx::ConnectOptions;
    use sqlx::sqlite::SqliteConnectOptions;

    use super::*;

    async fn conns(n: usize) -> Conns {
        // One shared-cache in-memory database, so every connection sees the same table.
        let name = format!(
            "file:conns-{}?mode=memory&cache=shared",
            uuid::Uuid::new_v4()
        );
        let opts = SqliteConnectOptions::new()
            .filename(&name)
            .shared_cache(true);
        let mut out = Vec::new();
        for _ in 0..n {
            out.push(opts.connect().await.unwrap());
        }
        let c = Conns::new(out);
        sqlx::raw_sql("CREATE TABLE t (v INTEGER)")
            .execute(&mut *c.take().await.unwrap())
            .await
            .unwrap();
        c
    }

    async fn count(c: &Conns) -> i64 {
        sqlx::query_scalar("SELECT COUNT(*) FROM t")
            .fetch_one(&mut *c.take().await.unwrap())
            .await
            .unwrap()
    }

    async fn insert(tx: &mut WriteTx) {
        sqlx::query("INSERT INTO t (v) VALUES (1)")
            .execute(&mut **tx)
            .await
            .unwrap();
    }

    #[tokio::test]
    async fn committed_work_stays_and_rolled_back_work_goes() {
        let c = conns(1).await;
        let mut tx = c.begin("BEGIN IMMEDIATE").await.unwrap();
        insert(&mut tx).await;
        tx.commit().await.unwrap();
        let mut tx = c.begin("BEGIN IMMEDIATE").await.unwrap();
        insert(&mut tx).await;
        tx.rollback().await.unwrap();
        assert_eq!(count(&c).await, 1);
    }

    #[tokio::test]
    async fn a_transaction_dropped_midway_is_rolled_back_before_the_next_use() {
        let c = conns(1).await;
        let mut tx = c.begin("BEGIN IMMEDIATE").await.unwrap();
        insert(&mut tx).await;
        drop(tx);
        // Whether the spawned rollback ran first or the next taker rolls back, the next
        // transaction begins cleanly and the dropped insert is gone.
        let mut tx = c.begin("BEGIN IMMEDIATE").await.unwrap();
        insert(&mut tx).await;
        tx.commit().await.unwrap();
        assert_eq!(count(&c).await, 1);

        // A caller cancelled while its transaction is open (an abandoned request).
        let held = c.begin("BEGIN IMMEDIATE").await.unwrap();
        let cancelled = tokio::spawn(async move {
            let mut tx = held;
            insert(&mut tx).await;
            futures::future::pending::<()>().await;
        });
        tokio::task::yield_now().await;
        cancelled.abort();
        let _ = cancelled.await;
        let mut tx = c.begin("BEGIN IMMEDIATE").await.unwrap();
        insert(&mut tx).await;
        tx.commit().await.unwrap();
        assert_eq!(count(&c).await, 2);
    }

    #[tokio::test]
    async fn a_deferred_transaction_begins_and_commits_inside_the_callers_statements() {
        let c = conns(1).await;
        let mut tx = c.begin_deferred().await.unwrap();
        sqlx::raw_sql("BEGIN IMMEDIATE; INSERT INTO t (v) VALUES (1)")
            .execute(&mut *tx)
            .await
            .unwrap();
        let r = sqlx::raw_sql("INSERT INTO t (v) VALUES (2); COMMIT")
            .execute(&mut *tx)
            .await
            .map(|_| ((), true))
            .map_err(super::super::sql::db_err);
        tx.end(r).await.unwrap();
        assert_eq!(count(&c).await, 2);

        // A statement that fails after BEGIN leaves the transaction open: the rollback undoes
        // the statements before it.
        let mut tx = c.begin_deferred().await.unwrap();
        let failed = sqlx::raw_sql(
            "BEGIN IMMEDIATE; INSERT INTO t (v) VALUES (3); INSERT INTO nope VALUES (1)",
        )
        .execute(&mut *tx)
        .await;
        assert!(failed.is_err());
        tx.rollback().await.unwrap();
        assert_eq!(count(&c).await, 2);

        // The same, with the caller gone before it could roll back.
        let mut tx = c.begin_deferred().await.unwrap();
        sqlx::raw_sql("BEGIN IMMEDIATE; INSERT INTO t (v) VALUES (4)")
            .execute(&mut *tx)
            .await
            .unwrap();
        drop(tx);
        assert_eq!(count(&c).await, 2);
        // Nothing was begun at all: the rollback finds no transaction and that is fine.
        c.begin_deferred().await.unwrap().rollback().await.unwrap();
    }

    #[tokio::test]
    async fn a_waiting_caller_gets_whichever_connection_comes_back_first() {
        let c = std::sync::Arc::new(conns(2).await);
        let (first, second) = (c.take().await.unwrap(), c.take().await.unwrap());
        let waiter = std::sync::Arc::clone(&c);
        let waiting = tokio::spawn(async move {
            drop(waiter.take().await.unwrap());
        });
        tokio::task::yield_now().await;
        // The second connection comes back; the first stays taken.
        drop(second);
        tokio::time::timeout(std::time::Duration::from_secs(5), waiting)
            .await
            .expect("the waiter got the connection that came back")
            .unwrap();
        drop(first);
    }

    #[tokio::test]
    async fn a_free_connection_is_lent_while_another_is_taken() {
        let c = conns(2).await;
        let first = c.take().await.unwrap();
        let second = tokio::time::timeout(std::time::Duration::from_secs(5), c.take())
            .await
            .expect("the second connection is free")
            .unwrap();
        drop((first, second));
        // With every connection taken, a caller waits for one to come back.
        let (a, b) = (c.take().await.unwrap(), c.take().await.unwrap());
        let waiting = tokio::time::timeout(std::time::Duration::from_millis(50), c.take()).await;
        assert!(waiting.is_err(), "no third connection");
        drop(a);
        drop(b);
        tokio::time::timeout(std::time::Duration::from_secs(5), c.take())
            .await
            .expect("a connection came back")
            .unwrap();
    }
}
