//! The orphan sweep: deletes sealed blobs that no task names and none ever will.
//!
//! Retention deletes the blobs tasks name. A few paths leave a stored blob that no row names:
//! a prompt uploaded (or presigned) for a task that was never submitted, a prompt stored at the
//! edge by a router that stopped before it queued the task, a result uploaded by a miner whose
//! lease lapsed and who lost to another (through another replica, or after a second upload on
//! the same lease), a result uploaded by a miner that stopped before submitting it. They are
//! sealed, but a deployment promises that blobs go when their task is done with them.
//!
//! A pass lists the blob store (page by page, bounded memory) and deletes a blob only when all
//! of these hold, and leaves it alone otherwise:
//! - it is older than the grace period (`orphan_grace_secs`, a day by default), so that a blob
//!   between its upload and the row that names it is never taken;
//! - its name is laid out as the router names blobs, `{session}/{task}/{purpose}-{uuid}.veil`
//!   under the store's prefix (anything else is not the router's to judge, and is counted as
//!   unrecognized);
//! - its task does not exist while its session does (a name under a session this database
//!   does not know is another deployment's: left alone, counted as foreign), or its task has
//!   ended (completed, failed, dead, cancelled: no new blob of it can become its prompt or
//!   result), belongs to the session of the name, has no key rewrap in its journal, and names
//!   this blob neither as its stored prompt nor as its stored result.
//!
//! Each deletion is audited as `blob.delete` with reason `orphan` (ids, URN, size; never
//! content) and counted in `veil_retention_deletions_total{reason="orphan"}`. Deleting is
//! idempotent, so replicas sweeping at once are harmless. A failed listing or store query ends
//! the pass; the next one starts over.

use std::collections::hash_map::Entry;
use std::collections::{HashMap, HashSet};
use std::time::{Duration, SystemTime};

use futures::StreamExt;
use serde_json::json;
use uuid::Uuid;
use veil_blobstore::{BlobMeta, BlobName, Urn};

use crate::state::AppState;
use crate::store::{NewAuditEntry, StoreError, Task, TaskState};

/// Listed blobs judged per round of task lookups.
const BATCH: usize = 256;

/// What one pass found and did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct OrphanReport {
    /// Objects listed.
    pub listed: u64,
    /// Objects younger than the grace period, left alone.
    pub young: u64,
    /// Objects whose names are not laid out as the router names blobs, left alone.
    pub unrecognized: u64,
    /// Blobs of tasks still queued or leased, or named by their task, or under a key rewrap.
    pub kept: u64,
    /// Blobs named for a session this database does not know (another deployment's), left
    /// alone.
    pub foreign: u64,
    /// Orphans deleted (and audited).
    pub deleted: u64,
    /// Orphans whose deletion or audit entry failed (tried again on the next pass).
    pub failed: u64,
}

/// One pass over the whole store at `now`: deletes every blob older than the configured grace
/// period that no task names (see the module documentation for the exact rule).
pub async fn sweep(state: &AppState, now: SystemTime) -> anyhow::Result<OrphanReport> {
    let grace = Duration::from_secs(state.cfg.orphan_grace_secs);
    let cutoff = now.checked_sub(grace).unwrap_or(SystemTime::UNIX_EPOCH);
    let rewrapping: HashSet<Uuid> = state
        .store
        .rewrap_journal()
        .await?
        .into_iter()
        .map(|j| j.task_id)
        .collect();
    let mut report = OrphanReport::default();
    let mut listing = std::pin::pin!(state.blobs.list());
    let mut batch = Vec::with_capacity(BATCH);
    while let Some(item) = listing.next().await {
        let meta = item?;
        report.listed += 1;
        if meta.last_modified > cutoff {
            report.young += 1;
            continue;
        }
        match state.blobs.name_of(&meta.urn) {
            Some(
                name @ BlobName {
                    task_id: Some(task_id),
                    ..
                },
            ) => batch.push((meta, name, task_id)),
            // Session-scope names: the router stores no such blob (every upload is task scope).
            _ => report.unrecognized += 1,
        }
        if batch.len() >= BATCH {
            judge(state, &rewrapping, std::mem::take(&mut batch), &mut report).await?;
            tokio::task::yield_now().await;
        }
    }
    judge(state, &rewrapping, batch, &mut report).await?;
    Ok(report)
}

