"""The attribution plots: one PNG per attributed variation (none for the others), and the
summaries they draw from (step × feature matrix, ratio-of-means gain, propagation shares)."""

from __future__ import annotations

import math

import numpy as np
import polars as pl
import pytest
from fcr_eval.analysis.attribution import (
    attribution_matrix,
    compounding,
    feature_summary,
    step_summary,
)
from fcr_eval.report.attribution import plot_cache_attribution


def _rows(run: str, scale: float) -> list[dict]:
    rows = []
    for step in (1, 2, 3):
        rows += [{"run": run, "step": step, "feature": "all", "quantity": q, "value": v}
                 for q, v in (("eps_error", scale * step), ("relative_change", 0.5), ("final_error", 0.01 * step))]
        for f, k in (("conv_in", 1.0), ("mid_block", 3.0)):
            rows += [{"run": run, "step": step, "feature": f, "quantity": "only_stale_error", "value": scale * k * step},
                     {"run": run, "step": step, "feature": f, "quantity": "only_fresh_error", "value": 0.0},
                     {"run": run, "step": step, "feature": f, "quantity": "relative_change", "value": 0.1 * k}]
    return rows


FRAME = pl.DataFrame(_rows("a", 1.0) + _rows("b", 3.0))


def test_the_matrix_is_the_mean_over_runs_in_forward_order():
    steps, features, m = attribution_matrix(FRAME, "only_stale_error")
    assert steps == [1, 2, 3] and features == ["conv_in", "mid_block"]
    np.testing.assert_allclose(m, [[2.0 * k * s for k in (1.0, 3.0)] for s in (1, 2, 3)])


def test_gain_is_a_ratio_of_means_and_shares_sum_to_one_per_run():
    f = feature_summary(FRAME).filter(pl.col("run") == "a").sort("feature")
    # conv_in: mean error 2.0 / mean change 0.1; mid_block: 6.0 / 0.3
    assert f["gain"].to_list() == pytest.approx([20.0, 20.0])
    assert f["share"].to_list() == pytest.approx([0.25, 0.75])
    s = step_summary(FRAME).filter(pl.col("run") == "a")
    assert s["final_share"].to_list() == pytest.approx([1 / 6, 2 / 6, 3 / 6])


def test_compounding_compares_the_full_error_with_both_sums():
    c = compounding(0.06, sum(math.sqrt(0.01 * s) for s in (1, 2, 3)), 0.12)
    assert c["vs_independent"] == pytest.approx(2.0)
    assert c["vs_aligned"] == pytest.approx(0.12 / sum(math.sqrt(0.01 * s) for s in (1, 2, 3)) ** 2)
    with pytest.raises(ValueError, match="propagation"):
        compounding(0.0, 0.0, 0.1)


def test_the_plot_writes_a_png_and_refuses_an_empty_frame(tmp_path):
    out = plot_cache_attribution(FRAME, tmp_path / "sub" / "attr.png", "FD-2 test")
    assert out.is_file() and out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 10_000
    with pytest.raises(ValueError, match="no attribution rows"):
        plot_cache_attribution(FRAME.clear(), tmp_path / "empty.png", "empty")
    assert not (tmp_path / "empty.png").exists()
