"""The rollout objective: its zero, its segments against the real sampler and caches, where its
gradient goes, its key-step draw, and that descending it lowers it."""

import json

import pytest
import torch
from fcr_sample import (
    DeepCacheConfig,
    EncoderCacheConfig,
    apply_deep_cache,
    apply_encoder_cache,
    denoise,
    remove_deep_cache,
    remove_encoder_cache,
)
from fcr_sample.deep_cache import cached_module_names
from fcr_train.cli import main
from fcr_train.data import FashionMNISTDataset
from fcr_train.embedded import make_scheduler
from fcr_train.loss import FCRConfig
from fcr_train.rollout import (
    RolloutConfig,
    check_rollout,
    fresh_rollout,
    key_step_probabilities,
    rollout_cost_factor,
    rollout_loss,
    sample_key_steps,
    sampling_scheduler,
    stale_rollout,
    trainable_parameter_names,
)
from fcr_train.trainer import TrainConfig, train

from .conftest import new_tiny_unet, tiny_conditioner

CACHES = ("fd", "deepcache")
STEPS = 10  # sampler steps of these tests' runs (T = 1000 of the embedded schedule: τ = 900 … 0)


@pytest.fixture
def ddpm():
    return make_scheduler("ddpm")  # the embedded default's training schedule (T = 1000, clips x0)


def _cfg(**kw):
    return RolloutConfig(**{**dict(lam=0.5, k=3, sampler_steps=STEPS), **kw})


def _hooked(unet) -> bool:
    return any(hasattr(m, "_diffusers_hook") for m in unet.modules())


def _apply(unet, cache, interval, parallel=True):
    if cache == "fd":
        apply_encoder_cache(unet, EncoderCacheConfig(stride=interval, parallel_decoding=parallel))
    else:
        apply_deep_cache(unet, DeepCacheConfig(cache_interval=interval, cache_branch_id=0))


def _remove(unet, cache):
    (remove_encoder_cache if cache == "fd" else remove_deep_cache)(unet)


def _trajectory(unet, x_T, text, null, guidance):
    """The real sampler's run (fcr_sample.denoise with the embedded DDIM): the state entering every
    step, the state after the last one, and each step's predicted x0."""
    states, x0s = [], []

    def record(info):
        states.append(info["x"])
        x0s.append(info["denoised"])

    with torch.no_grad():
        denoise(unet, make_scheduler("ddim"), x_T, text, null, steps=STEPS, guidance_scale=guidance, callback=record)
    return [x_T] + states, x0s  # states[i] enters step i


@pytest.mark.parametrize("cache", CACHES)
def test_k_zero_gives_a_zero_term_and_no_gradient(tiny_unet, ddpm, batch, cache):
    x0, text = batch
    out = rollout_loss(tiny_unet, ddpm, x0, text, _cfg(k=0, cache=cache), generator=torch.Generator().manual_seed(2))
    assert out.rollout.item() == 0.0 and out.loss.item() == out.denoise.item()
    assert not out.rollout.requires_grad  # a constant: the term reaches no parameter
    moved = rollout_loss(tiny_unet, ddpm, x0, text, _cfg(k=1, cache=cache), generator=torch.Generator().manual_seed(2))
    assert moved.rollout.item() > 1e-4  # one stale step already differs
    assert moved.loss.item() == pytest.approx(moved.denoise.item() + 0.5 * moved.rollout.item())
    assert not _hooked(tiny_unet)


