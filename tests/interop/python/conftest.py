"""Shared helpers of the Python interop suites.

Every message is built with the official `flyteidl2` classes. All tests share
one actionsd (at ACTIONSD_ADDR) and one database, so each test works in its
own run (`new_run()`). Every wait is bounded by TIMEOUT.
"""

from __future__ import annotations

import asyncio
import inspect
import os
import queue
import threading
import uuid

import grpc
import pytest
from connectrpc.errors import ConnectError
from flyteidl2.actions import actions_service_pb2 as actions_pb2
from flyteidl2.common import identifier_pb2, identity_pb2, phase_pb2
from flyteidl2.core import identifier_pb2 as core_identifier_pb2
from flyteidl2.core import interface_pb2, literals_pb2, tasks_pb2, types_pb2
from flyteidl2.task import common_pb2 as task_common_pb2
from flyteidl2.task import environment_pb2, task_definition_pb2
from flyteidl2.workflow import run_definition_pb2
from google.protobuf import duration_pb2, struct_pb2, wrappers_pb2

# Bound of every wait, in seconds.
TIMEOUT = 20.0

PROJECT = "flytesnacks"
DOMAIN = "development"

QUEUED = phase_pb2.ACTION_PHASE_QUEUED
INITIALIZING = phase_pb2.ACTION_PHASE_INITIALIZING
RUNNING = phase_pb2.ACTION_PHASE_RUNNING
SUCCEEDED = phase_pb2.ACTION_PHASE_SUCCEEDED
FAILED = phase_pb2.ACTION_PHASE_FAILED
ABORTED = phase_pb2.ACTION_PHASE_ABORTED
PAUSED = phase_pb2.ACTION_PHASE_PAUSED


def phase_name(phase: int) -> str:
    return phase_pb2.ActionPhase.Name(phase)


# --------------------------------------------------------------------------
# The daemon under test
# --------------------------------------------------------------------------


@pytest.fixture(scope="session")
def address() -> str:
    """host:port of the actionsd under test."""
    value = os.environ.get("ACTIONSD_ADDR", "").strip()
    if not value:
        pytest.fail(
            "ACTIONSD_ADDR is not set: start actionsd and export its address "
            "(host:port), or run tests/interop/run.sh",
            pytrace=False,
        )
    return value


def pytest_pyfunc_call(pyfuncitem):
    """Runs `async def` tests on a fresh event loop."""
    if inspect.iscoroutinefunction(pyfuncitem.obj):
        arguments = {
            name: pyfuncitem.funcargs[name]
            for name in pyfuncitem._fixtureinfo.argnames
        }
        asyncio.run(pyfuncitem.obj(**arguments))
        return True
    return None


# --------------------------------------------------------------------------
# Identifiers and requests
# --------------------------------------------------------------------------


def new_run() -> str:
    """A run name of its own for one test (13 bytes; the limit is 30)."""
    return "r" + uuid.uuid4().hex[:12]


def run_identifier(run: str) -> identifier_pb2.RunIdentifier:
    return identifier_pb2.RunIdentifier(org="", project=PROJECT, domain=DOMAIN, name=run)


def action_identifier(run: str, name: str) -> identifier_pb2.ActionIdentifier:
    return identifier_pb2.ActionIdentifier(run=run_identifier(run), name=name)


def task_spec(name: str, image: str = "ghcr.io/flyteorg/flyte:py3.12-v2.0.0") -> task_definition_pb2.TaskSpec:
    """A TaskSpec the way the SDK fills it: template with container,
    interface and metadata, default inputs, environment, documentation."""
    integer = types_pb2.LiteralType(simple=types_pb2.INTEGER)
    string = types_pb2.LiteralType(simple=types_pb2.STRING)
    template = tasks_pb2.TaskTemplate(
        id=core_identifier_pb2.Identifier(
            resource_type=core_identifier_pb2.TASK,
            project=PROJECT,
            domain=DOMAIN,
            name=f"wf.{name}",
            version="v1",
        ),
        type="python",
        task_type_version=1,
        metadata=tasks_pb2.TaskMetadata(
            discoverable=True,
            runtime=tasks_pb2.RuntimeMetadata(
                type=tasks_pb2.RuntimeMetadata.FLYTE_SDK, version="2.0.0", flavor="python"
            ),
            timeout=duration_pb2.Duration(seconds=600),
            retries=literals_pb2.RetryStrategy(retries=3),
            discovery_version="1.0",
            interruptible=True,
            tags={"team": "ml"},
            generates_deck=wrappers_pb2.BoolValue(value=True),
        ),
        interface=interface_pb2.TypedInterface(
            inputs=interface_pb2.VariableMap(
                variables=[
                    interface_pb2.VariableEntry(
                        key="x", value=interface_pb2.Variable(type=integer, description="how many")
                    )
                ]
            ),
            outputs=interface_pb2.VariableMap(
                variables=[interface_pb2.VariableEntry(key="o0", value=interface_pb2.Variable(type=string))]
            ),
        ),
        custom=struct_pb2.Struct(fields={"resolver": struct_pb2.Value(string_value="flyte.resolver")}),
        container=tasks_pb2.Container(
            image=image,
            command=["python", "-m", "flyte._bin.runtime"],
            args=["--inputs", "{{.input}}", "--outputs-path", "{{.outputPrefix}}"],
            resources=tasks_pb2.Resources(
                requests=[
                    tasks_pb2.Resources.ResourceEntry(name=tasks_pb2.Resources.CPU, value="1"),
                    tasks_pb2.Resources.ResourceEntry(name=tasks_pb2.Resources.MEMORY, value="1Gi"),
                ],
                limits=[tasks_pb2.Resources.ResourceEntry(name=tasks_pb2.Resources.MEMORY, value="2Gi")],
            ),
            env=[literals_pb2.KeyValuePair(key="LOG_LEVEL", value="info")],
            architecture=tasks_pb2.Container.AMD64,
        ),
        config={"mode": "batch"},
    )
    return task_definition_pb2.TaskSpec(
        task_template=template,
        default_inputs=[
            task_common_pb2.NamedParameter(
                name="x",
                parameter=interface_pb2.Parameter(
                    var=interface_pb2.Variable(type=integer),
                    default=int_literal(3),
                ),
            )
        ],
        short_name=name,
        environment=environment_pb2.Environment(name="default", description="interop env"),
        documentation=task_definition_pb2.DocumentationEntity(short_description=f"the {name} task"),
    )


