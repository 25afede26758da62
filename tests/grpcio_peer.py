"""grpcio code for our protos, generated for a test run only.

grpcio (Google's gRPC for Python) is the foreign peer of our interop tests
(proto/tutorial/number.proto, and the second service's tests/proto/maxecho/, through
:func:`grpcio_modules`) and protobuf's parser the reference for our codecs (and,
through :func:`protobuf_module`, for the test-only tests/proto/); nothing generated
here is kept.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from types import ModuleType

from grpc_tools import protoc

PROTO_ROOT = Path(__file__).resolve().parents[1] / "proto"
PROTO_FILE = "tutorial/number.proto"


@dataclass(frozen=True)
class Grpcio:
    """The grpcio modules generated for one .proto (number.proto, unless said)."""

    pb2: ModuleType
    pb2_grpc: ModuleType


@contextmanager
def _importing_from(path: Path, package: str) -> Iterator[None]:
    """Import ``package`` from ``path``; afterwards sys.path and sys.modules are as before."""

    def loaded() -> list[str]:
        return [name for name in sys.modules if name == package or name.startswith(f"{package}.")]

    saved = {name: sys.modules.pop(name) for name in loaded()}
    sys.path.insert(0, str(path))
    importlib.invalidate_caches()
    try:
        yield
    finally:
        sys.path.remove(str(path))
        for name in loaded():
            del sys.modules[name]
        sys.modules.update(saved)


def protobuf_module(out: Path, proto_root: Path, proto_file: str) -> ModuleType:
    """Google's protobuf classes for one .proto (protoc --python_out into ``out``)."""
    well_known = resources.files("grpc_tools") / "_proto"  # google/protobuf/*.proto
    status = protoc.main(
        [
            "grpc_tools.protoc",
            f"--proto_path={proto_root}",
            f"--proto_path={well_known}",
            f"--python_out={out}",
            str(proto_root / proto_file),
        ]
    )
    assert status == 0, f"grpc_tools.protoc failed with {status}"
    module = proto_file.removesuffix(".proto").replace("/", ".") + "_pb2"
    with _importing_from(out, package=module.split(".")[0]):
        return importlib.import_module(module)


def grpcio_modules(out: Path, proto_root: Path, proto_file: str) -> Grpcio:
    """grpcio's messages and stubs for one .proto (protoc --python_out and
    --grpc_python_out into ``out``), imported."""
    status = protoc.main(
        [
            "grpc_tools.protoc",
            f"--proto_path={proto_root}",
            f"--python_out={out}",
            f"--grpc_python_out={out}",
            str(proto_root / proto_file),
        ]
    )
    assert status == 0, f"grpc_tools.protoc failed with {status}"
    module = proto_file.removesuffix(".proto").replace("/", ".")
    with _importing_from(out, package=module.split(".")[0]):
        pb2 = importlib.import_module(f"{module}_pb2")
        pb2_grpc = importlib.import_module(f"{module}_pb2_grpc")
    return Grpcio(pb2, pb2_grpc)


def generate(out: Path) -> Grpcio:
    """grpcio's modules for proto/tutorial/number.proto, generated into ``out``."""
    return grpcio_modules(out, PROTO_ROOT, PROTO_FILE)
