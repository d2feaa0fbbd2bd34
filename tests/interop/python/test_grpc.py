"""actionsd through the official gRPC stubs of `flyteidl2` (grpcio).

UNAVAILABLE (database unreachable, daemon shutting down) is not triggered
here: these tests share one running daemon and database. The Rust
end-to-end suite covers it.
"""

from __future__ import annotations

import grpc
import pytest
from flyteidl2.actions import actions_service_pb2 as actions_pb2
from flyteidl2.actions.actions_service_pb2_grpc import ActionsServiceStub
from flyteidl2.core import execution_pb2, types_pb2

from conftest import (
    ABORTED,
    FAILED,
    INITIALIZING,
    PAUSED,
    QUEUED,
    RUNNING,
    SUCCEEDED,
    TIMEOUT,
    GrpcWatcher,
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
    task_spec,
    update_request,
)

Code = grpc.StatusCode


class Actions:
    """The official stub, with a deadline on every call."""

    def __init__(self, channel: grpc.Channel):
        self.stub = ActionsServiceStub(channel)

    def enqueue(self, request: actions_pb2.EnqueueRequest):
        action = request.action
        headers = sdk_headers(action.action_id.run.name, action.parent_action_name)
        return self.stub.Enqueue(request, timeout=TIMEOUT, metadata=tuple(headers.items()))

    def update(self, request: actions_pb2.UpdateRequest):
        return self.stub.Update(request, timeout=TIMEOUT)

    def abort(self, request: actions_pb2.AbortRequest):
        return self.stub.Abort(request, timeout=TIMEOUT)

    def signal(self, request: actions_pb2.SignalRequest):
        return self.stub.Signal(request, timeout=TIMEOUT)

    def watch(self, run: str, name: str) -> GrpcWatcher:
        return GrpcWatcher(self.stub, run, name, metadata=sdk_headers(run, name).items())

    def snapshot(self, run: str, name: str) -> dict[str, object]:
        """The snapshot of `name` and its children, by action name."""
        with self.watch(run, name) as watcher:
            return {u.action_id.name: u for u in watcher.snapshot()}


@pytest.fixture
def actions(address):
    with grpc.insecure_channel(address) as channel:
        grpc.channel_ready_future(channel).result(timeout=TIMEOUT)
        yield Actions(channel)


def expect_code(code: grpc.StatusCode, call, request) -> str:
    """Asserts that `call(request)` fails with `code`; returns the message."""
    with pytest.raises(grpc.RpcError) as info:
        call(request)
    error = info.value
    assert error.code() == code, f"expected {code}, got {error.code()}: {error.details()}"
    return error.details()


def copy(request):
    clone = type(request)()
    clone.CopyFrom(request)
    return clone


# --------------------------------------------------------------------------
# Behaviour
# --------------------------------------------------------------------------


def test_enqueue_stores_the_task_spec_and_is_idempotent(actions):
    run = new_run()
    root = enqueue_task(run, "a0")
    children = [enqueue_task(run, name, "a0") for name in ("a1", "a2")]
    for request in [root, *children]:
        actions.enqueue(request)
    actions.update(update_request(run, "a1", RUNNING))

    # The identical messages again: OK, and nothing changes (a1 stays RUNNING).
    for request in [root, *children]:
        actions.enqueue(request)
    # An explicitly empty parent name means root, like an absent one.
    empty_parent = copy(root)
    empty_parent.action.parent_action_name = ""
    actions.enqueue(empty_parent)
    snapshot = actions.snapshot(run, "a0")
    assert {n: u.phase for n, u in snapshot.items()} == {"a0": QUEUED, "a1": RUNNING, "a2": QUEUED}

    # One nested field deep inside the TaskSpec changed: the stored bytes
    # differ, so the same id is a conflict.
    changed = copy(children[0])
    changed.action.task.spec.task_template.container.resources.limits[0].value = "4Gi"
    assert "a1" in expect_code(Code.ALREADY_EXISTS, actions.enqueue, changed)
    changed = copy(children[1])
    changed.action.task.spec.CopyFrom(task_spec("a2", image="ghcr.io/flyteorg/flyte:py3.13-v2.0.0"))
    expect_code(Code.ALREADY_EXISTS, actions.enqueue, changed)
    changed = copy(children[1])
    changed.action.task.spec.default_inputs[0].parameter.default.scalar.primitive.integer = 4
    expect_code(Code.ALREADY_EXISTS, actions.enqueue, changed)
    # The root's RunSpec is part of its content.
    changed = copy(root)
    changed.run_spec.queue = "elsewhere"
    expect_code(Code.ALREADY_EXISTS, actions.enqueue, changed)
    # A run has one root.
    message = expect_code(Code.ALREADY_EXISTS, actions.enqueue, enqueue_task(run, "b0"))
    assert "a0" in message, message
    # The original content is still accepted.
    actions.enqueue(children[0])


