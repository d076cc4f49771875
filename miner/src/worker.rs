//! [`Worker`]: the miner loop. Logs in, long-polls for leases, and runs up to `concurrency`
//! tasks at a time, each with its own heartbeat.

use std::fmt;
use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use alloy_primitives::Address;
use alloy_signer::Signer;
use backon::{BackoffBuilder, ExponentialBuilder, Retryable};
use bytes::Bytes;
use futures::StreamExt;
use futures::stream::FuturesUnordered;
use sha2::{Digest, Sha256};
use tokio::sync::{Mutex, Semaphore, mpsc};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, debug, error, info, instrument, warn};
use veil_api::eip712::Domain;
use veil_api::miner::{
    BlobReceipt, CompleteRequest, Lease, LeaseRequest, LoginRequest, MinerConfig, PromptPayload,
    Usage,
};
use veil_api::wire::parse_address;
use veil_blobstore::Urn;
use veil_keys::{BlobParams, Purpose, Scope, SecretKey, X25519Public, X25519Secret};

use crate::client::MinerClient;
use crate::engine::{Engine, GenerateRequest};
use crate::pipeline::{Produced, produce};
use crate::sign::{sign_key_request, sign_login, sign_task_result, task_key_id, unix_now};
use crate::{Error, Result};

/// The protocol version this miner speaks.
pub const PROTOCOL_VERSION: u32 = 1;

/// Log in again this long before the token expires.
const TOKEN_REFRESH_MARGIN_SECS: u64 = 120;
/// Sealed bytes that may queue ahead of the upload.
const BODY_QUEUE: usize = 32;

/// How a task ended, as counted in a [`RunSummary`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum TaskOutcome {
    /// The result was accepted.
    Completed,
    /// The task already had a result; ours was recorded as a duplicate.
    Duplicate,
    /// The task was failed for good (the prompt did not authenticate or cannot be run).
    Failed,
    /// The lease was given back (engine error, refused key, shutdown, …).
    Released,
    /// The lease was lost (expired or taken over); nothing more was sent.
    Lost,
    /// Ended with an error even the release or fail call did not get through.
    Errored,
}

/// What a [`Worker::run`] did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RunSummary {
    /// Leases obtained.
    pub leased: u64,
    /// Results accepted.
    pub completed: u64,
    /// Results answered `duplicate`.
    pub duplicates: u64,
    /// Tasks failed for good.
    pub failed: u64,
    /// Leases released.
    pub released: u64,
    /// Leases lost.
    pub lost: u64,
    /// Tasks that ended in an error that could not be reported (or a panic).
    pub errored: u64,
    /// Where the time of the completed tasks went.
    pub steps: StepTimes,
}

/// Time spent per step over the tasks this worker completed, summed in microseconds (divide by
/// `tasks` for a mean). Logged per task too, at info level (`task timings`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StepTimes {
    /// Tasks counted.
    pub tasks: u64,
    /// Signing the key request, the router's answer, unwrapping the task key.
    pub key_us: u64,
    /// After the key: whatever is left of fetching the sealed prompt and checking its hash
    /// (fetched while the key is requested), then opening it.
    pub prompt_us: u64,
    /// The engine's run, with the result sealed and uploaded as it is produced.
    pub generate_us: u64,
    /// Signing and submitting the `TaskResult`.
    pub submit_us: u64,
}

impl RunSummary {
    fn record(&mut self, outcome: TaskOutcome) {
        let slot = match outcome {
            TaskOutcome::Completed => &mut self.completed,
            TaskOutcome::Duplicate => &mut self.duplicates,
            TaskOutcome::Failed => &mut self.failed,
            TaskOutcome::Released => &mut self.released,
            TaskOutcome::Lost => &mut self.lost,
            TaskOutcome::Errored => &mut self.errored,
        };
        *slot += 1;
    }

    /// Tasks that ended, however.
    pub fn finished(&self) -> u64 {
        self.completed + self.duplicates + self.failed + self.released + self.lost + self.errored
    }
}

type DynSigner = dyn Signer + Send + Sync;

