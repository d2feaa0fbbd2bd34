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
status=0
echo "== Flyte programs on SQLite"
(cd "$here" && ACTIONSD_STORE="" "$here/.venv/bin/python" -m pytest -q) || status=1
if [ -n "${DATABASE_URL:-}" ]; then
    database="actionsd_flyte_$$"
    trap 'psql "$DATABASE_URL" -qc "DROP DATABASE IF EXISTS \"$database\"" >/dev/null 2>&1 || true' EXIT
    echo "== Flyte programs on Postgres"
    (cd "$here" && ACTIONSD_STORE="${DATABASE_URL%/*}/$database" "$here/.venv/bin/python" -m pytest -q) || status=1
fi
exit "$status"
