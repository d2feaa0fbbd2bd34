#!/usr/bin/env bash
# Real Flyte v2 programs on actionsd: installs flyte (pinned, with the Rust
# controller wheel) into tests/flyte/.venv, builds actionsd, and runs
# tests/flyte (pytest), which starts a daemon and `actionsd executor --flyte`
# per store: an SQLite file, and with DATABASE_URL set, a fresh Postgres
# database (dropped afterwards).
set -euo pipefail

here="$(cd "$(dirname "$0")" && pwd)"
root="$(cd "$here/../.." && pwd)"

cd "$root"
echo "== building actionsd"
cargo build --locked --bin actionsd

echo "== installing flyte (tests/flyte/.venv)"
if [ ! -x "$here/.venv/bin/python" ]; then
    python3 -m venv "$here/.venv"
fi
"$here/.venv/bin/pip" install --quiet --disable-pip-version-check -r "$here/requirements.txt"

export ACTIONSD_BIN="$root/target/debug/actionsd"
# The stores' suites run side by side (each has its own daemon and
# executors); each one's output is printed when it ends.
scratch="$(mktemp -d)"
database="actionsd_flyte_$$"
cleanup() {
    if [ -n "${DATABASE_URL:-}" ]; then
        psql "$DATABASE_URL" -qc "DROP DATABASE IF EXISTS \"$database\"" >/dev/null 2>&1 || true
    fi
    rm -rf "$scratch"
}
trap cleanup EXIT

suite() { # name store
    (cd "$here" && ACTIONSD_STORE="$2" "$here/.venv/bin/python" -m pytest -q -p no:cacheprovider) \
        >"$scratch/$1.log" 2>&1
}
echo "== Flyte programs on SQLite${DATABASE_URL:+ and Postgres}"
suite sqlite "" &
sqlite_suite=$!
if [ -n "${DATABASE_URL:-}" ]; then
    suite postgres "${DATABASE_URL%/*}/$database" &
    postgres_suite=$!
fi
status=0
wait "$sqlite_suite" || status=1
echo "-- SQLite"; cat "$scratch/sqlite.log"
if [ -n "${DATABASE_URL:-}" ]; then
    wait "$postgres_suite" || status=1
    echo "-- Postgres"; cat "$scratch/postgres.log"
fi
exit "$status"
