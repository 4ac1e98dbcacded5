"""Tiny seeded models from config dicts (diffusers style); nothing here needs shipped weights."""

import pytest
import torch
from diffusers import DDPMScheduler, UNet2DConditionModel
from fcr_train.embedded import TINY_UNET_CONFIG
from fcr_train.trainer import EmbeddedConditioner

TINY = dict(TINY_UNET_CONFIG)  # block_out_channels (4, 8), cross_attention_dim 8


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


def new_tiny_unet():
    """A fresh tiny UNet with the fixture's weights (for tests that train several)."""
    torch.manual_seed(0)
    return UNet2DConditionModel(**TINY)


def tiny_conditioner():
    """Seeded text states for 40 prompts of the tiny UNet (8-d), and a zero null prompt."""
    g = torch.Generator().manual_seed(5)
    return EmbeddedConditioner(torch.randn(40, 4, 8, generator=g), torch.zeros(1, 4, 8))
