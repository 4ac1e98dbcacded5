"""The output-consistency objective from an experiment file to the store: ``lambda_oc`` in a
variation plans a fine-tune of its own (its key, its config, its cost), the runner trains it with
the term (the trainer's record and log say so), and the run's row carries ``lambda_oc`` with no
FCR weight; what the file may not say is refused before anything runs; the run ids of files
without the term are unchanged (tests/fcr_eval/plan checks every committed file)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from fcr_eval.cli import main
from fcr_eval.plan.planner import make_plan
from fcr_eval.spec.experiment import ExperimentFileError, load_experiment
from fcr_eval.store import ResultsStore

TINY = Path(__file__).parents[1] / "experiments" / "tiny.toml"
ROOT = Path(__file__).parents[3]

OC_VARIATIONS = """
[[variations]]
id = "ft-0.00-fd-2"
sampler = "fd"
stride = 2
lambda_fcr = 0.0

[[variations]]
id = "oc-fd-2"
sampler = "fd"
stride = 2
lambda_oc = 0.5
delta_unit = "sampler_steps"
delta_max = 2
distance = "relative_mse"

[[variations]]
id = "oc-none"
sampler = "none"
lambda_oc = 0.5
delta_unit = "sampler_steps"
delta_max = 2
distance = "relative_mse"
"""


def _tiny_with(tmp_path: Path, variations: str, seeds: str = "[0]") -> Path:
    """tiny.toml with its variations, criteria and contrasts replaced by ``variations``."""
    text = TINY.read_text()
    head = text[:text.index("[[variations]]")].replace("seeds = [0, 1]", f"seeds = {seeds}")
    head = head.replace("timing_rounds = 3", "timing_rounds = 0")
    path = tmp_path / "oc.toml"
    path.write_text(head + variations)
    return path


def test_lambda_oc_plans_its_own_finetune_with_the_term(tmp_path):
    exp = load_experiment(_tiny_with(tmp_path, OC_VARIATIONS, seeds="[0, 1]"))
    plan = make_plan(exp, results_dir=tmp_path / "results", calibrate=False)
    by_var = {(r.variation.id, r.seed): r for r in plan.runs}
    oc, control = by_var["oc-fd-2", 0].finetune, by_var["ft-0.00-fd-2", 0].finetune
    # the cached and uncached OC runs of a seed sample the same fine-tune; the control is another
    assert by_var["oc-none", 0].finetune is oc and oc.key != control.key
    assert oc.key.startswith("ft-oc0.50-d2-ss-relative_mse-fd-s0-")
    assert oc.objective == "output_consistency" and oc.lambda_fcr == 0.0
    cfg = oc.oc_config()
    assert (cfg.lam, cfg.delta_max, cfg.delta_unit, cfg.sampler_steps, cfg.distance, cfg.cache, cfg.trainable) == \
        (0.5, 2, "sampler_steps", 4, "relative_mse", "fd", "recomputed")
    assert control.oc_config() is None and control.fcr_config().lam == 0.0
    # the term is part of what defines the weights (hashed into the key and the run ids)
    assert oc.config()["lambda_oc"] == 0.5 and "lambda_oc" not in control.config()
    assert by_var["oc-fd-2", 0].config["finetune"]["lambda_oc"] == 0.5
    # its stale pass is planned: more compute than the plain fine-tune of the same size
    assert oc.est_flops > control.est_flops
    # per_seed = false in tiny.toml: one fine-tune serves both seeds, and the plan says so
    assert by_var["oc-fd-2", 1].finetune is oc


def _run_tiny(tmp_path: Path, variations: str, variation_id: str):
    """Run tiny.toml with ``variations``; the experiment, ``variation_id``'s planned fine-tune, the
    stored runs by variation and each run's stored fine-tune FLOPs."""
    path = _tiny_with(tmp_path, variations)
    store_path = tmp_path / "results" / "fcr.duckdb"
    assert main(["run", str(path), "--store", str(store_path), "--no-plots"]) == 0
    exp = load_experiment(path)
    plan = make_plan(exp, results_dir=store_path.parent, calibrate=False)
    ft = next(r.finetune for r in plan.runs if r.variation.id == variation_id)
    s = ResultsStore.open_readonly(store_path)
    runs = {r["variation_id"]: r for r in s.runs(experiment_id=exp.id).iter_rows(named=True)}
    m = s.sql("SELECT r.variation_id, m.details FROM metrics m JOIN runs r USING (run_id) "
              "WHERE m.metric = 'finetune_compute_fraction'")
    flops = {v: json.loads(d)["finetune_flops"] for v, d in m.iter_rows()}
    return exp, ft, runs, flops


