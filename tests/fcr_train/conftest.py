"""Tiny seeded models from config dicts (diffusers style); nothing here needs shipped weights."""

import pytest
import torch
from diffusers import DDPMScheduler, UNet2DConditionModel

TINY = {
    "sample_size": 8,
    "in_channels": 1,
    "out_channels": 1,
    "block_out_channels": (4, 8),
    "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D"),
    "up_block_types": ("CrossAttnUpBlock2D", "UpBlock2D"),
    "layers_per_block": 1,
    "cross_attention_dim": 8,
    "attention_head_dim": 2,
    "norm_num_groups": 4,
}


@pytest.fixture(autouse=True)
def _threads():
    torch.set_num_threads(1)  # determinism + the machine is shared


@pytest.fixture
def tiny_unet():
    torch.manual_seed(0)
    return UNet2DConditionModel(**TINY)


@pytest.fixture
def scheduler():
    return DDPMScheduler(num_train_timesteps=100, beta_schedule="squaredcos_cap_v2")


@pytest.fixture
def batch():
    g = torch.Generator().manual_seed(1)
    x0 = torch.rand(3, 1, 8, 8, generator=g) * 2 - 1
    text = torch.randn(3, 4, 8, generator=g)
    return x0, text
