//! The reader's in-memory copy of the contract's state, how events change it, and its on-disk
//! checkpoint form.

use std::collections::{BTreeMap, BTreeSet};

use alloy::primitives::{Address, B256, FixedBytes};
use serde::{Deserialize, Serialize};

use crate::bindings::VeilAcl::VeilAclEvents;

/// Anything that names a session: the 16 bytes of its id (protocol section 1).
pub trait SessionKey {
    /// The id's 16 bytes.
    fn session_bytes(&self) -> [u8; 16];
}

impl SessionKey for [u8; 16] {
    fn session_bytes(&self) -> [u8; 16] {
        *self
    }
}

impl SessionKey for uuid::Uuid {
    fn session_bytes(&self) -> [u8; 16] {
        self.into_bytes()
    }
}

impl SessionKey for FixedBytes<16> {
    fn session_bytes(&self) -> [u8; 16] {
        self.0
    }
}

impl<T: SessionKey + ?Sized> SessionKey for &T {
    fn session_bytes(&self) -> [u8; 16] {
        (**self).session_bytes()
    }
}

/// A miner as registered on chain.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MinerInfo {
    /// The X25519 public key that keys for this miner are wrapped to.
    pub x25519: [u8; 32],
    /// False once an admin deactivated it: it is then allowed for no session.
    pub active: bool,
    /// Where the operator describes the miner.
    pub metadata_uri: String,
}

/// A session as registered on chain.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SessionInfo {
    /// The current owner (kept after closing, for the record).
    pub owner: Address,
    /// A closed session allows no miner.
    pub closed: bool,
    /// The miners on its allowlist, active or not (see [`crate::AclView::is_allowed`] for the
    /// decision, which also needs the miner to be active).
    pub allowed: BTreeSet<Address>,
}

/// Where the reader's view was taken: a block and its hash.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Checkpoint {
    /// Block number the view is current at.
    pub block_number: u64,
    /// That block's hash, checked against the chain to detect reorganisations.
    pub block_hash: B256,
}

/// The contract's state as of one block.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(crate) struct AclState {
    pub(crate) admins: BTreeSet<Address>,
    pub(crate) miners: BTreeMap<Address, MinerInfo>,
    pub(crate) sessions: BTreeMap<[u8; 16], SessionInfo>,
}

impl AclState {
    /// The contract's `isAllowed`, plus "not registered" as `None`.
    pub(crate) fn is_allowed(&self, session: [u8; 16], miner: Address) -> Option<bool> {
        let s = self.sessions.get(&session)?;
        Some(
            !s.closed
                && s.allowed.contains(&miner)
                && self.miners.get(&miner).is_some_and(|m| m.active),
        )
    }

    /// Applies one event, exactly as the contract changed its storage when emitting it.
    pub(crate) fn apply(&mut self, event: &VeilAclEvents) {
        use VeilAclEvents as E;
        match event {
            E::AdminAdded(e) => {
                self.admins.insert(e.admin);
            }
            E::AdminRemoved(e) => {
                self.admins.remove(&e.admin);
            }
            E::MinerRegistered(e) => {
                self.miners.insert(
                    e.miner,
                    MinerInfo {
                        x25519: e.x25519.0,
                        active: true,
                        metadata_uri: e.metadataUri.clone(),
                    },
                );
            }
            E::MinerDeactivated(e) => {
                if let Some(m) = self.miners.get_mut(&e.miner) {
                    m.active = false;
                }
            }
            E::MinerKeyRotated(e) => {
                if let Some(m) = self.miners.get_mut(&e.miner) {
                    m.x25519 = e.newX25519.0;
                }
            }
            E::SessionRegistered(e) => {
                self.sessions.insert(
                    e.sessionId.0,
                    SessionInfo {
                        owner: e.owner,
                        closed: false,
                        allowed: BTreeSet::new(),
                    },
                );
            }
            E::SessionTransferred(e) => {
                if let Some(s) = self.sessions.get_mut(&e.sessionId.0) {
                    s.owner = e.to;
                }
            }
            E::SessionClosed(e) => {
                if let Some(s) = self.sessions.get_mut(&e.sessionId.0) {
                    s.closed = true;
                }
            }
            E::MinerAllowed(e) => {
                if let Some(s) = self.sessions.get_mut(&e.sessionId.0) {
                    s.allowed.insert(e.miner);
                }
            }
            E::MinerRevoked(e) => {
                if let Some(s) = self.sessions.get_mut(&e.sessionId.0) {
                    s.allowed.remove(&e.miner);
                }
            }
        }
    }
}

/// The checkpoint file: where the view was taken and the view itself.
#[derive(Debug, Serialize, Deserialize)]
pub(crate) struct CheckpointFile {
    pub(crate) format: u32,
    pub(crate) chain_id: u64,
    pub(crate) contract: Address,
    pub(crate) checkpoint: Checkpoint,
    pub(crate) admins: Vec<Address>,
    pub(crate) miners: Vec<MinerRecord>,
    pub(crate) sessions: Vec<SessionRecord>,
}

#[derive(Debug, Serialize, Deserialize)]
pub(crate) struct MinerRecord {
    pub(crate) address: Address,
    pub(crate) x25519: B256,
    pub(crate) active: bool,
    pub(crate) metadata_uri: String,
}

#[derive(Debug, Serialize, Deserialize)]
pub(crate) struct SessionRecord {
    pub(crate) id: FixedBytes<16>,
    pub(crate) owner: Address,
    pub(crate) closed: bool,
    pub(crate) allowed: Vec<Address>,
}

impl CheckpointFile {
    pub(crate) const FORMAT: u32 = 1;

    pub(crate) fn new(
        chain_id: u64,
        contract: Address,
        checkpoint: Checkpoint,
        state: &AclState,
    ) -> Self {
        Self {
            format: Self::FORMAT,
            chain_id,
            contract,
            checkpoint,
            admins: state.admins.iter().copied().collect(),
            miners: state
                .miners
                .iter()
                .map(|(address, m)| MinerRecord {
                    address: *address,
                    x25519: B256::from(m.x25519),
                    active: m.active,
                    metadata_uri: m.metadata_uri.clone(),
                })
                .collect(),
            sessions: state
                .sessions
                .iter()
                .map(|(id, s)| SessionRecord {
                    id: FixedBytes(*id),
                    owner: s.owner,
                    closed: s.closed,
                    allowed: s.allowed.iter().copied().collect(),
                })
                .collect(),
        }
    }

    pub(crate) fn into_state(self) -> AclState {
        AclState {
            admins: self.admins.into_iter().collect(),
            miners: self
                .miners
                .into_iter()
                .map(|m| {
                    (
                        m.address,
                        MinerInfo {
                            x25519: m.x25519.0,
                            active: m.active,
                            metadata_uri: m.metadata_uri,
                        },
                    )
                })
                .collect(),
            sessions: self
                .sessions
                .into_iter()
                .map(|s| {
                    (
                        s.id.0,
                        SessionInfo {
                            owner: s.owner,
                            closed: s.closed,
                            allowed: s.allowed.into_iter().collect(),
                        },
                    )
                })
                .collect(),
        }
    }
}
