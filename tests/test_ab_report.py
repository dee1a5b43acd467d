"""`mml ab report` (service/ab_report.py): the join, a planted difference found, the A/A false-positive
rate of the clustered intervals, the SRM gate, bad input named by field, and a read from a real Redis."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from pathlib import Path

import numpy as np
import pytest

from mml.errors import MMLError
from service.ab import ArmConfig, ArmsConfig
from service.ab_report import (
    Catalogue,
    Events,
    Exposures,
    ReportConfig,
    build_report,
    events_from_records,
    exposures_from_records,
    load_events,
    load_exposures,
    next_event_rank,
    parse_window,
    ratio_delta,
    to_markdown,
)

ARMS = ArmsConfig(salt="t", arms=[ArmConfig(name="control", weight=1), ArmConfig(name="mml", weight=1)])
N_CATALOGUE = 1000  # synthetic catalogue: ids "0".."999"; ids >= 900 are new items


def simulate(
    rng: np.random.Generator,
    users_per_arm: int,
    hit_mean: dict[str, float],
    list_len: int = 20,
    concentration: float = 2.0,
    new_share: dict[str, float] | None = None,
) -> tuple[Exposures, Events]:
    """A log in the exposure format of the service (`items` in rank order) and its events, built with
    arrays. Each user has 1..7 exposures an hour apart; each has a next event 1..600 s later with
    probability 0.9. A user's chance that the next event is in the list's top 10 is drawn from
    Beta(mean * c, (1 - mean) * c): users differ, so exposures of one user are correlated (what the
    clustered interval must account for). A hit's rank is uniform on 1..10; otherwise the event is
    an item outside the list."""
    arms = np.repeat(np.array(list(hit_mean)), users_per_arm)  # an exact split: SRM p = 1
    n_users = len(arms)
    mean = np.array([hit_mean[a] for a in arms])
    propensity = rng.beta(mean * concentration, (1 - mean) * concentration)
    per_user = rng.integers(1, 8, n_users)
    user_of = np.repeat(np.arange(n_users), per_user)
    n = len(user_of)
    nth = np.arange(n) - np.repeat(np.cumsum(per_user) - per_user, per_user)
    ts = 1.7e9 + user_of * 10.0 + nth * 3600.0 + rng.random(n)  # ms-like exposure stamps
    base = rng.integers(0, 900, n)  # the list: old items base .. base + list_len - 1 (mod 900)
    items = (base[:, None] + np.arange(list_len)) % 900
    if new_share:  # the first new_share * list_len slots of some arms hold new items (ids >= 900)
        for arm, share in new_share.items():
            slots = int(round(share * list_len))
            rows = np.flatnonzero(arms[user_of] == arm)
            items[rows[:, None], np.arange(slots)] = 900 + rng.integers(0, 100, (len(rows), slots))
    hit = rng.random(n) < propensity[user_of]
    rank = rng.integers(1, 11, n)
    outside = (base + list_len + rng.integers(0, 900 - list_len, n)) % 900
    next_item = np.where(hit, items[np.arange(n), np.minimum(rank, list_len) - 1], outside)
    has_event = rng.random(n) < 0.9
    users = np.char.add("u", user_of.astype(str))
    exposures = Exposures(
        user=users,
        arm=arms[user_of],
        ts=ts,
        override=np.zeros(n, bool),
        items=items.ravel().astype(str),
        offsets=np.arange(n + 1, dtype=np.int64) * list_len,
    )
    events = Events(
        user=users[has_event],
        item=next_item[has_event].astype(str),
        ts=np.floor(ts[has_event] + rng.uniform(1, 600, has_event.sum())),  # whole seconds, as POST /events
    )
    return exposures, events


CATALOGUE = Catalogue(n_items=N_CATALOGUE, old=frozenset(str(i) for i in range(900)))


def test_join_takes_the_same_users_next_event_within_the_window():
    exposures = exposures_from_records(
        [
            {"ts": 100.5, "user_id": "a", "arm": "control", "items": ["x", "y", "z"]},  # next: y at 130
            {
                "ts": 200.0,
                "user_id": "a",
                "arm": "control",
                "items": ["y", "w"],
            },  # next: w at 2001, 1801 s later
            {"ts": 100.0, "user_id": "b", "arm": "mml", "items": ["x", "y"]},  # b has no event after it
            {"ts": 50.0, "user_id": "c", "arm": "mml", "items": ["q", "x"]},  # next: x at 50 (same ts)
            {"ts": 60.0, "user_id": "d", "arm": "mml", "items": ["q"]},  # next: r at 61, not listed
        ]
    )
    events = events_from_records(
        [
            {"user_id": "a", "item_id": "x", "ts": 100},  # before the exposure (its history): not it
            {"user_id": "a", "item_id": "y", "ts": 130},
            {"user_id": "a", "item_id": "z", "ts": 140},  # a later event: not the next one
            {"user_id": "a", "item_id": "w", "ts": 2001},
            {"user_id": "b", "item_id": "x", "ts": 99},
            {"user_id": "c", "item_id": "x", "ts": 50},
            {"user_id": "d", "item_id": "r", "ts": 61},
            {"user_id": "d", "item_id": "q", "ts": 62},
        ]
    )
    matched, rank = next_event_rank(exposures, events, window_s=1800)
    assert matched.tolist() == [True, False, False, True, True]
    assert rank.tolist() == [2, 0, 0, 2, 0]


def test_window_parsing():
    assert parse_window("30m") == 1800 and parse_window("1800") == 1800 and parse_window("0.5h") == 1800
    for bad in ("soon", "-1m", "0"):
        with pytest.raises(MMLError, match="--window"):
            parse_window(bad)


def test_planted_difference_is_found():
    rng = np.random.default_rng(7)
    exposures, events = simulate(
        rng, 1500, {"control": 0.10, "mml": 0.16}, new_share={"control": 0.0, "mml": 0.25}
    )
    report = build_report(exposures, events, ARMS, ReportConfig(bootstrap=200), CATALOGUE)
    assert report.refused is None and report.control == "control"
    assert report.arms["control"].users == 1500 and report.arms["mml"].users == 1500
    hit = report.comparisons["mml"]["hit_rate@10"]
    # the planted effect: 0.06 on the hit propensity, times 0.9 (an exposure has an event with p 0.9)
    assert hit.p_value < 1e-4 and hit.ci_low > 0
    assert hit.ci_low < 0.06 * 0.9 < hit.ci_high
    assert report.comparisons["mml"]["mrr"].p_value < 1e-3 and report.comparisons["mml"]["mrr"].diff > 0
    # every hit has rank <= 10 <= list length: hit rate@50 and @100 equal hit rate@10 here
    assert report.arms["mml"].metrics["hit_rate@100"] == report.arms["mml"].metrics["hit_rate@10"]
    # the planted new-item share: exactly 5 of 20 slots in the mml arm, none in the control
    new = report.comparisons["mml"]["new_item_share"]
    assert new.control == 0 and new.value == pytest.approx(0.25) and new.ci_low > 0.2
    # coverage: the lists cover (almost) all 900 old items in both arms; mml adds the 100 new ones
    coverage = report.comparisons["mml"]["coverage"]
    assert coverage.control == pytest.approx(0.9, abs=0.01) and coverage.value == pytest.approx(1.0, abs=0.01)
    assert coverage.ci_low > 0 and coverage.p_value < 1e-3 and coverage.method == "bootstrap-se"
    for comparison in report.comparisons["mml"].values():  # every interval holds its own estimate
        assert comparison.ci_low <= comparison.diff <= comparison.ci_high
    # the markdown table carries every metric
    table = to_markdown(report)
    for name in ("hit_rate@10", "hit_rate@50", "hit_rate@100", "mrr", "coverage", "new_item_share"):
        assert f"| {name} |" in table


def test_bootstrap_and_delta_intervals_agree():
    exposures, events = simulate(np.random.default_rng(3), 800, {"control": 0.1, "mml": 0.14})
    delta = build_report(exposures, events, ARMS, ReportConfig()).comparisons["mml"]["hit_rate@10"]
    boot = build_report(exposures, events, ARMS, ReportConfig(ci="bootstrap", bootstrap=2000))
    boot = boot.comparisons["mml"]["hit_rate@10"]
    assert boot.method == "bootstrap" and boot.diff == delta.diff
    width_delta, width_boot = delta.ci_high - delta.ci_low, boot.ci_high - boot.ci_low
    assert width_boot == pytest.approx(width_delta, rel=0.15)


def test_aa_false_positive_rate_is_nominal_and_would_not_be_without_clustering():
    """500 seeded A/A experiments through the whole report: p < 0.05 in 2-8 % of them for hit rate@10
    (the target), and for MRR. The same logs analysed as if exposures were independent (each its own
    cluster) reject far more often: the users' correlation is real, so this test could fail."""
    rejected_hit = rejected_mrr = rejected_naive = 0
    runs = 500
    for seed in range(runs):
        exposures, events = simulate(np.random.default_rng(1000 + seed), 150, {"control": 0.2, "mml": 0.2})
        report = build_report(exposures, events, ARMS, ReportConfig())
        assert report.refused is None
        rejected_hit += report.comparisons["mml"]["hit_rate@10"].p_value < 0.05
        rejected_mrr += report.comparisons["mml"]["mrr"].p_value < 0.05
        # naive: one cluster per exposure
        matched, rank = next_event_rank(exposures, events, 1800)
        hit = ((rank >= 1) & (rank <= 10)).astype(float)
        arms = [hit[exposures.arm == a] for a in ("control", "mml")]
        (r0, v0), (r1, v1) = (ratio_delta(h, np.ones_like(h)) for h in arms)
        rejected_naive += abs(r1 - r0) / np.sqrt(v0 + v1) > 1.959964
    assert 0.02 <= rejected_hit / runs <= 0.08, rejected_hit
    assert 0.02 <= rejected_mrr / runs <= 0.08, rejected_mrr
    assert rejected_naive / runs > 0.10, rejected_naive


