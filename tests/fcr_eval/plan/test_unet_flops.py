"""The plan's FLOPs of a Stable Diffusion UNet come from its config alone: the count equals torch's
flop counter on the built UNet (tiny configs), and the shipped configs give design.md §2's figures."""

from __future__ import annotations

import sys

import pytest
from fcr_eval.plan.unet_flops import shipped_unet_config, unet_config_for, unet_flops
from fcr_sample.vocabulary import MODEL_IDS

TINY_CONFIGS = [
    dict(block_out_channels=(32, 64), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
         up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=16, layers_per_block=2,
         norm_num_groups=8, attention_head_dim=4, sample_size=16),
    dict(block_out_channels=(16, 32, 32), down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D",
                                                            "DownBlock2D"),
         up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=24,
         layers_per_block=1, norm_num_groups=8, attention_head_dim=(2, 4, 4), use_linear_projection=True,
         sample_size=16),
]


@pytest.mark.parametrize("cfg", TINY_CONFIGS, ids=["sd15-like", "sd21-like"])
@pytest.mark.parametrize("latent", [16, 8])
def test_count_equals_torch_flop_counter(cfg, latent):
    import torch
    from diffusers import UNet2DConditionModel
    from fcr_sample.benchmark import flop_split

    torch.manual_seed(0)
    unet = UNet2DConditionModel(**cfg).eval()
    tokens = 7
    measured = flop_split(unet, torch.randn(1, 4, latent, latent), torch.randn(1, tokens, cfg["cross_attention_dim"]))
    counted = unet_flops(dict(cfg), latent, text_tokens=tokens)
    assert counted.total == measured.total
    assert counted.encoder == measured.encoder


def test_shipped_configs_give_the_design_figures():
    sd15 = unet_flops(shipped_unet_config("sd15"), 64)
    assert sd15.total == pytest.approx(803e9, rel=0.01)           # design.md §2: ≈ 803 GFLOPs at 64×64
    assert sd15.encoder_share == pytest.approx(0.33, abs=0.01)   # encoder ≈ 33 %
    assert unet_flops(shipped_unet_config("openjourney"), 64).total == sd15.total  # SD v1.5 architecture
    sd21 = shipped_unet_config("stabilityai/stable-diffusion-2-1")  # by hub id too
    assert sd21["cross_attention_dim"] == 1024 and sd21["use_linear_projection"]
    # more cross-attention width, and (96/64)² the tokens at 768²
    assert unet_flops(sd21, 96).total > sd15.total * (96 / 64) ** 2
    assert set(MODEL_IDS) == {"sd15", "sd21", "openjourney"}


def test_a_local_folder_config_is_read_and_unknown_parts_are_not_guessed(tmp_path):
    (tmp_path / "unet").mkdir()
    (tmp_path / "unet" / "config.json").write_text('{"block_out_channels": [8], "down_block_types": ["X"], '
                                                   '"up_block_types": ["Y"], "cross_attention_dim": 4}')
    cfg, where = unet_config_for(str(tmp_path))
    assert str(tmp_path) in where
    assert unet_flops(cfg, 8) is None  # a block type the count does not model
    assert unet_config_for(str(tmp_path / "nope")) is None


def test_counting_imports_no_torch():
    import subprocess

    code = ("import sys; from fcr_eval.plan.unet_flops import unet_flops, shipped_unet_config; "
            "unet_flops(shipped_unet_config('sd15'), 64); print('torch' in sys.modules)")
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).stdout.strip() == "False"
