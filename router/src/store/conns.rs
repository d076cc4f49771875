//! Long-lived SQLite connections, each lent to one caller at a time.
//!
//! Statements run in place on the borrowing task (see [`super::lite`]). Waiting for a
//! connection is asynchronous: a caller queues (in order) for a permit, one per connection,
//! and then takes the first free connection, so the fewest connections stay busy and no
//! runtime thread blocks on another's statement.
//!
//! A write transaction ([`WriteTx`]) holds SQLite's write lock from its start (`BEGIN
//! IMMEDIATE`); if its owner drops it before committing (an error, a cancelled request), its
//! work is rolled back on the spot.
//!
//! On a connection set made [`with_group_commit`](Conns::with_group_commit), write
//! transactions that queue for the connection share one SQLite transaction (group commit):
//! each runs as a savepoint of the open transaction. A write done while nobody is waiting
//! commits at once, as on its own; a write done while others wait leaves the transaction open
//! for them and queues a committer task behind them, which commits once for all. Whoever
//! queued for the connection before the committer joins the group; whoever queues after it
//! starts the next one. A caller's [`commit`](WriteTx::commit) returns once the
//! whole group is committed, with the group's error if it is not, so that a caller is never
//! answered before its writes are durable as far as SQLite's commit makes them. One commit
//! for many callers writes each shared page (a table's last leaf, an index's) to the log once
//! instead of once per caller, and the readers' page caches are invalidated once.

use std::ops::Deref;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use rusqlite::Connection;
use tokio::sync::{Mutex, OwnedMutexGuard, OwnedSemaphorePermit, Semaphore, watch};

use super::lite::{db_err, is_busy};
use super::{Result, StoreError};

/// Why a group fails when its transaction ended without a commit.
const ROLLED_BACK: &str = "SQLite rolled the shared transaction back";

/// The longest sleep between two tries for a write lock held by another process.
const MAX_BUSY_PAUSE: Duration = Duration::from_millis(50);

/// A fixed set of connections.
#[derive(Debug)]
pub(super) struct Conns {
    slots: Vec<Arc<Mutex<Connection>>>,
    permits: Arc<Semaphore>,
    /// The open group transaction, on a set with group commit.
    group: Option<std::sync::Mutex<Group>>,
    /// Callers waiting for a connection.
    queued: AtomicUsize,
}

/// Counts a caller as queued until it has a connection (or gives up waiting).
struct Queued<'a>(&'a AtomicUsize);

impl<'a> Queued<'a> {
    fn new(n: &'a AtomicUsize) -> Self {
        n.fetch_add(1, Ordering::SeqCst);
        Self(n)
    }
}

impl Drop for Queued<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

/// How a group transaction ended: `Err` carries SQLite's message.
type Outcome = std::result::Result<(), String>;

