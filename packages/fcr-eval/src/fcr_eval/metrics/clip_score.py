"""CLIPScore and CLIP-embedding drift with a local CLIP checkpoint (optional extra ``clip``).

**CLIPScore** (Hessel et al. 2021, https://arxiv.org/abs/2104.08718): per image
``100 · max(cos(E_img, E_txt), 0)``; the reported score is the mean of these per-image scores, so
it agrees with the per-image values used for paired tests. torchmetrics' ``CLIPScore`` runs on
the same model, processor and uint8 images as a cross-check (its value is kept in
:attr:`CLIPScorer.last_torchmetrics_score`). torchmetrics clamps the *mean* cosine at 0 rather
than each image's; the two agree whenever no image has a negative cosine with its prompt (the
case with a real CLIP and real captions) and differ otherwise (common with random test weights).

**CLIP-embedding drift** (a mechanism metric for encoder caching, where a CLIP is available):

    drift_i = 1 − cos(E_img(x_i), E_img(x_i^ref))

where ``x_i`` is sample ``i`` from a cached sampler (FD / FCR at some stride) and ``x_i^ref`` the
sample from the same weights, prompt and initial noise x_T *without* the cache. 0 means the cache
did not move the image in CLIP space; the range is [0, 2]. :func:`clip_embedding_drift` returns
the mean over images and the per-image values; it is symmetric in its two image sets.

No hub access here: ``model_path`` must be a local folder holding a transformers CLIP checkpoint
(``config.json``, weights, tokenizer and processor files). :func:`fcr_eval.testing.save_tiny_clip`
writes a tiny random one for tests. On the embedded default use :mod:`fcr_eval.metrics.class_agreement`.

Example:
    >>> scorer = CLIPScorer("/models/clip-vit-base-patch16")
    >>> mean, per_image = scorer.score(images, prompts)   # images float [0, 1] (N, 3, H, W)
    >>> drift, per_image_drift = clip_embedding_drift(scorer, cached_images, no_cache_images)
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from fcr_eval.metrics.extractors import to_uint8_rgb

__all__ = ["CLIPScorer", "clip_embedding_drift", "embedding_drift"]

logger = logging.getLogger(__name__)

# torchmetrics accepts a (model, processor) loader from 1.7 on; from 1.7 it also refuses a local
# folder path unless the path contains "openai", so a loader is the only way to pass a local folder.
_MIN_TORCHMETRICS = "1.7"


def _projected(out) -> torch.Tensor:
    """The projected embedding from ``get_*_features``: a tensor in transformers 4.x, a
    ``BaseModelOutputWithPooling`` with it in ``pooler_output`` in 5.x."""
    return out if isinstance(out, torch.Tensor) else out.pooler_output


class _CLIPFeatures(torch.nn.Module):
    """A ``CLIPModel`` whose ``get_image_features`` / ``get_text_features`` return tensors on every
    transformers version, which is what torchmetrics' CLIPScore expects."""

    def __init__(self, clip) -> None:
        super().__init__()
        self.clip = clip
        self.config = clip.config  # torchmetrics reads text_config.max_position_embeddings

    def get_image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return _projected(self.clip.get_image_features(pixel_values=pixel_values))

    def get_text_features(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        return _projected(self.clip.get_text_features(input_ids=input_ids, attention_mask=attention_mask))


class CLIPScorer:
    """CLIPScore of images against their prompts with a local CLIP (``metric='clip_score'``), and
    the CLIP image embeddings that :func:`clip_embedding_drift` compares."""

    preprocessing = "u8_rgb_clip-processor"

    def __init__(self, model_path: str | Path, device: str | torch.device = "cpu") -> None:
        path = Path(model_path) if model_path else None
        if path is None or not (path / "config.json").is_file():
            raise FileNotFoundError(
                f"CLIPScore needs a local CLIP checkpoint folder with config.json; {model_path!r} is not one. "
                "Download e.g. openai/clip-vit-base-patch16 on a machine with internet "
                "(huggingface-cli download ...) and pass its folder, or use class agreement on the embedded default")
        try:
            import torchmetrics
            from packaging.version import Version
            from torchmetrics.multimodal.clip_score import CLIPScore
            from transformers import CLIPModel, CLIPProcessor
        except ImportError as e:
            raise ImportError(
                "CLIPScore needs torchmetrics and transformers: install the extra with "
                "`uv sync --all-packages --extra clip` (or `pip install 'fcr-eval[clip]'`)"
            ) from e
        if Version(torchmetrics.__version__) < Version(_MIN_TORCHMETRICS):
            raise ImportError(
                f"CLIPScore with a local checkpoint needs torchmetrics>={_MIN_TORCHMETRICS} (found "
                f"{torchmetrics.__version__}): `uv sync --all-packages --extra clip`")
        self.device = torch.device(device)
        self.model = _CLIPFeatures(CLIPModel.from_pretrained(path, local_files_only=True)).eval().to(self.device)
        self.processor = CLIPProcessor.from_pretrained(path, local_files_only=True)
        self.metric = CLIPScore(model_name_or_path=lambda: (self.model, self.processor)).to(self.device)
        self.name = f"clip:{path.name}"
        self.model_path = str(path)
        #: torchmetrics' CLIPScore of the last :meth:`score` call (clamps the mean, see module doc)
        self.last_torchmetrics_score: float | None = None

    @torch.no_grad()
    def image_embeddings(self, images: torch.Tensor, batch_size: int = 32) -> torch.Tensor:
        """Unit-norm CLIP image embeddings ``(N, D)`` (float32, CPU) of ``(N, 1|3, H, W)`` images,
        float in [0, 1] or uint8; quantised to uint8 RGB first, then the checkpoint's processor.

        Example:
            >>> scorer.image_embeddings(torch.rand(2, 3, 64, 64)).norm(dim=-1)
            tensor([1.0000, 1.0000])
        """
        out = []
        for i in range(0, len(images), batch_size):
            u8 = to_uint8_rgb(images[i : i + batch_size]).cpu()
            pixels = self.processor(images=list(u8), return_tensors="pt")["pixel_values"]
            out.append(self.model.get_image_features(pixels.to(self.device)).float())
        if not out:
            raise ValueError("no images given to the CLIP image encoder")
        e = torch.cat(out)
        return (e / e.norm(dim=-1, keepdim=True)).cpu()

    @torch.no_grad()
    def text_embeddings(self, prompts: list[str], batch_size: int = 32) -> torch.Tensor:
        """Unit-norm CLIP text embeddings ``(N, D)`` (float32, CPU); prompts longer than the
        tokenizer's ``model_max_length`` are truncated with their end token kept.

        Example:
            >>> scorer.text_embeddings(["a cat", "a dog"]).shape[0]
            2
        """
        out = []
        for i in range(0, len(prompts), batch_size):
            tok = self.processor(text=list(prompts[i : i + batch_size]), return_tensors="pt", padding=True,
                                 truncation=True)
            out.append(self.model.get_text_features(tok["input_ids"].to(self.device),
                                                    tok["attention_mask"].to(self.device)).float())
        if not out:
            raise ValueError("no prompts given to the CLIP text encoder")
        e = torch.cat(out)
        return (e / e.norm(dim=-1, keepdim=True)).cpu()

    @torch.no_grad()
    def score(self, images: torch.Tensor, prompts: list[str], batch_size: int = 32) -> tuple[float, torch.Tensor]:
        """Mean CLIPScore and per-image scores ``100 · max(cos, 0)`` (float32, ``(N,)``).

        Example:
            >>> scorer.score(torch.rand(2, 3, 64, 64), ["a cat", "a dog"])[1].shape
            torch.Size([2])
        """
        if len(images) != len(prompts):
            raise ValueError(f"{len(images)} images but {len(prompts)} prompts")
        if len(images) == 0:
            raise ValueError("no images to score")
        cosines = []
        self.metric.reset()
        for i in range(0, len(images), batch_size):
            u8 = to_uint8_rgb(images[i : i + batch_size])
            txt = list(prompts[i : i + batch_size])
            cosines.append((self.image_embeddings(u8, batch_size) * self.text_embeddings(txt, batch_size)).sum(-1))
            self.metric.update(u8.to(self.device), txt)
        cos = torch.cat(cosines)
        scores = 100 * cos.clamp(min=0)
        mean = float(scores.mean())
        self.last_torchmetrics_score = float(self.metric.compute())
        expected = max(100 * float(cos.mean()), 0.0)  # torchmetrics clamps the mean, not each image
        if abs(self.last_torchmetrics_score - expected) > 1e-3 * max(1.0, abs(expected)):
            logger.warning("torchmetrics' CLIPScore %.4f differs from %.4f computed with the same model; "
                           "check the preprocessing (prompts longer than the tokenizer allows?)",
                           self.last_torchmetrics_score, expected)
        return mean, scores

    def describe(self) -> dict[str, str]:
        return {"feature_extractor": self.name, "preprocessing": self.preprocessing, "device": str(self.device)}


def embedding_drift(embeddings: torch.Tensor, reference_embeddings: torch.Tensor) -> torch.Tensor:
    """Per-row ``1 − cos`` between two ``(N, D)`` embedding sets (float64, ``(N,)``, in [0, 2]).

    Example:
        >>> embedding_drift(torch.eye(2), torch.tensor([[1.0, 0.0], [1.0, 0.0]]))
        tensor([0., 1.], dtype=torch.float64)
    """
    if embeddings.shape != reference_embeddings.shape or embeddings.ndim != 2:
        raise ValueError(f"embeddings must both be (N, D) with the same shape, got {tuple(embeddings.shape)} "
                         f"and {tuple(reference_embeddings.shape)}")
    a, b = embeddings.double(), reference_embeddings.double()
    cos = (a * b).sum(-1) / (a.norm(dim=-1) * b.norm(dim=-1))
    return (1 - cos).clamp(0, 2)


def clip_embedding_drift(scorer: CLIPScorer, images: torch.Tensor, reference_images: torch.Tensor,
                         batch_size: int = 32) -> tuple[float, torch.Tensor]:
    """Mean and per-image CLIP-embedding drift ``1 − cos(E_img(images_i), E_img(reference_images_i))``.

    ``images`` are a cached sampler's samples, ``reference_images`` the samples of the same
    weights, prompts and initial noise without the cache, in the same order (see the module
    docstring). 0 means the cache left the image where it was in CLIP space.

    Example:
        >>> mean, per_image = clip_embedding_drift(scorer, cached, no_cache)   # (N, 3, H, W) each
        >>> per_image.shape
        torch.Size([N])
    """
    if len(images) != len(reference_images):
        raise ValueError(f"{len(images)} images but {len(reference_images)} reference images; drift pairs "
                         "each sample with the no-cache sample of the same prompt and noise")
    per_image = embedding_drift(scorer.image_embeddings(images, batch_size),
                                scorer.image_embeddings(reference_images, batch_size))
    return float(per_image.mean()), per_image
