// The @connectrpc/connect-node transports over TLS with a client
// certificate (mTLS): Connect (HTTP/1.1 and HTTP/2), gRPC and gRPC-Web.
// Run by tests/interop/run.sh (`node --test tls.check.mjs`) against an
// actionsd started with --tls-cert, --tls-key and --tls-client-ca; not
// picked up by a plain `node --test`. Needs ACTIONSD_TLS_ADDR
// (localhost:PORT) and the PEM files named by ACTIONSD_TLS_CA,
// ACTIONSD_TLS_CLIENT_CERT and ACTIONSD_TLS_CLIENT_KEY.
import assert from "node:assert/strict";
import { readFileSync } from "node:fs";
import { describe, test } from "node:test";
import {
  createConnectTransport,
  createGrpcTransport,
  createGrpcWebTransport,
} from "@connectrpc/connect-node";
import { ActionPhase, UNARY_MS, client, enqueueRootAndChild, expectUpdate, taskAction, watch } from "./scenario.mjs";

const TEST = { timeout: 30_000 };

function env(name) {
  const value = process.env[name];
  if (!value) throw new Error(`${name} is not set: run tests/interop/run.sh`);
  return value;
}

const baseUrl = `https://${env("ACTIONSD_TLS_ADDR")}`;
const ca = readFileSync(env("ACTIONSD_TLS_CA"));
const withCert = { ca, cert: readFileSync(env("ACTIONSD_TLS_CLIENT_CERT")), key: readFileSync(env("ACTIONSD_TLS_CLIENT_KEY")) };

const transports = {
  "Connect JSON, HTTP/1.1": (nodeOptions) =>
    createConnectTransport({ baseUrl, httpVersion: "1.1", useBinaryFormat: false, nodeOptions }),
  "Connect binary, HTTP/2": (nodeOptions) =>
    createConnectTransport({ baseUrl, httpVersion: "2", useBinaryFormat: true, nodeOptions }),
  "gRPC, HTTP/2": (nodeOptions) => createGrpcTransport({ baseUrl, httpVersion: "2", nodeOptions }),
  "gRPC-Web, HTTP/1.1": (nodeOptions) =>
    createGrpcWebTransport({ baseUrl, httpVersion: "1.1", nodeOptions }),
};

for (const [name, makeTransport] of Object.entries(transports)) {
  describe(`${name} over TLS`, () => {
    test("Enqueue and WatchForUpdates with a client certificate", TEST, async () => {
      const actions = client(makeTransport(withCert));
      const run = await enqueueRootAndChild(actions);
      const stream = watch(actions, run, "a0");
      try {
        expectUpdate(await stream.next(), run, "a0", ActionPhase.QUEUED);
        expectUpdate(await stream.next(), run, "a1", ActionPhase.QUEUED);
      } finally {
        await stream.close();
      }
    });

    test("without a client certificate the call fails", TEST, async () => {
      const actions = client(makeTransport({ ca }));
      const run = { project: "p", domain: "d", name: "tls-refused" };
      await assert.rejects(actions.enqueue(taskAction(run, "a0"), { timeoutMs: UNARY_MS }));
    });
  });
}
