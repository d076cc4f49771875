//! Key lifecycle (protocol §2): status, rotation, retirement, destruction (crypto-shredding),
//! the rewrap job that re-seals router-sealed blobs under the active version, and the reload
//! of a keyring changed by another process. Used by the admin API (`api::keys`) and by the
//! operator CLI (`veil-router keys …`); every change is audited (metadata only, never a seed).

use std::io::{BufRead, IsTerminal, Write};
use std::sync::Mutex;
use std::time::Duration;

use futures::StreamExt;
use serde::Serialize;
use serde_json::json;
use utoipa::ToSchema;
use uuid::Uuid;
use veil_blobstore::Urn;
use veil_keys::{
    BlobParams, FRAME_LEN_LEN, HEADER_LEN, KeyId, KeyState, Opener, Purpose, Scope, Sealer,
    SecretKey,
};

use crate::config::{Config, KeysCommand};
use crate::error::{ApiError, ApiResult};
use crate::server::StartError;
use crate::state::{AppState, now_ms};
use crate::store::{
    BlobKind, KeyVersionUsage, MovedBlob, NewAuditEntry, NewRewrap, RewrapJournal, RewrapSwitch,
    Task,
};

/// How often a running router looks for a changed keyring file.
pub const KEYRING_RELOAD_INTERVAL: Duration = Duration::from_secs(2);
/// Tasks per rewrap batch unless told otherwise.
pub const DEFAULT_REWRAP_BATCH: u32 = 100;
/// Largest rewrap batch.
pub const MAX_REWRAP_BATCH: u32 = 10_000;

// ---------------------------------------------------------------------------------------------
// Status

/// The key service's state: versions and pointers, never seeds.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct KeyStatus {
    /// Where the keyring comes from: `file` (the router's own, changeable), `secret_file`
    /// (a read-only file from a secret manager), `env` (`VEIL_KEYRING`) or `memory`.
    pub source: String,
    /// Whether rotate, retire and destroy are refused here (every source but `file`).
    pub read_only: bool,
    /// The version new encryptions use.
    pub active: u32,
    /// Versions below this are retired (refuse to derive keys).
    pub min_decrypt: u32,
    /// When the active version was created (the last rotation), Unix seconds.
    pub rotated_at: u64,
    /// Every version, oldest first.
    pub versions: Vec<KeyVersionStatus>,
    /// Key versions that tasks in the database use but the keyring does not know: a keyring
    /// that does not belong to this database, or a lost one. Empty when all is well.
    pub unknown_versions: Vec<KeyVersionUsage>,
}

/// One key version.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct KeyVersionStatus {
    /// The version.
    pub version: u32,
    /// `active`, `decrypt_only`, `retired` or `destroyed`.
    #[schema(value_type = String)]
    pub state: KeyState,
    /// Created (rotated to), Unix seconds.
    pub created_at: u64,
    /// When the next version was created and this one stopped sealing new blobs, Unix seconds.
    pub superseded_at: Option<u64>,
    /// Retired, Unix seconds.
    pub retired_at: Option<u64>,
    /// Seed destroyed, Unix seconds.
    pub destroyed_at: Option<u64>,
    /// Tasks sealed under it.
    pub tasks: u64,
    /// Their prompt blobs still stored.
    pub prompt_blobs: u64,
    /// Their result blobs still stored.
    pub result_blobs: u64,
}

/// The key status, with blob counts from the store.
pub async fn status(state: &AppState) -> ApiResult<KeyStatus> {
    let usage = state.store.key_version_usage().await?;
    Ok(build_status(state, &usage))
}

fn build_status(state: &AppState, usage: &[KeyVersionUsage]) -> KeyStatus {
    let (active, min_decrypt, infos) = state.keys.snapshot();
    let source = state.keys.source();
    let versions: Vec<KeyVersionStatus> = infos
        .iter()
        .enumerate()
        .map(|(i, v)| {
            let u = usage
                .iter()
                .find(|u| u.key_version == v.version)
                .copied()
                .unwrap_or_default();
            KeyVersionStatus {
                version: v.version,
                state: v.state,
                created_at: v.created_at,
                superseded_at: infos.get(i + 1).map(|n| n.created_at),
                retired_at: v.retired_at,
                destroyed_at: v.destroyed_at,
                tasks: u.tasks,
                prompt_blobs: u.prompt_blobs,
                result_blobs: u.result_blobs,
            }
        })
        .collect();
    let unknown_versions = usage
        .iter()
        .filter(|u| !infos.iter().any(|v| v.version == u.key_version))
        .copied()
        .collect();
    KeyStatus {
        source: source.kind().into(),
        read_only: source.is_read_only(),
        active,
        min_decrypt,
        rotated_at: infos
            .iter()
            .find(|v| v.version == active)
            .map_or(0, |v| v.created_at),
        versions,
        unknown_versions,
    }
}

fn usage_of(usage: &[KeyVersionUsage], version: u32) -> KeyVersionUsage {
    usage
        .iter()
        .find(|u| u.key_version == version)
        .copied()
        .unwrap_or(KeyVersionUsage {
            key_version: version,
            ..Default::default()
        })
}

// ---------------------------------------------------------------------------------------------
// Rotate, retire, destroy

