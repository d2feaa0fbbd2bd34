#!/usr/bin/env bash
# Interop suites: the official clients against a real actionsd.
#
# Builds the daemon, installs each client (pinned) into a project-local
# environment (tests/interop/python/.venv, tests/interop/node/node_modules),
# starts the daemon on an ephemeral loopback port over a fresh database (on
# the Postgres server named by DATABASE_URL, or an SQLite file when it is
# unset), runs the Python, Node and curl suites, then stops the daemon and
# removes the database.
set -euo pipefail

here="$(cd "$(dirname "$0")" && pwd)"
root="$(cd "$here/../.." && pwd)"

cd "$root"
echo "== building actionsd"
cargo build --locked --bin actionsd

echo "== installing the Python clients (tests/interop/python/.venv)"
if [ ! -x "$here/python/.venv/bin/python" ]; then
    python3 -m venv "$here/python/.venv"
fi
"$here/python/.venv/bin/pip" install --quiet --disable-pip-version-check \
    -r "$here/python/requirements.txt"

echo "== installing the Node clients (tests/interop/node/node_modules)"
(cd "$here/node" && npm ci --no-audit --no-fund --loglevel=error && npm run --silent generate)

database="actionsd_interop_$$"
scratch="$(mktemp -d)"
log="$scratch/actionsd.log"
if [ -n "${DATABASE_URL:-}" ]; then
    store="${DATABASE_URL%/*}/$database"
else
    store="sqlite://$scratch/actionsd.db"
fi
echo "== store: ${store%%://*}"
"$root/target/debug/actionsd" serve --listen 127.0.0.1:0 \
    --database-url "$store" --log-format json >"$log" 2>&1 &
daemon=$!
cleanup() {
    kill -TERM "$daemon" 2>/dev/null || true
    wait "$daemon" 2>/dev/null || true
    if [ -n "${DATABASE_URL:-}" ]; then
        psql "$DATABASE_URL" -qc "DROP DATABASE IF EXISTS \"$database\"" >/dev/null 2>&1 || true
    fi
    rm -rf "$scratch"
}
trap cleanup EXIT

# The daemon logs its bound address once it listens.
address=""
for _ in $(seq 1 300); do
    address="$(sed -n 's/.*"address":"\([0-9.:]*\)".*"actionsd listening".*/\1/p; s/.*"message":"actionsd listening".*"address":"\([0-9.:]*\)".*/\1/p' "$log" | head -n1)"
    [ -n "$address" ] && break
    if ! kill -0 "$daemon" 2>/dev/null; then
        cat "$log" >&2
        echo "actionsd exited before listening" >&2
        exit 1
    fi
    sleep 0.1
done
if [ -z "$address" ]; then
    cat "$log" >&2
    echo "actionsd did not report its address within 30 s" >&2
    exit 1
fi
export ACTIONSD_ADDR="$address"
echo "== actionsd listening on $ACTIONSD_ADDR"

status=0
echo "== Python: flyteidl2 with grpcio and connectrpc"
"$here/python/.venv/bin/python" -m pytest -q "$here/python" || status=1
echo "== Node: @connectrpc/connect over Connect, gRPC and gRPC-Web"
(cd "$here/node" && node --test) || status=1
echo "== curl"
bash "$here/curl.sh" || status=1

if [ "$status" -ne 0 ]; then
    echo "== daemon log" >&2
    tail -n 50 "$log" >&2
fi

# Real Flyte programs on their own daemons and executors, on SQLite and
# (with DATABASE_URL) Postgres.
echo "== Flyte programs (tests/flyte/run.sh)"
"$root/tests/flyte/run.sh" || status=1

# The README's test command is `cargo test && tests/interop/run.sh`, so this
# is its last line: say plainly when half of it ran on SQLite only.
if [ -z "${DATABASE_URL:-}" ]; then
    echo "note: DATABASE_URL is not set: cargo test reported the Postgres tests" \
        "(NAME::postgres) as ignored and these suites ran on SQLite only;" \
        "set DATABASE_URL (see README.md, Running the tests) to run the Postgres suite" >&2
fi
exit "$status"
