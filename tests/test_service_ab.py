"""A/B arms: config validation, deterministic assignment close to the weights, the SRM check."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import numpy as np
import pytest
from scipy import stats

from mml.errors import MMLError
from service.ab import (
    DEFAULT_ARMS,
    ArmsConfig,
    Assigner,
    ExposureLog,
    chi2_sf,
    count_users,
    exposure_record,
    load_arms,
    read_exposures,
    srm_check,
)

CONFIG = """
salt: exp-42
arms:
  - name: control
    kind: popularity
    weight: 0.2
  - name: mml
    weight: 0.8
    bundle: bundles/v1
"""


def test_load_arms_yaml_resolves_bundle_relative_to_the_file(tmp_path):
    path = tmp_path / "arms.yaml"
    path.write_text(CONFIG)
    config = load_arms(path)
    assert [a.name for a in config.arms] == ["control", "mml"]
    assert config.arms[0].kind == "popularity" and config.arms[0].bundle is None
    assert config.arms[1].bundle == tmp_path / "bundles" / "v1"
    assert load_arms(None) == DEFAULT_ARMS


@pytest.mark.parametrize(
    ("text", "field"),
    [
        ('{"arms": [{"name": "a", "weight": -1}]}', "arms.0.weight"),
        ('{"arms": [{"name": "a"}, {"name": "a"}]}', "(root)"),
        ('{"arms": [{"name": "bad name!"}]}', "arms.0.name"),
        ('{"arms": [{"name": "a", "kind": "random"}]}', "arms.0.kind"),
        ('{"arms": [{"name": "a", "wieght": 1}]}', "arms.0.wieght"),
        ('{"arms": [{"name": "a", "weight": 0}]}', "(root)"),
        ('{"arms": []}', "arms"),
    ],
)
def test_bad_arms_config_names_the_field(tmp_path, text, field):
    path = tmp_path / "arms.json"
    path.write_text(text)
    with pytest.raises(MMLError, match=re.escape(f"field '{field}'")):
        load_arms(path)


def test_unparseable_arms_config_is_one_clear_error(tmp_path):
    path = tmp_path / "arms.yaml"
    path.write_text("arms: [unclosed")
    with pytest.raises(MMLError, match="not valid"):
        load_arms(path)


def test_assignment_is_stable_across_processes_and_close_to_weights():
    config = ArmsConfig.model_validate(
        {
            "salt": "s1",
            "arms": [{"name": "a", "weight": 1}, {"name": "b", "weight": 3}, {"name": "qa", "weight": 0}],
        }
    )
    assigner = Assigner(config)
    users = [f"user-{i}" for i in range(20_000)]
    arms = [assigner.assign(u) for u in users]
    counts = {name: arms.count(name) for name in ("a", "b", "qa")}
    assert counts["qa"] == 0  # weight 0: reachable only through the override header
    # 20,000 users at 25/75: the share is within 4 standard deviations (sd = 0.003)
    assert abs(counts["a"] / len(users) - 0.25) < 0.012
    # a fresh interpreter (another replica, a restart) assigns the same arms
    code = (
        "from service.ab import ArmsConfig, Assigner\n"
        f"c = ArmsConfig.model_validate({config.model_dump(mode='json')!r})\n"
        "a = Assigner(c)\n"
        "print(','.join(a.assign(f'user-{i}') for i in range(500)))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip().split(",") == arms[:500]
    # a new salt reshuffles users
    other = Assigner(config.model_copy(update={"salt": "s2"}))
    moved = sum(other.assign(u) != a for u, a in zip(users[:2000], arms[:2000], strict=True))
    assert moved > 300


def test_chi2_survival_function_matches_scipy():
    for df in (1, 2, 3, 7, 30):
        for x in (1e-4, 0.3, 1.0, 2.5, 8.0, 25.0, 120.0):
            assert chi2_sf(x, df) == pytest.approx(stats.chi2.sf(x, df), rel=1e-9, abs=1e-300)


def test_srm_check_flags_a_broken_split_and_passes_a_fair_one():
    rng = np.random.default_rng(0)
    weights = {"control": 0.5, "mml": 0.5}
    fair = rng.binomial(10_000, 0.5)
    ok = srm_check({"control": fair, "mml": 10_000 - fair}, weights)
    assert ok.p_value == pytest.approx(stats.chisquare([fair, 10_000 - fair]).pvalue, rel=1e-9)
    broken = srm_check({"control": 5200, "mml": 4800}, weights)
    assert broken.mismatch and not ok.mismatch
    assert broken.p_value == pytest.approx(stats.chisquare([5200, 4800]).pvalue, rel=1e-9)


def test_srm_from_exposure_log_counts_users_once_and_skips_overrides(tmp_path):
    log_path = tmp_path / "exposures.jsonl"
    log = ExposureLog(log_path)
    assigner = Assigner(ArmsConfig.model_validate({"salt": "x", "arms": [{"name": "a"}, {"name": "b"}]}))
    for i in range(3000):
        user = f"u{i}"
        for _ in range(2):  # repeated requests of one user count once
            log.write(exposure_record(f"r{i}", user, assigner.assign(user), "v1", override=False))
    for i in range(500):  # QA traffic forced into arm a: must not count
        log.write(exposure_record(f"qa{i}", f"qa{i}", "a", "v1", override=True))
    log.close()
    counts = count_users(read_exposures(str(log_path)))
    assert sum(counts.values()) == 3000
    result = srm_check(counts, {"a": 1, "b": 1})
    assert not result.mismatch

    arms = tmp_path / "arms.json"
    arms.write_text(
        json.dumps({"salt": "x", "arms": [{"name": "a", "weight": 1}, {"name": "b", "weight": 1}]})
    )
    ok = subprocess.run(
        [sys.executable, "-m", "mml.cli", "ab", "srm", "--exposures", str(log_path), "--arms", str(arms)],
        capture_output=True,
        text=True,
    )
    assert ok.returncode == 0, ok.stderr
    assert "no sample ratio mismatch" in ok.stdout
    arms.write_text(
        json.dumps({"salt": "x", "arms": [{"name": "a", "weight": 1}, {"name": "b", "weight": 2}]})
    )
    bad = subprocess.run(
        [sys.executable, "-m", "mml.cli", "ab", "srm", "--exposures", str(log_path), "--arms", str(arms)],
        capture_output=True,
        text=True,
    )
    assert bad.returncode == 1 and "SRM detected" in bad.stderr
