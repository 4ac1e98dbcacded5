"""The runner under a 2-process launch (torchrun, gloo on CPU): prompts are sharded, the main
process alone writes the store, and the stored numbers equal a 1-process run's."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from fcr_eval.run.runner import RunnerOptions, run_experiment
from fcr_eval.spec.experiment import load_experiment
from fcr_eval.store import ResultsStore
from PIL import Image

EXPERIMENT = """
seeds = [0]
[experiment]
id = "mp-exp"
description = "sharded sampling"

[[models]]
id = "tiny"
source = "embedded-tiny"

[[datasets]]
id = "train"
kind = "fashion-mnist"
role = "finetune"
limit = 32

[[datasets]]
id = "test"
kind = "fashion-mnist"
role = "reference"
split = "test"

[sampling]
num_inference_steps = 4
guidance_scale = 2.0
batch_size = 4
n_samples = 11

[finetune]
data = "train"
steps = 2
batch_size = 2
lr = 1e-4
checkpoint_every = 1

[evaluation]
metrics = ["fd", "kid", "precision_recall", "class_agreement", "sec_per_image", "unet_forwards", "sigma2_delta"]
feature_image_size = 32
reference = "test"
n_reference = 24
timing_batch_sizes = [2]
timing_repeats = 1
sigma2_delta_max = 2
sigma2_samples = 4
kid_subset_size = 8
grid_per_class = 1

[[variations]]
id = "no-cache"

[[variations]]
id = "fd-2"
sampler = "fd"
stride = 2

[[variations]]
id = "fcr-0.10-fd-2"
sampler = "fd"
stride = 2
lambda_fcr = 0.1
"""


def _values(store: Path) -> dict:
    s = ResultsStore.open_readonly(store)
    m = s.sql("SELECT variation_id, metric, value FROM metrics JOIN runs USING (run_id) "
              "WHERE metric NOT LIKE 'sample_wall%'")
    return {(r["variation_id"], r["metric"]): r["value"] for r in m.iter_rows(named=True)}


@pytest.mark.slow
def test_two_processes_shard_prompts_and_store_what_one_process_stores(tmp_path):
    """Slow (over a minute under load): a torchrun launch of two runner processes (each starting torch and
    gloo) and the same experiment run again in one process, to compare every stored number."""
    exp_path = tmp_path / "mp.toml"
    exp_path.write_text(EXPERIMENT)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    two = tmp_path / "two" / "fcr.duckdb"
    proc = subprocess.run([*torchrun, "-m", "fcr_eval.cli", "run", str(exp_path), "--store", str(two), "--device",
                           "cpu", "--threads", "1", "--no-plots"], env=env, capture_output=True, text=True,
                          timeout=600, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "× 2 processes" in proc.stdout

    exp = load_experiment(exp_path)
    one = tmp_path / "one" / "fcr.duckdb"
    run_experiment(exp, RunnerOptions(store=one, threads=1, progress=False, device="cpu"))

    s2, s1 = ResultsStore.open_readonly(two), ResultsStore.open_readonly(one)
    runs2 = s2.runs(experiment_id=exp.id)
    assert sorted(runs2["run_id"].to_list()) == sorted(s1.runs(experiment_id=exp.id)["run_id"].to_list())
    for r in runs2.iter_rows(named=True):
        params = r["params"] if isinstance(r["params"], dict) else __import__("json").loads(r["params"])
        assert params["processes"] == 2
    # every prompt once, from both shards (11 prompts: 6 + 5), per-prompt scores complete
    smp = s2.sql("SELECT variation_id, prompt_id, image_path FROM samples JOIN runs USING (run_id) ORDER BY prompt_id")
    for vid in ("no-cache", "fd-2", "fcr-0.10-fd-2"):
        ids = smp.filter(smp["variation_id"] == vid)["prompt_id"].to_list()
        assert ids == [f"{i:05d}" for i in range(11)]
    pp = s2.sql("SELECT count(*) AS n FROM per_prompt_scores")["n"][0]
    assert pp == 3 * 11
    # sample i starts from the same x_T whatever the sharding: the images are the same images
    for vid in ("no-cache", "fd-2"):
        for pid in ("00000", "00007", "00010"):
            rel = f"samples/{exp.id}/{vid}/s0/{pid}.png"
            a = np.asarray(Image.open(two.parent / rel), dtype=int)
            b = np.asarray(Image.open(one.parent / rel), dtype=int)
            assert np.abs(a - b).max() <= 1, (vid, pid)
    # so the metrics of the runs without a fine-tune agree (batching changes float sums only)
    v2, v1 = _values(two), _values(one)
    for (vid, metric), val in v1.items():
        if vid == "fcr-0.10-fd-2":
            continue  # 2 processes fine-tune data-parallel: a different effective batch
        assert v2[(vid, metric)] == pytest.approx(val, rel=1e-3, abs=1e-6), (vid, metric)
    assert ("fcr-0.10-fd-2", "fd_efficientnet_lite0") in v2
