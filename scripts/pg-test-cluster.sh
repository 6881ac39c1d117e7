#!/usr/bin/env bash
# A throw-away PostgreSQL cluster for the integration tests.
#
#   scripts/pg-test-cluster.sh [start [DIR]]   prints postgres://postgres@127.0.0.1:PORT/postgres
#                                              as the last stdout line; DIR defaults to a new temp dir
#   scripts/pg-test-cluster.sh stop DIR        stops the cluster and removes DIR
#
# Only the URL goes to stdout, so `DATABASE_URL=$(scripts/pg-test-cluster.sh)` works; the data
# directory (needed to stop it) is reported on stderr.
set -euo pipefail

log() { printf '%s\n' "$*" >&2; }
die() { log "pg-test-cluster: $*"; exit 1; }

for bin in initdb pg_ctl; do
  command -v "$bin" >/dev/null || die "$bin not found on PATH"
done

# initdb and pg_ctl refuse to run as root, so root hands the cluster to an unprivileged user.
cluster_user() {
  if [ "$(id -u)" -ne 0 ]; then id -un; return; fi
  for candidate in postgres nobody; do
    if id -u "$candidate" >/dev/null 2>&1; then echo "$candidate"; return; fi
  done
  die 'running as root and neither a "postgres" nor a "nobody" user exists'
}

as_user() {
  local user=$1; shift
  if [ "$user" = "$(id -un)" ]; then
    "$@"
  elif command -v runuser >/dev/null; then
    runuser -u "$user" -- "$@"
  else
    su -s /bin/sh "$user" -c "$(printf '%q ' "$@")"
  fi
}

free_port() {
  if command -v node >/dev/null; then
    node -e 'const s=require("net").createServer();s.listen(0,"127.0.0.1",()=>{console.log(s.address().port);s.close()})'
  else
    python3 -c 'import socket;s=socket.socket();s.bind(("127.0.0.1",0));print(s.getsockname()[1]);s.close()'
  fi
}

start() {
  local dir=${1:-}
  local user port
  user=$(cluster_user)
  if [ -z "$dir" ]; then
    dir=$(mktemp -d "${TMPDIR:-/tmp}/oi-pg.XXXXXX")
  else
    mkdir -p "$dir"
    [ -z "$(ls -A "$dir")" ] || die "$dir is not empty"
  fi
  dir=$(cd "$dir" && pwd)
  chown "$user" "$dir" 2>/dev/null || [ "$(id -un)" = "$user" ] || die "cannot hand $dir to $user"
  chmod 700 "$dir"
  # The user must be able to reach the directory through its parents (mktemp's /tmp is fine).
  as_user "$user" test -w "$dir" || die "$user cannot write to $dir; pick a DIR outside private directories"

  as_user "$user" mkdir "$dir/socket"
  as_user "$user" initdb -D "$dir/data" -U postgres --auth=trust --encoding=UTF8 --no-locale >&2 \
    || { rm -rf "$dir"; die 'initdb failed'; }

  port=$(free_port)
  # Durability is pointless for a cluster that is deleted afterwards; skipping fsync keeps tests fast.
  local options="-c listen_addresses=127.0.0.1 -p $port -k $dir/socket -c fsync=off -c synchronous_commit=off -c full_page_writes=off"
  if ! as_user "$user" pg_ctl -D "$dir/data" -l "$dir/postgres.log" -o "$options" -w -t 30 start >&2; then
    cat "$dir/postgres.log" >&2 || true
    rm -rf "$dir"
    die 'the server did not start'
  fi

  log "PostgreSQL test cluster running on 127.0.0.1:$port"
  log "data directory: $dir"
  log "stop it with: $0 stop $dir"
  echo "postgres://postgres@127.0.0.1:$port/postgres"
}

stop() {
  local dir=${1:-}
  [ -n "$dir" ] || die 'usage: pg-test-cluster.sh stop DIR'
  [ -f "$dir/data/PG_VERSION" ] || die "$dir does not hold a cluster made by this script"
  local user
  user=$(stat -c %U "$dir/data")
  if [ -f "$dir/data/postmaster.pid" ]; then
    as_user "$user" pg_ctl -D "$dir/data" -m fast -w stop >&2
  fi
  rm -rf "$dir"
  log "stopped and removed $dir"
}

case ${1:-start} in
  start) start "${2:-}" ;;
  stop) stop "${2:-}" ;;
  *) die "usage: $0 [start [DIR]] | stop DIR" ;;
esac
