"""Operating the recall service: A/B arms over HTTP, hot reload under concurrent requests, Redis
stopped and restarted mid-traffic, real `mml serve` processes (several workers' metrics, SIGHUP).

Bundles: two ML-1M bundles exported from untrained models with different seeds (cached under
.cache/), so a reload visibly changes the model version and the ranking."""

from __future__ import annotations

import base64
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import redis

from devtools.harness import ThreadedServer, free_port, redis_server, serve_process, wait_ready
from devtools.load import ThreadedLoad, cycle
from mml.bundle import read_manifest
from service.ab import Assigner, load_arms
from service.app import create_app
from service.config import load_settings

REPO = Path(__file__).resolve().parents[1]
BUNDLES = REPO / ".cache" / "test-artifacts" / "service-bundles"
TOKEN = "ops-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


@pytest.fixture(scope="session")
def bundles(service_bundles) -> tuple[Path, Path]:
    return service_bundles


def version(path: Path) -> str:
    return read_manifest(path).model_version


def Traffic(url: str, bodies: list[dict], threads: int = 3) -> ThreadedLoad:  # noqa: N802
    """Client threads posting these /recall bodies back to back; every answer recorded."""
    return ThreadedLoad(url, cycle(bodies), threads=threads, timeout_s=30)


def test_ab_arms_assignment_override_exposures_and_srm(bundles, tmp_path):
    a, b = bundles
    arms = tmp_path / "arms.yaml"
    arms.write_text(
        "salt: ab-test\n"
        "arms:\n"
        "  - {name: control, kind: popularity, weight: 1}\n"
        "  - {name: mml, kind: mml, weight: 1}\n"
        f"  - {{name: canary, kind: mml, weight: 0, bundle: {b}}}\n"
    )
    log = tmp_path / "exposures.jsonl"
    app = create_app(load_settings(bundle=a, arms_config=arms, exposure_log=log))
    assigner = Assigner(load_arms(arms))
    with ThreadedServer(app) as srv, httpx.Client(base_url=srv.url) as c:
        deployment = app.state.service.deployment
        assert len(deployment.snapshots) == 2  # control and mml share bundle a: loaded once
        assert deployment.runtime("control") is deployment.runtime("mml")
        seen = {}
        for i in range(300):
            user = f"user-{i}"
            r = c.post("/recall", json={"user_id": user, "history": ["1193", "661"], "k": 5})
            body = r.json()
            assert r.headers["X-MML-Arm"] == body["arm"] == assigner.assign(user)
            seen[body["arm"]] = seen.get(body["arm"], 0) + 1
            if body["arm"] == "control":
                assert body["model_version"] == f"popularity@{version(a)}"
                assert not body["fallback"]  # the control arm's ranking, not a fallback
        assert set(seen) == {"control", "mml"} and min(seen.values()) > 100  # 300 users at 50/50
        again = c.post("/recall", json={"user_id": "user-7", "history": ["1193"], "k": 5}).json()
        assert again["arm"] == assigner.assign("user-7")  # stable
        qa = c.post(
            "/recall", json={"user_id": "user-7", "history": ["1193"]}, headers={"X-MML-Arm": "canary"}
        )
        assert qa.json()["arm"] == "canary" and qa.json()["model_version"] == version(b)
        models = c.get("/v1/models").json()
        assert {m["name"]: m["weight"] for m in models["arms"]} == {"control": 0.5, "mml": 0.5, "canary": 0.0}
    records = [json.loads(line) for line in log.read_text().splitlines()]
    assert len(records) == 302
    assert sum(r["override"] for r in records) == 1 and {r["arm"] for r in records} == {
        "control",
        "mml",
        "canary",
    }
    srm = subprocess.run(
        [sys.executable, "-m", "mml.cli", "ab", "srm", "--exposures", str(log), "--arms", str(arms)],
        capture_output=True,
        text=True,
        cwd=REPO,
    )
    assert srm.returncode == 0 and "no sample ratio mismatch" in srm.stdout, srm.stdout + srm.stderr


