"""Building a study from a results store written by fcr-eval's writer."""

from __future__ import annotations

import itertools
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from fcr_eval.store import ResultsStore, RunRecord, RunResult, make_run_id
from fcr_human_study.build import StudyBuildError, add_raters, break_image, build_study
from fcr_human_study.cli import main
from fcr_human_study.store import StudyStore
from PIL import Image

from .conftest import EXPERIMENT, VARIATIONS


def _pairs(study: Path) -> list[dict]:
    store = StudyStore(study, read_only=True)
    try:
        return store.query_dicts(
            """SELECT p.*, ia.file AS file_a, ib.file AS file_b, ia.kind AS kind_a, ib.kind AS kind_b,
                      ia.source_image_path AS src_a, ib.source_image_path AS src_b
               FROM pairs p JOIN study_images ia ON ia.image_id = p.image_a
               JOIN study_images ib ON ib.image_id = p.image_b""")
    finally:
        store.close()


def test_pairs_are_balanced_same_prompt_and_seed(results_store: Path, tmp_path: Path):
    study = tmp_path / "study.duckdb"
    report = build_study(results_store, study, n_pairs=30, attention_share=0.1, seed=3)
    assert (report.n_pairs, report.n_attention) == (30, 3)
    pairs = _pairs(study)
    main = [p for p in pairs if not p["is_attention"]]
    assert len(main) == 27
    # Balanced over the 3 variation pairs ...
    per_vpair = Counter(tuple(sorted((p["variation_a"], p["variation_b"]))) for p in main)
    assert sorted(per_vpair) == sorted(itertools.combinations(sorted(VARIATIONS), 2))
    assert set(per_vpair.values()) == {9}
    # ... and over the 6 prompts (27 pairs: 4 or 5 each).
    per_prompt = Counter(p["prompt_id"] for p in main)
    assert max(per_prompt.values()) - min(per_prompt.values()) <= 1
    # Both images of a pair come from the same prompt and seed, of two different variations.
    for p in main:
        assert p["variation_a"] != p["variation_b"]
        assert Path(p["src_a"]).name == Path(p["src_b"]).name == f"p{p['prompt_id'][-1]}_s{p['seed']}.png"
    assert len({p["pair_id"] for p in pairs}) == 30
    # A/B order is drawn at random, not always alphabetical.
    assert len({p["variation_a"] < p["variation_b"] for p in main}) == 2


def test_attention_checks_pair_a_sample_with_its_broken_copy(results_store: Path, tmp_path: Path):
    study = tmp_path / "study.duckdb"
    build_study(results_store, study, n_pairs=20, attention_share=0.2)
    att = [p for p in _pairs(study) if p["is_attention"]]
    assert len(att) == 4
    for p in att:
        good, bad = ("a", "b") if p["expected"] == "a" else ("b", "a")
        assert p[f"kind_{good}"] == "sample" and p[f"kind_{bad}"] == "broken"
        assert p[f"src_{good}"] == p[f"src_{bad}"]  # the broken one is a copy of the same sample
        g = np.asarray(Image.open(tmp_path / p[f"file_{good}"]), dtype=float)
        b = np.asarray(Image.open(tmp_path / p[f"file_{bad}"]), dtype=float)
        assert g.shape == b.shape
        assert np.abs(g - b).mean() > 30  # visibly different


def test_study_images_are_opaque_copies(results_store: Path, tmp_path: Path):
    study = tmp_path / "results" / "human-study.duckdb"
    build_study(results_store, study, n_pairs=12, attention_share=0.0)
    images = sorted((tmp_path / "results" / "human-study" / "images").iterdir())
    assert images
    for f in images:
        assert not any(v.split("-")[0] in f.name for v in VARIATIONS)
        with Image.open(f) as im:
            assert not im.info.get("parameters") and min(im.size) >= 256  # enlarged for display
    # The copy is pixel-identical to the sample (nearest-neighbour enlargement only).
    p = _pairs(study)[0]
    src = np.asarray(Image.open(results_store.parent / p["src_a"]).convert("RGB"))
    copy = np.asarray(Image.open(study.parent / p["file_a"]))
    k = copy.shape[0] // src.shape[0]
    assert np.array_equal(copy[::k, ::k], src)


