"""The emoji backbone: SD's stack at small size (AutoencoderKL → 8×8×4 latents, a latent
UNet2DConditionModel with cross-attention at two resolutions, MiniLM states of the names), its
shipped weights and records, and the fine-tuning and caching paths that run on it."""

from __future__ import annotations

import json

import pytest
import torch
from fcr_train.api import DataConfig, FinetuneConfig, finetune, load_emoji_model
from fcr_train.emoji import EmojiDataset, load_emoji_set
from fcr_train.emoji_backbone import (
    EMOJI_UNET_CONFIG,
    EMOJI_WEIGHTS_DIR,
    CaptionStates,
    LatentConditioner,
    build_emoji_unet,
    decode_latents,
    encode_images,
    load_emoji_vae,
    reconstruction_error,
    sample_emoji,
)
from fcr_train.loss import FCRConfig
from fcr_train.trainer import TrainConfig


@pytest.fixture(scope="module")
def vae():
    return load_emoji_vae()


@pytest.fixture(scope="module")
def tiny():
    return load_emoji_model("emoji-tiny")


def test_unet_is_sd_shaped_and_sized_like_the_first_backbone():
    from torch.utils.flop_counter import FlopCounterMode

    unet = build_emoji_unet().eval()
    cross = {type(b).__name__ for b in unet.down_blocks if hasattr(b, "attentions")}
    assert cross == {"CrossAttnDownBlock2D"} and sum(hasattr(b, "attentions") for b in unet.down_blocks) >= 2
    assert unet.config.in_channels == 4 and unet.config.sample_size == 8
    with FlopCounterMode(display=False) as fc, torch.no_grad():
        unet(torch.randn(1, 4, 8, 8), torch.tensor([10]), encoder_hidden_states=torch.randn(1, 24, 384))
    assert 0.15e9 < fc.get_total_flops() < 0.3e9  # near the first backbone's 0.278 GFLOPs
    assert EMOJI_UNET_CONFIG["cross_attention_dim"] == 384  # MiniLM's width


def test_vae_maps_32px_rgb_to_4_channel_8x8_latents_and_back(vae):
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    z = encode_images(vae, x)
    assert z.shape == (2, 4, 8, 8)
    img = decode_latents(vae, z)
    assert img.shape == (2, 3, 32, 32) and 0 <= float(img.min()) and float(img.max()) <= 1
    # scaled latents of real emoji have about unit variance (SD's scaling rule)
    real = EmojiDataset("train", limit=128).pixels
    assert 0.7 < float(encode_images(vae, real).std()) < 1.3


def test_shipped_vae_reconstructs_held_out_emoji_as_its_record_says(vae):
    record = json.loads((EMOJI_WEIGHTS_DIR / "vae" / "training.json").read_text())
    data = load_emoji_set()
    err = reconstruction_error(vae, data.images("test")[::8])  # every 8th: all groups, in file order
    # the record's held-out MSE is over all 566 images; 71 of them agree within sampling error
    assert float(err["mse"].mean()) == pytest.approx(record["held_out"]["mse"], rel=0.3)
    # better than the trivial reconstruction (each image's mean colour)
    x = err["images"]
    trivial = (x - x.mean(dim=(2, 3), keepdim=True)).pow(2).flatten(1).mean(1)
    assert float(err["mse"].mean()) < 0.5 * float(trivial.mean())


def test_caption_states_are_minilm_states_of_the_names_encoded_once():
    states = CaptionStates(["grinning face", "flag: Japan", "grinning face"])
    a = states(torch.tensor([0, 1]))
    assert a.shape == (2, 24, 384)
    assert torch.equal(states(torch.tensor([2]))[0], a[0])  # same name, same states
    assert not torch.allclose(a[0], a[1])


def test_latent_conditioner_draws_resumable_posterior_latents(vae, tiny):
    ds = EmojiDataset("train", limit=4, data=tiny.data)
    batch = {"pixels": torch.stack([ds[i]["pixels"] for i in range(4)]),
             "prompt_index": torch.tensor([ds[i]["prompt_index"] for i in range(4)])}
    cond = LatentConditioner(vae, tiny.states)
    z1, s1 = cond(batch, torch.device("cpu"), torch.Generator().manual_seed(3))
    z2, _ = cond(batch, torch.device("cpu"), torch.Generator().manual_seed(3))
    z3, _ = cond(batch, torch.device("cpu"), torch.Generator().manual_seed(4))
    assert z1.shape == (4, 4, 8, 8) and s1.shape == (4, 24, 384)
    assert torch.equal(z1, z2) and not torch.equal(z1, z3)