def test_watch_sends_snapshot_then_one_sentinel_then_live_updates(actions):
    run = new_run()
    actions.enqueue(enqueue_task(run, "a0"))
    for name in ("a1", "a2", "a3"):
        actions.enqueue(enqueue_task(run, name, "a0"))
    # A grandchild is not part of the root's stream.
    actions.enqueue(enqueue_task(run, "g1", "a1"))

    with actions.watch(run, "a0") as watcher:
        snapshot = watcher.snapshot()
        assert_snapshot(snapshot, run, "a0", {"a0": QUEUED, "a1": QUEUED, "a2": QUEUED, "a3": QUEUED})
        assert watcher.sentinels == 1

        actions.update(update_request(run, "a1", RUNNING))
        update = watcher.until_phase("a1", RUNNING)
        assert update.action_id == action_identifier(run, "a1")
        actions.update(update_request(run, "a1", SUCCEEDED))
        watcher.until_phase("a1", SUCCEEDED)
        # The watched action's own changes are streamed too.
        actions.update(update_request(run, "a0", RUNNING))
        watcher.until_phase("a0", RUNNING)
        # A child enqueued after the snapshot arrives live.
        actions.enqueue(enqueue_task(run, "a4", "a0"))
        watcher.until_phase("a4", QUEUED)

        live = watcher.updates[len(snapshot):]
        names = [u.action_id.name for u in live]
        assert "g1" not in names, "grandchildren are not streamed"
        a1 = [u.phase for u in live if u.action_id.name == "a1"]
        assert a1 == sorted(a1) and a1[-1] == SUCCEEDED, f"a1 went backwards: {a1}"
        assert watcher.sentinels == 1


def test_update_moves_phases_forward(actions):
    run = new_run()
    actions.enqueue(enqueue_task(run, "a0"))
    actions.enqueue(enqueue_task(run, "a1", "a0"))
    with actions.watch(run, "a0") as watcher:
        watcher.snapshot()
        actions.update(update_request(run, "a1", INITIALIZING))
        watcher.until_phase("a1", INITIALIZING)
        actions.update(update_request(run, "a1", RUNNING))
        watcher.until_phase("a1", RUNNING)
        # The same phase again changes nothing; a new attempt restarts.
        actions.update(update_request(run, "a1", RUNNING))
        actions.update(update_request(run, "a1", QUEUED, attempt=2))
        watcher.until_phase("a1", QUEUED)
        actions.update(update_request(run, "a1", FAILED, attempt=2))
        watcher.until_phase("a1", FAILED)
        # Repeating the terminal update is OK.
        actions.update(update_request(run, "a1", FAILED, attempt=2))
        phases = [u.phase for u in watcher.updates if u.action_id.name == "a1"]
        assert phases == [QUEUED, INITIALIZING, RUNNING, QUEUED, FAILED], phases


