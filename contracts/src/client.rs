//! Providers, the deploy helper and [`AclContract`], a typed wrapper that sends one transaction
//! per operation, waits for its confirmations and decodes refusals.

use std::time::{Duration, Instant};

use alloy::contract::{CallBuilder, CallDecoder};
use alloy::eips::BlockId;
use alloy::network::{EthereumWallet, ReceiptResponse};
use alloy::primitives::{Address, B256, FixedBytes, U256};
use alloy::providers::{
    DynProvider, PendingTransactionBuilder, Provider, ProviderBuilder, WsConnect,
};
use alloy::signers::local::PrivateKeySigner;
use alloy::transports::http::reqwest::Url;

use crate::bindings::VeilAcl;
use crate::error::{Error, Result};
use crate::state::{AclState, MinerInfo, SessionInfo, SessionKey};

/// How often the chain head is polled while waiting for confirmations.
const CONFIRM_POLL: Duration = Duration::from_millis(200);

/// Page size used when reading lists from the contract.
pub(crate) const DEFAULT_PAGE: u64 = 200;

/// A read-only provider over HTTP(S), with no transaction fillers.
///
/// For `https://` URLs the process must have installed a rustls crypto provider (the workspace
/// uses `ring`) before the first request.
pub fn http_provider(url: Url) -> DynProvider {
    ProviderBuilder::new()
        .disable_recommended_fillers()
        .connect_http(url)
        .erased()
}

/// A read-only provider for `url`: HTTP(S) for `http://` and `https://`, a WebSocket connection
/// for `ws://` and `wss://` (the reader polls either way; a WebSocket only saves connection
/// set-up).
pub async fn connect(url: &str) -> Result<DynProvider> {
    let parsed: Url = url
        .parse()
        .map_err(|e| Error::Config(format!("RPC URL does not parse: {e}")))?;
    match parsed.scheme() {
        "http" | "https" => Ok(http_provider(parsed)),
        "ws" | "wss" => Ok(ProviderBuilder::new()
            .disable_recommended_fillers()
            .connect_ws(WsConnect::new(url))
            .await?
            .erased()),
        other => Err(Error::Config(format!(
            "RPC URL scheme `{other}` is not http, https, ws or wss"
        ))),
    }
}

/// A provider over HTTP(S) that signs with `signer`.
///
/// It uses *simple* nonce management (the nonce is fetched for every transaction) rather than
/// alloy's default cached nonce manager, which burns a nonce when a send fails at gas estimation
/// (a revert) and can leave the next transaction stuck. Gas is estimated and the chain id
/// fetched from the node.
pub fn wallet_provider(url: Url, signer: PrivateKeySigner) -> DynProvider {
    ProviderBuilder::new()
        .disable_recommended_fillers()
        .with_gas_estimation()
        .with_simple_nonce_management()
        .fetch_chain_id()
        .wallet(EthereumWallet::from(signer))
        .connect_http(url)
        .erased()
}

/// What a confirmed transaction did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TxOutcome {
    /// The transaction's hash.
    pub tx_hash: B256,
    /// The block it was included in.
    pub block_number: u64,
    /// Gas it used.
    pub gas_used: u64,
}

/// A deployed contract.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Deployment {
    /// Where the contract lives.
    pub address: Address,
    /// The deployment transaction.
    pub tx: TxOutcome,
}

/// Deploys the ACL contract from the committed artifact with `admins` as its first admins (the
/// sender alone when empty), and waits for `confirmations` blocks (at least one).
pub async fn deploy(
    provider: &DynProvider,
    admins: Vec<Address>,
    confirmations: u64,
    timeout: Duration,
) -> Result<Deployment> {
    let pending = VeilAcl::deploy_builder(provider.clone(), admins)
        .send()
        .await?;
    let (receipt, tx) = wait(provider, pending, confirmations, timeout).await?;
    if !receipt.status() {
        return Err(Error::Reverted {
            tx_hash: tx.tx_hash,
            reason: "the contract creation reverted".to_string(),
        });
    }
    let address = receipt.contract_address().ok_or_else(|| {
        Error::Rpc("the deployment receipt names no contract address".to_string())
    })?;
    Ok(Deployment { address, tx })
}

