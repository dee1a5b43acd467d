"""Kubernetes manifests (k8s/): every object validated offline against the Kubernetes JSON schemas
of a pinned version (kubernetes-validate ships them in its wheel), in strict mode so that a
misspelt field fails; then the wiring between objects and the service's interface: probes, ports,
resources, graceful shutdown, labels and selectors, the arms ConfigMap, the admin-token Secret."""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path

import pytest
import yaml

kubernetes_validate = pytest.importorskip("kubernetes_validate", reason="pip install -e '.[dev]'")

from service.ab import load_arms  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
K8S = REPO / "k8s"
# The oldest Kubernetes release the manifests must be valid for (autoscaling/v2 HPA behavior,
# policy/v1 PDB, Pod Security labels are all GA there).
KUBERNETES_VERSION = "1.31.0"
SERVICE_PORT = 8000
EXAMPLE_SECRET = "secret-admin-token.example.yaml"


def _service_get_routes() -> set[str]:
    """GET paths of the real service app (routes only: no bundle is loaded)."""
    from service.app import create_app
    from service.config import ServiceSettings

    app = create_app(ServiceSettings())
    return {route.path for route in app.routes if "GET" in getattr(route, "methods", ())}


def _uvicorn_graceful_timeout() -> int:
    """Seconds `mml serve` lets uvicorn finish in-flight requests after SIGTERM."""
    source = (REPO / "service" / "cli.py").read_text()
    return int(re.search(r"timeout_graceful_shutdown=(\d+)", source).group(1))


def _documents(path: Path) -> list[dict]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


MANIFESTS = sorted(path.name for path in K8S.glob("*.yaml") if path.name != "kustomization.yaml")
OBJECTS = [(name, index, doc) for name in MANIFESTS for index, doc in enumerate(_documents(K8S / name))]


def _object(kind: str, name: str) -> dict:
    (found,) = [doc for _, _, doc in OBJECTS if doc["kind"] == kind and doc["metadata"]["name"] == name]
    return found


def _container(deployment: dict, name: str) -> dict:
    (found,) = [c for c in deployment["spec"]["template"]["spec"]["containers"] if c["name"] == name]
    return found


def _env(container: dict) -> dict[str, dict]:
    return {item["name"]: item for item in container["env"]}


def _option(args: list[str], flag: str) -> str:
    return args[args.index(flag) + 1]


def _port(container: dict, port: int | str) -> int:
    """A probe's or Service's port (number or name) resolved to the container port number."""
    if isinstance(port, int):
        return port
    (number,) = [p["containerPort"] for p in container["ports"] if p["name"] == port]
    return number


def _cpu(quantity: str) -> float:
    return float(quantity[:-1]) / 1000 if quantity.endswith("m") else float(quantity)


def _bytes(quantity: str) -> int:
    units = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "K": 10**3, "M": 10**6, "G": 10**9}
    match = re.fullmatch(r"(\d+)([KMG]i?)?", quantity)
    assert match, quantity
    return int(match.group(1)) * units.get(match.group(2) or "", 1)


@pytest.fixture(scope="module")
def recall() -> dict:
    return _object("Deployment", "mml-recall")


# --- schemas -----------------------------------------------------------------------------------


@pytest.mark.parametrize(("name", "index", "doc"), OBJECTS, ids=[f"{n}#{i}" for n, i, _ in OBJECTS])
def test_manifest_matches_the_kubernetes_schema(name: str, index: int, doc: dict) -> None:
    version = kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)
    assert version == KUBERNETES_VERSION.rsplit(".", 1)[0]


def test_validation_rejects_a_misspelt_field_and_a_wrong_type(recall: dict) -> None:
    misspelt = copy.deepcopy(recall)
    container = misspelt["spec"]["template"]["spec"]["containers"][0]
    container["readinesProbe"] = container.pop("readinessProbe")
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(misspelt, KUBERNETES_VERSION, strict=True)
    wrong_type = copy.deepcopy(recall)
    wrong_type["spec"]["template"]["spec"]["containers"][0]["ports"][0]["containerPort"] = "eight thousand"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(wrong_type, KUBERNETES_VERSION, strict=True)


