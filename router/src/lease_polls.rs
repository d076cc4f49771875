//! Waiting lease polls, woken one at a time.
//!
//! A miner keeps many lease requests open (one per free slot). When each new task woke every
//! one of them, all but one looked at the queue for nothing: under load that was more than one
//! failed write transaction per task, all on the single SQLite writer. Here a task's
//! `TaskAvailable` event wakes the longest-waiting poll that serves its model. A poll that was
//! woken and still found nothing passes the wake on, but only to a poll of a miner that has not
//! looked yet: polls of the same miner see the same queue (same models, same allowlists), so
//! when one of them found nothing the others would too.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};

use tokio::sync::{broadcast, oneshot};

use crate::store::StoreEvent;

/// Why a waiting poll was woken: a task of `model` may be waiting. `tried` names the miners
/// whose polls looked since and found nothing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Wake {
    /// The model of the task; `None` when events were missed (any model).
    pub model: Option<String>,
    /// Miners that looked after this wake and found nothing.
    pub tried: Vec<String>,
}

#[derive(Debug)]
struct Waiter {
    id: u64,
    miner: String,
    models: Arc<[String]>,
    wake: oneshot::Sender<Wake>,
}

#[derive(Debug, Default)]
struct Queue {
    next_id: u64,
    waiting: VecDeque<Waiter>,
}

impl Queue {
    /// Wakes the longest-waiting poll that serves `wake.model` and whose miner has not tried.
    fn wake_one(&mut self, mut wake: Wake) {
        let mut i = 0;
        while i < self.waiting.len() {
            let w = &self.waiting[i];
            let serves = wake.model.as_ref().is_none_or(|m| w.models.contains(m));
            if !serves || wake.tried.contains(&w.miner) {
                i += 1;
                continue;
            }
            let Some(w) = self.waiting.remove(i) else {
                return;
            };
            match w.wake.send(wake) {
                Ok(()) => return,
                // That poll is gone: the next one gets the wake.
                Err(back) => wake = back,
            }
        }
    }

    fn wake_all(&mut self) {
        for w in self.waiting.drain(..) {
            let _ = w.wake.send(Wake {
                model: None,
                tried: Vec::new(),
            });
        }
    }
}

/// The lease polls waiting on this replica.
#[derive(Debug)]
pub struct LeasePolls {
    queue: Arc<Mutex<Queue>>,
    router: Option<tokio::task::JoinHandle<()>>,
}

fn lock(q: &Mutex<Queue>) -> std::sync::MutexGuard<'_, Queue> {
    // The queue holds no invariant that a panic could break.
    q.lock().unwrap_or_else(|p| p.into_inner())
}

impl LeasePolls {
    /// Starts routing `events` (on the current runtime; without one, polls only time out and
    /// look again).
    pub fn start(mut events: broadcast::Receiver<StoreEvent>) -> Self {
        let queue: Arc<Mutex<Queue>> = Arc::default();
        let q = Arc::clone(&queue);
        let router = tokio::runtime::Handle::try_current().ok().map(|rt| {
            rt.spawn(async move {
                use broadcast::error::RecvError;
                loop {
                    match events.recv().await {
                        Ok(StoreEvent::TaskAvailable { model }) => lock(&q).wake_one(Wake {
                            model: Some(model),
                            tried: Vec::new(),
                        }),
                        Ok(_) => {}
                        // Events were missed: every poll looks again.
                        Err(RecvError::Lagged(_)) => lock(&q).wake_all(),
                        Err(RecvError::Closed) => return,
                    }
                }
            })
        });
        Self { queue, router }
    }

    /// Queues a poll of `miner` for `models`. Take it before looking at the queue, so that a
    /// task that arrives after the look is not missed.
    pub fn wait(&self, miner: &str, models: Arc<[String]>) -> LeaseWait {
        let (tx, rx) = oneshot::channel();
        let mut q = lock(&self.queue);
        let id = q.next_id;
        q.next_id += 1;
        q.waiting.push_back(Waiter {
            id,
            miner: miner.to_owned(),
            models,
            wake: tx,
        });
        LeaseWait {
            queue: Arc::clone(&self.queue),
            id,
            rx,
        }
    }

    /// Passes on a wake: after the poll of `looked` found nothing, or untaken (`None`: the
    /// poll ended before it looked).
    pub fn pass_on(&self, mut wake: Wake, looked: Option<&str>) {
        if let Some(miner) = looked
            && !wake.tried.iter().any(|m| m == miner)
        {
            wake.tried.push(miner.to_owned());
        }
        lock(&self.queue).wake_one(wake);
    }
}

impl Drop for LeasePolls {
    fn drop(&mut self) {
        if let Some(t) = &self.router {
            t.abort();
        }
    }
}