/// Builds a [`Worker`]. Router URL, wallet, identity and engine are required.
pub struct WorkerBuilder {
    router_url: Option<String>,
    http: Option<reqwest::Client>,
    signer: Option<Arc<DynSigner>>,
    identity: Option<X25519Secret>,
    engine: Option<Arc<dyn Engine>>,
    concurrency: usize,
    lease_pollers: usize,
    lease_wait: Duration,
    lease_models: Option<Vec<String>>,
    expected_chain_id: Option<u64>,
    grace: Duration,
    heartbeat_interval: Option<Duration>,
    backoff: ExponentialBuilder,
    max_prompt_bytes: Option<u64>,
}

impl fmt::Debug for WorkerBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("WorkerBuilder")
            .field("router_url", &self.router_url)
            .field("wallet", &self.signer.as_ref().map(|s| s.address()))
            .field("identity", &self.identity.as_ref().map(|i| i.public()))
            .field("concurrency", &self.concurrency)
            .field("lease_wait", &self.lease_wait)
            .field("expected_chain_id", &self.expected_chain_id)
            .field("grace", &self.grace)
            .finish_non_exhaustive()
    }
}

impl Default for WorkerBuilder {
    fn default() -> Self {
        Self {
            router_url: None,
            http: None,
            signer: None,
            identity: None,
            engine: None,
            concurrency: 1,
            lease_pollers: DEFAULT_LEASE_POLLERS,
            lease_wait: Duration::from_secs(20),
            lease_models: None,
            expected_chain_id: None,
            grace: Duration::from_secs(30),
            heartbeat_interval: None,
            backoff: ExponentialBuilder::default()
                .with_min_delay(Duration::from_millis(200))
                .with_max_delay(Duration::from_secs(5))
                .with_max_times(5)
                .with_jitter(),
            max_prompt_bytes: None,
        }
    }
}

impl WorkerBuilder {
    /// The router's base URL, e.g. `http://127.0.0.1:8080`.
    pub fn router_url(mut self, url: impl Into<String>) -> Self {
        self.router_url = Some(url.into());
        self
    }

    /// A prepared HTTP client (custom TLS roots, proxies).
    pub fn http_client(mut self, http: reqwest::Client) -> Self {
        self.http = Some(http);
        self
    }

    /// The miner's wallet: any alloy signer (local key, keystore, hardware).
    pub fn wallet<S>(mut self, signer: S) -> Self
    where
        S: Signer + Send + Sync + 'static,
    {
        self.signer = Some(Arc::new(signer));
        self
    }

    /// The miner's wallet, shared.
    pub fn wallet_arc(mut self, signer: Arc<dyn Signer + Send + Sync>) -> Self {
        self.signer = Some(signer);
        self
    }

    /// The X25519 identity task keys are wrapped to.
    pub fn identity(mut self, identity: X25519Secret) -> Self {
        self.identity = Some(identity);
        self
    }

    /// The inference engine.
    pub fn engine<E: Engine>(mut self, engine: E) -> Self {
        self.engine = Some(Arc::new(engine));
        self
    }

    /// The inference engine, shared.
    pub fn engine_arc(mut self, engine: Arc<dyn Engine>) -> Self {
        self.engine = Some(engine);
        self
    }

    /// Tasks run at the same time (default 1).
    pub fn concurrency(mut self, n: usize) -> Self {
        self.concurrency = n;
        self
    }

    /// Lease requests in flight at once, each holding a free task slot (default 4, never more
    /// than `concurrency`). One request at a time caps a miner at one lease per round trip; a
    /// few in parallel let a fast engine keep all its slots busy.
    pub fn lease_pollers(mut self, n: usize) -> Self {
        self.lease_pollers = n;
        self
    }

    /// How long one lease long-poll waits (default 20 s; capped by the router's `max_wait_ms`).
    pub fn lease_wait(mut self, wait: Duration) -> Self {
        self.lease_wait = wait;
        self
    }

    /// Lease only tasks for these of the engine's models (default: all of them).
    pub fn lease_models<I, S>(mut self, models: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.lease_models = Some(models.into_iter().map(Into::into).collect());
        self
    }

    /// Refuse to sign for a router whose EIP-712 domain is on another chain.
    pub fn expected_chain_id(mut self, chain_id: u64) -> Self {
        self.expected_chain_id = Some(chain_id);
        self
    }

    /// How long in-flight tasks may run on after shutdown before they are released (default 30 s).
    pub fn grace_period(mut self, grace: Duration) -> Self {
        self.grace = grace;
        self
    }

