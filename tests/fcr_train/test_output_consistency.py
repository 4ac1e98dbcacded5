"""The output-consistency objective: its zero, its gradient, its stale path against the real caches,
and one fine-tune through the trainer and the CLI."""

import json

import pytest
import torch
from fcr_sample import (
    DeepCacheConfig,
    EncoderCacheConfig,
    apply_deep_cache,
    apply_encoder_cache,
    remove_deep_cache,
    remove_encoder_cache,
    start_sampling_run,
)
from fcr_sample.deep_cache import cached_module_names, deep_cache_layers
from fcr_train.cli import main
from fcr_train.data import FashionMNISTDataset
from fcr_train.loss import FCRConfig, feature_distance
from fcr_train.output_consistency import (
    OutputConsistencyConfig,
    check_output_consistency,
    output_consistency_loss,
    sample_oc_timesteps,
    stale_output,
    trainable_parameter_names,
)
from fcr_train.trainer import TrainConfig, latest_checkpoint, train

from .conftest import new_tiny_unet, tiny_conditioner

CACHES = ("fd", "deepcache")


def _oc(**kw):
    # 10 sampler steps over the fixture's T = 100: Δ ∈ {10, 20, 30} timesteps
    base = dict(lam=0.5, sampler_steps=10, delta_max=3)
    base.update(kw)
    return OutputConsistencyConfig(**base)


def _draws(seed=3, t=(5, 30, 60), d=(20, 10, 30)):
    g = torch.Generator().manual_seed(seed)
    return dict(noise=torch.randn(3, 1, 8, 8, generator=g), timesteps=torch.tensor(t), deltas=torch.tensor(d))


def _hooked(unet) -> bool:
    return any(hasattr(m, "_diffusers_hook") for m in unet.modules())


@pytest.mark.parametrize("cache", CACHES)
def test_loss_is_exactly_zero_when_stale_equals_fresh_and_positive_otherwise(tiny_unet, scheduler, batch, cache):
    x0, text = batch
    cfg = _oc(cache=cache)
    same = output_consistency_loss(tiny_unet, scheduler, x0, text, cfg, **{**_draws(), "deltas": torch.zeros(3, dtype=torch.long)})
    assert same.oc.item() == 0.0 and torch.equal(same.stale, same.target)
    moved = output_consistency_loss(tiny_unet, scheduler, x0, text, cfg, **_draws())
    assert moved.oc.item() > 1e-4
    assert moved.loss.item() == pytest.approx(moved.denoise.item() + 0.5 * moved.oc.item())
    assert not _hooked(tiny_unet)  # DeepCache's layer hooks are gone again


def test_target_carries_no_gradient(tiny_unet, scheduler, batch):
    x0, text = batch
    cfg = _oc(trainable="all")
    d = _draws()
    out = output_consistency_loss(tiny_unet, scheduler, x0, text, cfg, **d)
    assert not out.target.requires_grad and out.stale.requires_grad
    out.oc.backward()
    got = {n: p.grad.clone() for n, p in tiny_unet.named_parameters()}
    # the same term with the fresh output computed as a constant from the start
    tiny_unet.zero_grad(set_to_none=True)
    t, key = d["timesteps"], d["timesteps"] + d["deltas"]
    x_t, x_key = scheduler.add_noise(x0, d["noise"], t), scheduler.add_noise(x0, d["noise"], key)
    with torch.no_grad():
        fresh = tiny_unet(x_t, t, text).sample
    feature_distance(stale_output(tiny_unet, x_key, key, x_t, t, text, cfg), fresh, cfg.distance).backward()
    for n, p in tiny_unet.named_parameters():
        torch.testing.assert_close(got[n], p.grad, rtol=1e-5, atol=1e-8, msg=n)