/// Waits until the transaction is included and `confirmations` blocks deep (the inclusion block
/// counts as the first), checking it is still in the chain at the end.
async fn wait(
    provider: &DynProvider,
    pending: PendingTransactionBuilder<alloy::network::Ethereum>,
    confirmations: u64,
    timeout: Duration,
) -> Result<(alloy::rpc::types::TransactionReceipt, TxOutcome)> {
    let tx_hash = *pending.tx_hash();
    let unconfirmed = |message: String| Error::Unconfirmed { tx_hash, message };
    let deadline = Instant::now() + timeout;
    let receipt = pending
        .with_timeout(Some(timeout))
        .get_receipt()
        .await
        .map_err(|e| unconfirmed(format!("no receipt: {e}")))?;
    let block_number = receipt
        .block_number
        .ok_or_else(|| unconfirmed("the receipt names no block".to_string()))?;
    let outcome = TxOutcome {
        tx_hash,
        block_number,
        gas_used: receipt.gas_used,
    };
    let confirmations = confirmations.max(1);
    loop {
        let head = provider.get_block_number().await?;
        if head + 1 >= block_number + confirmations {
            let again = provider.get_transaction_receipt(tx_hash).await?;
            return match again {
                Some(r) if r.block_hash == receipt.block_hash => Ok((receipt, outcome)),
                _ => Err(unconfirmed(
                    "the transaction fell out of the chain (reorganisation) while waiting for \
                     confirmations"
                        .to_string(),
                )),
            };
        }
        if Instant::now() >= deadline {
            return Err(unconfirmed(format!(
                "included in block {block_number} but not {confirmations} blocks deep within {}s",
                timeout.as_secs()
            )));
        }
        tokio::time::sleep(CONFIRM_POLL).await;
    }
}

/// The ACL contract at one address, through one provider: every operation as a method that sends
/// the transaction, waits for its confirmations and decodes a refusal into [`Error::Refused`];
/// and the views.
#[derive(Clone, Debug)]
pub struct AclContract {
    contract: VeilAcl::VeilAclInstance<DynProvider>,
    confirmations: u64,
    timeout: Duration,
}

fn sid(session: impl SessionKey) -> FixedBytes<16> {
    FixedBytes(session.session_bytes())
}

impl AclContract {
    /// The contract at `address`. Transactions wait for one confirmation and at most two minutes
    /// unless changed with [`Self::with_confirmations`] and [`Self::with_timeout`].
    pub fn new(address: Address, provider: DynProvider) -> Self {
        Self {
            contract: VeilAcl::new(address, provider),
            confirmations: 1,
            timeout: Duration::from_secs(120),
        }
    }

    /// Sets how many blocks deep a transaction must be before a method returns (at least one).
    pub fn with_confirmations(mut self, confirmations: u64) -> Self {
        self.confirmations = confirmations.max(1);
        self
    }

    /// Sets how long a method waits for its transaction's confirmations.
    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// The contract's address.
    pub fn address(&self) -> Address {
        *self.contract.address()
    }

    /// The generated alloy binding, for anything not wrapped here.
    pub fn instance(&self) -> &VeilAcl::VeilAclInstance<DynProvider> {
        &self.contract
    }

    /// Sends a call built on [`Self::instance`], waits for its confirmations and decodes a
    /// refusal (at gas estimation, or replayed when the transaction reverted on chain).
    pub async fn submit<D: CallDecoder>(
        &self,
        call: CallBuilder<&DynProvider, D>,
    ) -> Result<TxOutcome> {
        let pending = call.send().await?;
        let (receipt, outcome) = wait(
            self.contract.provider(),
            pending,
            self.confirmations,
            self.timeout,
        )
        .await?;
        if receipt.status() {
            return Ok(outcome);
        }
        // Mined but reverted (e.g. another transaction got in first): replay it as a call
        // against the state of its block to learn which custom error it hit.
        let replay = call
            .from(receipt.from)
            .block(BlockId::number(outcome.block_number))
            .call_raw()
            .await;
        let reason = match replay {
            Err(e) => Error::from(e).to_string(),
            Ok(_) => "reverted on chain; replaying it no longer fails".to_string(),
        };
        Err(Error::Reverted {
            tx_hash: outcome.tx_hash,
            reason,
        })
    }