    /// Heartbeat every `interval` instead of a third of the lease TTL.
    pub fn heartbeat_interval(mut self, interval: Duration) -> Self {
        self.heartbeat_interval = Some(interval);
        self
    }

    /// Backoff for transient errors: delays from `min` doubling to `max`, at most `times` retries.
    pub fn retry(mut self, min: Duration, max: Duration, times: usize) -> Self {
        self.backoff = ExponentialBuilder::default()
            .with_min_delay(min)
            .with_max_delay(max)
            .with_max_times(times)
            .with_jitter();
        self
    }

    /// Refuse prompt blobs larger than this (default 64 MiB).
    pub fn max_prompt_bytes(mut self, limit: u64) -> Self {
        self.max_prompt_bytes = Some(limit);
        self
    }

    /// Checks the settings and builds the worker.
    pub fn build(self) -> Result<Worker> {
        let missing = |what: &str| Error::Config(format!("{what} is required"));
        let url = self.router_url.ok_or_else(|| missing("router URL"))?;
        let mut client = match self.http {
            Some(http) => MinerClient::with_http(&url, http)?,
            None => MinerClient::new(&url)?,
        };
        if let Some(limit) = self.max_prompt_bytes {
            client = client.with_max_prompt_bytes(limit);
        }
        if self.concurrency == 0 {
            return Err(Error::Config("concurrency must be at least 1".into()));
        }
        if self.lease_pollers == 0 {
            return Err(Error::Config("lease_pollers must be at least 1".into()));
        }
        let engine = self.engine.ok_or_else(|| missing("engine"))?;
        let models: Vec<String> = engine.models().into_iter().map(|m| m.name).collect();
        if models.is_empty() {
            return Err(Error::Config("the engine serves no model".into()));
        }
        Ok(Worker {
            client,
            signer: self.signer.ok_or_else(|| missing("wallet"))?,
            identity: self.identity.ok_or_else(|| missing("X25519 identity"))?,
            engine,
            settings: Settings {
                concurrency: self.concurrency,
                lease_pollers: self.lease_pollers.min(self.concurrency),
                lease_wait: self.lease_wait,
                lease_models: self.lease_models,
                expected_chain_id: self.expected_chain_id,
                grace: self.grace,
                heartbeat_interval: self.heartbeat_interval,
                backoff: self.backoff,
            },
        })
    }
}

#[derive(Debug, Clone)]
struct Settings {
    concurrency: usize,
    lease_pollers: usize,
    lease_wait: Duration,
    lease_models: Option<Vec<String>>,
    expected_chain_id: Option<u64>,
    grace: Duration,
    heartbeat_interval: Option<Duration>,
    backoff: ExponentialBuilder,
}

/// A miner: leases tasks from a router and runs them on an engine.
pub struct Worker {
    client: MinerClient,
    signer: Arc<DynSigner>,
    identity: X25519Secret,
    engine: Arc<dyn Engine>,
    settings: Settings,
}

impl fmt::Debug for Worker {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Worker")
            .field("router", &self.client.base_url())
            .field("wallet", &self.signer.address())
            .field("recipient", &self.identity.public())
            .field("settings", &self.settings)
            .finish_non_exhaustive()
    }
}

/// How long a task whose heartbeat was refused may still finish a result submission that was
/// already in flight.
const LOST_SETTLE: Duration = Duration::from_secs(2);

/// Aborts a spawned task when dropped.
struct AbortOnDrop<T>(tokio::task::JoinHandle<T>);

impl<T> Drop for AbortOnDrop<T> {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// A worker running on its own task: stop it gracefully or kill it.
#[derive(Debug)]
pub struct WorkerHandle {
    stop: CancellationToken,
    join: tokio::task::JoinHandle<Result<RunSummary>>,
}

impl WorkerHandle {
    /// The token that stops the worker gracefully when cancelled.
    pub fn stop_token(&self) -> CancellationToken {
        self.stop.clone()
    }

    /// Stops leasing, lets in-flight tasks finish within the grace period, and returns the
    /// summary.
    pub async fn shutdown(self) -> Result<RunSummary> {
        self.stop.cancel();
        self.join().await
    }

    /// Waits for the worker to end (after a stop, or a fatal error).
    pub async fn join(self) -> Result<RunSummary> {
        match self.join.await {
            Ok(r) => r,
            Err(e) => Err(Error::Crashed(e.to_string())),
        }
    }