@pytest.mark.parametrize("guidance", (1.0, 2.0))
@pytest.mark.parametrize("cache", CACHES)
def test_stale_segment_is_the_real_cached_run_and_fresh_is_the_uncached_run(tiny_unet, batch, cache, guidance):
    _, text = batch
    null = torch.zeros_like(text)  # denoise takes one unconditional row per row
    x_T = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(4))
    cfg = _cfg(cache=cache, guidance_scale=guidance)
    sampler = sampling_scheduler(make_scheduler("ddpm"), cfg)
    key = 4  # the second key step of a stride-4 run: steps 5, 6, 7 reuse step 4's features

    _apply(tiny_unet, cache, 4)
    cached, cached_x0 = _trajectory(tiny_unet, x_T, text, null, guidance)
    _remove(tiny_unet, cache)
    fresh_states, fresh_x0 = _trajectory(tiny_unet, x_T, text, null, guidance)

    index = torch.full((3,), key)
    with torch.no_grad():
        stale = stale_rollout(tiny_unet, sampler, cached[key], index, text, cfg, null_states=null)
        fresh = fresh_rollout(tiny_unet, sampler, fresh_states[key], index, text, cfg.k + 1,
                              guidance_scale=guidance, null_states=null)
    end = key + cfg.k  # the segment's last step
    assert torch.equal(stale.state, cached[end + 1]) and torch.equal(stale.x0, cached_x0[end])
    assert torch.equal(fresh.state, fresh_states[end + 1]) and torch.equal(fresh.x0, fresh_x0[end])
    assert (stale.state - fresh.state).abs().max() > 1e-4  # from the same x_T the runs differ
    assert not _hooked(tiny_unet)


@pytest.mark.parametrize("cache", CACHES)
def test_sequential_decoding_and_rows_at_different_key_steps_change_nothing(tiny_unet, batch, cache):
    _, text = batch
    cfg = _cfg(cache=cache)
    sampler = sampling_scheduler(make_scheduler("ddpm"), cfg)
    x = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(6))
    index = torch.tensor([0, 4, 6])
    with torch.no_grad():
        mixed = stale_rollout(tiny_unet, sampler, x, index, text, cfg)
        for r in range(3):
            alone = stale_rollout(tiny_unet, sampler, x[r:r + 1], index[r:r + 1], text[r:r + 1], cfg)
            torch.testing.assert_close(mixed.state[r:r + 1], alone.state, rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(mixed.x0[r:r + 1], alone.x0, rtol=1e-5, atol=1e-6)
    if cache == "fd":  # FD without parallel decoding (one decoder per step): the same numbers
        x_T = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(4))
        _apply(tiny_unet, cache, 4, parallel=False)
        cached, _ = _trajectory(tiny_unet, x_T, text, None, 1.0)
        _remove(tiny_unet, cache)
        with torch.no_grad():
            seg = stale_rollout(tiny_unet, sampler, cached[4], torch.full((3,), 4), text, cfg)
        torch.testing.assert_close(seg.state, cached[8], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("cache", CACHES)
@pytest.mark.parametrize("trainable", ("recomputed", "all"))
def test_gradient_reaches_exactly_the_named_parameters(tiny_unet, ddpm, batch, cache, trainable):
    x0, text = batch
    cfg = _cfg(cache=cache, trainable=trainable)
    names = set(trainable_parameter_names(tiny_unet, cfg))
    every = {n for n, _ in tiny_unet.named_parameters()}
    if trainable == "all":
        assert names == every
    else:  # the cut is the cache's own, as fcr-sample defines it
        reused = ("conv_in", "down_blocks", "mid_block") if cache == "fd" else cached_module_names(tiny_unet, DeepCacheConfig())
        assert names == {n for n in every if not any(n.startswith(m + ".") for m in reused)}
        assert ("conv_in.weight" in names) == (cache == "deepcache")
    out = rollout_loss(tiny_unet, ddpm, x0, text, cfg, generator=torch.Generator().manual_seed(3))
    out.rollout.backward()
    for n, p in tiny_unet.named_parameters():
        reached = p.grad is not None and bool(p.grad.abs().sum() > 0)
        assert reached == (n in names), n


def test_the_fresh_rollout_is_a_constant_target(tiny_unet, ddpm, batch):
    x0, text = batch
    out = rollout_loss(tiny_unet, ddpm, x0, text, _cfg(), generator=torch.Generator().manual_seed(3))
    assert not out.fresh.requires_grad and out.stale.requires_grad
    assert out.fresh.shape == out.stale.shape == x0.shape


def test_key_steps_favour_high_noise_and_leave_room_for_the_segment():
    ts = torch.tensor([900, 800, 700, 600, 500, 400, 300, 200, 100, 0])
    uniform = key_step_probabilities(ts, 1000, _cfg(k=3, noise_power=0.0))
    assert torch.allclose(uniform[:7], torch.full((7,), 1 / 7)) and not uniform[7:].any()
    p = key_step_probabilities(ts, 1000, _cfg(k=3, noise_power=2.0))
    expected = (ts[:7].double() / 1000) ** 2
    torch.testing.assert_close(p[:7].double(), expected / expected.sum(), rtol=1e-6, atol=1e-7)
    assert bool((p[:-4].diff() < 0).all()) and not p[7:].any()
    draws = sample_key_steps(20_000, ts, 1000, _cfg(k=3, noise_power=2.0), generator=torch.Generator().manual_seed(0))
    freq = torch.bincount(draws, minlength=10).double() / 20_000
    assert (freq - p.double()).abs().max() < 0.015 and int(draws.max()) <= 6


def test_only_the_first_rollout_rows_run_the_segment(tiny_unet, ddpm, batch):
    x0, text = batch
    out = rollout_loss(tiny_unet, ddpm, x0, text, _cfg(rollout_rows=2), generator=torch.Generator().manual_seed(3))
    assert out.stale.shape[0] == 2 and out.key_steps.shape == (2,) and out.timesteps.shape == (3,)
    with pytest.raises(ValueError, match="key_steps"):
        rollout_loss(tiny_unet, ddpm, x0, text, _cfg(), key_steps=torch.tensor([0, 7, 1]))  # 7 + 3 > 9


@pytest.mark.parametrize("cache", CACHES)
def test_descending_the_term_lowers_it(ddpm, batch, cache):
    """The gradient is a descent direction of the served segment's error: a few steps on the term
    alone lower it on the same draws."""
    unet = new_tiny_unet()
    x0, text = batch
    cfg = _cfg(cache=cache, k=2)
    draws = dict(noise=torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(9)),
                 timesteps=torch.tensor([10, 500, 900]), key_steps=torch.tensor([0, 1, 3]))
    opt = torch.optim.Adam(unet.parameters(), lr=3e-3)
    values = []
    for _ in range(15):
        out = rollout_loss(unet, ddpm, x0, text, cfg, **draws)
        values.append(out.rollout.item())
        opt.zero_grad()
        out.rollout.backward()
        opt.step()
    assert values[-1] < 0.7 * values[0]