    /// Makes `account` an admin (admins only).
    pub async fn add_admin(&self, account: Address) -> Result<TxOutcome> {
        self.submit(self.contract.addAdmin(account)).await
    }

    /// Removes `account` from the admins (admins only; never the last one).
    pub async fn remove_admin(&self, account: Address) -> Result<TxOutcome> {
        self.submit(self.contract.removeAdmin(account)).await
    }

    /// Registers (or re-registers a deactivated) miner (admins only).
    pub async fn register_miner(
        &self,
        miner: Address,
        x25519: [u8; 32],
        metadata_uri: &str,
    ) -> Result<TxOutcome> {
        self.submit(self.contract.registerMiner(
            miner,
            B256::from(x25519),
            metadata_uri.to_string(),
        ))
        .await
    }

    /// Deactivates a miner (admins only).
    pub async fn deactivate_miner(&self, miner: Address) -> Result<TxOutcome> {
        self.submit(self.contract.deactivateMiner(miner)).await
    }

    /// The sender, a registered active miner, replaces its own X25519 key.
    pub async fn rotate_miner_key(&self, x25519: [u8; 32]) -> Result<TxOutcome> {
        self.submit(self.contract.rotateMinerKey(B256::from(x25519)))
            .await
    }

    /// Registers a session with the sender as its owner.
    pub async fn register_session(&self, session: impl SessionKey) -> Result<TxOutcome> {
        self.submit(self.contract.registerSession(sid(session)))
            .await
    }

    /// The owner hands the session to `new_owner`.
    pub async fn transfer_session(
        &self,
        session: impl SessionKey,
        new_owner: Address,
    ) -> Result<TxOutcome> {
        self.submit(self.contract.transferSession(sid(session), new_owner))
            .await
    }

    /// The owner closes the session for good.
    pub async fn close_session(&self, session: impl SessionKey) -> Result<TxOutcome> {
        self.submit(self.contract.closeSession(sid(session))).await
    }

    /// The owner or an admin allows one miner for the session.
    pub async fn allow_miner(&self, session: impl SessionKey, miner: Address) -> Result<TxOutcome> {
        self.submit(self.contract.allowMiner(sid(session), miner))
            .await
    }

    /// The owner or an admin allows several miners at once (all or nothing).
    pub async fn allow_miners(
        &self,
        session: impl SessionKey,
        miners: Vec<Address>,
    ) -> Result<TxOutcome> {
        self.submit(self.contract.allowMiners(sid(session), miners))
            .await
    }

    /// The owner or an admin revokes one miner.
    pub async fn revoke_miner(
        &self,
        session: impl SessionKey,
        miner: Address,
    ) -> Result<TxOutcome> {
        self.submit(self.contract.revokeMiner(sid(session), miner))
            .await
    }

    /// The owner or an admin revokes several miners at once (all or nothing).
    pub async fn revoke_miners(
        &self,
        session: impl SessionKey,
        miners: Vec<Address>,
    ) -> Result<TxOutcome> {
        self.submit(self.contract.revokeMiners(sid(session), miners))
            .await
    }

    /// The contract's own `isAllowed` (one RPC call; the router uses [`crate::AclView`]).
    pub async fn is_allowed(&self, session: impl SessionKey, miner: Address) -> Result<bool> {
        Ok(self.contract.isAllowed(sid(session), miner).call().await?)
    }

    /// Whether `account` is an admin.
    pub async fn is_admin(&self, account: Address) -> Result<bool> {
        Ok(self.contract.isAdmin(account).call().await?)
    }

    /// All admins.
    pub async fn admins(&self) -> Result<Vec<Address>> {
        Ok(self.contract.admins().call().await?)
    }

    /// The miner's record, or `None` when it was never registered.
    pub async fn miner(&self, miner: Address) -> Result<Option<MinerInfo>> {
        read_miner(&self.contract, miner, BlockId::latest()).await
    }

