"""The metric registry (spec.vocabulary.METRIC_REGISTRY) is the one place a stored metric's title,
direction and reference are stated; the report, the criteria board and the explorer read it."""

from __future__ import annotations

from fcr_eval.metrics.extractors import metric_name
from fcr_eval.report.board import PER_SAMPLE_ALIGNMENT
from fcr_eval.report.report import PAIRED_COLUMNS
from fcr_eval.spec.vocabulary import METRIC_REGISTRY, SAMPLE_METRICS, metric_spec
from fcr_results_explorer.queries import lower_is_better
from fcr_results_explorer.ui import metric_label


def test_every_stored_metric_has_a_row_and_the_readers_follow_it():
    stored = [metric_name(k, e) for k in ("fd", "kid") for e in ("efficientnet_lite0", "inception")]
    stored += ["precision", "recall", "class_agreement", "clip_score", "clip_drift", "inception_score",
               "finetune_compute_fraction", "sec_per_image", *SAMPLE_METRICS]
    for name in stored:
        spec = metric_spec(name)
        assert spec is not None, name
        assert lower_is_better(name) is (not spec.higher_is_better), name  # the explorer's direction
        assert metric_label(name).startswith(spec.label), name  # the explorer's label
    assert metric_spec("fd_dinov2").direction == "lower" and metric_spec("fd_dinov2").needs_reference
    assert metric_spec("no_such_metric") is None
    assert [t for _, t in PAIRED_COLUMNS] == [m.title for m in SAMPLE_METRICS.values()]  # the report's titles
    assert PER_SAMPLE_ALIGNMENT == {"class_agreement": "class_correct", "clip_score": "clip_score"}  # the board's
    assert all(METRIC_REGISTRY[form].per_sample for form in PER_SAMPLE_ALIGNMENT.values())