def test_skewed_log_makes_the_report_refuse(tmp_path):
    exposures, events = simulate(np.random.default_rng(5), 500, {"control": 0.1, "mml": 0.2})
    user_index = np.char.lstrip(exposures.user, "u").astype(int)
    lossy = (exposures.arm == "mml") & (user_index % 5 == 0)  # the mml arm loses a fifth of its users' logs
    skewed = subset(exposures, ~lossy)
    report = build_report(skewed, events, ARMS, ReportConfig())
    assert report.srm.mismatch and report.srm.p_value < 1e-3
    assert report.refused and "sample ratio mismatch" in report.refused
    assert report.comparisons == {} and report.arms == {}

    # the command: exit status 1, the reason on the terminal, and the JSON says so too
    log, ev, arms = tmp_path / "exp.jsonl", tmp_path / "ev.jsonl", tmp_path / "arms.json"
    write_log(skewed, events, log, ev)
    arms.write_text(ARMS.model_dump_json())
    run = subprocess.run(
        [sys.executable, "-m", "mml.cli", "ab", "report", "--exposures", str(log), "--events", str(ev)]
        + ["--arms", str(arms), "--json"],
        capture_output=True,
        text=True,
    )
    assert run.returncode == 1, run.stderr
    assert "sample ratio mismatch" in json.loads(run.stdout)["refused"]


