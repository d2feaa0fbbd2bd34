"""The Flyte SDK against an actionsd that requires authentication (over
TLS: flyte 2.12.1 sends credentials only on a TLS channel).

The SDK authenticates with a client of `[[auth.clients]]` through its own
client-credentials flow (AuthMetadataService, then the token endpoint); the
executor with a static token of role `executor`; each task process with the
run-scoped credential the daemon minted for its lease, with which the
parent task enqueues and watches its children.
"""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import BIN, PROGRAMS, TIMEOUT, VENV_BIN, wait_for_address

CLIENT_ID = "sdk"


def hash_secret(secret: str, *flags: str) -> str:
    done = subprocess.run(
        [str(BIN), "hash-secret", *flags], input=secret + "\n",
        capture_output=True, text=True, timeout=60, check=True,
    )
    return done.stdout.strip()


class Secured:
    def __init__(self, scratch: Path, listen: str = "127.0.0.1:0"):
        self.scratch = scratch
        # A CA, and a server certificate for 127.0.0.1 that it signs.
        self.ca = scratch / "ca.pem"
        cert, key = scratch / "server.pem", scratch / "server.key"
        ext = scratch / "server.ext"
        ext.write_text("subjectAltName=IP:127.0.0.1\nextendedKeyUsage=serverAuth\n")
        for command in (
            ["req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
             "-days", "1", "-subj", "/CN=test CA", "-keyout", str(scratch / "ca.key"), "-out", str(self.ca)],
            ["req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
             "-subj", "/CN=actionsd", "-keyout", str(key), "-out", str(scratch / "server.csr")],
            ["x509", "-req", "-in", str(scratch / "server.csr"), "-CA", str(self.ca),
             "-CAkey", str(scratch / "ca.key"), "-CAcreateserial", "-days", "1",
             "-extfile", str(ext), "-out", str(cert)],
        ):
            subprocess.run(["openssl", *command], check=True, capture_output=True, timeout=60)
        self.secret = secrets.token_urlsafe(24)
        self.executor_token = secrets.token_urlsafe(24)
        signing_key = secrets.token_urlsafe(40)
        self.never_logged = [self.secret, self.executor_token, signing_key]
        config = scratch / "actionsd.toml"
        config.write_text(
            '[executor]\nlease_ttl = "8s"\nreaper_interval = "200ms"\n'
            f'[tls]\ncert = "{cert}"\nkey = "{key}"\n'
            f'[auth]\nsigning_key = "{signing_key}"\n'
            '[[auth.tokens]]\nname = "executors"\n'
            f'sha256 = "{hash_secret(self.executor_token, "--sha256")}"\n'
            'role = "executor"\nqueues = ["default"]\n'
            f'[[auth.clients]]\nclient_id = "{CLIENT_ID}"\n'
            f'secret_hash = "{hash_secret(self.secret)}"\n'
            'role = "user"\nprojects = ["flytesnacks"]\n'
        )
        # Its own SQLite file even in the Postgres pass: the session
        # daemon's executors (no credentials) lease the queue `default` of
        # the shared Postgres database.
        store = f"sqlite://{scratch}/actionsd.db"
        self.log = scratch / "actionsd.log"
        self.proc = subprocess.Popen(
            [str(BIN), "serve", "--listen", listen, "--config", str(config),
             "--database-url", store, "--log-format", "json"],
            stdout=open(self.log, "w"), stderr=subprocess.STDOUT,
        )
        self.address = wait_for_address(self.proc, self.log)
        # On the default HTTPS port the URL has no port: the executor then
        # hands each task its credential as the SDK's in-task API key.
        server = "https://127.0.0.1" if self.address == "127.0.0.1:443" else f"https://{self.address}"
        self.executor_log = scratch / "executor.log"
        self.executor = subprocess.Popen(
            [str(BIN), "executor", "--flyte", "--server", server,
             "--ca-cert", str(self.ca), "--queue", "default", "--capacity", "4",
             "--executor-id", "secured", "--flyte-bin", str(VENV_BIN),
             "--scratch-dir", str(scratch / "work"), "--kill-grace", "500ms",
             "--heartbeat-interval", "1s"],
            stdout=open(self.executor_log, "w"), stderr=subprocess.STDOUT,
            env={**os.environ, "ACTIONSD_TOKEN": self.executor_token},
        )

    def stop(self) -> None:
        for proc in (self.executor, self.proc):
            if proc.poll() is None:
                proc.terminate()
        for proc in (self.executor, self.proc):
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


@pytest.fixture(scope="module")
def secured(tmp_path_factory):
    s = Secured(tmp_path_factory.mktemp("secured"))
    yield s
    s.stop()


