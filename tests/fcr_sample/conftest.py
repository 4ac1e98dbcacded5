import pytest
import torch
from fcr_sample.testing import tiny_sd_pipeline


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    yield


@pytest.fixture
def make_pipe():
    """A fresh tiny StableDiffusionPipeline per call (schedulers are stateful)."""

    def make(scheduler: str = "ddim"):
        return tiny_sd_pipeline(seed=0, scheduler=scheduler)

    return make


@pytest.fixture
def denoise_inputs():
    """``(x_T, cond, null)`` for a tiny pipeline: seeded noise and CFG text states for a batch."""

    def make(pipe, batch: int = 2, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        x_T = torch.randn((batch, 4, 16, 16), generator=g)
        cond, null = pipe.encode_prompt(["a photo of a shirt"] * batch, "cpu", 1, True, [""] * batch)
        return x_T, cond, null

    return make
