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
# One store after the other: each suite runs every program at once, which
# already keeps the machine busy.
scratch="$(mktemp -d)"
database="actionsd_flyte_$$"
cleanup() {
    if [ -n "${DATABASE_URL:-}" ]; then
        psql "$DATABASE_URL" -qc "DROP DATABASE IF EXISTS \"$database\"" >/dev/null 2>&1 || true
    fi
    rm -rf "$scratch"
}
trap cleanup EXIT

suite() { # name store [pytest args...]
    local name="$1" store="$2"
    shift 2
    # A private --basetemp: pytest's shared /tmp/pytest-of-<user> is
    # pruned by every other pytest session of the same user.
    (cd "$here" && ACTIONSD_STORE="$store" "$here/.venv/bin/python" -m pytest -q -p no:cacheprovider \
        --basetemp "$scratch/$name-tmp" "$@")
}
status=0
echo "== Flyte programs on SQLite"
suite sqlite "" || status=1
if [ -n "${DATABASE_URL:-}" ]; then
    echo "== Flyte programs on Postgres"
    # The S3-compatible blob store is independent of the action store: it
    # runs once, in the SQLite pass, and is deselected (not skipped) here.
    suite postgres "${DATABASE_URL%/*}/$database" \
        --deselect test_sdk.py::test_a_run_on_the_s3_compatible_store || status=1
fi
exit "$status"
