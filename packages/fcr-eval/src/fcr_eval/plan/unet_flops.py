"""FLOPs of a Stable Diffusion UNet from its ``unet/config.json`` alone: no torch, no weights, no hub.

The plan estimates the compute of a real model before the model is on this machine. The public
UNet configs of the designed models ship in ``unet_configs/`` (SD v1.5, SD 2.1, OpenJourney; each
file says where it came from); a local diffusers folder's own ``unet/config.json`` is read the same
way. :func:`unet_flops` counts what torch's flop counter counts on ``UNet2DConditionModel`` — 2 ×
multiply-accumulates of every convolution, linear layer and attention product (norms, activations
and element-wise ops are not counted) — and splits it into the encoder (time embedding, conv_in,
down blocks, mid block) and the rest, as :func:`fcr_sample.benchmark.flop_split` does. SD v1.5 at
a 64×64 latent with 77 text tokens gives 803.3 GFLOPs, encoder 32.5 % (design.md §2: ≈ 803, 33 %).

Example:
    >>> cfg = shipped_unet_config("sd15")
    >>> split = unet_flops(cfg, 64)
    >>> round(split.total / 1e9)
    803
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from fcr_sample.vocabulary import MODEL_IDS

__all__ = ["UnetFlops", "unet_flops", "shipped_unet_config", "unet_config_for", "CLIP_TOKENS", "LATENT_FACTOR"]

#: Pixels per latent cell of the Stable Diffusion VAE (2 ** (4 levels - 1)).
LATENT_FACTOR = 8
#: Text tokens of the CLIP text encoder every designed model uses (cross-attention keys).
CLIP_TOKENS = 77

# The block types the count understands (those of SD 1.x / 2.x).
_DOWN = ("CrossAttnDownBlock2D", "DownBlock2D")
_UP = ("CrossAttnUpBlock2D", "UpBlock2D")


@dataclass(frozen=True)
class UnetFlops:
    """FLOPs of one UNet forward for one image (no classifier-free guidance doubling)."""

    encoder: float
    decoder: float

    @property
    def total(self) -> float:
        return self.encoder + self.decoder

    @property
    def encoder_share(self) -> float:
        return self.encoder / self.total


def shipped_unet_config(source: str) -> dict | None:
    """The shipped ``unet/config.json`` of a designed model (short name or hub id), else ``None``."""
    hub_id = MODEL_IDS.get(source, source)
    for name, hub in MODEL_IDS.items():
        if hub == hub_id:
            text = resources.files("fcr_eval.plan").joinpath("unet_configs", f"{name}.json").read_text("utf-8")
            return json.loads(text)
    return None


def unet_config_for(source: str) -> tuple[dict, str] | None:
    """The UNet config of ``source`` and where it came from: a local folder's ``unet/config.json``,
    else the shipped copy of a designed model; ``None`` when neither exists (reads files only)."""
    local = Path(source).expanduser() / "unet" / "config.json"
    if local.is_file():
        try:
            return json.loads(local.read_text("utf-8")), f"{local}"
        except (OSError, ValueError):
            return None
    cfg = shipped_unet_config(source)
    return (cfg, f"shipped config of {MODEL_IDS.get(source, source)}") if cfg is not None else None


def unet_flops(cfg: dict, latent_size: int, text_tokens: int = CLIP_TOKENS) -> UnetFlops | None:
    """Count one forward of the ``UNet2DConditionModel`` that ``cfg`` describes at a
    ``latent_size``² latent; ``None`` when the config has parts the count does not model (other
    block types, several transformer layers per block, class or added embeddings).

    Example:
        >>> unet_flops(shipped_unet_config("sd21"), 96).total / 1e12     # SD 2.1 at 768²
        2.149...
    """
    boc = list(cfg.get("block_out_channels", ()))
    down, up = list(cfg.get("down_block_types", ())), list(cfg.get("up_block_types", ()))
    lpb = cfg.get("layers_per_block", 2)
    if (not boc or len(down) != len(boc) or len(up) != len(boc) or any(t not in _DOWN for t in down)
            or any(t not in _UP for t in up) or not isinstance(lpb, int)
            or cfg.get("transformer_layers_per_block", 1) != 1 or cfg.get("mid_block_type", "UNetMidBlock2DCrossAttn")
            != "UNetMidBlock2DCrossAttn" or cfg.get("num_class_embeds") or cfg.get("class_embed_type")
            or cfg.get("addition_embed_type") or cfg.get("only_cross_attention")):
        return None
    cross, temb = cfg["cross_attention_dim"], boc[0] * 4

    def conv(ci: int, co: int, k: int, hw: int) -> float:
        return 2.0 * ci * co * k * k * hw

    def linear(i: int, o: int, n: int) -> float:
        return 2.0 * i * o * n

    def resnet(ci: int, co: int, hw: int) -> float:
        shortcut = conv(ci, co, 1, hw) if ci != co else 0.0
        return conv(ci, co, 3, hw) + conv(co, co, 3, hw) + linear(temb, co, 1) + shortcut

    def transformer(c: int, hw: int) -> float:
        n, m = hw, text_tokens
        proj = 2 * linear(c, c, n)                                       # proj_in, proj_out
        self_attn = 4 * linear(c, c, n) + 4.0 * n * n * c                 # q k v out, QKᵀ and AV
        cross_attn = 2 * linear(c, c, n) + 2 * linear(cross, c, m) + 4.0 * n * m * c
        ff = linear(c, 8 * c, n) + linear(4 * c, c, n)                   # GEGLU 4× then back
        return proj + self_attn + cross_attn + ff

    h = int(latent_size)
    enc = linear(boc[0], temb, 1) + linear(temb, temb, 1) + conv(cfg.get("in_channels", 4), boc[0], 3, h * h)
    skips, cin = [boc[0]], boc[0]
    for i, kind in enumerate(down):
        co = boc[i]
        for j in range(lpb):
            enc += resnet(cin if j == 0 else co, co, h * h)
            enc += transformer(co, h * h) if kind.startswith("CrossAttn") else 0.0
            skips.append(co)
        cin = co
        if i < len(down) - 1:
            h = (h + 1) // 2  # stride-2 3×3 convolution, padding 1
            enc += conv(co, co, 3, h * h)
            skips.append(co)
    c = boc[-1]
    enc += 2 * resnet(c, c, h * h) + transformer(c, h * h)
    dec, prev = 0.0, c
    for i, kind in enumerate(up):
        co = list(reversed(boc))[i]
        for _ in range(lpb + 1):
            dec += resnet(prev + skips.pop(), co, h * h)
            dec += transformer(co, h * h) if kind.startswith("CrossAttn") else 0.0
            prev = co
        if i < len(up) - 1:
            h *= 2
            dec += conv(co, co, 3, h * h)
    dec += conv(boc[0], cfg.get("out_channels", 4), 3, h * h)
    return UnetFlops(encoder=enc, decoder=dec)
