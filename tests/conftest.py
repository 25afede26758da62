"""Shared test set-up. The number_* fixtures come from our own pytest plugin."""

from __future__ import annotations

import os
from pathlib import Path
from types import ModuleType

import pytest
from grpcio_peer import Grpcio, generate, protobuf_module
from hypothesis import settings

# CI must be reproducible: the same examples every run, no example database.
# Locally, hypothesis keeps exploring and remembers what failed.
settings.register_profile("ci", derandomize=True, database=None, deadline=None)
if os.environ.get("CI"):
    settings.load_profile("ci")


@pytest.fixture(scope="session")
def grpcio_gen(tmp_path_factory: pytest.TempPathFactory) -> Grpcio:
    """grpcio's number_pb2 and number_pb2_grpc, generated from proto/ for this run."""
    return generate(tmp_path_factory.mktemp("grpcio_gen"))


@pytest.fixture(scope="session")
def pb2(grpcio_gen: Grpcio) -> ModuleType:
    """Google's protobuf classes for proto/tutorial/number.proto: the reference codec."""
    return grpcio_gen.pb2


@pytest.fixture(scope="session")
def fieldkinds_pb2(tmp_path_factory: pytest.TempPathFactory) -> ModuleType:
    """Google's classes for tests/proto/fieldkinds/fieldkinds.proto: the wire reference."""
    return protobuf_module(
        tmp_path_factory.mktemp("fieldkinds_pb2"),
        Path(__file__).resolve().parent / "proto",
        "fieldkinds/fieldkinds.proto",
    )