@pytest.mark.slow  # a whole (tiny) experiment: two fine-tunes and three runs, ~15 s
def test_an_output_consistency_finetune_runs_and_is_stored(tmp_path):
    exp, oc, runs, flops = _run_tiny(tmp_path, OC_VARIATIONS, "oc-fd-2")
    # the trainer ran with the term: its record holds the config, its log the term's share
    record = json.loads((Path(oc.output_dir) / "config.json").read_text())["train"]
    assert record["output_consistency"]["lam"] == 0.5 and record["output_consistency"]["cache"] == "fd"
    assert record["fcr"]["lam"] == 0.0
    logs = [json.loads(x) for x in (Path(oc.output_dir) / "metrics.jsonl").read_text().splitlines()]
    assert len(logs) == exp.finetune.steps and all(x["l_oc"] >= 0 and "oc_to_denoise" in x for x in logs)

    assert runs["oc-fd-2"]["lambda_oc"] == 0.5 and runs["oc-fd-2"]["lambda_fcr"] is None
    assert runs["oc-fd-2"]["blocks"] is None and runs["oc-fd-2"]["delta_max"] == 2
    assert runs["ft-0.00-fd-2"]["lambda_oc"] is None and runs["ft-0.00-fd-2"]["lambda_fcr"] == 0.0
    # the stored fine-tune compute counts the stale pass (one extra forward per image here)
    assert flops["oc-fd-2"] == pytest.approx(2 * flops["ft-0.00-fd-2"])


@pytest.mark.parametrize(("extra", "message"), [
    ("lambda_oc = 0.5\nlambda_fcr = 0.1\n", "sets both lambda_fcr and lambda_oc"),
    ("lambda_oc = 0.0\n", "lambda_oc = 0.0 must be > 0"),
    ("lambda_oc = 0.5\nblocks = \"early\"\n", "blocks chooses FCR's encoder blocks"),
    ("lambda_oc = 0.5\noc_cache = \"tome\"\n", "oc_cache"),
    ("lambda_oc = 0.5\noc_trainable = \"encoder\"\n", "oc_trainable"),
    ("oc_cache = \"fd\"\n", "sets no lambda_oc"),
])
def test_what_an_output_consistency_variation_may_not_say(tmp_path, extra, message):
    path = _tiny_with(tmp_path, f'\n[[variations]]\nid = "v"\nsampler = "fd"\nstride = 2\n{extra}')
    with pytest.raises(ExperimentFileError, match=message):
        load_experiment(path)


def test_attribution_variations_must_name_variations_of_the_file(tmp_path):
    path = _tiny_with(tmp_path, OC_VARIATIONS)
    text = path.read_text().replace('"finetune_compute"]', '"finetune_compute", "cache_attribution"]\n'
                                    'attribution_variations = ["oc-fd-3"]')
    path.write_text(text)
    with pytest.raises(ExperimentFileError, match="oc-fd-3"):
        load_experiment(path)
    path.write_text(text.replace('["oc-fd-3"]', '["oc-fd-2"]'))
    plan = make_plan(load_experiment(path), results_dir=tmp_path / "results", calibrate=False)
    attributed = {r.variation.id for r in plan.runs if r.attribution_samples}
    assert attributed == {"oc-fd-2"}  # ft-0.00-fd-2 is cached too, but not named


def test_the_committed_output_consistency_experiment_plans():
    exp = load_experiment(ROOT / "experiments" / "mini-exp-1-oc.toml")
    plan = make_plan(exp, results_dir="results", calibrate=False)
    objectives = {f.objective for f in plan.finetunes.values()}
    assert objectives == {"fcr", "output_consistency"}
    # one fine-tune per seed and arm: control, FCR and output consistency
    assert len(plan.finetunes) == 3 * len(exp.seeds)
    assert {plan.replication[c.id] for c in exp.contrasts if c.id.startswith("recovered")} == \
        {"independent fine-tunes"}
