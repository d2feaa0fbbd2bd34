"""Flyte v2 programs, run whole by the Flyte SDK on actionsd.

Each program runs under the SDK's Python controller and its Rust
controller (`_F_USE_RUST_CONTROLLER=1`). All of them are submitted
together and checked one by one.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid

import pytest
from flyteidl2.actions import actions_service_pb2 as actions_pb2
from flyteidl2.actions.actions_service_connect import ActionsServiceClient
from flyteidl2.common import identifier_pb2

from conftest import TIMEOUT, alive, submit

CONTROLLERS = {"python": {}, "rust": {"_F_USE_RUST_CONTROLLER": "1"}}


@pytest.fixture(scope="session")
def all_runs(daemon):
    """Every program under both controllers, submitted at once."""
    started = {}
    for controller, env in CONTROLLERS.items():
        marker = daemon.scratch / f"flaky-{uuid.uuid4().hex}"
        programs = {
            "fanout": ("fanout.py", "main", "--input", "n=10"),
            # Three levels deep on the queue whose executor runs one task at a time.
            "nested": ("nested.py", "main", "--input", "x=4", "--queue", "narrow"),
            "failing": ("failing.py", "main", "--input", "x=7"),
            "flaky": ("flaky.py", "main", "--input", f"marker={marker}"),
            "timeout": ("slow.py", "too_slow", "--input", "x=1"),
            "io": ("files.py", "main", "--input", "x=21"),
        }
        for name, args in programs.items():
            started[(controller, name)] = submit(daemon, *args, env=env)
    return {key: s.result() for key, s in started.items()}


@pytest.fixture(params=list(CONTROLLERS))
def runs(request, all_runs):
    return {name: result for (controller, name), result in all_runs.items() if controller == request.param}


def test_fan_out_sums_ten_squares(runs):
    status, out, err = runs["fanout"]
    assert status == 0, err
    assert json.loads(out) == 285


def test_nesting_three_deep_finishes_under_capacity_one(runs):
    status, out, err = runs["nested"]
    assert status == 0, err
    assert json.loads(out) == (4 + 1) * 10 + 5


def test_a_failing_child_fails_the_root_with_its_message(runs):
    status, out, err = runs["failing"]
    assert status == 1, out
    assert "failed" in err
    assert "the child refuses 7" in err


def test_a_recoverable_failure_is_retried_as_attempt_two(runs):
    status, out, err = runs["flaky"]
    assert status == 0, err
    assert json.loads(out) == "second attempt succeeded"


def test_a_task_past_its_timeout_is_timed_out(runs):
    status, out, err = runs["timeout"]
    assert status == 1, out
    assert "timed_out" in err
    assert "Timeout" in err


def test_a_trace_and_a_file_pass_between_tasks(runs):
    status, out, err = runs["io"]
    assert status == 0, err
    assert json.loads(out) == "value 42"


def test_abort_stops_every_task_process_within_a_second(daemon):
    pids = daemon.scratch / f"pids-{uuid.uuid4().hex}"
    run = f"abort{uuid.uuid4().hex[:12]}"
    submitted = submit(daemon, "slow.py", "sleepy_parent", "--input", f"pids={pids}", "--input", "n=3",
                       "--run", run, "--no-wait")
    status, _, err = submitted.result()
    assert status == 0, err
    # The parent and its three children are running.
    deadline = time.monotonic() + TIMEOUT
    while not (pids.exists() and len(list(pids.iterdir())) == 4):
        assert time.monotonic() < deadline, "the tasks did not all start"
        time.sleep(0.1)
    running = [int(p.name) for p in pids.iterdir()]
    assert all(alive(pid) for pid in running)

    async def abort():
        client = ActionsServiceClient(daemon.server)
        run_id = identifier_pb2.RunIdentifier(project="flytesnacks", domain="development", name=run)
        await client.abort(actions_pb2.AbortRequest(
            action_id=identifier_pb2.ActionIdentifier(run=run_id, name="a0"), reason="test abort"))

    asyncio.run(abort())
    aborted = time.monotonic()
    while any(alive(pid) for pid in running):
        assert time.monotonic() - aborted < 1.0, [pid for pid in running if alive(pid)]
        time.sleep(0.02)


def test_a_run_survives_kill_9_of_its_executor(daemon):
    first = daemon.executor("fragile", 4)
    submitted = submit(daemon, "slow.py", "survivor", "--input", "n=2", "--input", "seconds=3.0",
                       "--queue", "fragile")
    # Once the parent and both children run, kill the executor outright.
    log = daemon.scratch / f"executor-fragile-{len(daemon.executors) - 1}.log"
    deadline = time.monotonic() + TIMEOUT
    while log.read_text().count("process started") < 3:
        assert time.monotonic() < deadline, "the tasks did not start"
        assert submitted.proc.poll() is None, submitted.result()
        time.sleep(0.1)
    first.kill()
    first.wait()
    daemon.executor("fragile", 4)
    status, out, err = submitted.result()
    assert status == 0, err
    assert json.loads(out) == 6.0
