#!/usr/bin/env bash
# Runs Veil's whole test suite on a fresh machine or a developer's laptop.
#
# It installs what the tests need when it is missing and starts it on loopback:
#   - the S3-compatible test server `moto_server` (PyPI: moto[server])
#   - a throwaway PostgreSQL server (Debian's postgresql package) for the store and replica tests
#   - anvil (npm: @foundry-rs/anvil) and solc (npm: solc) for the contract tests, pinned in
#     contracts/package-lock.json; the committed contract artifact is checked against a recompile
#   - the `cryptography`, `openai` and `eth-account` Python packages (independent vector check;
#     the official OpenAI client against the router; an independent wallet library that signs and
#     recovers every EIP-712 message of protocol §6, api/tests/eip712_eth_account.rs)
#   - cargo-fuzz (crates.io) for the fuzz targets
# then runs every Rust test in the workspace (unit, integration, doc tests), the README's run
# command (scripts/run.sh in a pseudo-terminal: its printed commands, Ctrl-C, a second start),
# the independent vector check, and a short run of every fuzz target.
#
# Usage: scripts/test.sh [extra cargo test arguments]
# Environment: VEIL_FUZZ_SECONDS  seconds per fuzz target (default 10)
set -euo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"

MOTO_VERSION=5.2.1
OPENAI_VERSION=2.8.1
ETH_ACCOUNT_VERSION=0.14.0 # keep in step with api/tests/eip712_eth_account.rs
CARGO_FUZZ_VERSION=0.13.2
CRYPTOGRAPHY_MIN=42

log() { printf '\033[1m==> %s\033[0m\n' "$*" >&2; }

PYTHON=${PYTHON:-python3}
command -v "$PYTHON" >/dev/null || { echo "error: python3 is required" >&2; exit 1; }

pip_install() {
  log "installing $* from PyPI"
  "$PYTHON" -m pip install --quiet --disable-pip-version-check "$@"
}

# --- Python tools -----------------------------------------------------------
if ! "$PYTHON" -c "import cryptography, sys; sys.exit(int(cryptography.__version__.split('.')[0]) < $CRYPTOGRAPHY_MIN)" 2>/dev/null; then
  pip_install "cryptography>=$CRYPTOGRAPHY_MIN"
fi
if ! command -v moto_server >/dev/null 2>&1 || ! moto_server --help >/dev/null 2>&1; then
  pip_install "moto[server]==$MOTO_VERSION"
  hash -r
fi
MOTO=$(command -v moto_server)
if ! "$PYTHON" -c "import openai, sys; sys.exit(openai.__version__ != '$OPENAI_VERSION')" 2>/dev/null; then
  pip_install "openai==$OPENAI_VERSION"
fi
if ! "$PYTHON" -c "import eth_account, sys; sys.exit(eth_account.__version__ != '$ETH_ACCOUNT_VERSION')" 2>/dev/null; then
  pip_install "eth-account==$ETH_ACCOUNT_VERSION"
fi

# --- services on loopback ---------------------------------------------------
pids=()
cleanup_cmds=()
cleanup() {
  for p in "${pids[@]:-}"; do
    [ -n "$p" ] && kill "$p" 2>/dev/null || true
  done
  for c in "${cleanup_cmds[@]:-}"; do
    [ -n "$c" ] && eval "$c" || true
  done
}
trap cleanup EXIT INT TERM

free_port() {
  "$PYTHON" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1]); s.close()'
}

wait_http() { # url, seconds
  local url=$1 deadline=$((SECONDS + $2))
  until curl -s -o /dev/null "$url"; do
    if [ $SECONDS -ge $deadline ]; then echo "error: $url did not come up" >&2; return 1; fi
    sleep 0.2
  done
}

if [ -z "${VEIL_TEST_S3_ENDPOINT:-}" ]; then
  port=$(free_port)
  log "starting moto_server on 127.0.0.1:$port"
  "$MOTO" -H 127.0.0.1 -p "$port" >"${TMPDIR:-/tmp}/veil-moto-$port.log" 2>&1 &
  pids+=($!)
  export VEIL_TEST_S3_ENDPOINT="http://127.0.0.1:$port"
  wait_http "$VEIL_TEST_S3_ENDPOINT" 30
fi

# shellcheck source=lib/postgres.sh
source "$root/scripts/lib/postgres.sh"
setup_postgres

# shellcheck source=lib/evm.sh
source "$root/scripts/lib/evm.sh"
setup_evm_tools

# --- the suite --------------------------------------------------------------
log "cargo test --workspace"
cargo test --workspace --locked "$@"

# The README's run command, as a person uses it: started in a terminal, its printed commands
# run as printed, stopped with Ctrl-C, started again.
log "the run command (scripts/run.sh), twice"
"$PYTHON" scripts/lib/run_smoke.py "$root"


# cargo-fuzz instruments the targets with sanitizer-coverage flags that stable
# rustc accepts only with RUSTC_BOOTSTRAP; the fuzz crate is a workspace of its
# own (fuzz/), so this never touches the main build.
if ! cargo fuzz --version >/dev/null 2>&1; then
  log "installing cargo-fuzz $CARGO_FUZZ_VERSION from crates.io"
  cargo install --locked cargo-fuzz --version "$CARGO_FUZZ_VERSION"
fi
secs=${VEIL_FUZZ_SECONDS:-10}
log "fuzz targets, ${secs}s each"
targets=$(cd fuzz && cargo fuzz list)
(cd fuzz && RUSTC_BOOTSTRAP=1 cargo fuzz build)
fuzz_log="${TMPDIR:-/tmp}/veil-fuzz.log"
for t in $targets; do
  if ! (cd fuzz && RUSTC_BOOTSTRAP=1 cargo fuzz run "$t" -- -max_total_time="$secs") >"$fuzz_log" 2>&1; then
    tail -40 "$fuzz_log" >&2
    echo "error: fuzz target $t failed" >&2
    exit 1
  fi
  echo "$t: $(grep -E '^Done' "$fuzz_log")"
done

log "independent protocol-vector check (Python, from the spec)"
"$PYTHON" keys/tests/vectors/check_vectors.py
