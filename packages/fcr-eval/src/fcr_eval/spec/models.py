"""The ``[[models]]`` table: which UNet a variation samples (embedded default or Stable Diffusion).

Example::

    models = load_models(chk, raw.get("models", []))
    models["sd15"].embedded     # False
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from fcr_train.vocabulary import EMBEDDED_BACKBONES, unknown_model_name

from fcr_eval.spec.checker import Checker

__all__ = ["ModelSpec", "check_source", "load_models"]


@dataclass(frozen=True)
class ModelSpec:
    """A model: ``source`` is an embedded backbone's name (``embedded`` / ``embedded-random`` /
    ``embedded-tiny``: Fashion-MNIST, pixel space; ``emoji`` / ``emoji-random`` / ``emoji-tiny``: the
    latent RGB emoji backbone), a short SD name (``sd15``, ``sd21``, ``openjourney``), a hub id or a
    local diffusers folder.

    ``flops_per_forward`` / ``encoder_flop_share`` feed the plan's estimate when the model cannot be
    instantiated here (design.md §2: SD v1.5 at 512² ≈ 803 GFLOPs, encoder ≈ 33 %).
    """

    id: str
    source: str
    description: str = ""
    resolution: int | None = None
    flops_per_forward: float | None = None
    encoder_flop_share: float | None = None
    pretrain_compute_flops: float | None = None
    pretrain_a100_hours: float | None = None

    @property
    def embedded(self) -> bool:
        return self.source in EMBEDDED_BACKBONES

    @property
    def backbone(self) -> str | None:
        """``fashion-mnist`` or ``emoji`` for an embedded model (its data set), else ``None``."""
        return EMBEDDED_BACKBONES.get(self.source)



def load_models(chk: Checker, raw: Any) -> dict[str, ModelSpec]:
    """``[[models]]`` → model id → :class:`ModelSpec`; at least one, ids unique."""
    models: dict[str, ModelSpec] = {}
    for i, m in enumerate(raw):
        spec = chk.build(ModelSpec, m, "models", i, label=f"models[{i}]")
        chk.name(spec.id, f"models[{i}].id", "models", "id", i)
        if spec.id in models:
            chk.fail(f"duplicate model id {spec.id!r}", "models", "id", i)
        check_source(chk, spec.source, i)
        models[spec.id] = spec
    if not models:
        chk.fail("at least one [[models]] entry is needed", None)
    return models



def check_source(chk: Checker, source: str, index: int) -> None:
    """A bare word that is no model name, no hub id and no folder here is a typo: say so, with the
    nearest name, instead of treating it as a hub id the runner cannot find (whose first complaint
    would be about something else, e.g. the reference data a hub model needs)."""
    if isinstance(source, str) and (problem := unknown_model_name(source)):
        chk.fail(f"models[{index}].source = {problem}", "models", "source", index)
