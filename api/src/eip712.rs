//! The wallet-signed messages of protocol §6.
//!
//! Each message has a JSON form (ids as UUID text, hashes and keys as lowercase hex, addresses
//! checksummed) and converts to the Solidity struct of §6, whose EIP-712 digest under the
//! deployment's [`Domain`] is what a wallet signs (`eth_signTypedData_v4`). A [`Signed`] message
//! travels as `{"message": {...}, "signature": "0x" + 130 hex digits}`.
//!
//! [`Signed::verify`] checks the time bounds of §6 and recovers the signer; replay protection
//! (a `(signer, nonce)` pair accepted once) needs shared state and is the server's job.

use alloy_primitives::{Address, B256, FixedBytes, Signature, U256};
use alloy_sol_types::{Eip712Domain, SolStruct};
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use uuid::Uuid;

use crate::wire::{Hex32, Nonce};

/// How far ahead of now a message may expire (protocol §6).
pub const MAX_EXPIRY_AHEAD_SECS: u64 = 300;

/// Solidity types of protocol §6, with their EIP-712 type strings and hashes.
pub mod sol {
    alloy_sol_types::sol! {
        /// `OpenSession` of protocol §6.
        #[derive(Debug, PartialEq)]
        struct OpenSession { bytes16 sessionId; uint8 kind; uint64 expiresAt; bytes16 nonce; }
        /// `KeyRequest` of protocol §6.
        #[derive(Debug, PartialEq)]
        struct KeyRequest { bytes16 sessionId; bytes16 taskId; uint8 scope; uint32 keyVersion; bytes32 recipient; uint64 expiresAt; bytes16 nonce; }
        /// `SubmitTask` of protocol §6.
        #[derive(Debug, PartialEq)]
        struct SubmitTask { bytes16 sessionId; bytes16 taskId; bytes32 promptHash; string promptUrn; string model; uint64 expiresAt; bytes16 nonce; }
        /// `TaskResult` of protocol §6.
        #[derive(Debug, PartialEq)]
        struct TaskResult { bytes16 sessionId; bytes16 taskId; bytes32 promptHash; bytes32 resultHash; string resultUrn; }
        /// `MinerLogin` of protocol §6.
        #[derive(Debug, PartialEq)]
        struct MinerLogin { bytes32 recipient; uint64 expiresAt; bytes16 nonce; }
    }
}

/// The EIP-712 domain of a deployment: `{name: "Veil", version: "1", chainId, verifyingContract}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Domain {
    /// The chain of the deployment's ACL contract (31337 for a local dev chain).
    pub chain_id: u64,
    /// The ACL contract, or the zero address where none is configured.
    #[serde(with = "crate::wire::checksummed")]
    pub verifying_contract: Address,
}

impl Domain {
    /// A domain for a deployment without a contract: the given chain id and the zero address.
    pub fn without_contract(chain_id: u64) -> Self {
        Self {
            chain_id,
            verifying_contract: Address::ZERO,
        }
    }

    /// The alloy domain value.
    pub fn to_eip712(&self) -> Eip712Domain {
        Eip712Domain::new(
            Some("Veil".into()),
            Some("1".into()),
            Some(U256::from(self.chain_id)),
            Some(self.verifying_contract),
            None,
        )
    }
}

/// A message of protocol §6.
pub trait Message: Serialize + for<'de> Deserialize<'de> + Clone + std::fmt::Debug {
    /// Its Solidity struct.
    type Sol: SolStruct;
    /// The EIP-712 primary type name, e.g. `KeyRequest`.
    const NAME: &'static str;
    /// Converts to the Solidity struct that is hashed and signed.
    fn to_sol(&self) -> Self::Sol;
    /// `expiresAt`, for the messages that have one.
    fn expires_at(&self) -> Option<u64>;
    /// `nonce`, for the messages that have one.
    fn nonce(&self) -> Option<Nonce>;