def test_refuses_a_store_without_samples(tmp_path: Path):
    store_path = tmp_path / "fcr.duckdb"
    run = RunRecord(run_id=make_run_id(EXPERIMENT, "fd5", 0, {}), experiment_id=EXPERIMENT,
                    variation_id="fd5", seed=0, model="m", dataset="d", sampler="fd",
                    scheduler="ddim", resolution=16, num_inference_steps=10, guidance_scale=1.0)
    ResultsStore(store_path).write_run(RunResult(run))
    with pytest.raises(StudyBuildError, match="no samples"):
        build_study(store_path, tmp_path / "study.duckdb")
    # The CLI says so clearly and exits non-zero.
    assert main(["build", "--store", str(store_path), "--out", str(tmp_path / "s2.duckdb")]) == 2


def test_refuses_to_overwrite_a_study(results_store: Path, tmp_path: Path):
    study = tmp_path / "study.duckdb"
    build_study(results_store, study, n_pairs=10)
    with pytest.raises(StudyBuildError, match="already holds a study"):
        build_study(results_store, study, n_pairs=10)


def test_fewer_candidates_than_asked_uses_all_with_a_warning(results_store: Path, tmp_path: Path):
    report = build_study(results_store, tmp_path / "s.duckdb", n_pairs=1000, attention_share=0.1)
    # 3 variation pairs × 6 prompts × 2 seeds = 36 distinct pairs exist.
    assert report.n_pairs - report.n_attention == 36
    assert any("only 36 distinct pairs of samples" in w for w in report.warnings)


def test_invitation_tokens_are_unguessable_and_stored_hashed(results_store: Path, tmp_path: Path):
    study = tmp_path / "s.duckdb"
    build_study(results_store, study, n_pairs=10)
    raters = add_raters(study, 5)
    tokens = [t for _, t in raters]
    assert len(set(tokens)) == 5 and all(len(t) >= 24 for t in tokens)
    store = StudyStore(study, read_only=True)
    stored = store.query("SELECT token_hash FROM raters")
    store.close()
    assert not {t for (t,) in stored} & set(tokens)


def test_break_image_is_deterministic_and_broken():
    img = Image.fromarray(np.tile(np.linspace(0, 255, 32, dtype=np.uint8), (32, 1)))
    a, b = break_image(img, seed=1), break_image(img, seed=1)
    assert np.array_equal(np.asarray(a), np.asarray(b))
    assert np.abs(np.asarray(a, float) - np.asarray(img.convert("RGB"), float)).mean() > 30


def test_cli_build_invite_analyse_export(results_store: Path, tmp_path: Path, capsys):
    study = tmp_path / "hs.duckdb"
    assert main(["build", "--store", str(results_store), "--out", str(study), "--pairs", "20",
                 "--raters", "2"]) == 0
    out = capsys.readouterr().out
    assert "20 pairs (2 attention checks)" in out and "rater_id,token" in out
    secret = (tmp_path / "hs-admin-secret.txt").read_text().strip()
    assert secret in out and (tmp_path / "hs-admin-secret.txt").stat().st_mode & 0o077 == 0
    assert main(["invite", "--study", str(study), "-n", "3"]) == 0
    assert len(capsys.readouterr().out.strip().splitlines()) == 4
    before = study.read_bytes()
    assert main(["analyse", "--study", str(study), "--bootstrap", "10"]) == 1  # no votes yet: says so
    io = capsys.readouterr()
    assert "has no votes yet (20 pairs, 5 raters invited)" in io.err and "variation A" not in io.out
    assert study.read_bytes() == before  # and writes no empty analysis
    assert main(["export", "--study", str(study), "--csv", str(tmp_path / "v.csv")]) == 0
    assert (tmp_path / "v.csv").read_text().startswith("rater_id,")
    assert main(["analyse", "--study", str(tmp_path / "missing.duckdb")]) == 2