def _action(run: str, name: str, parent: str | None, **spec) -> actions_pb2.Action:
    return actions_pb2.Action(
        action_id=action_identifier(run, name),
        parent_action_name=parent,
        input_uri=f"s3://bucket/{run}/{name}/inputs.pb",
        run_output_base=f"s3://bucket/{run}",
        group="interop",
        subject="alice@example.com",
        **spec,
    )


def enqueue_task(
    run: str,
    name: str,
    parent: str | None = None,
    spec: task_definition_pb2.TaskSpec | None = None,
) -> actions_pb2.EnqueueRequest:
    """A task action; a root (no parent) carries a RunSpec."""
    task = run_definition_pb2.TaskAction(
        id=task_definition_pb2.TaskIdentifier(
            org="", project=PROJECT, domain=DOMAIN, name=f"wf.{name}", version="v1"
        ),
        spec=spec if spec is not None else task_spec(name),
        cache_key=wrappers_pb2.StringValue(value=f"cache-{name}"),
    )
    request = actions_pb2.EnqueueRequest(action=_action(run, name, parent, task=task))
    if parent is None:
        request.run_spec.queue = "interop"
        request.run_spec.labels.values["suite"] = "python"
    return request


def enqueue_condition(
    run: str, name: str, parent: str, simple: int = types_pb2.BOOLEAN
) -> actions_pb2.EnqueueRequest:
    """A condition action waiting for a value of type `simple`."""
    condition = run_definition_pb2.ConditionAction(
        name=name,
        type=types_pb2.LiteralType(simple=simple),
        prompt="Proceed?",
        description="approval gate",
        prompt_type=run_definition_pb2.CONDITION_PROMPT_TYPE_TEXT,
    )
    return actions_pb2.EnqueueRequest(action=_action(run, name, parent, condition=condition))


def update_request(run: str, name: str, phase: int, attempt: int = 1) -> actions_pb2.UpdateRequest:
    return actions_pb2.UpdateRequest(
        action_id=action_identifier(run, name),
        attempt=attempt,
        status=run_definition_pb2.ActionStatus(phase=phase, attempts=attempt),
    )


def abort_request(run: str, name: str, reason: str) -> actions_pb2.AbortRequest:
    return actions_pb2.AbortRequest(
        action_id=action_identifier(run, name),
        reason=reason,
        aborted_by=identity_pb2.EnrichedIdentity(
            user=identity_pb2.User(id=identifier_pb2.UserIdentifier(subject="operator"))
        ),
    )


def bool_literal(value: bool) -> literals_pb2.Literal:
    return literals_pb2.Literal(
        scalar=literals_pb2.Scalar(primitive=literals_pb2.Primitive(boolean=value))
    )


def int_literal(value: int) -> literals_pb2.Literal:
    return literals_pb2.Literal(
        scalar=literals_pb2.Scalar(primitive=literals_pb2.Primitive(integer=value))
    )


def signal_request(
    run: str, name: str, parent: str, value: literals_pb2.Literal
) -> actions_pb2.SignalRequest:
    return actions_pb2.SignalRequest(
        action_id=action_identifier(run, name),
        parent_action_name=parent,
        value=value,
        signalled_by=identity_pb2.EnrichedIdentity(
            user=identity_pb2.User(id=identifier_pb2.UserIdentifier(subject="approver"))
        ),
    )


def watch_request(run: str, name: str) -> actions_pb2.WatchForUpdatesRequest:
    return actions_pb2.WatchForUpdatesRequest(parent_action_id=action_identifier(run, name))