/// One queued poll; leaves the queue when dropped. A wake it received and did not take is
/// passed on as it came.
#[derive(Debug)]
pub struct LeaseWait {
    queue: Arc<Mutex<Queue>>,
    id: u64,
    rx: oneshot::Receiver<Wake>,
}

impl LeaseWait {
    /// Resolves when a task may be waiting for this poll (never, should the router be gone:
    /// callers poll as well).
    pub async fn woken(&mut self) -> Wake {
        match (&mut self.rx).await {
            Ok(w) => w,
            Err(_) => std::future::pending().await,
        }
    }
}

impl Drop for LeaseWait {
    fn drop(&mut self) {
        let mut q = lock(&self.queue);
        if let Some(i) = q.waiting.iter().position(|w| w.id == self.id) {
            q.waiting.remove(i);
        } else if let Ok(w) = self.rx.try_recv() {
            // Woken, but the poll ended another way (it found a task, timed out, or its
            // caller left): the task that woke it may still be waiting for someone.
            q.wake_one(w);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn models(m: &[&str]) -> Arc<[String]> {
        m.iter().map(|s| s.to_string()).collect()
    }

    async fn woken(w: &mut LeaseWait) -> Option<Wake> {
        tokio::time::timeout(Duration::from_millis(200), w.woken())
            .await
            .ok()
    }

    #[tokio::test]
    async fn a_task_wakes_one_poll_of_its_model_the_longest_waiting() {
        let (tx, _) = broadcast::channel(16);
        let polls = LeasePolls::start(tx.subscribe());
        let mut other = polls.wait("0xa", models(&["other"]));
        let mut first = polls.wait("0xa", models(&["m"]));
        let mut second = polls.wait("0xa", models(&["m", "other"]));
        tx.send(StoreEvent::TaskAvailable { model: "m".into() })
            .unwrap();
        let w = woken(&mut first).await.expect("the first poll of m wakes");
        assert_eq!(w.model.as_deref(), Some("m"));
        assert!(woken(&mut second).await.is_none(), "only one poll wakes");
        assert!(woken(&mut other).await.is_none());

        tx.send(StoreEvent::TaskAvailable { model: "m".into() })
            .unwrap();
        assert!(
            woken(&mut second).await.is_some(),
            "the next task, the next poll"
        );
        drop(first);
        drop(second);
        assert_eq!(lock(&polls.queue).waiting.len(), 1, "only `other` waits");
        drop(other);
        assert!(lock(&polls.queue).waiting.is_empty());
    }

    #[tokio::test]
    async fn a_wake_that_found_nothing_goes_only_to_miners_that_have_not_looked() {
        let (tx, _) = broadcast::channel(16);
        let polls = LeasePolls::start(tx.subscribe());
        let mut a1 = polls.wait("0xa", models(&["m"]));
        let mut a2 = polls.wait("0xa", models(&["m"]));
        let mut b = polls.wait("0xb", models(&["m"]));
        tx.send(StoreEvent::TaskAvailable { model: "m".into() })
            .unwrap();
        let w = woken(&mut a1).await.unwrap();
        // a1 looked and found nothing (say, a private session that allows only 0xb).
        polls.pass_on(w, Some("0xa"));
        assert!(woken(&mut a2).await.is_none(), "same miner, same answer");
        let w = woken(&mut b).await.expect("another miner looks");
        assert_eq!(w.tried, vec!["0xa".to_string()]);
        // b found nothing either: nobody else to ask.
        polls.pass_on(w, Some("0xb"));
        assert!(woken(&mut a2).await.is_none());
    }

    #[tokio::test]
    async fn a_wake_left_untaken_is_passed_on_and_missed_events_wake_every_poll() {
        let (tx, _) = broadcast::channel(2);
        let polls = LeasePolls::start(tx.subscribe());
        let a1 = polls.wait("0xa", models(&["m"]));
        let mut a2 = polls.wait("0xa", models(&["m"]));
        tx.send(StoreEvent::TaskAvailable { model: "m".into() })
            .unwrap();
        // a1 is woken but ends another way (it found an older task first).
        tokio::time::sleep(Duration::from_millis(50)).await;
        drop(a1);
        assert!(woken(&mut a2).await.is_some(), "its wake went on to a2");

        let mut polls_left: Vec<_> = (0..3).map(|_| polls.wait("0xa", models(&["x"]))).collect();
        for _ in 0..4 {
            let _ = tx.send(StoreEvent::TaskFinished {
                task_id: uuid::Uuid::now_v7(),
            });
        }
        tx.send(StoreEvent::TaskAvailable { model: "m".into() })
            .unwrap();
        for w in &mut polls_left {
            let got = woken(w).await.expect("a lagged router wakes everyone");
            assert_eq!(got.model, None);
        }
    }
}
