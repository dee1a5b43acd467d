"""The service image: docker/Dockerfile (and the bundle image) linted with hadolint, the build
context (.dockerignore) and the locked serving dependencies checked against pyproject.toml.

There is no Docker engine on this machine, so the image is not built here; everything a build
depends on that can be checked without one is checked.
"""

from __future__ import annotations

import importlib.util
import json
import re
import shutil
import subprocess
import sys
import threading
import tomllib
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

REPO = Path(__file__).resolve().parents[1]
DOCKERFILE = REPO / "docker" / "Dockerfile"
BUNDLE_DOCKERFILE = REPO / "docker" / "bundle.Dockerfile"
LOCK = REPO / "docker" / "serving.lock.txt"
SERVICE_PORT = 8000


def _tool(name: str) -> str:
    """A console script of the dev extra: next to this interpreter first, then on PATH."""
    found = shutil.which(name, path=str(Path(sys.executable).parent)) or shutil.which(name)
    if found is None:
        pytest.skip(f"{name} is not installed (pip install -e '.[dev]')")
    return found


def _hadolint(dockerfile: Path) -> list[dict]:
    out = subprocess.run(
        [_tool("hadolint"), "--format", "json", "--no-fail", str(dockerfile)],
        capture_output=True,
        text=True,
        check=True,
        cwd=REPO,
    )
    return json.loads(out.stdout)