def subset(exposures: Exposures, keep: np.ndarray) -> Exposures:
    rows = np.flatnonzero(keep)
    lengths = np.diff(exposures.offsets)
    return Exposures(
        user=exposures.user[rows],
        arm=exposures.arm[rows],
        ts=exposures.ts[rows],
        override=exposures.override[rows],
        items=exposures.items[np.repeat(keep, lengths)],
        offsets=np.r_[0, np.cumsum(lengths[rows])].astype(np.int64),
    )


def write_log(exposures: Exposures, events: Events, log_path, events_path) -> None:
    with open(log_path, "w") as fh:
        for i in range(len(exposures)):
            items = exposures.items[exposures.offsets[i] : exposures.offsets[i + 1]].tolist()
            record = {"ts": float(exposures.ts[i]), "request_id": f"r{i}", "user_id": str(exposures.user[i])}
            record |= {"arm": str(exposures.arm[i]), "model_version": "v", "override": False, "items": items}
            fh.write(json.dumps(record) + "\n")
    with open(events_path, "w") as fh:
        for u, item, ts in zip(events.user, events.item, events.ts, strict=True):
            fh.write(json.dumps({"user_id": str(u), "item_id": str(item), "ts": int(ts)}) + "\n")


def test_command_prints_the_table_and_json(tmp_path):
    exposures, events = simulate(np.random.default_rng(11), 300, {"control": 0.1, "mml": 0.3})
    log, ev, arms = tmp_path / "exp.jsonl", tmp_path / "ev.jsonl", tmp_path / "arms.json"
    write_log(exposures, events, log, ev)
    arms.write_text(ARMS.model_dump_json())
    base = [sys.executable, "-m", "mml.cli", "ab", "report", "--exposures", str(log), "--events", str(ev)]
    base += ["--arms", str(arms), "--window", "20m"]
    table = subprocess.run(base, capture_output=True, text=True, env=dict(os.environ, COLUMNS="200"))
    assert table.returncode == 0, table.stderr
    assert "hit_rate@10" in table.stdout and "no sample ratio" not in table.stdout and "SRM" in table.stdout
    out = json.loads(subprocess.run(base + ["--json"], capture_output=True, text=True, check=True).stdout)
    in_process = build_report(
        load_exposures(str(log)), load_events(str(ev)), ARMS, ReportConfig(window_s=1200)
    ).model_dump(mode="json")
    assert out == in_process
    assert out["comparisons"]["mml"]["hit_rate@10"]["p_value"] < 1e-4


