"""CLIPScore through torchmetrics with a local CLIP checkpoint (optional extra ``clip``).

CLIPScore = 100 · max(cos(E_img, E_txt), 0), averaged over images (Hessel et al. 2021,
https://arxiv.org/abs/2104.08718). torchmetrics' ``CLIPScore`` computes it; the per-image scores
(for paired tests across variations) come from the same model and processor.

No hub access here: ``model_path`` must be a local folder holding a transformers CLIP checkpoint
(``config.json``, weights, tokenizer and processor files). On the embedded default use
:mod:`fcr_eval.class_agreement` instead.

Example:
    >>> scorer = CLIPScorer("/models/clip-vit-base-patch16")
    >>> mean, per_image = scorer.score(images, prompts)   # images float [0, 1] (N, 3, H, W)
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from .extractors import to_uint8_rgb

__all__ = ["CLIPScorer"]

logger = logging.getLogger(__name__)


class CLIPScorer:
    """CLIPScore of images against their prompts with a local CLIP (``metric='clip_score'``)."""

    preprocessing = "u8_rgb_clip-processor"

    def __init__(self, model_path: str | Path, device: str | torch.device = "cpu") -> None:
        path = Path(model_path) if model_path else None
        if path is None or not (path / "config.json").is_file():
            raise FileNotFoundError(
                f"CLIPScore needs a local CLIP checkpoint folder with config.json; {model_path!r} is not one. "
                "Download e.g. openai/clip-vit-base-patch16 on a machine with internet "
                "(huggingface-cli download ...) and pass its folder, or use class agreement on the embedded default")
        try:
            from torchmetrics.multimodal.clip_score import CLIPScore
        except ImportError as e:
            raise ImportError(
                "CLIPScore needs torchmetrics and transformers: install the extra with "
                "`uv sync --all-packages --extra clip` (or `pip install 'fcr-eval[clip]'`)"
            ) from e
        self.device = torch.device(device)
        self.metric = CLIPScore(model_name_or_path=str(path)).to(self.device)
        self.name = f"clip:{path.name}"
        self.model_path = str(path)

    @torch.no_grad()
    def score(self, images: torch.Tensor, prompts: list[str], batch_size: int = 32) -> tuple[float, torch.Tensor]:
        """Mean CLIPScore (torchmetrics) and per-image scores, same formula, same model.

        Example:
            >>> scorer.score(torch.rand(2, 3, 64, 64), ["a cat", "a dog"])[1].shape
            torch.Size([2])
        """
        if len(images) != len(prompts):
            raise ValueError(f"{len(images)} images but {len(prompts)} prompts")
        model, processor = self.metric.model, self.metric.processor
        per_image = []
        self.metric.reset()
        for i in range(0, len(images), batch_size):
            imgs = to_uint8_rgb(images[i : i + batch_size]).to(self.device)
            txt = list(prompts[i : i + batch_size])
            self.metric.update(imgs, txt)
            inputs = processor(text=txt, images=list(imgs.cpu()), return_tensors="pt", padding=True,
                               truncation=True)
            inputs = {k: v.to(self.device) for k, v in inputs.items()}
            img_e = model.get_image_features(pixel_values=inputs["pixel_values"])
            txt_e = model.get_text_features(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"])
            img_e = img_e / img_e.norm(dim=-1, keepdim=True)
            txt_e = txt_e / txt_e.norm(dim=-1, keepdim=True)
            per_image.append((100 * (img_e * txt_e).sum(-1)).clamp(min=0).cpu())
        mean = float(self.metric.compute())
        scores = torch.cat(per_image)
        if abs(float(scores.mean()) - mean) > 1e-2 * max(1.0, abs(mean)):
            logger.warning("per-image CLIPScores (mean %.3f) differ from torchmetrics' %.3f", float(scores.mean()), mean)
        return mean, scores

    def describe(self) -> dict[str, str]:
        return {"feature_extractor": self.name, "preprocessing": self.preprocessing, "device": str(self.device)}
