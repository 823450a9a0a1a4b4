"""Write flwr's protobuf descriptors as a FileDescriptorSet, for `protoc --descriptor_set_in`.

The flwr wheel ships no .proto files, only the generated ``flwr/proto/*_pb2.py`` modules; each holds
its serialized FileDescriptorProto. This script collects the transitive closure of the files the
JVM Fleet client needs (the Fleet API and the message/object-tree types), dependencies first, and
writes them unchanged except for Java-only options (``java_package``, ``java_outer_classname``), which
do not affect the wire format. A sidecar ``OUT.txt`` records the flwr version and the files.

Usage: python dump_descriptors.py OUT.pb
"""

from __future__ import annotations

import importlib
import importlib.metadata
import sys
from pathlib import Path

from google.protobuf import descriptor_pb2

ROOTS = ("flwr.proto.fleet_pb2", "flwr.proto.message_pb2", "flwr.proto.heartbeat_pb2")
JAVA_PACKAGE = "dev.xpertfl.proto"


def closure(roots: tuple[str, ...]) -> list[descriptor_pb2.FileDescriptorProto]:
    """FileDescriptorProtos of ``roots`` and all their imports, each after its dependencies."""
    out: list[descriptor_pb2.FileDescriptorProto] = []
    seen: set[str] = set()

    def visit(fd) -> None:  # a google.protobuf.descriptor.FileDescriptor
        if fd.name in seen:
            return
        seen.add(fd.name)
        for dep in fd.dependencies:
            visit(dep)
        proto = descriptor_pb2.FileDescriptorProto()
        fd.CopyToProto(proto)
        proto.options.java_package = JAVA_PACKAGE
        stem = Path(proto.name).stem  # fleet.proto -> FleetProto (avoids clashes with message names)
        proto.options.java_outer_classname = "".join(p.capitalize() for p in stem.split("_")) + "Proto"
        out.append(proto)

    for name in roots:
        visit(importlib.import_module(name).DESCRIPTOR)
    return out


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print(__doc__, file=sys.stderr)
        return 2
    import flwr

    files = closure(ROOTS)
    out = Path(argv[1])
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_bytes(descriptor_pb2.FileDescriptorSet(file=files).SerializeToString())
    version = getattr(flwr, "__version__", None) or importlib.metadata.version("flwr")
    out.with_suffix(".txt").write_text(f"flwr {version}\n" + "".join(f"{f.name}\n" for f in files))
    print(f"{out}: {len(files)} files from flwr {version}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv))