    /// Kills the worker at once, like a crashed process: no release, no complete. Its leases
    /// lapse at the router.
    pub fn kill(self) {
        self.join.abort();
    }
}

impl Worker {
    /// A builder.
    pub fn builder() -> WorkerBuilder {
        WorkerBuilder::default()
    }

    /// The low-level client this worker uses (shares its token).
    pub fn client(&self) -> &MinerClient {
        &self.client
    }

    /// The wallet address (the miner's identity at the router).
    pub fn address(&self) -> Address {
        self.signer.address()
    }

    /// The X25519 public key task keys are wrapped to.
    pub fn recipient(&self) -> X25519Public {
        self.identity.public()
    }

    /// Runs on a spawned task until [`WorkerHandle::shutdown`] (or a fatal error).
    pub fn spawn(self) -> WorkerHandle {
        let stop = CancellationToken::new();
        let token = stop.clone();
        let join = tokio::spawn(async move { self.run(token.cancelled_owned()).await });
        WorkerHandle { stop, join }
    }

    /// Runs until `shutdown` resolves: then stops leasing, lets in-flight tasks finish within the
    /// grace period, releases those still running, and returns what it did. Returns an error on
    /// what retrying cannot fix (router unreachable after retries at start, wrong chain, login
    /// refused, lease refused).
    pub async fn run<F>(self, shutdown: F) -> Result<RunSummary>
    where
        F: Future<Output = ()> + Send,
    {
        tokio::pin!(shutdown);
        let mut summary = RunSummary::default();
        let rt = tokio::select! {
            biased;
            _ = &mut shutdown => return Ok(summary),
            rt = Runtime::start(self) => Arc::new(rt?),
        };
        let permits = Arc::new(Semaphore::new(rt.settings.concurrency));
        let kill = CancellationToken::new();
        let mut tasks: JoinSet<TaskOutcome> = JoinSet::new();
        let mut backoff: Option<backon::ExponentialBackoff> = None;
        let mut fatal = None;

        // Up to `lease_pollers` lease requests in flight, each holding the slot its task will run in.
        let mut polls = FuturesUnordered::new();
        loop {
            while polls.len() < rt.settings.lease_pollers {
                let Ok(permit) = permits.clone().try_acquire_owned() else {
                    break;
                };
                let rt = rt.clone();
                polls.push(async move { (permit, rt.lease_once().await) });
            }
            let (permit, leased) = tokio::select! {
                biased;
                _ = &mut shutdown => break,
                Some(done) = tasks.join_next(), if !tasks.is_empty() => {
                    summary.record(done.unwrap_or(TaskOutcome::Errored));
                    continue;
                }
                Some(polled) = polls.next(), if !polls.is_empty() => polled,
            };
            match leased {
                Ok(Some(lease)) => {
                    backoff = None;
                    summary.leased += 1;
                    let rt = rt.clone();
                    let kill = kill.child_token();
                    tasks.spawn(async move {
                        let outcome = rt.run_task(lease, kill).await;
                        drop(permit);
                        outcome
                    });
                }
                Ok(None) => backoff = None,
                // 409: a conflict of the moment (e.g. a lease limit); wait and ask again.
                Err(e) if e.is_transient() || e.status() == Some(409) => {
                    drop(permit);
                    let delay = backoff
                        .get_or_insert_with(|| rt.settings.backoff.without_max_times().build())
                        .next()
                        .unwrap_or(Duration::from_secs(5));
                    warn!(code = e.code(), error = %e, delay_ms = delay.as_millis() as u64, "lease failed; retrying");
                    tokio::select! {
                        _ = &mut shutdown => break,
                        _ = tokio::time::sleep(delay) => {}
                    }
                }
                Err(e) => {
                    error!(code = e.code(), error = %e, "lease refused; stopping");
                    fatal = Some(e);
                    break;
                }
            }
        }
        // Lease requests still in flight are abandoned: a lease granted meanwhile expires at the
        // router and its task goes back to the queue.
        drop(polls);

        info!(in_flight = tasks.len(), "stopping: no more leases");
        let grace = tokio::time::sleep(rt.settings.grace);
        tokio::pin!(grace);
        loop {
            tokio::select! {
                done = tasks.join_next() => match done {
                    Some(done) => summary.record(done.unwrap_or(TaskOutcome::Errored)),
                    None => break,
                },
                _ = &mut grace, if !kill.is_cancelled() => {
                    warn!(in_flight = tasks.len(), "grace period over; releasing the rest");
                    kill.cancel();
                }
            }
        }
        summary.steps = *rt.steps.lock().unwrap_or_else(|p| p.into_inner());
        info!(?summary, "worker stopped");
        match fatal {
            Some(e) => Err(e),
            None => Ok(summary),
        }
    }
}

/// Lease requests in flight at once by default.
pub(crate) const DEFAULT_LEASE_POLLERS: usize = 4;

/// What tasks share while the worker runs.
struct Runtime {
    client: MinerClient,
    signer: Arc<DynSigner>,
    identity: X25519Secret,
    engine: Arc<dyn Engine>,
    settings: Settings,
    config: MinerConfig,
    models: Vec<String>,
    login_lock: Mutex<()>,
    token_expires_at: AtomicU64,
    steps: std::sync::Mutex<StepTimes>,
}

impl Runtime {
    /// Fetches the config, checks it, and logs in.
    async fn start(w: Worker) -> Result<Runtime> {
        let client = w.client.clone();
        let config = (|| client.config())
            .retry(w.settings.backoff)
            .when(Error::is_transient)
            .notify(|e, d| warn!(code = e.code(), error = %e, delay_ms = d.as_millis() as u64, "router config unavailable; retrying"))
            .await?;
        if config.protocol_version != PROTOCOL_VERSION {
            return Err(Error::ProtocolVersion(config.protocol_version));
        }
        if let Some(expected) = w.settings.expected_chain_id
            && expected != config.domain.chain_id
        {
            return Err(Error::ChainMismatch {
                expected,
                got: config.domain.chain_id,
            });
        }
        info!(
            chain_id = config.domain.chain_id,
            contract = %config.domain.verifying_contract,
            lease_ttl_ms = config.lease_ttl_ms,
            "router config"
        );
        let models = w.engine.models().into_iter().map(|m| m.name).collect();
        let rt = Runtime {
            client: w.client,
            signer: w.signer,
            identity: w.identity,
            engine: w.engine,
            settings: w.settings,
            config,
            models,
            login_lock: Mutex::new(()),
            token_expires_at: AtomicU64::new(0),
            steps: std::sync::Mutex::new(StepTimes::default()),
        };
        rt.relogin(None).await?;
        Ok(rt)
    }