def test_kustomization_lists_every_manifest_but_the_secret_placeholder() -> None:
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    assert sorted(kustomization["resources"]) == sorted(set(MANIFESTS) - {EXAMPLE_SECRET})
    (namespace,) = [doc for _, _, doc in OBJECTS if doc["kind"] == "Namespace"]
    assert kustomization["namespace"] == namespace["metadata"]["name"]
    used = {
        container["image"].rsplit(":", 1)[0]
        for _, _, doc in OBJECTS
        if doc["kind"] == "Deployment"
        for key in ("initContainers", "containers")
        for container in doc["spec"]["template"]["spec"].get(key, [])
    }
    assert {image["name"] for image in kustomization["images"]} <= used


# --- the recall Deployment -----------------------------------------------------------------------


def test_probes_hit_the_service_health_endpoints_on_its_port(recall: dict) -> None:
    container = _container(recall, "recall")
    port = int(_option(container["args"], "--port"))
    assert port == SERVICE_PORT
    expected = {"startupProbe": "/readyz", "readinessProbe": "/readyz", "livenessProbe": "/healthz"}
    for probe, path in expected.items():
        http = container[probe]["httpGet"]
        assert http["path"] == path, probe
        assert _port(container, http["port"]) == port, probe
    assert set(expected.values()) <= _service_get_routes()
    startup = container["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 120, (
        "bundle load + warm-up take tens of seconds"
    )


def test_service_serves_the_mounted_bundle(recall: dict) -> None:
    pod = recall["spec"]["template"]["spec"]
    container = _container(recall, "recall")
    assert container["args"][0] == "serve"
    bundle_path = _option(container["args"], "--bundle")
    (mount,) = [m for m in container["volumeMounts"] if m["mountPath"] == bundle_path]
    assert mount["readOnly"] is True
    (init,) = pod["initContainers"]
    (init_mount,) = [m for m in init["volumeMounts"] if m["name"] == mount["name"]]
    assert init["command"][-1].rstrip("/") == init_mount["mountPath"], (
        "the initContainer fills the bundle volume"
    )
    (volume,) = [v for v in pod["volumes"] if v["name"] == mount["name"]]
    assert "emptyDir" in volume
    # the bundle image (docker/bundle.Dockerfile) documents the same copy step and owner
    bundle_dockerfile = (REPO / "docker" / "bundle.Dockerfile").read_text()
    cmd = re.search(r"^CMD (\[.*\])$", bundle_dockerfile, re.M).group(1)
    assert json.loads(cmd) == init["command"]
    assert f"--chown={pod['securityContext']['runAsUser']}:" in bundle_dockerfile


def test_every_container_has_requests_and_limits() -> None:
    for _, _, doc in OBJECTS:
        if doc["kind"] != "Deployment":
            continue
        pod = doc["spec"]["template"]["spec"]
        for container in pod.get("initContainers", []) + pod["containers"]:
            resources = container["resources"]
            for resource, parse in (("cpu", _cpu), ("memory", _bytes)):
                request = parse(resources["requests"][resource])
                limit = parse(resources["limits"][resource])
                assert 0 < request <= limit, f"{doc['metadata']['name']}/{container['name']} {resource}"


def test_graceful_shutdown(recall: dict) -> None:
    pod = recall["spec"]["template"]["spec"]
    command = _container(recall, "recall")["lifecycle"]["preStop"]["exec"]["command"]
    assert command[0] == "sleep"
    sleep = int(command[1])
    assert sleep >= 5, "endpoints and proxies need a few seconds to drop the pod"
    assert pod["terminationGracePeriodSeconds"] > sleep + _uvicorn_graceful_timeout(), (
        "time to drain in flight"
    )