def _instructions(dockerfile: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined, comments dropped."""
    lines: list[str] = []
    pending = ""
    for raw in dockerfile.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        lines.append(pending + line)
        pending = ""
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1]) for line in lines]


def _stages(dockerfile: Path) -> dict[str, list[tuple[str, str]]]:
    stages: dict[str, list[tuple[str, str]]] = {}
    current: list[tuple[str, str]] | None = None
    for instruction, args in _instructions(dockerfile):
        if instruction == "FROM":
            name = args.split()[-1] if " as " in args.lower() else f"stage{len(stages)}"
            current = stages.setdefault(name, [])
        if current is not None:
            current.append((instruction, args))
    return stages


def _copy_sources(args: str) -> list[str]:
    """The source paths of a COPY instruction (flags and the destination left out)."""
    words = [word for word in args.split() if not word.startswith("--")]
    return [word.rstrip("/") for word in words[:-1]]


def _lock_module():
    """docker/lock_serving.py (docker/ is not a package)."""
    spec = importlib.util.spec_from_file_location("lock_serving", REPO / "docker" / "lock_serving.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _args(dockerfile: Path) -> dict[str, str]:
    return dict(
        args.split("=", 1)
        for instruction, args in _instructions(dockerfile)
        if instruction == "ARG" and "=" in args
    )


# --- hadolint ---------------------------------------------------------------------------------


@pytest.mark.parametrize("dockerfile", [DOCKERFILE, BUNDLE_DOCKERFILE], ids=lambda p: p.name)
def test_hadolint_finds_nothing(dockerfile: Path) -> None:
    findings = _hadolint(dockerfile)
    assert findings == [], "\n".join(
        f"{f['line']}: {f['code']} {f['level']}: {f['message']}" for f in findings
    )


def test_hadolint_does_flag_a_bad_dockerfile(tmp_path: Path) -> None:
    """The linter really runs: an unpinned base image, root user and unpinned apt are reported."""
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python:latest\nRUN apt-get update && apt-get install -y curl\nCMD python app.py\n")
    codes = {finding["code"] for finding in _hadolint(bad)}
    assert {"DL3007", "DL3008", "DL3025"} <= codes


# --- the image ---------------------------------------------------------------------------------


def test_multi_stage_build_with_slim_runtime() -> None:
    stages = _stages(DOCKERFILE)
    assert list(stages) == ["builder", "runtime"]
    runtime = stages["runtime"]
    assert "slim" in runtime[0][1], "the runtime stage must start from a slim image"
    copies = [args for instruction, args in runtime if instruction == "COPY"]
    assert copies == ["--from=builder /opt/venv /opt/venv"], (
        "the runtime gets the virtualenv and nothing else"
    )
    assert not any(instruction == "RUN" and "pip " in args for instruction, args in runtime)


def test_runtime_runs_as_numeric_non_root_user() -> None:
    runtime = _stages(DOCKERFILE)["runtime"]
    users = [args for instruction, args in runtime if instruction == "USER"]
    assert len(users) == 1
    user = users[0].replace("${APP_UID}", _args(DOCKERFILE)["APP_UID"]).split(":")[0]
    assert user.isdigit(), "Kubernetes can verify runAsNonRoot only for a numeric USER"
    assert int(user) != 0


def test_entrypoint_serves_the_mounted_bundle_on_the_exposed_port() -> None:
    runtime = dict((instruction, args) for instruction, args in _stages(DOCKERFILE)["runtime"])
    assert runtime["EXPOSE"] == str(SERVICE_PORT)
    command = json.loads(runtime["ENTRYPOINT"]) + json.loads(runtime["CMD"])
    assert command[:2] == ["mml", "serve"]
    assert command[command.index("--bundle") + 1] == "/bundle"
    assert command[command.index("--port") + 1] == str(SERVICE_PORT)
    assert command[command.index("--host") + 1] == "0.0.0.0"


def test_healthcheck_probes_readiness_with_a_start_period() -> None:
    runtime = dict((instruction, args) for instruction, args in _stages(DOCKERFILE)["runtime"])
    healthcheck = runtime["HEALTHCHECK"]
    assert f"http://127.0.0.1:{SERVICE_PORT}/readyz" in healthcheck
    start_period = re.search(r"--start-period=(\d+)s", healthcheck)
    assert start_period and int(start_period.group(1)) >= 60, (
        "loading and warming the bundle takes tens of seconds"
    )
    # the probe is valid Python (the slim image has no curl)
    probe = json.loads(healthcheck.split("CMD", 1)[1])
    assert probe[:2] == ["python", "-c"]
    compile(probe[2], "<healthcheck>", "exec")


class _Readyz(BaseHTTPRequestHandler):
    status = 503

    def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
        code = type(self).status if self.path == "/readyz" else 404
        self.send_response(code)
        self.end_headers()

    def log_message(self, *args) -> None:
        pass


def test_healthcheck_command_follows_readiness() -> None:
    """The HEALTHCHECK command run for real against an HTTP server answering /readyz: unhealthy
    (non-zero exit) on 503, healthy (exit 0) on 200."""
    runtime = dict((instruction, args) for instruction, args in _stages(DOCKERFILE)["runtime"])
    probe = json.loads(runtime["HEALTHCHECK"].split("CMD", 1)[1])
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Readyz)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        code = probe[2].replace(f"127.0.0.1:{SERVICE_PORT}", f"127.0.0.1:{server.server_address[1]}")
        run = [sys.executable, "-c", code]
        _Readyz.status = 503
        assert subprocess.run(run, capture_output=True, timeout=30).returncode != 0
        _Readyz.status = 200
        assert subprocess.run(run, capture_output=True, timeout=30).returncode == 0
    finally:
        server.shutdown()
        server.server_close()
    from service.app import create_app
    from service.config import ServiceSettings

    routes = {
        route.path for route in create_app(ServiceSettings()).routes if "GET" in getattr(route, "methods", ())
    }
    assert "/readyz" in routes


def test_builder_installs_the_serving_extra_without_torch() -> None:
    builder = " ".join(args for instruction, args in _stages(DOCKERFILE)["builder"] if instruction == "RUN")
    assert "[serving]" in builder
    assert "--no-index" in builder, "the wheel's requirements must come from the lock, not float"
    extras = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert not any(canonicalize_name(Requirement(r).name) == "torch" for r in extras["serving"])


SERVING_PACKAGES = {"mml", "service"}  # what `mml serve` imports; model/ and training/ stay out


def test_copied_sources_are_the_serving_packages_of_the_wheel() -> None:
    """The serving packages (a subset of what setuptools packs) are copied into the builder, and
    nothing else of the tree: no model/ or training/ code in the image."""
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    includes = pyproject["tool"]["setuptools"]["packages"]["find"]["include"]
    packages = {pattern.rstrip("*").rstrip(".") for pattern in includes}
    assert SERVING_PACKAGES <= packages and "devtools" not in packages  # the dev harness is never shipped
    builder = _stages(DOCKERFILE)["builder"]
    copied = {
        source for instruction, args in builder if instruction == "COPY" for source in _copy_sources(args)
    }
    assert copied == SERVING_PACKAGES | {"pyproject.toml", "README.md", "docker/serving.lock.txt"}


def test_lock_is_resolved_for_the_image_python() -> None:
    assert _args(DOCKERFILE)["PYTHON_VERSION"] == _lock_module().PYTHON_VERSION
    assert f"CPython {_lock_module().PYTHON_VERSION}" in LOCK.read_text()


# --- the locked dependencies ----------------------------------------------------------------


def _lock_pins() -> dict[str, str]:
    pins = {}
    for line in LOCK.read_text().splitlines():
        if line and not line.startswith("#"):
            name, version = line.split("==")
            pins[canonicalize_name(name)] = version
    return pins


def test_lock_pins_every_serving_requirement_within_its_spec() -> None:
    pins = _lock_pins()
    regenerate = "regenerate it: .venv/bin/python docker/lock_serving.py"
    for text in _lock_module().serving_requirements():
        requirement = Requirement(text)
        name = canonicalize_name(requirement.name)
        assert name in pins, f"{requirement.name} is not in docker/serving.lock.txt; {regenerate}"
        assert requirement.specifier.contains(pins[name], prereleases=True), (
            f"docker/serving.lock.txt pins {name}=={pins[name]}, outside {requirement}; {regenerate}"
        )
    assert "torch" not in pins, "the serving image must not contain torch"


# --- the build context ------------------------------------------------------------------------


def _dockerignore_patterns() -> list[tuple[bool, re.Pattern[str]]]:
    """(negated, regex) per line of .dockerignore, following Docker's pattern rules: paths relative
    to the context root, `*` and `?` within one path element, `**` across any number of them."""
    patterns = []
    for raw in (REPO / ".dockerignore").read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        negated = line.startswith("!")
        line = line.removeprefix("!").strip().strip("/")
        regex, i = "", 0
        while i < len(line):
            if line.startswith("**/", i):
                regex, i = regex + "(?:.*/)?", i + 3
            elif line.startswith("**", i):
                regex, i = regex + ".*", i + 2
            elif line[i] == "*":
                regex, i = regex + "[^/]*", i + 1
            elif line[i] == "?":
                regex, i = regex + "[^/]", i + 1
            elif line[i] == "[":
                end = line.index("]", i)
                regex, i = regex + line[i : end + 1], end + 1
            else:
                regex, i = regex + re.escape(line[i]), i + 1
        patterns.append((negated, re.compile(regex + r"\Z")))
    return patterns


def _in_context(path: str) -> bool:
    """Whether Docker sends `path` (relative to the repo root) to the builder: the last pattern
    matching the path or one of its parent folders decides."""
    parts = path.split("/")
    candidates = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    excluded = False
    for negated, pattern in _dockerignore_patterns():
        if any(pattern.match(candidate) for candidate in candidates):
            excluded = not negated
    return not excluded


@pytest.mark.parametrize(
    "path",
    [
        ".venv/bin/python",
        "artifacts/bundles/quick/manifest.json",
        ".cache/test-artifacts/ml-1m/items.parquet",
        "data/ml-1m/ratings.dat",
        ".git/HEAD",
        "service/__pycache__/app.cpython-311.pyc",
        "mml.egg-info/PKG-INFO",
        "tests/conftest.py",
        "docker/compose.yaml",
        "training/export/cli.py",
        "model/x.py",
        "devtools/harness.py",
    ],
)
def test_context_excludes(path: str) -> None:
    assert not _in_context(path)


@pytest.mark.parametrize(
    "path",
    ["pyproject.toml", "README.md", "mml/cli.py", "service/__init__.py", "docker/serving.lock.txt"],
)
def test_context_includes(path: str) -> None:
    assert _in_context(path)


def test_every_copied_source_is_in_the_context() -> None:
    builder = _stages(DOCKERFILE)["builder"]
    sources = [
        source for instruction, args in builder if instruction == "COPY" for source in _copy_sources(args)
    ]
    for source in sources:
        assert (REPO / source).exists(), source
        probe = f"{source}/__init__.py" if (REPO / source).is_dir() else source
        assert _in_context(probe), f"{source} is copied but excluded by .dockerignore"
