"""Generate gen/ from proto/ (and tests/gen/ from tests/proto/) with betterproto2, or
check that both are current.

gen/number_service_gen/ gets the betterproto2 package: dataclass messages that carry
their protobuf descriptors (which server reflection serves), the async grpclib
service bases and the async typed stubs. tests/gen/fieldkinds_gen/ is test-only: the
message with every kind of field that the generic wire check is tested on, made
without descriptors, since that check must work for any betterproto2 output.

    python tools/codegen.py           # rewrite gen/number_service_gen, tests/gen/fieldkinds_gen
    python tools/codegen.py --check   # exit 1 if either differs from its protos

protoc comes from grpcio-tools and the plugin from betterproto2-compiler, both
pinned in requirements/dev.lock, so the output is reproducible byte for byte. (The
plugin formats its output with ruff, which takes its line length from the
pyproject.toml it finds above the proto directory: this project's.)
"""

from __future__ import annotations

import argparse
import filecmp
import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Target:
    """One generated package: every .proto under ``protos`` compiled into ``package``."""

    protos: Path
    package: Path
    options: str


TARGETS = (
    # grpclib servers and clients, both async; each message gets its DESCRIPTOR (in a
    # pool of the generated package's own), which is what server reflection describes.
    Target(
        ROOT / "proto",
        ROOT / "gen" / "number_service_gen",
        "client_generation=async,server_generation=async,google_protobuf_descriptors",
    ),
    # Test-only, and deliberately without DESCRIPTOR (betterproto2's default).
    Target(ROOT / "tests" / "proto", ROOT / "tests" / "gen" / "fieldkinds_gen", ""),
)


def generate(target: Target, out: Path) -> None:
    """Write the betterproto2 package for every .proto of ``target`` into out."""
    protos = sorted(str(p.relative_to(target.protos)) for p in target.protos.rglob("*.proto"))
    out.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ)
    # protoc finds protoc-gen-python_betterproto2 on PATH, beside this Python.
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "grpc_tools.protoc",
            f"-I{target.protos}",
            f"--python_betterproto2_out={out}",
            *([f"--python_betterproto2_opt={target.options}"] if target.options else []),
            *protos,
        ],
        cwd=target.protos,
        env=env,
        capture_output=True,
        text=True,
    )
    if done.returncode != 0:  # the plugin chatters on stderr; show it only on failure
        sys.exit(f"protoc failed ({done.returncode}):\n{done.stderr}")


def differences(left: Path, right: Path) -> list[str]:
    """Relative paths of files that differ between two trees, or exist in one only."""
    found: list[str] = []

    def walk(cmp: filecmp.dircmp[str], prefix: str) -> None:
        for name in cmp.left_only + cmp.right_only + cmp.diff_files + cmp.funny_files:
            found.append(prefix + name)
        for name, sub in cmp.subdirs.items():
            walk(sub, f"{prefix}{name}/")

    walk(filecmp.dircmp(left, right, ignore=["__pycache__"]), "")
    return sorted(found)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="only compare, write nothing")
    args = parser.parse_args()
    drifted = False
    for target in TARGETS:
        name = target.package.relative_to(ROOT)
        with tempfile.TemporaryDirectory() as tmp:
            fresh = Path(tmp) / target.package.name
            generate(target, fresh)
            if args.check:
                diff = differences(fresh, target.package) if target.package.exists() else [""]
                for path in diff:
                    source = target.protos.relative_to(ROOT)
                    print(f"{name}/{path} differs from what {source}/ generates", file=sys.stderr)
                drifted = drifted or bool(diff)
                continue
            shutil.rmtree(target.package, ignore_errors=True)
            shutil.copytree(fresh, target.package)
        print(f"wrote {name}")
    if drifted:
        print("run: ./dev regen", file=sys.stderr)
    return 1 if drifted else 0


if __name__ == "__main__":
    sys.exit(main())