/// The group transaction open on a connection set with group commit.
#[derive(Debug, Default)]
struct Group {
    /// Where the open group's outcome goes; `None` when no group transaction is open.
    current: Option<watch::Sender<Option<Outcome>>>,
    /// Whether a committer is queued for the open group (its first member is done).
    committer: bool,
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
            group: None,
            queued: AtomicUsize::new(0),
        }
    }

    /// A single write connection whose write transactions commit in groups (see the module
    /// documentation). Reads must not use it: they would see uncommitted group writes.
    pub(super) fn with_group_commit(conn: Connection) -> Self {
        Self {
            group: Some(std::sync::Mutex::default()),
            ..Self::new(vec![conn])
        }
    }

    /// A connection (no transaction is ever left open on one, except a group transaction on a
    /// set with group commit).
    pub(super) async fn take(&self) -> Result<Conn> {
        let queued = Queued::new(&self.queued);
        let permit = Arc::clone(&self.permits)
            .acquire_owned()
            .await
            .expect("the permits are never closed");
        drop(queued);
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
    /// With group commit, it joins the open group transaction instead when there is one.
    pub(super) async fn begin(self: &Arc<Self>, busy_wait: Duration) -> Result<WriteTx> {
        let Conn(lent) = self.take().await?;
        let Some(group) = &self.group else {
            let lent = begin_immediate(lent, busy_wait).await?;
            return Ok(WriteTx {
                lent: Some(lent),
                member: None,
            });
        };
        let open = lock(group).current.is_some();
        if open && lent.guard.is_autocommit() {
            // SQLite ended the group's transaction itself (after an I/O error, say).
            fail_group(group, ROLLED_BACK);
        }
        let lent = if !open || lent.guard.is_autocommit() {
            let lent = begin_immediate(lent, busy_wait).await?;
            lock(group).current = Some(watch::channel(None).0);
            lent
        } else {
            lent
        };
        if let Err(e) = lent.guard.execute_batch("SAVEPOINT member") {
            end_unused_group(&lent.guard, group);
            return Err(db_err(e));
        }
        let outcome = lock(group)
            .current
            .as_ref()
            .expect("a group transaction is open")
            .subscribe();
        Ok(WriteTx {
            lent: Some(lent),
            member: Some((Arc::clone(self), outcome)),
        })
    }
}

/// `BEGIN IMMEDIATE`, tried again after asynchronous sleeps while another process holds the
/// write lock, for up to `busy_wait`.
async fn begin_immediate(lent: Lent, busy_wait: Duration) -> Result<Lent> {
    let deadline = tokio::time::Instant::now() + busy_wait;
    let mut pause = Duration::from_millis(1);
    loop {
        match lent.guard.execute_batch("BEGIN IMMEDIATE") {
            Ok(()) => return Ok(lent),
            Err(e) if is_busy(&e) && tokio::time::Instant::now() + pause < deadline => {
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(MAX_BUSY_PAUSE);
            }
            Err(e) => return Err(db_err(e)),
        }
    }
}

fn lock(group: &std::sync::Mutex<Group>) -> std::sync::MutexGuard<'_, Group> {
    group.lock().unwrap_or_else(|p| p.into_inner())
}

/// Ends the open group with an error for all of its members.
fn fail_group(group: &std::sync::Mutex<Group>, message: &str) {
    let mut g = lock(group);
    g.committer = false;
    if let Some(tx) = g.current.take() {
        let _ = tx.send(Some(Err(message.to_owned())));
    }
}

/// Rolls the open group transaction back if no member of it is waiting for its commit (none
/// is done yet): it would hold SQLite's write lock for nothing.
fn end_unused_group(c: &Connection, group: &std::sync::Mutex<Group>) {
    let mut g = lock(group);
    if !g.committer {
        g.current = None;
        rollback(c);
    }
}

