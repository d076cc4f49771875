//! [`AclReader`]: an in-memory copy of the ACL contract's state that follows the chain.
//!
//! The reader loads the whole state once, with view calls pinned to one block (`head -
//! confirmations`), then follows the contract's event logs from the last processed block. Each
//! step records a checkpoint (block number and hash) and, when configured, persists it with the
//! state to a file, so a restarted reader resumes where it stopped. Before following on from a
//! checkpoint it checks that the checkpoint's block is still in the canonical chain; when it is
//! not (a reorganisation deeper than the configured confirmations), it reloads the state.
//!
//! Queries ([`AclView`]) are synchronous reads of memory: no RPC call per task. The reader
//! reports how long ago it last caught up with the chain ([`AclView::staleness`]) so that the
//! router can fail closed when the view is too old (protocol section 7.5).

use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock, RwLockReadGuard};
use std::time::{Duration, Instant};

use alloy::eips::{BlockId, BlockNumberOrTag};
use alloy::primitives::{Address, B256};
use alloy::providers::{DynProvider, Provider};
use alloy::rpc::types::Filter;
use alloy::sol_types::SolEventInterface;
use alloy::transports::http::reqwest::Url;
use tokio::sync::{oneshot, watch};
use tokio::task::JoinHandle;

use crate::bindings::VeilAcl::{self, VeilAclEvents};
use crate::client::{DEFAULT_PAGE, http_provider, read_state};
use crate::error::{Error, Result};
use crate::state::{AclState, Checkpoint, CheckpointFile, MinerInfo, SessionInfo, SessionKey};

/// How the reader follows the chain.
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct ReaderConfig {
    /// The ACL contract's address.
    pub contract: Address,
    /// How many blocks behind the head the view is kept: a change is applied once its block is
    /// this many blocks below the head (0 = follow the head itself). Reorganisations up to this
    /// depth never reach the view; deeper ones are detected and make the reader reload.
    pub confirmations: u64,
    /// Where the checkpoint (block, hash and state) is kept between runs; `None` keeps it in
    /// memory only.
    pub checkpoint_path: Option<PathBuf>,
    /// How often the background task ([`AclReader::spawn`]) syncs.
    pub poll_interval: Duration,
    /// The most blocks asked for in one `eth_getLogs` call.
    pub max_log_range: u64,
    /// Page size for the paginated views read when loading the state.
    pub page_size: u64,
    /// How long one sync may take before it is abandoned (and counted as failed).
    pub sync_timeout: Duration,
}

impl ReaderConfig {
    /// Defaults: 2 confirmations, no checkpoint file, a sync every 2 s, 5,000 blocks per log
    /// query, pages of 200, 30 s per sync.
    pub fn new(contract: Address) -> Self {
        Self {
            contract,
            confirmations: 2,
            checkpoint_path: None,
            poll_interval: Duration::from_secs(2),
            max_log_range: 5_000,
            page_size: DEFAULT_PAGE,
            sync_timeout: Duration::from_secs(30),
        }
    }

    /// Sets [`Self::confirmations`].
    pub fn with_confirmations(mut self, confirmations: u64) -> Self {
        self.confirmations = confirmations;
        self
    }

    /// Sets [`Self::checkpoint_path`].
    pub fn with_checkpoint_path(mut self, path: impl Into<PathBuf>) -> Self {
        self.checkpoint_path = Some(path.into());
        self
    }

    /// Sets [`Self::poll_interval`].
    pub fn with_poll_interval(mut self, interval: Duration) -> Self {
        self.poll_interval = interval;
        self
    }

    /// Sets [`Self::max_log_range`].
    pub fn with_max_log_range(mut self, blocks: u64) -> Self {
        self.max_log_range = blocks;
        self
    }

    /// Sets [`Self::sync_timeout`].
    pub fn with_sync_timeout(mut self, timeout: Duration) -> Self {
        self.sync_timeout = timeout;
        self
    }

    fn validate(&self) -> Result<()> {
        if self.max_log_range == 0 {
            return Err(Error::Config("max_log_range must be at least 1".into()));
        }
        if self.page_size == 0 {
            return Err(Error::Config("page_size must be at least 1".into()));
        }
        if self.poll_interval.is_zero() {
            return Err(Error::Config("poll_interval must not be zero".into()));
        }
        Ok(())
    }
}

