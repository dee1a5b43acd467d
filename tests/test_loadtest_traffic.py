"""The load test's traffic (loadtest/traffic.py) on a small split built here: every request body the
locustfile sends is valid for the service's own schemas (service/schemas.py), histories replay the
split's new users, new items carry the real title and poster under an id outside the catalogue. And
the locustfile itself imports and defines its tasks (in a fresh interpreter: importing locust
monkey-patches the standard library with gevent, which must not leak into the test session)."""

from __future__ import annotations

import base64
import io
import json
import random
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # loadtest/ is a folder of the repository, not an installed package
    sys.path.insert(0, str(REPO))

from loadtest.traffic import NEW_ITEM_PREFIX, Traffic, TrafficConfig, load_traffic  # noqa: E402
from service.schemas import EventIn, ItemIn, RecallRequest  # noqa: E402

SUPPORT = 8
N_ITEMS, N_OLD = 30, 24


def _poster(path: Path, colour: tuple[int, int, int]) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (20, 30), colour).save(buffer, format="JPEG")
    path.write_bytes(buffer.getvalue())
    return buffer.getvalue()


@pytest.fixture(scope="module")
def split_dir(tmp_path_factory) -> Path:
    """A prepared split in the architecture.md section-2 layout: 30 items (24 old), 3 new users."""
    import pandas as pd

    out = tmp_path_factory.mktemp("split")
    posters = out / "posters"
    posters.mkdir()
    items = pd.DataFrame(
        {
            "item_idx": pd.array(range(1, N_ITEMS + 1), dtype="int32"),
            "item_id": [str(100 + i) for i in range(1, N_ITEMS + 1)],
            "title": [f"Movie {i}" for i in range(1, N_ITEMS + 1)],
            "year": pd.array([1990 + i if i % 5 else None for i in range(1, N_ITEMS + 1)], dtype="Int32"),
            "genres": ["Comedy|Drama" if i % 2 else "" for i in range(1, N_ITEMS + 1)],
            "text": [f"Movie {i}" for i in range(1, N_ITEMS + 1)],
            "image_path": [str(posters / f"{100 + i}.jpg") if i % 3 else None for i in range(1, N_ITEMS + 1)],
            "is_old": [i <= N_OLD for i in range(1, N_ITEMS + 1)],
        }
    )
    for i, path in enumerate(items["image_path"]):
        if isinstance(path, str):  # None is read back as a missing value
            _poster(Path(path), (i * 8 % 256, 40, 90))
    items.to_parquet(out / "items.parquet")
    rows = []
    for u in range(3):
        sequence = [(u * 7 + p * 3) % N_ITEMS + 1 for p in range(SUPPORT + 2)]
        for pos, item in enumerate(sequence):
            role = "support" if pos < SUPPORT else ("valid" if pos == SUPPORT else "query")
            rows.append(
                {"user_id": f"u{u}", "pos": pos, "item_idx": item, "timestamp": 1000 + pos, "role": role}
            )
    new = pd.DataFrame(rows).astype({"pos": "int8", "item_idx": "int32", "timestamp": "int64"})
    new.to_parquet(out / "new_users.parquet")
    old = pd.DataFrame({"user_id": ["o1", "o1"], "item_idx": [1, 2], "timestamp": [1, 2]})
    old.astype({"item_idx": "int32", "timestamp": "int64"}).to_parquet(out / "old_interactions.parquet")
    stats = {"support": SUPPORT, "n_items": N_ITEMS, "n_old_items": N_OLD, "n_new_users": 3}
    (out / "stats.json").write_text(json.dumps(stats))
    return out


def test_sequences_replay_the_new_users_in_time_order(split_dir):
    traffic = load_traffic(TrafficConfig(data_dir=split_dir, new_items=2))
    assert [s.user_id for s in traffic.sequences] == ["u0", "u1", "u2"]
    first = traffic.sequences[0]
    assert first.items == tuple(str(100 + (p * 3) % N_ITEMS + 1) for p in range(SUPPORT + 2))
    assert first.history == list(first.items[:SUPPORT])
    assert set(first.items) <= traffic.catalogue


def test_every_body_is_valid_for_the_service_schemas(split_dir):
    traffic = load_traffic(TrafficConfig(data_dir=split_dir, new_items=3, new_item_share=0.5))
    rng = random.Random(0)
    ends_with_new = 0
    for _ in range(200):
        body, new_item = traffic.recall_with_history(rng)
        request = RecallRequest.model_validate(body)  # extra="forbid": a misspelt field fails here
        assert request.k == 100 and request.history == body["history"]
        if new_item is None:
            assert body["history"] == next(
                s.history for s in traffic.sequences if s.user_id == body["user_id"]
            )
        else:
            ends_with_new += 1
            assert body["history"][-1] == new_item and new_item not in traffic.catalogue
    assert 60 < ends_with_new < 140  # about half, as configured
    live = Traffic.live_user_id(traffic.sequences[0], "abc")
    event = EventIn.model_validate(Traffic.event(live, traffic.sequences[0].items[0], 1_700_000_000))
    assert event.user_id == live and event.ts == 1_700_000_000
    stored = RecallRequest.model_validate(traffic.recall_stored(live))
    assert stored.history is None and stored.user_id == live
    for item in traffic.new_items:
        ItemIn.model_validate(item.body)


def test_new_items_carry_the_real_title_year_genres_and_poster(split_dir):
    import pandas as pd

    items = pd.read_parquet(split_dir / "items.parquet").set_index("item_id")
    traffic = load_traffic(TrafficConfig(data_dir=split_dir, new_items=3))
    assert len(traffic.new_items) == 3
    for item in traffic.new_items:
        source = items.loc[item.source_item_id]
        assert item.item_id == NEW_ITEM_PREFIX + item.source_item_id
        assert not source["is_old"]  # the split's new items come first when they have posters
        assert item.body["title"] == source["title"]
        assert item.body.get("year") == (None if pd.isna(source["year"]) else int(source["year"]))
        assert item.body.get("genres") == (source["genres"].split("|") if source["genres"] else None)
        assert base64.b64decode(item.body["image_base64"]) == Path(source["image_path"]).read_bytes()


def test_no_new_items_means_plain_histories(split_dir):
    traffic = load_traffic(TrafficConfig(data_dir=split_dir, new_items=0, new_item_share=1.0))
    body, new_item = traffic.recall_with_history(random.Random(1))
    assert new_item is None and set(body["history"]) <= traffic.catalogue


def test_the_locustfile_imports_and_defines_the_tasks():
    script = (
        "import json; import loadtest.locustfile as m; "
        "print(json.dumps({'tasks': sorted(t.__name__ for t in m.RecallUser.tasks), "
        "'timing': m._server_ms('model;dur=0.9, app;dur=1.7'), 'none': m._server_ms(None)}))"
    )
    out = subprocess.run(
        [sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr[-2000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    # RecallUser.tasks repeats each task by its weight: 6 history recalls, 3 events, 1 stored recall
    assert result["tasks"] == ["post_event"] * 3 + ["recall_history"] * 6 + ["recall_stored"]
    assert result["timing"] == 1.7 and result["none"] is None