    /// The EIP-712 digest a wallet signs for this message under `domain`.
    fn signing_hash(&self, domain: &Domain) -> B256 {
        self.to_sol().eip712_signing_hash(&domain.to_eip712())
    }
}

fn b16(u: &Uuid) -> FixedBytes<16> {
    FixedBytes(*u.as_bytes())
}

/// Session kind byte of `OpenSession.kind`.
pub const KIND_DEDICATED: u8 = 0x01;
/// Session kind byte of `OpenSession.kind`.
pub const KIND_POOLED: u8 = 0x02;

/// `OpenSession`: the owner opens a session.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct OpenSession {
    /// The new session's id.
    pub session_id: Uuid,
    /// 1 dedicated, 2 pooled.
    pub kind: u8,
    /// Unix seconds.
    pub expires_at: u64,
    /// Random, accepted once per signer.
    pub nonce: Nonce,
}

impl Message for OpenSession {
    type Sol = sol::OpenSession;
    const NAME: &'static str = "OpenSession";
    fn to_sol(&self) -> sol::OpenSession {
        sol::OpenSession {
            sessionId: b16(&self.session_id),
            kind: self.kind,
            expiresAt: self.expires_at,
            nonce: FixedBytes(self.nonce.0),
        }
    }
    fn expires_at(&self) -> Option<u64> {
        Some(self.expires_at)
    }
    fn nonce(&self) -> Option<Nonce> {
        Some(self.nonce)
    }
}

/// `KeyRequest`: a session key (scope 1, owner) or a task key (scope 2, owner or assigned miner),
/// wrapped to `recipient`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct KeyRequest {
    /// The session.
    pub session_id: Uuid,
    /// The task; the nil UUID for scope 1.
    pub task_id: Uuid,
    /// 1 session key, 2 task key.
    pub scope: u8,
    /// The key version asked for.
    pub key_version: u32,
    /// The X25519 public key the key is wrapped to.
    pub recipient: Hex32,
    /// Unix seconds.
    pub expires_at: u64,
    /// Random, accepted once per signer.
    pub nonce: Nonce,
}

impl Message for KeyRequest {
    type Sol = sol::KeyRequest;
    const NAME: &'static str = "KeyRequest";
    fn to_sol(&self) -> sol::KeyRequest {
        sol::KeyRequest {
            sessionId: b16(&self.session_id),
            taskId: b16(&self.task_id),
            scope: self.scope,
            keyVersion: self.key_version,
            recipient: FixedBytes(self.recipient.0),
            expiresAt: self.expires_at,
            nonce: FixedBytes(self.nonce.0),
        }
    }
    fn expires_at(&self) -> Option<u64> {
        Some(self.expires_at)
    }
    fn nonce(&self) -> Option<Nonce> {
        Some(self.nonce)
    }
}

/// `SubmitTask`: the owner submits a client-sealed prompt by reference.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct SubmitTask {
    /// The session.
    pub session_id: Uuid,
    /// The task (chosen by the client).
    pub task_id: Uuid,
    /// SHA-256 of the sealed prompt blob.
    pub prompt_hash: Hex32,
    /// Where the sealed prompt is.
    pub prompt_urn: String,
    /// Model name.
    pub model: String,
    /// Unix seconds.
    pub expires_at: u64,
    /// Random, accepted once per signer.
    pub nonce: Nonce,
}

impl Message for SubmitTask {
    type Sol = sol::SubmitTask;
    const NAME: &'static str = "SubmitTask";
    fn to_sol(&self) -> sol::SubmitTask {
        sol::SubmitTask {
            sessionId: b16(&self.session_id),
            taskId: b16(&self.task_id),
            promptHash: FixedBytes(self.prompt_hash.0),
            promptUrn: self.prompt_urn.clone(),
            model: self.model.clone(),
            expiresAt: self.expires_at,
            nonce: FixedBytes(self.nonce.0),
        }
    }
    fn expires_at(&self) -> Option<u64> {
        Some(self.expires_at)
    }
    fn nonce(&self) -> Option<Nonce> {
        Some(self.nonce)
    }
}