/// What a change did, and the status after it.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct KeyChange {
    /// `rotate`, `retire` or `destroy`.
    pub op: String,
    /// The version concerned: the new active version, the highest retired one, or the
    /// destroyed one.
    pub version: u32,
    /// Stored blobs made unreadable by this change (retire: under the newly retired versions,
    /// until they are un-retired by restoring a keyring backup; destroy: for good). Zero for a
    /// rotation.
    pub affected_blobs: u64,
    /// Whether the change had been made before (retiring retired versions, destroying a
    /// destroyed one): nothing changed.
    pub unchanged: bool,
    /// The status after the change.
    pub status: KeyStatus,
}

fn version_error(code: &'static str, field: &str, message: String) -> ApiError {
    ApiError::conflict(code, message).param(field)
}

/// Adds a new key version with a fresh seed and makes it active. New blobs are sealed under
/// it; older versions still open their blobs.
pub async fn rotate(state: &AppState, actor: &str) -> ApiResult<KeyChange> {
    let (from, to) = state
        .keys
        .update(|ring| {
            let from = ring.active();
            let to = ring
                .rotate()
                .map_err(|e| ApiError::internal("rotating the keyring", e))?;
            Ok((from, to))
        })
        .await?;
    tracing::info!(from, to, actor, "key rotated");
    state
        .store
        .audit(&NewAuditEntry {
            at_ms: now_ms(),
            actor: actor.into(),
            action: "keyring.rotate".into(),
            key_version: Some(to),
            detail: json!({"from": from, "to": to}),
            ..Default::default()
        })
        .await?;
    Ok(KeyChange {
        op: "rotate".into(),
        version: to,
        affected_blobs: 0,
        unchanged: false,
        status: status(state).await?,
    })
}

/// Retires every version up to and including `up_to`: they refuse to derive keys, so their
/// blobs no longer open (`key_version_retired`). The active version cannot be retired.
pub async fn retire(state: &AppState, actor: &str, up_to: u32) -> ApiResult<KeyChange> {
    if up_to == 0 {
        return Err(ApiError::invalid(
            "up_to",
            "up_to must be a key version (1 or more)",
        ));
    }
    let (before, after) = state
        .keys
        .update(move |ring| {
            let active = ring.active();
            if up_to >= active {
                return Err(version_error(
                    "key_version_active",
                    "up_to",
                    format!(
                        "cannot retire up to version {up_to}: version {active} is active and \
                         cannot be retired; rotate first"
                    ),
                ));
            }
            let before = ring.min_decrypt();
            ring.retire(up_to)
                .map_err(|e| ApiError::conflict("keyring_state", e.to_string()).param("up_to"))?;
            Ok((before, ring.min_decrypt()))
        })
        .await?;
    let usage = state.store.key_version_usage().await?;
    let affected: u64 = (before..after).map(|v| usage_of(&usage, v).blobs()).sum();
    tracing::info!(
        up_to,
        min_decrypt = after,
        affected,
        actor,
        "key versions retired"
    );
    state
        .store
        .audit(&NewAuditEntry {
            at_ms: now_ms(),
            actor: actor.into(),
            action: "keyring.retire".into(),
            key_version: Some(up_to),
            detail: json!({"up_to": up_to, "previous_min_decrypt": before, "min_decrypt": after, "affected_blobs": affected}),
            ..Default::default()
        })
        .await?;
    Ok(KeyChange {
        op: "retire".into(),
        version: up_to,
        affected_blobs: affected,
        unchanged: before == after,
        status: build_status(state, &usage),
    })
}

/// What destroying a version would affect.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, ToSchema)]
pub struct DestroyImpact {
    /// The version.
    pub version: u32,
    /// Stored blobs sealed under it (prompts and results), unreadable once it is destroyed.
    pub affected_blobs: u64,
    /// Tasks sealed under it.
    pub tasks: u64,
}

/// The outcome of a destroy request.
#[derive(Debug, Clone)]
pub enum DestroyOutcome {
    /// The seed is gone (or was already).
    Destroyed(KeyChange),
    /// Not done: the caller must confirm this count first.
    ConfirmationRequired(DestroyImpact),
}

/// Checks that `version` may be destroyed (known, retired, not active) and counts what it
/// affects.
pub async fn destroy_impact(state: &AppState, version: u32) -> ApiResult<DestroyImpact> {
    let (active, min_decrypt, infos) = state.keys.snapshot();
    check_destroyable(active, min_decrypt, &infos, version)?;
    let usage = state.store.key_version_usage().await?;
    let u = usage_of(&usage, version);
    Ok(DestroyImpact {
        version,
        affected_blobs: u.blobs(),
        tasks: u.tasks,
    })
}

fn check_destroyable(
    active: u32,
    min_decrypt: u32,
    infos: &[veil_keys::KeyVersionInfo],
    version: u32,
) -> ApiResult<()> {
    if !infos.iter().any(|v| v.version == version) {
        return Err(ApiError::new(
            axum::http::StatusCode::NOT_FOUND,
            "unknown_key_version",
            format!("the keyring has no version {version}"),
        )
        .param("version"));
    }
    if version == active {
        return Err(version_error(
            "key_version_active",
            "version",
            format!("version {version} is the active version; rotate and retire it first"),
        ));
    }
    if version >= min_decrypt {
        return Err(version_error(
            "key_version_not_retired",
            "version",
            format!(
                "version {version} is not retired (versions below {min_decrypt} are); retire it \
                 first (POST /api/admin/keys/retire with up_to {version}, or `veil-router keys \
                 retire --up-to {version}`), and rewrap before that to keep its blobs readable"
            ),
        ));
    }
    Ok(())
}

