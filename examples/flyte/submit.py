#!/usr/bin/env python3
"""Start a Flyte v2 program on actionsd, without a control plane.

    python examples/flyte/submit.py hello.py main --input n=10

loads the task `main` from `hello.py` (or a module name importable from
--root), serializes it with the Flyte SDK's own functions (the TaskSpec the
SDK's controller sends for a child task), writes its inputs under a local
run directory, enqueues it as the root action `a0` of a new run through
ActionsService, waits for the run to end and prints the outputs (JSON) or
the error. `actionsd executor --flyte` runs the tasks.

Exit status: 0 when the run succeeded, 1 when it failed, 2 on bad usage.
Options:

  --server URL       actionsd (default http://127.0.0.1:8091, env ACTIONSD_SERVER)
  --input NAME=VALUE a task input; VALUE is JSON (10, "text", [1, 2]) or else a string
  --env NAME=VALUE   set in every task process of the run (RunSpec.envs)
  --storage DIR      where runs keep inputs and outputs (default ./.flyte-runs)
  --root DIR         the code root (default: the program file's directory)
  --org/--project/--domain   the run's identity (default: "", flytesnacks, development)
  --run NAME         the run's name (default: a fresh one)
  --queue NAME       the queue its tasks go to (default: "default")
  --timeout SECONDS  how long to wait for the run (default 600)
  --no-wait          print the run's name and return once it is enqueued
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import importlib.util
import json
import os
import sys
import time
import uuid
from pathlib import Path

import httpx
from flyteidl2.actions import actions_service_pb2 as actions_pb2
from flyteidl2.actions.actions_service_connect import ActionsServiceClient
from flyteidl2.common import identifier_pb2
from flyteidl2.core import literals_pb2
from flyteidl2.task import common_pb2, run_pb2, task_definition_pb2
from flyteidl2.workflow import run_definition_pb2
from google.protobuf import timestamp_pb2

TERMINAL = {
    "ACTION_PHASE_SUCCEEDED",
    "ACTION_PHASE_FAILED",
    "ACTION_PHASE_ABORTED",
    "ACTION_PHASE_TIMED_OUT",
}


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("program", help="a Python file, or a module name importable from --root")
    parser.add_argument("task", help="the name of the task in the program")
    parser.add_argument("--server", default=os.environ.get("ACTIONSD_SERVER", "http://127.0.0.1:8091"))
    parser.add_argument("--input", action="append", default=[], metavar="NAME=VALUE")
    parser.add_argument("--env", action="append", default=[], metavar="NAME=VALUE")
    parser.add_argument("--storage", default=".flyte-runs")
    parser.add_argument("--root")
    parser.add_argument("--org", default="")
    parser.add_argument("--project", default="flytesnacks")
    parser.add_argument("--domain", default="development")
    parser.add_argument("--run")
    parser.add_argument("--queue", default="", help="the run's queue (default: actionsd's default)")
    parser.add_argument("--timeout", type=float, default=600.0)
    parser.add_argument("--no-wait", action="store_true")
    return parser.parse_args(argv)


def pairs(items: list[str], what: str, decode: bool) -> dict:
    out = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep or not name:
            raise SystemExit(f"submit: {what} {item!r} is not NAME=VALUE")
        if decode:
            try:
                out[name] = json.loads(value)
            except json.JSONDecodeError:
                out[name] = value
        else:
            out[name] = value
    return out


def load_task(program: str, task_name: str, root: Path):
    sys.path.insert(0, str(root))
    if program.endswith(".py"):
        path = Path(program).resolve()
        module_name = ".".join(path.relative_to(root).with_suffix("").parts)
    else:
        module_name = program
    module = importlib.import_module(module_name)
    task = getattr(module, task_name, None)
    if task is None:
        raise SystemExit(f"submit: {module_name} has no task {task_name!r}")
    return task


async def get_action(http: httpx.AsyncClient, server: str, action_id: dict) -> dict:
    """The action as actionsd's read API holds it (Connect, JSON)."""
    response = await http.post(
        f"{server}/actionsd.read.v1.ReadService/GetAction",
        json={"id": action_id},
        headers={"content-type": "application/json"},
    )
    response.raise_for_status()
    return response.json()["action"]