/// `TaskResult`: the miner that ran a task vouches for its sealed result.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct TaskResult {
    /// The session.
    pub session_id: Uuid,
    /// The task.
    pub task_id: Uuid,
    /// SHA-256 of the sealed prompt blob the miner opened.
    pub prompt_hash: Hex32,
    /// SHA-256 of the sealed result blob.
    pub result_hash: Hex32,
    /// Where the sealed result is.
    pub result_urn: String,
}

impl Message for TaskResult {
    type Sol = sol::TaskResult;
    const NAME: &'static str = "TaskResult";
    fn to_sol(&self) -> sol::TaskResult {
        sol::TaskResult {
            sessionId: b16(&self.session_id),
            taskId: b16(&self.task_id),
            promptHash: FixedBytes(self.prompt_hash.0),
            resultHash: FixedBytes(self.result_hash.0),
            resultUrn: self.result_urn.clone(),
        }
    }
    fn expires_at(&self) -> Option<u64> {
        None
    }
    fn nonce(&self) -> Option<Nonce> {
        None
    }
}

/// `MinerLogin`: a miner's wallet starts a miner session for an X25519 key.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct MinerLogin {
    /// The miner's X25519 public key for this session.
    pub recipient: Hex32,
    /// Unix seconds.
    pub expires_at: u64,
    /// Random, accepted once per signer.
    pub nonce: Nonce,
}

impl Message for MinerLogin {
    type Sol = sol::MinerLogin;
    const NAME: &'static str = "MinerLogin";
    fn to_sol(&self) -> sol::MinerLogin {
        sol::MinerLogin {
            recipient: FixedBytes(self.recipient.0),
            expiresAt: self.expires_at,
            nonce: FixedBytes(self.nonce.0),
        }
    }
    fn expires_at(&self) -> Option<u64> {
        Some(self.expires_at)
    }
    fn nonce(&self) -> Option<Nonce> {
        Some(self.nonce)
    }
}

/// A 65-byte `r || s || v` signature, `0x`-hex in JSON.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct Sig65(pub [u8; 65]);

impl std::fmt::Debug for Sig65 {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Sig65(0x{})", hex::encode(self.0))
    }
}

impl Serialize for Sig65 {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&format!("0x{}", hex::encode(self.0)))
    }
}

impl<'de> Deserialize<'de> for Sig65 {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        let digits = s
            .strip_prefix("0x")
            .ok_or_else(|| serde::de::Error::custom("expected 0x followed by 130 hex digits"))?;
        let mut out = [0u8; 65];
        hex::decode_to_slice(digits, &mut out)
            .map_err(|_| serde::de::Error::custom("expected 0x followed by 130 hex digits"))?;
        Ok(Self(out))
    }
}

impl utoipa::PartialSchema for Sig65 {
    fn schema() -> utoipa::openapi::RefOr<utoipa::openapi::schema::Schema> {
        utoipa::openapi::ObjectBuilder::new()
            .schema_type(utoipa::openapi::schema::Type::String)
            .pattern(Some("^0x[0-9a-fA-F]{130}$"))
            .description(Some(
                "65-byte r || s || v secp256k1 signature over the EIP-712 digest",
            ))
            .into()
    }
}
impl utoipa::ToSchema for Sig65 {}

/// A message and its wallet signature, as it travels in JSON.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Signed<M> {
    /// The signed message.
    pub message: M,
    /// Signature over the message's EIP-712 digest.
    pub signature: Sig65,
}

