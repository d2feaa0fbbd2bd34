// Shared scenario for the Node interop tests: the official Connect-ES
// clients (@connectrpc/connect-node) against a running actionsd, over each
// protocol it serves on one port (Connect, gRPC, gRPC-Web).
import assert from "node:assert/strict";
import { randomBytes } from "node:crypto";
import { Code, ConnectError, createClient } from "@connectrpc/connect";
import {
  createConnectTransport,
  createGrpcTransport,
  createGrpcWebTransport,
} from "@connectrpc/connect-node";
import { ActionsService } from "./gen/flyteidl2/actions/actions_service_pb.js";
import { ActionPhase } from "./gen/flyteidl2/common/phase_pb.js";

export { ActionPhase, Code };

/** Bound on every unary call, in milliseconds. */
export const UNARY_MS = 5_000;
/** Bound on a whole WatchForUpdates stream, in milliseconds. */
export const STREAM_MS = 10_000;

/** `http://host:port` of the daemon under test, from ACTIONSD_ADDR. */
export function baseUrl() {
  const addr = process.env.ACTIONSD_ADDR;
  if (!addr) {
    throw new Error(
      "ACTIONSD_ADDR is not set: start actionsd and export ACTIONSD_ADDR=host:port " +
        "(tests/interop/run.sh does both)",
    );
  }
  return `http://${addr}`;
}

/** The transports under test, by name. Each entry builds a fresh transport. */
export const transports = {
  "Connect JSON, HTTP/1.1": (extra = {}) =>
    createConnectTransport({ baseUrl: baseUrl(), httpVersion: "1.1", useBinaryFormat: false, ...extra }),
  "Connect binary, HTTP/1.1": (extra = {}) =>
    createConnectTransport({ baseUrl: baseUrl(), httpVersion: "1.1", useBinaryFormat: true, ...extra }),
  "Connect binary, HTTP/2": (extra = {}) =>
    createConnectTransport({ baseUrl: baseUrl(), httpVersion: "2", useBinaryFormat: true, ...extra }),
  "gRPC, HTTP/2": (extra = {}) =>
    createGrpcTransport({ baseUrl: baseUrl(), httpVersion: "2", ...extra }),
  "gRPC-Web, HTTP/1.1": (extra = {}) =>
    createGrpcWebTransport({ baseUrl: baseUrl(), httpVersion: "1.1", ...extra }),
};

export function client(transport) {
  return createClient(ActionsService, transport);
}

/** A run identifier unique to this call (run names are at most 30 bytes). */
export function newRun() {
  return { project: "p", domain: "d", name: "n" + randomBytes(8).toString("hex") };
}

export function actionId(run, name) {
  return { run, name };
}

/** An Enqueue request for a task action; a root when `parent` is undefined. */
export function taskAction(run, name, parent) {
  return {
    action: {
      actionId: actionId(run, name),
      parentActionName: parent,
      inputUri: `s3://b/${run.name}/${name}/inputs.pb`,
      runOutputBase: `s3://b/${run.name}`,
      spec: {
        case: "task",
        value: { id: { project: "p", domain: "d", name: "t", version: "v1" } },
      },
    },
  };
}

/** Headers the Flyte SDK sends with Enqueue, Abort and WatchForUpdates. */
export function sdkHeaders(run, parent = "a0") {
  return {
    "x-actions-project": run.project,
    "x-actions-domain": run.domain,
    "x-actions-run": run.name,
    "x-actions-parent-action": parent,
    "x-request-id": randomBytes(8).toString("hex"),
  };
}

/** Enqueues root task "a0" and its child task "a1" in a fresh run. */
export async function enqueueRootAndChild(actions) {
  const run = newRun();
  const opts = { timeoutMs: UNARY_MS, headers: sdkHeaders(run) };
  const root = await actions.enqueue(taskAction(run, "a0"), opts);
  assert.equal(root.$typeName, "flyteidl2.actions.EnqueueResponse");
  const child = await actions.enqueue(taskAction(run, "a1", "a0"), opts);
  assert.equal(child.$typeName, "flyteidl2.actions.EnqueueResponse");
  return run;
}

/**
 * Opens WatchForUpdates on `parent` and returns a reader whose `next()`
 * yields the next response (failing on end of stream) and whose `close()`
 * cancels the stream. The whole stream is bounded by STREAM_MS.
 */
export function watch(actions, run, parent) {
  const cancel = new AbortController();
  const stream = actions.watchForUpdates(
    { filter: { case: "parentActionId", value: actionId(run, parent) } },
    // Bounded by AbortSignal.timeout, whose timer does not keep the test
    // process alive once the stream is closed.
    {
      signal: AbortSignal.any([cancel.signal, AbortSignal.timeout(STREAM_MS)]),
      headers: sdkHeaders(run, parent),
    },
  );
  const it = stream[Symbol.asyncIterator]();
  return {
    async next() {
      const { value, done } = await it.next();
      assert.ok(!done, "WatchForUpdates ended; actionsd never ends a stream with OK while running");
      return value;
    },
    async close() {
      cancel.abort();
      await it.return?.().catch(() => {});
    },
  };
}

/** Asserts that `msg` is an ActionUpdate for `run`/`name` in `phase`; returns it. */
export function expectUpdate(msg, run, name, phase) {
  assert.equal(msg.message.case, "actionUpdate", `expected an ActionUpdate, got ${msg.message.case}`);
  const update = msg.message.value;
  const id = update.actionId;
  assert.deepEqual(
    { project: id?.run?.project, domain: id?.run?.domain, run: id?.run?.name, name: id?.name, phase: ActionPhase[update.phase] },
    { project: run.project, domain: run.domain, run: run.name, name, phase: ActionPhase[phase] },
  );
  return update;
}

export function expectSentinel(msg) {
  assert.equal(msg.message.case, "controlMessage", `expected the sentinel, got ${msg.message.case}`);
  assert.equal(msg.message.value.sentinel, true);
}

/**
 * The watch scenario: root and child enqueued; the stream sends the root,
 * then the child (both QUEUED), then one sentinel; moving the child to
 * RUNNING reaches the stream as the next message.
 */
export async function watchScenario(actions) {
  const run = await enqueueRootAndChild(actions);
  const stream = watch(actions, run, "a0");
  try {
    expectUpdate(await stream.next(), run, "a0", ActionPhase.QUEUED);
    expectUpdate(await stream.next(), run, "a1", ActionPhase.QUEUED);
    expectSentinel(await stream.next());

    await actions.update(
      { actionId: actionId(run, "a1"), attempt: 1, status: { phase: ActionPhase.RUNNING } },
      { timeoutMs: UNARY_MS },
    );
    // Exactly one sentinel: the next message is the live update.
    expectUpdate(await stream.next(), run, "a1", ActionPhase.RUNNING);
  } finally {
    await stream.close();
  }
}

/** Runs `call` and asserts it fails with a ConnectError of `code`. */
export async function expectCode(code, call) {
  await assert.rejects(call, (err) => {
    const e = ConnectError.from(err);
    assert.equal(Code[e.code], Code[code], `expected ${Code[code]}, got ${Code[e.code]}: ${e.message}`);
    assert.ok(e.rawMessage.length > 0, "the error carries a message");
    return true;
  });
}

/** Reads a stream to its first error (bounded by STREAM_MS). */
export async function drain(stream) {
  for await (const _ of stream) {
    // An unknown parent fails before anything is sent.
    assert.fail("WatchForUpdates of an unknown action sent a message");
  }
  assert.fail("WatchForUpdates of an unknown action ended with OK");
}
