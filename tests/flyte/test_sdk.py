"""The Flyte SDK's own entry points on actionsd: the `flyte` CLI (`run`,
`run --follow`, `get run`, `get io`, `abort run`) and the Python API
(`flyte.run`, `wait`, `outputs`, `Run.get`, `Run.listall`, `abort`).

On SQLite they run against `actionsd dev` (the daemon with the Flyte
executor in-process); with ACTIONSD_STORE set (Postgres) against
`actionsd serve` with a separate `actionsd executor --flyte` (the `daemon`
fixture of conftest.py).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import BIN, PROGRAMS, TIMEOUT, VENV_BIN, wait_for_address

FLYTE = str(VENV_BIN / "flyte")
ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]|\x1b\]8;[^\x1b]*\x1b\\")
RUN_NAME = re.compile(r"Created Run: (r[a-z0-9]{19})")


def write_config(path: Path, address: str) -> Path:
    path.write_text(
        f"admin:\n  endpoint: dns:///{address}\n  insecure: true\n"
        "task:\n  project: flytesnacks\n  domain: development\n"
    )
    return path


class Target:
    """A daemon the SDK talks to, and the flyte config that points at it."""

    def __init__(self, address: str, config: Path):
        self.address = address
        self.config = config

    def flyte(self, *args: str, cwd: Path = PROGRAMS, check: bool = True) -> str:
        # Unbuffered: the CLI can exit with its last output still in a
        # pipe buffer, which a terminal (line-buffered) never shows.
        env = {**os.environ, "NO_COLOR": "1", "COLUMNS": "200", "PYTHONUNBUFFERED": "1"}
        done = subprocess.run(
            [FLYTE, "--config", str(self.config), *args],
            cwd=cwd, env=env, capture_output=True, text=True, timeout=TIMEOUT,
        )
        out = ANSI.sub("", done.stdout + done.stderr)
        if check:
            assert done.returncode == 0, out
        return out


@pytest.fixture(scope="session")
def target(request, tmp_path_factory):
    scratch = tmp_path_factory.mktemp("sdk")
    if os.environ.get("ACTIONSD_STORE"):
        daemon = request.getfixturevalue("daemon")
        yield Target(daemon.address, write_config(scratch / "flyte.yaml", daemon.address))
        return
    # `actionsd dev`, as a user starts it, on a fresh SQLite file.
    config = scratch / "flyte.yaml"
    log = scratch / "dev.log"
    proc = subprocess.Popen(
        [str(BIN), "dev", "--listen", "127.0.0.1:0", "--log-format", "json",
         "--database-url", f"sqlite://{scratch}/actionsd.db",
         "--flyte-bin", str(VENV_BIN), "--flyte-config", str(config)],
        stdout=open(log, "w"), stderr=subprocess.STDOUT,
    )
    try:
        address = wait_for_address(proc, log)
        # `dev` says how to reach it, and wrote the config it names.
        deadline = time.monotonic() + 10
        while f"flyte --config {config} run" not in log.read_text():
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.05)
        assert f"endpoint: dns:///{address}" in config.read_text()
        yield Target(address, config)
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def run_name(out: str) -> str:
    match = RUN_NAME.search(out)
    assert match, out
    return match.group(1)


def test_cli_run_follow_prints_the_tasks_own_lines_then_get_io(target):
    # Three children: every line fits the CLI's 30-line log view (off a
    # terminal it prints that view once, at the end).
    out = target.flyte("run", "--follow", "logged.py", "main", "--n", "3")
    name = run_name(out)
    assert "fanning out over 3 children" in out, out
    assert "the total is 5" in out, out
    io = target.flyte("get", "io", name)
    assert "'n': 3" in io and "o0=5" in io, io
    details = target.flyte("get", "run", name)
    assert "ACTION_PHASE_SUCCEEDED" in details, details


def test_a_failing_run_shows_the_users_error(target, sdk):
    out = target.flyte("run", "failing.py", "main", "--x", "7")
    name = run_name(out)
    import flyte.remote as remote

    remote.Run.get(name).wait(quiet=True)
    assert "FAILED" in str(remote.Run.get(name).phase).upper()
    details = target.flyte("get", "run", name)
    assert "the child refuses 7" in details, details


def test_python_api_run_wait_outputs_get_listall_abort(target, sdk):
    import fanout
    import slow

    import flyte
    import flyte.remote as remote

    run = flyte.run(fanout.main, n=6)
    run.wait(quiet=True)
    assert run.outputs()[0] == 55
    again = remote.Run.get(run.name)
    assert "SUCCEEDED" in str(again.phase).upper()
    assert run.name in [r.name for r in remote.Run.listall(limit=100)]

    sleeping = flyte.run(slow.pause, seconds=60.0)
    deadline = time.monotonic() + TIMEOUT
    while "RUNNING" not in str(remote.Run.get(sleeping.name).phase).upper():
        assert time.monotonic() < deadline
        time.sleep(0.2)
    sleeping.abort()
    sleeping.wait(quiet=True)
    assert "ABORTED" in str(remote.Run.get(sleeping.name).phase).upper()


def test_cli_abort_run(target, sdk):
    out = target.flyte("run", "slow.py", "pause", "--seconds", "60")
    name = run_name(out)
    aborted = target.flyte("abort", "run", name)
    assert "aborted" in aborted, aborted
    import flyte.remote as remote

    remote.Run.get(name).wait(quiet=True)
    assert "ABORTED" in str(remote.Run.get(name).phase).upper()


def test_copy_style_none_runs_code_from_the_executors_directory(daemon, tmp_path):
    # No code bundle: the executor's tasks import the program from their
    # working directory (`actionsd executor --flyte --workdir`).
    cli = Target(daemon.address, write_config(tmp_path / "flyte.yaml", daemon.address))
    out = cli.flyte("run", "--copy-style", "none", "--version", "v1", "--follow", "logged.py", "main", "--n", "3")
    assert "Code bundle" not in out or "skipping" in out, out
    name = run_name(out)
    assert "the total is 5" in out, out
    io = cli.flyte("get", "io", name)
    assert "o0=5" in io, io


@pytest.fixture(scope="session")
def sdk(target):
    """The Python SDK initialised against the target, programs importable."""
    import flyte

    sys.path.insert(0, str(PROGRAMS))
    flyte.init(
        endpoint=f"dns:///{target.address}", insecure=True,
        project="flytesnacks", domain="development", root_dir=PROGRAMS,
    )
    return flyte


@pytest.fixture(scope="session")
def s3(tmp_path_factory):
    """A local S3-compatible server (moto) with an empty bucket."""
    import socket

    import boto3

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    scratch = tmp_path_factory.mktemp("s3")
    proc = subprocess.Popen(
        [str(VENV_BIN / "moto_server"), "-H", "127.0.0.1", "-p", str(port)],
        stdout=open(scratch / "moto.log", "w"), stderr=subprocess.STDOUT,
    )
    endpoint = f"http://127.0.0.1:{port}"
    client = boto3.client(
        "s3", endpoint_url=endpoint, region_name="us-east-1",
        aws_access_key_id="test", aws_secret_access_key="test",
    )
    deadline = time.monotonic() + 60
    while True:
        try:
            client.create_bucket(Bucket="actionsd")
            break
        except Exception:
            assert proc.poll() is None and time.monotonic() < deadline, (scratch / "moto.log").read_text()
            time.sleep(0.2)
    yield endpoint, client
    proc.terminate()
    proc.wait(timeout=30)


def test_a_run_on_the_s3_compatible_store(s3, tmp_path):
    endpoint, client = s3
    config = tmp_path / "actionsd.toml"
    config.write_text(
        '[blobs]\nurl = "s3://actionsd/blobs"\n'
        f's3_endpoint = "{endpoint}"\ns3_region = "us-east-1"\n'
        's3_access_key_id = "test"\ns3_secret_access_key = "test"\n'
        's3_allow_http = true\nsigning_key = "a-test-signing-key"\n'
    )
    log = tmp_path / "dev.log"
    flyte_config = tmp_path / "flyte.yaml"
    proc = subprocess.Popen(
        [str(BIN), "dev", "--config", str(config), "--listen", "127.0.0.1:0",
         "--log-format", "json", "--database-url", f"sqlite://{tmp_path}/actionsd.db",
         "--flyte-bin", str(VENV_BIN), "--flyte-config", str(flyte_config)],
        stdout=open(log, "w"), stderr=subprocess.STDOUT,
    )
    try:
        address = wait_for_address(proc, log)
        cli = Target(address, write_config(tmp_path / "cli.yaml", address))
        out = cli.flyte("run", "--follow", "logged.py", "main", "--n", "3")
        name = run_name(out)
        assert "the total is 5" in out, out
        io = cli.flyte("get", "io", name)
        assert "o0=5" in io, io
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    # Everything went to the bucket: the code bundle, the inputs, the
    # outputs the tasks wrote and the shipped logs; nothing to local disk.
    keys = [o["Key"] for o in client.list_objects_v2(Bucket="actionsd").get("Contents", [])]
    for prefix in ("blobs/uploads/", "blobs/inputs/", f"blobs/logs/127/flytesnacks/development/{name}/a0/1/"):
        assert any(k.startswith(prefix) for k in keys), (prefix, keys)
    assert f"blobs/runs/127/flytesnacks/development/{name}/a0/1/outputs.pb" in keys, keys
    assert not (tmp_path / "blobs").exists()