    /// The session's record with its whole allowlist, or `None` when it is not registered.
    pub async fn session(&self, session: impl SessionKey) -> Result<Option<SessionInfo>> {
        let id = sid(session);
        let info = self.contract.sessionInfo(id).call().await?;
        if info.owner == Address::ZERO {
            return Ok(None);
        }
        let allowed = read_allowed(
            &self.contract,
            id,
            BlockId::latest(),
            DEFAULT_PAGE,
            info.allowedCount,
        )
        .await?;
        Ok(Some(SessionInfo {
            owner: info.owner,
            closed: info.closed,
            allowed: allowed.into_iter().collect(),
        }))
    }

    /// One page of the session's allowlist (the contract's paginated view).
    pub async fn allowed_miners_page(
        &self,
        session: impl SessionKey,
        offset: u64,
        limit: u64,
    ) -> Result<Vec<Address>> {
        Ok(self
            .contract
            .allowedMiners(sid(session), U256::from(offset), U256::from(limit))
            .call()
            .await?)
    }

    /// The session's owner, or `None` when it is not registered.
    pub async fn session_owner(&self, session: impl SessionKey) -> Result<Option<Address>> {
        let owner = self.contract.sessionOwner(sid(session)).call().await?;
        Ok((owner != Address::ZERO).then_some(owner))
    }
}

async fn read_miner(
    contract: &VeilAcl::VeilAclInstance<DynProvider>,
    miner: Address,
    block: BlockId,
) -> Result<Option<MinerInfo>> {
    let m = contract.minerInfo(miner).block(block).call().await?;
    Ok(m.registered.then_some(MinerInfo {
        x25519: m.x25519.0,
        active: m.active,
        metadata_uri: m.metadataUri,
    }))
}

fn to_u64(value: U256, what: &str) -> Result<u64> {
    u64::try_from(value).map_err(|_| Error::Rpc(format!("the contract reports {what} = {value}")))
}

async fn read_allowed(
    contract: &VeilAcl::VeilAclInstance<DynProvider>,
    session: FixedBytes<16>,
    block: BlockId,
    page: u64,
    count: U256,
) -> Result<Vec<Address>> {
    let count = to_u64(count, "an allowlist length")?;
    let mut out = Vec::with_capacity(count.min(10_000) as usize);
    let mut offset = 0;
    while offset < count {
        let chunk = contract
            .allowedMiners(session, U256::from(offset), U256::from(page))
            .block(block)
            .call()
            .await?;
        if chunk.is_empty() {
            return Err(Error::ReorgDuringRead);
        }
        offset += chunk.len() as u64;
        out.extend(chunk);
    }
    Ok(out)
}

/// Reads the contract's whole state with view calls pinned to one block.
pub(crate) async fn read_state(
    contract: &VeilAcl::VeilAclInstance<DynProvider>,
    block: BlockId,
    page: u64,
) -> Result<AclState> {
    let mut state = AclState {
        admins: contract
            .admins()
            .block(block)
            .call()
            .await?
            .into_iter()
            .collect(),
        ..AclState::default()
    };

    let miners = to_u64(
        contract.minerCount().block(block).call().await?,
        "a miner count",
    )?;
    let mut offset = 0;
    while offset < miners {
        let chunk = contract
            .minersPage(U256::from(offset), U256::from(page))
            .block(block)
            .call()
            .await?;
        if chunk.is_empty() {
            return Err(Error::ReorgDuringRead);
        }
        offset += chunk.len() as u64;
        for miner in chunk {
            if let Some(info) = read_miner(contract, miner, block).await? {
                state.miners.insert(miner, info);
            }
        }
    }

    let sessions = to_u64(
        contract.sessionCount().block(block).call().await?,
        "a session count",
    )?;
    let mut offset = 0;
    while offset < sessions {
        let chunk = contract
            .sessionsPage(U256::from(offset), U256::from(page))
            .block(block)
            .call()
            .await?;
        if chunk.is_empty() {
            return Err(Error::ReorgDuringRead);
        }
        offset += chunk.len() as u64;
        for s in chunk {
            let allowed = if s.allowedCount.is_zero() {
                Vec::new()
            } else {
                read_allowed(contract, s.id, block, page, s.allowedCount).await?
            };
            state.sessions.insert(
                s.id.0,
                SessionInfo {
                    owner: s.owner,
                    closed: s.closed,
                    allowed: allowed.into_iter().collect(),
                },
            );
        }
    }
    Ok(state)
}
