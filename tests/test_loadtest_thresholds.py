"""Pass/fail rules of the load test (loadtest/thresholds.py): a breach fails the run, a run within
the limits passes; and the report renders the verdict and the measured figures."""

from __future__ import annotations

import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # loadtest/ is a folder of the repository, not an installed package
    sys.path.insert(0, str(REPO))

from loadtest.thresholds import EndpointStats, RunFacts, Thresholds, breaches  # noqa: E402

LIMITS = Thresholds(recall_p99_ms=50.0, max_failure_ratio=0.01, min_requests=100)


def _facts(**changes) -> RunFacts:
    base = {
        "endpoints": [
            EndpointStats("POST", "/recall [history]", 600, 0, 30.0),
            EndpointStats("POST", "/recall [stored]", 100, 0, 40.0),
            EndpointStats("POST", "/events", 300, 0, 20.0),
            EndpointStats("PUT", "/items/[id]", 5, 0, 2100.0),  # slow, but not a /recall endpoint
        ],
        "arm_weights": {"control": 0.5, "mml": 0.5},
        "arm_counts": {"control": 350, "mml": 350},
        "new_items_expected": 5,
        "new_items_registered": 5,
    }
    return RunFacts(**{**base, **changes})


def test_a_run_within_the_limits_passes():
    assert breaches(_facts(), LIMITS) == []


def test_p99_at_the_limit_passes_and_above_it_fails_naming_the_endpoint():
    at_limit = _facts().endpoints.copy()
    at_limit[1] = EndpointStats("POST", "/recall [stored]", 100, 0, 50.0)
    assert breaches(_facts(endpoints=at_limit), LIMITS) == []
    above = _facts().endpoints.copy()
    above[1] = EndpointStats("POST", "/recall [stored]", 100, 0, 50.5)
    (line,) = breaches(_facts(endpoints=above), LIMITS)
    assert "/recall [stored]" in line and "50.5" in line


def test_failure_ratio_above_the_limit_fails():
    endpoints = _facts().endpoints.copy()
    endpoints[2] = EndpointStats("POST", "/events", 300, 10, 20.0)  # 10 of 1005 = 0.995 %
    assert breaches(_facts(endpoints=endpoints), LIMITS) == []
    endpoints[2] = EndpointStats("POST", "/events", 300, 11, 20.0)  # 11 of 1005 = 1.09 %
    (line,) = breaches(_facts(endpoints=endpoints), LIMITS)
    assert "failure ratio" in line and "11/1005" in line


def test_too_few_requests_and_no_recall_fail():
    only_events = [EndpointStats("POST", "/events", 50, 0, 5.0)]
    lines = breaches(_facts(endpoints=only_events), LIMITS)
    assert any("min_requests" in line for line in lines)
    assert any("no /recall" in line for line in lines)
    assert breaches(_facts(endpoints=[]), LIMITS) == [
        "only 0 requests were made, fewer than min_requests = 100"
    ]


def test_an_unregistered_new_item_or_a_silent_arm_fails():
    (line,) = breaches(_facts(new_items_registered=4), LIMITS)
    assert "registered 4 of 5" in line
    (line,) = breaches(_facts(arm_counts={"mml": 700}), LIMITS)
    assert "arm control" in line
    # a weight-0 arm (reachable by override only) may stay silent
    assert breaches(_facts(arm_weights={"control": 0.5, "mml": 0.5, "qa": 0.0}), LIMITS) == []


def test_the_report_states_the_verdict_and_the_figures(tmp_path):
    from loadtest.run import LoadTestConfig, render_report

    endpoint = {"method": "POST", "name": "/recall [history]", "requests": 600, "failures": 0}
    endpoint |= {"p50_ms": 12.0, "p95_ms": 30.0, "p99_ms": 48.0, "max_ms": 61.0, "rps": 10.0}
    summary = {
        "arms": {"control": "popularity", "mml": "mml"},
        "arm_weights": {"control": 0.5, "mml": 0.5},
        "arm_counts": {"control": 290, "mml": 310},
        "registered_items": ["loadtest-51"],
        "server_timing": {
            "/recall [history]": {"requests": 600, "p50_ms": 1.5, "p95_ms": 3.0, "p99_ms": 7.25}
        },
        "endpoints": [endpoint],
        "total": {**endpoint, "method": "", "name": "Aggregated"},
    }
    facts = {
        "model_version": "v-test",
        "n_items": 3883,
        "store": "redis",
        "load_average_before": 1.0,
        "ready_seconds": 12.0,
        "rss_ready_bytes": 300 * 2**20,
        "rss_after_bytes": 320 * 2**20,
        "server_cpu_seconds": 6.0,
        "metrics": {"redis errors": 0.0},
        "srm": {"users": {"control": 280, "mml": 300}, "chi2": 0.69, "p_value": 0.41, "mismatch": False},
    }
    config = LoadTestConfig(out=tmp_path)
    passed = render_report(config, summary, facts, [])
    assert "**Verdict: passed.**" in passed
    assert "| POST | /recall [history] | 600 | 0 | 10.0 | 12 | 30 | 48 | 61 |" in passed
    assert "| /recall [history] | 600 | 1.50 | 3.00 | 7.25 |" in passed
    assert "| control | 290 | 280 |" in passed and "p = 0.41" in passed
    failed = render_report(
        config, summary, facts, ["POST /recall [history]: p99 80.0 ms > recall_p99_ms = 50.0"]
    )
    assert "**Verdict: FAILED.**" in failed and "- breach: POST /recall [history]: p99 80.0 ms" in failed