/// What one [`AclReader::sync`] did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SyncReport {
    /// The chain head seen.
    pub head: u64,
    /// The checkpoint after the sync.
    pub checkpoint: Checkpoint,
    /// Events applied from the logs.
    pub events: usize,
    /// Whether the state was loaded afresh with view calls (first start, or after a reorg).
    pub reloaded: bool,
    /// Whether the previous checkpoint had fallen out of the canonical chain.
    pub reorg: bool,
}

/// The decision for one (session, miner) pair, staleness included.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AclDecision {
    /// The session is not registered on chain: another allowlist source applies.
    NotOnChain,
    /// The session is on chain, open, and the miner is on its allowlist and active.
    Allowed,
    /// The session is on chain and the miner may not serve it.
    Denied,
    /// The view is older than the bound (or was never synced): fail closed.
    Stale,
}

#[derive(Debug, Default)]
struct Shared {
    state: AclState,
    checkpoint: Option<Checkpoint>,
    last_sync: Option<Instant>,
    last_error: Option<String>,
    head: Option<u64>,
}

/// A cheap, cloneable handle on the reader's in-memory view. Every query is a synchronous read
/// of memory, safe to call per task.
#[derive(Clone, Debug)]
pub struct AclView {
    shared: Arc<RwLock<Shared>>,
    changes: Arc<watch::Sender<u64>>,
}

impl AclView {
    fn read(&self) -> RwLockReadGuard<'_, Shared> {
        // A panic while holding the lock cannot leave the state half-applied (states are
        // swapped whole), so a poisoned lock is still consistent.
        self.shared.read().unwrap_or_else(|p| p.into_inner())
    }

    /// `None` when the session is not registered on chain (another allowlist applies);
    /// otherwise whether `miner` may serve it: the session is open, the miner is on its allowlist
    /// and the miner is active. Says nothing about staleness: see [`Self::decide`].
    pub fn is_allowed(&self, session: impl SessionKey, miner: Address) -> Option<bool> {
        self.read().state.is_allowed(session.session_bytes(), miner)
    }

    /// Like [`Self::is_allowed`], but [`AclDecision::Stale`] when the view is older than
    /// `max_staleness` or was never synced in this process.
    pub fn decide(
        &self,
        session: impl SessionKey,
        miner: Address,
        max_staleness: Duration,
    ) -> AclDecision {
        let shared = self.read();
        match shared.last_sync.map(|t| t.elapsed()) {
            Some(age) if age <= max_staleness => {}
            _ => return AclDecision::Stale,
        }
        match shared.state.is_allowed(session.session_bytes(), miner) {
            None => AclDecision::NotOnChain,
            Some(true) => AclDecision::Allowed,
            Some(false) => AclDecision::Denied,
        }
    }

    /// The session's on-chain record, or `None` when it is not registered.
    pub fn session(&self, session: impl SessionKey) -> Option<SessionInfo> {
        self.read()
            .state
            .sessions
            .get(&session.session_bytes())
            .cloned()
    }

    /// The ids of every session registered on chain, closed ones included, in byte order.
    pub fn session_ids(&self) -> Vec<[u8; 16]> {
        self.read().state.sessions.keys().copied().collect()
    }

    /// The miners that may serve the session now (allowlisted and active); `None` when the
    /// session is not registered, empty when it is closed.
    pub fn allowed_miners(&self, session: impl SessionKey) -> Option<Vec<Address>> {
        let shared = self.read();
        let s = shared.state.sessions.get(&session.session_bytes())?;
        if s.closed {
            return Some(Vec::new());
        }
        Some(
            s.allowed
                .iter()
                .filter(|m| shared.state.miners.get(*m).is_some_and(|i| i.active))
                .copied()
                .collect(),
        )
    }

    /// The miner's on-chain record, or `None` when it was never registered.
    pub fn miner(&self, miner: Address) -> Option<MinerInfo> {
        self.read().state.miners.get(&miner).cloned()
    }

    /// Whether `account` is an admin of the contract.
    pub fn is_admin(&self, account: Address) -> bool {
        self.read().state.admins.contains(&account)
    }

    /// The contract's admins.
    pub fn admins(&self) -> Vec<Address> {
        self.read().state.admins.iter().copied().collect()
    }

    /// The block the view is current at, or `None` before anything was loaded.
    pub fn checkpoint(&self) -> Option<Checkpoint> {
        self.read().checkpoint
    }

    /// Time since the reader last caught up with the chain (head minus confirmations), or `None`
    /// when it has not done so in this process (a view resumed from a file is not fresh until
    /// the first sync succeeds).
    pub fn staleness(&self) -> Option<Duration> {
        self.read().last_sync.map(|t| t.elapsed())
    }

    /// Whether the view caught up with the chain within `max_staleness`.
    pub fn is_fresh(&self, max_staleness: Duration) -> bool {
        self.staleness().is_some_and(|age| age <= max_staleness)
    }

    /// The chain head seen at the last successful sync.
    pub fn head(&self) -> Option<u64> {
        self.read().head
    }

    /// Why the last sync failed, if it did (cleared by a successful one).
    pub fn last_error(&self) -> Option<String> {
        self.read().last_error.clone()
    }

    /// A receiver that changes every time the view changes (a new checkpoint is installed);
    /// its value counts the changes.
    pub fn changes(&self) -> watch::Receiver<u64> {
        self.changes.subscribe()
    }
}

