"""Deployment files: Dockerfile, docker-compose.yml and the Kubernetes manifests under docker/k8s.

No container engine here, so: the linters and schema validators run as subprocesses (skipped only where the tool is
not installed; .ci/run installs them), the probes are checked against the routes the app really serves, and the
image's filesystem is rebuilt from the Dockerfile's own COPY/ENV lines around a wheel installed in a fresh venv.
"""

from __future__ import annotations

import fnmatch
import json
import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
import sysconfig
import time
import urllib.request
from pathlib import Path

import pytest

from service.api import create_app
from service.cli import build_parser
from service.runner import worker_probe_app
from service.settings import ServiceSettings

yaml = pytest.importorskip("yaml")

REPO = Path(__file__).resolve().parents[1]
DOCKERFILE = REPO / "Dockerfile"
COMPOSE = REPO / "docker-compose.yml"
K8S = REPO / "docker" / "k8s"
K8S_VERSIONS = ("1.30.0", "1.34.0")  # an old-but-supported and a recent API server


def _tool(name: str, optional: bool = False) -> str:
    """The tool's path; a skip where it is missing, except in CI (.ci/run installs them all but kubectl)."""
    path = shutil.which(name)
    if path is None:
        if os.environ.get("DEPLOY_TOOLS_REQUIRED") and not optional:
            pytest.fail(f"{name} is not installed")
        pytest.skip(f"{name} is not installed (.ci/run installs it)")
    return path


def _run(*cmd: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120,
                          env={**os.environ, **(env or {})})


# -- linters and validators -------------------------------------------------------------------------------------

def test_hadolint_finds_no_errors_or_warnings():
    result = _run(_tool("hadolint"), "--failure-threshold", "warning", str(DOCKERFILE))
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("profile", [None, "gpu"])
def test_docker_compose_config_parses(profile):
    profile_args = ("--profile", profile) if profile else ()
    # The real .env holds the admin token and is never committed; the example stands in for it.
    result = _run(_tool("docker-compose"), "-f", str(COMPOSE), *profile_args, "config", "-q",
                  env={"PTQ4DM_ENV_FILE": ".env.example"})
    assert result.returncode == 0, result.stdout + result.stderr


def _k8s_files() -> list[Path]:
    # kustomization.yaml is kustomize's own kind, with no Kubernetes schema; everything else is a resource.
    return sorted(p for p in K8S.rglob("*.yaml") if p.name != "kustomization.yaml")


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_k8s_manifests_validate(version):
    files = _k8s_files()
    assert len(files) >= 7
    result = _run(_tool("kubernetes-validate"), "--strict", "--quiet", "-k", version, *map(str, files))
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("kustomization", ["base", "overlays/gpu"])
def test_k8s_kustomizations_render_and_validate(kustomization, tmp_path):
    """`kubectl kustomize` is optional (CI machines lack it); where present the rendered output is validated too."""
    rendered = _run(_tool("kubectl", optional=True), "kustomize", str(K8S / kustomization))
    assert rendered.returncode == 0, rendered.stderr
    out = tmp_path / "rendered.yaml"
    out.write_text(rendered.stdout)
    result = _run(_tool("kubernetes-validate"), "--strict", "--quiet", "-k", K8S_VERSIONS[-1], str(out))
    assert result.returncode == 0, result.stdout + result.stderr
    if kustomization == "overlays/gpu":
        worker = next(d for d in yaml.safe_load_all(rendered.stdout) if d["metadata"]["name"] == "ptq4dm-worker"
                      and d["kind"] == "Deployment")
        container = worker["spec"]["template"]["spec"]["containers"][0]
        assert container["resources"]["limits"]["nvidia.com/gpu"] == "1"
        assert container["startupProbe"]["httpGet"]["path"] == "/startupz"  # the patch kept the base's probes


# -- probes and commands point at things that exist -------------------------------------------------------------

def _k8s_docs() -> list[dict]:
    """The base's resources (the GPU overlay holds only a patch of the worker Deployment)."""
    return [doc for path in _k8s_files() if path.is_relative_to(K8S / "base")
            for doc in yaml.safe_load_all(path.read_text()) if doc]


