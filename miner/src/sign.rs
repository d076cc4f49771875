//! Building and signing the miner's EIP-712 messages (protocol §6).

use std::time::{SystemTime, UNIX_EPOCH};

use alloy_signer::Signer;
use veil_api::eip712::{Domain, KeyRequest, MinerLogin, Signed, TaskResult};
use veil_api::miner::{BlobReceipt, Lease};
use veil_api::wire::{Hex32, Nonce};
use veil_keys::{KeyId, Scope, X25519Public};

use crate::Result;

/// How far ahead signed requests expire (the router refuses more than 300 s).
pub const MESSAGE_TTL_SECS: u64 = 120;

/// Unix seconds now.
pub fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// The key id of a lease's task key (scope 2, the lease's key version, session and task).
pub fn task_key_id(lease: &Lease) -> KeyId {
    KeyId::task(lease.key_version, lease.session_id, lease.task_id)
}

/// A `MinerLogin` for `recipient`, expiring `MESSAGE_TTL_SECS` after `now`, with a fresh nonce.
pub fn login_message(recipient: &X25519Public, now: u64) -> MinerLogin {
    MinerLogin {
        recipient: Hex32(*recipient.as_bytes()),
        expires_at: now + MESSAGE_TTL_SECS,
        nonce: Nonce::random(),
    }
}

/// A task-scope `KeyRequest` for a lease, wrapped to `recipient`, with a fresh nonce.
pub fn key_request_message(lease: &Lease, recipient: &X25519Public, now: u64) -> KeyRequest {
    KeyRequest {
        session_id: lease.session_id,
        task_id: lease.task_id,
        scope: Scope::Task.as_byte(),
        key_version: lease.key_version,
        recipient: Hex32(*recipient.as_bytes()),
        expires_at: now + MESSAGE_TTL_SECS,
        nonce: Nonce::random(),
    }
}

/// The `TaskResult` for a lease and the receipt of its uploaded result.
pub fn task_result_message(lease: &Lease, receipt: &BlobReceipt) -> TaskResult {
    TaskResult {
        session_id: lease.session_id,
        task_id: lease.task_id,
        prompt_hash: lease.prompt_hash,
        result_hash: receipt.sha256,
        result_urn: receipt.urn.clone(),
    }
}

/// Signs a fresh `MinerLogin`.
pub async fn sign_login<S>(
    signer: &S,
    domain: &Domain,
    recipient: &X25519Public,
) -> Result<Signed<MinerLogin>>
where
    S: Signer + ?Sized,
{
    Ok(Signed::sign(login_message(recipient, unix_now()), domain, signer).await?)
}

/// Signs a fresh task-scope `KeyRequest` for `lease`.
pub async fn sign_key_request<S>(
    signer: &S,
    domain: &Domain,
    lease: &Lease,
    recipient: &X25519Public,
) -> Result<Signed<KeyRequest>>
where
    S: Signer + ?Sized,
{
    let msg = key_request_message(lease, recipient, unix_now());
    Ok(Signed::sign(msg, domain, signer).await?)
}

/// Signs the `TaskResult` for `lease` and the receipt of its result.
pub async fn sign_task_result<S>(
    signer: &S,
    domain: &Domain,
    lease: &Lease,
    receipt: &BlobReceipt,
) -> Result<Signed<TaskResult>>
where
    S: Signer + ?Sized,
{
    Ok(Signed::sign(task_result_message(lease, receipt), domain, signer).await?)
}

#[cfg(test)]
mod tests {
    use alloy_signer_local::PrivateKeySigner;
    use uuid::Uuid;
    use veil_api::eip712::check_expiry;
    use veil_api::miner::TaskParams;
    use veil_keys::X25519Secret;

    use super::*;

    pub(crate) fn lease() -> Lease {
        Lease {
            lease_id: Uuid::now_v7(),
            task_id: Uuid::now_v7(),
            session_id: Uuid::now_v7(),
            prompt_urn: "urn:blob:v1:mem:local:b:p".into(),
            prompt_hash: Hex32([9; 32]),
            key_version: 3,
            prompt_scope: 2,
            model: "instant".into(),
            params: TaskParams::default(),
            attempt: 1,
            lease_expires_at_ms: 0,
            lease_ttl_ms: 30_000,
        }
    }

    #[tokio::test]
    async fn signed_messages_recover_the_wallet() {
        let wallet = PrivateKeySigner::random();
        let dyn_wallet: &(dyn Signer + Send + Sync) = &wallet;
        let domain = Domain::without_contract(31337);
        let me = X25519Secret::generate().unwrap().public();
        let lease = lease();
        let now = unix_now();

        let kr = sign_key_request(dyn_wallet, &domain, &lease, &me)
            .await
            .unwrap();
        assert_eq!(kr.verify(&domain, now).unwrap(), wallet.address());
        assert_eq!(kr.message.scope, 2);
        assert_eq!(kr.message.key_version, 3);
        assert_eq!(kr.message.session_id, lease.session_id);
        assert_eq!(kr.message.task_id, lease.task_id);
        assert_eq!(kr.message.recipient.0, *me.as_bytes());
        check_expiry(kr.message.expires_at, now).unwrap();
        // Another deployment's domain recovers someone else.
        assert_ne!(
            kr.recover(&Domain::without_contract(1)).unwrap(),
            wallet.address()
        );
        // Nonces are fresh per request.
        let again = sign_key_request(&wallet, &domain, &lease, &me)
            .await
            .unwrap();
        assert_ne!(again.message.nonce, kr.message.nonce);

        let login = sign_login(dyn_wallet, &domain, &me).await.unwrap();
        assert_eq!(login.verify(&domain, now).unwrap(), wallet.address());
        assert_eq!(login.message.recipient.0, *me.as_bytes());

        let receipt = BlobReceipt {
            urn: "urn:blob:v1:mem:local:b:r".into(),
            sha256: Hex32([5; 32]),
            size: 10,
        };
        let tr = sign_task_result(dyn_wallet, &domain, &lease, &receipt)
            .await
            .unwrap();
        assert_eq!(tr.recover(&domain).unwrap(), wallet.address());
        assert_eq!(tr.message.prompt_hash, lease.prompt_hash);
        assert_eq!(tr.message.result_hash, receipt.sha256);
        assert_eq!(tr.message.result_urn, receipt.urn);
    }

    #[test]
    fn task_key_id_is_task_scope() {
        let l = lease();
        let id = task_key_id(&l);
        assert_eq!(id.scope(), Scope::Task);
        assert_eq!(id.key_version, 3);
        assert_eq!(id.task_id, Some(l.task_id));
    }
}
