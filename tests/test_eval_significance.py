"""Paired significance tests on a known example."""

from __future__ import annotations

import math

import numpy as np
import pytest

from training.evaluation.significance import holm, paired_test


def test_paired_tests_on_a_hand_computed_example() -> None:
    # differences 1, 2, 3, 4: mean 2.5, sd sqrt(5/3) -> t = 2.5 / (sd / 2) = 3.873 with 3 d.f.
    a = np.array([1.0, 2.0, 3.0, 4.0])
    b = np.zeros(4)
    result = paired_test(a, b)
    assert result.t_statistic == pytest.approx(2.5 / (math.sqrt(5 / 3) / 2))
    # two-sided p of t = 3.873 with 3 d.f. (Student-t table: 0.0305)
    assert result.t_pvalue == pytest.approx(0.0305, abs=5e-4)
    # Wilcoxon: all 4 differences positive -> W- = 0; exact two-sided p = 2 / 2^4
    assert result.wilcoxon_statistic == 0.0
    assert result.wilcoxon_pvalue == pytest.approx(2 / 16)
    assert result.mean_diff == 2.5 and result.n_users == 4


def test_identical_methods_are_not_significant_and_direction_is_kept() -> None:
    values = np.array([0.0, 1.0, 0.5, 0.0])
    same = paired_test(values, values)
    assert same.t_pvalue == 1.0 and same.wilcoxon_pvalue == 1.0 and same.mean_diff == 0.0
    worse = paired_test(np.zeros(4), np.array([1.0, 2.0, 3.0, 4.0]))
    assert worse.t_statistic < 0 and worse.mean_diff == -2.5


def test_holm_adjustment_by_hand() -> None:
    # sorted p: 0.01 * 3 = 0.03, 0.03 * 2 = 0.06, 0.04 * 1 = 0.04 -> monotone: 0.03, 0.06, 0.06
    assert holm([0.01, 0.04, 0.03]) == pytest.approx([0.03, 0.06, 0.06])
    assert holm([0.5, 0.9]) == pytest.approx([1.0, 1.0])


def test_unpaired_inputs_are_refused() -> None:
    with pytest.raises(ValueError, match="equal length"):
        paired_test(np.zeros(3), np.zeros(4))
