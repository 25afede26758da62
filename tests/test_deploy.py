"""deploy/: what can be checked without a container runtime or a cluster.

- The Kubernetes manifests validate against Kubernetes' own schemas (kubernetes-validate,
  offline, strict: unknown fields are errors), and agree with each other and with the
  image: gRPC probes on the port the server listens on, non-root, time to drain.
- The Dockerfile's build stage, replayed outside Docker on a context holding only what
  it COPYs: its RUN lines install a working ``number-service`` whose ``health`` (the
  HEALTHCHECK) answers SERVING for a server started from that install.
"""

from __future__ import annotations

import fnmatch
import json
import os
import re
import shlex
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml
from processes import HOST, READY_LINE, RUN_TIMEOUT, Lines, reap

from number_service.serving.grpclib_ext import DRAIN_PING_TIMEOUT
from number_service.serving.grpclib_ext.connections import CLOSE_WAIT
from number_service.serving.settings import DEFAULT_GRACE
from number_service.serving.streams import TRAILERS_WAIT
from number_service.serving.supervisor import KILL_AFTER

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
DOCKERFILE = DEPLOY / "Dockerfile"
MANIFESTS = sorted((DEPLOY / "k8s").glob("*.yaml"))
# The oldest Kubernetes we claim (native gRPC probes are GA from 1.27; preStop
# sleep is on by default from 1.30) and the newest the schemas know.
K8S_VERSIONS = ["1.30", kubernetes_validate.latest_version()]
PORT = 50051
VENV = "/opt/venv"  # where the Dockerfile installs; replaced by a tmp dir when replayed


# --- Dockerfile --------------------------------------------------------------------------


@dataclass
class Stage:
    image: str
    instructions: list[tuple[str, str]] = field(default_factory=list)

    def all(self, name: str) -> list[str]:
        return [args for instr, args in self.instructions if instr == name]

    def one(self, name: str) -> str:
        (args,) = self.all(name)
        return args


def stages() -> list[Stage]:
    """The Dockerfile's stages: instructions with continuation lines joined."""
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    result: list[Stage] = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        instr, _, args = line.partition(" ")
        instr, args = instr.upper(), " ".join(args.split())
        if instr == "FROM":
            result.append(Stage(args.split()[0]))
        else:
            result[-1].instructions.append((instr, args))
    return result


def exec_form(args: str) -> list[str]:
    """A JSON-array CMD (exec form: the server is PID 1 and gets SIGTERM itself)."""
    parsed = json.loads(args)
    assert isinstance(parsed, list), args
    return [str(word) for word in parsed]


def test_images_are_python_3_11_slim() -> None:
    assert [stage.image for stage in stages()] == ["python:3.11-slim"] * len(stages())


def test_runs_as_a_numeric_non_root_user() -> None:
    user = stages()[-1].one("USER")
    uid = user.split(":")[0]
    assert uid.isdigit(), f"USER {user}: a numeric uid lets runAsNonRoot verify it"
    assert int(uid) != 0


def test_serves_on_all_interfaces_on_the_exposed_port() -> None:
    final = stages()[-1]
    assert final.one("EXPOSE") == str(PORT)
    assert exec_form(final.one("CMD")) == ["number-service", "serve", "--host", "0.0.0.0"]


def test_healthcheck_runs_number_service_health() -> None:
    check = stages()[-1].one("HEALTHCHECK")
    options, _, command = check.partition("CMD ")
    assert exec_form(command)[:2] == ["number-service", "health"]
    timeout = re.search(r"--timeout=(\d+)s", options)
    health_timeout = exec_form(command)[exec_form(command).index("--timeout") + 1]
    assert timeout is not None
    assert float(health_timeout) < int(timeout.group(1))  # it answers before Docker gives up


def test_installs_the_runtime_lock_with_hashes_then_the_project_without_deps() -> None:
    runs = stages()[0].all("RUN")
    assert "pip install --require-hashes -r requirements/runtime.lock" in runs
    assert "pip install --no-deps --no-build-isolation ." in runs
    assert runs.index("pip install --require-hashes -r requirements/runtime.lock") < runs.index(
        "pip install --no-deps --no-build-isolation ."
    )
    assert stages()[-1].all("COPY") == [f"--from=build {VENV} {VENV}"]