def test_sampling_decodes_through_the_vae_and_the_encoder_cache_skips_encoder_passes(tiny):
    from fcr_sample import (
        EncoderCacheConfig,
        apply_encoder_cache,
        get_cache_stats,
        remove_encoder_cache,
    )

    idx = torch.as_tensor(tiny.data.indices("test")[:3])
    g = torch.Generator().manual_seed(0)
    plain = sample_emoji(tiny, idx, steps=4, generator=g)
    assert plain.shape == (3, 3, 32, 32) and 0 <= float(plain.min()) and float(plain.max()) <= 1
    apply_encoder_cache(tiny.unet, EncoderCacheConfig(stride=2))
    try:
        cached = sample_emoji(tiny, idx, steps=4, generator=torch.Generator().manual_seed(0))
        stats = get_cache_stats(tiny.unet)
        assert stats.unet_calls == 4 and stats.encoder_forwards == 2
    finally:
        remove_encoder_cache(tiny.unet)
    assert cached.shape == plain.shape


def test_fcr_finetune_of_the_emoji_backbone_runs_in_latent_space(tmp_path):
    cfg = FinetuneConfig(model="emoji-tiny", data=DataConfig(kind="emoji", limit=16),
                         train=TrainConfig(output_dir=str(tmp_path / "ft"), max_steps=2, batch_size=4, lr=1e-4,
                                           checkpoint_every=2, hflip=False, progress=False,
                                           fcr=FCRConfig(lam=0.1, delta_max=2)))
    result = finetune(cfg)
    assert result.steps == 2 and result.final_unet is not None
    rec = json.loads((result.run_dir / "config.json").read_text())
    assert rec["conditioner"]["kind"] == "latent" and rec["unet_config"]["in_channels"] == 4
    assert rec["run"]["data"]["n"]["train"] == 3089
    logs = [json.loads(x) for x in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert all(x["l_fcr"] > 0 for x in logs)


def test_emoji_models_refuse_other_data(tmp_path):
    with pytest.raises(ValueError, match="data.kind='emoji'"):
        finetune(FinetuneConfig(model="emoji-tiny", data=DataConfig(kind="fashion-mnist"),
                                train=TrainConfig(output_dir=str(tmp_path / "x"), max_steps=1)))
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize(("model", "data"), [("emoji-tiny", "fashion-mnist"), ("embedded-tiny", "emoji")])
def test_cli_refuses_a_backbone_with_the_other_backbones_data(tmp_path, capsys, model, data):
    from fcr_train.cli import main

    out = tmp_path / "run"
    assert main(["finetune", "--model", model, "--data", data, "--max-steps", "1", "--output-dir", str(out)]) == 2
    assert "the emoji models train on --data emoji" in capsys.readouterr().err
    assert not out.exists()


def _held_out_eps_mse(base, unet, captions: torch.Tensor | None = None) -> float:
    """ε-prediction MSE of ``unet`` on every 8th held-out emoji (posterior-mean latents, fixed noise),
    averaged over t = 100, 300, 500, 700; ``captions`` replaces the names' row indices."""
    from fcr_train.emoji_backbone import encode_images

    idx = torch.as_tensor(base.data.indices("test")[::8])
    pixels = torch.from_numpy(base.data.images("test")[::8]).permute(0, 3, 1, 2).float().div(127.5).sub(1)
    z = encode_images(base.vae, pixels)  # no generator: the posterior mean
    states = base.states(idx if captions is None else captions)
    g = torch.Generator().manual_seed(0)
    losses = []
    with torch.no_grad():
        for t in (100, 300, 500, 700):
            eps = torch.randn(z.shape, generator=g)
            tt = torch.full((len(z),), t)
            pred = unet(base.scheduler.add_noise(z, eps, tt), tt, encoder_hidden_states=states).sample
            losses.append(float((pred - eps).pow(2).mean()))
    return sum(losses) / len(losses)


def test_shipped_unet_denoises_held_out_emoji_and_reads_their_names():
    """The committed UNet (6,000 steps, COMMAND.md): on held-out emoji it predicts the noise far better
    than the same architecture untrained, and better with the emoji's own names than with the names
    shifted to other emoji — the weights are trained and use the captions."""
    from fcr_train.emoji_backbone import load_emoji_base

    base = load_emoji_base()
    record = json.loads((EMOJI_WEIGHTS_DIR / "command.json").read_text())["unet"]
    assert record["steps"] == 6000 and not record["stopped_by_time"]
    own = _held_out_eps_mse(base, base.unet)
    untrained = _held_out_eps_mse(base, build_emoji_unet(seed=0).eval())
    idx = torch.as_tensor(base.data.indices("test")[::8])
    shifted = _held_out_eps_mse(base, base.unet, captions=idx.roll(len(idx) // 2))
    assert own < 0.2 * untrained, (own, untrained)  # 0.127 vs 1.09 at commit
    assert own < 0.6 * shifted, (own, shifted)  # 0.127 vs 0.320 at commit
