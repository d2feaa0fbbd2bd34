"""The official Python clients over TLS with a client certificate (mTLS).

Run by tests/interop/run.sh against a second actionsd started with
--tls-cert, --tls-key and --tls-client-ca (client certificates required).
Not collected by a plain `pytest` run (the name does not start with
`test_`): it needs ACTIONSD_TLS_ADDR (localhost:PORT) and the PEM files
named by ACTIONSD_TLS_CA, ACTIONSD_TLS_CLIENT_CERT, ACTIONSD_TLS_CLIENT_KEY.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import grpc
import pyqwest
import pytest
from flyteidl2.actions.actions_service_connect import ActionsServiceClient
from flyteidl2.actions.actions_service_pb2_grpc import ActionsServiceStub

from conftest import (
    QUEUED,
    TIMEOUT,
    ConnectWatcher,
    GrpcWatcher,
    assert_snapshot,
    enqueue_task,
    new_run,
    sdk_headers,
)

TIMEOUT_MS = int(TIMEOUT * 1000)


@dataclass(frozen=True)
class Tls:
    address: str
    ca: bytes
    cert: bytes
    key: bytes


@pytest.fixture(scope="session")
def tls() -> Tls:
    names = ["ACTIONSD_TLS_ADDR", "ACTIONSD_TLS_CA", "ACTIONSD_TLS_CLIENT_CERT", "ACTIONSD_TLS_CLIENT_KEY"]
    missing = [n for n in names if not os.environ.get(n, "").strip()]
    if missing:
        pytest.fail(f"{', '.join(missing)} not set: run tests/interop/run.sh", pytrace=False)
    read = lambda name: Path(os.environ[name]).read_bytes()  # noqa: E731
    return Tls(
        address=os.environ["ACTIONSD_TLS_ADDR"],
        ca=read("ACTIONSD_TLS_CA"),
        cert=read("ACTIONSD_TLS_CLIENT_CERT"),
        key=read("ACTIONSD_TLS_CLIENT_KEY"),
    )


def test_grpcio_with_root_certificates_and_a_client_certificate(tls):
    credentials = grpc.ssl_channel_credentials(
        root_certificates=tls.ca, private_key=tls.key, certificate_chain=tls.cert
    )
    with grpc.secure_channel(tls.address, credentials) as channel:
        grpc.channel_ready_future(channel).result(timeout=TIMEOUT)
        stub = ActionsServiceStub(channel)
        run = new_run()
        stub.Enqueue(enqueue_task(run, "a0"), timeout=TIMEOUT, metadata=tuple(sdk_headers(run, None).items()))
        stub.Enqueue(enqueue_task(run, "a1", "a0"), timeout=TIMEOUT, metadata=tuple(sdk_headers(run, "a0").items()))
        with GrpcWatcher(stub, run, "a0", metadata=sdk_headers(run, "a0").items()) as watcher:
            assert_snapshot(watcher.snapshot(), run, "a0", {"a0": QUEUED, "a1": QUEUED})


def test_grpcio_without_a_client_certificate_is_refused(tls):
    credentials = grpc.ssl_channel_credentials(root_certificates=tls.ca)
    with grpc.secure_channel(tls.address, credentials) as channel:
        with pytest.raises(grpc.RpcError) as info:
            ActionsServiceStub(channel).Enqueue(enqueue_task(new_run(), "a0"), timeout=5)
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE, info.value


def test_grpcio_with_an_unknown_ca_is_refused(tls):
    # The client certificate is not a CA of the server's certificate.
    credentials = grpc.ssl_channel_credentials(
        root_certificates=tls.cert, private_key=tls.key, certificate_chain=tls.cert
    )
    with grpc.secure_channel(tls.address, credentials) as channel:
        with pytest.raises(grpc.RpcError) as info:
            ActionsServiceStub(channel).Enqueue(enqueue_task(new_run(), "a0"), timeout=5)
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE, info.value


@pytest.mark.parametrize("http_version", [pyqwest.HTTPVersion.HTTP1, pyqwest.HTTPVersion.HTTP2], ids=["http1", "http2"])
async def test_connectrpc_with_a_client_certificate(tls, http_version):
    transport = pyqwest.HTTPTransport(
        http_version=http_version, tls_ca_cert=tls.ca, tls_cert=tls.cert, tls_key=tls.key
    )
    try:
        client = ActionsServiceClient(f"https://{tls.address}", http_client=pyqwest.Client(transport))
        run = new_run()
        await client.enqueue(enqueue_task(run, "a0"), headers=sdk_headers(run, None), timeout_ms=TIMEOUT_MS)
        await client.enqueue(enqueue_task(run, "a1", "a0"), headers=sdk_headers(run, "a0"), timeout_ms=TIMEOUT_MS)
        async with ConnectWatcher(client, run, "a0", headers=sdk_headers(run, "a0")) as watcher:
            assert_snapshot(await watcher.snapshot(), run, "a0", {"a0": QUEUED, "a1": QUEUED})
    finally:
        await transport.aclose()


async def test_connectrpc_without_a_client_certificate_is_refused(tls):
    transport = pyqwest.HTTPTransport(tls_ca_cert=tls.ca)
    try:
        client = ActionsServiceClient(f"https://{tls.address}", http_client=pyqwest.Client(transport))
        with pytest.raises(Exception):
            await client.enqueue(enqueue_task(new_run(), "a0"), timeout_ms=5000)
    finally:
        await transport.aclose()
