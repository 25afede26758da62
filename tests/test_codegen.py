"""gen/ and tests/gen/ are exactly what tools/codegen.py makes from proto/ and
tests/proto/; drift in either is caught."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def check(root: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(root / "tools" / "codegen.py"), "--check"],
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_gen_matches_proto() -> None:
    done = check(ROOT)
    assert done.returncode == 0, done.stderr


def copy_of_the_sources(tmp_path: Path) -> Path:
    """What codegen reads, pyproject.toml included: the plugin formats with ruff, which
    takes its line length from there."""
    for part in ("proto", "gen", "tools", "tests/proto", "tests/gen"):
        shutil.copytree(ROOT / part, tmp_path / part, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path)
    assert check(tmp_path).returncode == 0
    return tmp_path


def test_drift_is_detected(tmp_path: Path) -> None:
    root = copy_of_the_sources(tmp_path)
    proto = root / "proto" / "tutorial" / "number.proto"
    proto.write_text(proto.read_text().replace("int32 num = 1;", "int32 num = 1;\n  int32 x = 2;"))
    done = check(root)
    assert done.returncode == 1
    assert "gen/number_service_gen/tutorial/__init__.py differs" in done.stderr
    assert "tests/gen" not in done.stderr


def test_drift_in_the_test_protos_is_detected(tmp_path: Path) -> None:
    root = copy_of_the_sources(tmp_path)
    proto = root / "tests" / "proto" / "fieldkinds" / "fieldkinds.proto"
    proto.write_text(proto.read_text().replace("int32 a = 1;", "int32 a = 1;\n  int32 b = 5;"))
    done = check(root)
    assert done.returncode == 1
    assert "tests/gen/fieldkinds_gen/testing/fieldkinds/__init__.py differs" in done.stderr
    assert "gen/number_service_gen" not in done.stderr.replace("tests/gen/", "")


def test_wire_contract_matches_the_go_original() -> None:
    """Only comments and file options may differ from the published contract."""
    text = (ROOT / "proto" / "tutorial" / "number.proto").read_text()
    body = [
        line.strip()
        for line in text.splitlines()
        if line.strip() and not line.strip().startswith(("//", "option "))
    ]
    assert body == [
        'syntax = "proto3";',
        "package tutorial;",
        "message NumberRequest {",
        "int32 num = 1;",
        "}",
        "message NumberResponse {",
        "int32 sum = 1;",
        "}",
        "service NumberService {",
        "rpc AccumulateNumbers (stream NumberRequest) returns (stream NumberResponse);",
        "}",
    ]


def test_drift_in_the_second_services_proto_is_detected(tmp_path: Path) -> None:
    root = copy_of_the_sources(tmp_path)
    proto = root / "tests" / "proto" / "maxecho" / "maxecho.proto"
    proto.write_text(
        proto.read_text().replace("string text = 1;", "string text = 1;\n  int32 n = 2;")
    )
    done = check(root)
    assert done.returncode == 1
    assert "tests/gen/maxecho_gen/testing/maxecho/__init__.py differs" in done.stderr
    assert "fieldkinds_gen" not in done.stderr


def test_a_proto_that_no_target_compiles_is_an_error(tmp_path: Path) -> None:
    root = copy_of_the_sources(tmp_path)
    (root / "tests" / "proto" / "other").mkdir()
    (root / "tests" / "proto" / "other" / "other.proto").write_text('syntax = "proto3";\n')
    done = check(root)
    assert done.returncode == 1
    assert "tests/proto/other/other.proto is compiled by no target" in done.stderr