async def main(argv: list[str]) -> int:
    args = parse_args(argv)
    root = Path(args.root or (Path(args.program).resolve().parent if args.program.endswith(".py") else ".")).resolve()
    inputs = pairs(args.input, "input", decode=True)
    envs = {"PYTHONPATH": str(root), **pairs(args.env, "env", decode=False)}

    import flyte
    from flyte._internal.runtime import convert
    from flyte._internal.runtime.task_serde import translate_task_to_wire
    from flyte.models import SerializationContext

    task = load_task(args.program, args.task, root)
    run_name = args.run or ("r" + uuid.uuid4().hex[:16])
    run_base = (Path(args.storage).resolve() / run_name).as_posix()
    # The TaskSpec, as the SDK's controller serializes a child task.
    context = SerializationContext(
        project=args.project,
        domain=args.domain,
        org=args.org,
        version=flyte.__version__,
        root_dir=root,
    )
    spec = translate_task_to_wire(task, context)
    native_inputs = await convert.convert_from_native_to_inputs(task.native_interface, **inputs)
    input_uri = f"{run_base}/a0/inputs.pb"
    Path(input_uri).parent.mkdir(parents=True, exist_ok=True)
    Path(input_uri).write_bytes(native_inputs.proto_inputs.SerializeToString(deterministic=True))

    run_id = identifier_pb2.RunIdentifier(org=args.org, project=args.project, domain=args.domain, name=run_name)
    action_id = identifier_pb2.ActionIdentifier(run=run_id, name="a0")
    start = timestamp_pb2.Timestamp()
    start.GetCurrentTime()
    run_spec = run_pb2.RunSpec(
        envs=run_pb2.Envs(values=[literals_pb2.KeyValuePair(key=k, value=v) for k, v in envs.items()]),
        run_start_time=start,
        run_base_dir=run_base,
        queue=args.queue,
    )
    action = actions_pb2.Action(
        action_id=action_id,
        input_uri=input_uri,
        run_output_base=run_base,
        task=run_definition_pb2.TaskAction(
            id=task_definition_pb2.TaskIdentifier(
                org=args.org, project=args.project, domain=args.domain, name=task.name, version=context.version
            ),
            spec=spec,
        ),
    )
    client = ActionsServiceClient(args.server)
    # A daemon started a moment ago may not listen yet: try for 10 s.
    for attempt in range(50):
        try:
            await client.enqueue(actions_pb2.EnqueueRequest(action=action, run_spec=run_spec))
            break
        except Exception as err:  # noqa: BLE001 - connection errors come in several types
            if attempt == 49 or "connect" not in repr(err).lower():
                raise
            await asyncio.sleep(0.2)
    print(f"run {run_name} enqueued; its data is in {run_base}", file=sys.stderr)
    if args.no_wait:
        print(run_name)
        return 0

    wire_id = {
        "run": {"org": args.org, "project": args.project, "domain": args.domain, "name": run_name},
        "name": "a0",
    }
    deadline = time.monotonic() + args.timeout
    async with httpx.AsyncClient(timeout=10.0) as http:
        while True:
            state = await get_action(http, args.server, wire_id)
            if state.get("phase") in TERMINAL:
                break
            if time.monotonic() > deadline:
                print(f"submit: run {run_name} did not end within {args.timeout} s", file=sys.stderr)
                return 1
            await asyncio.sleep(0.1)
    phase = state["phase"]
    if phase != "ACTION_PHASE_SUCCEEDED":
        error = state.get("error", {})
        print(
            f"run {run_name} {phase.removeprefix('ACTION_PHASE_').lower()}: "
            f"{error.get('kind', '')} {error.get('code', '')}: {error.get('message', '')}",
            file=sys.stderr,
        )
        return 1
    outputs = common_pb2.Outputs()
    outputs_path = Path(state["outputUri"].removeprefix("file://")) / "outputs.pb"
    if outputs_path.exists():
        outputs.ParseFromString(outputs_path.read_bytes())
    value = await convert.convert_outputs_to_native(task.native_interface, convert.Outputs(proto_outputs=outputs))
    print(json.dumps(value, default=str))
    return 0


if __name__ == "__main__":
    try:
        code = asyncio.run(main(sys.argv[1:]))
    except SystemExit as stop:  # what sys.exit would do with it
        code = stop.code if isinstance(stop.code, int) else (0 if stop.code is None else 1)
        if not isinstance(stop.code, int) and stop.code is not None:
            print(stop.code, file=sys.stderr)
    except BaseException:  # noqa: BLE001 - reported like an uncaught exception
        import traceback

        traceback.print_exc()
        code = 1
    sys.stdout.flush()
    sys.stderr.flush()
    # Importing the Flyte SDK starts background threads this script does not
    # own (its sync-bridge event loop, and with _F_USE_RUST_CONTROLLER=1 the
    # Rust controller's runtime, whose threads hold the GIL API). A normal
    # interpreter exit finalizes Python while they may still run, which aborts
    # the process ("Fatal Python error: PyGILState_Release ... finalizing").
    # The result is already printed and flushed and there is nothing left to
    # clean up, so the process ends here without interpreter finalization.
    os._exit(code)
