"""The second embedded backbone: a latent, RGB, captioned model of Stable Diffusion's family.

Stable Diffusion is a latent model: a VAE (``diffusers.AutoencoderKL``) maps images to 4-channel
latents, a ``UNet2DConditionModel`` with cross-attention at several resolutions denoises them
conditioned on a text encoder's token states, and sampling decodes the final latents through the
VAE. This module builds the same stack at a size 2 CPU cores can train, on the emoji set
(:mod:`fcr_train.emoji`: Noto colour emoji, Unicode names as captions):

=============  ==================================================================================
images         32×32 RGB in [-1, 1]
VAE            ``AutoencoderKL`` (:data:`EMOJI_VAE_CONFIG`, 0.95M parameters), factor 4 → 8×8×4
               latents (LDM-4's factor; SD uses 8 at 512²), KL-regularised, ``scaling_factor`` set
               to 1 / std of the training latents as SD's 0.18215 was
UNet           ``UNet2DConditionModel`` on 8×8×4 latents (:data:`EMOJI_UNET_CONFIG`): cross-attention
               at 8×8 and 4×4 in both paths and in the 2×2 mid block; 0.219 GFLOPs per forward
text           all-MiniLM-L6-v2 token states (24 tokens × 384) of the emoji's name, as the first
               backbone
noise          SD v1's schedule: DDPM 1000 steps, ``scaled_linear`` 0.00085 → 0.012, ε-prediction
=============  ==================================================================================

The committed weights live in ``fcr_train/weights/emoji/`` (``vae/``, ``unet/``, ``command.json``,
``COMMAND.md``, figures); ``python -m fcr_train.emoji_backbone vae|unet`` makes them.

Example:
    >>> base = load_emoji_base()
    >>> idx = torch.as_tensor(base.data.indices("test")[:8])     # entries whose names are the prompts
    >>> images = sample_emoji(base, idx, steps=20)                  # (8, 3, 32, 32) in [0, 1]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .emoji import EMOJI_GROUPS, EmojiDataset, EmojiSet, load_emoji_set

__all__ = [
    "EMOJI_VAE_CONFIG",
    "EMOJI_UNET_CONFIG",
    "TINY_EMOJI_UNET_CONFIG",
    "EMOJI_SCHEDULER_CONFIG",
    "EMOJI_TEXT_MAX_LENGTH",
    "EMOJI_WEIGHTS_DIR",
    "CaptionStates",
    "LatentConditioner",
    "EmojiBase",
    "build_vae",
    "build_emoji_unet",
    "make_emoji_scheduler",
    "load_emoji_vae",
    "load_emoji_base",
    "encode_images",
    "decode_latents",
    "sample_emoji",
    "reconstruction_error",
    "train_vae",
]

logger = logging.getLogger(__name__)

EMOJI_VAE_CONFIG: dict = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ("DownEncoderBlock2D",) * 3,
    "up_block_types": ("UpDecoderBlock2D",) * 3,
    "block_out_channels": (32, 64, 64),
    "layers_per_block": 1,
    "latent_channels": 4,
    "norm_num_groups": 16,
    "sample_size": 32,
}

# 6.29M parameters (most in the 384-d cross-attention projections), 0.219 GFLOPs per forward on one
# 8×8×4 latent with 24 text tokens (torch.utils.flop_counter; asserted in the tests): the first
# backbone's 0.278 GFLOPs at 28², so a fine-tune costs about the same here.
EMOJI_UNET_CONFIG: dict = {
    "sample_size": 8,
    "in_channels": 4,
    "out_channels": 4,
    "block_out_channels": (64, 128, 128),
    "down_block_types": ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    "mid_block_type": "UNetMidBlock2DCrossAttn",
    "layers_per_block": 1,
    "cross_attention_dim": 384,
    "attention_head_dim": 8,
    "norm_num_groups": 16,
}

# For tests: the same layout (cross-attention at two resolutions), trains in milliseconds.
TINY_EMOJI_UNET_CONFIG: dict = {
    "sample_size": 8,
    "in_channels": 4,
    "out_channels": 4,
    "block_out_channels": (8, 16),
    "down_block_types": ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    "up_block_types": ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    "layers_per_block": 1,
    "cross_attention_dim": 384,
    "attention_head_dim": 4,
    "norm_num_groups": 4,
}

#: Stable Diffusion v1's training noise schedule.
EMOJI_SCHEDULER_CONFIG: dict = {
    "num_train_timesteps": 1000,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "prediction_type": "epsilon",
    "clip_sample": False,
}

#: Emoji names are at most 21 word pieces with MiniLM's tokenizer (emoji-test.txt of Unicode 15.0).
EMOJI_TEXT_MAX_LENGTH = 24
EMOJI_WEIGHTS_DIR = Path(__file__).parent / "weights" / "emoji"


def build_vae(config: dict | None = None, seed: int = 0):
    """A freshly initialised ``AutoencoderKL`` (seeded)."""
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return AutoencoderKL(**dict(config or EMOJI_VAE_CONFIG))


def build_emoji_unet(config: dict | None = None, seed: int = 0):
    """A freshly initialised latent ``UNet2DConditionModel`` (seeded)."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    return UNet2DConditionModel(**dict(config or EMOJI_UNET_CONFIG))


