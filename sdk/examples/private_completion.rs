//! A private completion through a Veil router's `/api/v3`, from start to finish.
//!
//! The prompt is sealed on this machine, every request is signed by your wallet, and the answer
//! is verified (the miner's signature, the blob's hash, the AEAD) and opened here. The router
//! and the storage only ever see ids, hashes and sealed bytes.
//!
//! ```sh
//! export VEIL_ROUTER_URL=http://127.0.0.1:8080
//! # Your wallet: an encrypted JSON keystore ...
//! export VEIL_KEYSTORE=~/.veil/wallet.json VEIL_KEYSTORE_PASSWORD=…
//! # ... or, for development only, a raw private key:
//! export VEIL_PRIVATE_KEY=0xac0974bec39a17e36ba4a6b4d238ff944bacb478cbed5efcae784d7bf4f2ff80
//! export VEIL_MODEL=tiny                      # a model your miners serve
//! cargo run -p veil-sdk --example private_completion -- "Why is the sky blue?"
//! ```

use std::time::Duration;

use futures::StreamExt;
use veil_sdk::{Client, CompletionRequest, SessionOptions, wallet};

type Result<T> = std::result::Result<T, Box<dyn std::error::Error>>;

#[tokio::main]
async fn main() -> Result<()> {
    let router = std::env::var("VEIL_ROUTER_URL").map_err(|_| "set VEIL_ROUTER_URL")?;
    let model = std::env::var("VEIL_MODEL").unwrap_or_else(|_| "tiny".into());
    let prompt = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "Say hello in five words.".into());

    // 1. A wallet. Any alloy signer works here, hardware wallets (Ledger, Trezor) and cloud
    //    KMS signers included: `Client::builder(..).signer(that_signer)`.
    let signer = match std::env::var_os("VEIL_KEYSTORE") {
        Some(path) => {
            let password = std::env::var("VEIL_KEYSTORE_PASSWORD")
                .map_err(|_| "set VEIL_KEYSTORE_PASSWORD")?;
            wallet::from_keystore(path.as_ref(), password.as_bytes())?
        }
        None => {
            let key = std::env::var("VEIL_PRIVATE_KEY")
                .map_err(|_| "set VEIL_KEYSTORE (or VEIL_PRIVATE_KEY for development)")?;
            wallet::from_private_key_hex(&key)?
        }
    };

    // 2. A client: retries transient failures, waits up to two minutes for an answer.
    let client = Client::builder(router)
        .signer(signer)
        .retries(3, Duration::from_millis(250))
        .completion_timeout(Duration::from_secs(120))
        .build()?;
    println!("wallet {}", client.address());

    // 3. A session owned by the wallet (pass `.allow_miner(addr)` to make it private).
    let session = client.open_session(SessionOptions::new()).await?;
    println!("session {}", session.id());

    // 4. A completion: sealed, signed, submitted, waited for, verified, opened.
    let request = CompletionRequest::user(&model, &prompt)
        .system("You are concise.")
        .max_tokens(64);
    let answer = client.complete(&session, &request).await?;
    println!(
        "\n[{} via miner {}, {} tokens, key version {}]\n{}",
        answer.model,
        answer.miner,
        answer.usage.completion_tokens,
        answer.key_version,
        answer.text.as_str()
    );

    // 5. The same, streamed: each piece is printed once its sealed chunk has authenticated;
    //    the miner's signature and the hash of every byte are checked at the end.
    println!("\n[streamed]");
    let mut stream = client.complete_stream(&session, &request).await?;
    while let Some(delta) = stream.next().await {
        print!("{}", delta?);
        use std::io::Write as _;
        std::io::stdout().flush()?;
    }
    if let Some(s) = stream.summary() {
        println!(
            "\n[verified: task {}, result sha256 {}]",
            s.task_id, s.result_hash
        );
    }

    // 6. Done with the session: no new tasks, its blobs are deleted by the router.
    client.close_session(&session).await?;
    Ok(())
}