DRIVER = """
import json, sys
from pathlib import Path
import flyte
address, ca, secret, programs = sys.argv[1:5]
sys.path.insert(0, programs)
flyte.init(
    endpoint=f"dns:///{address}", auth_type="ClientSecret", client_id="sdk",
    client_credentials_secret=secret, ca_cert_file_path=ca,
    project="flytesnacks", domain="development", root_dir=Path(programs),
)
import nested
run = flyte.run(nested.main, x=4)
run.wait(quiet=True)
print(json.dumps({"name": run.name, "phase": str(run.phase), "output": run.outputs()[0]}))
"""


def drive(secured: Secured, secret: str) -> subprocess.CompletedProcess:
    # ca_cert_file_path covers the SDK's RPCs; its token request (httpx)
    # trusts SSL_CERT_FILE.
    return subprocess.run(
        [sys.executable, "-c", DRIVER, secured.address, str(secured.ca), secret, str(PROGRAMS)],
        capture_output=True, text=True, timeout=TIMEOUT,
        env={**os.environ, "SSL_CERT_FILE": str(secured.ca)},
    )


def audit(secured: Secured) -> list[dict]:
    lines = []
    for line in secured.log.read_text().splitlines():
        try:
            entry = json.loads(line)
        except ValueError:
            continue
        if entry.get("target") == "actionsd::audit":
            lines.append(entry)
    return lines


def test_a_whole_program_with_client_credentials_and_run_scoped_task_credentials(secured):
    done = drive(secured, secured.secret)
    assert done.returncode == 0, (
        f"{done.stdout}\n{done.stderr}\n--- daemon\n{secured.log.read_text()[-6000:]}"
        f"\n--- executor\n{secured.executor_log.read_text()[-6000:]}"
    )
    result = json.loads(done.stdout.strip().splitlines()[-1])
    # main(4) = leaf(4) * 10 + 5
    assert result["output"] == 55, result
    entries = audit(secured)
    fields = [e.get("fields", e) for e in entries]
    # The SDK's client created the run ...
    assert any(f.get("principal") == CLIENT_ID and f.get("rpc") == "CreateRun" and f.get("result") == "OK"
               for f in fields), fields
    # ... and the parent tasks enqueued their children with their own
    # run-scoped credentials.
    task_enqueues = [f for f in fields
                     if str(f.get("principal", "")).startswith("task:") and f.get("rpc") == "Enqueue"]
    assert task_enqueues and all(f.get("result") == "OK" for f in task_enqueues), fields
    assert all(result["name"] in f["principal"] for f in task_enqueues), task_enqueues
    # No secret reached the logs.
    logs = secured.log.read_text() + secured.executor_log.read_text()
    for secret in secured.never_logged:
        assert secret not in logs


def test_a_wrong_client_secret_is_refused(secured):
    done = drive(secured, "not-the-secret")
    assert done.returncode != 0
    assert "AuthenticationError" in done.stderr, done.stderr[-3000:]


def test_an_api_key_reaches_a_daemon_on_the_default_https_port(tmp_path):
    """FLYTE_API_KEY, and the in-task `_UNION_EAGER_API_KEY` the executor
    hands each task, end to end. The SDK's API key is base64 of
    `HOST:client id:secret:org`, split at colons, so it names no port and
    reaches only a daemon on the default HTTPS port. The scenario
    (api_key_scenario.py) runs in a private network namespace (`unshare`: a
    user namespace mapping the caller to root, with its own loopback), where
    binding 127.0.0.1:443 needs no privilege on the host and touches
    nothing outside."""
    here = Path(__file__).resolve().parent
    done = subprocess.run(
        ["unshare", "--user", "--map-root-user", "--net", "sh", "-c",
         'ip link set lo up && cd "$2" && exec "$0" api_key_scenario.py "$1"',
         sys.executable, str(tmp_path), str(here)],
        capture_output=True, text=True, timeout=TIMEOUT + 60,
    )
    assert done.returncode == 0, f"{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report["returncode"] == 0, (
        f"{report['stdout']}\n{report['stderr']}\n--- daemon\n{report['daemon']}"
        f"\n--- executor\n{report['executor']}"
    )
    result = json.loads(report["stdout"].strip().splitlines()[-1])
    # main(4) = leaf(4) * 10 + 5
    assert result["output"] == 55, (
        f"{result}\n--- daemon\n{report['daemon']}\n--- executor\n{report['executor']}"
    )
    fields = report["fields"]
    # The API key's client created the run ...
    assert any(f.get("principal") == CLIENT_ID and f.get("rpc") == "CreateRun" and f.get("result") == "OK"
               for f in fields), fields
    # ... and the parent tasks enqueued their children with the in-task API
    # key: their run-scoped credential.
    task_enqueues = [f for f in fields
                     if str(f.get("principal", "")).startswith("task:") and f.get("rpc") == "Enqueue"]
    assert task_enqueues and all(f.get("result") == "OK" for f in task_enqueues), fields
    assert all(result["name"] in f["principal"] for f in task_enqueues), task_enqueues
    assert not report["secret_logged"]
