"""A serving-only install runs: `mml serve` from a tree holding only what the image copies (mml/ and
service/), with training, model, torch and the dev harness unimportable, answers /recall,
registers a new item (the bundle's own encoders) and serves it."""

from __future__ import annotations

import base64
import shutil
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from devtools.bundles import sources_digest, untrained_bundle
from devtools.harness import free_port, stop_process, wait_ready

REPO = Path(__file__).resolve().parents[1]
BUNDLES = REPO / ".cache" / "test-artifacts" / "service-bundles"
COPIED = ("mml", "service")  # docker/Dockerfile's COPY of the sources
ABSENT = ("training", "model", "torch", "devtools", "loadtest", "reliability", "pandas", "scipy")

LAUNCH = f"""
import importlib.abc, sys
absent = {ABSENT!r}
class Absent(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in absent:
            raise ModuleNotFoundError(f"No module named {{name!r}}", name=name)
        return None
# the editable install would find the checkout's packages: this tree's copies only
sys.meta_path[:] = [Absent()] + [f for f in sys.meta_path if "editable" not in type(f).__module__.lower()
                                 and "editable" not in getattr(f, "__name__", "").lower()]
from mml.cli import main
main()
"""


@pytest.fixture(scope="module")
def bundle(ml1m_features_dir: Path) -> Path:
    return untrained_bundle(
        ml1m_features_dir, BUNDLES / "a", seed=0, model_version=f"untrained-a-{sources_digest(REPO)}"
    )


def test_mml_serve_runs_from_the_serving_packages_alone(bundle, mirror, tmp_path):
    tree = tmp_path / "serving"
    for package in COPIED:
        shutil.copytree(REPO / package, tree / package, ignore=shutil.ignore_patterns("__pycache__"))
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = {"PYTHONPATH": str(tree), "MML_ADMIN_TOKEN": "t", "MML_EXPOSURE_LOG": str(tmp_path / "x.jsonl"),
           "PATH": "/usr/bin:/bin"}  # fmt: skip
    command = [sys.executable, "-c", LAUNCH, "serve", "--bundle", str(bundle), "--port", str(port)]
    log = tmp_path / "server.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(command, env=env, cwd=tree, stdout=out, stderr=subprocess.STDOUT)
    try:
        wait_ready(url, proc, timeout=180)
        with httpx.Client(base_url=url, timeout=60) as c:
            r = c.post("/recall", json={"user_id": "u", "history": ["1193", "661"], "k": 10})
            assert r.status_code == 200 and len(r.json()["items"]) == 10, r.text
            poster = (mirror / "ml-1m-posters" / "2355.jpg").read_bytes()
            item = {"title": "Serving Only", "image_base64": base64.b64encode(poster).decode()}
            put = c.put("/items/serving-only", json=item, headers={"Authorization": "Bearer t"})
            assert put.status_code == 201, put.text
            got = c.post(
                "/recall", json={"user_id": "u", "history": ["1193", "serving-only"], "k": 10}
            ).json()
            assert got["warmed_up"] == ["serving-only"]
    finally:
        stop_process(proc, 30)
    text = log.read_text(errors="replace")
    assert "Traceback" not in text, text[-3000:]
    assert str(REPO / "service") not in text
