#!/usr/bin/env python3
"""Flyte fan-out on actionsd against bare Python start-up, in one run.

    bench/flyte/fanout.py [--children 50] [--capacity 4] [--actionsd target/release/actionsd]

Starts actionsd (SQLite, loopback, port 0) and `actionsd executor --flyte`,
runs tests/flyte/programs/fanout.py `main(n)` through
examples/flyte/submit.py, and measures in the same run `n` bare starts of
`python -c 'import flyte'`, `capacity` at a time. Prints one line:

    flyte fan-out n=50 capacity=4: wall 31.2 s; bare import-flyte floor 29.8 s (50 x 2.38 s / 4); overhead 1.05x; lease->spawn p50 0.4 ms p99 1.9 ms

Lease->spawn latency is the executor's own `spawn_latency_us` for every
task of the run: from the lease's arrival at the executor to the process's
start, which includes decoding the TaskSpec, the RUNNING Update round trip,
creating the log file and fork/exec. Run it
with the Python of an environment where flyte is installed (tests/flyte/.venv).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--children", type=int, default=50)
    parser.add_argument("--capacity", type=int, default=4)
    parser.add_argument("--actionsd", default=str(ROOT / "target" / "release" / "actionsd"))
    args = parser.parse_args()
    n, capacity = args.children, args.capacity
    scratch = Path(tempfile.mkdtemp(prefix="actionsd-flyte-bench-"))
    daemon_log = scratch / "actionsd.log"
    daemon = subprocess.Popen(
        [args.actionsd, "serve", "--listen", "127.0.0.1:0", "--database-url",
         f"sqlite://{scratch}/db.sqlite", "--log-format", "json"],
        stdout=open(daemon_log, "w"), stderr=subprocess.STDOUT)
    executor = None
    try:
        deadline = time.monotonic() + 30
        address = None
        while address is None and time.monotonic() < deadline:
            m = re.search(r'"address":"([0-9.:]+)"', daemon_log.read_text())
            address = m.group(1) if m else time.sleep(0.05)
        if address is None:
            raise SystemExit("actionsd did not start")
        server = f"http://{address}"
        executor_log = scratch / "executor.log"
        executor = subprocess.Popen(
            [args.actionsd, "executor", "--flyte", "--server", server, "--capacity", str(capacity),
             "--flyte-bin", str(Path(sys.executable).parent), "--workdir", str(ROOT / "tests/flyte/programs"),
             "--scratch-dir", str(scratch / "x"), "--log-format", "json"],
            stdout=open(executor_log, "w"), stderr=subprocess.STDOUT)

        started = time.monotonic()
        result = subprocess.run(
            [sys.executable, str(ROOT / "examples/flyte/submit.py"), str(ROOT / "tests/flyte/programs/fanout.py"),
             "main", "--input", f"n={n}", "--server", server, "--storage", str(scratch / "runs"), "--timeout", "900"],
            capture_output=True, text=True, timeout=960)
        wall = time.monotonic() - started
        expected = sum(i * i for i in range(n))
        if result.returncode != 0 or json.loads(result.stdout) != expected:
            raise SystemExit(f"the run failed: {result.stdout} {result.stderr}")

        def bare(_):
            t = time.monotonic()
            subprocess.run([sys.executable, "-c", "import flyte"], check=True, timeout=120)
            return time.monotonic() - t

        floor_started = time.monotonic()
        with concurrent.futures.ThreadPoolExecutor(capacity) as pool:
            starts = list(pool.map(bare, range(n)))
        floor = time.monotonic() - floor_started
        mean = sum(starts) / len(starts)

        latencies = sorted(
            json.loads(line)["spawn_latency_us"] / 1000.0
            for line in executor_log.read_text().splitlines()
            if "spawn_latency_us" in line)
        pct = lambda q: latencies[min(len(latencies) - 1, int(q * len(latencies)))]
        print(f"flyte fan-out n={n} capacity={capacity}: wall {wall:.1f} s; "
              f"bare import-flyte floor {floor:.1f} s ({n} x {mean:.2f} s / {capacity}); "
              f"overhead {wall / floor:.2f}x; lease->spawn p50 {pct(0.5):.1f} ms p99 {pct(0.99):.1f} ms "
              f"({len(latencies)} tasks)")
        return 0
    finally:
        for proc in (executor, daemon):
            if proc is not None and proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    proc.kill()
        shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
