# shellcheck shell=bash
# A throwaway PostgreSQL server for the store tests.
#
# Source this file, then call `setup_postgres`. When VEIL_TEST_DATABASE_URL is already set it
# does nothing (that server is used). Otherwise it
#   - installs PostgreSQL from the distribution's packages when no `initdb` is found
#     (Debian/Ubuntu: `apt-get install postgresql`; binaries under /usr/lib/postgresql/<ver>/bin),
#   - creates a cluster in a new temporary directory (as the `postgres` system user when run as
#     root, since initdb refuses root), trusting connections on loopback only,
#   - starts it on a free 127.0.0.1 port, waits until it accepts connections,
#   - exports VEIL_TEST_DATABASE_URL=postgres://veil@127.0.0.1:<port>/postgres,
#   - appends the command that stops it and deletes its directory to the bash array
#     `cleanup_cmds` (run each entry with `eval` on exit), and defines `stop_postgres`, which
#     does the same at once.
# Tests create a database of their own per test on that server.

_veil_pg_log() { printf '\033[1m==> %s\033[0m\n' "$*" >&2; }

# Directory of initdb/pg_ctl/pg_isready: from PATH, or the newest /usr/lib/postgresql/<ver>/bin.
_veil_pg_bindir() {
  local d
  if command -v initdb >/dev/null 2>&1 && command -v pg_ctl >/dev/null 2>&1; then
    dirname "$(readlink -f "$(command -v pg_ctl)")"
    return 0
  fi
  d=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1)
  if [ -n "$d" ] && [ -x "$d/initdb" ]; then
    echo "$d"
    return 0
  fi
  return 1
}

_veil_pg_install() {
  if ! command -v apt-get >/dev/null 2>&1; then
    echo "error: PostgreSQL (initdb, pg_ctl) not found and no apt-get to install it; install the" \
      "PostgreSQL server package, or set VEIL_TEST_DATABASE_URL to a server" >&2
    return 1
  fi
  local sudo=()
  if [ "$(id -u)" -ne 0 ]; then
    command -v sudo >/dev/null 2>&1 || {
      echo "error: installing PostgreSQL needs root (sudo not found)" >&2
      return 1
    }
    sudo=(sudo)
  fi
  _veil_pg_log "installing PostgreSQL from the distribution's packages"
  "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get update -qq &&
    "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >/dev/null
}

_veil_pg_free_port() {
  if command -v python3 >/dev/null 2>&1; then
    python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1]); s.close()'
    return
  fi
  local port
  while :; do
    port=$((20000 + RANDOM % 40000))
    if ! (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
      echo "$port"
      return
    fi
  done
}

setup_postgres() {
  if [ -n "${VEIL_TEST_DATABASE_URL:-}" ]; then
    return 0
  fi
  local bin
  if ! bin=$(_veil_pg_bindir); then
    _veil_pg_install || return 1
    bin=$(_veil_pg_bindir) || {
      echo "error: PostgreSQL was installed but initdb is still not found" >&2
      return 1
    }
  fi

  # initdb and postgres refuse to run as root: run them as the `postgres` system user then.
  local as=()
  if [ "$(id -u)" -eq 0 ]; then
    id postgres >/dev/null 2>&1 || {
      echo "error: running as root, and there is no 'postgres' user to run the server as" >&2
      return 1
    }
    if command -v runuser >/dev/null 2>&1; then
      as=(runuser -u postgres --)
    else
      as=(su postgres -s /bin/sh -c '"$0" "$@"')
    fi
  fi

  local dir
  dir=$(mktemp -d "${TMPDIR:-/tmp}/veil-pg.XXXXXX") || return 1
  [ "$(id -u)" -eq 0 ] && chown postgres: "$dir"
  _veil_pg_log "creating a throwaway PostgreSQL cluster ($("$bin/postgres" --version))"
  if ! "${as[@]}" "$bin/initdb" -D "$dir/data" -U veil --auth=trust -E UTF8 --no-locale \
    >"$dir/initdb.log" 2>&1; then
    cat "$dir/initdb.log" >&2
    rm -rf "$dir"
    return 1
  fi

  local port attempt
  for attempt in 1 2 3; do
    port=$(_veil_pg_free_port)
    # Loopback TCP only, socket in the cluster's own directory; durability is not needed.
    if "${as[@]}" "$bin/pg_ctl" -D "$dir/data" -l "$dir/server.log" -w -t 60 \
      -o "-c listen_addresses=127.0.0.1 -p $port -k $dir -c max_connections=300 -c fsync=off -c synchronous_commit=off -c full_page_writes=off" \
      start >/dev/null; then
      break
    fi
    if [ "$attempt" -eq 3 ]; then
      echo "error: PostgreSQL did not start; its log:" >&2
      tail -n 40 "$dir/server.log" >&2
      rm -rf "$dir"
      return 1
    fi
  done

  local stop
  printf -v stop '%q ' "${as[@]}" "$bin/pg_ctl" -D "$dir/data" -m immediate -w stop
  printf -v stop '%s>/dev/null 2>&1; rm -rf %q' "$stop" "$dir"
  cleanup_cmds+=("$stop")
  # shellcheck disable=SC2317  # called by the user of this library
  eval "stop_postgres() { $stop; }"

  export VEIL_TEST_DATABASE_URL="postgres://veil@127.0.0.1:$port/postgres"
  _veil_pg_log "PostgreSQL on 127.0.0.1:$port (VEIL_TEST_DATABASE_URL=$VEIL_TEST_DATABASE_URL)"
}
