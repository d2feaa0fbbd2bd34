"""actionsd through the official Connect stubs of `flyteidl2` (connectrpc's
async client, the one the Flyte SDK's remote controller uses).

Each test runs in two modes:
- proto: binary protobuf over HTTP/1.1, requests gzip-compressed and gzip
  accepted for responses — the SDK's defaults;
- json: JSON over cleartext HTTP/2 (h2c), uncompressed requests
  (`content-encoding: identity`) and uncompressed responses asked for.

Enqueue, Abort and WatchForUpdates carry the headers the SDK sends
(`x-actions-*`, `x-request-id`). UNAVAILABLE is not triggered here: these
tests share one running daemon and database (the Rust suite covers it).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import pyqwest
import pytest
from connectrpc.code import Code
from connectrpc.codec import Codec, proto_binary_codec, proto_json_codec
from connectrpc.compression import Compression
from connectrpc.compression.gzip import GzipCompression
from connectrpc.errors import ConnectError
from flyteidl2.actions import actions_service_pb2 as actions_pb2
from flyteidl2.actions.actions_service_connect import ActionsServiceClient
from flyteidl2.core import execution_pb2, types_pb2

from conftest import (
    ABORTED,
    PAUSED,
    QUEUED,
    RUNNING,
    SUCCEEDED,
    TIMEOUT,
    ConnectWatcher,
    abort_request,
    action_identifier,
    assert_snapshot,
    bool_literal,
    enqueue_condition,
    enqueue_task,
    int_literal,
    new_run,
    sdk_headers,
    signal_request,
    update_request,
)

TIMEOUT_MS = int(TIMEOUT * 1000)


@dataclass(frozen=True)
class Mode:
    name: str
    codec: Codec
    send_compression: Compression | None
    # None: connectrpc's default (gzip); empty: identity only.
    accept_compression: tuple[Compression, ...] | None
    http_version: pyqwest.HTTPVersion


MODES = [
    Mode("proto", proto_binary_codec(), GzipCompression(), None, pyqwest.HTTPVersion.HTTP1),
    Mode("json", proto_json_codec(), None, (), pyqwest.HTTPVersion.HTTP2),
]


@pytest.fixture(params=MODES, ids=lambda mode: mode.name)
def mode(request) -> Mode:
    return request.param


class Actions:
    """The official async Connect client, called the way the SDK calls it."""

    def __init__(self, client: ActionsServiceClient):
        self.client = client

    async def enqueue(self, request: actions_pb2.EnqueueRequest):
        action = request.action
        headers = sdk_headers(action.action_id.run.name, action.parent_action_name)
        return await self.client.enqueue(request, headers=headers, timeout_ms=TIMEOUT_MS)

    async def update(self, request: actions_pb2.UpdateRequest):
        return await self.client.update(request, timeout_ms=TIMEOUT_MS)

    async def abort(self, request: actions_pb2.AbortRequest, parent: str | None):
        headers = sdk_headers(request.action_id.run.name, parent)
        return await self.client.abort(request, headers=headers, timeout_ms=TIMEOUT_MS)

    async def signal(self, request: actions_pb2.SignalRequest):
        return await self.client.signal(request, timeout_ms=TIMEOUT_MS)

    def watch(self, run: str, name: str) -> ConnectWatcher:
        return ConnectWatcher(self.client, run, name, headers=sdk_headers(run, name))

    async def snapshot(self, run: str, name: str) -> dict[str, object]:
        async with self.watch(run, name) as watcher:
            return {u.action_id.name: u for u in await watcher.snapshot()}


@contextlib.asynccontextmanager
async def connect(address: str, mode: Mode):
    transport = pyqwest.HTTPTransport(http_version=mode.http_version)
    try:
        client = ActionsServiceClient(
            f"http://{address}",
            codec=mode.codec,
            send_compression=mode.send_compression,
            accept_compression=mode.accept_compression,
            http_client=pyqwest.Client(transport),
        )
        yield Actions(client)
    finally:
        await transport.aclose()


async def expect_code(code: Code, call) -> str:
    """Asserts that the awaitable `call` fails with `code`; returns the message."""
    with pytest.raises(ConnectError) as info:
        await call
    error = info.value
    assert error.code == code, f"expected {code}, got {error.code}: {error.message}"
    return error.message


async def test_enqueue_watch_and_update(address, mode):
    run = new_run()
    async with connect(address, mode) as actions:
        root = enqueue_task(run, "a0")
        children = [enqueue_task(run, name, "a0") for name in ("a1", "a2")]
        for request in [root, *children]:
            await actions.enqueue(request)
        # Identical again: OK. The same id with another TaskSpec: a conflict.
        for request in [root, *children]:
            await actions.enqueue(request)
        changed = actions_pb2.EnqueueRequest()
        changed.CopyFrom(children[0])
        changed.action.task.spec.task_template.container.args.append("--verbose")
        assert "a1" in await expect_code(Code.ALREADY_EXISTS, actions.enqueue(changed))

        async with actions.watch(run, "a0") as watcher:
            snapshot = await watcher.snapshot()
            assert_snapshot(snapshot, run, "a0", {"a0": QUEUED, "a1": QUEUED, "a2": QUEUED})
            await actions.update(update_request(run, "a1", RUNNING))
            update = await watcher.until_phase("a1", RUNNING)
            assert update.action_id == action_identifier(run, "a1")
            await actions.update(update_request(run, "a1", SUCCEEDED))
            await watcher.until_phase("a1", SUCCEEDED)
            await actions.update(update_request(run, "a0", RUNNING))
            await watcher.until_phase("a0", RUNNING)
            await actions.enqueue(enqueue_task(run, "a3", "a0"))
            await watcher.until_phase("a3", QUEUED)
            a1 = [u.phase for u in watcher.updates if u.action_id.name == "a1"]
            assert a1 == sorted(a1), f"a1 went backwards: {a1}"
            assert watcher.sentinels == 1


async def test_abort_cascades_over_three_levels(address, mode):
    run = new_run()
    async with connect(address, mode) as actions:
        await actions.enqueue(enqueue_task(run, "root"))
        await actions.enqueue(enqueue_task(run, "a1", "root"))
        await actions.enqueue(enqueue_task(run, "a2", "a1"))
        await actions.enqueue(enqueue_task(run, "a3", "a2"))
        async with actions.watch(run, "a1") as watcher:
            await watcher.snapshot()
            await actions.abort(abort_request(run, "a1", "user cancelled"), parent="root")
            aborted = await watcher.until_phase("a1", ABORTED)
            await watcher.until_phase("a2", ABORTED)
        assert aborted.error.code == "Aborted"
        assert aborted.error.message == "user cancelled"
        assert aborted.error.kind == execution_pb2.ExecutionError.USER

        top = await actions.snapshot(run, "root")
        assert {n: u.phase for n, u in top.items()} == {"root": QUEUED, "a1": ABORTED}
        assert (await actions.snapshot(run, "a2"))["a3"].phase == ABORTED
        await expect_code(
            Code.FAILED_PRECONDITION, actions.abort(abort_request(run, "a2", "again"), parent="a1")
        )


async def test_signal_resolves_a_condition(address, mode):
    run = new_run()
    async with connect(address, mode) as actions:
        await actions.enqueue(enqueue_task(run, "a0"))
        await actions.enqueue(enqueue_condition(run, "approve", "a0", types_pb2.BOOLEAN))
        async with actions.watch(run, "a0") as watcher:
            assert_snapshot(await watcher.snapshot(), run, "a0", {"a0": QUEUED, "approve": PAUSED})
            value = bool_literal(True)
            await actions.signal(signal_request(run, "approve", "a0", value))
            update = await watcher.until_phase("approve", SUCCEEDED)
            assert update.HasField("value") and update.value == value
        # The same value again: OK; another one: refused.
        await actions.signal(signal_request(run, "approve", "a0", bool_literal(True)))
        await expect_code(
            Code.FAILED_PRECONDITION,
            actions.signal(signal_request(run, "approve", "a0", bool_literal(False))),
        )


async def test_status_codes(address, mode):
    run = new_run()
    async with connect(address, mode) as actions:
        await actions.enqueue(enqueue_task(run, "a0"))
        await actions.enqueue(enqueue_task(run, "a1", "a0"))
        await actions.enqueue(enqueue_condition(run, "gate", "a0", types_pb2.BOOLEAN))

        # INVALID_ARGUMENT, naming the field.
        request = enqueue_task(run, "bad", "a0")
        request.action.action_id.run.project = ""
        message = await expect_code(Code.INVALID_ARGUMENT, actions.enqueue(request))
        assert message.startswith("action.action_id.run.project: "), message
        message = await expect_code(
            Code.INVALID_ARGUMENT, actions.update(update_request(run, "a1", RUNNING, attempt=0))
        )
        assert message.startswith("attempt: "), message
        # ... and for a signal value of the wrong kind.
        message = await expect_code(
            Code.INVALID_ARGUMENT, actions.signal(signal_request(run, "gate", "a0", int_literal(1)))
        )
        assert message.startswith("value: "), message

        # NOT_FOUND.
        await expect_code(Code.NOT_FOUND, actions.enqueue(enqueue_task(run, "orphan", "missing")))
        await expect_code(Code.NOT_FOUND, actions.update(update_request(run, "missing", RUNNING)))
        await expect_code(Code.NOT_FOUND, actions.abort(abort_request(run, "missing", "x"), parent="a0"))
        await expect_code(
            Code.NOT_FOUND, actions.signal(signal_request(run, "missing", "a0", bool_literal(True)))
        )
        async with actions.watch(run, "missing") as watcher:
            await expect_code(Code.NOT_FOUND, watcher.next())

        # ALREADY_EXISTS.
        changed = enqueue_task(run, "a1", "a0")
        changed.action.input_uri = "s3://elsewhere/inputs.pb"
        await expect_code(Code.ALREADY_EXISTS, actions.enqueue(changed))

        # FAILED_PRECONDITION.
        await actions.update(update_request(run, "a1", RUNNING, attempt=2))
        await expect_code(
            Code.FAILED_PRECONDITION, actions.update(update_request(run, "a1", SUCCEEDED, attempt=1))
        )
        await actions.update(update_request(run, "a1", SUCCEEDED, attempt=2))
        await expect_code(Code.FAILED_PRECONDITION, actions.abort(abort_request(run, "a1", "x"), parent="a0"))
        await expect_code(
            Code.FAILED_PRECONDITION, actions.signal(signal_request(run, "a1", "a0", bool_literal(True)))
        )

        # ABORTED: the parent is terminal.
        await expect_code(Code.ABORTED, actions.enqueue(enqueue_task(run, "late", "a1")))
        await actions.abort(abort_request(run, "a0", "run cancelled"), parent=None)
        await expect_code(Code.ABORTED, actions.enqueue(enqueue_task(run, "late", "a0")))

        # RESOURCE_EXHAUSTED: over 4 MiB once decoded (gzip shrinks this
        # request to a few KiB on the wire).
        big_run = new_run()
        request = enqueue_task(big_run, "a0")
        request.action.input_uri = "s3://bucket/" + "x" * (5 * 1024 * 1024)
        await expect_code(Code.RESOURCE_EXHAUSTED, actions.enqueue(request))
        async with actions.watch(big_run, "a0") as watcher:
            await expect_code(Code.NOT_FOUND, watcher.next())
        await actions.enqueue(enqueue_task(big_run, "a0"))
