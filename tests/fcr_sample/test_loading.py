import pytest
import torch
from fcr_sample import ModelNotAvailableError, load_pipeline, load_unet
from fcr_sample.loading import resolve_model_id


def test_offline_hub_id_names_the_model_and_how_to_use_a_local_copy(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    with pytest.raises(ModelNotAvailableError) as err:
        load_unet("sd15")
    msg = str(err.value)
    assert "stable-diffusion-v1-5/stable-diffusion-v1-5" in msg
    assert "--local-dir" in msg and "pass that folder" in msg
    assert "HF_HUB_OFFLINE" in msg


def test_short_names_resolve_and_paths_pass_through():
    assert resolve_model_id("openjourney") == "prompthero/openjourney"
    assert resolve_model_id("/models/x") == "/models/x"


def test_a_saved_pipeline_loads_from_its_folder(tmp_path):
    from fcr_sample.testing import tiny_sd_pipeline

    pipe = tiny_sd_pipeline(seed=0)
    pipe.save_pretrained(tmp_path / "tiny")
    loaded = load_pipeline(tmp_path / "tiny", device="cpu")
    unet = load_unet(tmp_path / "tiny")
    for a, b in zip(pipe.unet.parameters(), unet.parameters(), strict=False):
        assert torch.equal(a, b)
    assert type(loaded.scheduler) is type(pipe.scheduler)


def test_a_missing_local_folder_is_reported(tmp_path):
    with pytest.raises(ModelNotAvailableError, match="cannot load UNet"):
        load_unet(tmp_path / "nothing-here" / "x", local_files_only=True)
