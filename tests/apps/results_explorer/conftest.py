"""A small results store with numbers a test can check by hand, written by fcr-eval's writer.

exp-a (embedded-unet, fashion-mnist, ddim, 32 px), three seeds each:
    fd-5    fd, stride 5           FD 10, 12, 14      (mean 12,   sd 2)    0.10 s/img
    fd-10   fd, stride 10          FD 20, 21, 22      (mean 21,   sd 1)    0.08 s/img
    fcr-10  fd, stride 10, λ 0.1   FD 13, 13.5, 14    (mean 13.5, sd 0.5)  0.08 s/img
exp-b (other-unet, other-data, dpmsolver++, 64 px), two seeds:
    fd-5-b  fd, stride 5           FD 30, 32          (mean 31)            0.30 s/img
σ²_Δ (block 'all', Δ = 1..3) is 0.04·Δ for the baselines and 0.02·Δ for FCR.
"""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import duckdb
import fcr_results_explorer
import pytest
from fcr_eval.store import (
    CriterionResult,
    FeatureStat,
    MetricRecord,
    PerPromptScore,
    ResultsStore,
    RunRecord,
    RunResult,
    SampleRecord,
    TimingRecord,
    make_run_id,
)
from fcr_results_explorer.app_env import ENV_DB, ENV_HUMAN_STUDY

APP = Path(fcr_results_explorer.__file__).with_name("app.py")

FD = "fd_efficientnet_lite0"
VARIATIONS = {
    # variation: (experiment, stride, lambda, FD per seed, sec/img, variance slope[, sampler])
    "fd-5": ("exp-a", 5, None, [10.0, 12.0, 14.0], 0.10, 0.04),
    "fd-10": ("exp-a", 10, None, [20.0, 21.0, 22.0], 0.08, 0.04),
    "fcr-10": ("exp-a", 10, 0.1, [13.0, 13.5, 14.0], 0.08, 0.02),
    "fd-5-b": ("exp-b", 5, None, [30.0, 32.0], 0.30, 0.04),
}
PROMPTS = {"p0": "a photo of a sneaker", "p1": "a photo of a bag"}


def _png(path: Path, shade: int) -> None:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (16, 16), (shade, shade, shade)).save(path)


def write_small_store(path: Path, variations: dict | None = None) -> Path:
    store = ResultsStore(path)
    for variation, (experiment, stride, lam, fds, sec, slope, *kind) in (variations or VARIATIONS).items():
        sampler = kind[0] if kind else "fd"
        b = experiment == "exp-b"
        for seed, fd in enumerate(fds):
            config = {"variation": variation, "seed": seed}
            run = RunRecord(
                run_id=make_run_id(experiment, variation, seed, config),
                experiment_id=experiment, variation_id=variation, seed=seed,
                model="other-unet" if b else "embedded-unet",
                dataset="other-data" if b else "fashion-mnist",
                sampler=sampler, stride=stride, parallel_decoding=True if sampler == "fd" else None,
                lambda_fcr=lam,
                delta_max=10 if lam else None, blocks="all" if lam else None,
                scheduler="dpmsolver++" if b else "ddim", resolution=64 if b else 32,
                num_inference_steps=50, guidance_scale=3.0, config=config,
                code_version="test-1.0" if b else "test-0.9", device="cpu: 2 cores",
                started_at=dt.datetime(2026, 1, 1, 10, seed), finished_at=dt.datetime(2026, 1, 1, 11, seed),
            )
            samples = []
            for pid, prompt in PROMPTS.items():
                rel = f"samples/{variation}/s{seed}/{pid}.png"
                _png(path.parent / rel, 40 + 50 * seed)
                samples.append(SampleRecord(pid, prompt, 7, rel, 16, 16, prompt.split()[-1]))
            store.write_run(RunResult(
                run,
                metrics=[MetricRecord(FD, fd, "efficientnet_lite0", "resize_224", 100),
                         MetricRecord("class_agreement", 0.9 - fd / 100, "fmnist_cls", "none", 100)],
                per_prompt_scores=[PerPromptScore("class_agreement", pid, 1.0) for pid in PROMPTS],
                timings=[TimingRecord(1, sec, unet_calls=50, encoder_forwards=50 // stride,
                                      decoder_forwards=50, peak_memory_bytes=2**30,
                                      memory_kind="process_rss")],
                feature_stats=[FeatureStat("all", d, slope * d, 64) for d in (1, 2, 3)],
                samples=samples,
            ))
    # as fcr_eval.analysis.criteria writes them: names, fractions, both sides with their intervals
    store.write_criteria([
        CriterionResult("exp-a", "quality_delta", False, 0.125, 0.05,
                        {"baseline": {"mean": 12.0, "ci_low": 7.03, "ci_high": 16.97, "n_seeds": 3},
                         "candidate": {"mean": 13.5, "ci_low": 12.26, "ci_high": 14.74,
                                       "n_seeds": 3}}),
        CriterionResult("exp-a", "variance_reduction", True, 0.5, 0.3, {"block": "all"}),
        CriterionResult("exp-a", "finetune_compute", None, None, 0.03,
                        {"reason": "no finetune_compute_fraction metric"}),
    ])
    return path


def write_human_study(path: Path) -> Path:
    """The analysis tables of docs/results-store.md, as `fcr-human-study analyse` writes them."""
    con = duckdb.connect(str(path))
    con.execute("""CREATE TABLE human_study_results (study_id VARCHAR, variation_a VARCHAR,
        variation_b VARCHAR, n_a INTEGER, n_b INTEGER, n_tie INTEGER, n_both_bad INTEGER,
        win_rate_a DOUBLE, ci_low DOUBLE, ci_high DOUBLE, p_value DOUBLE, analysed_at TIMESTAMP)""")
    con.execute("""CREATE TABLE human_study_scores (study_id VARCHAR, variation VARCHAR,
        bt_score DOUBLE, ci_low DOUBLE, ci_high DOUBLE)""")
    con.execute("INSERT INTO human_study_results VALUES ('s1', 'fcr-10', 'fd-10', 70, 30, 5, 1, "
                "0.7, 0.61, 0.79, 0.0001, TIMESTAMP '2026-01-02 12:00:00')")
    con.execute("INSERT INTO human_study_scores VALUES ('s1', 'fcr-10', 0.42, 0.2, 0.64), "
                "('s1', 'fd-10', -0.42, -0.64, -0.2)")
    con.close()
    return path


@pytest.fixture(scope="session")
def small_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("store")
    write_human_study(folder / "human-study.duckdb")
    return write_small_store(folder / "fcr.duckdb")


@pytest.fixture
def store_with_deepcache(tmp_path: Path) -> Path:
    """The small store plus a DeepCache variation in exp-b (interval 5, like fd-5-b's stride)."""
    return write_small_store(tmp_path / "fcr.duckdb", {
        **VARIATIONS, "deepcache-5-b": ("exp-b", 5, None, [31.0, 33.0], 0.20, 0.04, "deepcache")})


@pytest.fixture
def app_for(monkeypatch: pytest.MonkeyPatch):
    """``app_for(db, **query)``: an AppTest of the explorer on ``db`` with URL query params."""
    from streamlit.testing.v1 import AppTest

    def make(db: Path, **query: str | list[str]) -> AppTest:
        monkeypatch.setenv(ENV_DB, str(db))
        monkeypatch.delenv(ENV_HUMAN_STUDY, raising=False)
        at = AppTest.from_file(str(APP), default_timeout=120)
        for key, value in query.items():
            at.query_params[key] = value
        return at

    return make
