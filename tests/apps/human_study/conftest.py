"""Fixtures: a results store written through fcr-eval's own writer, and a built study."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pytest
from fcr_eval.store import ResultsStore, RunRecord, RunResult, SampleRecord, make_run_id
from PIL import Image

if TYPE_CHECKING:
    from gradio_client import Client

# Distinctive names, so that a test can look for them in anything sent to a browser.
VARIATIONS = ("VARZEBRA-fd5-baseline", "VARYAK-fd10-baseline", "VARXENON-fcr-l010-fd10")
EXPERIMENT = "exp-human-study-test"


def rater_client(url: str) -> Client:
    """A ``gradio_client.Client`` on the study server, as the tests' raters use it.

    The server is plain HTTP on 127.0.0.1, so there is no certificate to verify: ``ssl_verify=False``.
    gradio_client opens a new httpx client for every request, and with verification on each of them
    loads the system's CA bundle (~23 ms of CPU on the 2-core dev box, two or three times a vote: about
    half of the 500-vote test's CPU)."""
    from gradio_client import Client

    return Client(url, verbose=False, download_files=False, analytics_enabled=False, ssl_verify=False)


def make_results_store(root: Path, variations=VARIATIONS, n_prompts: int = 6, seeds=(0, 1),
                       size: int = 16) -> Path:
    """A results store with one run per variation, each with a sample per prompt × seed."""
    store_path = root / "results" / "fcr.duckdb"
    store = ResultsStore(store_path)
    rng = np.random.default_rng(0)
    for v_i, variation in enumerate(variations):
        config = {"variation": variation}
        run_id = make_run_id(EXPERIMENT, variation, 0, config)
        samples = []
        for p in range(n_prompts):
            for seed in seeds:
                folder = root / "results" / "samples" / variation
                folder.mkdir(parents=True, exist_ok=True)
                arr = rng.integers(0, 255, size=(size, size, 3), dtype=np.uint8)
                arr[..., v_i % 3] = 255  # each variation has its own tint
                path = folder / f"p{p}_s{seed}.png"
                Image.fromarray(arr).save(path)
                samples.append(SampleRecord(prompt_id=f"prompt-{p}", prompt=f"a photo of item {p}",
                                            seed=seed, image_path=str(path), width=size, height=size))
        store.write_run(RunResult(
            RunRecord(run_id=run_id, experiment_id=EXPERIMENT, variation_id=variation, seed=0,
                      model="embedded", dataset="fashion-mnist", sampler="fd", scheduler="ddim",
                      resolution=size, num_inference_steps=10, guidance_scale=1.0, config=config),
            samples=samples,
        ))
    return store_path


@pytest.fixture
def results_store(tmp_path: Path) -> Path:
    return make_results_store(tmp_path)
