//! Group commit for audit entries.
//!
//! Every request on the hot path appends one or more audit entries, and each append is a write
//! transaction on a hash chain that admits one appender at a time (SQLite's single writer, a
//! cluster-wide advisory lock on PostgreSQL). Under load the appenders would queue and commit
//! one by one. Here, concurrent appends share one transaction instead: an appender leaves its
//! entry in a shared list and waits for the chain; whoever holds the chain writes every entry
//! waiting at that moment, in arrival order, in one transaction, and hands each appender its
//! own result. An appender still returns only once its entry is committed (or with the error
//! that stopped the batch), so durability is what it was with one transaction per entry.

use std::future::Future;
use std::sync::Mutex;

use tokio::sync::oneshot;

use super::{AuditEntry, NewAuditEntry, Result, StoreError};

/// Most entries written in one transaction (a multi-row insert; SQLite binds at most 32,766
/// parameters, 11 per entry).
pub(super) const MAX_BATCH: usize = 256;

type Waiter = (NewAuditEntry, oneshot::Sender<Result<AuditEntry>>);

/// Appenders waiting for the chain, and the chain itself.
#[derive(Debug, Default)]
pub(super) struct AuditGroup {
    pending: Mutex<Vec<Waiter>>,
    chain: tokio::sync::Mutex<()>,
}

impl AuditGroup {
    /// Appends `e`, in one transaction with whatever other entries are waiting. `write`
    /// appends a batch in one transaction and returns the entries as stored, in order.
    pub(super) async fn append<F, Fut>(&self, e: &NewAuditEntry, write: F) -> Result<AuditEntry>
    where
        F: Fn(Vec<NewAuditEntry>) -> Fut,
        Fut: Future<Output = Result<Vec<AuditEntry>>> + Send + 'static,
    {
        let (tx, mut rx) = oneshot::channel();
        self.lock_pending().push((e.clone(), tx));
        loop {
            let chain = self.chain.lock().await;
            // A previous holder may have written this entry already.
            match rx.try_recv() {
                Ok(r) => return r,
                Err(oneshot::error::TryRecvError::Closed) => return Err(dropped()),
                Err(oneshot::error::TryRecvError::Empty) => {}
            }
            let batch: Vec<Waiter> = {
                let mut pending = self.lock_pending();
                let n = pending.len().min(MAX_BATCH);
                pending.drain(..n).collect()
            };
            if batch.is_empty() {
                // Taken by a batch that is still being written (its holder's request was
                // abandoned, which released the chain early): wait for that batch's answer.
                drop(chain);
                return rx.await.unwrap_or_else(|_| Err(dropped()));
            }
            let (entries, senders): (Vec<_>, Vec<_>) = batch.into_iter().unzip();
            // The batch is written by a task of its own, so that an appender whose request is
            // abandoned (a client that hangs up) cannot abandon the others' entries with it.
            let write = write(entries);
            let _ = tokio::spawn(async move {
                let n = senders.len();
                match write.await {
                    Ok(stored) if stored.len() == n => {
                        for (s, entry) in senders.into_iter().zip(stored) {
                            let _ = s.send(Ok(entry));
                        }
                    }
                    Ok(_) => {
                        for s in senders {
                            let _ = s.send(Err(StoreError::Database(
                                "audit batch stored a different number of entries".into(),
                            )));
                        }
                    }
                    Err(e) => {
                        let msg = e.to_string();
                        let mut first = Some(e);
                        for s in senders {
                            // Every entry of the batch shares its fate: none was written.
                            let err = first
                                .take()
                                .unwrap_or_else(|| StoreError::Database(msg.clone()));
                            let _ = s.send(Err(err));
                        }
                    }
                }
            })
            .await;
            drop(chain);
            // Ours was in that batch, or is still waiting (the batch was full).
            match rx.try_recv() {
                Ok(r) => return r,
                Err(oneshot::error::TryRecvError::Closed) => return Err(dropped()),
                Err(oneshot::error::TryRecvError::Empty) => {}
            }
        }
    }

    fn lock_pending(&self) -> std::sync::MutexGuard<'_, Vec<Waiter>> {
        // The list holds no invariant a panic could break.
        self.pending.lock().unwrap_or_else(|p| p.into_inner())
    }
}

fn dropped() -> StoreError {
    StoreError::Database("audit batch abandoned".into())
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};

    use super::*;

    fn entry(i: i64) -> NewAuditEntry {
        NewAuditEntry {
            at_ms: i,
            actor: "router".into(),
            action: "test".into(),
            ..Default::default()
        }
    }

    fn stored(seq: i64, e: NewAuditEntry) -> AuditEntry {
        AuditEntry {
            seq,
            entry: e,
            prev_hash: [0; 32],
            hash: [0; 32],
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn concurrent_appends_share_transactions_and_each_gets_its_own_entry() {
        let group = Arc::new(AuditGroup::default());
        let seq = Arc::new(AtomicUsize::new(0));
        let batches = Arc::new(AtomicUsize::new(0));
        let mut handles = Vec::new();
        for i in 0..200 {
            let (group, seq, batches) = (group.clone(), seq.clone(), batches.clone());
            handles.push(tokio::spawn(async move {
                group
                    .append(&entry(i), |es| {
                        let (seq, batches) = (seq.clone(), batches.clone());
                        async move {
                            batches.fetch_add(1, Ordering::SeqCst);
                            tokio::time::sleep(std::time::Duration::from_millis(2)).await;
                            Ok(es
                                .into_iter()
                                .map(|e| stored(seq.fetch_add(1, Ordering::SeqCst) as i64 + 1, e))
                                .collect())
                        }
                    })
                    .await
            }));
        }
        let mut seqs = Vec::new();
        for (i, h) in handles.into_iter().enumerate() {
            let e = h.await.unwrap().unwrap();
            assert_eq!(
                e.entry.at_ms, i as i64,
                "each appender gets its own entry back"
            );
            seqs.push(e.seq);
        }
        seqs.sort_unstable();
        assert_eq!(
            seqs,
            (1..=200).collect::<Vec<_>>(),
            "every entry written once"
        );
        let b = batches.load(Ordering::SeqCst);
        assert!(
            b < 200,
            "concurrent appends were grouped ({b} transactions)"
        );
    }

    #[tokio::test]
    async fn a_failed_batch_fails_every_entry_in_it() {
        let group = AuditGroup::default();
        let r = group
            .append(&entry(1), |_| async {
                Err::<Vec<AuditEntry>, _>(StoreError::Database("disk full".into()))
            })
            .await;
        assert!(matches!(r, Err(StoreError::Database(m)) if m == "disk full"));
        // The next append starts afresh.
        let r = group
            .append(&entry(2), |es| async move {
                Ok(es.into_iter().map(|e| stored(7, e)).collect())
            })
            .await
            .unwrap();
        assert_eq!((r.seq, r.entry.at_ms), (7, 2));
    }
}