/// Why a signed message was refused. [`VerifyError::code`] is the stable machine code.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum VerifyError {
    /// `expiresAt` is in the past.
    #[error("message expired at {expires_at} (now {now})")]
    Expired {
        /// The message's `expiresAt`.
        expires_at: u64,
        /// The verifier's clock.
        now: u64,
    },
    /// `expiresAt` is more than 300 seconds ahead.
    #[error(
        "message expires at {expires_at}, more than {MAX_EXPIRY_AHEAD_SECS} s after now ({now})"
    )]
    TooFarAhead {
        /// The message's `expiresAt`.
        expires_at: u64,
        /// The verifier's clock.
        now: u64,
    },
    /// The signature is malformed (bad `v`, high `s`) or does not recover a signer.
    #[error("signature does not verify: {0}")]
    BadSignature(&'static str),
}

impl VerifyError {
    /// Stable machine code.
    pub fn code(&self) -> &'static str {
        match self {
            Self::Expired { .. } => "signature_expired",
            Self::TooFarAhead { .. } => "signature_expiry_too_far",
            Self::BadSignature(_) => "bad_signature",
        }
    }
}

impl<M: Message> Signed<M> {
    /// Signs `message` with any alloy signer (local key, keystore, mnemonic, hardware).
    pub async fn sign<S>(message: M, domain: &Domain, signer: &S) -> alloy_signer::Result<Self>
    where
        S: alloy_signer::Signer + ?Sized,
    {
        let sig = signer.sign_hash(&message.signing_hash(domain)).await?;
        Ok(Self {
            message,
            signature: Sig65(sig.as_bytes()),
        })
    }

    /// Signs synchronously with a signer that supports it (a local private key).
    pub fn sign_sync<S>(message: M, domain: &Domain, signer: &S) -> alloy_signer::Result<Self>
    where
        S: alloy_signer::SignerSync + ?Sized,
    {
        let sig = signer.sign_hash_sync(&message.signing_hash(domain))?;
        Ok(Self {
            message,
            signature: Sig65(sig.as_bytes()),
        })
    }

    /// Recovers the signer of this message under `domain`, without time checks.
    pub fn recover(&self, domain: &Domain) -> Result<Address, VerifyError> {
        let sig = Signature::from_raw_array(&self.signature.0)
            .map_err(|_| VerifyError::BadSignature("v must be 0, 1, 27 or 28"))?;
        if sig.normalize_s().is_some() {
            return Err(VerifyError::BadSignature(
                "s is not in the lower half of the curve order",
            ));
        }
        if sig.r().is_zero() || sig.s().is_zero() {
            return Err(VerifyError::BadSignature("r and s must be non-zero"));
        }
        sig.recover_address_from_prehash(&self.message.signing_hash(domain))
            .map_err(|_| VerifyError::BadSignature("no signer recovers from it"))
    }

    /// Checks the §6 time bounds against `now` (Unix seconds) and recovers the signer.
    pub fn verify(&self, domain: &Domain, now: u64) -> Result<Address, VerifyError> {
        if let Some(expires_at) = self.message.expires_at() {
            check_expiry(expires_at, now)?;
        }
        self.recover(domain)
    }
}

