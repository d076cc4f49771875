//! The on-chain ACL in the router (protocol section 7.5).
//!
//! With `acl_rpc_url` configured, the router runs an [`AclReader`] that follows the ACL
//! contract, and mirrors the chain into the store: every session whose id is registered on
//! chain gets its allowlist from the contract (`source = contract`, private, the miners the
//! contract allows that are active; a closed on-chain session allows nobody). The mirror runs
//! at start, after every change of the reader's view, and when a session is looked up, so the
//! lease query (which reads the stored allowlist) follows the chain.
//!
//! Enforcement:
//! - key requests of contract-backed sessions are decided on the live view
//!   ([`AclView::decide`]), not only on the mirrored list, so a revoke stops key release as soon
//!   as the reader has seen it;
//! - while the view is older than `acl_max_staleness_ms` (or was never synced in this
//!   process), contract-backed sessions fail closed: new tasks are refused (503 `acl_stale`),
//!   leases skip them and key requests are refused. Public and router-managed sessions keep
//!   working, and everything resumes once the view is fresh again, without a restart;
//! - with `acl_verify_miner_keys`, a miner logs in only with the X25519 key registered for it
//!   on chain, while it is registered and active.

use std::collections::{HashMap, HashSet};
use std::sync::Mutex;
use std::time::Duration;

use alloy_primitives::Address;
use axum::http::StatusCode;
use serde_json::json;
use uuid::Uuid;
use veil_contracts::{AclDecision, AclReader, AclView, ReaderConfig};

use crate::config::AclConfig;
use crate::error::{ApiError, ApiResult};
use crate::state::{AppState, now_ms};
use crate::store::{AllowlistSource, NewAuditEntry, PrivacySetting, Session, StoreError};

/// The actor named in audit entries written by the mirror.
const ACTOR: &str = "contract";

/// The router's handle on the on-chain ACL: the reader's view and the settings.
#[derive(Debug)]
pub struct Acl {
    cfg: AclConfig,
    view: AclView,
    /// The reader, until [`follow`] starts it.
    reader: Mutex<Option<AclReader>>,
}

impl Acl {
    /// Prepares the reader (resuming from its checkpoint file when there is one). Nothing is
    /// asked of the chain yet, except that a WebSocket URL is connected.
    pub async fn open(cfg: AclConfig) -> Result<Acl, veil_contracts::Error> {
        // `https://` and `wss://` need a process-wide rustls provider (the workspace uses ring).
        let _ = rustls::crypto::ring::default_provider().install_default();
        let provider = veil_contracts::connect(&cfg.rpc_url).await?;
        // A sync that hangs must not hold the view past its bound without being noticed.
        let sync_timeout = cfg
            .max_staleness
            .clamp(Duration::from_secs(1), Duration::from_secs(30));
        let reader_cfg = ReaderConfig::new(cfg.contract)
            .with_confirmations(cfg.confirmations)
            .with_checkpoint_path(cfg.checkpoint_path.clone())
            .with_poll_interval(cfg.poll_interval)
            .with_sync_timeout(sync_timeout);
        let reader = AclReader::new(provider, reader_cfg)?;
        Ok(Acl {
            view: reader.view(),
            reader: Mutex::new(Some(reader)),
            cfg,
        })
    }

    /// The reader's view (synchronous reads of memory).
    pub fn view(&self) -> &AclView {
        &self.view
    }

    /// The settings.
    pub fn config(&self) -> &AclConfig {
        &self.cfg
    }

    /// Whether the view caught up with the chain within the staleness bound.
    pub fn is_fresh(&self) -> bool {
        self.view.is_fresh(self.cfg.max_staleness)
    }

    /// Whether `s` takes its allowlist from the contract: mirrored already, or registered on
    /// chain and not mirrored yet.
    pub fn is_contract_backed(&self, s: &Session) -> bool {
        s.privacy.source == AllowlistSource::Contract || self.view.session(s.id).is_some()
    }

    /// The privacy setting the chain gives session `id`, or `None` when it is not registered.
    pub fn contract_privacy(&self, id: Uuid) -> Option<PrivacySetting> {
        let miners = self.view.allowed_miners(id)?;
        Some(PrivacySetting {
            private: true,
            allowed_miners: miners.iter().map(|m| m.to_checksum(None)).collect(),
            source: AllowlistSource::Contract,
        })
    }

    fn take_reader(&self) -> Option<AclReader> {
        self.reader.lock().unwrap_or_else(|p| p.into_inner()).take()
    }