/// Commits the open group transaction of `conns`, queued behind the members that joined it.
async fn commit_group(conns: Arc<Conns>) {
    let Ok(Conn(lent)) = conns.take().await else {
        return;
    };
    let group = conns.group.as_ref().expect("a set with group commit");
    let Some(tx) = ({
        let mut g = lock(group);
        g.committer = false;
        g.current.take()
    }) else {
        // Already ended (it failed).
        return;
    };
    let outcome = if lent.guard.is_autocommit() {
        Err(ROLLED_BACK.to_owned())
    } else {
        commit_or_roll_back(&lent.guard).map_err(|e| e.to_string())
    };
    if let Err(e) = &outcome {
        tracing::warn!(error = %e, "a group commit failed; its members' writes are rolled back");
    }
    // Nobody may be waiting any more (cancelled requests): their writes are committed anyway.
    let _ = tx.send(Some(outcome));
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
/// rolls its work back.
pub(super) struct WriteTx {
    lent: Option<Lent>,
    /// With group commit: the connection set, and where the group's outcome arrives.
    member: Option<(Arc<Conns>, watch::Receiver<Option<Outcome>>)>,
}

impl WriteTx {
    fn conn(&self) -> &Connection {
        self.lent
            .as_ref()
            .expect("a transaction is used until it ends")
            .guard
            .deref()
    }

    /// Commits: at once on its own, or, as a member of a group, once the group's committer has
    /// committed everyone's writes (the group's error if that fails).
    pub(super) async fn commit(mut self) -> Result<()> {
        let lent = self
            .lent
            .take()
            .expect("a transaction is used until it ends");
        let Some((conns, mut outcome)) = self.member.take() else {
            return commit_or_roll_back(&lent.guard).map_err(db_err);
        };
        let group = conns.group.as_ref().expect("a set with group commit");
        if let Err(e) = lent.guard.execute_batch("RELEASE member") {
            rollback_member(&lent.guard, group);
            return Err(db_err(e));
        }
        let spawn = {
            let mut g = lock(group);
            if !g.committer && conns.queued.load(Ordering::SeqCst) == 0 {
                // The only member done, and nobody waiting to join: commit now.
                let tx = g.current.take();
                drop(g);
                let done = commit_or_roll_back(&lent.guard);
                if let (Err(e), Some(tx)) = (&done, tx) {
                    let _ = tx.send(Some(Err(e.to_string())));
                }
                return done.map_err(db_err);
            }
            !std::mem::replace(&mut g.committer, true)
        };
        drop(lent);
        if spawn {
            tokio::spawn(commit_group(Arc::clone(&conns)));
        }
        let abandoned = || StoreError::Database("the shared commit was abandoned".into());
        let done = outcome
            .wait_for(Option::is_some)
            .await
            .map_err(|_| abandoned())?;
        match done.as_ref().ok_or_else(abandoned)? {
            Ok(()) => Ok(()),
            Err(e) => Err(StoreError::Database(e.clone())),
        }
    }

    pub(super) fn rollback(mut self) {
        self.undo();
    }

    fn undo(&mut self) {
        let Some(lent) = self.lent.take() else {
            return;
        };
        match self.member.take() {
            None => rollback(&lent.guard),
            Some((conns, _)) => {
                rollback_member(&lent.guard, conns.group.as_ref().expect("group commit"))
            }
        }
    }
}

/// Undoes one member's work and leaves the group going; if SQLite already rolled the whole
/// transaction back, or undoing fails, the group ends with an error.
fn rollback_member(c: &Connection, group: &std::sync::Mutex<Group>) {
    if c.is_autocommit() {
        fail_group(group, ROLLED_BACK);
        return;
    }
    if let Err(e) = c.execute_batch("ROLLBACK TO member; RELEASE member") {
        tracing::warn!(error = %e, "rolling back a write in a shared SQLite transaction failed");
        rollback(c);
        fail_group(group, &e.to_string());
        return;
    }
    end_unused_group(c, group);
}

/// Commits; a commit that fails is rolled back, so that nothing stays open.
fn commit_or_roll_back(c: &Connection) -> rusqlite::Result<()> {
    c.execute_batch("COMMIT").inspect_err(|_| rollback(c))
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
        self.undo();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn connections(n: usize) -> Vec<Connection> {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.db");
        let mut out = Vec::new();
        for _ in 0..n {
            let c = Connection::open(&path).unwrap();
            c.execute_batch("PRAGMA journal_mode = WAL").unwrap();
            c.busy_timeout(Duration::ZERO).unwrap();
            out.push(c);
        }
        out[0]
            .execute_batch("CREATE TABLE IF NOT EXISTS t (v INTEGER UNIQUE)")
            .unwrap();
        // The directory goes when the test process ends; the connections hold the files open.
        std::mem::forget(dir);
        out
    }

    fn conns(n: usize) -> Arc<Conns> {
        Arc::new(Conns::new(connections(n)))
    }

    /// A writer with group commit, and a reader on the same file.
    fn grouped() -> (Arc<Conns>, Conns) {
        let mut c = connections(2);
        let reader = Conns::new(vec![c.pop().unwrap()]);
        (Arc::new(Conns::with_group_commit(c.pop().unwrap())), reader)
    }

    async fn count(c: &Conns) -> i64 {
        c.take()
            .await
            .unwrap()
            .query_row("SELECT COUNT(*) FROM t", [], |r| r.get(0))
            .unwrap()
    }

    fn insert(tx: &WriteTx) {
        insert_v(tx, 1).unwrap();
    }

    fn insert_v(tx: &WriteTx, v: i64) -> rusqlite::Result<usize> {
        tx.execute("INSERT INTO t (v) VALUES (?1)", [v])
    }

    async fn values(c: &Conns) -> Vec<i64> {
        let conn = c.take().await.unwrap();
        let mut st = conn.prepare("SELECT v FROM t ORDER BY v").unwrap();
        st.query_map([], |r| r.get(0))
            .unwrap()
            .collect::<rusqlite::Result<_>>()
            .unwrap()
    }

    #[tokio::test]
    async fn committed_work_stays_and_rolled_back_work_goes() {
        let c = conns(1);
        let tx = c.begin(Duration::ZERO).await.unwrap();
        insert(&tx);
        tx.commit().await.unwrap();
        let tx = c.begin(Duration::ZERO).await.unwrap();
        insert_v(&tx, 2).unwrap();
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
        insert_v(&tx, 3).unwrap();
        tx.commit().await.unwrap();
        assert_eq!(count(&c).await, 2);
    }

    #[tokio::test]
    async fn a_waiting_caller_gets_whichever_connection_comes_back_first() {
        let c = conns(2);
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

    /// Frames in the write-ahead log (each commit appends the pages it changed).
    async fn log_frames(c: &Conns) -> i64 {
        c.take()
            .await
            .unwrap()
            .query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |r| r.get(1))
            .unwrap()
    }

    /// Starts `n` writers that queue behind `held` (the writer, taken), each inserting its
    /// value and committing, and answering what its commit returned and what a reader saw
    /// right after it.
    async fn queued_writers(
        w: &Arc<Conns>,
        r: &Arc<Conns>,
        vs: &[i64],
    ) -> Vec<tokio::task::JoinHandle<(Result<()>, Vec<i64>)>> {
        let mut tasks = Vec::new();
        for &v in vs {
            let (w, r) = (Arc::clone(w), Arc::clone(r));
            tasks.push(tokio::spawn(async move {
                let tx = w.begin(Duration::ZERO).await.unwrap();
                match insert_v(&tx, v) {
                    Ok(_) => {
                        let done = tx.commit().await;
                        (done, values(&r).await)
                    }
                    Err(e) => {
                        tx.rollback();
                        (Err(db_err(e)), values(&r).await)
                    }
                }
            }));
            tokio::task::yield_now().await;
        }
        // Let every writer queue for the connection.
        tokio::time::sleep(Duration::from_millis(50)).await;
        tasks
    }

    #[tokio::test]
    async fn queued_writes_share_one_commit_and_each_is_visible_when_its_commit_returns() {
        let (w, r) = grouped();
        let r = Arc::new(r);
        // Copies the log into the database, so that the next commit starts it over.
        log_frames(&r).await;
        let held = w.take().await.unwrap();
        let tasks = queued_writers(&w, &r, &[1, 2, 3, 4, 5, 6, 7, 8, 9, 10]).await;
        drop(held);
        for (v, t) in (1..=10).zip(tasks) {
            let (done, seen) = t.await.unwrap();
            done.unwrap();
            assert!(
                seen.contains(&v),
                "{v} is committed when its commit returns"
            );
        }
        assert_eq!(values(&r).await, (1..=10).collect::<Vec<_>>());
        // Ten commits of their own would have appended the table's page and the index's ten
        // times over; one commit appends them once.
        let frames = log_frames(&r).await;
        assert!(frames <= 3, "{frames} log frames for one group");

        // Alone, a write still commits (and is visible) before its commit returns.
        let tx = w.begin(Duration::ZERO).await.unwrap();
        insert_v(&tx, 11).unwrap();
        tx.commit().await.unwrap();
        assert_eq!(values(&r).await.last(), Some(&11));
    }

    #[tokio::test]
    async fn a_write_rolled_back_in_a_group_leaves_the_others_in_it() {
        let (w, r) = grouped();
        let r = Arc::new(r);
        let held = w.take().await.unwrap();
        // The second 2 breaks the unique constraint; its caller rolls back.
        let tasks = queued_writers(&w, &r, &[1, 2, 2, 3]).await;
        drop(held);
        let mut outcomes = Vec::new();
        for t in tasks {
            outcomes.push(t.await.unwrap().0.is_ok());
        }
        assert_eq!(outcomes, [true, true, false, true]);
        assert_eq!(values(&r).await, [1, 2, 3]);
    }

    #[tokio::test]
    async fn a_write_dropped_midway_in_a_group_is_undone_and_the_group_goes_on() {
        let (w, r) = grouped();
        let first = w.begin(Duration::ZERO).await.unwrap();
        insert_v(&first, 1).unwrap();
        let w2 = Arc::clone(&w);
        // Queued behind `first`, so that the group stays open.
        let second = tokio::spawn(async move {
            let tx = w2.begin(Duration::ZERO).await.unwrap();
            insert_v(&tx, 3).unwrap();
            tx.commit().await
        });
        tokio::time::sleep(Duration::from_millis(20)).await;
        let w3 = Arc::clone(&w);
        let dropped = tokio::spawn(async move {
            let tx = w3.begin(Duration::ZERO).await.unwrap();
            insert_v(&tx, 2).unwrap();
            // A cancelled request: the transaction is dropped before its commit.
        });
        tokio::time::sleep(Duration::from_millis(20)).await;
        first.commit().await.unwrap();
        second.await.unwrap().unwrap();
        dropped.await.unwrap();
        assert_eq!(values(&r).await, [1, 3]);
        // Nothing is left open: another connection can write.
        let tx = r.take().await.unwrap();
        tx.execute("INSERT INTO t (v) VALUES (4)", []).unwrap();
    }

    #[tokio::test]
    async fn a_group_whose_commit_fails_fails_every_member_and_keeps_nothing() {
        let (w, r) = grouped();
        let r = Arc::new(r);
        {
            let c = w.take().await.unwrap();
            // A deferred foreign key is checked at COMMIT, so a row breaking it lets its own
            // savepoint through and fails the shared commit.
            c.execute_batch(
                "PRAGMA foreign_keys = ON; CREATE TABLE p (id INTEGER PRIMARY KEY); \
                 CREATE TABLE c (p INTEGER REFERENCES p(id) DEFERRABLE INITIALLY DEFERRED)",
            )
            .unwrap();
        }
        let held = w.take().await.unwrap();
        let mut tasks = queued_writers(&w, &r, &[1]).await;
        let w2 = Arc::clone(&w);
        tasks.insert(
            0,
            tokio::spawn(async move {
                let tx = w2.begin(Duration::ZERO).await.unwrap();
                tx.execute("INSERT INTO c (p) VALUES (7)", []).unwrap();
                (tx.commit().await, Vec::new())
            }),
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
        drop(held);
        for t in tasks {
            let (done, _) = t.await.unwrap();
            let e = done.expect_err("the shared commit failed");
            assert!(e.to_string().contains("FOREIGN KEY"), "{e}");
        }
        assert!(values(&r).await.is_empty());
        // The next write starts a new group and commits.
        let tx = w.begin(Duration::ZERO).await.unwrap();
        insert_v(&tx, 5).unwrap();
        tx.commit().await.unwrap();
        assert_eq!(values(&r).await, [5]);
    }
}
