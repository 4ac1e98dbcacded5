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
