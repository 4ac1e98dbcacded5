"""The emoji backbone through the experiment runner: ``source = "emoji-tiny"`` picks it, sampling
decodes through its VAE, FCR and output consistency fine-tune it in latent space, FD, DeepCache and
the attribution run on it, and prompt adherence is stored under the emoji group classifier's name."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from fcr_eval.cli import main
from fcr_eval.plan.planner import make_plan, model_cost
from fcr_eval.spec.experiment import ExperimentFileError, load_experiment
from fcr_eval.store import ResultsStore

TINY_EMOJI = Path(__file__).parents[1] / "experiments" / "tiny-emoji.toml"


def test_source_picks_the_backbone_and_the_plan_counts_its_latent_unet(tmp_path):
    exp = load_experiment(TINY_EMOJI)
    model = exp.models["emoji"]
    assert model.embedded and model.backbone == "emoji"
    plan = make_plan(exp, results_dir=tmp_path / "results", calibrate=False)
    # pixels 32² → the UNet's 8² latents: the count is of the latent UNet, not of a 32² one
    assert model_cost(exp, "emoji", 32).flops_per_forward == model_cost(exp, "emoji").flops_per_forward
    assert all(r.resolution == 32 for r in plan.runs)
    assert len({r.finetune.key for r in plan.runs if r.finetune}) == 2  # FCR and output consistency


@pytest.mark.parametrize(("old", "new", "message"), [
    ('kind = "emoji"\nrole = "reference"', 'kind = "fashion-mnist"\nrole = "reference"', 'not of kind "emoji"'),
    ('role = "eval"\nsplit = "test"', 'role = "eval"\nsplit = "test"\nprompt_template = "a {}"', "remove prompt_template"),
    ('role = "eval"\nsplit = "test"', 'role = "eval"\nsplit = "validation"', "split"),
])
def test_what_an_emoji_experiment_may_not_say(tmp_path, old, new, message):
    text = TINY_EMOJI.read_text()
    assert old in text
    path = tmp_path / "bad.toml"
    path.write_text(text.replace(old, new, 1))
    with pytest.raises(ExperimentFileError, match=message):
        load_experiment(path)


@pytest.mark.slow  # a whole (tiny) experiment on the emoji backbone: two fine-tunes, five runs, attribution
# (27.5 min under load average ~22 on the shared 2-core machine; a few minutes when it is quiet)
def test_the_runner_samples_finetunes_and_attributes_on_the_emoji_backbone(tmp_path):
    """Slow: a whole tiny experiment (two latent fine-tunes, five runs, the attribution) in one process."""
    store_path = tmp_path / "results" / "fcr.duckdb"
    assert main(["run", str(TINY_EMOJI), "--store", str(store_path), "--no-plots"]) == 0
    exp = load_experiment(TINY_EMOJI)
    s = ResultsStore.open_readonly(store_path)
    runs = {r["variation_id"]: r for r in s.runs(experiment_id=exp.id).iter_rows(named=True)}
    assert set(runs) == {v.id for v in exp.variations}
    assert {r["dataset"] for r in runs.values()} == {"emoji-test"}
    # prompt adherence is labelled with the emoji group classifier, never the Fashion-MNIST one
    m = s.sql("SELECT DISTINCT feature_extractor FROM metrics WHERE metric = 'class_agreement'")
    assert m["feature_extractor"].to_list() == ["emoji_group_cnn"]
    sm = s.sql("SELECT DISTINCT feature_extractor FROM sample_metric_definitions WHERE metric LIKE 'class_%'")
    assert sm["feature_extractor"].to_list() == ["emoji_group_cnn"]
    # samples are the VAE's decodes: RGB at 32², not 8² latents
    path = s.sql("SELECT image_path FROM samples LIMIT 1")["image_path"][0]
    from PIL import Image

    img = np.asarray(Image.open(s.image_file(path)))
    assert img.shape == (32, 32, 3)
    # FD skipped encoder passes on the emoji UNet; DeepCache ran partial forwards
    t = {r["run_id"]: r for r in s.sql("SELECT run_id, encoder_forwards, unet_calls FROM timings").iter_rows(named=True)}
    fd = t[runs["fd-2"]["run_id"]]
    assert fd["encoder_forwards"] < fd["unet_calls"]
    # the fine-tunes trained the latent UNet on emoji latents, with their objectives
    plan = make_plan(exp, results_dir=store_path.parent, calibrate=False)
    fts = {r.variation.id: r.finetune for r in plan.runs if r.finetune}
    fcr = json.loads((Path(fts["fcr-0.10-fd-2"].output_dir) / "config.json").read_text())
    assert fcr["conditioner"]["kind"] == "latent" and fcr["train"]["fcr"]["lam"] == 0.1
    oc = json.loads((Path(fts["oc-fd-2"].output_dir) / "config.json").read_text())
    assert oc["train"]["output_consistency"]["lam"] == 0.5
    # the attribution of the FD cache error ran on the emoji UNet's features
    a = s.sql("SELECT COUNT(*) AS n FROM cache_attribution")
    assert a["n"][0] > 0
