"""The reliability scripts (reliability/, docs/reliability.md) in their short versions, each run as
`make` runs it (python -m reliability.X in a child process, real `mml serve`, real redis-server,
loopback only), with the figures written to a temporary results file and checked here:

* fuzz: schemathesis over the OpenAPI spec, a few hundred requests: no 5xx, every 4xx names the
  problem, admin operations without the token all refused;
* faults: Redis killed and restarted, hot reloads, corrupted bundles, Redis slower than its
  timeout, under load: no failed request, refused bundles leave the old one serving, recovery;
* soak: 2 workers for a few seconds at a steady rate: RSS and open fds within the stated bounds;
* audit: a bundle exported with canary secrets in the environment holds none of them.

Integration tests: they need the ML-1M test bundles (MML_DATA_MIRROR; skipped without it)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT_TIMEOUT_S = 300  # a hung script fails the test instead of hanging the suite


@pytest.fixture(scope="session")
def bundles(service_bundles) -> tuple[Path, Path]:
    return service_bundles


def run_script(module: str, out: Path, *args: str) -> tuple[int, dict, str]:
    proc = subprocess.run(
        [sys.executable, "-m", module, "--out", str(out), *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=SCRIPT_TIMEOUT_S,
    )
    results = json.loads(out.read_text()) if out.is_file() else {}
    return proc.returncode, results, proc.stdout[-3000:] + proc.stderr[-3000:]


def test_fuzz_short(bundles, tmp_path):
    code, results, output = run_script("reliability.fuzz", tmp_path / "r.json", "--examples", "8",
                                       "--bundle", str(bundles[0]))  # fmt: skip
    fuzz = results["fuzz"]
    assert fuzz["requests"] >= 300, output
    assert fuzz["server_errors"] == 0, fuzz["passes"]["main"]["schemathesis_failures"]
    assert fuzz["bad_4xx_bodies"] == 0, fuzz["passes"]["main"]["bad_4xx_examples"]
    assert fuzz["tracebacks_in_server_log"] == 0
    assert not fuzz["token_in_server_log"]
    # without the token, no admin operation got past auth
    assert not any(s.startswith("2") for s in fuzz["auth_pass_admin_statuses"]), fuzz[
        "auth_pass_admin_statuses"
    ]
    assert fuzz["passes"]["main"]["statuses"].get("201", 0) > 0  # the fuzzer did register items
    assert fuzz["ok"] and code == 0, output


def test_faults_quick(bundles, tmp_path):
    code, results, output = run_script("reliability.faults", tmp_path / "r.json", "--quick",
                                       "--bundles", *map(str, bundles))  # fmt: skip
    faults = results["faults"]
    phases = faults["phases"]
    assert faults["failed"] == 0, [p["failure_examples"] for p in phases.values()]
    kill = phases["redis_kill"]
    assert kill["recall_degraded"] > 0  # Redis really was down, and answers said so
    assert kill["recovered_after_restart_s"] is not None
    reloads = phases["hot_reloads"]
    assert reloads["reloads_ok"] == reloads["reloads"]
    corrupt = phases["corrupt_bundle"]
    assert corrupt["refused_409"] == len(corrupt["offers"]) == 4, corrupt["offers"]
    assert corrupt["served_before"] == corrupt["served_after"]
    assert corrupt["versions_answered"] == [corrupt["served_before"]]
    timeout = phases["redis_timeout"]
    assert timeout["recall_degraded"] > 0 and timeout["recovered_after_repair_s"] is not None
    assert faults["tracebacks_in_server_log"] == 0 and not faults["token_in_server_log"]
    assert faults["ok"] and code == 0, output


def test_soak_short(bundles, tmp_path):
    code, results, output = run_script("reliability.soak", tmp_path / "r.json", "--seconds", "12",
                                       "--rate", "30", "--sample-every", "1",
                                       "--bundle", str(bundles[0]))  # fmt: skip
    soak = results["soak"]
    assert soak["failed"] == 0 and soak["requests"] > 200, output
    assert len(soak["per_worker"]) == 2 and not soak["workers_restarted"]
    bounds = soak["bounds"]
    for worker in soak["per_worker"].values():
        assert len(worker["series"]) >= 10
        assert worker["rss_growth_mib"] <= bounds["rss_growth_max_mib"], worker
        assert worker["fds_max"] <= worker["fds_after_warmup"] + bounds["fd_growth_max"], worker
    assert soak["item_registrations"] > 0 and soak["item_registrations_failed"] == 0
    assert soak["tracebacks_in_server_log"] == 0 and not soak["token_in_server_log"]
    assert soak["ok"] and code == 0, output


def test_a_bundle_holds_no_secret_from_the_environment(tmp_path):
    code, results, output = run_script("reliability.audit", tmp_path / "r.json", "--skip-deps")
    scan = results["audit"]["bundle_secrets"]
    assert scan["files"] >= 10 and scan["bytes"] > 0, output  # the bundle was written and read
    assert scan["hits"] == [] and code == 0, output