/// The §6 time bounds: refused once expired, or when expiring more than 300 s ahead.
pub fn check_expiry(expires_at: u64, now: u64) -> Result<(), VerifyError> {
    if expires_at <= now {
        return Err(VerifyError::Expired { expires_at, now });
    }
    if expires_at > now.saturating_add(MAX_EXPIRY_AHEAD_SECS) {
        return Err(VerifyError::TooFarAhead { expires_at, now });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use alloy_signer_local::PrivateKeySigner;

    fn domain() -> Domain {
        Domain::without_contract(31337)
    }

    fn login(exp: u64) -> MinerLogin {
        MinerLogin {
            recipient: Hex32([7; 32]),
            expires_at: exp,
            nonce: Nonce([1; 16]),
        }
    }

    #[test]
    fn type_strings_match_the_spec() {
        assert_eq!(
            sol::KeyRequest::eip712_encode_type(),
            "KeyRequest(bytes16 sessionId,bytes16 taskId,uint8 scope,uint32 keyVersion,bytes32 recipient,uint64 expiresAt,bytes16 nonce)"
        );
        assert_eq!(
            sol::SubmitTask::eip712_encode_type(),
            "SubmitTask(bytes16 sessionId,bytes16 taskId,bytes32 promptHash,string promptUrn,string model,uint64 expiresAt,bytes16 nonce)"
        );
        assert_eq!(
            sol::TaskResult::eip712_encode_type(),
            "TaskResult(bytes16 sessionId,bytes16 taskId,bytes32 promptHash,bytes32 resultHash,string resultUrn)"
        );
        assert_eq!(
            sol::OpenSession::eip712_encode_type(),
            "OpenSession(bytes16 sessionId,uint8 kind,uint64 expiresAt,bytes16 nonce)"
        );
        assert_eq!(
            sol::MinerLogin::eip712_encode_type(),
            "MinerLogin(bytes32 recipient,uint64 expiresAt,bytes16 nonce)"
        );
    }

    #[test]
    fn sign_verify_and_refusals() {
        let wallet = PrivateKeySigner::random();
        let now = 1_000_000;
        let signed = Signed::sign_sync(login(now + 60), &domain(), &wallet).unwrap();
        assert_eq!(signed.verify(&domain(), now).unwrap(), wallet.address());

        // JSON round trip keeps the signature valid.
        let json = serde_json::to_string(&signed).unwrap();
        let back: Signed<MinerLogin> = serde_json::from_str(&json).unwrap();
        assert_eq!(back.verify(&domain(), now).unwrap(), wallet.address());

        // Another domain (chain id) recovers someone else.
        let other = Domain::without_contract(1);
        assert_ne!(signed.recover(&other).unwrap(), wallet.address());

        // A changed field recovers someone else.
        let mut tampered = signed.clone();
        tampered.message.nonce = Nonce([2; 16]);
        assert_ne!(tampered.verify(&domain(), now).unwrap(), wallet.address());

        assert_eq!(
            signed.verify(&domain(), now + 60).unwrap_err().code(),
            "signature_expired"
        );
        let far = Signed::sign_sync(login(now + 301), &domain(), &wallet).unwrap();
        assert_eq!(
            far.verify(&domain(), now).unwrap_err().code(),
            "signature_expiry_too_far"
        );
        let edge = Signed::sign_sync(login(now + 300), &domain(), &wallet).unwrap();
        assert!(edge.verify(&domain(), now).is_ok());

        let mut bad_v = signed.clone();
        bad_v.signature.0[64] = 5;
        assert_eq!(
            bad_v.verify(&domain(), now).unwrap_err().code(),
            "bad_signature"
        );

        // The malleable twin (n - s, flipped parity) is refused.
        let sig = Signature::from_raw_array(&signed.signature.0).unwrap();
        let n = U256::from_str_radix(
            "fffffffffffffffffffffffffffffffebaaedce6af48a03bbfd25e8cd0364141",
            16,
        )
        .unwrap();
        let twin = Signature::new(sig.r(), n - sig.s(), !sig.v());
        let mut high_s = signed.clone();
        high_s.signature = Sig65(twin.as_bytes());
        assert_eq!(
            high_s.verify(&domain(), now).unwrap_err().code(),
            "bad_signature"
        );
    }

    #[test]
    fn json_shape_is_camel_case_and_strict() {
        let m = login(5);
        let v = serde_json::to_value(&m).unwrap();
        assert_eq!(
            v,
            serde_json::json!({"recipient": "07".repeat(32), "expiresAt": 5, "nonce": "01".repeat(16)})
        );
        let err = serde_json::from_value::<MinerLogin>(
            serde_json::json!({"recipient": "07".repeat(32), "expiresAt": 5, "nonce": "01".repeat(16), "extra": 1}),
        )
        .unwrap_err();
        assert!(err.to_string().contains("extra"), "{err}");
    }
}