/// Follows the ACL contract and keeps an [`AclView`] current. See the module documentation.
#[derive(Debug)]
pub struct AclReader {
    provider: DynProvider,
    contract: VeilAcl::VeilAclInstance<DynProvider>,
    config: ReaderConfig,
    view: AclView,
    chain_id: Option<u64>,
    file_chain_id: Option<u64>,
    persisted: Option<Checkpoint>,
}

impl AclReader {
    /// A reader over `provider` (HTTP or WebSocket). When the configured checkpoint file exists
    /// and belongs to the same contract, the view starts from it (not fresh until the first
    /// sync); an unreadable or foreign file is ignored and the state is loaded from the chain.
    /// Nothing is asked of the chain until [`Self::sync`].
    pub fn new(provider: DynProvider, config: ReaderConfig) -> Result<Self> {
        config.validate()?;
        let mut shared = Shared::default();
        let mut file_chain_id = None;
        if let Some(path) = &config.checkpoint_path {
            match load_checkpoint(path) {
                Ok(Some(file)) if file.contract == config.contract => {
                    file_chain_id = Some(file.chain_id);
                    shared.checkpoint = Some(file.checkpoint);
                    shared.state = file.into_state();
                }
                Ok(Some(file)) => tracing::warn!(
                    path = %path.display(),
                    file_contract = %file.contract,
                    "ACL checkpoint belongs to another contract; loading from the chain"
                ),
                Ok(None) => {}
                Err(e) => {
                    tracing::warn!(error = %e, "ignoring ACL checkpoint; loading from the chain")
                }
            }
        }
        let persisted = shared.checkpoint;
        let (changes, _) = watch::channel(0);
        Ok(Self {
            contract: VeilAcl::new(config.contract, provider.clone()),
            provider,
            config,
            view: AclView {
                shared: Arc::new(RwLock::new(shared)),
                changes: Arc::new(changes),
            },
            chain_id: None,
            file_chain_id,
            persisted,
        })
    }

    /// A reader over a plain HTTP(S) provider for `url`.
    pub fn connect_http(url: Url, config: ReaderConfig) -> Result<Self> {
        Self::new(http_provider(url), config)
    }

    /// The handle the router queries.
    pub fn view(&self) -> AclView {
        self.view.clone()
    }

    /// The configuration.
    pub fn config(&self) -> &ReaderConfig {
        &self.config
    }

    /// Brings the view up to `head - confirmations`: loads the state on first use or after a
    /// reorganisation, otherwise applies the logs since the checkpoint; then persists the
    /// checkpoint. On failure the view keeps its last state and grows stale.
    pub async fn sync(&mut self) -> Result<SyncReport> {
        let result = match tokio::time::timeout(self.config.sync_timeout, self.sync_inner()).await {
            Ok(result) => result,
            Err(_) => Err(Error::Rpc(format!(
                "sync did not finish within {}s",
                self.config.sync_timeout.as_secs()
            ))),
        };
        let mut shared = self.view.shared.write().unwrap_or_else(|p| p.into_inner());
        match &result {
            Ok(report) => {
                shared.last_sync = Some(Instant::now());
                shared.last_error = None;
                shared.head = Some(report.head);
            }
            Err(e) => shared.last_error = Some(e.to_string()),
        }
        result
    }