@pytest.mark.parametrize("cache", CACHES)
@pytest.mark.parametrize("trainable", ("recomputed", "all"))
def test_gradient_reaches_exactly_the_parameters_the_config_names(tiny_unet, scheduler, batch, cache, trainable):
    x0, text = batch
    cfg = _oc(cache=cache, trainable=trainable)
    names = set(trainable_parameter_names(tiny_unet, cfg))
    every = {n for n, _ in tiny_unet.named_parameters()}
    if trainable == "all":
        assert names == every
    else:  # the names are those of the modules the cache re-runs, as fcr-sample defines its cut
        reused = ("conv_in", "down_blocks", "mid_block") if cache == "fd" else cached_module_names(tiny_unet, DeepCacheConfig())
        assert names == {n for n in every if not any(n.startswith(m + ".") for m in reused)}
        assert any(n.startswith("up_blocks") for n in names) and "time_embedding.linear_1.weight" in names
        assert ("conv_in.weight" in names) == (cache == "deepcache")  # DeepCache re-runs conv_in, FD reuses it
    output_consistency_loss(tiny_unet, scheduler, x0, text, cfg, **_draws()).oc.backward()
    for n, p in tiny_unet.named_parameters():
        reached = p.grad is not None and bool(p.grad.abs().sum() > 0)
        assert reached == (n in names), n


@pytest.mark.parametrize("cache", CACHES)
def test_stale_path_is_what_the_real_cache_computes_at_a_reused_step(tiny_unet, scheduler, batch, cache):
    x0, text = batch
    t, key = 40, 60
    noise = _draws()["noise"]
    x_t = scheduler.add_noise(x0, noise, torch.tensor([t] * 3))
    x_key = scheduler.add_noise(x0, noise, torch.tensor([key] * 3))
    with torch.no_grad():
        out = output_consistency_loss(tiny_unet, scheduler, x0, text, _oc(cache=cache), noise=noise,
                                      timesteps=torch.tensor([t] * 3), deltas=torch.tensor([key - t] * 3))
        mine = out.stale
        # a 2-step run: step 0 (key / full) at t + Δ, step 1 served from its features at t
        if cache == "fd":
            apply_encoder_cache(tiny_unet, EncoderCacheConfig(stride=2, parallel_decoding=False))
        else:
            apply_deep_cache(tiny_unet, DeepCacheConfig(cache_interval=2, cache_branch_id=0))
        start_sampling_run(tiny_unet, torch.tensor([key, t]))
        tiny_unet(x_key, torch.tensor(key), text)
        real = tiny_unet(x_t, torch.tensor(t), text).sample
        (remove_encoder_cache if cache == "fd" else remove_deep_cache)(tiny_unet)
        fresh = tiny_unet(x_t, torch.tensor(t), text).sample
    assert torch.equal(mine, real)
    assert torch.equal(out.target, fresh)
    assert (mine - fresh).abs().max() > 1e-3  # the comparison is not between two fresh outputs


def test_deep_cache_layers_refuse_a_cached_unet_and_leave_no_hooks(tiny_unet):
    apply_encoder_cache(tiny_unet, EncoderCacheConfig(stride=2))
    with pytest.raises(ValueError, match="already applied"), deep_cache_layers(tiny_unet, DeepCacheConfig()):
        pass
    remove_encoder_cache(tiny_unet)
    with deep_cache_layers(tiny_unet, DeepCacheConfig()) as st:
        assert _hooked(tiny_unet) and not st.outputs
    assert not _hooked(tiny_unet)


def test_timesteps_pair_a_reused_step_with_a_noisier_key_step_in_sampler_steps():
    g = torch.Generator().manual_seed(0)
    t, d = sample_oc_timesteps(4000, 100, _oc(), generator=g)
    assert set(d.unique().tolist()) == {10, 20, 30}
    assert int(t.min()) == 0 and int((t + d).max()) == 99 and bool((t + d <= 99).all())