@pytest.mark.parametrize(
    ("record", "field"),
    [
        ({"ts": 1, "user_id": "a", "arm": "control"}, "items"),
        ({"ts": 1, "user_id": "a", "arm": "control", "items": "[1,"}, "items"),
        ({"ts": 1, "user_id": "a", "arm": "control", "items": [["x"]]}, "items.0"),
        ({"ts": "noon", "user_id": "a", "arm": "control", "items": []}, "ts"),
        ({"ts": 1, "arm": "control", "items": []}, "user_id"),
    ],
)
def test_bad_exposure_records_name_the_field(record, field):
    with pytest.raises(MMLError, match=rf"record 1: field '{field}'"):
        exposures_from_records([record])


def test_bad_events_and_arms_name_the_field(tmp_path):
    path = tmp_path / "ev.jsonl"
    path.write_text('{"user_id": "a", "item_id": "x"}\n')
    with pytest.raises(MMLError, match="record 1: field 'ts' is missing"):
        load_events(str(path))
    with pytest.raises(MMLError, match="no such file"):
        load_events(str(tmp_path / "nope.jsonl"))
    exposures, events = simulate(np.random.default_rng(0), 10, {"control": 0.1, "mml": 0.1})
    with pytest.raises(MMLError, match="control: arm 'ctl'"):
        build_report(exposures, events, ARMS, ReportConfig(control="ctl"))
    with pytest.raises(ValueError, match="ks"):
        ReportConfig(ks=[0, 10])


