#!/usr/bin/env bash
# Load benchmark of the router's `/api/v2/completions` with wrk.
#
# For each database backend (SQLite, the embedded default, and PostgreSQL) it starts a release
# `veil-router` with local blobs, one miner process running the instant engine (no inference
# cost, so the figures are the router's and the queue's own), then drives `/api/v2/completions`
# with a small chat body (`max_tokens` 16) from wrk at each client count, plain and streamed.
# It prints requests/s, p50/p90/p99 latency, errors, the router's resident memory, and the
# router's own time per request broken down by step (from its `/metrics` histograms), and the
# router's CPU time and thread context switches per request.
#
# Usage: scripts/bench-router.sh
# Environment:
#   BENCH_DURATION   seconds per run (default 20)
#   BENCH_CLIENTS    client counts (default "8 64")
#   BENCH_BACKENDS   any of "sqlite sqlite-full postgres" (default "sqlite postgres";
#                    sqlite-full is SQLite with every commit synced, `?synchronous=full`)
#   BENCH_MINER_CONCURRENCY  tasks the miner runs at once (default 128)
#   BENCH_OUT        also append the Markdown tables to this file
#   TMPDIR           where the router's data directory (database, blobs) is made (mktemp)
#
# wrk comes from the distribution's packages (`apt-get install wrk`), installed when missing;
# PostgreSQL is started as in the test script (scripts/lib/postgres.sh).
set -euo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"

DURATION=${BENCH_DURATION:-20}
CLIENTS=${BENCH_CLIENTS:-"8 64"}
BACKENDS=${BENCH_BACKENDS:-"sqlite postgres"}
MINER_CONCURRENCY=${BENCH_MINER_CONCURRENCY:-128}
MODEL=veil-instant

log() { printf '\033[1m==> %s\033[0m\n' "$*" >&2; }

if ! command -v wrk >/dev/null 2>&1; then
  log "installing wrk from the distribution's packages"
  sudo=()
  [ "$(id -u)" -ne 0 ] && sudo=(sudo)
  "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq wrk >/dev/null ||
    { "${sudo[@]}" apt-get update -qq && "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq wrk >/dev/null; }
fi

log "building release binaries"
# The miner runs the instant engine only, so it is built without mistral.rs (the whole benchmark,
# this release build included, took about 10 minutes on a 2-core machine).
cargo build --release --locked -q -p veil-router -p veil-miner --no-default-features \
  --bin veil-router --bin veil-miner
target=${CARGO_TARGET_DIR:-$root/target}
ROUTER=$target/release/veil-router
MINER=$target/release/veil-miner
# A throwaway wallet for the miner: the router's default chain is a local dev chain (31337).
BENCH_MINER_KEY=$(python3 -c 'import secrets; print(secrets.token_hex(32))')
export BENCH_MINER_KEY

work=$(mktemp -d)
pids=()
cleanup_cmds=()
cleanup() {
  for p in "${pids[@]:-}"; do
    [ -n "$p" ] && kill "$p" 2>/dev/null || true
  done
  wait 2>/dev/null || true
  for c in "${cleanup_cmds[@]:-}"; do
    [ -n "$c" ] && eval "$c" || true
  done
  rm -rf "$work"
}
trap cleanup EXIT INT TERM

free_port() {
  python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1]); s.close()'
}

# Per-step mean of the router's step and route histograms between two /metrics scrapes.
steps_between() { # before-file after-file requests
  python3 - "$1" "$2" "$3" <<'PY'
import re, sys
def read(path):
    sums, counts = {}, {}
    for line in open(path):
        m = re.match(r'(veil_router_step_seconds|veil_http_request_duration_seconds)_(sum|count)\{(.*)\} (\S+)$', line)
        if not m:
            continue
        name, kind, labels, value = m.groups()
        labels = dict(re.findall(r'(\w+)="([^"]*)"', labels))
        key = labels["step"] if name == "veil_router_step_seconds" else "http " + labels.get("route", "?")
        (sums if kind == "sum" else counts)[key] = float(value)
    return sums, counts
bs, bc = read(sys.argv[1])
as_, ac = read(sys.argv[2])
requests = float(sys.argv[3]) or 1.0
rows = []
order = ["seal", "blob_put", "enqueue", "queue_wait", "lease", "http /api/miner/leases/{lease_id}/key",
         "http /api/miner/leases/{lease_id}/prompt", "http /api/miner/leases/{lease_id}/result",
         "http /api/miner/leases/{lease_id}/complete", "result_get", "result_open", "total"]
for key in order + sorted(k for k in ac if k not in order):
    n = ac.get(key, 0) - bc.get(key, 0)
    if n <= 0 or (key.startswith("http ") and not key.startswith("http /api/miner/")):
        continue
    mean_ms = (as_.get(key, 0) - bs.get(key, 0)) / n * 1e3
    rows.append(f"{key.replace('http ', '')}={mean_ms:.3f}ms(n={int(n)})")
print(" ".join(rows))
PY
}

