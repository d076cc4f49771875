# shellcheck shell=bash
# EVM tooling for the contract tests: the pinned Solidity compiler and the anvil dev chain,
# both installed from npm by `npm ci` in contracts/ (versions fixed by contracts/package-lock.json).
#
# Source this file, then call `setup_evm_tools` from the repository root. It
#   - runs `npm ci` in contracts/ when node_modules is missing or was installed from another
#     lockfile,
#   - exports VEIL_ANVIL, the anvil binary the Rust tests spawn,
#   - checks that the committed artifact (contracts/artifacts/VeilAcl.json) is exactly what the
#     pinned compiler produces from contracts/sol/, and fails if it is not.

setup_evm_tools() {
  local contracts=contracts
  if [ ! -f "$contracts/package-lock.json" ]; then
    echo "error: run setup_evm_tools from the repository root ($contracts/package-lock.json not found)" >&2
    return 1
  fi
  if ! command -v node >/dev/null 2>&1 || ! command -v npm >/dev/null 2>&1; then
    echo "error: Node.js and npm are required for the contract tests (solc and anvil come from npm)" >&2
    return 1
  fi

  local want have stamp="$contracts/node_modules/.veil-lock.sha256"
  want=$(sha256sum "$contracts/package-lock.json" | cut -d' ' -f1)
  have=$(cat "$stamp" 2>/dev/null || true)
  if [ "$want" != "$have" ]; then
    printf '\033[1m==> %s\033[0m\n' "npm ci in $contracts/ (solc, anvil)" >&2
    (cd "$contracts" && npm ci --no-audit --no-fund --loglevel=error) || return 1
    echo "$want" >"$stamp"
  fi

  local platform
  case "$(uname -s)-$(uname -m)" in
    Linux-x86_64) platform=linux-amd64 ;;
    Linux-aarch64 | Linux-arm64) platform=linux-arm64 ;;
    Darwin-x86_64) platform=darwin-amd64 ;;
    Darwin-arm64) platform=darwin-arm64 ;;
    *) echo "error: no anvil package for $(uname -s)-$(uname -m); set VEIL_ANVIL" >&2; return 1 ;;
  esac
  if [ -z "${VEIL_ANVIL:-}" ]; then
    VEIL_ANVIL="$(pwd)/$contracts/node_modules/@foundry-rs/anvil-$platform/bin/anvil"
  fi
  if ! "$VEIL_ANVIL" --version >/dev/null 2>&1; then
    echo "error: anvil at $VEIL_ANVIL does not run" >&2
    return 1
  fi
  export VEIL_ANVIL

  (cd "$contracts" && node scripts/compile.mjs --check) || return 1
}