/// Looks up the tasks of `batch` (in one read) and deletes the blobs found to be orphans.
async fn judge(
    state: &AppState,
    rewrapping: &HashSet<Uuid>,
    batch: Vec<(BlobMeta, BlobName, Uuid)>,
    report: &mut OrphanReport,
) -> anyhow::Result<()> {
    // The batch's tasks in one read (one statement on PostgreSQL, whatever the batch's size).
    let ids: Vec<Uuid> = batch.iter().map(|(_, _, id)| *id).collect();
    let tasks: HashMap<Uuid, Task> = state
        .store
        .get_tasks(&ids)
        .await?
        .into_iter()
        .map(|t| (t.id, t))
        .collect();
    let mut sessions: HashMap<Uuid, bool> = HashMap::new();
    for (meta, name, task_id) in batch {
        let task = tasks.get(&task_id);
        let orphan = match task {
            // No such task: an orphan only under a session of this deployment. A blob under a
            // session this database does not know is another deployment's (a bucket shared
            // without separate prefixes), never this sweep's to delete.
            None => {
                if let Entry::Vacant(slot) = sessions.entry(name.session_id) {
                    slot.insert(match state.store.get_session(name.session_id).await {
                        Ok(_) => true,
                        Err(StoreError::NotFound { .. }) => false,
                        Err(e) => return Err(e.into()),
                    });
                }
                if !sessions[&name.session_id] {
                    report.foreign += 1;
                    continue;
                }
                true
            }
            Some(t) => {
                t.session_id == name.session_id
                    && !rewrapping.contains(&t.id)
                    && !names(t, &meta.urn)
                    && ended(t.state)
            }
        };
        if !orphan {
            report.kept += 1;
            continue;
        }
        match delete(state, &meta, &name, task_id, task).await {
            Ok(()) => report.deleted += 1,
            Err(e) => {
                report.failed += 1;
                metrics::counter!("veil_orphan_sweep_failures_total").increment(1);
                tracing::warn!(%task_id, blob = name.purpose.as_str(), error = %e,
                    "orphan sweep: deleting an unnamed blob failed; trying again on the next pass");
            }
        }
    }
    Ok(())
}

/// Whether the task names `urn` as a blob it still has (its prompt or result, not deleted).
fn names(t: &Task, urn: &Urn) -> bool {
    let is = |stored: &str| stored.parse::<Urn>().is_ok_and(|u| &u == urn);
    (t.prompt_deleted_at_ms.is_none() && is(&t.prompt_urn))
        || (t.result_deleted_at_ms.is_none()
            && t.result.as_ref().is_some_and(|r| is(&r.result_urn)))
}

/// Whether a task in this state can no longer come to name a new blob.
fn ended(state: TaskState) -> bool {
    match state {
        TaskState::Queued | TaskState::Leased => false,
        TaskState::Completed | TaskState::Failed | TaskState::Dead | TaskState::Cancelled => true,
    }
}

async fn delete(
    state: &AppState,
    meta: &BlobMeta,
    name: &BlobName,
    task_id: Uuid,
    task: Option<&Task>,
) -> anyhow::Result<()> {
    state.blobs.delete(&meta.urn).await?;
    let kind = name.purpose.as_str();
    metrics::counter!("veil_retention_deletions_total", "kind" => kind, "reason" => "orphan")
        .increment(1);
    state
        .store
        .audit(&NewAuditEntry {
            at_ms: crate::state::now_ms(),
            actor: "router".into(),
            action: "blob.delete".into(),
            session_id: Some(name.session_id),
            task_id: Some(task_id),
            key_version: task.map(|t| t.key_version),
            detail: json!({
                "blob": kind,
                "reason": "orphan",
                "urn": meta.urn.to_string(),
                "size": meta.size,
                "task": if task.is_some() { "ended" } else { "absent" },
            }),
            ..Default::default()
        })
        .await
        .map_err(|e| anyhow::anyhow!("the blob was deleted, but its audit entry failed: {e}"))?;
    tracing::info!(%task_id, blob = kind, "orphan sweep: unnamed blob deleted");
    Ok(())
}

/// Runs [`sweep`] every `orphan_sweep_interval_secs` (never when it is 0), the first pass one
/// interval after start.
pub async fn sweeper(state: AppState) {
    let secs = state.cfg.orphan_sweep_interval_secs;
    if secs == 0 {
        return;
    }
    let period = Duration::from_secs(secs);
    loop {
        tokio::time::sleep(period).await;
        match sweep(&state, SystemTime::now()).await {
            Ok(r) => tracing::info!(
                listed = r.listed,
                young = r.young,
                unrecognized = r.unrecognized,
                kept = r.kept,
                foreign = r.foreign,
                deleted = r.deleted,
                failed = r.failed,
                "orphan sweep done"
            ),
            Err(e) => {
                metrics::counter!("veil_orphan_sweep_failures_total").increment(1);
                tracing::warn!(error = %e, "orphan sweep failed; trying again on the next pass");
            }
        }
    }
}
