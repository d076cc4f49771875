//! The retention sweeper: deletes the sealed blobs that their session's retention policy (or
//! its close) says must go, and audits each deletion with ids and hashes, never content.
//!
//! A deletion is: delete the object (idempotent: a missing object is fine), then record it in
//! the task row and append the `blob.delete` audit entry in one transaction. A crash between
//! the two leaves the row unrecorded, and the next pass deletes again (a no-op) and records it;
//! two replicas sweeping at once both delete, and only one records and audits. A blob whose
//! deletion fails stays due and is retried on the next pass.

use std::time::Duration;

use serde_json::json;

use crate::state::AppState;
use crate::store::{BlobKind, DeletionReason, DueDeletion, NewAuditEntry};

/// Blobs handled per store query.
const BATCH: u32 = 256;

/// How long a woken sweeper waits for more deliveries before its pass, so that a busy router
/// sweeps a few times a second rather than once per delivery (each pass queries the store).
const WAKE_GATHER: Duration = Duration::from_millis(100);

/// What one pass did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct SweepReport {
    /// Blobs deleted and recorded by this pass.
    pub deleted: u64,
    /// Blobs whose deletion failed (retried later).
    pub failed: u64,
}

fn reason_str(r: DeletionReason) -> &'static str {
    match r {
        DeletionReason::SessionClosed => "session_closed",
        DeletionReason::Delivered => "delivered",
        DeletionReason::Ttl => "ttl",
    }
}

/// Deletes every blob due at `now_ms`, batch by batch.
pub async fn sweep(state: &AppState, now_ms: i64) -> crate::store::Result<SweepReport> {
    let mut report = SweepReport::default();
    let mut failed_urns = std::collections::HashSet::new();
    loop {
        let due = state.store.due_deletions(now_ms, BATCH).await?;
        // A short batch was everything due: no need to ask again.
        let last = due.len() < BATCH as usize;
        let fresh: Vec<DueDeletion> = due
            .into_iter()
            .filter(|d| !failed_urns.contains(&d.urn))
            .collect();
        if fresh.is_empty() {
            return Ok(report);
        }
        let mut progressed = false;
        for d in fresh {
            match delete_one(state, &d, now_ms).await {
                Ok(recorded) => {
                    progressed = true;
                    if recorded {
                        report.deleted += 1;
                        metrics::counter!("veil_retention_deletions_total",
                            "kind" => d.kind.as_str(), "reason" => reason_str(d.reason))
                        .increment(1);
                    }
                }
                Err(e) => {
                    report.failed += 1;
                    metrics::counter!("veil_retention_failures_total").increment(1);
                    tracing::warn!(task_id = %d.task_id, kind = d.kind.as_str(), error = %e,
                        "retention: deleting a blob failed; retrying on the next pass");
                    failed_urns.insert(d.urn.clone());
                }
            }
        }
        if !progressed || last {
            return Ok(report);
        }
    }
}

async fn delete_one(state: &AppState, d: &DueDeletion, now_ms: i64) -> anyhow::Result<bool> {
    let urn: veil_blobstore::Urn = d.urn.parse()?;
    state.blobs.delete(&urn).await?;
    let audit = NewAuditEntry {
        at_ms: now_ms,
        actor: "router".into(),
        action: "blob.delete".into(),
        session_id: Some(d.session_id),
        task_id: Some(d.task_id),
        key_version: Some(d.key_version),
        detail: json!({
            "blob": d.kind.as_str(),
            "reason": reason_str(d.reason),
            "urn": d.urn,
            "hash": hex::encode(d.hash),
        }),
        ..Default::default()
    };
    let recorded = state
        .store
        .record_deletion(d.task_id, d.kind, &d.urn, now_ms, &audit)
        .await?;
    if recorded {
        tracing::info!(task_id = %d.task_id, blob = d.kind.as_str(),
            reason = reason_str(d.reason), "retention: blob deleted");
    }
    Ok(recorded)
}

/// Runs [`sweep`] every `retention_sweep_interval_ms`, and shortly (`WAKE_GATHER`) after
/// being woken ([`crate::state::Inner::retention_wake`]).
pub async fn sweeper(state: AppState) {
    let period = Duration::from_millis(state.cfg.retention_sweep_interval_ms);
    loop {
        tokio::select! {
            _ = tokio::time::sleep(period) => {}
            _ = state.retention_wake.notified() => {
                tokio::time::sleep(WAKE_GATHER.min(period)).await;
            }
        }
        if let Err(e) = sweep(&state, crate::state::now_ms()).await {
            tracing::warn!(error = %e, "retention pass failed");
        }
    }
}

/// Whether a task's blob of this kind is still stored.
pub fn blob_present(task: &crate::store::Task, kind: BlobKind) -> bool {
    match kind {
        BlobKind::Prompt => task.prompt_deleted_at_ms.is_none(),
        BlobKind::Result => task.result.is_some() && task.result_deleted_at_ms.is_none(),
    }
}