def test_reload_under_concurrent_requests(bundles, tmp_path):
    a, b = bundles
    broken = BUNDLES / f"broken-{os.getpid()}"  # bundle a, hard-linked, whose manifest lies about one file
    shutil.rmtree(broken, ignore_errors=True)
    shutil.copytree(a, broken, copy_function=os.link)
    manifest = json.loads((a / "manifest.json").read_text())
    tables = next(f for f in manifest["files"] if f["path"] == "tables/items.npz")
    tables["sha256"] = "0" * 64
    (broken / "manifest.json").unlink()  # a new file, not the hard link to bundle a's manifest
    (broken / "manifest.json").write_text(json.dumps(manifest))
    app = create_app(load_settings(bundle=a, admin_token=TOKEN, exposure_log=tmp_path / "x.jsonl"))
    bodies = [
        {"user_id": f"u{i}", "history": ["1193", "661", "914"][: 1 + i % 3], "k": 50} for i in range(20)
    ]
    with (
        ThreadedServer(app) as srv,
        httpx.Client(base_url=srv.url, timeout=120) as c,
        Traffic(srv.url, bodies) as traffic,
    ):
        traffic.wait_for(30)
        assert c.post("/admin/reload", json={"path": str(b)}).status_code == 401
        for target in (b, a, b):
            r = c.post("/admin/reload", json={"path": str(target)}, headers=AUTH)
            assert r.status_code == 200, r.text
            assert r.json()["reloaded"] == {"mml": version(target)}
            traffic.wait_for(30)
        refused = c.post("/admin/reload", json={"path": str(broken)}, headers=AUTH)
        assert refused.status_code == 409 and "checksum mismatch" in refused.json()["message"]
        missing = c.post("/admin/reload", json={"path": str(tmp_path / "nowhere")}, headers=AUTH)
        assert missing.status_code == 409
        traffic.wait_for(30)
        assert c.get("/v1/models").json()["arms"][0]["model_version"] == version(b)  # the old one kept
    shutil.rmtree(broken)
    assert traffic.failures() == []
    versions = {answer.model_version for answer in traffic.answers}
    assert versions == {version(a), version(b)}


@pytest.mark.skipif(shutil.which("redis-server") is None, reason="redis-server is not installed")
def test_redis_stopped_and_restarted_mid_traffic(bundles, mirror, tmp_path):
    a, _ = bundles
    with redis_server(tmp_path) as server:
        settings = load_settings(
            bundle=a,
            redis_url=server.url,
            admin_token=TOKEN,
            exposure_log=tmp_path / "x.jsonl",
            redis_backoff_s=0.05,
            redis_backoff_max_s=0.2,
        )
        app = create_app(settings)
        with ThreadedServer(app) as srv, httpx.Client(base_url=srv.url, timeout=30) as c:
            poster = (mirror / "ml-1m-posters" / "1.jpg").read_bytes()
            item = {"title": "Toy Story 9", "year": 2040, "image_base64": base64.b64encode(poster).decode()}
            assert c.put("/items/toy-9", json=item, headers=AUTH).status_code == 201
            for ts, movie in enumerate(["1", "2355", "3114"]):
                assert (
                    c.post("/events", json={"user_id": "stored", "item_id": movie, "ts": ts}).status_code
                    == 202
                )
            bodies = [
                {"user_id": "stored", "k": 20},  # history from Redis
                {"user_id": "explicit", "history": ["1", "toy-9"], "k": 20},  # a registered new item
            ]
            errors_before = _metric(c, "mml_redis_errors_total")
            with Traffic(srv.url, bodies) as traffic:
                traffic.wait_for(20)
                server.stop()
                stopped = traffic.count()
                traffic.wait_for(60)
                down = traffic.count()
                assert c.post("/events", json={"user_id": "x", "item_id": "1"}).status_code == 503
                server.start()
                deadline = time.monotonic() + 20
                while True:  # recovers by itself: answers stop being degraded
                    traffic.wait_for(10)
                    if not any(answer.degraded for answer in traffic.answers[-6:]):
                        break
                    assert time.monotonic() < deadline, "the service did not recover from the Redis restart"
            assert traffic.failures() == []
            during = [(i, a.body) for i, a in enumerate(traffic.answers[:down]) if a.degraded]
            assert during, "no request noticed that Redis was down"
            in_flight = stopped + len(traffic._threads)  # may have read the history before the stop
            for i, body in during:
                if body["user_id"] == "stored":
                    # no stored history while down: popularity, flagged
                    assert body["fallback"] or i < in_flight, (i, stopped)
                else:
                    assert body["warmed_up"] == ["toy-9"]  # the new item, from the local cache
            last = {a.body["user_id"]: a.body for a in traffic.answers[-6:]}
            assert not last["stored"]["fallback"] and last["explicit"]["warmed_up"] == ["toy-9"]
            assert _metric(c, "mml_redis_errors_total") > errors_before
            assert c.get("/readyz").json()["store_available"] is True
    client = redis.Redis.from_url(server.url)  # closed: nothing to flush, the server is gone
    client.close()