def test_abort_cascades_over_three_levels(actions):
    run = new_run()
    actions.enqueue(enqueue_task(run, "root"))
    actions.enqueue(enqueue_task(run, "a1", "root"))
    actions.enqueue(enqueue_task(run, "a2", "a1"))
    actions.enqueue(enqueue_task(run, "a3", "a2"))
    actions.enqueue(enqueue_task(run, "keep", "root"))
    actions.update(update_request(run, "a3", RUNNING))

    with actions.watch(run, "a1") as watcher:
        watcher.snapshot()
        actions.abort(abort_request(run, "a1", "user cancelled"))
        aborted = watcher.until_phase("a1", ABORTED)
        watcher.until_phase("a2", ABORTED)
    assert aborted.error.code == "Aborted"
    assert aborted.error.message == "user cancelled"
    assert aborted.error.kind == execution_pb2.ExecutionError.USER

    top = actions.snapshot(run, "root")
    assert top["root"].phase == QUEUED, "the abort does not go up"
    assert top["keep"].phase == QUEUED, "nor sideways"
    assert top["a1"].phase == ABORTED
    assert actions.snapshot(run, "a1")["a2"].phase == ABORTED
    a3 = actions.snapshot(run, "a2")["a3"]
    assert a3.phase == ABORTED
    assert a3.error.message == "user cancelled"


def test_signal_resolves_a_condition_with_the_value(actions):
    run = new_run()
    actions.enqueue(enqueue_task(run, "a0"))
    actions.enqueue(enqueue_condition(run, "approve", "a0", types_pb2.BOOLEAN))
    with actions.watch(run, "a0") as watcher:
        assert_snapshot(watcher.snapshot(), run, "a0", {"a0": QUEUED, "approve": PAUSED})
        value = bool_literal(True)
        actions.signal(signal_request(run, "approve", "a0", value))
        update = watcher.until_phase("approve", SUCCEEDED)
        assert update.HasField("value")
        assert update.value == value
        # The same value again: OK.
        actions.signal(signal_request(run, "approve", "a0", bool_literal(True)))
    assert actions.snapshot(run, "a0")["approve"].value == value


# --------------------------------------------------------------------------
# Status codes (SEMANTICS.md)
# --------------------------------------------------------------------------


def test_invalid_argument_names_the_field(actions):
    run = new_run()
    actions.enqueue(enqueue_task(run, "a0"))
    actions.enqueue(enqueue_condition(run, "gate", "a0"))

    cases = []
    request = enqueue_task(run, "a1", "a0")
    request.action.action_id.run.project = ""
    cases.append(("action.action_id.run.project: ", actions.enqueue, request))
    request = enqueue_task(run, "a1", "a0")
    request.action.action_id.run.name = "r" * 31
    cases.append(("action.action_id.run.name: ", actions.enqueue, request))
    request = enqueue_task(run, "a1", "a0")
    request.action.action_id.name = "n" * 31
    cases.append(("action.action_id.name: ", actions.enqueue, request))
    request = enqueue_task(run, "a1", "a0")
    request.action.input_uri = ""
    cases.append(("action.input_uri: ", actions.enqueue, request))
    request = enqueue_task(run, "a1", "a0")
    request.action.ClearField("task")
    cases.append(("action.spec: ", actions.enqueue, request))
    request = enqueue_task(run, "a1", "a0")
    request.action.recovered_from.CopyFrom(action_identifier(run, "a0"))
    cases.append(("action.recovered_from: ", actions.enqueue, request))
    cases.append(("attempt: ", actions.update, update_request(run, "a0", RUNNING, attempt=0)))
    cases.append(("action_id: ", actions.abort, actions_pb2.AbortRequest(reason="x")))
    request = signal_request(run, "gate", "", bool_literal(True))
    cases.append(("parent_action_name: ", actions.signal, request))

    for prefix, call, request in cases:
        message = expect_code(Code.INVALID_ARGUMENT, call, request)
        assert message.startswith(prefix), f"expected {prefix!r}…, got {message!r}"

    # A watch without its filter (the deadline bounds the wait).
    call = actions.stub.WatchForUpdates(actions_pb2.WatchForUpdatesRequest(), timeout=TIMEOUT)
    with pytest.raises(grpc.RpcError) as info:
        next(call)
    assert info.value.code() == Code.INVALID_ARGUMENT
    assert info.value.details().startswith("parent_action_id: "), info.value.details()
    # Nothing of the refused requests was written.
    assert set(actions.snapshot(run, "a0")) == {"a0", "gate"}


