"""Training datasets: the embedded Fashion-MNIST set and image-caption sets from disk.

Every dataset returns dicts; a batch (see :func:`collate_skip_bad`) holds

* ``pixels``: ``(B, C, H, W)`` float in [-1, 1] (resized + centre-cropped; the random
  horizontal flip happens in the trainer, from its checkpointed generator, so resumes are exact);
* ``caption``: list of strings (``""`` for empty/missing captions: the unconditional prompt);
* ``prompt_index``: ``(B,)`` indices into a fixed prompt list (embedded set only);
* ``n_bad`` / ``bad``: how many items of this batch were unreadable and which.

Unreadable or missing images are *skipped* (the item becomes ``None`` and the collate function
drops it); the trainer counts them and stops with :class:`TooManyBadSamples` past a threshold.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from .embedded import FASHION_MNIST_CLASSES, PROMPT_TEMPLATES, load_fashion_mnist

__all__ = [
    "TooManyBadSamples",
    "BadSampleCounter",
    "FashionMNISTDataset",
    "ImageCaptionDataset",
    "CaptionRecord",
    "load_image",
    "preprocess_image",
    "collate_skip_bad",
]

logger = logging.getLogger(__name__)


class TooManyBadSamples(RuntimeError):
    """More unreadable samples than the configured threshold."""


@dataclass
class BadSampleCounter:
    """Counts skipped samples and raises past ``max_fraction`` of those seen (after ``min_seen``).

    ``max_count`` (if set) is an absolute limit as well.
    """

    max_fraction: float = 0.01
    max_count: int | None = None
    min_seen: int = 200
    seen: int = 0
    bad: int = 0

    def update(self, n_seen: int, n_bad: int, examples: Sequence[str] = ()) -> None:
        self.seen += n_seen
        self.bad += n_bad
        if n_bad:
            logger.warning("skipped %d unreadable sample(s) (%d/%d so far): %s", n_bad, self.bad, self.seen, list(examples)[:3])
        over_count = self.max_count is not None and self.bad > self.max_count
        over_frac = self.seen >= self.min_seen and self.bad > self.max_fraction * self.seen
        if over_count or over_frac:
            raise TooManyBadSamples(
                f"{self.bad} of {self.seen} samples were unreadable or missing (limit: fraction "
                f"{self.max_fraction}, count {self.max_count}); e.g. {list(examples)[:3]}. Fix the data paths "
                "or raise --max-bad-fraction."
            )

    def state_dict(self) -> dict:
        return {"seen": self.seen, "bad": self.bad}

    def load_state_dict(self, state: dict) -> None:
        self.seen, self.bad = int(state["seen"]), int(state["bad"])


def load_image(source, mode: str = "RGB"):
    """Open an image (path, bytes or file object) as a PIL image in ``mode``.

    Wrong modes are converted: palette/LA/RGBA images are composited on white (transparent
    backgrounds would otherwise turn black), 16-bit and CMYK images are converted.
    """
    import io

    from PIL import Image

    if isinstance(source, bytes | bytearray):
        source = io.BytesIO(source)
    img = Image.open(source)
    img.load()
    if img.mode == mode:
        return img
    if img.mode in ("P", "PA"):
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA"):
        background = Image.new("RGBA", img.size, (255, 255, 255, 255))
        img = Image.alpha_composite(background, img.convert("RGBA"))
    elif img.mode.startswith("I;16") or img.mode == "I":
        arr = np.asarray(img, dtype=np.float64)
        img = Image.fromarray((arr / max(arr.max(), 1) * 255).astype(np.uint8))
    return img.convert(mode)


def to_model_range(pixels) -> np.ndarray:
    """8-bit pixels (an array or a PIL image) as float32 in the models' range [-1, 1]: ``x / 127.5 - 1``."""
    return np.asarray(pixels, dtype=np.float32) / 127.5 - 1.0


def preprocess_image(img, resolution: int) -> torch.Tensor:
    """Resize the shorter side to ``resolution`` (bicubic), centre crop, scale to [-1, 1], CHW."""
    from PIL import Image

    w, h = img.size
    s = resolution / min(w, h)
    nw, nh = max(resolution, round(w * s)), max(resolution, round(h * s))
    img = img.resize((nw, nh), Image.BICUBIC)
    left, top = (nw - resolution) // 2, (nh - resolution) // 2
    img = img.crop((left, top, left + resolution, top + resolution))
    arr = to_model_range(img)
    if arr.ndim == 2:
        arr = arr[:, :, None]
    return torch.from_numpy(arr.transpose(2, 0, 1).copy())


def collate_skip_bad(items: list[dict | None]) -> dict:
    """Stack good items; ``None`` items (unreadable) are dropped and counted in ``n_bad``."""
    good = [it for it in items if it is not None and "error" not in it]
    bad = [it["error"] for it in items if it is not None and "error" in it] + ["<unreadable>"] * sum(it is None for it in items)
    batch: dict = {"n_seen": len(items), "n_bad": len(bad), "bad": bad}
    if not good:
        batch["pixels"] = torch.empty(0)
        batch["caption"] = []
        return batch
    batch["pixels"] = torch.stack([it["pixels"] for it in good])
    batch["caption"] = [it.get("caption", "") for it in good]
    if "prompt_index" in good[0]:
        batch["prompt_index"] = torch.tensor([it["prompt_index"] for it in good])
    return batch