def _containers(role: str) -> list[dict]:
    return [c for doc in _k8s_docs() if doc["kind"] == "Deployment"
            and doc["spec"]["template"]["metadata"].get("labels", {}).get("app.kubernetes.io/component") == role
            for c in doc["spec"]["template"]["spec"]["containers"]]


def _paths(app) -> set[str]:
    """GET routes, from the OpenAPI schema (stable across FastAPI versions, unlike app.routes' internals)."""
    return {path for path, ops in app.openapi()["paths"].items() if "get" in ops}


@pytest.mark.parametrize("role", ["api", "worker"])
def test_probes_hit_routes_the_process_serves(role):
    settings = ServiceSettings(redis_url="redis://unused:6379/0")  # the deployed mode; nothing connects here
    app, port = (create_app(settings), settings.port) if role == "api" else (worker_probe_app(settings),
                                                                              settings.health_port)
    served = _paths(app)
    [container] = _containers(role)
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert container["args"][0] in ("serve", "worker")
    for probe, path in (("startupProbe", "/startupz"), ("livenessProbe", "/livez"), ("readinessProbe", "/readyz")):
        get = container[probe]["httpGet"]
        assert get["path"] == path and path in served, f"{role} {probe} -> {get['path']}"
        assert ports[get["port"]] == port, f"{role} {probe} probes port {ports[get['port']]}, the process uses {port}"


def test_worker_grace_period_and_startup_budget_are_generous():
    worker = next(d for d in _k8s_docs() if d["kind"] == "Deployment" and d["metadata"]["name"] == "ptq4dm-worker")
    spec = worker["spec"]["template"]["spec"]
    startup = spec["containers"][0]["startupProbe"]
    assert spec["terminationGracePeriodSeconds"] >= 300
    # Load + calibrate + warm up, or wait out another worker's calibration lock (calibration_lock_ms).
    assert startup["periodSeconds"] * startup["failureThreshold"] * 1000 >= ServiceSettings().calibration_lock_ms


def test_container_commands_exist():
    """ENTRYPOINT is the console script; every command the deployment files pass it is one of its subcommands."""
    instructions = _dockerfile()
    entrypoint = json.loads(next(args for op, args in instructions if op == "ENTRYPOINT"))
    assert entrypoint == ["ptq4dm"]
    assert "ptq4dm" in _pyproject()["project"]["scripts"]
    compose = yaml.safe_load(COMPOSE.read_text())
    commands = [json.loads(next(args for op, args in reversed(instructions) if op == "CMD"))]
    commands += [svc["command"] for svc in compose["services"].values() if "command" in svc
                 and svc.get("image", "").startswith("ptq4dm")]
    commands += [c["args"] for role in ("api", "worker") for c in _containers(role)]
    assert {c[0] for c in commands} == {"serve", "worker"}
    for command in commands:
        build_parser().parse_args(command)  # exits (SystemExit) on an unknown subcommand or flag


def test_compose_file_shape():
    compose = yaml.safe_load(COMPOSE.read_text())
    services = compose["services"]
    assert "--appendonly" in services["redis"]["command"] and "healthcheck" in services["redis"]
    assert services["worker"]["deploy"]["replicas"] == 2
    assert services["worker"]["depends_on"]["redis"]["condition"] == "service_healthy"
    gpu = services["worker-gpu"]
    assert gpu["profiles"] == ["gpu"]
    assert gpu["deploy"]["resources"]["reservations"]["devices"][0]["capabilities"] == ["gpu"]
    assert services["api"]["ports"] == ["8000:8000"]


def test_no_real_admin_token_is_committed():
    example = dict(line.split("=", 1) for line in (REPO / ".env.example").read_text().splitlines()
                   if line and not line.startswith("#"))
    assert example["PTQ4DM_ADMIN_TOKEN"] == ""
    assert "/.env" in (REPO / ".gitignore").read_text().split()
    compose = yaml.safe_load(COMPOSE.read_text())
    assert not any("PTQ4DM_ADMIN_TOKEN" in (svc.get("environment") or {}) for svc in compose["services"].values())
    refs = [e for role in ("api", "worker") for c in _containers(role) for e in c.get("env", [])
            if e["name"] == "PTQ4DM_ADMIN_TOKEN"]
    assert refs and all("secretKeyRef" in e["valueFrom"] for e in refs)