    fn stale_error(&self) -> ApiError {
        let age = match self.view.staleness() {
            Some(age) => format!("was last brought up to date {}s ago", age.as_secs()),
            None => "has not been brought up to date since the router started".to_string(),
        };
        let mut e = ApiError::unavailable(
            "acl_stale",
            format!(
                "the router's copy of the on-chain ACL {age} (bound {}s): sessions whose \
                 allowlist comes from the contract are refused until it catches up",
                self.cfg.max_staleness.as_secs_f64()
            ),
        );
        e.retry_after = Some(self.cfg.poll_interval.as_secs().max(1));
        e
    }
}

/// Why a key may not be released to a miner.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    /// HTTP status (403, or 503 while the view is stale).
    pub status: StatusCode,
    /// Stable machine code.
    pub code: &'static str,
    /// Explanation.
    pub message: String,
    /// Seconds until asking again makes sense (while the view is stale).
    pub retry_after: Option<u64>,
}

impl Refusal {
    fn forbidden(code: &'static str, message: impl Into<String>) -> Self {
        Self {
            status: StatusCode::FORBIDDEN,
            code,
            message: message.into(),
            retry_after: None,
        }
    }
}

/// Whether `miner` (checksummed), logged in with X25519 key `recipient`, may receive a key of
/// session `s` now. Contract-backed sessions are decided on the live view of the chain; the
/// others on their stored allowlist.
pub fn may_receive_key(
    state: &AppState,
    s: &Session,
    miner: &str,
    recipient: &[u8; 32],
) -> Result<(), Refusal> {
    let not_allowed =
        || Refusal::forbidden("not_allowed", "this miner is not allowed for the session");
    let Some(acl) = &state.acl else {
        return if s.allows(miner) {
            Ok(())
        } else {
            Err(not_allowed())
        };
    };
    let Ok(address) = miner.parse::<Address>() else {
        return Err(not_allowed());
    };
    if acl.cfg.verify_miner_keys
        && let Some(info) = acl.view.miner(address)
    {
        if !info.active {
            return Err(Refusal::forbidden(
                "miner_deactivated",
                "this miner is deactivated in the ACL contract",
            ));
        }
        if &info.x25519 != recipient {
            return Err(Refusal::forbidden(
                "miner_key_mismatch",
                "the X25519 key this miner logged in with is no longer the one registered \
                 for it in the ACL contract; log in again with the registered key",
            ));
        }
    }
    if !acl.is_contract_backed(s) {
        return if s.allows(miner) {
            Ok(())
        } else {
            Err(not_allowed())
        };
    }
    match acl.view.decide(s.id, address, acl.cfg.max_staleness) {
        AclDecision::Allowed => Ok(()),
        AclDecision::Denied => Err(Refusal::forbidden(
            "not_allowed",
            "the ACL contract does not allow this miner for the session",
        )),
        AclDecision::NotOnChain => Err(Refusal::forbidden(
            "not_allowed",
            "the session's allowlist comes from the ACL contract, which does not know the \
             session",
        )),
        AclDecision::Stale => {
            let e = acl.stale_error();
            Err(Refusal {
                status: e.status,
                code: e.code,
                message: e.message,
                retry_after: e.retry_after,
            })
        }
    }
}

/// Refuses a new task of a contract-backed session while the view is stale (503 `acl_stale`,
/// naming `session_id`).
pub fn check_new_task(state: &AppState, s: &Session) -> ApiResult<()> {
    let Some(acl) = &state.acl else {
        return Ok(());
    };
    if acl.is_contract_backed(s) && !acl.is_fresh() {
        metrics::counter!("veil_acl_denials_total", "code" => "acl_stale").increment(1);
        tracing::warn!(session_id = %s.id, "task refused: the ACL view is stale");
        return Err(acl.stale_error().param("session_id"));
    }
    Ok(())
}

/// Whether leases must skip contract-backed sessions now (the view is stale).
pub fn skip_contract_sessions(state: &AppState) -> bool {
    state.acl.as_ref().is_some_and(|acl| !acl.is_fresh())
}