# CPU time (user + system) of a process, in clock ticks.
cpu_ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }
TICKS=$(getconf CLK_TCK)

# Context switches (voluntary and involuntary) of all of a process's threads.
ctx_switches() { cat /proc/"$1"/task/*/status 2>/dev/null | awk '/ctxt_switches/ {s += $2} END {print s + 0}'; }

rss_kib() { awk '/^VmRSS/ {print $2}' "/proc/$1/status"; }
hwm_kib() { awk '/^VmHWM/ {print $2}' "/proc/$1/status"; }

cat >"$work/plain.lua" <<LUA
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
wrk.headers["Authorization"] = "Bearer " .. os.getenv("BENCH_KEY")
wrk.body = '{"model":"$MODEL","max_tokens":16,"messages":[{"role":"system","content":"You are terse."},{"role":"user","content":"Say hello to the benchmark in a few words."}]}'
LUA
cat >"$work/stream.lua" <<LUA
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
wrk.headers["Authorization"] = "Bearer " .. os.getenv("BENCH_KEY")
wrk.body = '{"model":"$MODEL","max_tokens":16,"stream":true,"messages":[{"role":"system","content":"You are terse."},{"role":"user","content":"Say hello to the benchmark in a few words."}]}'
LUA

results=$work/results.md
{
  echo "| backend | mode | clients | req/s | p50 ms | p90 ms | p99 ms | errors | router RSS MiB (peak) | router CPU ms/req | router context switches/req | miner CPU ms/req |"
  echo "|---|---|---|---|---|---|---|---|---|---|---|---|"
} >"$results"
steps_file=$work/steps.txt
: >"$steps_file"

for backend in $BACKENDS; do
  data=$work/data-$backend
  mkdir -p "$data"
  export VEIL_DATA_DIR=$data
  case $backend in
    sqlite) unset VEIL_DATABASE_URL ;;
    # Every commit synced before it is answered (`synchronous=full`).
    sqlite-full) export VEIL_DATABASE_URL="sqlite://$data/veil.db?synchronous=full" ;;
    postgres)
      # shellcheck source=lib/postgres.sh
      source "$root/scripts/lib/postgres.sh"
      setup_postgres
      export VEIL_DATABASE_URL=$VEIL_TEST_DATABASE_URL
      ;;
    *) echo "error: unknown backend $backend" >&2; exit 2 ;;
  esac
  port=$(free_port)
  export VEIL_LISTEN=127.0.0.1:$port
  export RUST_LOG=${RUST_LOG:-warn}
  log "$backend: creating an API key"
  BENCH_KEY=$("$ROUTER" create-api-key --owner bench --rate-per-minute 10000000 --max-concurrent 100000 | tail -n 1)
  export BENCH_KEY
  log "$backend: starting the router on $VEIL_LISTEN and one instant-engine miner"
  "$ROUTER" serve >"$work/router-$backend.log" 2>&1 &
  router_pid=$!
  pids+=("$router_pid")
  for _ in $(seq 100); do
    curl -sf "http://$VEIL_LISTEN/readyz" >/dev/null && break
    sleep 0.1
  done
  VEIL_LOG=warn "$MINER" --router-url "http://$VEIL_LISTEN" --dev-key-env BENCH_MINER_KEY \
    --engine instant --model "$MODEL" --concurrency "$MINER_CONCURRENCY" --lease-wait-ms 5000 \
    --data-dir "$work/miner-$backend" >"$work/miner-$backend.log" 2>&1 &
  miner_pid=$!
  pids+=("$miner_pid")
  # A request that must succeed before load starts (the miner has logged in).
  for _ in $(seq 100); do
    code=$(curl -s -o /dev/null -w '%{http_code}' -H "Authorization: Bearer $BENCH_KEY" \
      -H 'Content-Type: application/json' --max-time 5 \
      -d "{\"model\":\"$MODEL\",\"max_tokens\":16,\"messages\":[{\"role\":\"user\",\"content\":\"warm up\"}]}" \
      "http://$VEIL_LISTEN/api/v2/chat/completions" || true)
    [ "$code" = 200 ] && break
    sleep 0.2
  done
  [ "$code" = 200 ] || { echo "error: warm-up request answered $code" >&2; tail -20 "$work/router-$backend.log" >&2; exit 1; }
  wrk -t2 -c8 -d3s -s "$work/plain.lua" "http://$VEIL_LISTEN/api/v2/chat/completions" >/dev/null

  for mode in plain stream; do
    for c in $CLIENTS; do
      curl -s "http://$VEIL_LISTEN/metrics" >"$work/before.prom"
      r0=$(cpu_ticks "$router_pid")
      x0=$(ctx_switches "$router_pid")
      m0=$(cpu_ticks "$miner_pid")
      log "$backend $mode: $c clients for ${DURATION}s"
      out=$(wrk -t2 -c"$c" -d"${DURATION}s" --timeout 10s --latency -s "$work/$mode.lua" \
        "http://$VEIL_LISTEN/api/v2/chat/completions")
      r1=$(cpu_ticks "$router_pid")
      x1=$(ctx_switches "$router_pid")
      m1=$(cpu_ticks "$miner_pid")
      curl -s "http://$VEIL_LISTEN/metrics" >"$work/after.prom"
      echo "$out" >&2
      rps=$(awk '/^Requests\/sec/ {print $2}' <<<"$out")
      total=$(awk '/requests in/ {print $1}' <<<"$out")
      ms() { # wrk latency value (us/ms/s) -> ms
        awk -v v="$1" 'BEGIN { n=v+0; if (v ~ /us$/) n/=1000; else if (v ~ /ms$/) n=n; else if (v ~ /s$/) n*=1000; printf "%.2f", n }'
      }
      p50=$(ms "$(awk '$1=="50%" {print $2}' <<<"$out")")
      p90=$(ms "$(awk '$1=="90%" {print $2}' <<<"$out")")
      p99=$(ms "$(awk '$1=="99%" {print $2}' <<<"$out")")
      errors=$(awk '/Non-2xx/ {print $NF} /Socket errors/ {s=$0} END {}' <<<"$out")
      errors=${errors:-0}
      sock=$(awk -F'[ ,]+' '/Socket errors/ {print $4+$6+$8+$10}' <<<"$out")
      errors=$((errors + ${sock:-0}))
      rss=$(( $(rss_kib "$router_pid") / 1024 ))
      hwm=$(( $(hwm_kib "$router_pid") / 1024 ))
      rcpu=$(awk -v d=$((r1 - r0)) -v t="$TICKS" -v n="$total" 'BEGIN {printf "%.2f", d / t * 1000 / n}')
      rctx=$(awk -v d=$((x1 - x0)) -v n="$total" 'BEGIN {printf "%.0f", d / n}')
      mcpu=$(awk -v d=$((m1 - m0)) -v t="$TICKS" -v n="$total" 'BEGIN {printf "%.2f", d / t * 1000 / n}')
      echo "| $backend | $mode | $c | $rps | $p50 | $p90 | $p99 | $errors | $rss ($hwm) | $rcpu | $rctx | $mcpu |" >>"$results"
      echo "$backend $mode c=$c: $(steps_between "$work/before.prom" "$work/after.prom" "$total")" >>"$steps_file"
    done
  done

  kill -TERM "$miner_pid" 2>/dev/null || true
  wait "$miner_pid" 2>/dev/null || true
  tail -n 1 "$work/miner-$backend.log" >&2
  kill -TERM "$router_pid" 2>/dev/null || true
  wait "$router_pid" 2>/dev/null || true
  if [ "$backend" = postgres ]; then
    stop_postgres
    unset VEIL_TEST_DATABASE_URL
  fi
done

echo
echo "Machine: $(nproc) cores, $(awk '/MemTotal/ {printf "%.0f GiB", $2/1048576}' /proc/meminfo); router, miner and wrk share it."
cat "$results"
echo
echo "Router time per request by step (mean over the run; http rows are whole miner-API requests):"
cat "$steps_file"
if [ -n "${BENCH_OUT:-}" ]; then
  { cat "$results"; echo; cat "$steps_file"; } >>"$BENCH_OUT"
fi