def make_emoji_scheduler(kind: str = "ddpm", **overrides):
    """SD v1's noise schedule (``ddpm`` for training, ``ddim`` for sampling)."""
    from diffusers import DDIMScheduler, DDPMScheduler

    cfg = {**EMOJI_SCHEDULER_CONFIG, **overrides}
    if kind == "ddpm":
        return DDPMScheduler(**cfg)
    if kind == "ddim":
        return DDIMScheduler(**cfg, set_alpha_to_one=False)
    raise ValueError(f"scheduler kind must be 'ddpm' or 'ddim', got {kind!r}")


def _missing_weights(path: Path, what: str, command: str) -> FileNotFoundError:
    return FileNotFoundError(f"no {what} at {path} (config.json missing). Make them with `{command}` "
                             "(see packages/fcr-train/src/fcr_train/weights/emoji/COMMAND.md) or pass a folder "
                             "written by save_pretrained.")


def load_emoji_vae(path: str | os.PathLike | None = None):
    """The shipped ``AutoencoderKL`` (or the one at ``path``), eval mode, frozen."""
    from diffusers import AutoencoderKL

    path = Path(path) if path else EMOJI_WEIGHTS_DIR / "vae"
    if not (path / "config.json").is_file():
        raise _missing_weights(path, "emoji VAE weights", "uv run python -m fcr_train.emoji_backbone vae")
    vae = AutoencoderKL.from_pretrained(path).eval()
    vae.requires_grad_(False)
    return vae