def test_not_found(actions):
    run = new_run()
    actions.enqueue(enqueue_task(run, "a0"))
    expect_code(Code.NOT_FOUND, actions.enqueue, enqueue_task(run, "a1", "missing"))
    expect_code(Code.NOT_FOUND, actions.update, update_request(run, "missing", RUNNING))
    expect_code(Code.NOT_FOUND, actions.abort, abort_request(run, "missing", "x"))
    expect_code(Code.NOT_FOUND, actions.signal, signal_request(run, "missing", "a0", bool_literal(True)))
    # An unknown run altogether.
    expect_code(Code.NOT_FOUND, actions.update, update_request(new_run(), "a0", RUNNING))
    with actions.watch(run, "missing") as watcher:
        with pytest.raises(grpc.RpcError) as info:
            watcher.next()
    assert info.value.code() == Code.NOT_FOUND, info.value.details()


def test_already_exists(actions):
    run = new_run()
    actions.enqueue(enqueue_task(run, "a0"))
    actions.enqueue(enqueue_task(run, "a1", "a0"))
    changed = enqueue_task(run, "a1", "a0")
    changed.action.input_uri = "s3://elsewhere/inputs.pb"
    expect_code(Code.ALREADY_EXISTS, actions.enqueue, changed)
    changed = enqueue_task(run, "a1", "a0")
    changed.action.task.spec.short_name = "renamed"
    expect_code(Code.ALREADY_EXISTS, actions.enqueue, changed)


def test_aborted_when_the_parent_is_terminal(actions):
    run = new_run()
    actions.enqueue(enqueue_task(run, "a0"))
    actions.enqueue(enqueue_task(run, "a1", "a0"))
    actions.enqueue(enqueue_task(run, "a2", "a0"))
    actions.abort(abort_request(run, "a1", "stop"))
    message = expect_code(Code.ABORTED, actions.enqueue, enqueue_task(run, "late", "a1"))
    assert message, "ABORTED carries a message"
    actions.update(update_request(run, "a2", SUCCEEDED))
    expect_code(Code.ABORTED, actions.enqueue, enqueue_task(run, "late", "a2"))
    expect_code(Code.ABORTED, actions.enqueue, enqueue_condition(run, "late", "a2"))
    # The whole run aborted.
    actions.abort(abort_request(run, "a0", "run cancelled"))
    expect_code(Code.ABORTED, actions.enqueue, enqueue_task(run, "late", "a0"))