/// Destroys a retired version's seed: every blob sealed under it becomes unreadable for good
/// (crypto-shredding). Done only when `confirm_blobs` equals the number of stored blobs it
/// affects now; otherwise answers [`DestroyOutcome::ConfirmationRequired`] with that number.
pub async fn destroy(
    state: &AppState,
    actor: &str,
    version: u32,
    confirm_blobs: Option<u64>,
) -> ApiResult<DestroyOutcome> {
    let impact = destroy_impact(state, version).await?;
    let already = state
        .keys
        .snapshot()
        .2
        .iter()
        .any(|v| v.version == version && v.state == KeyState::Destroyed);
    if !already && confirm_blobs != Some(impact.affected_blobs) {
        return Ok(DestroyOutcome::ConfirmationRequired(impact));
    }
    if !already {
        state
            .keys
            .update(move |ring| {
                // The file may have changed since the check above.
                check_destroyable(ring.active(), ring.min_decrypt(), &ring.versions(), version)?;
                ring.destroy(version)
                    .map_err(|e| ApiError::conflict("keyring_state", e.to_string()))
            })
            .await?;
        tracing::warn!(
            version,
            affected_blobs = impact.affected_blobs,
            actor,
            "key version destroyed"
        );
    }
    state
        .store
        .audit(&NewAuditEntry {
            at_ms: now_ms(),
            actor: actor.into(),
            action: "keyring.destroy".into(),
            key_version: Some(version),
            detail: json!({"version": version, "affected_blobs": impact.affected_blobs, "tasks": impact.tasks, "already_destroyed": already}),
            ..Default::default()
        })
        .await?;
    Ok(DestroyOutcome::Destroyed(KeyChange {
        op: "destroy".into(),
        version,
        affected_blobs: impact.affected_blobs,
        unchanged: already,
        status: status(state).await?,
    }))
}

// ---------------------------------------------------------------------------------------------
// Reloading a keyring changed elsewhere