/// With `acl_verify_miner_keys`, refuses a login unless `miner` is registered and active on
/// chain with X25519 key `recipient`.
pub async fn check_login(state: &AppState, miner: Address, recipient: &[u8; 32]) -> ApiResult<()> {
    let Some(acl) = state.acl.as_ref().filter(|a| a.cfg.verify_miner_keys) else {
        return Ok(());
    };
    let refused = if !acl.is_fresh() {
        Some(acl.stale_error().param("login.message.recipient"))
    } else {
        match acl.view.miner(miner) {
            None => Some(
                ApiError::forbidden(
                    "miner_not_registered",
                    "this miner is not registered in the ACL contract; an admin registers it \
                     with its X25519 key",
                )
                .param("login.signature"),
            ),
            Some(info) if !info.active => Some(
                ApiError::forbidden(
                    "miner_deactivated",
                    "this miner is deactivated in the ACL contract",
                )
                .param("login.signature"),
            ),
            Some(info) if &info.x25519 != recipient => Some(
                ApiError::forbidden(
                    "miner_key_mismatch",
                    "the X25519 key in the login is not the one registered for this miner in \
                     the ACL contract",
                )
                .param("login.message.recipient"),
            ),
            Some(_) => None,
        }
    };
    let Some(e) = refused else {
        return Ok(());
    };
    let miner = miner.to_checksum(None);
    metrics::counter!("veil_acl_denials_total", "code" => e.code).increment(1);
    state
        .store
        .audit(&NewAuditEntry {
            at_ms: now_ms(),
            actor: miner.clone(),
            action: "miner.login.deny".into(),
            miner: Some(miner.clone()),
            detail: json!({"code": e.code, "recipient": hex::encode(recipient)}),
            ..Default::default()
        })
        .await?;
    tracing::warn!(miner = %miner, code = e.code, "miner login refused by the ACL");
    Err(e)
}

/// Brings a session just read from the store in line with the chain (a session registered on
/// chain since the last mirror pass), and returns it as stored now.
pub async fn reconcile(state: &AppState, s: Session) -> ApiResult<Session> {
    let Some(acl) = &state.acl else {
        return Ok(s);
    };
    let Some(want) = acl.contract_privacy(s.id) else {
        return Ok(s);
    };
    Ok(apply(state, acl, s, want).await?)
}

fn same(a: &PrivacySetting, b: &PrivacySetting) -> bool {
    let set = |p: &PrivacySetting| p.allowed_miners.iter().cloned().collect::<HashSet<_>>();
    a.private == b.private && a.source == b.source && set(a) == set(b)
}

/// Stores `want` as the session's privacy setting when it differs, and audits the change.
async fn apply(
    state: &AppState,
    acl: &Acl,
    s: Session,
    want: PrivacySetting,
) -> Result<Session, StoreError> {
    if s.closed_at_ms.is_some() || same(&s.privacy, &want) {
        return Ok(s);
    }
    let updated = match state.store.set_privacy(s.id, &want).await {
        Ok(u) => u,
        // Closed meanwhile: nothing to serve any more.
        Err(StoreError::Conflict {
            code: "session_closed",
            ..
        }) => return Ok(s),
        Err(e) => return Err(e),
    };
    let block = acl.view.checkpoint().map(|c| c.block_number);
    state
        .store
        .audit(&NewAuditEntry {
            at_ms: now_ms(),
            actor: ACTOR.into(),
            action: "session.privacy".into(),
            session_id: Some(s.id),
            detail: json!({
                "private": want.private,
                "allowed_miners": want.allowed_miners,
                "source": want.source,
                "previous_source": s.privacy.source,
                "block": block,
            }),
            ..Default::default()
        })
        .await?;
    tracing::info!(
        session_id = %s.id,
        allowed_miners = want.allowed_miners.len(),
        block,
        "session allowlist taken from the ACL contract"
    );
    Ok(updated)
}

/// One mirror pass: every session the chain knows and this router stores gets the chain's
/// setting. `applied` remembers what was applied, so a pass writes only what changed.
async fn mirror(
    state: &AppState,
    acl: &Acl,
    applied: &mut HashMap<Uuid, PrivacySetting>,
) -> Result<(), StoreError> {
    let mut seen = HashSet::new();
    for id in acl.view.session_ids() {
        let id = Uuid::from_bytes(id);
        let Some(want) = acl.contract_privacy(id) else {
            continue;
        };
        seen.insert(id);
        if applied.get(&id) == Some(&want) {
            continue;
        }
        match state.store.get_session(id).await {
            Ok(s) => {
                apply(state, acl, s, want.clone()).await?;
            }
            // Not one of this router's sessions (yet: a lookup reconciles it).
            Err(StoreError::NotFound { .. }) => {}
            Err(e) => return Err(e),
        }
        applied.insert(id, want);
    }
    // A registration the view no longer holds (undone by a reorganisation deeper than the
    // confirmations): the session stays contract-backed and allows nobody until the chain
    // says otherwise.
    let gone: Vec<Uuid> = applied
        .keys()
        .filter(|id| !seen.contains(*id))
        .copied()
        .collect();
    for id in gone {
        let nobody = PrivacySetting {
            private: true,
            allowed_miners: Vec::new(),
            source: AllowlistSource::Contract,
        };
        match state.store.get_session(id).await {
            Ok(s) => {
                apply(state, acl, s, nobody).await?;
            }
            Err(StoreError::NotFound { .. }) => {}
            Err(e) => return Err(e),
        }
        applied.remove(&id);
    }
    Ok(())
}

