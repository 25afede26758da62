"""Generate gen/ from proto/ (and tests/gen/ from tests/proto/) with betterproto2, or
check that all of it is current.

Each target compiles the .proto files of one directory into one package, with the
plugin options it says (betterproto2's defaults make a sync grpcio client and no
server, so every target names its options, "" included):

- gen/number_service_gen/ from proto/: dataclass messages that carry their protobuf
  descriptors (which server reflection serves), the async grpclib service bases
  and the async typed stubs;
- tests/gen/fieldkinds_gen/ from tests/proto/fieldkinds/ (test-only): the message with
  every kind of field that the generic wire check is tested on, made without
  descriptors, since that check must work for any betterproto2 output;
- tests/gen/maxecho_gen/ from tests/proto/maxecho/ (test-only): a second service,
  generated as NumberService is (async base and stub, descriptors for reflection),
  which the serving layer is tested on.

    python tools/codegen.py           # rewrite every target's package
    python tools/codegen.py --check   # exit 1 if any differs from its protos

A .proto under proto/ or tests/proto/ that no target compiles is an error too.
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


#: grpclib servers and clients, both async; each message gets its DESCRIPTOR (in a
#: pool of the generated package's own), which is what server reflection describes.
SERVED = "client_generation=async,server_generation=async,google_protobuf_descriptors"
#: betterproto2's defaults (messages without DESCRIPTOR; no server, a sync client).
PLAIN = ""


@dataclass(frozen=True)
class Target:
    """One generated package: every .proto under ``root / subdir`` compiled into
    ``package``, imports resolved from ``root`` (protoc's -I), with plugin ``options``."""

    root: Path
    subdir: str
    package: Path
    options: str

    def protos(self) -> list[Path]:
        """This target's .proto files, relative to ``root`` (as protoc is given them)."""
        return sorted(p.relative_to(self.root) for p in (self.root / self.subdir).rglob("*.proto"))


TESTS = ROOT / "tests"
TARGETS = (
    Target(ROOT / "proto", ".", ROOT / "gen" / "number_service_gen", SERVED),
    # Test-only, and deliberately without DESCRIPTOR: the wire check must not need it.
    Target(TESTS / "proto", "fieldkinds", TESTS / "gen" / "fieldkinds_gen", PLAIN),
    # Test-only: a second served service; reflection's describe needs its descriptors.
    Target(TESTS / "proto", "maxecho", TESTS / "gen" / "maxecho_gen", SERVED),
)


def generate(target: Target, out: Path) -> None:
    """Write the betterproto2 package for every .proto of ``target`` into out."""
    protos = [str(p) for p in target.protos()]
    out.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ)
    # protoc finds protoc-gen-python_betterproto2 on PATH, beside this Python.
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "grpc_tools.protoc",
            f"-I{target.root}",
            f"--python_betterproto2_out={out}",
            *([f"--python_betterproto2_opt={target.options}"] if target.options else []),
            *protos,
        ],
        cwd=target.root,
        env=env,
        capture_output=True,
        text=True,
    )
    if done.returncode != 0:  # the plugin chatters on stderr; show it only on failure
        sys.exit(f"protoc failed ({done.returncode}):\n{done.stderr}")


def uncompiled() -> list[Path]:
    """.proto files under a target's root that no target compiles (a new directory
    under tests/proto/, say, whose package would otherwise silently not exist)."""
    compiled = {t.root / p for t in TARGETS for p in t.protos()}
    roots = {t.root for t in TARGETS}
    return sorted(p for root in roots for p in root.rglob("*.proto") if p not in compiled)


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
    for proto in uncompiled():
        print(
            f"{proto.relative_to(ROOT)} is compiled by no target in tools/codegen.py",
            file=sys.stderr,
        )
        drifted = True
    if drifted:
        return 1
    for target in TARGETS:
        name = target.package.relative_to(ROOT)
        with tempfile.TemporaryDirectory() as tmp:
            fresh = Path(tmp) / target.package.name
            generate(target, fresh)
            if args.check:
                diff = differences(fresh, target.package) if target.package.exists() else [""]
                for path in diff:
                    source = (target.root / target.subdir).resolve().relative_to(ROOT)
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
