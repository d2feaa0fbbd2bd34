#!/usr/bin/env bash
# Interop suites: the official clients against a real actionsd.
#
# Builds the daemon, installs each client (pinned) into a project-local
# environment (tests/interop/python/.venv, tests/interop/node/node_modules),
# starts the daemon on an ephemeral loopback port over a fresh database (on
# the Postgres server named by DATABASE_URL, or an SQLite file when it is
# unset), runs the Python, Node and curl suites, then stops the daemon and
# removes the database. Then a TLS pass: a second daemon (SQLite) with a
# certificate made here with openssl and client certificates required, and
# the same clients over TLS (python/tls_check.py, node/tls.check.mjs, curl).
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
tls_daemon=""
cleanup() {
    kill -TERM "$daemon" 2>/dev/null || true
    wait "$daemon" 2>/dev/null || true
    if [ -n "$tls_daemon" ]; then
        kill -TERM "$tls_daemon" 2>/dev/null || true
        wait "$tls_daemon" 2>/dev/null || true
    fi
    if [ -n "${DATABASE_URL:-}" ]; then
        psql "$DATABASE_URL" -qc "DROP DATABASE IF EXISTS \"$database\"" >/dev/null 2>&1 || true
    fi
    rm -rf "$scratch"
}
trap cleanup EXIT

# The daemon logs its bound address once it listens: wait_for_address PID
# LOG prints it.
wait_for_address() {
    local pid="$1" log="$2" address=""
    for _ in $(seq 1 300); do
        address="$(sed -n 's/.*"address":"\([0-9.:]*\)".*"actionsd listening".*/\1/p; s/.*"message":"actionsd listening".*"address":"\([0-9.:]*\)".*/\1/p' "$log" | head -n1)"
        [ -n "$address" ] && break
        if ! kill -0 "$pid" 2>/dev/null; then
            cat "$log" >&2
            echo "actionsd exited before listening" >&2
            return 1
        fi
        sleep 0.1
    done
    if [ -z "$address" ]; then
        cat "$log" >&2
        echo "actionsd did not report its address within 30 s" >&2
        return 1
    fi
    echo "$address"
}
address="$(wait_for_address "$daemon" "$log")"
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

echo "== TLS: a CA, a server and a client certificate (openssl)"
pki="$scratch/pki"
mkdir -p "$pki"
(
    cd "$pki"
    openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 1 \
        -subj "/CN=actionsd interop CA" -keyout ca.key -out ca.pem 2>/dev/null
    for name in server client; do
        openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes \
            -subj "/CN=actionsd interop $name" -keyout "$name.key" -out "$name.csr" 2>/dev/null
    done
    printf 'subjectAltName=DNS:localhost,IP:127.0.0.1\nextendedKeyUsage=serverAuth\n' >server.ext
    printf 'extendedKeyUsage=clientAuth\n' >client.ext
    for name in server client; do
        openssl x509 -req -in "$name.csr" -CA ca.pem -CAkey ca.key -CAcreateserial -days 1 \
            -extfile "$name.ext" -out "$name.pem" 2>/dev/null
    done
)
tls_log="$scratch/actionsd-tls.log"
"$root/target/debug/actionsd" serve --listen 127.0.0.1:0 \
    --database-url "sqlite://$scratch/actionsd-tls.db" --log-format json \
    --tls-cert "$pki/server.pem" --tls-key "$pki/server.key" --tls-client-ca "$pki/ca.pem" \
    >"$tls_log" 2>&1 &
tls_daemon=$!
tls_address="$(wait_for_address "$tls_daemon" "$tls_log")"
export ACTIONSD_TLS_ADDR="localhost:${tls_address##*:}"
export ACTIONSD_TLS_CA="$pki/ca.pem"
export ACTIONSD_TLS_CLIENT_CERT="$pki/client.pem"
export ACTIONSD_TLS_CLIENT_KEY="$pki/client.key"
echo "== actionsd with TLS (client certificates required) on $ACTIONSD_TLS_ADDR"
tls_status=0
echo "== Python over TLS: grpcio and connectrpc"
"$here/python/.venv/bin/python" -m pytest -q "$here/python/tls_check.py" || tls_status=1
echo "== Node over TLS: Connect, gRPC and gRPC-Web"
(cd "$here/node" && node --test tls.check.mjs) || tls_status=1
echo "== curl over TLS"
curl_tls() {
    curl -sS --max-time 10 --cacert "$ACTIONSD_TLS_CA" "$@" \
        -H 'content-type: application/json' -d '{}' \
        "https://$ACTIONSD_TLS_ADDR/actionsd.read.v1.ReadService/ListRuns"
}
if ! curl_tls --cert "$ACTIONSD_TLS_CLIENT_CERT" --key "$ACTIONSD_TLS_CLIENT_KEY" | grep -q '^{'; then
    echo "curl with a client certificate got no Connect answer" >&2
    tls_status=1
fi
if curl_tls >/dev/null 2>&1; then
    echo "curl without a client certificate was served" >&2
    tls_status=1
fi
if [ "$tls_status" -ne 0 ]; then
    echo "== TLS daemon log" >&2
    tail -n 50 "$tls_log" >&2
    status=1
fi
kill -TERM "$tls_daemon" 2>/dev/null || true
wait "$tls_daemon" 2>/dev/null || true
tls_daemon=""

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