/// Follows the chain and mirrors it into the store until the future is dropped. Returns at once
/// when no ACL is configured.
pub(crate) async fn follow(state: AppState) {
    let Some(acl) = state.acl.as_ref() else {
        return;
    };
    let Some(reader) = acl.take_reader() else {
        tracing::warn!("the ACL reader is already running for this router state");
        return;
    };
    tracing::info!(
        rpc = %acl.cfg.redacted_url(),
        contract = %acl.cfg.contract,
        confirmations = acl.cfg.confirmations,
        poll_interval_ms = acl.cfg.poll_interval.as_millis() as u64,
        max_staleness_ms = acl.cfg.max_staleness.as_millis() as u64,
        "following the ACL contract"
    );
    tokio::join!(sync_loop(acl, reader), mirror_loop(&state, acl));
}

/// Syncs the reader every poll interval. (The reader's own background task would log its
/// errors as they are, and transport errors quote the RPC URL, whose path or query often holds
/// an API key; this loop logs them with the URL reduced to scheme, host and port.)
async fn sync_loop(acl: &Acl, mut reader: AclReader) {
    let mut failing = false;
    loop {
        match reader.sync().await {
            Ok(_) => failing = false,
            Err(e) => {
                let error = acl.cfg.redact(&e.to_string());
                if failing {
                    tracing::debug!(%error, "ACL sync failed again");
                } else {
                    tracing::warn!(%error, "ACL sync failed");
                }
                failing = true;
            }
        }
        tokio::time::sleep(acl.cfg.poll_interval).await;
    }
}

/// Mirrors the view into the store after every change, and notes when it turns stale or fresh.
async fn mirror_loop(state: &AppState, acl: &Acl) {
    let mut changes = acl.view.changes();
    let mut applied = HashMap::new();
    let mut dirty = true;
    let mut was_fresh = None;
    let mut tick = tokio::time::interval(acl.cfg.poll_interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        if dirty {
            match mirror(state, acl, &mut applied).await {
                Ok(()) => dirty = false,
                Err(e) => tracing::warn!(error = %e, "mirroring the ACL into the store failed"),
            }
        }
        let fresh = acl.is_fresh();
        if was_fresh != Some(fresh) {
            // Transitions only; `None` at start counts as one.
            let block = acl.view.checkpoint().map(|c| c.block_number);
            let staleness_ms = acl.view.staleness().map(|d| d.as_millis() as u64);
            if fresh {
                tracing::info!(
                    block,
                    "ACL view is fresh: contract-backed sessions are served"
                );
            } else if was_fresh.is_some() {
                tracing::warn!(
                    block,
                    staleness_ms,
                    "ACL view is stale: contract-backed sessions fail closed until it catches up"
                );
            }
            if was_fresh.is_some() || fresh {
                let _ = state
                    .store
                    .audit(&NewAuditEntry {
                        at_ms: now_ms(),
                        actor: "router".into(),
                        action: if fresh { "acl.fresh" } else { "acl.stale" }.into(),
                        detail: json!({"block": block, "staleness_ms": staleness_ms}),
                        ..Default::default()
                    })
                    .await;
            }
            was_fresh = Some(fresh);
        }
        tokio::select! {
            r = changes.changed() => {
                if r.is_err() {
                    return;
                }
                dirty = true;
            }
            _ = tick.tick() => {}
        }
    }
}

/// Sets the ACL gauges (at scrape time): `veil_router_acl_staleness_seconds` (+Inf before the
/// first sync), `veil_router_acl_fresh`, `veil_router_acl_checkpoint_block` and
/// `veil_router_acl_head_block`.
pub fn export_metrics(state: &AppState) {
    let Some(acl) = &state.acl else {
        return;
    };
    let view = acl.view();
    metrics::gauge!("veil_router_acl_staleness_seconds").set(
        view.staleness()
            .map(|d| d.as_secs_f64())
            .unwrap_or(f64::INFINITY),
    );
    metrics::gauge!("veil_router_acl_fresh").set(if acl.is_fresh() { 1.0 } else { 0.0 });
    if let Some(cp) = view.checkpoint() {
        metrics::gauge!("veil_router_acl_checkpoint_block").set(cp.block_number as f64);
    }
    if let Some(head) = view.head() {
        metrics::gauge!("veil_router_acl_head_block").set(head as f64);
    }
}