def test_bad_settings_are_refused_before_a_run_folder_exists(tmp_path, tiny_unet, scheduler):
    for kw, word in [(dict(lam=0), "lam"), (dict(cache="taylor"), "cache"), (dict(trainable="encoder"), "trainable"),
                     (dict(distance="l1"), "distance"), (dict(cache_branch_id=1), "cache_branch_id"),
                     (dict(delta_max=None), "stride"), (dict(delta_unit="sampler_steps", sampler_steps=None), "sampler_steps")]:
        with pytest.raises(ValueError, match=word):
            _oc(**kw)
    assert _oc(delta_max=None, stride=4).delta_max == 4
    with pytest.raises(ValueError, match="exclusive"):
        TrainConfig(output_consistency=_oc(), fcr=FCRConfig(lam=0.1))
    with pytest.raises(ValueError, match="fewer than num_train_timesteps"):
        check_output_consistency(tiny_unet, 100, _oc(delta_max=10))
    with pytest.raises(ValueError, match="gradient checkpointing"):
        check_output_consistency(tiny_unet, 100, _oc(cache="deepcache"), grad_checkpointing=True)
    with pytest.raises(ValueError, match="cache_branch_id"):
        check_output_consistency(tiny_unet, 100, _oc(cache="deepcache", cache_branch_id=9))
    cfg = TrainConfig(output_dir=str(tmp_path / "r"), max_steps=1, progress=False, fcr=FCRConfig(lam=0.0),
                      output_consistency=_oc(delta_max=10))
    with pytest.raises(ValueError, match="delta_max"):
        train(tiny_unet, scheduler, [], None, cfg)
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize("cache", CACHES)
def test_finetune_steps_log_the_share_and_resume_exactly(tmp_path, scheduler, cache):
    data = FashionMNISTDataset("train", limit=32)
    oc = _oc(cache=cache)

    def cfg(name, **kw):
        return TrainConfig(**{**dict(output_dir=str(tmp_path / name), max_steps=2, batch_size=4, lr=1e-3,
                                     checkpoint_every=1, seed=3, progress=False, fcr=FCRConfig(lam=0.0),
                                     output_consistency=oc), **kw})

    res = train(new_tiny_unet(), scheduler, data, tiny_conditioner(), cfg("full"))
    recs = [json.loads(x) for x in (res.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert len(recs) == 2
    for r in recs:
        assert r["l_oc"] > 0 and r["l_fcr"] == 0.0 and r["fcr_to_denoise"] == 0.0
        assert r["l_oc_weighted"] == pytest.approx(0.5 * r["l_oc"])
        assert r["oc_to_denoise"] == pytest.approx(0.5 * r["l_oc"] / r["l_denoise"])
        assert r["loss"] == pytest.approx(r["l_denoise"] + 0.5 * r["l_oc"])
    assert res.oc_to_denoise == [r["oc_to_denoise"] for r in recs]
    assert "λ·l_oc/l_denoise" in (res.run_dir / "train.log").read_text()
    saved = json.loads((res.run_dir / "config.json").read_text())["train"]
    assert saved["output_consistency"] == oc.to_dict() and saved["fcr"]["lam"] == 0.0

    train(new_tiny_unet(), scheduler, data, tiny_conditioner(), cfg("cut", max_steps=1))
    assert latest_checkpoint(tmp_path / "cut").name == "step_0000001"
    resumed = train(new_tiny_unet(), scheduler, data, tiny_conditioner(), cfg("cut", resume=True))
    assert resumed.losses == res.losses[1:]


def test_cli_finetune_with_output_consistency(tmp_path, capsys):
    out = tmp_path / "oc"
    args = ["finetune", "--model", "embedded-tiny", "--limit", "16", "--batch-size", "4", "--max-steps", "1",
            "--oc-lam", "0.2", "--oc-cache", "deepcache", "--oc-delta-max", "2", "--oc-trainable", "all",
            "--output-dir", str(out), "--no-progress"]
    assert main(args) == 0
    assert "L_oc" in capsys.readouterr().out
    saved = json.loads((out / "config.json").read_text())["train"]
    assert saved["fcr"]["lam"] == 0.0  # --lam's default gives way to --oc-lam
    assert {k: saved["output_consistency"][k] for k in ("lam", "cache", "delta_max", "trainable", "delta_unit")} == \
        {"lam": 0.2, "cache": "deepcache", "delta_max": 2, "trainable": "all", "delta_unit": "sampler_steps"}
    for bad, word in [(["--oc-cache", "deepcache"], "without --oc-lam"), (["--oc-lam", "0.1", "--lam", "0.1"], "exclusive")]:
        assert main(["finetune", "--model", "embedded-tiny", "--output-dir", str(tmp_path / "bad"), *bad]) == 2
        err = capsys.readouterr().err
        assert word in err and len(err.strip().splitlines()) == 1
        assert not (tmp_path / "bad").exists()