def test_webhook_secret_comes_from_a_secret_in_both_roles():
    """The API checks a webhook can be signed, the workers sign: both read the key from one Secret, never the
    ConfigMap or the compose file."""
    for role in ("api", "worker"):
        refs = [e for c in _containers(role) for e in c.get("env", []) if e["name"] == "PTQ4DM_WEBHOOK_SECRET"]
        assert refs and all(e["valueFrom"]["secretKeyRef"]["name"] == "ptq4dm-webhook" for e in refs), role
    assert "PTQ4DM_WEBHOOK_SECRET" not in (REPO / "docker/k8s/base/configmap.yaml").read_text()
    compose = yaml.safe_load(COMPOSE.read_text())
    assert not any("PTQ4DM_WEBHOOK_SECRET" in (svc.get("environment") or {}) for svc in compose["services"].values())


# -- the image's filesystem, rebuilt without an engine ------------------------------------------------------------

def _pyproject() -> dict:
    import tomllib

    return tomllib.loads((REPO / "pyproject.toml").read_text())


def _dockerfile() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined, comments dropped."""
    text = re.sub(r"\\\n", " ", "\n".join(line for line in DOCKERFILE.read_text().splitlines()
                                          if not line.lstrip().startswith("#")))
    return [(op.upper(), args.strip()) for op, _, args in (line.strip().partition(" ") for line in text.splitlines())
            if op]


def _stages() -> dict[str, list[tuple[str, str]]]:
    stages: dict[str, list[tuple[str, str]]] = {}
    current = None
    for op, args in _dockerfile():
        if op == "FROM":
            current = args.split()[-1]
            stages[current] = []
        elif current is not None:
            stages[current].append((op, args))
    return stages


def _dockerignored(rel: str) -> bool:
    """Docker's rules: the last matching line wins, and a pattern matching a directory covers its contents."""
    parts = rel.split("/")
    prefixes = ["/".join(parts[:i]) for i in range(1, len(parts) + 1)]
    ignored = False
    for line in (REPO / ".dockerignore").read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        pattern = line.removeprefix("!")
        # fnmatch's * also crosses "/", which is close enough for these patterns; "**/x" also matches a top-level x.
        candidates = (pattern, pattern.removeprefix("**/"))
        if any(fnmatch.fnmatchcase(p, c) for p in prefixes for c in candidates):
            ignored = not line.startswith("!")
    return ignored


def _copies(stage: str):
    """(sources, dest, from_stage) of each COPY in a stage."""
    for op, args in _stages()[stage]:
        if op == "COPY":
            words = shlex.split(args)
            flags = dict(w[2:].split("=", 1) for w in words if w.startswith("--"))
            *sources, dest = [w for w in words if not w.startswith("--")]
            yield sources, dest, flags.get("from")


def test_dockerfile_copies_files_that_exist_and_reach_the_context():
    context_sources = [src for stage in _stages() for sources, _, frm in _copies(stage) if frm is None
                       for src in sources]
    assert {"pyproject.toml", "quantizer", "service", "models"} <= set(context_sources)
    for src in context_sources:
        path = REPO / src
        assert path.exists(), f"Dockerfile copies {src}, which does not exist"
        files = [path] if path.is_file() else [p for p in path.rglob("*")
                                               if p.is_file() and "__pycache__" not in p.parts]
        assert files, f"{src} is empty"
        for f in files:
            rel = f.relative_to(REPO).as_posix()
            assert not _dockerignored(rel), f"{rel} is copied by the Dockerfile but excluded by .dockerignore"
    assert _dockerignored(".env") and _dockerignored("runs/x") and _dockerignored(".git/HEAD")