def test_failed_precondition(actions):
    run = new_run()
    actions.enqueue(enqueue_task(run, "a0"))
    actions.enqueue(enqueue_task(run, "a1", "a0"))
    actions.enqueue(enqueue_condition(run, "gate", "a0"))
    actions.enqueue(enqueue_condition(run, "late", "a0"))

    # A stale attempt.
    actions.update(update_request(run, "a1", RUNNING, attempt=2))
    message = expect_code(Code.FAILED_PRECONDITION, actions.update, update_request(run, "a1", SUCCEEDED, attempt=1))
    assert "stale" in message, message
    # Backwards within an attempt.
    expect_code(Code.FAILED_PRECONDITION, actions.update, update_request(run, "a1", QUEUED, attempt=2))
    # A terminal action cannot be aborted, nor change its phase.
    actions.update(update_request(run, "a1", SUCCEEDED, attempt=2))
    expect_code(Code.FAILED_PRECONDITION, actions.abort, abort_request(run, "a1", "too late"))
    expect_code(Code.FAILED_PRECONDITION, actions.update, update_request(run, "a1", FAILED, attempt=2))
    # Conditions are resolved by Signal only.
    expect_code(Code.FAILED_PRECONDITION, actions.update, update_request(run, "gate", SUCCEEDED))
    # Signal of a task.
    expect_code(Code.FAILED_PRECONDITION, actions.signal, signal_request(run, "a1", "a0", bool_literal(True)))
    # A different value after resolution.
    actions.signal(signal_request(run, "gate", "a0", bool_literal(True)))
    expect_code(Code.FAILED_PRECONDITION, actions.signal, signal_request(run, "gate", "a0", bool_literal(False)))
    # A condition terminal in another way (aborted).
    actions.abort(abort_request(run, "late", "no longer needed"))
    expect_code(Code.FAILED_PRECONDITION, actions.signal, signal_request(run, "late", "a0", bool_literal(True)))


def test_signal_type_mismatch_is_invalid_argument(actions):
    run = new_run()
    actions.enqueue(enqueue_task(run, "a0"))
    actions.enqueue(enqueue_condition(run, "flag", "a0", types_pb2.BOOLEAN))
    actions.enqueue(enqueue_condition(run, "count", "a0", types_pb2.INTEGER))
    message = expect_code(Code.INVALID_ARGUMENT, actions.signal, signal_request(run, "flag", "a0", int_literal(1)))
    assert message.startswith("value: ") and "BOOLEAN" in message, message
    expect_code(Code.INVALID_ARGUMENT, actions.signal, signal_request(run, "count", "a0", bool_literal(True)))
    # The parent named must be the condition's parent.
    expect_code(Code.INVALID_ARGUMENT, actions.signal, signal_request(run, "flag", "other", bool_literal(True)))
    # Still unresolved, and the right kind is accepted.
    assert actions.snapshot(run, "a0")["flag"].phase == PAUSED
    actions.signal(signal_request(run, "count", "a0", int_literal(7)))
    assert actions.snapshot(run, "a0")["count"].value == int_literal(7)


def test_oversized_request_is_resource_exhausted(actions):
    run = new_run()
    request = enqueue_task(run, "a0")
    request.action.input_uri = "s3://bucket/" + "x" * (5 * 1024 * 1024)
    expect_code(Code.RESOURCE_EXHAUSTED, actions.enqueue, request)
    # Nothing was written, and the daemon still serves.
    with actions.watch(run, "a0") as watcher:
        with pytest.raises(grpc.RpcError) as info:
            watcher.next()
    assert info.value.code() == Code.NOT_FOUND
    actions.enqueue(enqueue_task(run, "a0"))
    assert list(actions.snapshot(run, "a0")) == ["a0"]


def test_gzip_compressed_calls_are_accepted_and_answered(address):
    """grpcio with gzip on the channel (as connect-python in gRPC mode
    always sends): requests are compressed, and the daemon answers in
    kind."""
    with grpc.insecure_channel(address, compression=grpc.Compression.Gzip) as channel:
        grpc.channel_ready_future(channel).result(timeout=TIMEOUT)
        gzipped = Actions(channel)
        run = new_run()
        gzipped.enqueue(enqueue_task(run, "a0"))
        gzipped.enqueue(enqueue_task(run, "a1", "a0"))
        gzipped.update(update_request(run, "a1", RUNNING))
        # A single call compressed on its own, on a plain channel's stub.
        gzipped.stub.Update(
            update_request(run, "a1", SUCCEEDED), timeout=TIMEOUT, compression=grpc.Compression.Gzip
        )
        snapshot = gzipped.snapshot(run, "a0")
        assert {n: u.phase for n, u in snapshot.items()} == {"a0": QUEUED, "a1": SUCCEEDED}
