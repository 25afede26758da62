"""What a wheel of this project installs: our two import packages, scripts, plugin."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> zipfile.ZipFile:
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--quiet",
            "--no-deps",
            "--no-build-isolation",
            "--wheel-dir",
            str(out),
            str(ROOT),
        ],
        check=True,
        capture_output=True,
        timeout=300,
    )
    (path,) = out.glob("number_service-*.whl")
    return zipfile.ZipFile(path)


def test_only_our_named_packages_are_installed(wheel: zipfile.ZipFile) -> None:
    top = {name.split("/")[0] for name in wheel.namelist()}
    top = {name for name in top if not name.endswith(".dist-info")}
    assert top == {"number_service", "number_service_gen"}  # never plain gen/ or service/


def test_typed_packages(wheel: zipfile.ZipFile) -> None:
    names = set(wheel.namelist())
    assert "number_service/py.typed" in names
    assert "number_service_gen/py.typed" in names
    assert "number_service_gen/tutorial/__init__.py" in names
    assert "number_service_gen/message_pool.py" in names  # betterproto2 registers messages here


def test_console_script_and_pytest_plugin(wheel: zipfile.ZipFile) -> None:
    (entry_points,) = [n for n in wheel.namelist() if n.endswith("entry_points.txt")]
    text = wheel.read(entry_points).decode()
    assert "number-service = number_service.cli:run" in text
    assert "[pytest11]" in text
    assert "number_service = number_service.pytest_plugin" in text