    fn domain(&self) -> &Domain {
        &self.config.domain
    }

    async fn login(&self) -> Result<()> {
        let signer: &DynSigner = &*self.signer;
        let login = sign_login(signer, self.domain(), &self.identity.public()).await?;
        let body = LoginRequest {
            login,
            models: self.engine.models(),
        };
        let resp = self.client.login(&body).await?;
        if parse_address(&resp.miner).ok() != Some(self.signer.address()) {
            return Err(Error::Protocol {
                endpoint: veil_api::routes::MINER_LOGIN,
                detail: format!("logged in as {}, not as the wallet", resp.miner),
            });
        }
        self.token_expires_at
            .store(resp.expires_at, Ordering::Relaxed);
        info!(miner = %resp.miner, expires_at = resp.expires_at, "logged in");
        Ok(())
    }

    /// Logs in again, unless another task already did since `stale` was the token.
    async fn relogin(&self, stale: Option<&str>) -> Result<()> {
        let _guard = self.login_lock.lock().await;
        if stale.is_some() && self.client.token().as_deref() != stale {
            return Ok(());
        }
        (|| self.login())
            .retry(self.settings.backoff)
            .when(Error::is_transient)
            .notify(|e, d| warn!(code = e.code(), error = %e, delay_ms = d.as_millis() as u64, "login failed; retrying"))
            .await
    }

    /// Logs in again when the token is about to expire.
    async fn refresh_token(&self) -> Result<()> {
        let expires = self.token_expires_at.load(Ordering::Relaxed);
        if unix_now() + TOKEN_REFRESH_MARGIN_SECS >= expires {
            let stale = self.client.token();
            self.relogin(stale.as_deref()).await?;
        }
        Ok(())
    }

