import pytest
import torch
from fcr_sample import encoder_feature_names, encoder_features, select_feature_names
from fcr_sample.testing import tiny_unet
from fcr_sample.unet_parts import prepare_conditioning, run_decoder, run_encoder


@pytest.fixture
def unet():
    return tiny_unet(seed=0)


def _inputs(batch=2):
    g = torch.Generator().manual_seed(1)
    return torch.randn(batch, 4, 16, 16, generator=g), torch.randn(batch, 5, 8, generator=g)


@pytest.mark.parametrize("t", [1, 500, 999])
def test_encoder_then_decoder_is_bit_identical_to_the_unet_forward(unet, t):
    x, text = _inputs()
    with torch.no_grad():
        ref = unet(x, t, encoder_hidden_states=text).sample
        cond = prepare_conditioning(unet, x, t, text)
        out = run_decoder(unet, run_encoder(unet, x, cond), cond)
    assert torch.equal(ref, out)


def test_odd_resolution_uses_forwarded_upsample_sizes(unet):
    g = torch.Generator().manual_seed(2)
    x, text = torch.randn(1, 4, 18, 14, generator=g), torch.randn(1, 5, 8, generator=g)
    with torch.no_grad():
        ref = unet(x, 10, encoder_hidden_states=text).sample
        cond = prepare_conditioning(unet, x, 10, text)
        out = run_decoder(unet, run_encoder(unet, x, cond), cond)
    assert torch.equal(ref, out)


def test_feature_names_are_the_cached_residuals_plus_mid(unet):
    names = encoder_feature_names(unet)
    assert names[0] == "conv_in" and names[-1] == "mid_block"
    x, text = _inputs()
    cond = prepare_conditioning(unet, x, 3, text)
    enc = run_encoder(unet, x, cond)
    assert len(enc.down_block_res_samples) == len(names) - 1  # every cached tensor has a name


def test_block_groups_partition_the_features(unet):
    groups = [select_feature_names(unet, g) for g in ("early", "mid", "late")]
    flat = [n for g in groups for n in g]
    assert sorted(flat) == sorted(encoder_feature_names(unet))
    assert all(groups)
    assert select_feature_names(unet, ["down_blocks.1"]) == [
        "down_blocks.1.resnets.0",
        "down_blocks.1.downsamplers.0",
    ]
    with pytest.raises(ValueError, match="no encoder feature matches"):
        select_feature_names(unet, ["down_blocks.9"])
    with pytest.raises(ValueError, match="unknown block group"):
        select_feature_names(unet, "deep")


def test_encoder_features_are_differentiable_and_touch_only_the_encoder(unet):
    x, text = _inputs()
    feats = encoder_features(unet, x, 100, text)
    sum(f.pow(2).mean() for f in feats.values()).backward()
    assert unet.conv_in.weight.grad is not None and unet.conv_in.weight.grad.abs().sum() > 0
    assert unet.mid_block.resnets[0].conv1.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in unet.up_blocks.parameters())
    assert unet.conv_out.weight.grad is None


def test_encoder_features_match_what_the_full_forward_computes(unet):
    x, text = _inputs()
    seen = {}
    unet.mid_block.register_forward_hook(lambda m, i, o: seen.setdefault("mid", o))
    with torch.no_grad():
        unet(x, 7, encoder_hidden_states=text)
        feats = encoder_features(unet, x, 7, text, blocks=["mid_block"])
    assert torch.equal(feats["mid_block"], seen["mid"])
