"""Shared test set-up. The number_* fixtures come from our own pytest plugin."""

from __future__ import annotations

import importlib
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def pb2_modules(tmp_path_factory: pytest.TempPathFactory) -> tuple[ModuleType, ModuleType]:
    """grpcio's number_pb2 and number_pb2_grpc, generated from proto/ for this run."""
    out = tmp_path_factory.mktemp("grpcio_gen")
    subprocess.run(
        [
            sys.executable,
            "-m",
            "grpc_tools.protoc",
            f"-I{ROOT / 'proto'}",
            f"--python_out={out}",
            f"--grpc_python_out={out}",
            "tutorial/number.proto",
        ],
        check=True,
        cwd=ROOT / "proto",
    )
    sys.path.insert(0, str(out))
    try:
        pb2 = importlib.import_module("tutorial.number_pb2")
        pb2_grpc = importlib.import_module("tutorial.number_pb2_grpc")
    finally:
        sys.path.remove(str(out))
    return pb2, pb2_grpc


@pytest.fixture(scope="session")
def pb2(pb2_modules: tuple[ModuleType, ModuleType]) -> ModuleType:
    """Google's protobuf classes for proto/tutorial/number.proto: the reference codec."""
    return pb2_modules[0]
