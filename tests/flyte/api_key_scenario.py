"""A Flyte program driven with the SDK's API key against an actionsd on the
default HTTPS port, 127.0.0.1:443 (run by test_auth.py inside a private
network namespace, where binding that port needs no privilege on the host).

Prints one JSON line: the SDK's exit status and output, the audit entries,
whether a secret reached a log, and the tails of the logs.
"""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from test_auth import CLIENT_ID, PROGRAMS, TIMEOUT, Secured, audit

DRIVER = """
import json, sys
from pathlib import Path
import flyte
ca, programs = sys.argv[1:3]
sys.path.insert(0, programs)
# The key comes from FLYTE_API_KEY.
flyte.init_from_api_key(
    project="flytesnacks", domain="development", root_dir=Path(programs),
    ca_cert_file_path=ca,
)
import nested
run = flyte.run(nested.main, x=4)
run.wait(quiet=True)
print(json.dumps({"name": run.name, "phase": str(run.phase), "output": run.outputs()[0]}))
"""


def main() -> None:
    secured = Secured(Path(tempfile.mkdtemp(dir=sys.argv[1])), listen="127.0.0.1:443")
    try:
        # HOST:client id:secret:org, with no port: the default HTTPS port.
        key = base64.b64encode(f"127.0.0.1:{CLIENT_ID}:{secured.secret}:".encode()).decode()
        # A private HOME: the SDK caches where it uploaded a code bundle in
        # ~/.flyte/local-cache, keyed by endpoint, project and domain. The
        # endpoint here is always 127.0.0.1, so a shared HOME would hand
        # this run the upload of an earlier scenario, whose blob store is
        # gone.
        home = Path(tempfile.mkdtemp(dir=sys.argv[1]))
        done = subprocess.run(
            [sys.executable, "-c", DRIVER, str(secured.ca), str(PROGRAMS)],
            capture_output=True, text=True, timeout=TIMEOUT,
            env={**os.environ, "HOME": str(home), "FLYTE_API_KEY": key,
                 "SSL_CERT_FILE": str(secured.ca)},
        )
        logs = secured.log.read_text() + secured.executor_log.read_text()
        print(json.dumps({
            "returncode": done.returncode,
            "stdout": done.stdout,
            "stderr": done.stderr[-4000:],
            "fields": [e.get("fields", e) for e in audit(secured)],
            "secret_logged": any(s in logs for s in secured.never_logged),
            "daemon": secured.log.read_text()[-8000:],
            "executor": secured.executor_log.read_text()[-8000:],
        }))
    finally:
        secured.stop()


if __name__ == "__main__":
    main()