    async fn sync_inner(&mut self) -> Result<SyncReport> {
        let chain_id = match self.chain_id {
            Some(id) => id,
            None => {
                let id = self.provider.get_chain_id().await?;
                if self.file_chain_id.is_some_and(|f| f != id) {
                    tracing::warn!(
                        chain_id = id,
                        "ACL checkpoint is from another chain; reloading"
                    );
                    self.install(AclState::default(), None);
                }
                self.chain_id = Some(id);
                id
            }
        };
        let head = self.provider.get_block_number().await?;
        let target = head.saturating_sub(self.config.confirmations);
        let mut report = SyncReport {
            head,
            checkpoint: Checkpoint {
                block_number: 0,
                block_hash: B256::ZERO,
            },
            events: 0,
            reloaded: false,
            reorg: false,
        };
        let current = self.view.checkpoint();
        report.checkpoint = match current {
            None => {
                report.reloaded = true;
                self.reload(target).await?
            }
            Some(cp) => {
                if self.block_hash(cp.block_number).await? == Some(cp.block_hash) {
                    if target > cp.block_number {
                        let (checkpoint, events) = self.follow(cp, target).await?;
                        report.events = events;
                        checkpoint
                    } else {
                        cp
                    }
                } else {
                    tracing::warn!(
                        block = cp.block_number,
                        hash = %cp.block_hash,
                        "ACL checkpoint block is no longer canonical (reorganisation); reloading"
                    );
                    report.reorg = true;
                    report.reloaded = true;
                    self.reload(target).await?
                }
            }
        };
        self.persist(chain_id).await?;
        Ok(report)
    }

    async fn block_hash(&self, number: u64) -> Result<Option<B256>> {
        let block = self
            .provider
            .get_block_by_number(BlockNumberOrTag::Number(number))
            .await?;
        Ok(block.map(|b| b.header.hash))
    }

    async fn reload(&mut self, target: u64) -> Result<Checkpoint> {
        let hash = self
            .block_hash(target)
            .await?
            .ok_or(Error::ReorgDuringRead)?;
        let at = BlockId::hash(hash);
        let code = self
            .provider
            .get_code_at(self.config.contract)
            .block_id(at)
            .await?;
        if code.is_empty() {
            return Err(Error::NoCode(self.config.contract));
        }
        let state = read_state(&self.contract, at, self.config.page_size).await?;
        let checkpoint = Checkpoint {
            block_number: target,
            block_hash: hash,
        };
        self.install(state, Some(checkpoint));
        Ok(checkpoint)
    }

    async fn follow(&mut self, from_cp: Checkpoint, target: u64) -> Result<(Checkpoint, usize)> {
        let mut prev = from_cp;
        let mut events = 0;
        while prev.block_number < target {
            let from = prev.block_number + 1;
            let to = target.min(prev.block_number.saturating_add(self.config.max_log_range));
            let to_hash = self.block_hash(to).await?.ok_or(Error::ReorgDuringRead)?;
            let filter = Filter::new()
                .address(self.config.contract)
                .from_block(from)
                .to_block(to);
            let logs = self.provider.get_logs(&filter).await?;
            // The block hash at `to` commits to every block before it: if both ends are still
            // the same after the query, the logs came from that chain.
            if self.block_hash(to).await? != Some(to_hash)
                || self.block_hash(prev.block_number).await? != Some(prev.block_hash)
            {
                return Err(Error::ReorgDuringRead);
            }
            let mut state = self.view.read().state.clone();
            for log in logs.iter().filter(|l| !l.removed) {
                if log.block_number == Some(to) && log.block_hash != Some(to_hash) {
                    return Err(Error::ReorgDuringRead);
                }
                let event =
                    VeilAclEvents::decode_raw_log(log.topics(), &log.data().data).map_err(|e| {
                        Error::Rpc(format!(
                            "a log of the ACL contract does not decode ({e}); is the address right?"
                        ))
                    })?;
                state.apply(&event);
                events += 1;
            }
            prev = Checkpoint {
                block_number: to,
                block_hash: to_hash,
            };
            self.install(state, Some(prev));
        }
        Ok((prev, events))
    }

    fn install(&self, state: AclState, checkpoint: Option<Checkpoint>) {
        {
            let mut shared = self.view.shared.write().unwrap_or_else(|p| p.into_inner());
            shared.state = state;
            shared.checkpoint = checkpoint;
        }
        self.view.changes.send_modify(|n| *n += 1);
    }