def test_rollout_keeps_capacity(recall: dict) -> None:
    assert recall["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0
    assert "replicas" not in recall["spec"], "the HorizontalPodAutoscaler owns the replica count"


def test_prometheus_scrape_annotations(recall: dict) -> None:
    annotations = recall["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    assert annotations["prometheus.io/path"] == "/metrics"
    assert "/metrics" in _service_get_routes()
    assert int(annotations["prometheus.io/port"]) == SERVICE_PORT


def test_pods_run_as_the_image_user_with_a_read_only_root(recall: dict) -> None:
    dockerfile = (REPO / "docker" / "Dockerfile").read_text()
    image_uid = int(re.search(r"^ARG APP_UID=(\d+)$", dockerfile, re.M).group(1))
    pod = recall["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] == image_uid
    for _, _, doc in OBJECTS:
        if doc["kind"] == "Deployment":
            spec = doc["spec"]["template"]["spec"]
            for container in spec.get("initContainers", []) + spec["containers"]:
                context = container["securityContext"]
                assert context["readOnlyRootFilesystem"] is True
                assert context["allowPrivilegeEscalation"] is False
                assert context["capabilities"]["drop"] == ["ALL"]
    assert "/tmp" in {m["mountPath"] for m in _container(recall, "recall")["volumeMounts"]}


# --- wiring between objects --------------------------------------------------------------------


def _selects(selector: dict, deployment: dict) -> bool:
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    return all(labels.get(key) == value for key, value in selector.items())


def test_services_select_their_pods_and_ports() -> None:
    for service_name, deployment_name, container_name in [
        ("mml-recall", "mml-recall", "recall"),
        ("mml-redis", "mml-redis", "redis"),
    ]:
        service = _object("Service", service_name)
        deployment = _object("Deployment", deployment_name)
        assert _selects(service["spec"]["selector"], deployment)
        assert (
            deployment["spec"]["selector"]["matchLabels"].items()
            <= deployment["spec"]["template"]["metadata"]["labels"].items()
        )
        container = _container(deployment, container_name)
        for port in service["spec"]["ports"]:
            assert _port(container, port["targetPort"]) in {p["containerPort"] for p in container["ports"]}


def test_recall_reaches_redis_through_its_service(recall: dict) -> None:
    url = _env(_container(recall, "recall"))["REDIS_URL"]["value"]
    match = re.fullmatch(r"redis://([^:/]+):(\d+)/\d+", url)
    assert match, url
    service = _object("Service", match.group(1))
    assert int(match.group(2)) in {p["port"] for p in service["spec"]["ports"]}


def test_hpa_scales_the_deployment_on_cpu(recall: dict) -> None:
    hpa = _object("HorizontalPodAutoscaler", "mml-recall")
    assert hpa["apiVersion"] == "autoscaling/v2"
    target = hpa["spec"]["scaleTargetRef"]
    assert (target["kind"], target["name"]) == ("Deployment", recall["metadata"]["name"])
    (metric,) = hpa["spec"]["metrics"]
    assert metric["resource"]["name"] == "cpu" and metric["resource"]["target"]["type"] == "Utilization"
    assert 2 <= hpa["spec"]["minReplicas"] < hpa["spec"]["maxReplicas"]
    # utilisation is measured against the CPU request: every container must have one
    for container in recall["spec"]["template"]["spec"]["containers"]:
        assert "cpu" in container["resources"]["requests"]


def test_disruption_budget_selects_the_recall_pods(recall: dict) -> None:
    pdb = _object("PodDisruptionBudget", "mml-recall")
    assert _selects(pdb["spec"]["selector"]["matchLabels"], recall)
    assert (
        pdb["spec"]["minAvailable"] < _object("HorizontalPodAutoscaler", "mml-recall")["spec"]["minReplicas"]
    )


def test_arms_configmap_is_the_example_and_is_mounted_where_the_service_reads(
    recall: dict, tmp_path: Path
) -> None:
    container = _container(recall, "recall")
    arms_path = Path(_env(container)["MML_ARMS_CONFIG"]["value"])
    (mount,) = [m for m in container["volumeMounts"] if m["mountPath"] == str(arms_path.parent)]
    (volume,) = [v for v in recall["spec"]["template"]["spec"]["volumes"] if v["name"] == mount["name"]]
    configmap = _object("ConfigMap", volume["configMap"]["name"])
    text = configmap["data"][arms_path.name]
    assert yaml.safe_load(text) == yaml.safe_load((REPO / "docker" / "arms.example.yaml").read_text())
    (tmp_path / arms_path.name).write_text(text)
    assert {arm.name for arm in load_arms(tmp_path / arms_path.name).arms} == {"control", "mml"}


def test_admin_token_comes_from_the_documented_secret(recall: dict) -> None:
    ref = _env(_container(recall, "recall"))["MML_ADMIN_TOKEN"]["valueFrom"]["secretKeyRef"]
    secret = _object("Secret", ref["name"])
    assert ref["key"] in secret["stringData"]
    assert ref.get("optional", False) is False, "no pod may start without a token"
    assert "REPLACE" in secret["stringData"][ref["key"]], "the committed Secret is a placeholder"