def copied() -> list[tuple[str, str]]:
    """(source, destination) of every COPY from the build context."""
    pairs = []
    for stage in stages():
        for args in stage.all("COPY"):
            if args.startswith("--from="):
                continue
            *sources, destination = args.split()
            pairs += [(source, destination) for source in sources]
    return pairs


def dockerignored(path: str) -> bool:
    """Whether .dockerignore keeps ``path`` out of the context: the last pattern that
    matches it or a parent directory decides, ``!`` re-including (Docker's rule)."""
    patterns = [
        line.strip()
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    parts = path.rstrip("/").split("/")
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    ignored = False
    for pattern in patterns:
        negated = pattern.startswith("!")
        glob = pattern.removeprefix("!").rstrip("/").removeprefix("**/")
        if any(fnmatch.fnmatchcase(p, glob) for p in prefixes) or (
            pattern.removeprefix("!").startswith("**/")
            and any(fnmatch.fnmatchcase(part, glob) for part in parts)
        ):
            ignored = not negated
    return ignored


def test_every_copied_file_exists_and_is_in_the_build_context() -> None:
    assert copied()
    for source, _ in copied():
        assert (ROOT / source).exists(), f"COPY {source}: no such file in the repository"
        assert not dockerignored(source), f"COPY {source}: excluded by .dockerignore"
    # The ignore file does keep things out (secrets, local venvs, caches).
    assert dockerignored(".venv")
    assert dockerignored(".git")
    assert dockerignored("service/number_service/__pycache__")


def test_build_stage_replayed_outside_docker_installs_a_working_service(
    tmp_path: Path,
) -> None:
    """The build stage's COPY and RUN lines, run here with /opt/venv moved into
    tmp_path; then the HEALTHCHECK command, from that install, against its server."""
    build = stages()[0]
    venv = tmp_path / "venv"
    workdir = tmp_path / "context" / build.one("WORKDIR").lstrip("/")
    workdir.mkdir(parents=True)
    for source, destination in copied():
        target = workdir / destination
        if (ROOT / source).is_dir():
            shutil.copytree(
                ROOT / source,
                target,
                ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"),
            )
        elif destination.endswith("/"):
            target.mkdir(parents=True, exist_ok=True)
            shutil.copy(ROOT / source, target)
        else:
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(ROOT / source, target)
    env = {**os.environ, "PATH": f"{venv}/bin:{os.environ['PATH']}"}
    env.pop("VIRTUAL_ENV", None)
    for command in build.all("RUN"):
        done = subprocess.run(
            ["sh", "-c", command.replace(VENV, str(venv))],
            cwd=workdir,
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
            check=False,
        )
        assert done.returncode == 0, f"RUN {command}:\n{done.stdout}\n{done.stderr}"

    exe = venv / "bin" / "number-service"
    serve = exec_form(stages()[-1].one("CMD"))
    serve = [str(exe), *serve[1:]]
    serve[serve.index("--host") + 1] = HOST  # tests listen on loopback only
    proc = subprocess.Popen(
        [*serve, "--port", "0"],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stderr is not None
        match = READY_LINE.search(Lines(proc.stderr).wait_for("listening on"))
        assert match is not None
        check = exec_form(stages()[-1].one("HEALTHCHECK").partition("CMD ")[2])
        done = subprocess.run(
            [str(exe), *check[1:]],
            env={**os.environ, "NUMBER_SERVICE_PORT": match.group(1)},  # as in a container
            capture_output=True,
            text=True,
            timeout=RUN_TIMEOUT,
            check=False,
        )
        assert (done.returncode, done.stdout) == (0, "SERVING\n"), done.stderr
    finally:
        reap(proc)


# --- Kubernetes manifests ----------------------------------------------------------------


def documents() -> list[dict[str, Any]]:
    docs = []
    for path in MANIFESTS:
        docs += [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]
    return docs


def only(kind: str) -> dict[str, Any]:
    (doc,) = [doc for doc in documents() if doc["kind"] == kind]
    return doc


def container() -> dict[str, Any]:
    (main,) = only("Deployment")["spec"]["template"]["spec"]["containers"]
    assert isinstance(main, dict)
    return main


def env_of(main: dict[str, Any]) -> dict[str, str]:
    return {item["name"]: item["value"] for item in main.get("env", [])}


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_manifests_validate_against_kubernetes_schemas(version: str) -> None:
    assert {doc["kind"] for doc in documents()} == {"Deployment", "Service"}
    for doc in documents():
        kubernetes_validate.validate(doc, version, strict=True)  # raises on any error


def test_schema_validation_catches_a_mistake() -> None:
    """The validation above can fail: a misspelt probe field is rejected."""
    deployment = only("Deployment")
    (main,) = deployment["spec"]["template"]["spec"]["containers"]
    main["readinessProbe"]["grcp"] = main["readinessProbe"].pop("grpc")
    with pytest.raises(kubernetes_validate.ValidationError, match="grcp"):
        kubernetes_validate.validate(deployment, K8S_VERSIONS[-1], strict=True)


def test_probes_are_grpc_probes_on_the_port_the_server_listens_on() -> None:
    main = container()
    args = main["args"]
    assert args[:2] == ["number-service", "serve"]
    listens = int(args[args.index("--port") + 1])
    (grpc_port,) = [p["containerPort"] for p in main["ports"] if p["name"] == "grpc"]
    assert listens == grpc_port == PORT
    assert args[args.index("--host") + 1] == "0.0.0.0"  # reachable by the kubelet
    for probe in ("readinessProbe", "livenessProbe"):
        assert main[probe]["grpc"]["port"] == listens, probe
        assert main[probe]["grpc"].get("service", "") == "", probe  # the whole server
        assert set(main[probe]) & {"httpGet", "tcpSocket", "exec"} == set(), probe


def test_services_reach_the_grpc_port_of_the_deployments_pods() -> None:
    labels = only("Deployment")["spec"]["template"]["metadata"]["labels"]
    services = [doc for doc in documents() if doc["kind"] == "Service"]
    assert any(s["spec"].get("clusterIP") == "None" for s in services)  # headless, for
    for service in services:  # client-side balancing
        selector = service["spec"]["selector"]
        assert selector.items() <= labels.items(), service["metadata"]["name"]
        (port,) = service["spec"]["ports"]
        assert port["targetPort"] in ("grpc", PORT)
        assert port["appProtocol"] == "kubernetes.io/h2c"


def test_pods_run_as_the_images_non_root_user() -> None:
    pod = only("Deployment")["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    uid = stages()[-1].one("USER").split(":")[0]
    assert pod["securityContext"]["runAsUser"] == int(uid)
    assert container()["securityContext"]["allowPrivilegeEscalation"] is False


def grace_of(main: dict[str, Any]) -> float:
    """The container's --grace: its flag, else NUMBER_SERVICE_GRACE, else serve's default."""
    args = main["args"]
    if "--grace" in args:
        return float(args[args.index("--grace") + 1])
    return float(env_of(main).get("NUMBER_SERVICE_GRACE", DEFAULT_GRACE))


def workers_of(main: dict[str, Any]) -> str:
    args = main["args"]
    if "--workers" in args:
        return str(args[args.index("--workers") + 1])
    return env_of(main).get("NUMBER_SERVICE_WORKERS", "1")


def longest_drain(grace: float, workers: str) -> float:
    """The longest a SIGTERM'd ``serve`` takes to exit with the drain's bounds: the
    PING's answer, the grace, the UNAVAILABLE trailers, the connections' close; with
    workers, the supervisor's SIGKILL of a worker still running after the grace."""
    drain = DRAIN_PING_TIMEOUT + grace + TRAILERS_WAIT + CLOSE_WAIT
    return drain if workers == "1" else max(drain, grace + KILL_AFTER)


def test_pods_get_time_to_drain() -> None:
    """terminationGracePeriodSeconds covers the preStop sleep and the whole drain,
    so the kubelet's SIGKILL never cuts a stream the server is still draining."""
    pod = only("Deployment")["spec"]["template"]["spec"]
    main = container()
    pre_stop = main.get("lifecycle", {}).get("preStop", {}).get("sleep", {}).get("seconds", 0)
    drain = longest_drain(grace_of(main), workers_of(main))
    assert pod["terminationGracePeriodSeconds"] > pre_stop + drain, (pre_stop, drain)


def test_the_drain_bound_can_fail() -> None:
    """The relation above is not vacuous: serve's own default grace with workers
    needs more than a 15 s termination grace period."""
    assert longest_drain(DEFAULT_GRACE, "2") > 15
    assert longest_drain(20, "1") > 20


def test_a_rolling_update_takes_a_pod_down_only_once_its_replacement_is_ready() -> None:
    """maxUnavailable 0 and maxSurge of at least one: the new pod must pass readiness
    (gRPC health SERVING) before an old one gets SIGTERM, so the replicas serving
    never drop below ``replicas``; with two or more, clients always have another
    replica to retry the drain's refused streams on."""
    spec = only("Deployment")["spec"]
    assert spec["replicas"] >= 2
    assert spec["strategy"]["type"] == "RollingUpdate"
    rolling = spec["strategy"]["rollingUpdate"]
    assert str(rolling["maxUnavailable"]) in ("0", "0%")
    assert str(rolling["maxSurge"]) not in ("0", "0%")


def test_readiness_is_the_health_the_drain_turns_not_serving() -> None:
    """Readiness asks the whole server's gRPC health, which the drain sets NOT_SERVING
    before anything else (``Serving.shutdown``; then the port closes, so a probe is
    refused, and tests/test_second_service.py watches it turn); the preStop
    sleep keeps the pod serving while endpoints and proxies take it out, and is
    shorter than the termination grace period."""
    main = container()
    probe = main["readinessProbe"]
    assert probe["grpc"].get("service", "") == ""
    assert probe["failureThreshold"] == 1  # one failed probe takes it out
    pre_stop = main["lifecycle"]["preStop"]["sleep"]["seconds"]
    pod = only("Deployment")["spec"]["template"]["spec"]
    assert 0 < pre_stop < pod["terminationGracePeriodSeconds"]


def test_resources_are_set() -> None:
    resources = container()["resources"]
    assert {"cpu", "memory"} <= resources["requests"].keys()
    assert "memory" in resources["limits"]


def test_readme_names_what_gives_l7_balancing() -> None:
    text = (DEPLOY / "README.md").read_text()
    for needle in ("HTTP/2", "long-lived", "headless", "grpc_pass", "Envoy"):
        assert needle in text, needle
    # Every command shown runs from the repository root against real files.
    for line in re.findall(r"^\s*(?:\$ )?(docker build .*|kubectl apply .*)$", text, re.M):
        for word in shlex.split(line):
            if word.startswith(("deploy/", "./deploy/")):
                assert (ROOT / word).exists(), line


def test_every_path_the_server_writes_is_writable() -> None:
    """With a read-only root file system, the temporary directory (where `serve
    --workers N --metrics-port` keeps the workers' metrics files) must be a volume."""
    main = container()
    if not main.get("securityContext", {}).get("readOnlyRootFilesystem"):
        return
    tmp = env_of(main).get("TMPDIR", "/tmp")  # tempfile.gettempdir() in the image
    pod = only("Deployment")["spec"]["template"]["spec"]
    volumes = {volume["name"]: volume for volume in pod.get("volumes", [])}
    mounts = {m["mountPath"].rstrip("/"): m for m in main.get("volumeMounts", [])}
    assert tmp.rstrip("/") in mounts, f"{tmp} is not mounted: nothing can be written there"
    mount = mounts[tmp.rstrip("/")]
    assert not mount.get("readOnly", False)
    assert "emptyDir" in volumes[mount["name"]], volumes[mount["name"]]


def test_readme_says_how_to_probe_a_tls_server() -> None:
    """Kubernetes' grpc: probes cannot do TLS: the exec probe and its variables are named."""
    text = (DEPLOY / "README.md").read_text()
    for needle in ("exec", "number-service health", "NUMBER_SERVICE_HEALTH_TLS_CA"):
        assert needle in text, needle