def _emulate_copies(stage: str, root: Path, skip_from: tuple[str, ...] = ()) -> None:
    """Apply a stage's COPY lines onto root/<stage>/, with Docker's rules: a directory's contents land in dest."""
    fs = root / stage
    workdir = "/"
    for op, args in _stages()[stage]:
        if op == "WORKDIR":
            workdir = args
        if op != "COPY":
            continue
        words = shlex.split(args)
        frm = next((w.split("=", 1)[1] for w in words if w.startswith("--from=")), None)
        *sources, dest = [w for w in words if not w.startswith("--")]
        if frm in skip_from:
            continue
        dest_path = fs / os.path.join(workdir, dest).lstrip("/")
        for src in sources:
            origin = (root / frm / src.lstrip("/")) if frm else REPO / src
            if origin.is_dir():
                shutil.copytree(origin, dest_path, dirs_exist_ok=True,
                                ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
            elif dest.endswith("/") or len(sources) > 1:
                dest_path.mkdir(parents=True, exist_ok=True)
                shutil.copy2(origin, dest_path / origin.name)
            else:
                dest_path.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(origin, dest_path)


def _runtime_env(root: Path) -> dict[str, str]:
    """The runtime stage's ENV, with its absolute paths moved under the emulated filesystem."""
    env = {}
    for op, args in _stages()["runtime"]:
        if op == "ENV":
            for word in shlex.split(args):
                key, _, value = word.partition("=")
                if key != "PATH":
                    env[key] = str(root / "runtime" / value.lstrip("/")) if value.startswith("/") else value
    return env


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get(url: str) -> tuple[int, dict]:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"{}")


def _wait_for(url: str, proc: subprocess.Popen, timeout: float) -> dict:
    deadline = time.monotonic() + timeout
    last: object = None
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"ptq4dm serve exited with {proc.returncode}"
        try:
            status, body = _get(url)
            if status == 200:
                return body
            last = (status, body)
        except OSError as exc:
            last = exc
        time.sleep(0.5)
    raise AssertionError(f"{url} not 200 after {timeout}s: {last}")


def _see_our_site_packages(python: Path) -> None:
    """`--system-site-packages` exposes the *base* interpreter's packages; when the tests themselves run in a venv,
    torch and friends live in that venv instead, so a .pth file adds this interpreter's site-packages (after the new
    venv's own, so the wheel installed there still wins)."""
    ours = {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}
    theirs = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                            capture_output=True, text=True, check=True, timeout=60).stdout.strip()
    Path(theirs, "zz-test-runner-site-packages.pth").write_text("".join(f"{p}\n" for p in sorted(ours)))


