"""Generate gen/ from proto/ with betterproto2, or check that gen/ is current.

gen/number_service_gen/ gets the betterproto2 package: dataclass messages that carry
their protobuf descriptors (which server reflection serves), the async grpclib
service bases and the async typed stubs.

    python tools/codegen.py           # rewrite gen/number_service_gen
    python tools/codegen.py --check   # exit 1 if gen/ differs from proto/

protoc comes from grpcio-tools and the plugin from betterproto2-compiler, both
pinned in requirements/dev.lock, so the output is reproducible byte for byte.
"""

from __future__ import annotations

import argparse
import filecmp
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROTO_DIR = ROOT / "proto"
PACKAGE = "number_service_gen"
TARGET = ROOT / "gen" / PACKAGE
# grpclib servers and clients, both async; each message gets its DESCRIPTOR (in a pool
# of the generated package's own), which is what server reflection describes.
OPTIONS = "client_generation=async,server_generation=async,google_protobuf_descriptors"


def generate(out: Path) -> None:
    """Write the betterproto2 package for every .proto under proto/ into out."""
    protos = sorted(str(p.relative_to(PROTO_DIR)) for p in PROTO_DIR.rglob("*.proto"))
    out.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ)
    # protoc finds protoc-gen-python_betterproto2 on PATH, beside this Python.
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "grpc_tools.protoc",
            f"-I{PROTO_DIR}",
            f"--python_betterproto2_out={out}",
            f"--python_betterproto2_opt={OPTIONS}",
            *protos,
        ],
        cwd=PROTO_DIR,
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
    with tempfile.TemporaryDirectory() as tmp:
        fresh = Path(tmp) / PACKAGE
        generate(fresh)
        if args.check:
            diff = differences(fresh, TARGET) if TARGET.exists() else [str(TARGET)]
            for path in diff:
                print(f"gen/{PACKAGE}/{path} differs from what proto/ generates", file=sys.stderr)
            if diff:
                print("run: ./dev regen", file=sys.stderr)
            return 1 if diff else 0
        shutil.rmtree(TARGET, ignore_errors=True)
        shutil.copytree(fresh, TARGET)
    print(f"wrote {TARGET.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
