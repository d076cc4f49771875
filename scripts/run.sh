#!/usr/bin/env bash
# Starts a local Veil deployment with embedded defaults and keeps it running until Ctrl-C:
#   - a router (SQLite, local blobs and a keyring it creates, all under ./veil-data) on
#     127.0.0.1:8080;
#   - one local miner running mistral.rs on the CPU, serving a generated random-weight model
#     (`veil-miner tiny-model`), or the model given with --model;
# then prints ready-to-paste commands that perform a private completion against it.
#
# Running it again reuses everything under the data dir (keyring, database, identities, wallets,
# model), so earlier sessions and results are still there.
#
# It shares the test suite's build (dependencies optimised, Veil's own crates not), so after
# `scripts/test.sh` only a few crates are rebuilt; --release builds everything optimised instead.
#
# Usage: scripts/run.sh [--model PATH] [--model-name NAME] [--listen HOST:PORT]
#                       [--data-dir DIR] [--release]
#   --model PATH       a local model: a Hugging Face directory (config.json, *.safetensors,
#                      tokenizer.json, tokenizer_config.json) or a .gguf file
#   --model-name NAME  the name callers ask for (default: tiny, or the model directory's name)
#   --release          an optimised build of Veil's crates too (a long first build)
set -euo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"

model_path=""
model_name=""
listen=127.0.0.1:8080
data=veil-data
profile=debug
while [ $# -gt 0 ]; do
  case "$1" in
    --model) model_path=$2; shift 2 ;;
    --model-name) model_name=$2; shift 2 ;;
    --listen) listen=$2; shift 2 ;;
    --data-dir) data=$2; shift 2 ;;
    --release) profile=release; shift ;;
    -h|--help) sed -n '2,23p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "error: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
done

log() { printf '\033[1m==> %s\033[0m\n' "$*" >&2; }

if [ "$profile" = release ]; then
  log "building veil-router, veil-miner and veil (release)"
  cargo build --locked --release --bin veil-router --bin veil-miner --bin veil
else
  log "building veil-router, veil-miner and veil (the first build takes a while: mistral.rs is large)"
  cargo build --locked --bin veil-router --bin veil-miner --bin veil
fi
bin=$(cargo metadata --format-version 1 --no-deps | python3 -c 'import json,sys; print(json.load(sys.stdin)["target_directory"])')/$profile

local_dir=$data/local
mkdir -p "$local_dir/logs"
chmod 700 "$local_dir"

# Development wallets (random keys, 0600; local dev chain 31337 only).
new_key() { # file
  if [ ! -s "$1" ]; then
    (umask 077; od -An -tx1 -N32 /dev/urandom | tr -d ' \n' > "$1")
  fi
}
new_key "$local_dir/miner-wallet.key"
new_key "$local_dir/client-wallet.key"

if [ -z "$model_path" ]; then
  model_path=$local_dir/tiny-model
  model_name=${model_name:-tiny}
  if [ ! -f "$model_path/config.json" ]; then
    "$bin/veil-miner" tiny-model --out "$model_path"
  fi
else
  [ -e "$model_path" ] || { echo "error: --model $model_path: no such file or directory" >&2; exit 2; }
  model_name=${model_name:-$(basename "${model_path%.gguf}")}
fi

url=http://$listen
if curl -s -o /dev/null "$url/healthz"; then
  echo "error: something already answers on $listen (another run?); stop it or pass --listen" >&2
  exit 1
fi

pids=()
cleanup() {
  trap - EXIT INT TERM
  if [ ${#pids[@]} -gt 0 ]; then
    log "stopping (the miner finishes or releases its tasks)"
    kill -TERM "${pids[@]}" 2>/dev/null || true
    wait "${pids[@]}" 2>/dev/null || true
  fi
}
trap cleanup EXIT
trap 'cleanup; exit 130' INT TERM

# The router prints an admin API key once, on the first start, on its standard output: that goes
# to this terminal only. Its logs go to a file.
log "starting the router on $url (data in $data; logs in $local_dir/logs/router.log)"
"$bin/veil-router" --listen "$listen" --data-dir "$data" 2>>"$local_dir/logs/router.log" &
pids+=($!)
deadline=$((SECONDS + 60))
until curl -sf -o /dev/null "$url/readyz"; do
  kill -0 "${pids[0]}" 2>/dev/null || { echo "error: the router stopped; see $local_dir/logs/router.log" >&2; exit 1; }
  [ $SECONDS -lt $deadline ] || { echo "error: the router is not ready after 60 s" >&2; exit 1; }
  sleep 0.2
done

# An API key for the OpenAI-compatible API, created once and kept (0600) for the next starts.
if [ ! -s "$local_dir/api-key" ]; then
  (umask 077; "$bin/veil-router" --data-dir "$data" create-api-key --owner local \
     2>>"$local_dir/logs/router.log" | tail -n1 > "$local_dir/api-key")
fi

log "starting the miner: mistral.rs on the CPU serving $model_name from $model_path (logs in $local_dir/logs/miner.log)"
# mistral.rs creates a Hugging Face home when it loads a model, even from a local path: keep it
# in the data dir rather than in ~/.cache.
VEIL_LOCAL_MINER_KEY=$(cat "$local_dir/miner-wallet.key") \
  HF_HOME="${HF_HOME:-$local_dir/miner/cache/huggingface}" \
  "$bin/veil-miner" --router-url "$url" --dev-key-env VEIL_LOCAL_MINER_KEY \
  --engine mistralrs --model "$model_name=$model_path" --data-dir "$local_dir/miner" \
  >>"$local_dir/logs/miner.log" 2>&1 &
pids+=($!)

api_key=$(cat "$local_dir/api-key")
deadline=$((SECONDS + 600))
until curl -sf -H "authorization: Bearer $api_key" "$url/api/v2/models" | grep -q "\"$model_name\""; do
  kill -0 "${pids[1]}" 2>/dev/null || { echo "error: the miner stopped:" >&2; tail -n 5 "$local_dir/logs/miner.log" >&2; exit 1; }
  [ $SECONDS -lt $deadline ] || { echo "error: the miner did not connect within 10 minutes" >&2; exit 1; }
  sleep 0.5
done
miner=$(grep -o 'miner=0x[0-9a-fA-F]\{40\}' "$local_dir/logs/miner.log" | tail -n1 | cut -d= -f2 || true)
[ -n "$miner" ] || { echo "error: no miner address in $local_dir/logs/miner.log" >&2; exit 1; }

cat <<EOF

Veil is running: router $url, one miner ($miner) serving "$model_name".

A private completion, sealed on your machine (wallet-signed /api/v3; only the local miner may
open it):

  $bin/veil complete --router $url --private-key-file $local_dir/client-wallet.key \\
    --model $model_name --max-tokens 32 --allow-miner $miner "Hello, Veil"

The same through the OpenAI-compatible API (the router seals it at the edge):

  curl -s $url/api/v2/completions -H "authorization: Bearer \$(cat $local_dir/api-key)" \\
    -H 'content-type: application/json' \\
    -d '{"model": "$model_name", "max_tokens": 32, "messages": [{"role": "user", "content": "Hello, Veil"}]}'

Ctrl-C stops both.
EOF

wait -n "${pids[@]}" || true
echo "error: a process stopped; see $local_dir/logs/" >&2
exit 1