def test_installed_wheel_serves_the_builtin_model(tmp_path):
    """The build stage's files -> a wheel; the runtime stage's files and ENV around it in a fresh venv; then serve.

    The venv sees the system site-packages (torch and friends, as the image's deps stage has them) but gets the
    wheel itself, and runs outside the checkout, so a file missing from the wheel or the image fails here.
    """
    root = tmp_path / "fs"
    _emulate_copies("build", root)
    # The build stage's RUN: the same `pip wheel`, without build isolation (no network needed).
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                    "--wheel-dir", str(root / "build" / "dist"), str(root / "build" / "src")], check=True, timeout=300)
    # The deps stage's venv is not rebuilt: the system site-packages stand in for it.
    _emulate_copies("runtime", root, skip_from=("deps",))
    [wheel] = (root / "runtime" / "tmp" / "dist").glob("ptq4dm-*.whl")

    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", "--without-pip", str(venv)],
                   check=True, timeout=120)
    python = venv / "bin" / "python"
    _see_our_site_packages(python)
    subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "-q", "--no-deps",
                    "--ignore-installed", str(wheel)], check=True, timeout=300)

    env = {**os.environ, **_runtime_env(root), "PATH": f"{venv / 'bin'}:{os.environ['PATH']}",
           "PTQ4DM_TORCH_THREADS": "1",
           # Stopped while it may still be compiling: a kernel cut short stays in this test's own cache.
           "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "inductor")}
    env.pop("PYTHONPATH", None)
    assert Path(env["PTQ4DM_MODELS_DIR"], "fashion-mnist-ddpm", "unet", "config.json").is_file()
    cwd = tmp_path  # outside the checkout: nothing may come from the repository
    where = subprocess.run([str(python), "-c", "import quantizer.diffusion.models as m, service; "
                            "print(m.__file__); print(service.__file__); print(m.BUILTIN_MODEL_DIR)"],
                           cwd=cwd, env=env, capture_output=True, text=True, check=True, timeout=120)
    for line in where.stdout.split()[:2]:
        assert Path(line).is_relative_to(venv), f"imported from {line}, not the venv"
    assert Path(where.stdout.split()[2]).is_relative_to(root / "runtime")

    ptq4dm = str(venv / "bin" / "ptq4dm")
    for sub in ([], ["serve"], ["worker"]):
        subprocess.run([ptq4dm, *sub, "--help"], cwd=cwd, env=env, check=True, capture_output=True, timeout=120)

    port = _free_port()
    log = (tmp_path / "serve.log").open("w")
    proc = subprocess.Popen([ptq4dm, "serve", "--host", "127.0.0.1", "--port", str(port)], cwd=cwd,
                            env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        assert _wait_for(f"http://127.0.0.1:{port}/livez", proc, 120) == {"status": "alive"}
        ready = _wait_for(f"http://127.0.0.1:{port}/readyz", proc, 300)
        assert ready["checks"]["worker"] is True
        # The playground's static files are package data: a wheel without them fails here.
        for path in ("/", "/playground/app.js", "/playground/style.css"):
            with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as page:
                assert page.status == 200 and page.read(), path
        # A quiet start: nothing a user would report as a bug (library warnings, tracebacks) in the log.
        log.flush()
        noise = [line for line in (tmp_path / "serve.log").read_text().splitlines()
                 if re.search(r"Traceback|warn|deprecat|Failed to load|Unable to import|not found", line, re.I)]
        assert not noise, noise
        # The image's HEALTHCHECK script, against this server, and against nothing.
        check = [str(python), str(root / "runtime" / "opt" / "ptq4dm" / "healthcheck.py")]
        assert subprocess.run(check, env={**env, "PTQ4DM_PORT": str(port)}, timeout=30).returncode == 0
        assert subprocess.run(check, env={**env, "PTQ4DM_PORT": str(_free_port()),
                                          "PTQ4DM_HEALTH_PORT": str(_free_port())}, timeout=30).returncode == 1
    except AssertionError:
        log.flush()
        print((tmp_path / "serve.log").read_text()[-4000:])
        raise
    finally:
        proc.terminate()
        proc.wait(timeout=60)
        log.close()


# -- models found outside the checkout ----------------------------------------------------------------------------

def _builtin_paths(env: dict[str, str]) -> list[str]:
    code = ("from quantizer.diffusion.models import BUILTIN_MODEL_DIR; "
            "from quantizer.evaluation.classifier import BUILTIN_CLASSIFIER; "
            "print(BUILTIN_MODEL_DIR); print(BUILTIN_CLASSIFIER)")
    environ = {k: v for k, v in os.environ.items() if k != "PTQ4DM_MODELS_DIR"}
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, env={**environ, **env}, capture_output=True,
                         text=True, check=True, timeout=120)
    return out.stdout.split()


def test_models_dir_defaults_to_the_checkout_and_follows_the_env_var(tmp_path):
    assert _builtin_paths({}) == [str(REPO / "models" / "fashion-mnist-ddpm"),
                                  str(REPO / "models" / "fashion-mnist-classifier" / "model.safetensors")]
    assert _builtin_paths({"PTQ4DM_MODELS_DIR": str(tmp_path)}) == [
        str(tmp_path / "fashion-mnist-ddpm"), str(tmp_path / "fashion-mnist-classifier" / "model.safetensors")]


def test_missing_builtin_model_names_the_env_var(tmp_path):
    code = "from quantizer.diffusion.models import load_model; load_model('fashion-mnist-ddpm')"
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120,
                            env={**os.environ, "PTQ4DM_MODELS_DIR": str(tmp_path)})
    assert result.returncode != 0 and "PTQ4DM_MODELS_DIR" in result.stderr
