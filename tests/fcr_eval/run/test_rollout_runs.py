"""The rollout objective from an experiment file to the store: ``lambda_rollout`` in a variation
plans a fine-tune of its own (its key, its config, its cost), the runner trains it with the term
(the trainer's record and log say so), and the run's row keeps every rollout option; what the file
may not say is refused before anything runs, naming the line; the run ids of files without the
term are unchanged (tests/fcr_eval/plan checks every committed file)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from fcr_eval.plan.planner import make_plan
from fcr_eval.spec.experiment import ExperimentFileError, load_experiment

from .test_output_consistency_runs import _run_tiny, _tiny_with

ROLLOUT_VARIATIONS = """
[[variations]]
id = "ft-0.00-fd-2"
sampler = "fd"
stride = 2
lambda_fcr = 0.0

[[variations]]
id = "ro-dc-2"
sampler = "deepcache"
stride = 2
lambda_rollout = 0.5
rollout_cache = "deepcache"
rollout_k = 2
rollout_rows = 2
distance = "relative_mse"

[[variations]]
id = "ro-none"
sampler = "none"
lambda_rollout = 0.5
rollout_cache = "deepcache"
rollout_k = 2
rollout_rows = 2
distance = "relative_mse"
"""


def test_lambda_rollout_plans_its_own_finetune_with_the_term(tmp_path):
    exp = load_experiment(_tiny_with(tmp_path, ROLLOUT_VARIATIONS, seeds="[0, 1]"))
    plan = make_plan(exp, results_dir=tmp_path / "results", calibrate=False)
    by_var = {(r.variation.id, r.seed): r for r in plan.runs}
    ro, control = by_var["ro-dc-2", 0].finetune, by_var["ft-0.00-fd-2", 0].finetune
    assert by_var["ro-none", 0].finetune is ro and ro.key != control.key
    assert ro.key.startswith("ft-ro0.50-k2-deepcache-x0-relative_mse-s0-")
    assert ro.objective == "rollout" and ro.lambda_fcr == 0.0 and ro.oc_config() is None
    cfg = ro.rollout_config()
    # the file's options, the defaults of fcr_train.vocabulary.ROLLOUT_DEFAULTS, the variation's step count
    assert (cfg.lam, cfg.k, cfg.cache, cfg.target, cfg.rollout_rows, cfg.noise_power, cfg.trainable,
            cfg.guidance_scale, cfg.sampler_steps, cfg.distance) == \
        (0.5, 2, "deepcache", "x0", 2, 2.0, "recomputed", 1.0, exp.sampling.num_inference_steps, "relative_mse")
    assert control.rollout_config() is None and ro.fcr_config().lam == 0.0
    assert ro.config()["rollout"]["k"] == 2 and "rollout" not in control.config()
    assert by_var["ro-dc-2", 0].config["finetune"]["rollout"]["cache"] == "deepcache"
    # its segments are planned: more compute than the plain fine-tune of the same size
    assert ro.est_flops > control.est_flops
    # an option that defines the weights gives other weights
    other = load_experiment(_tiny_with(tmp_path, ROLLOUT_VARIATIONS.replace("rollout_k = 2", "rollout_k = 1")))
    assert make_plan(other, results_dir=tmp_path / "results", calibrate=False).runs[1].finetune.key != ro.key


@pytest.mark.slow  # a whole (tiny) experiment: two fine-tunes and three runs, ~20 s on a quiet machine
def test_a_rollout_finetune_runs_and_is_stored(tmp_path):
    """Slow (over a minute under load): a whole tiny experiment — a rollout and a plain fine-tune, three
    runs with their evaluation — through the runner."""
    exp, ro, runs, flops = _run_tiny(tmp_path, ROLLOUT_VARIATIONS, "ro-dc-2")
    record = json.loads((Path(ro.output_dir) / "config.json").read_text())["train"]
    assert record["rollout"] == ro.rollout_config().to_dict() and record["fcr"]["lam"] == 0.0
    logs = [json.loads(x) for x in (Path(ro.output_dir) / "metrics.jsonl").read_text().splitlines()]
    assert len(logs) == exp.finetune.steps and all(x["l_rollout"] > 0 and "rollout_to_denoise" in x for x in logs)
    row = runs["ro-dc-2"]
    params = json.loads(row["params"]) if isinstance(row["params"], str) else row["params"]
    assert row["lambda_fcr"] is None and row["lambda_oc"] is None and row["blocks"] is None
    assert (params["lambda_rollout"], params["rollout_cache"], params["rollout_k"]) == (0.5, "deepcache", 2)
    assert flops["ro-dc-2"] == pytest.approx(flops["ft-0.00-fd-2"] * (1 + ro.extra_forward_share()))


@pytest.mark.parametrize(("extra", "message"), [
    ("lambda_rollout = 0.5\nlambda_fcr = 0.1\n", "sets both lambda_fcr and lambda_rollout"),
    ("lambda_rollout = 0.5\nlambda_oc = 0.1\n", "sets both lambda_oc and lambda_rollout"),
    ("lambda_rollout = 0.0\n", "lambda_rollout = 0.0 must be > 0"),
    ("lambda_rollout = 0.5\nblocks = \"early\"\n", "blocks chooses FCR's encoder blocks"),
    ("lambda_rollout = 0.5\nrollout_cache = \"tome\"\n", "rollout_cache"),
    ("lambda_rollout = 0.5\nrollout_target = \"eps\"\n", "rollout_target"),
    ("lambda_rollout = 0.5\nrollout_trainable = \"encoder\"\n", "rollout_trainable"),
    ("lambda_rollout = 0.5\nrollout_k = 4\n", r"rollout_k = 4 stale steps must be an integer in \[0, 3\]"),
    ("lambda_rollout = 0.5\nrollout_noise_power = -1.0\n", "rollout_noise_power"),
    ("lambda_rollout = 0.5\nrollout_rows = 0\n", "rollout_rows"),
    ("lambda_rollout = 0.5\nrollout_guidance_scale = 0.0\n", "rollout_guidance_scale"),
    ("rollout_k = 2\n", "sets no lambda_rollout"),
])
def test_what_a_rollout_variation_may_not_say(tmp_path, extra, message):
    path = _tiny_with(tmp_path, f'\n[[variations]]\nid = "v"\nsampler = "fd"\nstride = 2\n{extra}')
    with pytest.raises(ExperimentFileError, match=message) as err:
        load_experiment(path)
    assert f"{path.name}:" in str(err.value)  # the message names the file and line
