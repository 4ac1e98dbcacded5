"""Tiny, randomly initialised checkpoints in the *real* on-disk formats, for tests and offline demos.

The real CLIP and Inception weights cannot be downloaded on the machines this project runs on.
These helpers write stand-ins that the real loaders accept unchanged, so the loading and
preprocessing plumbing of :class:`fcr_eval.metrics.clip_score.CLIPScorer` and
:class:`fcr_eval.metrics.extractors.InceptionExtractor` can run end to end:

- :func:`save_tiny_clip`: a ``transformers`` CLIP checkpoint folder (``CLIPModel`` +
  ``CLIPProcessor``) that ``CLIPModel.from_pretrained`` and ``CLIPScorer`` load offline.
- :func:`save_stand_in_inception`: a TorchScript ``inception-2015-12-05.pt`` with the interface
  clean-fid's ``InceptionV3W`` calls.

Both networks have random weights: numbers computed with them test code paths, never image
quality. Nothing here downloads anything.

Example:
    >>> from fcr_eval.metrics.clip_score import CLIPScorer
    >>> from fcr_eval.metrics.extractors import InceptionExtractor
    >>> scorer = CLIPScorer(save_tiny_clip(tmp_path / "clip"))
    >>> ext = InceptionExtractor(save_stand_in_inception(tmp_path / "inception"))
"""

from __future__ import annotations

from pathlib import Path

import torch
from fcr_sample.testing import write_tiny_clip_vocab
from torch import nn
from torch.nn import functional as F

__all__ = ["save_tiny_clip", "save_stand_in_inception", "StandInInception"]

# Punctuation beyond the base vocabulary's ".,'!?-", so prompts such as "a photo of a t-shirt/top"
# tokenise without the unknown token (which CLIP shares with <|endoftext|>, where it pools).
_EXTRA_VOCAB_CHARS = "/:;()&+\"#%*=_"


def save_tiny_clip(folder: str | Path, *, seed: int = 0, image_size: int = 32,
                   max_length: int = 64, patch_size: int = 8, projection_dim: int = 16,
                   text_tower: dict | None = None, vision_tower: dict | None = None) -> Path:
    """Write a tiny random ``CLIPModel`` and its ``CLIPProcessor`` to ``folder`` and return it.

    Text and vision towers: hidden size 32, 2 layers, 4 heads; ViT patch 8 on ``image_size``²
    inputs; 16-d projections (``text_tower`` / ``vision_tower`` / ``patch_size`` /
    ``projection_dim`` give other shapes: a speed benchmark builds CLIP ViT-L/14's). The tokenizer is a character-level ``CLIPTokenizer`` (lower-case
    letters, digits, common punctuation) with ``model_max_length = max_length``; the image
    processor is ``CLIPImageProcessor`` resizing and centre-cropping to ``image_size``. The
    folder has the layout of a hub CLIP checkpoint (``config.json``, ``model.safetensors``,
    tokenizer and processor files). Random weights: for testing plumbing only.

    Example:
        >>> folder = save_tiny_clip(tmp_path / "tiny-clip")
        >>> CLIPModel.from_pretrained(folder).config.projection_dim
        16
    """
    try:
        from transformers import (
            CLIPConfig,
            CLIPImageProcessor,
            CLIPModel,
            CLIPProcessor,
            CLIPTokenizer,
        )
    except ImportError as e:
        raise ImportError(
            "save_tiny_clip needs transformers: install the extra with "
            "`uv sync --all-packages --extra clip` (or `pip install 'fcr-eval[clip]'`)"
        ) from e
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    write_tiny_clip_vocab(folder, extra_chars=_EXTRA_VOCAB_CHARS)
    tokenizer = CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"),
                              model_max_length=max_length)
    tower = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4)
    config = CLIPConfig(
        text_config=dict(
            **(text_tower or tower),
            vocab_size=len(tokenizer),
            max_position_embeddings=max_length,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        ),
        vision_config=dict(**(vision_tower or tower), image_size=image_size, patch_size=patch_size),
        projection_dim=projection_dim,
    )
    torch.manual_seed(seed)
    model = CLIPModel(config).eval()
    image_processor = CLIPImageProcessor(
        size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size})
    model.save_pretrained(folder)
    CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(folder)
    return folder


class StandInInception(nn.Module):
    """A small random CNN with the TorchScript interface of clean-fid's Inception-v3 file.

    **Not Inception**: its features have nothing to do with Inception's and any FID computed
    from them is meaningless. It exists so the clean-fid plumbing (file loading, ``clean``
    resize, normalisation, feature shapes) can be tested without the real weights.

    Interface, as in ``inception-2015-12-05.pt`` and used by ``cleanfid.InceptionV3W``:

    - ``layers``: ``(B, 3, 299, 299)`` normalised to about [-1, 1] → ``(B, 2048, 1, 1)``
      (non-negative, like Inception's pool3 features), so ``.view((B, 2048))`` works;
    - ``output``: the 1008-way classifier on those features (Inception Score);
    - ``forward(x, return_features)``: ``x`` in [0, 255] of any size, resized to 299² inside;
      returns the 2048-d features or the 1008 logits.
    """

    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.Sequential(
            nn.Conv2d(3, 32, kernel_size=7, stride=6),  # 299 -> 49
            nn.ReLU(),
            nn.Conv2d(32, 64, kernel_size=3, stride=2),  # 49 -> 24
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(4),
            nn.Conv2d(64, 2048, kernel_size=1),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(1),
        )
        self.output = nn.Linear(2048, 1008)

    def forward(self, x: torch.Tensor, return_features: bool = False) -> torch.Tensor:
        x = F.interpolate(x.float(), size=(299, 299), mode="bilinear", align_corners=False)
        features = self.layers((x - 128) / 128).flatten(1)
        if return_features:
            return features
        return self.output(features)


def save_stand_in_inception(folder: str | Path, *, seed: int = 0) -> Path:
    """Write a :class:`StandInInception` as TorchScript ``folder/inception-2015-12-05.pt``.

    Returns the file's path, which :class:`fcr_eval.metrics.extractors.InceptionExtractor` and
    ``cleanfid.inception_torchscript.InceptionV3W(folder, download=False)`` load. Random
    weights of a different, much smaller network: for testing the plumbing only; never
    report numbers computed with it as FID.

    Example:
        >>> InceptionExtractor(save_stand_in_inception(tmp_path)).extract(images).features.shape
        (N, 2048)
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    scripted = torch.jit.script(StandInInception().eval())
    path = folder / "inception-2015-12-05.pt"
    scripted.save(str(path))
    return path
