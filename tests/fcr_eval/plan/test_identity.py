"""Run identity (``fcr_eval.plan.identity``): every field of a run's spec tables has a decision,
and every committed experiment file's run ids and fine-tune keys (all profiles) are pinned.

A change to what enters a run id or a fine-tune key fails here until it is decided: write the
decision in ``fcr_eval.plan.identity.DECISIONS`` and, when committed ids change, regenerate the
pinned ids in the same commit, naming the files whose ids moved and why:

    uv run --no-sync python tests/fcr_eval/plan/test_identity.py --update
"""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

import pytest
from fcr_eval.plan.identity import DECISIONS, run_config, undecided_fields
from fcr_eval.plan.planner import make_plan
from fcr_eval.records import make_run_id
from fcr_eval.spec.experiment import (
    EarlyStoppingSpec,
    EvaluationSpec,
    FinetuneSpec,
    ModelSpec,
    RobustnessSpec,
    SamplingSpec,
    VariationSpec,
    load_experiment,
)

ROOT = Path(__file__).resolve().parents[3]
GOLDEN = Path(__file__).with_name("golden") / "run_ids.json"
SPECS = (VariationSpec, FinetuneSpec, EarlyStoppingSpec, SamplingSpec, EvaluationSpec, ModelSpec, RobustnessSpec)


def identities() -> dict:
    """file → form (profile, or "(as written)") → run ids and fine-tune keys per variation/seed."""
    out = {}
    for path in sorted((ROOT / "experiments").glob("*.toml")):
        forms = {}
        for profile in (None, *load_experiment(path).profiles):
            plan = make_plan(load_experiment(path, profile), results_dir="results", calibrate=False,
                             gflops_per_s=60.0)
            forms[profile or "(as written)"] = {
                "run_ids": {f"{r.variation.id}/s{r.seed}": r.run_id for r in plan.runs},
                "finetune_keys": {f"{r.variation.id}/s{r.seed}": r.finetune.key for r in plan.runs if r.finetune},
            }
        out[path.name] = forms
    return out


@pytest.fixture(scope="module")
def current():
    return identities()


@pytest.mark.parametrize("spec", SPECS, ids=lambda c: c.__name__)
def test_every_field_of_a_run_has_an_identity_decision(spec):
    assert undecided_fields(spec) == [], (
        f"{spec.__name__} fields without a decision in fcr_eval.plan.identity.DECISIONS (or decisions for "
        f"fields it no longer has): {undecided_fields(spec)}; decide whether each enters the run id / fine-tune key")


def test_a_variation_field_added_without_a_decision_is_caught_and_would_move_every_run_id(current):
    """A new variation field: the decision check names it, and (recorded like any other field) it
    changes the run ids of every committed file — which the pinned ids below would report."""
    new = dataclasses.make_dataclass("VariationSpec", [("warp_factor", float | None, dataclasses.field(default=None))],
                                     bases=(VariationSpec,), frozen=True)
    assert undecided_fields(new) == ["warp_factor"]
    exp = load_experiment(ROOT / "experiments" / "mini-exp-1.toml", "quick")
    plan = make_plan(exp, calibrate=False, gflops_per_s=60.0)
    run = plan.runs[0]
    assert make_run_id(exp.id, run.variation.id, run.seed, run.config) == run.run_id
    grown = new(**dataclasses.asdict(run.variation))
    config = run_config(exp.id, grown, run.seed, model=run.config["model"], sampling=run.config["sampling"],
                        robustness=run.config["robustness"], evaluation=exp.evaluation, finetune=run.finetune)
    assert make_run_id(exp.id, run.variation.id, run.seed, config) != current["mini-exp-1.toml"]["quick"]["run_ids"][
        f"{run.variation.id}/s{run.seed}"]


def test_committed_run_ids_and_finetune_keys_are_pinned(current):
    pinned = json.loads(GOLDEN.read_text())
    moved = []
    for name in sorted(set(pinned) | set(current)):
        for form in sorted(set(pinned.get(name, {})) | set(current.get(name, {}))):
            a, b = pinned.get(name, {}).get(form), current.get(name, {}).get(form)
            if a != b:
                changed = sorted(k for k in set((a or {}).get("run_ids", {})) | set((b or {}).get("run_ids", {}))
                                 if (a or {}).get("run_ids", {}).get(k) != (b or {}).get("run_ids", {}).get(k))
                moved.append(f"{name} [{form}]: {len(changed)} run id(s) moved, e.g. {changed[:3]}")
    assert not moved, ("run identity changed — decide it in fcr_eval.plan.identity and regenerate "
                       f"{GOLDEN.relative_to(ROOT)} (see this module's docstring):\n" + "\n".join(moved))


def _keys(exp) -> set[str]:
    return {r.finetune.key for r in make_plan(exp, calibrate=False, gflops_per_s=60.0).runs if r.finetune}


@pytest.mark.parametrize(("field", "value", "moves"), [
    ("early_stopping", EarlyStoppingSpec(every=5, mini_val_size=32, patience=2), True),
    ("cond_dropout", 0.2, True),
    ("checkpoint_every", 7, False),
])
def test_trainer_settings_enter_the_finetune_key_as_decided(field, value, moves):
    """Early stopping and the null-text dropout change the weights, so two settings that differ in
    them get two fine-tunes (and both are in the runs' stored config); how often the trainer saves
    does not (resuming is exact), so the fine-tune is shared."""
    exp = load_experiment(ROOT / "experiments" / "mini-exp-1.toml", "quick")
    other = dataclasses.replace(exp, finetune=dataclasses.replace(exp.finetune, **{field: value}))
    assert (_keys(other) != _keys(exp)) is moves
    assert DECISIONS["FinetuneSpec"][field][1]  # the reason is written down
    configs = [r.config["finetune"] for r in make_plan(other, calibrate=False, gflops_per_s=60.0).runs if r.finetune]
    assert all((field in c) is moves for c in configs)


if __name__ == "__main__":
    if sys.argv[1:] != ["--update"]:
        raise SystemExit(__doc__)
    GOLDEN.parent.mkdir(exist_ok=True)
    GOLDEN.write_text(json.dumps(identities(), indent=1, sort_keys=True) + "\n")
    print(f"wrote {GOLDEN}")
