"""CLIPScore, CLIP-embedding drift and clean-fid Inception features, run end to end on the tiny
real-format checkpoints of :mod:`fcr_eval.testing` (random weights: plumbing, not quality)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from cleanfid.fid import get_folder_features
from cleanfid.inception_torchscript import InceptionV3W
from cleanfid.resize import build_resizer
from fcr_eval.metrics.clip_score import CLIPScorer, clip_embedding_drift, embedding_drift
from fcr_eval.metrics.extractors import InceptionExtractor, metric_name
from fcr_eval.testing import save_stand_in_inception, save_tiny_clip
from PIL import Image
from torch.nn import functional as F
from torchmetrics.functional.multimodal.clip_score import clip_score as torchmetrics_clip_score
from transformers import CLIPModel, CLIPProcessor

CLASSES = ["t-shirt/top", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag",
           "ankle boot"]
PROMPTS = [f"a photo of a {c}" for c in CLASSES] + [f"a picture of a {c}" for c in CLASSES[:6]]


def _images(n: int, seed: int, channels: int = 3, size: int = 28) -> torch.Tensor:
    return torch.rand(n, channels, size, size, generator=torch.Generator().manual_seed(seed))


def _u8(images: torch.Tensor) -> torch.Tensor:
    return (images * 255).round().to(torch.uint8)


# -- CLIP ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def clip_folder(tmp_path_factory):
    # A folder name without "openai": torchmetrics >= 1.7 refuses such paths as model names.
    return save_tiny_clip(tmp_path_factory.mktemp("ckpt") / "tiny-clip")


@pytest.fixture(scope="module")
def scorer(clip_folder):
    return CLIPScorer(clip_folder)


@pytest.fixture(scope="module")
def hand_cosines(clip_folder):
    """cos(E_img, E_txt) of (image i, PROMPTS[i]) from CLIPModel/CLIPProcessor loaded directly."""
    model = CLIPModel.from_pretrained(clip_folder).eval()
    processor = CLIPProcessor.from_pretrained(clip_folder)
    images = _images(len(PROMPTS), seed=0)
    with torch.no_grad():
        inputs = processor(text=PROMPTS, images=list(_u8(images)), return_tensors="pt", padding=True)
        img = model.get_image_features(pixel_values=inputs["pixel_values"])
        txt = model.get_text_features(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"])
    img, txt = (e if isinstance(e, torch.Tensor) else e.pooler_output for e in (img, txt))
    return images, F.cosine_similarity(img, txt, dim=-1)


def test_tiny_clip_is_a_loadable_clip_checkpoint(clip_folder, scorer):
    assert (clip_folder / "config.json").is_file() and "openai" not in str(clip_folder)
    model = CLIPModel.from_pretrained(clip_folder, local_files_only=True)
    assert model.config.projection_dim == 16 and model.config.vision_config.image_size == 32
    tok = CLIPProcessor.from_pretrained(clip_folder, local_files_only=True).tokenizer
    # every character of the Fashion-MNIST prompts is in the vocabulary: no unknown (= end) token inside
    ids = tok("a photo of a t-shirt/top")["input_ids"]
    assert ids.count(tok.eos_token_id) == 1 and ids[-1] == tok.eos_token_id
    assert scorer.name == "clip:tiny-clip" and scorer.describe()["preprocessing"] == "u8_rgb_clip-processor"


def test_clip_score_equals_hand_computation_and_torchmetrics(scorer, hand_cosines):
    images, cos = hand_cosines
    keep = cos > 0  # where every cosine is positive, the paper's and torchmetrics' means coincide
    assert int(keep.sum()) >= 3, "the seeded tiny CLIP should give several positive cosines"
    imgs, prompts = images[keep], [p for p, k in zip(PROMPTS, keep.tolist(), strict=True) if k]
    mean, per_image = scorer.score(imgs, prompts, batch_size=3)
    torch.testing.assert_close(per_image, 100 * cos[keep], atol=1e-4, rtol=1e-4)
    assert mean == pytest.approx(float(100 * cos[keep].mean()), abs=1e-4)
    with torch.no_grad():
        reference = float(torchmetrics_clip_score(list(_u8(imgs)), prompts,
                                                  model_name_or_path=lambda: (scorer.model, scorer.processor)))
    assert mean == pytest.approx(reference, abs=1e-4)
    assert scorer.last_torchmetrics_score == pytest.approx(reference, abs=1e-4)


def test_clip_score_clamps_each_image_where_torchmetrics_clamps_the_mean(scorer, hand_cosines):
    images, cos = hand_cosines
    assert bool((cos < 0).any()) and bool((cos > 0).any()), "need cosines of both signs"
    mean, per_image = scorer.score(images, PROMPTS)
    torch.testing.assert_close(per_image, 100 * cos.clamp(min=0), atol=1e-4, rtol=1e-4)
    assert (per_image[cos < 0] == 0).all()
    assert mean == pytest.approx(float(per_image.mean()), abs=1e-5)
    assert scorer.last_torchmetrics_score == pytest.approx(max(float(100 * cos.mean()), 0.0), abs=1e-4)
    assert mean > scorer.last_torchmetrics_score


def test_clip_per_image_scores_follow_their_prompts(scorer):
    images, prompts = _images(5, seed=3), PROMPTS[:5]
    mean, per_image = scorer.score(images, prompts, batch_size=2)
    assert per_image.shape == (5,) and per_image.dtype == torch.float32
    assert (per_image >= 0).all() and (per_image <= 100).all()
    # batching does not change the numbers
    torch.testing.assert_close(scorer.score(images, prompts, batch_size=32)[1], per_image)
    # permuting images and prompts together permutes the scores; swapping prompts alone changes them
    perm = [4, 0, 3, 1, 2]
    torch.testing.assert_close(scorer.score(images[perm], [prompts[i] for i in perm])[1], per_image[perm])
    swapped = scorer.score(images, prompts[::-1])[1]
    assert not torch.allclose(swapped, per_image, atol=1e-3)


def test_clip_score_rejects_mismatched_lengths(scorer):
    with pytest.raises(ValueError, match="3 images but 2 prompts"):
        scorer.score(_images(3, seed=4), PROMPTS[:2])


def test_image_embeddings_unit_norm_grayscale_and_uint8(scorer):
    gray = _images(4, seed=5, channels=1)
    e = scorer.image_embeddings(gray, batch_size=3)
    assert e.shape == (4, 16) and e.dtype == torch.float32
    torch.testing.assert_close(e.norm(dim=-1), torch.ones(4))
    torch.testing.assert_close(scorer.image_embeddings(_u8(gray).expand(-1, 3, -1, -1)), e)


# -- CLIP-embedding drift --------------------------------------------------------------------------


def test_drift_of_identical_images_is_zero(scorer):
    images = _images(5, seed=6)
    mean, per_image = clip_embedding_drift(scorer, images, images.clone())
    assert per_image.shape == (5,)
    assert abs(mean) <= 1e-6 and per_image.abs().max() <= 1e-6


def test_drift_is_one_minus_cosine_symmetric_and_sees_a_perturbed_image(scorer):
    reference = _images(4, seed=7)
    cached = reference.clone()
    cached[2] = (cached[2] + 0.3 * torch.randn(cached[2].shape, generator=torch.Generator().manual_seed(8))).clamp(0, 1)
    mean, per_image = clip_embedding_drift(scorer, cached, reference, batch_size=3)
    assert per_image[2] > 1e-4 and per_image[[0, 1, 3]].abs().max() <= 1e-6
    assert mean == pytest.approx(float(per_image.mean()))
    back_mean, back = clip_embedding_drift(scorer, reference, cached)
    torch.testing.assert_close(back, per_image, atol=1e-6, rtol=0)
    assert back_mean == pytest.approx(mean, abs=1e-7)
    a, b = scorer.image_embeddings(cached[2:3]), scorer.image_embeddings(reference[2:3])
    assert float(per_image[2]) == pytest.approx(1 - float(F.cosine_similarity(a, b)), abs=1e-6)


def test_embedding_drift_values_and_errors(scorer):
    e = torch.tensor([[1.0, 0.0], [0.0, 2.0], [3.0, 0.0]])
    r = torch.tensor([[2.0, 0.0], [1.0, 0.0], [-1.0, 0.0]])
    torch.testing.assert_close(embedding_drift(e, r), torch.tensor([0.0, 1.0, 2.0], dtype=torch.float64))
    with pytest.raises(ValueError, match="same shape"):
        embedding_drift(e, r[:2])
    with pytest.raises(ValueError, match="3 images but 2 reference"):
        clip_embedding_drift(scorer, _images(3, seed=9), _images(2, seed=9))


# -- Inception (clean-fid interface, stand-in weights) ---------------------------------------------


@pytest.fixture(scope="module")
def inception_file(tmp_path_factory):
    return save_stand_in_inception(tmp_path_factory.mktemp("inception"))


@pytest.fixture(scope="module")
def inception(inception_file):
    return InceptionExtractor(inception_file)


def test_stand_in_has_the_interface_clean_fid_uses(inception_file):
    assert inception_file.name == "inception-2015-12-05.pt"
    wrapper = InceptionV3W(str(inception_file.parent), download=False, resize_inside=False)
    x = torch.rand(2, 3, 299, 299, generator=torch.Generator().manual_seed(10)) * 255
    with torch.no_grad():
        assert wrapper(x).shape == (2, 2048)
        assert wrapper.layers((x - 128) / 128).view((2, 2048)).shape == (2, 2048)
        base = torch.jit.load(str(inception_file))
        small = _u8(_images(2, seed=11)).float()  # the file also resizes inside (legacy_tensorflow mode)
        features = base(small, return_features=True)
        assert features.shape == (2, 2048) and base(small, False).shape == (2, 1008)
        torch.testing.assert_close(base(small, False), base.output(features))
        torch.testing.assert_close(InceptionV3W(str(inception_file.parent), download=False,
                                                resize_inside=True)(x), base(x, return_features=True))


def test_inception_extractor_features_and_labels(inception):
    out = inception.extract(_images(3, seed=12), batch_size=2)
    assert out.features.shape == (3, 2048) and out.features.dtype == np.float64
    if out.logits is not None:  # the file's 1008-way classifier (``output``) on the pool features
        assert out.logits.shape == (3, 1008)
    assert out.name == "inception" and out.preprocessing == "clean-fid_clean_299"
    assert metric_name("fd", out.name) == "fid_inception" and metric_name("kid", out.name) == "kid_inception"
    assert inception.describe()["feature_extractor"] == "inception"
    assert np.isfinite(out.features).all() and out.features.std(axis=0).max() > 0


def test_inception_extractor_applies_clean_fid_clean_resize(inception):
    images = _images(3, seed=13)
    ours = inception.extract(images).features
    resize = build_resizer("clean")
    resized = np.stack([resize(img) for img in _u8(images).permute(0, 2, 3, 1).numpy()])
    with torch.no_grad():
        by_hand = inception.model(torch.from_numpy(resized).permute(0, 3, 1, 2).float()).double().numpy()
        bilinear = inception.model(F.interpolate(_u8(images).float(), size=(299, 299), mode="bilinear",
                                                 align_corners=False)).double().numpy()
    np.testing.assert_allclose(ours, by_hand, rtol=1e-6, atol=1e-7)
    # the comparison can tell resizers apart: a plain bilinear resize gives other features
    assert np.abs(ours - bilinear).max() > 100 * np.abs(ours - by_hand).max() + 1e-4


def test_inception_grayscale_is_repeated_to_rgb_like_clean_fid_folders(inception, inception_file, tmp_path):
    gray = _u8(_images(4, seed=14, channels=1, size=20))
    ours = inception.extract(gray).features
    np.testing.assert_allclose(ours, inception.extract(gray.expand(-1, 3, -1, -1)).features, rtol=0, atol=0)
    # clean-fid's own folder pipeline on the same pixels saved as grayscale PNGs (it converts to RGB)
    for i, img in enumerate(gray[:, 0].numpy()):
        Image.fromarray(img).save(tmp_path / f"{i:02d}.png")
    wrapper = InceptionV3W(str(inception_file.parent), download=False, resize_inside=False)
    theirs = get_folder_features(str(tmp_path), model=wrapper, num_workers=0, batch_size=3,
                                 device=torch.device("cpu"), mode="clean", verbose=False)
    np.testing.assert_allclose(ours, theirs, rtol=1e-6, atol=1e-7)
    other = gray.clone().expand(-1, 3, -1, -1).contiguous()
    other[:, 1:] = 0
    assert not np.allclose(inception.extract(other).features, ours)