/// Reloads the keyring whenever its file changes (the operator CLI or another replica changed
/// it, or the secret manager updated the secret), until aborted. A file that does not load
/// keeps the last good keyring in memory and is logged once per change.
pub async fn watch_keyring(state: AppState) {
    if state.keys.source().path().is_none() {
        return;
    }
    let mut tick = tokio::time::interval(KEYRING_RELOAD_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        match state.keys.reload_if_changed().await {
            Ok(false) => {}
            Ok(true) => {
                let (active, min_decrypt, versions) = state.keys.snapshot();
                tracing::info!(active, min_decrypt, "keyring reloaded (changed on disk)");
                metrics::counter!("veil_keyring_reloads_total").increment(1);
                let _ = state
                    .store
                    .audit(&NewAuditEntry {
                        at_ms: now_ms(),
                        actor: "router".into(),
                        action: "keyring.reload".into(),
                        key_version: Some(active),
                        detail: json!({"active": active, "min_decrypt": min_decrypt, "versions": versions.len(), "source": state.keys.source().kind()}),
                        ..Default::default()
                    })
                    .await;
            }
            Err(e) => {
                metrics::counter!("veil_keyring_reload_errors_total").increment(1);
                tracing::error!(error = %e, "the keyring file changed but does not load; keeping the keyring in memory");
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Rewrap

/// Progress of this process's rewrap job.
#[derive(Debug, Clone, Default, Serialize, ToSchema)]
pub struct RewrapProgress {
    /// A job is running in this process.
    pub running: bool,
    /// The version blobs are moved to: the active version when the job started (or now, when
    /// no job ran yet).
    pub target_version: u32,
    /// Tasks whose blobs the current (or last) job moved.
    pub done: u64,
    /// Tasks left alone because their blobs were deleted or their task changed meanwhile.
    pub skipped: u64,
    /// Tasks whose blobs could not be moved (see the router log); the next run retries them.
    pub failed: u64,
    /// Tasks with router-sealed blobs still under an older, decryptable version (counted in the
    /// database at the time of the answer).
    pub remaining: u64,
    /// Journal rows of interrupted runs that this run finished first.
    pub recovered: u64,
    /// Start, Unix ms.
    pub started_at_ms: Option<i64>,
    /// End, Unix ms.
    pub finished_at_ms: Option<i64>,
    /// Why the job stopped early.
    pub error: Option<String>,
    /// Why the last task that could not be moved was not (metadata only).
    pub last_failure: Option<String>,
}

/// This process's rewrap job: one at a time.
#[derive(Debug, Default)]
pub struct RewrapTracker {
    progress: Mutex<RewrapProgress>,
}

impl RewrapTracker {
    fn with<T>(&self, f: impl FnOnce(&mut RewrapProgress) -> T) -> T {
        f(&mut self.progress.lock().unwrap_or_else(|p| p.into_inner()))
    }

    /// The progress as last recorded.
    pub fn progress(&self) -> RewrapProgress {
        self.with(|p| p.clone())
    }
}

/// Marks the job running; marks it stopped when dropped, also when the job's task is aborted.
struct Running(AppState);

impl Running {
    fn start(state: &AppState, target_version: u32) -> ApiResult<Running> {
        state.rewrap.with(|p| {
            if p.running {
                return Err(ApiError::conflict(
                    "rewrap_running",
                    "a rewrap job is already running in this router; follow it at GET /api/admin/keys/rewrap",
                ));
            }
            *p = RewrapProgress {
                running: true,
                target_version,
                started_at_ms: Some(now_ms()),
                ..Default::default()
            };
            Ok(())
        })?;
        Ok(Running(state.clone()))
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        self.0.rewrap.with(|p| {
            p.running = false;
            if p.finished_at_ms.is_none() {
                p.finished_at_ms = Some(now_ms());
                p.error.get_or_insert_with(|| "the job was stopped".into());
            }
        });
    }
}

/// A step of re-sealing one task, where a test can make the job stop as a crash would.
#[doc(hidden)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RewrapStep {
    /// The journal row is written; no new blob yet.
    Journaled,
    /// The new blobs are stored and named in the journal; the task still points at the old.
    BlobsWritten,
    /// The task points at the new blobs; the old ones are not deleted yet.
    Switched,
}

/// How to run a rewrap.
#[derive(Debug, Clone)]
pub struct RewrapOptions {
    /// Tasks fetched per batch (1 to 10 000).
    pub batch: u32,
    /// Who runs it, for the audit log.
    pub actor: String,
    /// Test hook: stop without any clean-up, as a crash would, at this step of the task with
    /// this index (0-based, in the order the job takes them).
    #[doc(hidden)]
    pub crash_at: Option<(u64, RewrapStep)>,
}

impl RewrapOptions {
    /// Defaults for `actor`.
    pub fn new(actor: impl Into<String>) -> Self {
        Self {
            batch: DEFAULT_REWRAP_BATCH,
            actor: actor.into(),
            crash_at: None,
        }
    }
}

/// The progress of this process's job, with `remaining` counted now.
pub async fn rewrap_progress(state: &AppState) -> ApiResult<RewrapProgress> {
    let mut p = state.rewrap.progress();
    let (active, min_decrypt, _) = state.keys.snapshot();
    if !p.running {
        p.target_version = active;
    }
    p.remaining = state
        .store
        .count_rewrap_candidates(min_decrypt, p.target_version)
        .await?;
    Ok(p)
}

/// Starts a rewrap in the background (one per process); answers at once with its progress.
pub async fn start_rewrap(state: &AppState, opts: RewrapOptions) -> ApiResult<RewrapProgress> {
    check_batch(opts.batch)?;
    let running = Running::start(state, state.keys.active_version())?;
    let st = state.clone();
    tokio::spawn(async move {
        let _running = running;
        if let Err(e) = rewrap_job(&st, &opts, &|_| {}).await {
            tracing::error!(error = %e, "rewrap job stopped");
        }
    });
    rewrap_progress(state).await
}

/// Runs a rewrap to completion in the caller's task (the CLI), calling `on_progress` after
/// every task. Finishes interrupted runs first; safe next to a running router or another job.
pub async fn rewrap(
    state: &AppState,
    opts: &RewrapOptions,
    on_progress: &(dyn Fn(&RewrapProgress) + Send + Sync),
) -> ApiResult<RewrapProgress> {
    check_batch(opts.batch)?;
    let running = Running::start(state, state.keys.active_version())?;
    let result = rewrap_job(state, opts, on_progress).await;
    drop(running);
    result?;
    rewrap_progress(state).await
}

fn check_batch(batch: u32) -> ApiResult<()> {
    if batch == 0 || batch > MAX_REWRAP_BATCH {
        return Err(ApiError::invalid(
            "batch",
            format!("batch must be between 1 and {MAX_REWRAP_BATCH}"),
        ));
    }
    Ok(())
}

/// Why one task was not moved.
enum TaskError {
    /// The test hook fired: stop now, as a crash would.
    Crash(RewrapStep),
    /// The task could not be moved; the job goes on.
    Failed(String),
    /// The store failed; the job stops.
    Store(ApiError),
}

impl From<crate::store::StoreError> for TaskError {
    fn from(e: crate::store::StoreError) -> Self {
        TaskError::Store(e.into())
    }
}

enum TaskOutcome {
    Moved,
    Skipped,
}

/// The job: recover, then move batch after batch. The caller holds [`Running`].
async fn rewrap_job(
    state: &AppState,
    opts: &RewrapOptions,
    on_progress: &(dyn Fn(&RewrapProgress) + Send + Sync),
) -> ApiResult<()> {
    let target = state.rewrap.progress().target_version;
    let result = rewrap_batches(state, opts, target, on_progress).await;
    let (_, min_decrypt, _) = state.keys.snapshot();
    let remaining = state
        .store
        .count_rewrap_candidates(min_decrypt, target)
        .await
        .unwrap_or_default();
    let p = state.rewrap.with(|p| {
        p.finished_at_ms = Some(now_ms());
        p.remaining = remaining;
        if let Err(e) = &result {
            p.error = Some(e.message.clone());
        }
        p.clone()
    });
    let _ = state
        .store
        .audit(&NewAuditEntry {
            at_ms: now_ms(),
            actor: opts.actor.clone(),
            action: "keyring.rewrap.finish".into(),
            key_version: Some(target),
            detail: json!({"target_version": target, "done": p.done, "skipped": p.skipped, "failed": p.failed, "remaining": remaining, "recovered": p.recovered, "error": result.as_ref().err().map(|e| e.code)}),
            ..Default::default()
        })
        .await;
    tracing::info!(
        target_version = target,
        done = p.done,
        skipped = p.skipped,
        failed = p.failed,
        remaining,
        "rewrap finished"
    );
    on_progress(&p);
    result
}

async fn rewrap_batches(
    state: &AppState,
    opts: &RewrapOptions,
    target: u32,
    on_progress: &(dyn Fn(&RewrapProgress) + Send + Sync),
) -> ApiResult<()> {
    let recovered = recover_journal(state).await?;
    let (_, min_decrypt, _) = state.keys.snapshot();
    let remaining = state
        .store
        .count_rewrap_candidates(min_decrypt, target)
        .await?;
    let p = state.rewrap.with(|p| {
        p.recovered = recovered;
        p.remaining = remaining;
        p.clone()
    });
    on_progress(&p);
    state
        .store
        .audit(&NewAuditEntry {
            at_ms: now_ms(),
            actor: opts.actor.clone(),
            action: "keyring.rewrap.start".into(),
            key_version: Some(target),
            detail: json!({"target_version": target, "min_decrypt": min_decrypt, "remaining": remaining, "recovered": recovered}),
            ..Default::default()
        })
        .await?;
    let mut after = Uuid::nil();
    let mut index = 0u64;
    loop {
        let batch = state
            .store
            .rewrap_candidates(min_decrypt, target, after, opts.batch)
            .await?;
        if batch.is_empty() {
            return Ok(());
        }
        for task in batch {
            after = task.id;
            let outcome = rewrap_task(state, &task, target, opts, index).await;
            index += 1;
            let p = state.rewrap.with(|p| {
                match &outcome {
                    Ok(TaskOutcome::Moved) => p.done += 1,
                    Ok(TaskOutcome::Skipped) => p.skipped += 1,
                    Err(TaskError::Failed(why)) => {
                        p.failed += 1;
                        p.last_failure = Some(format!("task {}: {why}", task.id));
                    }
                    Err(_) => {}
                }
                p.remaining = p.remaining.saturating_sub(1);
                p.clone()
            });
            match outcome {
                Ok(_) => {}
                Err(TaskError::Failed(why)) => {
                    tracing::warn!(task_id = %task.id, key_version = task.key_version, error = %why, "rewrap: task not moved");
                }
                Err(TaskError::Crash(step)) => {
                    return Err(ApiError::internal(
                        "rewrapping",
                        format!("stopped by the test hook at {step:?}"),
                    ));
                }
                Err(TaskError::Store(e)) => return Err(e),
            }
            on_progress(&p);
        }
    }
}

/// Finishes what interrupted runs (here or on another replica) left in the journal: pending
/// rows are abandoned and their new blobs deleted; switched rows get their old blobs deleted.
/// Returns the number of rows finished.
async fn recover_journal(state: &AppState) -> ApiResult<u64> {
    let rows = state.store.rewrap_journal().await?;
    let mut n = 0;
    for row in rows {
        if finish_row(state, row.id).await? {
            n += 1;
        }
    }
    Ok(n)
}

/// Settles one journal row: abandons it if still pending, deletes the blobs it says must go,
/// and forgets it. Returns whether the row existed.
async fn finish_row(state: &AppState, id: Uuid) -> ApiResult<bool> {
    let Some(row) = state.store.rewrap_abandon(id).await? else {
        return Ok(false);
    };
    delete_blobs(state, &row).await?;
    state.store.rewrap_forget(id).await?;
    Ok(true)
}

async fn delete_blobs(state: &AppState, row: &RewrapJournal) -> ApiResult<()> {
    for urn in row.blobs_to_delete() {
        let parsed: Urn = urn
            .parse()
            .map_err(|e| ApiError::internal("parsing a blob URN of the rewrap journal", e))?;
        state
            .blobs
            .delete(&parsed)
            .await
            .map_err(|e| ApiError::internal("deleting a blob after a rewrap", e))?;
    }
    Ok(())
}

/// Re-seals one task's stored blobs under `target` and switches the task to them.
async fn rewrap_task(
    state: &AppState,
    task: &Task,
    target: u32,
    opts: &RewrapOptions,
    index: u64,
) -> Result<TaskOutcome, TaskError> {
    let crash = |step: RewrapStep| match opts.crash_at {
        Some((i, s)) if i == index && s == step => Err(TaskError::Crash(step)),
        _ => Ok(()),
    };
    if task.prompt_scope != Scope::Task.as_byte() {
        return Err(TaskError::Failed(
            "the prompt is sealed under a session key, which the router does not re-seal".into(),
        ));
    }
    // Both keys before anything is written: a retired or destroyed version fails here.
    let old_key = state
        .keys
        .task_key(task.key_version, &task.session_id, &task.id)
        .map_err(|e| TaskError::Failed(e.message))?;
    let new_key = state
        .keys
        .task_key(target, &task.session_id, &task.id)
        .map_err(|e| TaskError::Failed(e.message))?;
    let prompt_stored = task.prompt_deleted_at_ms.is_none();
    let result = task
        .result
        .as_ref()
        .filter(|_| task.result_deleted_at_ms.is_none());

    let rewrap_id = Uuid::now_v7();
    state
        .store
        .rewrap_begin(&NewRewrap {
            id: rewrap_id,
            task_id: task.id,
            old_version: task.key_version,
            new_version: target,
            started_at_ms: now_ms(),
        })
        .await?;
    crash(RewrapStep::Journaled)?;

    let ids = |v: u32| KeyId::task(v, task.session_id, task.id);
    let moved = async {
        let prompt = match prompt_stored {
            true => {
                let src = BlobSource {
                    urn: &task.prompt_urn,
                    hash: &task.prompt_hash,
                    key: &old_key,
                    id: ids(task.key_version),
                };
                reseal(
                    state,
                    rewrap_id,
                    BlobKind::Prompt,
                    src,
                    &new_key,
                    ids(target),
                )
                .await?
            }
            false => None,
        };
        let result = match result {
            Some(r) => {
                let src = BlobSource {
                    urn: &r.result_urn,
                    hash: &r.result_hash,
                    key: &old_key,
                    id: ids(task.key_version),
                };
                reseal(
                    state,
                    rewrap_id,
                    BlobKind::Result,
                    src,
                    &new_key,
                    ids(target),
                )
                .await?
            }
            None => None,
        };
        Ok::<_, TaskError>((prompt, result))
    }
    .await;
    let (prompt, result) = match moved {
        Ok(m) => m,
        Err(e) => {
            // The new blobs (those already named) go; the task keeps its old ones.
            finish_row(state, rewrap_id)
                .await
                .map_err(TaskError::Store)?;
            return Err(e);
        }
    };
    crash(RewrapStep::BlobsWritten)?;
    if prompt.is_none() && result.is_none() {
        finish_row(state, rewrap_id)
            .await
            .map_err(TaskError::Store)?;
        return Ok(TaskOutcome::Skipped);
    }
    let hashes = |m: &Option<MovedBlob>, old: Option<&[u8; 32]>| {
        m.as_ref()
            .map(|m| json!({"old_hash": old.map(hex::encode), "new_hash": hex::encode(m.hash)}))
    };
    let audit = NewAuditEntry {
        at_ms: now_ms(),
        actor: opts.actor.clone(),
        action: "keyring.rewrap.task".into(),
        session_id: Some(task.session_id),
        task_id: Some(task.id),
        key_version: Some(target),
        detail: json!({
            "old_version": task.key_version,
            "new_version": target,
            "prompt": hashes(&prompt, Some(&task.prompt_hash)),
            "result": hashes(&result, task.result.as_ref().map(|r| &r.result_hash)),
        }),
        ..Default::default()
    };
    let switched = state
        .store
        .rewrap_switch(
            &RewrapSwitch {
                rewrap_id,
                expected: task.clone(),
                new_version: target,
                prompt,
                result,
            },
            &audit,
        )
        .await?;
    crash(RewrapStep::Switched)?;
    // Switched: the old blobs go. Not switched (the task changed meanwhile): the new ones go.
    finish_row(state, rewrap_id)
        .await
        .map_err(TaskError::Store)?;
    Ok(if switched {
        TaskOutcome::Moved
    } else {
        TaskOutcome::Skipped
    })
}

/// A stored blob to re-seal.
struct BlobSource<'a> {
    urn: &'a str,
    hash: &'a [u8; 32],
    key: &'a SecretKey,
    /// The key id its header must carry.
    id: KeyId,
}

/// Streams a blob through an opener and a sealer into a new blob, in bounded memory (one
/// envelope chunk and the blob writer's buffer). The new blob is named in the journal before
/// any of it can become visible. `None` if the blob is gone.
async fn reseal(
    state: &AppState,
    rewrap_id: Uuid,
    kind: BlobKind,
    src: BlobSource<'_>,
    new_key: &SecretKey,
    new_id: KeyId,
) -> Result<Option<MovedBlob>, TaskError> {
    let fail = |what: &str, e: &dyn std::fmt::Display| {
        TaskError::Failed(format!("{} {what}: {e}", kind.as_str()))
    };
    let purpose = match kind {
        BlobKind::Prompt => Purpose::Prompt,
        BlobKind::Result => Purpose::Result,
    };
    let urn: Urn = src.urn.parse().map_err(|e| fail("URN", &e))?;
    // The raw stream is hash-checked at its end; the opener releases only authenticated
    // chunks. Nothing written before the end is referenced until the switch, which happens
    // only after both checks passed.
    let mut raw = match state.blobs.get_stream(&urn, src.hash).await {
        Ok(s) => s,
        Err(veil_blobstore::Error::NotFound { .. }) => return Ok(None),
        Err(e) => return Err(fail("read", &e)),
    };
    let mut opener = Opener::new(src.key);
    let mut sealer =
        Sealer::new(new_key, &BlobParams::new(new_id, purpose)).map_err(|e| fail("seal", &e))?;
    let mut writer = state.blobs.writer();
    let mut out = Vec::new();
    let mut named = false;
    let mut header_checked = false;
    while let Some(bytes) = raw.next().await {
        let bytes = bytes.map_err(|e| fail("read", &e))?;
        let chunks = opener.push(&bytes).map_err(|e| fail("open", &e))?;
        if !header_checked && let Some(h) = opener.header() {
            if h.key != src.id || h.purpose != purpose {
                return Err(fail("open", &"the blob's header does not match its task"));
            }
            header_checked = true;
        }
        for chunk in chunks {
            sealer
                .update(&chunk, &mut out)
                .map_err(|e| fail("seal", &e))?;
            drop(chunk);
            emit(state, rewrap_id, kind, &mut writer, &mut out, &mut named).await?;
        }
    }
    opener.finish().map_err(|e| fail("open", &e))?;
    sealer.finish(&mut out).map_err(|e| fail("seal", &e))?;
    emit(state, rewrap_id, kind, &mut writer, &mut out, &mut named).await?;
    let stored = writer.finish().await.map_err(|e| fail("write", &e))?;
    Ok(Some(MovedBlob {
        old_urn: src.urn.to_string(),
        urn: stored.urn.to_string(),
        hash: stored.sha256,
        size: stored.size,
    }))
}

/// Hands sealed bytes to the writer. The first write is exactly the preamble (header and first
/// frame length), which tells the writer the blob's URN while everything is still buffered;
/// the URN goes into the journal before any more is written.
async fn emit(
    state: &AppState,
    rewrap_id: Uuid,
    kind: BlobKind,
    writer: &mut veil_blobstore::BlobWriter,
    out: &mut Vec<u8>,
    named: &mut bool,
) -> Result<(), TaskError> {
    const PREAMBLE: usize = HEADER_LEN + FRAME_LEN_LEN;
    let fail =
        |e: &dyn std::fmt::Display| TaskError::Failed(format!("{} write: {e}", kind.as_str()));
    if out.is_empty() {
        return Ok(());
    }
    if !*named {
        if out.len() < PREAMBLE {
            return Ok(()); // only the header so far
        }
        writer.write(&out[..PREAMBLE]).await.map_err(|e| fail(&e))?;
        let urn = writer
            .urn()
            .ok_or_else(|| fail(&"no URN after the preamble"))?
            .to_string();
        if !state
            .store
            .rewrap_record_blob(rewrap_id, kind, &urn)
            .await?
        {
            return Err(TaskError::Failed(
                "another rewrap job abandoned this task's journal row".into(),
            ));
        }
        *named = true;
        writer.write(&out[PREAMBLE..]).await.map_err(|e| fail(&e))?;
    } else {
        writer.write(out).await.map_err(|e| fail(&e))?;
    }
    out.clear();
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Operator CLI

/// A failed `veil-router keys …` command.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CliError {
    /// The keyring, database or blob store could not be opened.
    #[error(transparent)]
    Start(#[from] StartError),
    /// The operation was refused or failed.
    #[error("{}: {}", .0.code, .0.message)]
    Api(ApiError),
    /// Not confirmed.
    #[error("{0}")]
    Refused(String),
}

impl From<ApiError> for CliError {
    fn from(e: ApiError) -> Self {
        CliError::Api(e)
    }
}

impl From<crate::store::StoreError> for CliError {
    fn from(e: crate::store::StoreError) -> Self {
        CliError::Api(e.into())
    }
}

/// The state the operator commands work on: the configured keyring file (never created
/// here), database and blob store, without starting a router. A running router next to it
/// picks the changes up within seconds.
pub async fn operator_state(cfg: Config) -> Result<AppState, StartError> {
    let (keys, _) = crate::server::open_keyring(&cfg, false)?;
    let store = crate::store::open(&cfg.database_url)
        .await
        .map_err(|e| StartError::Database(e.to_string()))?;
    let blobs = veil_blobstore::BlobStore::from_url(&cfg.blob_store)
        .map_err(|e| StartError::BlobStore(e.to_string()))?;
    Ok(AppState::new(
        cfg,
        store,
        blobs,
        keys,
        crate::server::metrics_handle(),
        None,
    ))
}

/// Runs `veil-router keys …`. Output never includes a seed.
pub async fn run_cli(cfg: Config, cmd: KeysCommand) -> Result<(), CliError> {
    let state = operator_state(cfg).await?;
    let actor = "operator";
    let mut stdout = std::io::stdout().lock();
    match cmd {
        KeysCommand::Status { json } => {
            let s = status(&state).await?;
            let rewrap = rewrap_progress(&state).await?;
            if json {
                let v = json!({"keys": s, "rewrap_remaining": rewrap.remaining});
                let _ = writeln!(stdout, "{v:#}");
            } else {
                print_status(&mut stdout, &s);
                let _ = writeln!(
                    stdout,
                    "rewrap: {} task(s) with blobs under older decryptable versions",
                    rewrap.remaining
                );
            }
        }
        KeysCommand::Rotate => {
            let c = rotate(&state, actor).await?;
            let _ = writeln!(
                stdout,
                "rotated: version {} is active; older versions still open their blobs \
                 (run `veil-router keys rewrap` to move them to it)",
                c.version
            );
        }
        KeysCommand::Retire { up_to } => {
            let c = retire(&state, actor, up_to).await?;
            if c.unchanged {
                let _ = writeln!(stdout, "versions up to {up_to} were already retired");
            } else {
                let _ = writeln!(
                    stdout,
                    "retired versions up to {up_to} (min_decrypt is now {}); {} stored blob(s) \
                     under them no longer open",
                    c.status.min_decrypt, c.affected_blobs
                );
            }
        }
        KeysCommand::Destroy { version, yes } => {
            let impact = destroy_impact(&state, version).await?;
            let _ = writeln!(
                stdout,
                "Destroying key version {version} deletes its seed for good: {} stored blob(s) \
                 of {} task(s) sealed under it become unreadable, and no backup made after now \
                 can bring them back.",
                impact.affected_blobs, impact.tasks
            );
            let _ = stdout.flush();
            if !yes {
                if !std::io::stdin().is_terminal() {
                    return Err(CliError::Refused(
                        "refusing to destroy a key version without confirmation: run it on a \
                         terminal, or pass --yes"
                            .into(),
                    ));
                }
                let _ = write!(stdout, "Type `destroy {version}` to confirm: ");
                let _ = stdout.flush();
                let mut line = String::new();
                let _ = std::io::stdin().lock().read_line(&mut line);
                if line.trim() != format!("destroy {version}") {
                    return Err(CliError::Refused("not confirmed; nothing destroyed".into()));
                }
            }
            match destroy(&state, actor, version, Some(impact.affected_blobs)).await? {
                DestroyOutcome::Destroyed(c) if c.unchanged => {
                    let _ = writeln!(stdout, "version {version} was already destroyed");
                }
                DestroyOutcome::Destroyed(c) => {
                    let _ = writeln!(
                        stdout,
                        "destroyed version {version}; {} blob(s) are now unreadable",
                        c.affected_blobs
                    );
                }
                DestroyOutcome::ConfirmationRequired(now) => {
                    return Err(CliError::Refused(format!(
                        "the count changed while confirming ({} blob(s) now); nothing \
                         destroyed, run the command again",
                        now.affected_blobs
                    )));
                }
            }
        }
        KeysCommand::Rewrap { batch } => {
            let mut opts = RewrapOptions::new(actor);
            opts.batch = batch;
            let term = std::io::stderr().is_terminal();
            let show = move |p: &RewrapProgress| {
                let line = format!(
                    "rewrap to version {}: {} moved, {} skipped, {} failed, {} remaining",
                    p.target_version, p.done, p.skipped, p.failed, p.remaining
                );
                let mut e = std::io::stderr().lock();
                if term {
                    let _ = write!(e, "\r\x1b[2K{line}");
                } else if p.finished_at_ms.is_some()
                    || (p.done + p.skipped + p.failed).is_multiple_of(100)
                {
                    let _ = writeln!(e, "{line}");
                }
                let _ = e.flush();
            };
            let result = rewrap(&state, &opts, &show).await;
            if term {
                let _ = writeln!(std::io::stderr());
            }
            let p = result?;
            let _ = writeln!(
                stdout,
                "rewrap done: {} task(s) moved to version {}, {} skipped, {} failed, {} remaining{}",
                p.done,
                p.target_version,
                p.skipped,
                p.failed,
                p.remaining,
                if p.recovered > 0 {
                    format!(" ({} interrupted step(s) finished first)", p.recovered)
                } else {
                    String::new()
                }
            );
            if p.failed > 0 {
                return Err(CliError::Refused(format!(
                    "{} task(s) could not be moved; see the log above and run it again",
                    p.failed
                )));
            }
        }
    }
    Ok(())
}

fn print_status(out: &mut impl Write, s: &KeyStatus) {
    let _ = writeln!(
        out,
        "keyring: {}{}  active: {}  min_decrypt: {}  rotated: {}",
        s.source,
        if s.read_only { " (read-only)" } else { "" },
        s.active,
        s.min_decrypt,
        utc(s.rotated_at)
    );
    let _ = writeln!(
        out,
        "{:>7}  {:<12}  {:<20}  {:<20}  {:<20}  {:>8}  {:>8}  {:>8}",
        "version", "state", "created", "retired", "destroyed", "tasks", "prompts", "results"
    );
    for v in &s.versions {
        let state = match v.state {
            KeyState::Active => "active",
            KeyState::DecryptOnly => "decrypt_only",
            KeyState::Retired => "retired",
            KeyState::Destroyed => "destroyed",
        };
        let _ = writeln!(
            out,
            "{:>7}  {:<12}  {:<20}  {:<20}  {:<20}  {:>8}  {:>8}  {:>8}",
            v.version,
            state,
            utc(v.created_at),
            v.retired_at.map(utc).unwrap_or_else(|| "-".into()),
            v.destroyed_at.map(utc).unwrap_or_else(|| "-".into()),
            v.tasks,
            v.prompt_blobs,
            v.result_blobs
        );
    }
    for u in &s.unknown_versions {
        let _ = writeln!(
            out,
            "WARNING: {} task(s) use key version {}, which this keyring does not have: is this \
             the right keyring for this database?",
            u.tasks, u.key_version
        );
    }
}

/// Unix seconds as RFC 3339 UTC (`2023-11-14T22:13:20Z`); past the year 9999 (which RFC 3339
/// cannot write), its last second.
fn utc(secs: u64) -> String {
    const LAST_RFC3339_SECS: u64 = 253_402_300_799; // 9999-12-31T23:59:59Z
    let at = std::time::UNIX_EPOCH + std::time::Duration::from_secs(secs.min(LAST_RFC3339_SECS));
    humantime::format_rfc3339_seconds(at).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn utc_formats_known_instants() {
        assert_eq!(utc(0), "1970-01-01T00:00:00Z");
        assert_eq!(utc(951_782_400), "2000-02-29T00:00:00Z");
        assert_eq!(utc(1_700_000_000), "2023-11-14T22:13:20Z");
        assert_eq!(utc(4_102_444_799), "2099-12-31T23:59:59Z");
        assert_eq!(utc(u64::MAX), "9999-12-31T23:59:59Z");
    }

    #[test]
    fn only_retired_known_non_active_versions_are_destroyable() {
        let mut ring = veil_keys::Keyring::generate().unwrap();
        ring.rotate().unwrap();
        ring.rotate().unwrap();
        ring.retire(1).unwrap();
        let infos = ring.versions();
        let code = |v| {
            check_destroyable(ring.active(), ring.min_decrypt(), &infos, v)
                .err()
                .map(|e| e.code)
        };
        assert_eq!(code(1), None);
        assert_eq!(code(2), Some("key_version_not_retired"));
        assert_eq!(code(3), Some("key_version_active"));
        assert_eq!(code(4), Some("unknown_key_version"));
    }
}