def test_bad_settings_are_refused(tiny_unet, ddpm):
    for kw, word in [(dict(lam=0), "lam"), (dict(k=-1), "k"), (dict(k=10), "k"), (dict(cache="taylor"), "cache"),
                     (dict(target="eps"), "target"), (dict(distance="l1"), "distance"),
                     (dict(trainable="encoder"), "trainable"), (dict(noise_power=-1), "noise_power"),
                     (dict(rollout_rows=0), "rollout_rows"), (dict(cache_branch_id=1), "cache_branch_id"),
                     (dict(guidance_scale=0), "guidance_scale")]:
        with pytest.raises(ValueError, match=word):
            _cfg(**kw)
    with pytest.raises(ValueError, match="gradient checkpointing"):
        check_rollout(tiny_unet, ddpm, _cfg(cache="deepcache"), grad_checkpointing=True)
    with pytest.raises(ValueError, match="cache_branch_id"):
        check_rollout(tiny_unet, ddpm, _cfg(cache="deepcache", cache_branch_id=9))
    with pytest.raises(ValueError, match="null"):
        rollout_loss(tiny_unet, ddpm, torch.zeros(2, 1, 8, 8), torch.zeros(2, 4, 8), _cfg(guidance_scale=2.0))


def test_cost_factor_grows_with_k_rows_and_guidance():
    base = rollout_cost_factor(_cfg(k=4, rollout_rows=8), 32)
    assert 1 < base < rollout_cost_factor(_cfg(k=8, rollout_rows=8), 32) < rollout_cost_factor(_cfg(k=8), 32)
    assert rollout_cost_factor(_cfg(k=4, rollout_rows=8, guidance_scale=2.0), 32) - 1 == pytest.approx(2 * (base - 1))
    assert rollout_cost_factor(_cfg(k=0), 32) == 1.0  # no segment runs