@torch.no_grad()
def encode_images(vae, pixels: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Images in [-1, 1] → scaled latents (a draw from the posterior; its mean without ``generator``)."""
    dist = vae.encode(pixels.to(next(vae.parameters()).device)).latent_dist
    z = dist.mean if generator is None else \
        dist.mean + dist.std * torch.randn(dist.mean.shape, generator=generator).to(dist.mean.device)
    return z * vae.config.scaling_factor


def decode_latents(vae, z: torch.Tensor) -> torch.Tensor:
    """Scaled latents → images in [0, 1] (the path SD's pipeline takes; differentiable)."""
    img = vae.decode(z.to(next(vae.parameters()).dtype) / vae.config.scaling_factor).sample
    return (img.float().clamp(-1, 1) + 1) / 2


class CaptionStates:
    """MiniLM token states of the emoji names, encoded on first use and kept (index = entry index)."""

    def __init__(self, captions: list[str], encoder=None, max_length: int = EMOJI_TEXT_MAX_LENGTH):
        from .text import MiniLMTextEncoder

        self.captions = list(captions)
        self.encoder = encoder or MiniLMTextEncoder(max_length=max_length)
        self.null_states = self.encoder([""])[0]
        self._table = torch.zeros(len(captions), max_length, self.encoder.dim)
        self._done = torch.zeros(len(captions), dtype=torch.bool)

    def __call__(self, index: torch.Tensor) -> torch.Tensor:
        index = torch.as_tensor(index).long().cpu()
        todo = torch.unique(index[~self._done[index]]).tolist()
        for i in range(0, len(todo), 128):
            chunk = todo[i : i + 128]
            self._table[chunk] = self.encoder([self.captions[j] for j in chunk])
            self._done[chunk] = True
        return self._table[index]


class LatentConditioner:
    """Batch → ``(VAE latents, MiniLM token states)`` for the trainer, VAE and text encoder frozen.

    Latents are a posterior draw from the trainer's generator (CPU), so a resumed run sees the
    same latents, as :class:`fcr_train.models.SDConditioner` does for Stable Diffusion.
    """

    def __init__(self, vae, states: CaptionStates):
        self.vae, self.states = vae, states

    @property
    def null_states(self) -> torch.Tensor:
        return self.states.null_states

    def __call__(self, batch: dict, device: torch.device, generator: torch.Generator | None = None):
        self.vae.to(device)
        z = encode_images(self.vae, batch["pixels"], generator=generator or torch.Generator().manual_seed(0))
        return z.float(), self.states(batch["prompt_index"]).to(device)

    def describe(self) -> dict:
        return {"kind": "latent", "vae_scaling_factor": float(self.vae.config.scaling_factor),
                "text": f"all-MiniLM-L6-v2 token states, max_length {self.states._table.shape[1]}"}


@dataclass
class EmojiBase:
    """The second embedded backbone and its conditioning.

    Attributes:
        unet: latent ``UNet2DConditionModel`` (eval, CPU); vae: frozen ``AutoencoderKL``;
        scheduler: DDPM training scheduler; data: the :class:`~fcr_train.emoji.EmojiSet` (split, names);
        states: :class:`CaptionStates` over every entry's name; classes: the Unicode groups;
        weights_path / provenance: where the UNet came from and its ``command.json``.
    """

    unet: torch.nn.Module
    vae: torch.nn.Module
    scheduler: object
    data: EmojiSet
    states: CaptionStates
    classes: tuple[str, ...] = EMOJI_GROUPS
    weights_path: Path | None = None
    provenance: dict = field(default_factory=dict)

    @property
    def null_states(self) -> torch.Tensor:
        return self.states.null_states


def load_emoji_base(weights: str | os.PathLike | None = None, *, random_init: bool = False,
                    unet_config: dict | None = None, vae: str | os.PathLike | None = None) -> EmojiBase:
    """The emoji backbone: the shipped VAE and UNet (default) or a UNet folder ``weights``.

    Args:
        weights: a UNet folder written by ``save_pretrained`` (a fine-tune's ``final_unet``);
            default ``fcr_train/weights/emoji/unet``.
        random_init: a fresh UNet of ``unet_config`` (default :data:`EMOJI_UNET_CONFIG`) on the
            shipped VAE (pretraining, tests).
        vae: a VAE folder (default ``fcr_train/weights/emoji/vae``).

    Raises:
        FileNotFoundError: weights missing, with the command that makes them; or the Debian
            packages of the data are missing.
    """
    from diffusers import UNet2DConditionModel

    provenance: dict = {}
    if random_init:
        unet, path = build_emoji_unet(unet_config), None
    else:
        path = Path(weights) if weights else EMOJI_WEIGHTS_DIR / "unet"
        if not (path / "config.json").is_file():
            raise _missing_weights(path, "emoji UNet weights", "uv run python -m fcr_train.emoji_backbone unet")
        unet = UNet2DConditionModel.from_pretrained(path)
        record = EMOJI_WEIGHTS_DIR / "command.json"
        if weights is None and record.is_file():
            provenance = json.loads(record.read_text()).get("unet", {})
    data = load_emoji_set()
    return EmojiBase(unet=unet.eval(), vae=load_emoji_vae(vae), scheduler=make_emoji_scheduler("ddpm"), data=data,
                     states=CaptionStates(data.all_captions()), weights_path=path, provenance=provenance)


@torch.no_grad()
def sample_emoji(base: EmojiBase, entry_index: torch.Tensor, *, steps: int = 20, guidance_scale: float = 2.0,
                 generator: torch.Generator | None = None, scheduler=None, unet=None) -> torch.Tensor:
    """DDIM samples for the names of ``entry_index`` (rows of ``base.data.entries``), decoded by the
    VAE: images ``(N, 3, 32, 32)`` in [0, 1]. A plain loop calling ``unet(...)`` once per step, so
    fcr-sample caches applied to the bare UNet work."""
    from fcr_sample import denoise

    unet = unet or base.unet
    cfg = unet.config
    n = len(entry_index)
    x = torch.randn((n, cfg.in_channels, cfg.sample_size, cfg.sample_size), generator=generator)
    cond = base.states(entry_index)
    x = denoise(unet, scheduler or make_emoji_scheduler("ddim"), x, cond, base.null_states.expand(n, -1, -1),
                steps=steps, guidance_scale=guidance_scale, generator=generator)
    return decode_latents(base.vae, x)


@torch.no_grad()
def reconstruction_error(vae, images_u8: torch.Tensor | object, batch_size: int = 128) -> dict:
    """Per-image reconstruction error of ``vae`` (posterior mean, decoded) on uint8 ``(N, H, W, 3)``.

    Returns ``{"mse": (N,), "psnr": (N,)}`` on [0, 1] pixels, and the reconstructions in [0, 1].
    """
    x = torch.as_tensor(images_u8).permute(0, 3, 1, 2).float().div(255)
    recs = []
    for i in range(0, len(x), batch_size):
        z = encode_images(vae, x[i : i + batch_size] * 2 - 1)
        recs.append(decode_latents(vae, z).cpu())
    rec = torch.cat(recs)
    mse = (rec - x).pow(2).flatten(1).mean(1)
    return {"mse": mse, "psnr": -10 * torch.log10(mse.clamp_min(1e-10)), "reconstructions": rec, "images": x}


def save_image_rows(rows: list[torch.Tensor], labels: list[str], path: Path, scale: int = 3,
                    title: str | None = None) -> Path:
    """Rows of RGB images in [0, 1] (each ``(N, 3, H, W)``) as one labelled PNG."""
    from PIL import Image, ImageDraw

    pad, label_w, top = 2, 112, 18 if title else 0
    n = max(len(r) for r in rows)
    h, w = rows[0].shape[-2] * scale, rows[0].shape[-1] * scale
    grid = Image.new("RGB", (label_w + n * (w + pad), top + len(rows) * (h + pad)), "white")
    draw = ImageDraw.Draw(grid)
    if title:
        draw.text((4, 3), title, fill="black")
    for r, (imgs, label) in enumerate(zip(rows, labels, strict=True)):
        y = top + r * (h + pad)
        draw.text((4, y + h // 2 - 6), label[:18], fill="black")
        arr = (imgs.clamp(0, 1).permute(0, 2, 3, 1).numpy() * 255).round().astype("uint8")
        for j, a in enumerate(arr):
            grid.paste(Image.fromarray(a).resize((w, h), Image.NEAREST), (label_w + j * (w + pad), y))
    path.parent.mkdir(parents=True, exist_ok=True)
    grid.save(path)
    return path


# ------------------------------------------------------------------------------------------------
# Training the VAE
# ------------------------------------------------------------------------------------------------


def _vae_loss(vae, x: torch.Tensor, kl_weight: float, g: torch.Generator) -> tuple[torch.Tensor, dict]:
    dist = vae.encode(x).latent_dist
    z = dist.mean + dist.std * torch.randn(dist.mean.shape, generator=g)
    rec = vae.decode(z).sample
    l1 = (rec - x).abs().mean()
    mse = (rec - x).pow(2).mean()
    kl = dist.kl().mean() / z[0].numel()
    return l1 + mse + kl_weight * kl, {"l1": l1.item(), "mse": mse.item(), "kl_per_dim": kl.item()}


def train_vae(out: str | os.PathLike, *, steps: int = 1500, batch_size: int = 32, lr: float = 1e-3,
              kl_weight: float = 1e-4, seed: int = 0, max_minutes: float | None = None,
              checkpoint_every: int = 100, command: str = "", progress: bool = True) -> dict:
    """Train the emoji ``AutoencoderKL`` on the training split and write ``out/`` (save_pretrained).

    Loss per pixel: L1 + MSE of the decoded posterior draw, plus ``kl_weight`` × the KL to N(0, I)
    per latent dimension (SD's VAE adds LPIPS and a patch GAN; at 32² and this budget a pixel loss
    is what fits). Random horizontal flips. AdamW with cosine decay. Resumes from ``out/train_state.pt``
    (model, optimiser, step, RNG) when it exists; writes it every ``checkpoint_every`` steps.
    After training, ``scaling_factor`` is set to 1 / std of the training latents (SD's rule) and the
    held-out reconstruction error is measured.

    Returns:
        the record written to ``out/training.json``.
    """
    from tqdm.auto import tqdm

    from .provenance import run_provenance

    out = Path(out)
    data = load_emoji_set()
    train_set = EmojiDataset("train", data=data)
    x_all = train_set.pixels
    out.mkdir(parents=True, exist_ok=True)
    state_path = out / "train_state.pt"
    torch.manual_seed(seed)
    vae = build_vae(seed=seed)
    opt = torch.optim.AdamW(vae.parameters(), lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / 50) * 0.5 * (1 + torch.cos(torch.tensor(torch.pi * min(s, steps) / steps)).item()))
    g = torch.Generator().manual_seed(seed)
    step, history, wall = 0, [], 0.0
    if state_path.is_file():
        st = torch.load(state_path, weights_only=False)
        vae.load_state_dict(st["vae"])
        opt.load_state_dict(st["opt"])
        sched.load_state_dict(st["sched"])
        g.set_state(st["rng"])
        step, history, wall = st["step"], st["history"], st["wall"]
        logger.info("resumed VAE training at step %d", step)
    t0 = time.time() - wall
    bar = tqdm(total=steps, initial=step, desc="emoji VAE", disable=not progress, dynamic_ncols=True)
    vae.train()
    while step < steps:
        idx = torch.randint(0, len(x_all), (batch_size,), generator=g)
        x = x_all[idx]
        flip = torch.rand(batch_size, generator=g) < 0.5
        x = torch.where(flip[:, None, None, None], x.flip(-1), x)
        loss, logs = _vae_loss(vae, x, kl_weight, g)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        sched.step()
        step += 1
        history.append({"step": step, "loss": loss.item(), **logs})
        bar.update(1)
        bar.set_postfix(l1=f"{logs['l1']:.4f}", kl=f"{logs['kl_per_dim']:.2f}")
        if step % 50 == 0 or step == 1:
            logger.info("VAE step %d: loss %.5f l1 %.5f mse %.5f kl/dim %.3f (%.0f s)", step, loss.item(),
                        logs["l1"], logs["mse"], logs["kl_per_dim"], time.time() - t0)
        stop = max_minutes is not None and time.time() - t0 > 60 * max_minutes
        if step % checkpoint_every == 0 or step == steps or stop:
            tmp = state_path.with_suffix(".tmp")
            torch.save({"vae": vae.state_dict(), "opt": opt.state_dict(), "sched": sched.state_dict(),
                        "rng": g.get_state(), "step": step, "history": history, "wall": time.time() - t0}, tmp)
            os.replace(tmp, state_path)  # atomic: a kill leaves the previous state whole
        if stop:
            logger.info("stopped by the %.0f-minute budget at step %d", max_minutes, step)
            break
    bar.close()
    wall = time.time() - t0
    vae.eval()
    with torch.no_grad():
        lat = torch.cat([vae.encode(x_all[i : i + 256]).latent_dist.sample(generator=g)
                         for i in range(0, len(x_all), 256)])
    vae.register_to_config(scaling_factor=float(1.0 / lat.std()))
    err = reconstruction_error(vae, data.images("test"))
    vae.save_pretrained(out, safe_serialization=True)
    last = history[-50:]
    record = {
        "command": command or " ".join(sys.argv),
        "config": {"steps": steps, "batch_size": batch_size, "lr": lr, "kl_weight": kl_weight, "seed": seed,
                   "max_minutes": max_minutes, "loss": "L1 + MSE + kl_weight * KL/dim", "hflip": True,
                   "schedule": "50 warm-up steps, cosine decay"},
        "vae_config": {k: list(v) if isinstance(v, tuple) else v for k, v in EMOJI_VAE_CONFIG.items()},
        "steps_done": step,
        "wall_time_s": round(wall, 1),
        "final_train": {k: sum(h[k] for h in last) / len(last) for k in ("l1", "mse", "kl_per_dim")},
        "scaling_factor": float(vae.config.scaling_factor),
        "held_out": {"n": len(err["mse"]), "mse": float(err["mse"].mean()), "psnr_db": float(err["psnr"].mean()),
                     "mse_ci95_halfwidth": float(1.96 * err["mse"].std() / len(err["mse"]) ** 0.5)},
        "data": data.source,
        "provenance": run_provenance(),
    }
    (out / "training.json").write_text(json.dumps(record, indent=2, default=str))
    (out / "history.json").write_text(json.dumps(history))
    logger.info("VAE: %d steps in %.0f s, held-out MSE %.5f (PSNR %.2f dB), scaling factor %.4f",
                step, wall, record["held_out"]["mse"], record["held_out"]["psnr_db"], vae.config.scaling_factor)
    return record


# ------------------------------------------------------------------------------------------------
# Pretraining the latent UNet
# ------------------------------------------------------------------------------------------------


def save_emoji_sample_grid(base: EmojiBase, path: str | os.PathLike, *, split: str = "test", columns: int = 8,
                           steps: int = 50, guidance_scale: float = 2.0, seed: int = 0, unet=None) -> Path:
    """Per group: the real renders of ``columns`` names of ``split`` and the model's samples for the
    same names (DDIM, classifier-free guidance), rows labelled — one PNG."""
    rows, labels = [], []
    g = torch.Generator().manual_seed(seed)
    idx_all = base.data.indices(split)
    labels_all = base.data.labels(split)
    real_all = torch.from_numpy(base.data.images(split)).permute(0, 3, 1, 2).float().div(255)
    for c, group in enumerate(base.classes):
        pick = (labels_all == c).nonzero()[0]
        # spread over the group (file order puts variants of one emoji next to each other)
        pick = pick[torch.linspace(0, len(pick) - 1, min(columns, len(pick))).round().long().numpy()]
        imgs = sample_emoji(base, torch.as_tensor(idx_all[pick]), steps=steps, guidance_scale=guidance_scale,
                            generator=g, unet=unet)
        rows += [real_all[pick], imgs]
        labels += [f"{group[:11]} real", "  sampled"]
    title = f"{split} names: real render / DDIM-{steps} sample, CFG {guidance_scale}, seed {seed}"
    out = save_image_rows(rows, labels, Path(path), title=title)
    logger.info("wrote %s", out)
    return out


def pretrain_emoji_unet(export_dir: str | os.PathLike, train_config, *, unet_config: dict | None = None,
                        seed_init: int = 0, command: str = "", vae: str | os.PathLike | None = None) -> dict:
    """Train the latent UNet from scratch on the emoji training split (frozen shipped VAE, MiniLM
    states of the names, 10 % condition dropout from ``train_config``) with :func:`fcr_train.trainer.train`
    — the loop every fine-tune uses — and export the EMA weights, ``samples.png`` and a record."""
    from diffusers import UNet2DConditionModel

    from .provenance import run_provenance
    from .trainer import train

    base = load_emoji_base(random_init=True, unet_config=unet_config, vae=vae)
    base.unet = build_emoji_unet(unet_config, seed=seed_init)
    dataset = EmojiDataset("train", data=base.data)
    conditioner = LatentConditioner(base.vae, base.states)
    result = train(base.unet, base.scheduler, dataset, conditioner, train_config,
                   run_metadata={"command": "pretrain-emoji", "data": base.data.source})
    export = Path(export_dir)
    export.mkdir(parents=True, exist_ok=True)
    unet = UNet2DConditionModel.from_pretrained(result.final_unet)
    unet.save_pretrained(export, safe_serialization=True)
    base.unet = unet.eval()
    # DDIM-20 as the experiments sample; 6 held-out names per group
    grid = save_emoji_sample_grid(base, export.parent / "samples.png", split="test", columns=6, steps=20)
    record = {
        "command": command or " ".join(sys.argv),
        "train_config": train_config.to_dict(),
        "unet_config": {k: list(v) if isinstance(v, tuple) else v for k, v in (unet_config or EMOJI_UNET_CONFIG).items()},
        "seed_init": seed_init,
        "steps": result.steps,
        "wall_time_s": round(result.wall_time_s, 1),
        "final_logs": result.last_logs,
        "loss_mean_last_100": sum(result.losses[-100:]) / max(1, len(result.losses[-100:])),
        "loss_first": result.losses[0] if result.losses else None,
        "stopped_by_time": result.stopped_by_time,
        "weights_from": str(result.final_unet),
        "sampler_for_grid": {"scheduler": "DDIM", "steps": 20, "guidance_scale": 2.0, "seed": 0, "file": grid.name},
        "data": base.data.source,
        "provenance": run_provenance(),
        "pretrain_config": {"train": {"max_steps": result.steps, "batch_size": train_config.batch_size}},
    }
    rec_path = export.parent / "command.json"
    full = json.loads(rec_path.read_text()) if rec_path.is_file() else {}
    full["unet"] = record
    rec_path.write_text(json.dumps(full, indent=2, default=str))
    logger.info("exported the emoji UNet to %s (%d steps, %.0f s)", export, result.steps, result.wall_time_s)
    return record


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m fcr_train.emoji_backbone",
                                description="train the emoji backbone's VAE or UNet")
    sub = p.add_subparsers(dest="cmd", required=True)
    v = sub.add_parser("vae", help="train the AutoencoderKL on the emoji training split")
    v.add_argument("--out", default=str(EMOJI_WEIGHTS_DIR / "vae"))
    v.add_argument("--steps", type=int, default=1500)
    v.add_argument("--batch-size", type=int, default=32)
    v.add_argument("--lr", type=float, default=1e-3)
    v.add_argument("--kl-weight", type=float, default=1e-4)
    v.add_argument("--seed", type=int, default=0)
    v.add_argument("--max-minutes", type=float, default=None)
    v.add_argument("--threads", type=int, default=None)
    v.add_argument("--no-progress", dest="progress", action="store_false")
    u = sub.add_parser("unet", help="train the latent UNet on the emoji training split (needs the VAE)")
    u.add_argument("--export-dir", default=str(EMOJI_WEIGHTS_DIR / "unet"))
    u.add_argument("--output-dir", default="runs/pretrain-emoji")
    u.add_argument("--max-steps", type=int, default=2000)
    u.add_argument("--max-minutes", type=float, default=None)
    u.add_argument("--batch-size", type=int, default=32)
    u.add_argument("--lr", type=float, default=5e-4)
    u.add_argument("--warmup-steps", type=int, default=100)
    u.add_argument("--ema-decay", type=float, default=0.995)
    u.add_argument("--cond-dropout", type=float, default=0.1)
    u.add_argument("--checkpoint-every", type=int, default=200)
    u.add_argument("--seed", type=int, default=0)
    u.add_argument("--resume", action="store_true")
    u.add_argument("--threads", type=int, default=None)
    u.add_argument("--no-progress", dest="progress", action="store_false")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    if a.threads:
        torch.set_num_threads(a.threads)
    if a.cmd == "vae":
        rec = train_vae(a.out, steps=a.steps, batch_size=a.batch_size, lr=a.lr, kl_weight=a.kl_weight, seed=a.seed,
                        max_minutes=a.max_minutes, command="uv run python -m fcr_train.emoji_backbone " +
                        " ".join(argv or sys.argv[1:]), progress=a.progress)
        print(f"VAE: held-out MSE {rec['held_out']['mse']:.5f} (PSNR {rec['held_out']['psnr_db']:.2f} dB), "
              f"{rec['steps_done']} steps in {rec['wall_time_s']:.0f} s -> {a.out}")
    elif a.cmd == "unet":
        from .loss import FCRConfig
        from .trainer import TrainConfig

        tc = TrainConfig(output_dir=a.output_dir, max_steps=a.max_steps, batch_size=a.batch_size, lr=a.lr,
                         warmup_steps=a.warmup_steps, weight_decay=0.0, ema_decay=a.ema_decay,
                         cond_dropout=a.cond_dropout, checkpoint_every=a.checkpoint_every, keep_checkpoints=2,
                         hflip=False, seed=a.seed, resume=a.resume, progress=a.progress,
                         max_time_s=60 * a.max_minutes if a.max_minutes else None, fcr=FCRConfig(lam=0.0))
        rec = pretrain_emoji_unet(a.export_dir, tc, command="uv run python -m fcr_train.emoji_backbone " +
                                  " ".join(argv or sys.argv[1:]))
        print(f"UNet: {rec['steps']} steps in {rec['wall_time_s']:.0f} s, mean loss of the last 100 steps "
              f"{rec['loss_mean_last_100']:.4f} -> {a.export_dir}")


if __name__ == "__main__":
    main()
