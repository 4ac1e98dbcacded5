"""The encoder and decoder halves of a diffusers ``UNet2DConditionModel`` forward pass.

``UNet2DConditionModel.forward`` is one function; encoder caching needs its two halves:

* the *encoder* — time embedding, ``conv_in``, the down blocks and the mid block — whose outputs
  (every down-block residual and the mid-block output) are what Faster Diffusion caches, and
* the *decoder* — the up blocks and ``conv_out`` — whose inputs are only those cached features,
  the text states and the step's own time embedding, never the step's latent.

The functions here compose the model's own sub-modules and helper methods in the same order as
``UNet2DConditionModel.forward``, so ``run_decoder(unet, run_encoder(unet, ...))`` gives the same
result as ``unet(...)``. Nothing in diffusers is patched or copied into a fork.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

import torch

__all__ = [
    "EncoderOutput",
    "Conditioning",
    "time_embedding",
    "prepare_conditioning",
    "run_encoder",
    "run_decoder",
    "expand_for_steps",
]


@dataclass
class Conditioning:
    """Everything the blocks take besides hidden states: time embedding, text states, masks."""

    emb: torch.Tensor
    encoder_hidden_states: torch.Tensor | None
    attention_mask: torch.Tensor | None = None
    encoder_attention_mask: torch.Tensor | None = None
    cross_attention_kwargs: dict[str, Any] | None = None


@dataclass
class EncoderOutput:
    """What the encoder hands to the decoder.

    Attributes:
        down_block_res_samples: ``conv_in`` output followed by every residual the down blocks
            emit (resnet/attention outputs and downsampler outputs), in forward order.
        mid: the mid-block output (the decoder's first hidden state).
        sample_shape: spatial size of the input, needed to decide upsample sizes.
        names: one name per entry of ``down_block_res_samples`` (``"conv_in"``,
            ``"down_blocks.0.resnets.0"``, ``"down_blocks.0.downsamplers.0"``, ...).
    """

    down_block_res_samples: tuple[torch.Tensor, ...]
    mid: torch.Tensor
    sample_shape: tuple[int, int]
    names: tuple[str, ...] = field(default_factory=tuple)

    def named_features(self) -> dict[str, torch.Tensor]:
        """All encoder outputs by name; the mid block is ``"mid_block"``."""
        feats = dict(zip(self.names, self.down_block_res_samples, strict=False))
        feats["mid_block"] = self.mid
        return feats

    def repeat(self, times: int) -> EncoderOutput:
        """The same features tiled ``times`` along the batch (step-major), for parallel decoding."""
        return replace(
            self,
            down_block_res_samples=tuple(
                expand_for_steps(t, times) for t in self.down_block_res_samples
            ),
            mid=expand_for_steps(self.mid, times),
        )


def expand_for_steps(x: torch.Tensor | None, times: int) -> torch.Tensor | None:
    """Tile a batch ``times`` times along dim 0: rows ``[s*B:(s+1)*B]`` belong to step ``s``."""
    if x is None or times == 1:
        return x
    return x.repeat(times, *([1] * (x.dim() - 1)))


def _res_names(unet) -> tuple[str, ...]:
    names = ["conv_in"]
    for i, block in enumerate(unet.down_blocks):
        for j in range(len(block.resnets)):
            names.append(f"down_blocks.{i}.resnets.{j}")
        for j in range(len(block.downsamplers or [])):
            names.append(f"down_blocks.{i}.downsamplers.{j}")
    return tuple(names)


def time_embedding(
    unet,
    sample: torch.Tensor,
    timestep: torch.Tensor | float | int,
    *,
    encoder_hidden_states: torch.Tensor | None = None,
    class_labels: torch.Tensor | None = None,
    timestep_cond: torch.Tensor | None = None,
    added_cond_kwargs: dict[str, Any] | None = None,
) -> torch.Tensor:
    """The UNet's full conditioning embedding ``emb`` (time + class + added embeddings).

    ``sample`` only provides batch size, dtype and device; its values are not read.
    """
    if unet.config.addition_embed_type == "image_hint":
        raise NotImplementedError("UNets with addition_embed_type='image_hint' are not supported")
    t_emb = unet.get_time_embed(sample=sample, timestep=timestep)
    emb = unet.time_embedding(t_emb, timestep_cond)
    class_emb = unet.get_class_embed(sample=sample, class_labels=class_labels)
    if class_emb is not None:
        if unet.config.class_embeddings_concat:
            emb = torch.cat([emb, class_emb], dim=-1)
        else:
            emb = emb + class_emb
    aug_emb = unet.get_aug_embed(
        emb=emb, encoder_hidden_states=encoder_hidden_states, added_cond_kwargs=added_cond_kwargs
    )
    emb = emb + aug_emb if aug_emb is not None else emb
    if unet.time_embed_act is not None:
        emb = unet.time_embed_act(emb)
    return emb


def prepare_conditioning(
    unet,
    sample: torch.Tensor,
    timestep: torch.Tensor | float | int,
    encoder_hidden_states: torch.Tensor | None,
    *,
    class_labels: torch.Tensor | None = None,
    timestep_cond: torch.Tensor | None = None,
    attention_mask: torch.Tensor | None = None,
    cross_attention_kwargs: dict[str, Any] | None = None,
    added_cond_kwargs: dict[str, Any] | None = None,
    encoder_attention_mask: torch.Tensor | None = None,
) -> Conditioning:
    """Masks, time embedding and processed text states, as ``UNet2DConditionModel.forward`` builds them."""
    if attention_mask is not None:
        attention_mask = (1 - attention_mask.to(sample.dtype)) * -10000.0
        attention_mask = attention_mask.unsqueeze(1)
    if encoder_attention_mask is not None:
        encoder_attention_mask = (1 - encoder_attention_mask.to(sample.dtype)) * -10000.0
        encoder_attention_mask = encoder_attention_mask.unsqueeze(1)
    emb = time_embedding(
        unet,
        sample,
        timestep,
        encoder_hidden_states=encoder_hidden_states,
        class_labels=class_labels,
        timestep_cond=timestep_cond,
        added_cond_kwargs=added_cond_kwargs,
    )
    encoder_hidden_states = unet.process_encoder_hidden_states(
        encoder_hidden_states=encoder_hidden_states, added_cond_kwargs=added_cond_kwargs
    )
    if cross_attention_kwargs is not None and cross_attention_kwargs.get("gligen") is not None:
        raise NotImplementedError("GLIGEN cross-attention kwargs are not supported by fcr-sample")
    return Conditioning(
        emb=emb,
        encoder_hidden_states=encoder_hidden_states,
        attention_mask=attention_mask,
        encoder_attention_mask=encoder_attention_mask,
        cross_attention_kwargs=cross_attention_kwargs,
    )


def _block_kwargs(block, cond: Conditioning) -> dict[str, Any]:
    if getattr(block, "has_cross_attention", False):
        return {
            "encoder_hidden_states": cond.encoder_hidden_states,
            "attention_mask": cond.attention_mask,
            "cross_attention_kwargs": cond.cross_attention_kwargs,
            "encoder_attention_mask": cond.encoder_attention_mask,
        }
    return {}


def run_down_blocks(
    unet,
    sample: torch.Tensor,
    cond: Conditioning,
    *,
    num_blocks: int | None = None,
    down_block_additional_residuals: tuple[torch.Tensor, ...] | None = None,
    intrablock: list[torch.Tensor] | None = None,
) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
    """``conv_in`` and the first ``num_blocks`` down blocks (all by default).

    ``intrablock`` (T2I-Adapter residuals) is consumed in place, one entry per down block, as
    diffusers does. Returns the last hidden state and the residuals (``conv_in`` output first).
    """
    if unet.config.center_input_sample:
        sample = 2 * sample - 1.0
    sample = unet.conv_in(sample)
    if intrablock is None:
        intrablock = []
    res: tuple[torch.Tensor, ...] = (sample,)
    blocks = unet.down_blocks if num_blocks is None else unet.down_blocks[:num_blocks]
    for block in blocks:
        if getattr(block, "has_cross_attention", False):
            extra = {"additional_residuals": intrablock.pop(0)} if intrablock else {}
            sample, block_res = block(
                hidden_states=sample, temb=cond.emb, **_block_kwargs(block, cond), **extra
            )
        else:
            sample, block_res = block(hidden_states=sample, temb=cond.emb)
            if intrablock:
                sample += intrablock.pop(0)
        res += block_res
    if down_block_additional_residuals is not None:  # ControlNet
        res = tuple(r + a for r, a in zip(res, down_block_additional_residuals, strict=False))
    return sample, res


def run_encoder(
    unet,
    sample: torch.Tensor,
    cond: Conditioning,
    *,
    down_block_additional_residuals: tuple[torch.Tensor, ...] | None = None,
    mid_block_additional_residual: torch.Tensor | None = None,
    down_intrablock_additional_residuals: tuple[torch.Tensor, ...] | None = None,
) -> EncoderOutput:
    """``conv_in``, down blocks and mid block; ControlNet / T2I-Adapter residuals are added as in diffusers."""
    leftover = list(down_intrablock_additional_residuals or [])
    hidden, res = run_down_blocks(
        unet,
        sample,
        cond,
        down_block_additional_residuals=down_block_additional_residuals,
        intrablock=leftover,  # consumed per down block; what is left belongs to the mid block
    )
    if unet.mid_block is not None:
        if getattr(unet.mid_block, "has_cross_attention", False):
            hidden = unet.mid_block(hidden, cond.emb, **_block_kwargs(unet.mid_block, cond))
        else:
            hidden = unet.mid_block(hidden, cond.emb)
        if leftover and hidden.shape == leftover[0].shape:
            hidden += leftover.pop(0)
    if mid_block_additional_residual is not None:
        hidden = hidden + mid_block_additional_residual
    return EncoderOutput(
        down_block_res_samples=res,
        mid=hidden,
        sample_shape=tuple(sample.shape[-2:]),
        names=_res_names(unet),
    )


def _needs_forward_upsample_size(unet, sample_shape: tuple[int, int]) -> bool:
    factor = 2**unet.num_upsamplers
    return any(dim % factor != 0 for dim in sample_shape)


def run_up_blocks(
    unet,
    hidden: torch.Tensor,
    res_samples: tuple[torch.Tensor, ...],
    cond: Conditioning,
    sample_shape: tuple[int, int],
    *,
    start_block: int = 0,
    stop_block: int | None = None,
) -> torch.Tensor:
    """Up blocks ``start_block .. stop_block-1``, then the output head if the range reaches the end.

    ``res_samples`` must hold exactly the residuals the blocks from ``start_block`` to the last one
    consume (they are taken from its end); with ``stop_block`` the head is not run and the hidden
    state entering ``up_blocks[stop_block]`` is returned.
    """
    n = len(unet.up_blocks)
    stop = n if stop_block is None else stop_block
    forward_upsample_size = _needs_forward_upsample_size(unet, sample_shape)
    upsample_size = None
    for i in range(start_block, stop):
        block = unet.up_blocks[i]
        is_final_block = i == n - 1
        block_res = res_samples[-len(block.resnets) :]
        res_samples = res_samples[: -len(block.resnets)]
        if not is_final_block and forward_upsample_size:
            upsample_size = res_samples[-1].shape[2:]
        hidden = block(
            hidden_states=hidden,
            temb=cond.emb,
            res_hidden_states_tuple=block_res,
            upsample_size=upsample_size,
            **_block_kwargs(block, cond),
        )
    if stop < n:
        return hidden
    if unet.conv_norm_out:
        hidden = unet.conv_norm_out(hidden)
        hidden = unet.conv_act(hidden)
    return unet.conv_out(hidden)


def run_decoder(unet, enc: EncoderOutput, cond: Conditioning) -> torch.Tensor:
    """Up blocks and ``conv_out`` on encoder features; the batch of ``cond`` must match ``enc``."""
    return run_up_blocks(unet, enc.mid, enc.down_block_res_samples, cond, enc.sample_shape)
