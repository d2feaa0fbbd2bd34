"""actionsd's executor service (`actionsd.executor.v1.ExecutorService`)
with grpcio and the official `flyteidl2` classes.

The executor stubs are compiled from proto/actionsd/executor/v1/executor.proto
at test time with grpcio-tools' bundled protoc. Only executor.proto is
compiled: its flyteidl2 imports resolve to the official `flyteidl2` package,
so the identifiers and phases it carries are the official classes, and the
enqueued Action and RunSpec it returns as bytes are parsed with them.
"""

from __future__ import annotations

import importlib
import importlib.resources
import sys
import time
import types
import uuid
from pathlib import Path

import grpc
import pytest
from flyteidl2.actions import actions_service_pb2 as actions_pb2
from flyteidl2.actions.actions_service_pb2_grpc import ActionsServiceStub
from flyteidl2.common import identifier_pb2, phase_pb2
from flyteidl2.core import literals_pb2
from flyteidl2.task import run_pb2
from google.protobuf import wrappers_pb2
from grpc_tools import protoc

from conftest import (
    SUCCEEDED,
    TIMEOUT,
    GrpcWatcher,
    action_identifier,
    assert_snapshot,
    enqueue_task,
    new_run,
    phase_name,
    sdk_headers,
    task_spec,
)

# actionsd's proto sources (tests/interop/python -> proto).
PROTO_ROOT = (Path(__file__).resolve().parent / ".." / ".." / ".." / "proto").resolve()
EXECUTOR_PROTO = "actionsd/executor/v1/executor.proto"


@pytest.fixture(scope="session")
def executor_api(tmp_path_factory) -> types.SimpleNamespace:
    """`executor_pb2` and `executor_pb2_grpc`, compiled into a temporary
    directory and imported from there."""
    out = tmp_path_factory.mktemp("executor_stubs")
    well_known = importlib.resources.files("grpc_tools") / "_proto"
    with importlib.resources.as_file(well_known) as well_known_dir:
        args = [
            "grpc_tools.protoc",
            f"--proto_path={PROTO_ROOT}",
            f"--proto_path={well_known_dir}",
            f"--python_out={out}",
            f"--grpc_python_out={out}",
            EXECUTOR_PROTO,
        ]
        code = protoc.main(args)
    assert code == 0, f"protoc failed ({code}): {' '.join(args)}"
    generated = sorted(str(p.relative_to(out)) for p in out.rglob("*.py"))
    assert generated == [
        "actionsd/executor/v1/executor_pb2.py",
        "actionsd/executor/v1/executor_pb2_grpc.py",
    ], generated

    sys.path.insert(0, str(out))
    try:
        pb2 = importlib.import_module("actionsd.executor.v1.executor_pb2")
        pb2_grpc = importlib.import_module("actionsd.executor.v1.executor_pb2_grpc")
    finally:
        sys.path.remove(str(out))
    # The imported flyteidl2 types are the official package's.
    fields = pb2.LeasedAction.DESCRIPTOR.fields_by_name
    assert fields["action_id"].message_type is identifier_pb2.ActionIdentifier.DESCRIPTOR
    phase = pb2.FinishRequest.DESCRIPTOR.fields_by_name["phase"]
    assert phase.enum_type is phase_pb2.ActionPhase.DESCRIPTOR
    return types.SimpleNamespace(pb2=pb2, grpc=pb2_grpc)


@pytest.fixture
def channel(address):
    with grpc.insecure_channel(address) as channel:
        grpc.channel_ready_future(channel).result(timeout=TIMEOUT)
        yield channel


def first_leased(stub, request):
    """The first `leased` message of a Lease stream. The call's deadline
    bounds the wait; the stream is cancelled once it is read."""
    call = stub.Lease(request, timeout=TIMEOUT)
    try:
        for response in call:
            if response.WhichOneof("event") == "leased":
                return response.leased
        raise AssertionError("the lease stream ended without a leased action")
    except grpc.RpcError as error:
        if error.code() == grpc.StatusCode.DEADLINE_EXCEEDED:
            raise AssertionError(f"nothing leased within {TIMEOUT} s") from None
        raise
    finally:
        call.cancel()


def test_lease_hands_out_the_enqueued_action_and_finish_completes_it(executor_api, channel):
    pb2 = executor_api.pb2
    actions = ActionsServiceStub(channel)
    executor = executor_api.grpc.ExecutorServiceStub(channel)

    # A queue of this test's own: no other test's actions are leased here.
    queue = "q" + uuid.uuid4().hex
    run, name = new_run(), "a0"
    request = enqueue_task(run, name, spec=task_spec(name))
    request.action.task.queue = queue
    run_spec = run_pb2.RunSpec(
        labels=run_pb2.Labels(values={"suite": "python", "service": "executor"}),
        annotations=run_pb2.Annotations(values={"owner": "alice@example.com"}),
        envs=run_pb2.Envs(values=[literals_pb2.KeyValuePair(key="STAGE", value="interop")]),
        interruptible=wrappers_pb2.BoolValue(value=False),
        queue=queue,
        raw_data_storage=run_pb2.RawDataStorage(raw_data_prefix=f"s3://bucket/{run}/raw"),
        cache_config=run_pb2.CacheConfig(overwrite_cache=True),
        max_action_concurrency=4,
        run_base_dir=f"s3://bucket/{run}",
    )
    request.run_spec.CopyFrom(run_spec)
    headers = sdk_headers(run, None)
    actions.Enqueue(request, timeout=TIMEOUT, metadata=tuple(headers.items()))

    executor_id = "interop-" + uuid.uuid4().hex[:12]
    leased = first_leased(
        executor, pb2.LeaseRequest(executor_id=executor_id, queue=queue, capacity=1)
    )
    assert leased.action_id == action_identifier(run, name)
    action = actions_pb2.Action.FromString(leased.action)
    assert action == request.action, "the leased Action differs from the enqueued one"
    assert action.task.spec == task_spec(name)
    leased_run_spec = run_pb2.RunSpec.FromString(leased.run_spec)
    assert leased_run_spec == run_spec, "the leased RunSpec differs from the one enqueued"
    assert leased.attempt == 1
    assert leased.output_uri == f"{request.action.run_output_base}/{name}/1"
    assert leased.lease_deadline.ToSeconds() > time.time() - 5, leased.lease_deadline

    executor.Finish(
        pb2.FinishRequest(
            executor_id=executor_id,
            action_id=action_identifier(run, name),
            attempt=1,
            phase=SUCCEEDED,
        ),
        timeout=TIMEOUT,
    )

    with GrpcWatcher(actions, run, name, metadata=sdk_headers(run, name).items()) as watcher:
        updates = watcher.snapshot()
    assert_snapshot(updates, run, name, {name: SUCCEEDED})
    update = updates[0]
    assert update.phase == SUCCEEDED, phase_name(update.phase)
    assert update.output_uri == leased.output_uri