@pytest.mark.parametrize("cache", CACHES)
def test_finetune_logs_the_share_keeps_the_controls_draws_and_resumes_exactly(tmp_path, scheduler, cache):
    data = FashionMNISTDataset("train", limit=32)
    ro = _cfg(cache=cache, k=2, rollout_rows=2, guidance_scale=2.0)

    def cfg(name, **kw):
        return TrainConfig(**{**dict(output_dir=str(tmp_path / name), max_steps=2, batch_size=4, lr=1e-3,
                                     checkpoint_every=1, seed=3, progress=False, fcr=FCRConfig(lam=0.0),
                                     objective=ro), **kw})

    res = train(new_tiny_unet(), scheduler, data, tiny_conditioner(), cfg("full"))
    recs = [json.loads(x) for x in (res.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert len(recs) == 2
    for r in recs:
        assert r["l_rollout"] > 0 and r["l_fcr"] == 0.0
        assert r["rollout_to_denoise"] == pytest.approx(0.5 * r["l_rollout"] / r["l_denoise"])
        assert r["loss"] == pytest.approx(r["l_denoise"] + 0.5 * r["l_rollout"])
    assert res.objective_to_denoise == [r["rollout_to_denoise"] for r in recs]
    assert "λ·l_rollout/l_denoise" in (res.run_dir / "train.log").read_text()
    assert json.loads((res.run_dir / "config.json").read_text())["train"]["rollout"] == ro.to_dict()
    # L_denoise at the first step is the λ = 0 control's: same weights, data, t and ε
    control = train(new_tiny_unet(), scheduler, data, tiny_conditioner(), cfg("control", objective=None))
    first = json.loads((control.run_dir / "metrics.jsonl").read_text().splitlines()[0])
    assert first["l_denoise"] == pytest.approx(recs[0]["l_denoise"], rel=1e-6)

    train(new_tiny_unet(), scheduler, data, tiny_conditioner(), cfg("cut", max_steps=1))
    resumed = train(new_tiny_unet(), scheduler, data, tiny_conditioner(), cfg("cut", resume=True))
    assert resumed.losses == res.losses[1:]


def test_bad_combinations_are_refused_before_a_run_folder_exists(tmp_path, tiny_unet, scheduler):
    with pytest.raises(ValueError, match="exclusive"):
        TrainConfig(objective=_cfg(), fcr=FCRConfig(lam=0.1))
    cfg = TrainConfig(output_dir=str(tmp_path / "r"), max_steps=1, progress=False, fcr=FCRConfig(lam=0.0),
                      objective=_cfg(guidance_scale=2.0))
    with pytest.raises(ValueError, match="null_states"):
        train(tiny_unet, scheduler, [], lambda b, d, g: b, cfg)
    assert not (tmp_path / "r").exists()


def test_cli_finetune_with_the_rollout_term(tmp_path, capsys):
    out = tmp_path / "ro"
    args = ["finetune", "--model", "embedded-tiny", "--limit", "16", "--batch-size", "4", "--max-steps", "1",
            "--rollout-lam", "0.3", "--rollout-cache", "deepcache", "--rollout-k", "2", "--rollout-target", "state",
            "--rollout-rows", "2", "--output-dir", str(out), "--no-progress"]
    assert main(args) == 0
    assert "L_rollout" in capsys.readouterr().out
    saved = json.loads((out / "config.json").read_text())["train"]
    assert saved["fcr"]["lam"] == 0.0  # --lam's default gives way to --rollout-lam
    assert {k: saved["rollout"][k] for k in ("lam", "cache", "k", "target", "rollout_rows")} == \
        {"lam": 0.3, "cache": "deepcache", "k": 2, "target": "state", "rollout_rows": 2}
    for bad, word in [(["--rollout-k", "2"], "without --rollout-lam"),
                      (["--rollout-lam", "0.1", "--oc-lam", "0.1"], "exclusive")]:
        assert main(["finetune", "--model", "embedded-tiny", "--output-dir", str(tmp_path / "bad"), *bad]) == 2
        err = capsys.readouterr().err
        assert word in err and len(err.strip().splitlines()) == 1
        assert not (tmp_path / "bad").exists()