    /// Calls the router with retries on transient errors and a new login on 401.
    async fn call<T, F, Fut>(&self, f: F) -> Result<T>
    where
        F: Fn() -> Fut,
        Fut: Future<Output = Result<T>>,
    {
        let attempt = || {
            let token = self.client.token();
            let fut = f();
            async move {
                match fut.await {
                    Err(e) if e.is_unauthorized() => {
                        debug!(code = e.code(), "token refused; logging in again");
                        self.relogin(token.as_deref()).await?;
                        Err(Error::Reauthenticated)
                    }
                    other => other,
                }
            }
        };
        attempt
            .retry(self.settings.backoff)
            .when(Error::is_transient)
            .notify(|e, d| debug!(code = e.code(), delay_ms = d.as_millis() as u64, "retrying"))
            .await
    }

    async fn lease_once(&self) -> Result<Option<Lease>> {
        self.refresh_token().await?;
        let wait = self
            .settings
            .lease_wait
            .min(Duration::from_millis(self.config.max_wait_ms));
        let body = LeaseRequest {
            wait_ms: wait.as_millis() as u64,
            models: self.settings.lease_models.clone(),
        };
        let client = &self.client;
        let body = &body;
        // No retries here: the loop backs off on its own and can be stopped meanwhile.
        match client.lease(body).await {
            Err(e) if e.is_unauthorized() => {
                let stale = client.token();
                self.relogin(stale.as_deref()).await?;
                Err(Error::Reauthenticated)
            }
            other => other,
        }
    }

