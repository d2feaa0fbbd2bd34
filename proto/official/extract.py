"""Writes the descriptor set of the official flyteidl2 package.

actionsd declares the payloads it does not interpret (TaskSpec, RunSpec,
...) as bytes in proto/. For the Connect JSON codec, and to compare
re-enqueued actions by content rather than by byte order, it needs the full
schema: this script writes the descriptors of the flyteidl2 services
actionsd serves and everything they import, as published in the flyteidl2 package on PyPI.

    python -m venv /tmp/flyteidl2 && /tmp/flyteidl2/bin/pip install flyteidl2==2.0.53
    /tmp/flyteidl2/bin/python proto/official/extract.py proto/official/flyteidl2.binpb
"""

import sys

from google.protobuf import descriptor_pb2

import flyteidl2.actions.actions_service_pb2 as actions
import flyteidl2.cluster.service_pb2 as cluster
import flyteidl2.dataproxy.dataproxy_service_pb2 as dataproxy
import flyteidl2.workflow.run_service_pb2 as runs

# The services actionsd serves, with everything they import.
ROOTS = [actions.DESCRIPTOR, cluster.DESCRIPTOR, dataproxy.DESCRIPTOR, runs.DESCRIPTOR]


def main(out: str) -> None:
    ordered, seen = [], set()

    def visit(file) -> None:
        if file.name in seen:
            return
        seen.add(file.name)
        for dependency in file.dependencies:
            visit(dependency)
        proto = descriptor_pb2.FileDescriptorProto()
        file.CopyToProto(proto)
        ordered.append(proto)

    for root in ROOTS:
        visit(root)
    fds = descriptor_pb2.FileDescriptorSet(file=ordered)
    with open(out, "wb") as f:
        f.write(fds.SerializeToString(deterministic=True))
    print(f"{len(ordered)} files, {fds.ByteSize()} bytes -> {out}")


if __name__ == "__main__":
    main(sys.argv[1])
