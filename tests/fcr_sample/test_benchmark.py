import pytest
import torch
from fcr_sample import DeepCacheConfig, apply_deep_cache, remove_deep_cache
from fcr_sample.benchmark import PipelineVariant, benchmark_pipelines, format_pipeline_table


def test_benchmark_pipelines_interleaves_and_restores(make_pipe):
    pipe = make_pipe()
    calls = []

    def enable(p):
        calls.append("on")
        apply_deep_cache(p, DeepCacheConfig(cache_interval=2))

    def disable(p):
        calls.append("off")
        remove_deep_cache(p)

    variants = [PipelineVariant("no cache"), PipelineVariant("twin"), PipelineVariant("dc", enable, disable)]
    kwargs = {"prompt": ["a photo of a shirt"], "num_inference_steps": 4}
    rows = benchmark_pipelines(pipe, variants, kwargs, rounds=2)
    assert [r.label for r in rows] == ["no cache", "twin", "dc"]
    assert calls == ["on", "off"] * 3  # warm-up + 2 rounds, each enable paired with its disable
    assert all(len(r.seconds_per_image) == 2 and len(r.speedups) == 2 for r in rows)
    assert rows[0].speedups == [1.0, 1.0]
    # same seeded x_T for every variant: a variant that changes nothing gives the same images
    assert torch.equal(rows[0].images, rows[1].images)
    assert (rows[2].images - rows[0].images).abs().max() > 1e-4
    assert "_diffusers_hook" not in vars(pipe.unet)
    table = format_pipeline_table(rows, same_as={"twin": "no cache"})
    assert "| twin |" in table and "0 vs no cache" in table and "speed-up vs no cache" in table


def test_benchmark_pipelines_refuses_bad_input(make_pipe):
    with pytest.raises(ValueError, match="distinct"):
        benchmark_pipelines(make_pipe(), [PipelineVariant("a"), PipelineVariant("a")], {})
    with pytest.raises(ValueError, match="rounds must be >= 1"):
        benchmark_pipelines(make_pipe(), [PipelineVariant("a")], {}, rounds=0)
