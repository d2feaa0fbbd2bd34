#!/usr/bin/env bash
# actionsd's Connect protocol with nothing but curl: unary calls are plain
# HTTP POSTs of proto3 JSON. Needs ACTIONSD_ADDR (host:port of a running actionsd).
set -euo pipefail

: "${ACTIONSD_ADDR:?set ACTIONSD_ADDR to the host:port of a running actionsd}"
service="http://$ACTIONSD_ADDR/flyteidl2.actions.ActionsService"
run="n$(od -An -N8 -tx1 /dev/urandom | tr -d ' \n')"   # unique run name, 17 bytes

# call METHOD JSON: POSTs JSON to METHOD; sets $code (HTTP status) and $body.
call() {
    local out
    out="$(curl -sS --max-time 10 -w '\n%{http_code}' \
        -H 'Content-Type: application/json' \
        -d "$2" "$service/$1")"
    code="${out##*$'\n'}"
    body="${out%$'\n'*}"
}

fail() {
    echo "FAIL: $*" >&2
    exit 1
}

# 1. Enqueue a root task: 200 with the empty EnqueueResponse, `{}`. The same
#    request by hand (run name r1, default port):
#      curl -sS -H 'Content-Type: application/json' \
#        -d '{"action":{"actionId":{"run":{"project":"p","domain":"d","name":"r1"},"name":"a0"},"inputUri":"s3://b/i","runOutputBase":"s3://b/o","task":{"id":{"project":"p","domain":"d","name":"t","version":"v1"}}}}' \
#        http://127.0.0.1:8091/flyteidl2.actions.ActionsService/Enqueue
call Enqueue '{"action":{"actionId":{"run":{"project":"p","domain":"d","name":"'"$run"'"},"name":"a0"},"inputUri":"s3://b/i","runOutputBase":"s3://b/o","task":{"id":{"project":"p","domain":"d","name":"t","version":"v1"}}}}'
[ "$code" = 200 ] || fail "Enqueue: HTTP $code, body $body"
[ "$body" = '{}' ] || fail "Enqueue: body $body, expected {}"
echo "ok - Enqueue of root task $run/a0: HTTP 200, body {}"

# 2. Update of an action that does not exist: HTTP 404 with a Connect error body.
call Update '{"actionId":{"run":{"project":"p","domain":"d","name":"'"$run"'"},"name":"missing"},"attempt":1,"status":{"phase":"ACTION_PHASE_RUNNING"}}'
[ "$code" = 404 ] || fail "Update of an unknown action: HTTP $code, expected 404; body $body"
[[ "$body" =~ ^\{\"code\":\"not_found\",\"message\":\"[^\"]+\"\}$ ]] \
    || fail "Update of an unknown action: body $body, expected {\"code\":\"not_found\",\"message\":...}"
echo "ok - Update of unknown action $run/missing: HTTP 404, body $body"

echo "2 passed, 0 failed"