    #[instrument(skip_all, fields(
        task_id = %lease.task_id,
        lease_id = %lease.lease_id,
        session_id = %lease.session_id,
        attempt = lease.attempt,
        key_version = lease.key_version,
        model = %lease.model,
    ))]
    async fn run_task(self: Arc<Self>, lease: Lease, kill: CancellationToken) -> TaskOutcome {
        info!(stream = lease.params.stream, "leased");
        let lost = CancellationToken::new();
        // Aborted when this future ends or is dropped (a killed worker must stop heartbeating,
        // so that its lease lapses at the router).
        let heartbeat = AbortOnDrop(tokio::spawn(
            self.clone()
                .heartbeat(lease.clone(), lost.clone())
                .in_current_span(),
        ));
        let submitting = std::sync::atomic::AtomicBool::new(false);
        let work = self.work(&lease, &submitting);
        tokio::pin!(work);
        let res = tokio::select! {
            biased;
            r = &mut work => r,
            _ = kill.cancelled() => Err(Error::GraceExpired(self.settings.grace)),
            _ = lost.cancelled() => {
                // A heartbeat is refused also when the router has just accepted our result
                // (the lease ends with the task): let a submission in flight finish first.
                if submitting.load(std::sync::atomic::Ordering::SeqCst) {
                    match tokio::time::timeout(LOST_SETTLE, &mut work).await {
                        Ok(r) => r,
                        Err(_) => Err(Error::LeaseLost("heartbeat refused".into())),
                    }
                } else {
                    Err(Error::LeaseLost("heartbeat refused".into()))
                }
            }
        };
        drop(heartbeat);
        let lease_id = lease.lease_id;
        match res {
            Ok(status) if status == "duplicate" => {
                info!("result was a duplicate");
                TaskOutcome::Duplicate
            }
            Ok(_) => {
                info!("completed");
                TaskOutcome::Completed
            }
            Err(e) if e.is_lease_lost() => {
                warn!(code = e.code(), "lease lost; abandoning the task");
                TaskOutcome::Lost
            }
            Err(e) => {
                let fail = matches!(
                    e,
                    Error::PromptTampered(_)
                        | Error::PromptInvalid
                        | Error::UnsupportedPromptScope(_)
                );
                let reason = e.code().to_string();
                let client = &self.client;
                let reason_ref = reason.as_str();
                let reported = if fail {
                    error!(code = %reason, error = %e, "failing the task");
                    self.call(move || client.fail(lease_id, reason_ref)).await
                } else {
                    warn!(code = %reason, error = %e, "releasing the task");
                    self.call(move || client.release(lease_id, reason_ref))
                        .await
                };
                match reported {
                    Ok(()) if fail => TaskOutcome::Failed,
                    Ok(()) => TaskOutcome::Released,
                    Err(e2) if e2.is_lease_lost() => TaskOutcome::Lost,
                    Err(e2) => {
                        error!(code = e2.code(), error = %e2, "could not report the task's end");
                        TaskOutcome::Errored
                    }
                }
            }
        }
    }

    /// Extends the lease every ttl/3; cancels `lost` when the router says it is gone.
    async fn heartbeat(self: Arc<Self>, lease: Lease, lost: CancellationToken) {
        let ttl = if lease.lease_ttl_ms > 0 {
            lease.lease_ttl_ms
        } else {
            self.config.lease_ttl_ms
        };
        let every = self
            .settings
            .heartbeat_interval
            .unwrap_or(Duration::from_millis(ttl / 3))
            .max(Duration::from_millis(20));
        let client = &self.client;
        let lease_id = lease.lease_id;
        loop {
            tokio::time::sleep(every).await;
            match self.call(move || client.heartbeat(lease_id)).await {
                Ok(r) => debug!(lease_expires_at_ms = r.lease_expires_at_ms, "heartbeat"),
                Err(e) if e.is_lease_lost() => {
                    warn!(code = e.code(), "heartbeat: lease lost");
                    lost.cancel();
                    return;
                }
                Err(e) => warn!(code = e.code(), error = %e, "heartbeat failed"),
            }
        }
    }

    /// Key, prompt, engine, sealed result, signed completion. Returns the completion status.
    async fn work(
        &self,
        lease: &Lease,
        submitting: &std::sync::atomic::AtomicBool,
    ) -> Result<String> {
        if lease.prompt_scope != Scope::Task.as_byte() {
            return Err(Error::UnsupportedPromptScope(lease.prompt_scope));
        }
        if !self.models.contains(&lease.model) {
            return Err(Error::Unservable(format!(
                "model {:?} is not served here",
                lease.model
            )));
        }
        let t0 = std::time::Instant::now();
        // The sealed prompt is fetched while the key is requested: one round trip fewer before
        // the engine starts. A refused key is the error reported, whatever the fetch did.
        let key = async {
            let k = self.task_key(lease).await;
            (k, std::time::Instant::now())
        };
        let ((k_task, t1), blob) = tokio::join!(key, self.fetch_prompt(lease));
        let k_task = k_task?;
        let prompt = self.open_prompt(lease, &k_task, blob?)?;
        let t2 = std::time::Instant::now();
        let (produced, receipt) = self.generate_and_upload(lease, &k_task, prompt).await?;
        drop(k_task);
        let t3 = std::time::Instant::now();
        submitting.store(true, std::sync::atomic::Ordering::SeqCst);
        let status = self
            .complete(
                lease,
                &receipt,
                produced.generation.usage,
                produced.generation.finish_reason,
            )
            .await?;
        let t4 = std::time::Instant::now();
        let us = |a: std::time::Instant, b: std::time::Instant| (b - a).as_micros() as u64;
        let took = StepTimes {
            tasks: 1,
            key_us: us(t0, t1),
            prompt_us: us(t1, t2),
            generate_us: us(t2, t3),
            submit_us: us(t3, t4),
        };
        info!(
            key_us = took.key_us,
            prompt_us = took.prompt_us,
            generate_us = took.generate_us,
            submit_us = took.submit_us,
            "task timings"
        );
        let mut total = self.steps.lock().unwrap_or_else(|p| p.into_inner());
        total.tasks += 1;
        total.key_us += took.key_us;
        total.prompt_us += took.prompt_us;
        total.generate_us += took.generate_us;
        total.submit_us += took.submit_us;
        Ok(status)
    }

    async fn task_key(&self, lease: &Lease) -> Result<SecretKey> {
        let signer: &DynSigner = &*self.signer;
        let (client, domain, me) = (&self.client, self.domain(), self.identity.public());
        let lease_id = lease.lease_id;
        // Signed inside the retry: each attempt carries a fresh nonce.
        let wrapped = self
            .call(move || async move {
                let req = sign_key_request(signer, domain, lease, &me).await?;
                client.key(lease_id, &req).await
            })
            .await?;
        if wrapped.scope != Scope::Task.as_byte() || wrapped.key_version != lease.key_version {
            return Err(Error::Protocol {
                endpoint: veil_api::routes::MINER_KEY,
                detail: format!(
                    "got a scope {} key of version {}, asked for scope 2 version {}",
                    wrapped.scope, wrapped.key_version, lease.key_version
                ),
            });
        }
        let bytes = hex::decode(&wrapped.wrapped).map_err(|_| Error::Protocol {
            endpoint: veil_api::routes::MINER_KEY,
            detail: "wrapped key is not hex".into(),
        })?;
        let key = veil_keys::unwrap_key(&self.identity, &bytes, &task_key_id(lease))?;
        debug!("task key unwrapped");
        Ok(key)
    }

    /// The sealed prompt, checked against the lease's hash (nothing is opened yet).
    async fn fetch_prompt(&self, lease: &Lease) -> Result<Bytes> {
        let client = &self.client;
        let lease_id = lease.lease_id;
        let blob = self.call(move || client.prompt(lease_id)).await?;
        let hash: [u8; 32] = Sha256::digest(&blob).into();
        if hash != lease.prompt_hash.0 {
            return Err(Error::PromptTampered("hash mismatch"));
        }
        Ok(blob)
    }

    fn open_prompt(&self, lease: &Lease, k_task: &SecretKey, blob: Bytes) -> Result<PromptPayload> {
        let opened = veil_keys::open(k_task, &blob).map_err(|e| Error::PromptTampered(e.code()))?;
        if opened.header.key != task_key_id(lease) || opened.header.purpose != Purpose::Prompt {
            return Err(Error::PromptTampered("header does not match the lease"));
        }
        // serde_json's error could quote the plaintext: keep none of it.
        let payload: PromptPayload =
            serde_json::from_slice(&opened.plaintext).map_err(|_| Error::PromptInvalid)?;
        info!(
            prompt_bytes = blob.len(),
            messages = payload.messages.len(),
            "prompt opened"
        );
        Ok(payload)
    }

    async fn generate_and_upload(
        &self,
        lease: &Lease,
        k_task: &SecretKey,
        prompt: PromptPayload,
    ) -> Result<(Produced, BlobReceipt)> {
        let params = BlobParams::new(task_key_id(lease), Purpose::Result);
        let request = GenerateRequest {
            task_id: lease.task_id,
            model: lease.model.clone(),
            prompt,
            params: lease.params.clone(),
        };
        let (tx, rx) = mpsc::channel::<Bytes>(BODY_QUEUE);
        let body = reqwest::Body::wrap_stream(futures::stream::unfold(rx, |mut rx| async move {
            rx.recv()
                .await
                .map(|bytes| (Ok::<_, std::io::Error>(bytes), rx))
        }));
        let producing = async move {
            let r = produce(
                &*self.engine,
                request,
                k_task,
                &params,
                lease.params.stream,
                &tx,
            )
            .await;
            // Dropping the sender ends the body; on an error the upload is dropped before that.
            drop(tx);
            r
        };
        // Not retried: the body is a one-off stream. A failure releases the task.
        let uploading = self.client.put_result(lease.lease_id, body);
        let (produced, receipt) = tokio::try_join!(producing, uploading)?;
        if receipt.sha256.0 != produced.sha256 || receipt.size != produced.size {
            return Err(Error::ReceiptMismatch(format!(
                "sent {} bytes hashing to {}, router stored {} bytes hashing to {}",
                produced.size,
                hex::encode(produced.sha256),
                receipt.size,
                receipt.sha256
            )));
        }
        receipt.urn.parse::<Urn>().map_err(|e| Error::Protocol {
            endpoint: veil_api::routes::MINER_RESULT,
            detail: format!("receipt URN: {e}"),
        })?;
        info!(
            result_bytes = produced.size,
            result_hash = %receipt.sha256,
            frames = produced.frames,
            completion_tokens = produced.generation.usage.completion_tokens,
            "result uploaded"
        );
        Ok((produced, receipt))
    }

    async fn complete(
        &self,
        lease: &Lease,
        receipt: &BlobReceipt,
        usage: Usage,
        finish_reason: String,
    ) -> Result<String> {
        let signer: &DynSigner = &*self.signer;
        let result = sign_task_result(signer, self.domain(), lease, receipt).await?;
        let body = CompleteRequest {
            result,
            usage,
            finish_reason,
        };
        let (client, body, lease_id) = (&self.client, &body, lease.lease_id);
        let resp = self.call(move || client.complete(lease_id, body)).await?;
        if resp.result_hash != receipt.sha256 {
            warn!(standing = %resp.result_hash, ours = %receipt.sha256, "another result stands");
        }
        Ok(resp.status)
    }
}
