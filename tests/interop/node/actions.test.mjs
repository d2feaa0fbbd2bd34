// ActionsService through @connectrpc/connect-node over every protocol
// actionsd serves: Connect (JSON and binary, HTTP/1.1 and HTTP/2), gRPC and
// gRPC-Web. Needs ACTIONSD_ADDR (host:port of a running actionsd).
import assert from "node:assert/strict";
import { describe, test } from "node:test";
import { createClient } from "@connectrpc/connect";
import { compressionGzip, createConnectTransport } from "@connectrpc/connect-node";
import { ReadService } from "./gen/actionsd/read/v1/read_pb.js";
import {
  ActionPhase,
  Code,
  STREAM_MS,
  UNARY_MS,
  actionId,
  baseUrl,
  client,
  drain,
  enqueueRootAndChild,
  expectCode,
  expectSentinel,
  expectUpdate,
  newRun,
  taskAction,
  transports,
  watch,
  watchScenario,
} from "./scenario.mjs";

// A backstop above the per-call bounds: a hanging test fails.
const TEST = { timeout: 30_000 };

test("ACTIONSD_ADDR names the daemon under test", () => {
  assert.match(baseUrl(), /^http:\/\/[^/]+:\d+$/);
});

for (const [name, makeTransport] of Object.entries(transports)) {
  describe(name, () => {
    test("Enqueue a root task, then a child; the same child again is OK", TEST, async () => {
      const actions = client(makeTransport());
      const run = await enqueueRootAndChild(actions);
      const again = await actions.enqueue(taskAction(run, "a1", "a0"), { timeoutMs: UNARY_MS });
      assert.equal(again.$typeName, "flyteidl2.actions.EnqueueResponse");
    });

    test("WatchForUpdates: root, child, one sentinel, then the live update", TEST, async () => {
      await watchScenario(client(makeTransport()));
    });

    test("ReadService: ListActions, GetHistory and WatchRun of a run", TEST, async () => {
      const transport = makeTransport();
      const run = await enqueueRootAndChild(client(transport));
      const reads = createClient(ReadService, transport);
      const listed = await reads.listActions({ run, limit: 1 }, { timeoutMs: UNARY_MS });
      assert.deepEqual(listed.actions.map((a) => a.id.name), ["a0"]);
      assert.notEqual(listed.nextPageToken, "");
      const rest = await reads.listActions(
        { run, limit: 10, pageToken: listed.nextPageToken },
        { timeoutMs: UNARY_MS },
      );
      assert.deepEqual(rest.actions.map((a) => [a.id.name, a.parentName]), [["a1", "a0"]]);
      assert.equal(rest.nextPageToken, "");
      const history = await reads.getHistory({ id: actionId(run, "a1") }, { timeoutMs: UNARY_MS });
      assert.deepEqual(history.events.map((e) => [e.version, e.phase]), [[1n, ActionPhase.QUEUED]]);
      const seen = [];
      for await (const msg of reads.watchRun({ run }, { signal: AbortSignal.timeout(STREAM_MS) })) {
        if (msg.message.case === "sentinel") break;
        seen.push(msg.message.value.id.name);
      }
      assert.deepEqual(seen, ["a0", "a1"]);
      await expectCode(Code.NotFound, () =>
        reads.getAction({ id: actionId(run, "zz") }, { timeoutMs: UNARY_MS }),
      );
    });

    test("Update and WatchForUpdates of an unknown action fail with NotFound", TEST, async () => {
      const actions = client(makeTransport());
      const run = newRun();
      await expectCode(Code.NotFound, () =>
        actions.update(
          { actionId: actionId(run, "a0"), attempt: 1, status: { phase: ActionPhase.RUNNING } },
          { timeoutMs: UNARY_MS },
        ),
      );
      await expectCode(Code.NotFound, () =>
        drain(
          actions.watchForUpdates(
            { filter: { case: "parentActionId", value: actionId(run, "a0") } },
            { signal: AbortSignal.timeout(STREAM_MS) },
          ),
        ),
      );
    });
  });
}

for (const useBinaryFormat of [false, true]) {
  test(`Connect ${useBinaryFormat ? "binary" : "JSON"} with gzip: unary and streaming`, TEST, async () => {
    // Every request is compressed (no size threshold); an interceptor records
    // the encodings actually negotiated on the wire.
    const seen = [];
    const transport = createConnectTransport({
      baseUrl: baseUrl(),
      httpVersion: "1.1",
      useBinaryFormat,
      sendCompression: compressionGzip,
      acceptCompression: [compressionGzip],
      compressMinBytes: 0,
      interceptors: [
        (next) => async (req) => {
          const res = await next(req);
          seen.push({
            method: req.method.name,
            request: req.header.get(req.stream ? "connect-content-encoding" : "content-encoding"),
            response: res.header.get(res.stream ? "connect-content-encoding" : "content-encoding"),
          });
          return res;
        },
      ],
    });
    const actions = client(transport);

    // A root trace whose output_uri is long enough (> 1 KiB) for actionsd to
    // compress the ActionUpdate that carries it.
    const run = newRun();
    const outputUri = `s3://b/${run.name}/` + "o".repeat(1500);
    await actions.enqueue(
      {
        action: {
          actionId: actionId(run, "a0"),
          inputUri: "s3://b/i",
          runOutputBase: "s3://b/o",
          spec: { case: "trace", value: { name: "tr", outputs: { outputUri } } },
        },
      },
      { timeoutMs: UNARY_MS },
    );

    const stream = watch(actions, run, "a0");
    try {
      const update = expectUpdate(await stream.next(), run, "a0", ActionPhase.SUCCEEDED);
      assert.equal(update.outputUri, outputUri);
      expectSentinel(await stream.next());
    } finally {
      await stream.close();
    }

    assert.deepEqual(
      seen.map(({ method, request }) => [method, request]),
      [["Enqueue", "gzip"], ["WatchForUpdates", "gzip"]],
    );
    assert.equal(seen[1].response, "gzip", "the large ActionUpdate comes back compressed");
  });
}