def test_reads_the_services_redis_stream_and_histories():
    """Exposures written by the service's RedisStore into its stream, events through its history
    script, on the real Redis at 127.0.0.1:6379 under a prefix of this test (deleted afterwards)."""
    redis = pytest.importorskip("redis")
    from service.store import RedisStore

    url = "redis://127.0.0.1:6379/0"
    try:
        redis.Redis.from_url(url, socket_timeout=1).ping()
    except redis.RedisError:
        pytest.skip("no Redis on 127.0.0.1:6379")
    tag = uuid.uuid4().hex[:8]
    prefix = f"test-ab-report[x]-{tag}:"  # glob characters: the reader must take the prefix literally
    decoy = f"test-ab-reportx-{tag}:hist:intruder"  # what the unescaped pattern would also match
    store = RedisStore(url, prefix=prefix, socket_timeout=5)
    store.client.rpush(decoy, "1700000000\t1")
    exposures, events = simulate(np.random.default_rng(2), 200, {"control": 0.1, "mml": 0.3})
    try:
        records = []
        for i in range(len(exposures)):
            items = exposures.items[exposures.offsets[i] : exposures.offsets[i + 1]].tolist()
            records.append(
                {
                    "ts": round(float(exposures.ts[i]), 3),
                    "request_id": f"r{i}",
                    "user_id": str(exposures.user[i]),
                }
                | {"arm": str(exposures.arm[i]), "model_version": "v", "override": False, "items": items}
            )
        store.add_exposures(records)
        for u, item, ts in zip(events.user, events.item, events.ts, strict=True):
            store.add_event(str(u), str(item), int(ts))
        read_events = load_events(url, prefix)
        assert "intruder" not in set(read_events.user) and len(read_events.user) == len(events.user)
        from_redis = build_report(load_exposures(url, prefix), read_events, ARMS, ReportConfig())
        from_memory = build_report(
            exposures_from_records(records), events, ARMS, ReportConfig()
        )  # the same log, never serialised
        assert from_redis.exposures_read == len(exposures) > 0
        assert from_redis.model_dump() == from_memory.model_dump()
        assert from_redis.comparisons["mml"]["hit_rate@10"].p_value < 1e-4
    finally:
        keys = list(store.client.scan_iter(match=f"test-ab-report*-{tag}:*", count=1000))
        if keys:
            store.client.delete(*keys)
        store.close()


def test_traffic_replay_mode_steps_every_user_through_its_sequence_in_order():
    """The load test's generator in replay mode (loadtest/traffic.py): round p = every user's p-th item."""
    repo = str(Path(__file__).resolve().parents[1])
    if repo not in sys.path:  # loadtest/ is a folder of the repository, not an installed package
        sys.path.insert(0, repo)
    from loadtest.traffic import Sequence, Traffic

    sequences = [Sequence("7", ("a", "b", "c"), 2), Sequence("9", ("d", "e"), 1)]
    traffic = Traffic(
        sequences=sequences, new_items=[], catalogue=frozenset("abcde"), k=100, new_item_share=0
    )
    rounds = traffic.replay_rounds("t")
    assert rounds == [
        [("live-7-t", "a"), ("live-9-t", "d")],
        [("live-7-t", "b"), ("live-9-t", "e")],
        [("live-7-t", "c")],
    ]
    assert traffic.recall_stored("live-7-t") == {
        "user_id": "live-7-t",
        "k": 100,
    }  # no history: the stored one


def test_coverage_interval_holds_its_estimate_when_coverage_is_far_from_full():
    """Few users: a bootstrap replicate loses the items only its dropped users saw, so replicate
    coverage sits below the estimate; the interval must still be around the estimate."""
    exposures, events = simulate(
        np.random.default_rng(4), 12, {"control": 0.1, "mml": 0.1}, new_share={"control": 0.0, "mml": 0.5}
    )
    report = build_report(exposures, events, ARMS, ReportConfig(bootstrap=2000), CATALOGUE)
    coverage = report.comparisons["mml"]["coverage"]
    assert 0.2 < coverage.control < 0.8  # not saturated
    assert coverage.ci_low < coverage.diff < coverage.ci_high
    assert coverage.ci_high - coverage.diff == pytest.approx(coverage.diff - coverage.ci_low)