def sdk_headers(run: str, parent: str | None) -> dict[str, str]:
    """The headers the Flyte SDK sends on Enqueue, Abort and WatchForUpdates."""
    return {
        "x-actions-project": PROJECT,
        "x-actions-domain": DOMAIN,
        "x-actions-run": run,
        "x-actions-parent-action": parent or "",
        "x-request-id": str(uuid.uuid4()),
    }


# --------------------------------------------------------------------------
# WatchForUpdates streams
# --------------------------------------------------------------------------


class StreamEnded:
    """Put in a watcher's queue when its stream ends (error None: ended OK)."""

    def __init__(self, error: Exception | None):
        self.error = error


class StreamView:
    """What one WatchForUpdates stream delivered so far."""

    def __init__(self, run: str):
        self.run = run
        self.updates = []  # every ActionUpdate, in order
        self.phases: dict[str, int] = {}  # latest phase per action name
        self.sentinels = 0

    def record(self, item) -> bool:
        """Records one stream item; True for the sentinel. Raises the
        stream's error, or fails on a clean end or a second sentinel."""
        if isinstance(item, StreamEnded):
            if item.error is not None:
                raise item.error
            raise AssertionError("the stream ended with OK; actionsd never ends a stream cleanly")
        which = item.WhichOneof("message")
        if which == "control_message":
            assert item.control_message.sentinel, f"control message without sentinel: {item}"
            self.sentinels += 1
            assert self.sentinels == 1, "a second sentinel on one stream"
            return True
        assert which == "action_update", f"empty stream message: {item!r}"
        update = item.action_update
        assert update.action_id.run == run_identifier(self.run), update
        self.updates.append(update)
        self.phases[update.action_id.name] = update.phase
        return False

    def latest(self, name: str):
        return next(u for u in reversed(self.updates) if u.action_id.name == name)

    def reached(self, name: str, phase: int) -> bool:
        return self.phases.get(name) == phase


def _no_message() -> AssertionError:
    return AssertionError(f"no stream message within {TIMEOUT} s")


class GrpcWatcher(StreamView):
    """A WatchForUpdates stream over grpcio, read by a thread so that every
    wait is bounded. Use as a context manager; leaving cancels the call."""

    def __init__(self, stub, run: str, name: str, metadata=()):
        super().__init__(run)
        self._call = stub.WatchForUpdates(watch_request(run, name), metadata=tuple(metadata))
        self._items: queue.Queue = queue.Queue()
        self._thread = threading.Thread(target=self._pump, daemon=True)
        self._thread.start()

    def _pump(self):
        try:
            for message in self._call:
                self._items.put(message)
            self._items.put(StreamEnded(None))
        except grpc.RpcError as error:
            self._items.put(StreamEnded(error))

    def close(self):
        self._call.cancel()
        self._thread.join(TIMEOUT)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def next(self) -> bool:
        """Reads one message; True for the sentinel."""
        try:
            item = self._items.get(timeout=TIMEOUT)
        except queue.Empty:
            raise _no_message() from None
        return self.record(item)

    def snapshot(self) -> list:
        """The updates before the sentinel."""
        while not self.next():
            pass
        return list(self.updates)

    def until_phase(self, name: str, phase: int):
        """Reads until `name` is in `phase`; returns that update."""
        while not self.reached(name, phase):
            self.next()
        return self.latest(name)


class ConnectWatcher(StreamView):
    """A WatchForUpdates stream over connectrpc's async client, read by a
    task so that every wait is bounded. Use as an async context manager."""

    def __init__(self, client, run: str, name: str, headers: dict[str, str]):
        super().__init__(run)
        self._stream = client.watch_for_updates(watch_request(run, name), headers=headers)
        self._items: asyncio.Queue = asyncio.Queue()
        self._task = asyncio.get_running_loop().create_task(self._pump())

    async def _pump(self):
        try:
            async for message in self._stream:
                await self._items.put(message)
            await self._items.put(StreamEnded(None))
        except ConnectError as error:
            await self._items.put(StreamEnded(error))

    async def close(self):
        self._task.cancel()
        try:
            await asyncio.wait_for(self._task, TIMEOUT)
        except asyncio.CancelledError:
            pass

    async def __aenter__(self):
        return self

    async def __aexit__(self, *exc):
        await self.close()

    async def next(self) -> bool:
        try:
            item = await asyncio.wait_for(self._items.get(), TIMEOUT)
        except asyncio.TimeoutError:
            raise _no_message() from None
        return self.record(item)

    async def snapshot(self) -> list:
        while not await self.next():
            pass
        return list(self.updates)

    async def until_phase(self, name: str, phase: int):
        while not self.reached(name, phase):
            await self.next()
        return self.latest(name)


def assert_snapshot(updates, run: str, parent: str, phases: dict[str, int]):
    """A snapshot is the watched action first, then each direct child once,
    with the given phases."""
    names = [u.action_id.name for u in updates]
    assert names and names[0] == parent, f"the watched action comes first: {names}"
    assert sorted(names) == sorted(phases), f"one update per action: {names}"
    got = {u.action_id.name: u.phase for u in updates}
    assert got == phases, {n: phase_name(p) for n, p in got.items()}
    for update in updates:
        assert update.action_id == action_identifier(run, update.action_id.name)
