"""Another git revision of this repository as a benchmark server (``compare --against REV``).

The revision is checked out into a detached git worktree in the cache
(``CACHE/rev-<sha>``, reused by later runs) and gets its own virtualenv from its own
``./dev``: ``./dev serve --help`` installs that revision's runtime lock into its
``.venv`` (the dev lock is not needed to serve, and costs ~3x the time and ~10x the
space). Its server is then that venv's ``python -m number_service serve``, run in the
worktree: the same CLI as ours, so every revision that has it can be compared.

To clean the cache: ``rm -rf CACHE/rev-*`` and then ``git worktree prune``, which
forgets worktrees whose directories are gone (a later ``--against`` re-adds one itself).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BUILD_TIMEOUT = 900.0  # a cold pip install of the runtime lock takes ~10-60 s


class RevisionError(Exception):
    """The revision could not be found, checked out or built: the run fails."""


@dataclass
class Revision:
    """A prepared revision: where it is checked out and the interpreter of its venv."""

    rev: str  # as the user wrote it
    sha: str
    label: str  # the server's name in the table: "REV (<short sha>)"
    worktree: Path
    python: Path
    module: str  # number_service.__file__ in that venv: inside the worktree
    python_version: str
    prepared: str  # what was done: checked out and/or built, in how long

    def argv(self) -> list[str]:
        return [str(self.python), "-m", "number_service", "serve", "--log-level", "warning"]

    def as_json(self) -> dict[str, str]:
        return {
            "rev": self.rev,
            "sha": self.sha,
            "label": self.label,
            "worktree": str(self.worktree),
            "python": str(self.python),
            "module": self.module,
            "python_version": self.python_version,
            "prepared": self.prepared,
        }


def git(*args: str, cwd: Path = ROOT) -> str:
    done = subprocess.run(
        ["git", *args], cwd=cwd, capture_output=True, text=True, timeout=300, check=False
    )
    if done.returncode != 0:
        raise RevisionError(f"git {' '.join(args)}: {done.stderr.strip() or done.stdout.strip()}")
    return done.stdout.strip()


def resolve(rev: str) -> tuple[str, str]:
    """The full and the short sha of ``rev`` (a branch, tag, sha, ``HEAD~2`` ...)."""
    try:
        sha = git("rev-parse", "--verify", "--quiet", f"{rev}^{{commit}}")
    except RevisionError:
        raise RevisionError(f"--against {rev}: no such commit in {ROOT}") from None
    return sha, git("rev-parse", "--short", sha)


def label(rev: str, sha: str, short: str) -> str:
    """``main (84aad37)``; a sha given as REV is not repeated: ``84aad37``."""
    return short if sha.startswith(rev.lower()) else f"{rev} ({short})"


def clean_env() -> dict[str, str]:
    """Our environment without our venv, so the revision's ./dev and server use theirs.

    PYTHON is the interpreter our venv was made from, so both servers run on the same
    Python (./dev makes its venv with $PYTHON).
    """
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONPATH")}
    ours = str(Path(sys.prefix) / "bin")
    env["PATH"] = os.pathsep.join(p for p in env.get("PATH", "").split(os.pathsep) if p != ours)
    base = Path(sys.base_prefix) / "bin" / f"python{sys.version_info[0]}.{sys.version_info[1]}"
    if base.exists():
        env["PYTHON"] = str(base)
    return env


@contextlib.contextmanager
def locked(path: Path) -> Iterator[None]:
    """One bench at a time prepares a given revision."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        yield


def checkout(sha: str, path: Path) -> bool:
    """A detached worktree of ``sha`` at ``path``; False if one was there already."""
    if (path / ".git").exists():
        with contextlib.suppress(RevisionError):
            if git("rev-parse", "HEAD", cwd=path) == sha:
                return False
    if path.exists():  # half made, or moved to another commit: start again
        shutil.rmtree(path)
    # --force: also when git still lists ``path`` after its directory was deleted.
    git("worktree", "add", "--force", "--detach", str(path), sha)
    return True


def prepare(rev: str, cache: Path) -> Revision:
    """Check ``rev`` out into the cache (or reuse it there) and build its venv."""
    sha, short = resolve(rev)
    path = (cache / f"rev-{sha}").resolve()
    started = time.monotonic()
    with locked(cache / f"rev-{sha}.lock"):
        fresh = checkout(sha, path)
        checked_out = time.monotonic()
        env = clean_env()
        try:  # its ./dev installs its own runtime lock (a no-op when it is there)
            built = subprocess.run(
                [str(path / "dev"), "serve", "--help"],
                cwd=path,
                env=env,
                stdin=subprocess.DEVNULL,
                capture_output=True,
                text=True,
                timeout=BUILD_TIMEOUT,
                check=False,
            )
        except subprocess.TimeoutExpired:
            raise RevisionError(
                f"{rev}: ./dev serve --help took over {BUILD_TIMEOUT:g} s"
            ) from None
        if built.returncode != 0:
            tail = "\n".join((built.stderr or built.stdout).strip().splitlines()[-15:])
            raise RevisionError(f"{rev}: its ./dev serve --help failed in {path}:\n{tail}")
        # A ./dev that knows PYTHON puts its venv in .venv-X.Y; an older one in .venv.
        versioned = path / f".venv-{sys.version_info[0]}.{sys.version_info[1]}" / "bin" / "python"
        python = versioned if versioned.exists() else path / ".venv" / "bin" / "python"
        where = subprocess.run(
            [
                str(python),
                "-c",
                "import number_service, sys; print(number_service.__file__)\n"
                "print(sys.version.split()[0])",
            ],
            cwd=path,
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
    lines = where.stdout.split()
    if where.returncode != 0 or len(lines) != 2:
        raise RevisionError(f"{rev}: its venv cannot import number_service: {where.stderr}")
    module, version = lines
    if not Path(module).resolve().is_relative_to(path):  # else we would time another tree
        raise RevisionError(f"{rev}: its venv imports number_service from {module}, not {path}")
    done = time.monotonic()
    what = f"checked out in {checked_out - started:.1f} s, " if fresh else "worktree reused, "
    what += f"venv ready in {done - checked_out:.1f} s"
    return Revision(rev, sha, label(rev, sha, short), path, python, module, version, prepared=what)