def _metric(client: httpx.Client, name: str, **labels) -> float:
    from prometheus_client.parser import text_string_to_metric_families

    for family in text_string_to_metric_families(client.get("/metrics").text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return sample.value
    return 0.0


def _serve(bundle: Path, port: int, tmp_path: Path, *args: str) -> subprocess.Popen:
    env = {"MML_EXPOSURE_LOG": str(tmp_path / "exposures.jsonl"), "MML_ADMIN_TOKEN": TOKEN}
    return serve_process(bundle, port, "--log-level", "warning", *args, env=env, cwd=REPO)


def test_real_server_with_two_workers_sums_metrics_and_restarts_on_sighup(bundles, tmp_path):
    a, b = bundles
    current = tmp_path / "current"
    current.symlink_to(a)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    proc = _serve(current, port, tmp_path, "--workers", "2")
    try:
        wait_ready(url, proc)
        for i in range(40):  # one connection each: the kernel spreads them over both workers
            r = httpx.post(f"{url}/recall", json={"user_id": f"w{i}", "history": ["1193", "661"], "k": 10})
            assert r.status_code == 200
        pids = set()
        for _ in range(10):  # whichever worker answers /metrics, it reports every worker's samples
            with httpx.Client(base_url=url, timeout=30) as fresh:
                pids.add(fresh.get("/readyz").json()["pid"])
                assert _metric(fresh, "mml_recall_requests_total", arm="mml", status="200") == 40
                assert _metric(fresh, "mml_recall_request_seconds_count", arm="mml") == 40
                assert _metric(fresh, "mml_bundle_info", arm="mml", model_version=version(a)) == 1
        assert proc.pid not in pids  # answered by worker processes, not the supervisor

        # SIGHUP to the supervisor: uvicorn restarts the workers, which load what the symlink names now
        current.unlink()
        current.symlink_to(b)
        proc.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 300  # two workers reload a bundle each; slow on a loaded 2-core box
        while True:
            # done when the answers come from the new bundle and the last old worker has exited
            # (uvicorn retires each old worker after its replacement is ready: one may still run)
            try:
                served = {httpx.get(f"{url}/v1/models").json()["arms"][0]["model_version"] for _ in range(6)}
                with httpx.Client(base_url=url, timeout=30) as fresh:
                    old = _metric(fresh, "mml_bundle_info", arm="mml", model_version=version(a))
            except httpx.HTTPError:
                served, old = set(), None
            if served == {version(b)} and old == 0:  # dead workers' gauges reaped
                break
            assert time.monotonic() < deadline, "the workers were not restarted on the new bundle"
            time.sleep(0.2)
        with httpx.Client(base_url=url, timeout=30) as fresh:
            assert _metric(fresh, "mml_bundle_info", arm="mml", model_version=version(b)) == 1
            assert (
                _metric(fresh, "mml_recall_requests_total", arm="mml", status="200") == 40
            )  # counters survive
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0  # the supervisor stops its workers gracefully


def test_real_server_admin_reload_reaches_every_worker_without_failed_requests(bundles, tmp_path):
    a, b = bundles
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    proc = _serve(a, port, tmp_path, "--workers", "2")
    bodies = [{"user_id": f"r{i}", "history": ["1193", "661"], "k": 20} for i in range(20)]

    def pids_and_versions(n: int = 12) -> tuple[set[int], set[str]]:
        pids, versions = set(), set()
        for _ in range(n):  # fresh connections: the kernel spreads them over the workers
            with httpx.Client(base_url=url, timeout=30) as fresh:
                pids.add(fresh.get("/readyz").json()["pid"])
                versions.add(fresh.get("/v1/models").json()["arms"][0]["model_version"])
        return pids, versions

    try:
        wait_ready(url, proc)
        before, versions = pids_and_versions()
        deadline = time.monotonic() + 60
        while len(before) < 2:  # until both workers have answered
            assert time.monotonic() < deadline, f"only worker(s) {before} answered"
            more, also = pids_and_versions()
            before, versions = before | more, versions | also
        assert versions == {version(a)}
        with Traffic(url, bodies, threads=2) as traffic:  # kept-alive connections, each on one worker
            traffic.wait_for(20)
            r = httpx.post(f"{url}/admin/reload", json={"path": str(b)}, headers=AUTH, timeout=300)
            assert r.status_code == 200, r.text
            assert r.json()["reloaded"] == {"mml": version(b)} and r.json()["workers"] == 2
            deadline = time.monotonic() + 300  # the other worker follows (poll + its own load)
            while True:
                pids, versions = pids_and_versions()
                if versions == {version(b)} and len(pids) == 2:
                    break
                assert time.monotonic() < deadline, f"workers {pids} serve {versions}"
                time.sleep(0.2)
            assert pids == before  # reloaded in place: no worker was restarted
            traffic.wait_for(20)
        assert traffic.failures() == []
        assert {answer.model_version for answer in traffic.answers} == {version(a), version(b)}
        # a bundle that fails verification is refused by the receiving worker: nobody is replaced
        refused = httpx.post(f"{url}/admin/reload", json={"path": str(tmp_path / "nowhere")}, headers=AUTH)
        assert refused.status_code == 409
        time.sleep(1.0)
        still, versions = pids_and_versions()
        assert versions == {version(b)} and still <= before
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0


def test_worker_group_control_folder(tmp_path):
    from service.ab import DEFAULT_ARMS
    from service.workers import WorkerGroup, worker_group

    first, second = tmp_path / "b1", tmp_path / "b2"
    first.mkdir(), second.mkdir()
    control = tmp_path / "control"
    control.mkdir()
    group = WorkerGroup.create(control, first, workers=3)
    env = group.environment()
    assert env["MML_BUNDLE"] == str(control / "bundle") and env["MML_WORKERS"] == "3"
    assert os.readlink(control / "bundle") == str(first) and group.arms_override() is None
    assert group.last() is None
    kept = group.publish(control / "bundle", None, None, None)  # a reload that kept the default bundle
    assert os.readlink(control / "bundle") == str(first) and group.arms_override() is None
    assert group.last() == kept and kept.origin == os.getpid() and kept.path is None
    arms = DEFAULT_ARMS.model_copy(deep=True)
    arms.arms[0].bundle = second
    moved = group.publish(second, arms, str(second), "mml")  # a per-arm reload: arms config too
    assert moved.generation > kept.generation and group.last() == moved
    assert os.readlink(control / "bundle") == str(second)
    assert load_arms(group.arms_override()).arms[0].bundle == second
    assert sorted(p.name for p in control.iterdir()) == [
        "arms.json",
        "bundle",
        "reload.json",
    ]  # no temporaries
    assert worker_group(control, 3) == group and worker_group(None, 1) is None


def test_a_worker_follows_reloads_published_by_another_and_keeps_its_bundle_on_a_refused_one(
    bundles, tmp_path
):
    import json as _json

    from service.handlers import RecallService
    from service.workers import WorkerGroup

    a, b = bundles
    control = tmp_path / "control"
    control.mkdir()
    group = WorkerGroup.create(control, a, workers=2)
    service = RecallService(
        load_settings(
            bundle=group.bundle_link, control_dir=control, workers=2, exposure_log=tmp_path / "x.jsonl"
        )
    )
    lifecycle = service.lifecycle
    lifecycle.load()
    try:
        assert not lifecycle.pending_publication() and not lifecycle.follow_published()

        def published_by_another_worker(path: Path) -> None:
            record = group.publish(path, None, str(path), None)
            other = {**record.__dict__, "origin": record.origin + 1}  # as if another process made it
            (control / "reload.json").write_text(_json.dumps(other))

        published_by_another_worker(b)
        assert lifecycle.pending_publication() and lifecycle.follow_published()
        assert service.models().arms[0].model_version == version(b)
        assert not lifecycle.pending_publication()  # made once
        published_by_another_worker(tmp_path / "nowhere")  # this worker cannot load it
        assert lifecycle.follow_published()  # handled: refused and logged, not retried
        assert service.models().arms[0].model_version == version(b) and not lifecycle.pending_publication()
    finally:
        service.close()


def test_real_server_sighup_reloads_the_bundle_a_symlink_points_to(bundles, tmp_path):
    a, b = bundles
    current = tmp_path / "current"
    current.symlink_to(a)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    proc = _serve(current, port, tmp_path)
    try:
        wait_ready(url, proc)
        assert httpx.get(f"{url}/v1/models").json()["arms"][0]["model_version"] == version(a)
        current.unlink()
        current.symlink_to(b)
        proc.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 60
        while httpx.get(f"{url}/v1/models").json()["arms"][0]["model_version"] != version(b):
            assert time.monotonic() < deadline, "SIGHUP did not reload the bundle"
            time.sleep(0.1)
        r = httpx.post(f"{url}/recall", json={"user_id": "u", "history": ["1"]})
        assert r.status_code == 200 and r.json()["model_version"] == version(b)
    finally:
        proc.send_signal(signal.SIGTERM)
        # a single uvicorn process shuts down gracefully, then re-raises the signal it caught
        assert proc.wait(timeout=60) in (0, -signal.SIGTERM)


@pytest.fixture
def own_redis():
    """A redis-server of this test's own (the shared one on 6379 is never flushed)."""
    with redis_server() as server:
        yield server.url


def test_two_replicas_share_state_through_redis(bundles, mirror, own_redis, tmp_path):
    redis_db13 = own_redis
    a, _ = bundles
    arms = tmp_path / "arms.json"
    arms.write_text(
        json.dumps({"salt": "r", "arms": [{"name": "mml"}, {"name": "pop", "kind": "popularity"}]})
    )
    settings = load_settings(
        bundle=a, redis_url=redis_db13, admin_token=TOKEN, arms_config=arms, exposure_log=tmp_path / "x.jsonl"
    )
    with (
        ThreadedServer(create_app(settings)) as one,
        ThreadedServer(create_app(settings)) as two,
        httpx.Client(base_url=one.url, timeout=30) as c1,
        httpx.Client(base_url=two.url, timeout=30) as c2,
    ):
        poster = (mirror / "ml-1m-posters" / "3114.jpg").read_bytes()  # Toy Story 2
        item = {
            "title": "Toy Story 2 (director's cut)",
            "genres": ["Animation"],
            "image_base64": base64.b64encode(poster).decode(),
        }
        assert c1.put("/items/ts2-dc", json=item, headers=AUTH).status_code == 201
        for ts, movie in enumerate(["1", "3114", "ts2-dc"]):
            assert (
                c1.post("/events", json={"user_id": "shared", "item_id": movie, "ts": ts}).status_code == 202
            )
        mml = {"X-MML-Arm": "mml"}  # QA override: the popularity arm would not use the history
        deadline = time.monotonic() + 5  # replica two takes the item at its next item-sync round
        shared = 1  # /recall requests of "shared" (QA overrides: not in the SRM count)
        while True:
            on_two = c2.post("/recall", json={"user_id": "shared", "k": 10}, headers=mml).json()  # from Redis
            shared += 1
            if on_two["warmed_up"] or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        on_one = c1.post("/recall", json={"user_id": "shared", "k": 10}, headers=mml).json()
        assert on_two["warmed_up"] == ["ts2-dc"] and not on_two["degraded"]
        assert on_two["items"] == on_one["items"]
        # the generated embedding was cached in Redis by the first replica that needed it
        assert redis.Redis.from_url(redis_db13).hexists(f"mml:emb:{version(a)}", "ts2-dc")
        for i in range(200):  # users spread over both replicas, the same assignment on each
            client = (c1, c2)[i % 2]
            assert (
                client.post("/recall", json={"user_id": f"srm-{i}", "history": ["1"], "k": 5}).status_code
                == 200
            )
    # the servers have stopped: their exposure writers have flushed
    assert redis.Redis.from_url(redis_db13).xlen("mml:exposures") == 200 + shared
    srm = subprocess.run(
        [sys.executable, "-m", "mml.cli", "ab", "srm", "--exposures", redis_db13, "--arms", str(arms)],
        capture_output=True,
        text=True,
        cwd=REPO,
    )
    assert srm.returncode == 0, srm.stdout + srm.stderr
    counted = sum(int(line.split()[2]) for line in srm.stdout.splitlines() if " users " in line)
    assert counted == 200  # the two QA-overridden requests of "shared" are left out


def test_serve_refuses_a_bad_bundle_in_one_line(tmp_path):
    (tmp_path / "manifest.json").write_text(json.dumps({"format_version": 99}))
    out = subprocess.run(
        [sys.executable, "-m", "mml.cli", "serve", "--bundle", str(tmp_path)],
        capture_output=True,
        text=True,
        cwd=REPO,
    )
    assert out.returncode == 2
    assert out.stderr.strip().startswith("error:") and "format_version 99" in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1


ITEM_SYNC_BOUND_S = 1.0  # docs/service.md: a registered item is a candidate on every worker within this


def test_put_items_reaches_every_worker_within_the_bound(bundles, mirror, tmp_path):
    """mml serve --workers 2 over one Redis: an item registered through one worker is served by both
    (warmed up in a history: its snapshot, the one candidates are scored from, holds it) within
    ITEM_SYNC_BOUND_S of the PUT's answer."""
    a, _ = bundles
    poster = (mirror / "ml-1m-posters" / "2355.jpg").read_bytes()
    item = {
        "title": "A Bug's Life 3",
        "genres": ["Animation"],
        "image_base64": base64.b64encode(poster).decode(),
    }
    with redis_server() as redis_srv:
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        proc = _serve(a, port, tmp_path, "--workers", "2", "--redis-url", redis_srv.url)
        try:
            wait_ready(url, proc)
            put = httpx.put(f"{url}/items/bug-3", json=item, headers=AUTH, timeout=60)
            assert put.status_code == 201, put.text
            answered = time.monotonic()
            time.sleep(ITEM_SYNC_BOUND_S)
            pids, body = set(), {"user_id": "w", "history": ["2355", "bug-3"], "k": 1000}
            for _ in range(30):  # one connection each: the kernel spreads them over both workers
                with httpx.Client(base_url=url, timeout=30) as fresh:
                    pids.add(fresh.get("/readyz").json()["pid"])
                    got = fresh.post("/recall", json=body).json()
                    assert got["warmed_up"] == ["bug-3"] and got["ignored"] == [], got
            assert len(pids) == 2, "both workers answered"
            assert time.monotonic() - answered < 30
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=60)