    async fn persist(&mut self, chain_id: u64) -> Result<()> {
        let Some(path) = self.config.checkpoint_path.clone() else {
            return Ok(());
        };
        let file = {
            let shared = self.view.read();
            let Some(checkpoint) = shared.checkpoint else {
                return Ok(());
            };
            if self.persisted == Some(checkpoint) {
                return Ok(());
            }
            CheckpointFile::new(chain_id, self.config.contract, checkpoint, &shared.state)
        };
        let checkpoint = file.checkpoint;
        tokio::task::spawn_blocking(move || write_checkpoint(&path, &file))
            .await
            .map_err(|e| Error::Rpc(format!("checkpoint writer stopped: {e}")))??;
        self.persisted = Some(checkpoint);
        Ok(())
    }

    /// Runs [`Self::sync`] every [`ReaderConfig::poll_interval`] on the current tokio runtime
    /// until the returned handle is stopped or dropped. Failures are logged and leave the view
    /// growing stale.
    pub fn spawn(mut self) -> AclFollower {
        let view = self.view();
        let interval = self.config.poll_interval;
        let (stop_tx, mut stop_rx) = oneshot::channel::<()>();
        let handle = tokio::spawn(async move {
            loop {
                tokio::select! {
                    _ = &mut stop_rx => break,
                    result = self.sync() => {
                        if let Err(e) = result {
                            tracing::warn!(error = %e, "ACL sync failed");
                        }
                    }
                }
                tokio::select! {
                    _ = &mut stop_rx => break,
                    () = tokio::time::sleep(interval) => {}
                }
            }
            self
        });
        AclFollower {
            view,
            stop: Some(stop_tx),
            handle: Some(handle),
        }
    }
}

/// The background task started by [`AclReader::spawn`]; dropping it stops the task.
#[derive(Debug)]
pub struct AclFollower {
    view: AclView,
    stop: Option<oneshot::Sender<()>>,
    handle: Option<JoinHandle<AclReader>>,
}

impl AclFollower {
    /// The view the task keeps current.
    pub fn view(&self) -> AclView {
        self.view.clone()
    }

    /// Stops the task (after the sync in progress, if any, is abandoned) and gives the reader
    /// back, or `None` if the task had panicked.
    pub async fn stop(mut self) -> Option<AclReader> {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        self.handle.take()?.await.ok()
    }
}

impl Drop for AclFollower {
    fn drop(&mut self) {
        if let Some(handle) = &self.handle {
            handle.abort();
        }
    }
}

fn load_checkpoint(path: &Path) -> Result<Option<CheckpointFile>> {
    let err = |message: String| Error::Checkpoint {
        path: path.to_path_buf(),
        message,
    };
    let text = match std::fs::read(path) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(err(e.to_string())),
    };
    let file: CheckpointFile =
        serde_json::from_slice(&text).map_err(|e| err(format!("not a checkpoint: {e}")))?;
    if file.format != CheckpointFile::FORMAT {
        return Err(err(format!("unknown format {}", file.format)));
    }
    Ok(Some(file))
}

/// Writes the file next to its final name and renames it into place, so a crash leaves either
/// the old checkpoint or the new one, never a torn file.
fn write_checkpoint(path: &Path, file: &CheckpointFile) -> Result<()> {
    use std::io::Write;
    let err = |message: String| Error::Checkpoint {
        path: path.to_path_buf(),
        message,
    };
    let bytes = serde_json::to_vec(file).map_err(|e| err(e.to_string()))?;
    let mut tmp_name = path.file_name().unwrap_or_default().to_os_string();
    tmp_name.push(".tmp");
    let tmp = path.with_file_name(tmp_name);
    let mut f = std::fs::File::create(&tmp).map_err(|e| err(e.to_string()))?;
    f.write_all(&bytes).map_err(|e| err(e.to_string()))?;
    f.sync_all().map_err(|e| err(e.to_string()))?;
    drop(f);
    std::fs::rename(&tmp, path).map_err(|e| err(e.to_string()))?;
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        // Makes the rename itself durable; not every platform lets a directory be opened.
        if let Ok(d) = std::fs::File::open(dir) {
            let _ = d.sync_all();
        }
    }
    Ok(())
}
