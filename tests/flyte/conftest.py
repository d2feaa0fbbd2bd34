"""Real Flyte programs on a real actionsd: the daemon and `actionsd executor
--flyte` run as processes, the programs (tests/flyte/programs) run unchanged
through the Flyte SDK, started with examples/flyte/submit.py.

Environment: ACTIONSD_BIN (the binary), ACTIONSD_STORE (the database URL;
an SQLite file by default). Every wait is bounded.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
PROGRAMS = HERE / "programs"
SUBMIT = ROOT / "examples" / "flyte" / "submit.py"
BIN = Path(os.environ.get("ACTIONSD_BIN", ROOT / "target" / "debug" / "actionsd"))
VENV_BIN = Path(sys.executable).parent

# Bound of every wait, in seconds.
TIMEOUT = 240.0


def wait_for_address(proc: subprocess.Popen, log: Path) -> str:
    """The address an actionsd process logs (JSON) once it listens."""
    deadline = time.monotonic() + 60
    while True:
        text = log.read_text()
        match = re.search(r'"address":"([0-9.:]+)"[^\n]*actionsd listening|actionsd listening[^\n]*"address":"([0-9.:]+)"', text)
        if match:
            return match.group(1) or match.group(2)
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"actionsd did not start:\n{text}")
        time.sleep(0.05)


class Daemon:
    def __init__(self, scratch: Path):
        self.scratch = scratch
        self.executors: list[subprocess.Popen] = []
        store = os.environ.get("ACTIONSD_STORE") or f"sqlite://{scratch}/actionsd.db"
        config = scratch / "actionsd.toml"
        # Short leases, so that a killed executor's actions come back soon (but
        # long enough for heartbeats on a busy machine).
        config.write_text('[executor]\nlease_ttl = "8s"\nreaper_interval = "200ms"\n')
        self.log = scratch / "actionsd.log"
        self.proc = subprocess.Popen(
            [str(BIN), "serve", "--listen", "127.0.0.1:0", "--config", str(config),
             "--database-url", store, "--log-format", "json"],
            stdout=open(self.log, "w"), stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + 60
        self.address = None
        while self.address is None:
            text = self.log.read_text()
            match = re.search(r'"address":"([0-9.:]+)"[^\n]*actionsd listening|actionsd listening[^\n]*"address":"([0-9.:]+)"', text)
            if match:
                self.address = match.group(1) or match.group(2)
                break
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"actionsd did not start:\n{text}")
            time.sleep(0.05)
        self.server = f"http://{self.address}"

    def executor(self, queue: str, capacity: int, *extra: str) -> subprocess.Popen:
        name = f"{queue}-{len(self.executors)}"
        log = open(self.scratch / f"executor-{name}.log", "w")
        proc = subprocess.Popen(
            [str(BIN), "executor", "--flyte", "--server", self.server, "--queue", queue,
             "--capacity", str(capacity), "--executor-id", name,
             "--flyte-bin", str(VENV_BIN), "--workdir", str(PROGRAMS),
             "--scratch-dir", str(self.scratch / name), "--kill-grace", "500ms",
             "--heartbeat-interval", "1s", *extra],
            stdout=log, stderr=subprocess.STDOUT,
        )
        self.executors.append(proc)
        return proc

    def stop(self) -> None:
        for proc in [*self.executors, self.proc]:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in [*self.executors, self.proc]:
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


@pytest.fixture(scope="session", autouse=True)
def private_home(tmp_path_factory):
    """Every process the suite starts (the SDK, the executors, the tasks)
    gets a new HOME: the SDK caches where it uploaded a code bundle in
    ~/.flyte/local-cache, keyed by endpoint, and a port of an earlier
    session's daemon (whose blob store is gone) may come round again."""
    home = tmp_path_factory.mktemp("home")
    previous = os.environ.get("HOME")
    os.environ["HOME"] = str(home)
    yield home
    if previous is None:
        os.environ.pop("HOME", None)
    else:
        os.environ["HOME"] = previous


@pytest.fixture(scope="session")
def daemon(tmp_path_factory, private_home):
    d = Daemon(tmp_path_factory.mktemp("actionsd"))
    # Wide: the default queue, four at a time. Narrow: one at a time, for
    # nesting deeper than the capacity.
    d.executor("default", 4)
    d.executor("narrow", 1)
    yield d
    d.stop()


class Submitted:
    def __init__(self, proc: subprocess.Popen, started: float):
        self.proc = proc
        self.started = started

    def result(self) -> tuple[int, str, str]:
        out, err = self.proc.communicate(timeout=TIMEOUT)
        return self.proc.returncode, out.strip(), err.strip()


def submit(daemon: Daemon, program: str, task: str, *args: str, env: dict | None = None) -> Submitted:
    """Starts examples/flyte/submit.py; `.result()` waits for it."""
    command = [sys.executable, str(SUBMIT), str(PROGRAMS / program), task,
               "--server", daemon.server, "--storage", str(daemon.scratch / "runs"),
               "--timeout", str(TIMEOUT), *args]
    for key, value in (env or {}).items():
        command += ["--env", f"{key}={value}"]
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    return Submitted(proc, time.monotonic())


def alive(pid: int) -> bool:
    """Whether a process exists and is not a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"