class FashionMNISTDataset(torch.utils.data.Dataset):
    """Fashion-MNIST with captions from class-name templates (the embedded default).

    Item ``i`` is image ``i`` with template ``i mod len(templates)``; ``prompt_index`` indexes
    :func:`fcr_train.embedded.class_prompts` (class-major), whose MiniLM states the trainer looks up.

    Args:
        split: ``"train"`` (60k) or ``"test"`` (10k).
        root: folder with the IDX files (default: the Debian package path).
        limit: use only the first ``limit`` images (tests, quick runs).
        classes: restrict to these class indices.
    """

    def __init__(self, split: str = "train", root: str | os.PathLike | None = None, limit: int | None = None,
                 classes: Sequence[int] | None = None, templates: Sequence[str] = PROMPT_TEMPLATES):
        images, labels = load_fashion_mnist(split, root)
        if classes is not None:
            keep = np.isin(labels, list(classes))
            images, labels = images[keep], labels[keep]
        if limit is not None:
            images, labels = images[:limit], labels[:limit]
        # The uint8 images, each scaled to [-1, 1] as it is read: a float copy of the 60k-image train
        # split was 188 MB more resident per fine-tune and ~3 s of page faults to build on 2 cores.
        self.images = images  # (N, 28, 28) uint8, read-only: load_fashion_mnist's decoded array or a part of it
        self.labels = torch.from_numpy(labels)
        self.templates = tuple(templates)
        self.split = split

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict:
        label = int(self.labels[i])
        k = i % len(self.templates)
        return {
            "pixels": torch.from_numpy(to_model_range(self.images[i][None])),
            "caption": self.templates[k].format(FASHION_MNIST_CLASSES[label]),
            "prompt_index": label * len(self.templates) + k,
            "label": label,
        }


@dataclass(frozen=True)
class CaptionRecord:
    """One training pair: where the image is and its caption.

    ``image`` is a path, or ``(tar_path, member_name)`` for webdataset shards.
    """

    image: str | tuple[str, str]
    caption: str


class ImageCaptionDataset(torch.utils.data.Dataset):
    """Image-caption pairs from :class:`CaptionRecord`s (all the on-disk formats end up here).

    Unreadable or missing images give ``None`` (skipped and counted); empty or missing captions
    become ``""`` (the unconditional prompt) and are counted in :attr:`empty_captions`.
    """

    def __init__(self, records: Sequence[CaptionRecord], resolution: int = 512, mode: str = "RGB", name: str = "images"):
        if not records:
            raise ValueError(f"{name}: no image-caption records found; check the dataset path and format")
        self.records = list(records)
        self.resolution, self.mode, self.name = resolution, mode, name
        self.empty_captions = sum(1 for r in self.records if not (r.caption or "").strip())
        if self.empty_captions:
            logger.warning("%s: %d of %d captions are empty; they train as the unconditional prompt",
                           name, self.empty_captions, len(self.records))

    def __len__(self) -> int:
        return len(self.records)

    def require_readable(self, probe: int = 32) -> None:
        """Fail before any training when none of the first ``probe`` samples can be read.

        A wrong ``images_dir``, missing files or files that are not images would otherwise start
        a run (run folder, ``config.json``, ``train.log``) that stops at its bad-sample limit.

        Raises:
            TooManyBadSamples: with examples of what failed and what to check.
        """
        n = min(probe, len(self.records))
        errors = [item["error"] for item in (self[i] for i in range(n)) if "error" in item]
        if n and len(errors) == n:
            raise TooManyBadSamples(
                f"{self.name}: none of the first {n} images could be read (missing or not images), "
                f"e.g. {errors[:3]}. Check --data-path and --images-dir (image names are relative to "
                "--images-dir); nothing was trained or written")

    def _tar(self, path: str):
        """Open shards once per process (DataLoader workers each get their own handles)."""
        import tarfile

        if getattr(self, "_tar_pid", None) != os.getpid():
            self._tars, self._tar_pid = {}, os.getpid()
        if path not in self._tars:
            self._tars[path] = tarfile.open(path)
        return self._tars[path]

    def __getstate__(self):
        state = dict(self.__dict__)
        state.pop("_tars", None)
        state.pop("_tar_pid", None)
        return state

    def _read(self, image):
        if isinstance(image, tuple):
            member = self._tar(image[0]).extractfile(image[1])
            if member is None:
                raise FileNotFoundError(f"{image[1]} not in {image[0]}")
            return load_image(member.read(), self.mode)
        return load_image(image, self.mode)

    def __getitem__(self, i: int) -> dict | None:
        rec = self.records[i]
        try:
            pixels = preprocess_image(self._read(rec.image), self.resolution)
        except Exception as exc:  # noqa: BLE001 - any decode failure means "skip this sample"
            where = rec.image if isinstance(rec.image, str) else "::".join(rec.image)
            logger.debug("unreadable image %s: %s", where, exc)
            return {"error": f"{where}: {type(exc).__name__}"}
        return {"pixels": pixels, "caption": (rec.caption or "").strip()}
