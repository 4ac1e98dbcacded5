"""Feature Consistency Regularization (FCR): the training loss.

    L_total = L_denoise + λ · d(Enc(x_t), Enc(x_{t−Δ})),   t ~ U(Δ, T−1), Δ ~ U(1, Δ_max)

**Units of Δ.** The paper's Δ counts DDPM timesteps. An encoder cache reuses features across
*sampler* steps: with DDIM-20 over T = 1000 one step spans 50 timesteps, so FD-10 reuses them
across ~500 timesteps while Δ ≤ 10 timesteps regularises ≤ 10 (design.md §5). With
``FCRConfig(delta_unit="sampler_steps", sampler_steps=20)`` Δ ~ U(1, Δ_max) counts sampler steps
and is applied as Δ · (T // steps) timesteps (:func:`sampler_step_timesteps`), so Δ_max = 10
spans the FD-10 stride; ``delta_max=None, stride=10`` says exactly that (Δ_max = the stride the
fine-tune serves).

Both noisy inputs use the same clean sample ``x0`` and the same noise ``ε``; in DDPM indexing
``x_{t−Δ}`` is the less noisy one. ``Enc`` is :func:`fcr_sample.features.encoder_features` — the
one definition of encoder features that the sampler caches and evaluation measures — restricted
to the :attr:`FCRConfig.blocks` subset. ``d`` is the mean over the selected features of a
per-feature distance (:func:`feature_distance`).

The second branch runs the encoder only. With ``batched=True`` (default) both branches' encoders
run as one pass over a ``2B`` batch and the decoder runs on the first half, which is cheaper than
two passes and gives the same numbers (see ``tests/fcr_train/test_loss.py``).

With ``lam == 0`` no second branch is run at all and ``t ~ U(0, T−1)``: this *is* plain
denoising fine-tuning, the baseline that FCR is compared against.
"""

from __future__ import annotations

import dataclasses
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F
from fcr_sample.features import encoder_features, select_feature_names
from fcr_sample.unet_parts import (
    prepare_conditioning,
    run_decoder,
    run_encoder,
)

__all__ = [
    "DISTANCES",
    "DELTA_UNITS",
    "FCRConfig",
    "FCRLossOutput",
    "feature_distance",
    "sample_timesteps",
    "sampler_step_timesteps",
    "denoise_target",
    "fcr_loss",
]

from .delta import DeltaSampling, sampler_step_timesteps  # noqa: E402  (torch-free, re-exported)
from .vocabulary import DELTA_UNITS, DISTANCES  # noqa: E402  (defined torch-free, re-exported)


@dataclass(frozen=True)
class FCRConfig(DeltaSampling):
    """Options of the FCR term, recorded with every run.

    Attributes:
        lam: weight λ of the consistency term (0 = plain fine-tuning).
        delta_max, delta_unit, sampler_steps, stride: how Δ between the two branches is drawn
            (:class:`fcr_train.delta.DeltaSampling`, shared with output consistency); in
            ``"timesteps"`` by default, so old configs keep their meaning.
        delta_scale: training timesteps per unit of Δ when ``delta_unit = "timesteps"``. 1
            (default) = DDPM timesteps, as in the paper's formula; ``T / num_inference_steps``
            (20 for DDIM-50 with T = 1000) makes Δ count sampler steps by hand — prefer
            ``delta_unit = "sampler_steps"``, which records the step count.
        blocks: ``"all"``, ``"early"``, ``"mid"``, ``"late"`` or a tuple of feature-name prefixes
            (``("down_blocks.1", "mid_block")``), resolved by ``fcr_sample.features``.
        distance: ``"mse"`` (the paper's ‖·‖², as a mean), ``"relative_mse"`` (MSE divided by the
            two features' mean energy, so shrinking features does not lower it) or ``"cosine"``
            (1 − cosine similarity per sample).
        stop_grad: no gradient through the x_{t−Δ} branch (it becomes a moving target).
        batched: run both encoders as one 2B batch (else two passes). With ``stop_grad`` the
            second branch always runs as its own pass under ``no_grad`` (no activations kept),
            which is cheaper than a batched pass whose second half gets no gradient.
    """

    lam: float = 0.1
    delta_scale: int = 1
    blocks: str | tuple[str, ...] = "all"
    distance: str = "mse"
    stop_grad: bool = False
    batched: bool = True

    def __post_init__(self):
        if self.lam < 0:
            raise ValueError(f"FCRConfig.lam must be >= 0, got {self.lam}")
        super().__post_init__()
        if self.delta_unit == "sampler_steps" and self.delta_scale != 1:
            raise ValueError("FCRConfig: delta_scale is the by-hand unit of delta_unit = 'timesteps'; with "
                             f"'sampler_steps' leave it at 1 (got {self.delta_scale})")
        if int(self.delta_scale) < 1:
            raise ValueError(f"FCRConfig.delta_scale must be >= 1, got {self.delta_scale}")
        if self.distance not in DISTANCES:
            raise ValueError(f"FCRConfig.distance must be one of {DISTANCES}, got {self.distance!r}")
        if not isinstance(self.blocks, str):
            object.__setattr__(self, "blocks", tuple(self.blocks))

    def to_dict(self) -> dict:
        d = asdict(self)
        d["blocks"] = self.blocks if isinstance(self.blocks, str) else list(self.blocks)
        return d

    def timesteps_per_delta(self, num_train_timesteps: int) -> int:
        """Training timesteps per unit of Δ for a scheduler with ``num_train_timesteps``
        (``delta_scale`` in timesteps: the by-hand unit).

        Example:
            >>> FCRConfig(delta_unit="sampler_steps", sampler_steps=20).timesteps_per_delta(1000)
            50
        """
        if self.delta_unit == "sampler_steps":
            return super().timesteps_per_delta(num_train_timesteps)
        return int(self.delta_scale)


@dataclass
class FCRLossOutput:
    """``loss = denoise + lam * fcr``; ``per_block`` holds each feature's (detached) distance."""

    loss: torch.Tensor
    denoise: torch.Tensor
    fcr: torch.Tensor
    per_block: dict[str, torch.Tensor] = field(default_factory=dict)
    timesteps: torch.Tensor | None = None
    deltas: torch.Tensor | None = None


def feature_distance(a: torch.Tensor, b: torch.Tensor, kind: str = "mse", eps: float = 1e-8) -> torch.Tensor:
    """Scalar distance between two feature batches ``(B, ...)`` (mean over the batch).

    * ``mse``: mean of (a − b)²;
    * ``relative_mse``: Σ(a − b)² / (½(Σa² + Σb²) + eps) per sample;
    * ``cosine``: 1 − cos(a_i, b_i) per sample, features flattened.

    Plain MSE can be lowered by shrinking both features (mid-block energy 3.7 → 1.0 in the
    sampler-unit probe, design.md §5); the other two are invariant to a common scale.
    """
    a, b = a.float(), b.float()
    if kind == "mse":
        return (a - b).pow(2).mean()
    fa, fb = a.flatten(1), b.flatten(1)
    if kind == "relative_mse":
        # The gradient flows through the denominator on purpose. Then d(c·a, c·b) = d(a, b)
        # exactly, so the gradient has no component along a common rescaling: neither shrinking
        # nor inflating the features changes the loss. A stop-gradient denominator would make
        # each step's loss MSE / constant, whose gradient again points towards smaller features.
        energy = 0.5 * (fa.pow(2).sum(1) + fb.pow(2).sum(1))
        return ((fa - fb).pow(2).sum(1) / (energy + eps)).mean()
    if kind == "cosine":
        return (1 - F.cosine_similarity(fa, fb, dim=1, eps=eps)).mean()
    raise ValueError(f"unknown distance {kind!r}; use one of {DISTANCES}")


def sample_timesteps(
    batch: int,
    num_train_timesteps: int,
    delta_max: int,
    *,
    generator: torch.Generator | None = None,
    device: torch.device | str = "cpu",
    fcr: bool = True,
    delta_scale: int = 1,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(t, Δ)`` per sample: Δ ~ delta_scale · U(1, Δ_max), t ~ U(Δ, T−1) (both inclusive).

    With ``fcr=False``: t ~ U(0, T−1) and Δ = 0 (plain denoising fine-tuning).
    """
    T = num_train_timesteps
    if not fcr:
        t = torch.randint(0, T, (batch,), generator=generator)
        return t.to(device), torch.zeros_like(t).to(device)
    if delta_max * delta_scale >= T:
        raise ValueError(f"delta_max * delta_scale = {delta_max * delta_scale} must be smaller than num_train_timesteps={T}")
    delta = torch.randint(1, delta_max + 1, (batch,), generator=generator) * delta_scale
    u = torch.rand(batch, generator=generator)
    t = delta + (u * (T - delta)).long().clamp(max=T - 1 - delta)
    return t.to(device), delta.to(device)


def denoise_target(scheduler, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """What the UNet must predict, from ``scheduler.config.prediction_type`` (ε, v or x0)."""
    kind = scheduler.config.prediction_type
    if kind == "epsilon":
        return noise
    if kind == "v_prediction":
        return scheduler.get_velocity(x0, noise, t)
    if kind == "sample":
        return x0
    raise ValueError(f"unsupported prediction_type {kind!r} (epsilon, v_prediction or sample)")


def _first(x, n: int):
    """Rows ``[:n]`` of every batched tensor field of a Conditioning / EncoderOutput (others kept)."""
    if isinstance(x, torch.Tensor):
        return x[:n]
    if isinstance(x, tuple):
        return tuple(_first(v, n) for v in x)
    return x


def _half(obj, n: int):
    fields = {
        f.name: _first(getattr(obj, f.name), n)
        for f in dataclasses.fields(obj)
        if f.name not in ("sample_shape", "names", "cross_attention_kwargs")
    }
    return dataclasses.replace(obj, **fields)


def fcr_loss(
    unet,
    scheduler,
    x0: torch.Tensor,
    encoder_hidden_states: torch.Tensor | None,
    config: FCRConfig = FCRConfig(),
    *,
    noise: torch.Tensor | None = None,
    timesteps: torch.Tensor | None = None,
    deltas: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
) -> FCRLossOutput:
    """Denoising loss plus the FCR term for one batch.

    Args:
        unet: a diffusers ``UNet2DConditionModel``.
        scheduler: a diffusers noise scheduler (``add_noise``, ``config.num_train_timesteps``,
            ``config.prediction_type``).
        x0: clean latents / pixels ``(B, C, H, W)``.
        encoder_hidden_states: text states ``(B, L, D)``.
        config: :class:`FCRConfig`.
        noise, timesteps, deltas: fixed draws (tests, benchmarks); drawn from ``generator`` if omitted.
        generator: CPU generator for t, Δ and ε (its state is what makes resumed runs exact).

    Returns:
        :class:`FCRLossOutput`.

    Example:
        >>> out = fcr_loss(unet, DDPMScheduler(), x0, text, FCRConfig(lam=0.1, blocks="late"))
        >>> out.loss.backward()
    """
    B = x0.shape[0]
    use_fcr = config.lam > 0
    if timesteps is None:
        timesteps, drawn = sample_timesteps(
            B, scheduler.config.num_train_timesteps, config.delta_max, generator=generator, fcr=use_fcr,
            delta_scale=config.timesteps_per_delta(scheduler.config.num_train_timesteps),
        )
        deltas = drawn if deltas is None else deltas
    timesteps = timesteps.to(x0.device)
    if noise is None:
        noise = torch.randn(x0.shape, generator=generator, dtype=torch.float32).to(x0.device, x0.dtype)
    x_t = scheduler.add_noise(x0, noise, timesteps)
    target = denoise_target(scheduler, x0, noise, timesteps)

    if not use_fcr:
        pred = unet(x_t, timesteps, encoder_hidden_states).sample
        denoise = F.mse_loss(pred.float(), target.float())
        zero = denoise.new_zeros(())
        return FCRLossOutput(denoise, denoise, zero, {}, timesteps, deltas)

    if deltas is None:
        raise ValueError("fcr_loss: pass `deltas` together with `timesteps` when lam > 0")
    deltas = deltas.to(x0.device)
    if bool((timesteps - deltas < 0).any()):
        raise ValueError("fcr_loss: every timestep must be >= its delta (t ~ U(delta, T))")
    s = timesteps - deltas
    x_s = scheduler.add_noise(x0, noise, s)
    names = select_feature_names(unet, config.blocks)

    if config.batched and not config.stop_grad:
        xx = torch.cat([x_t, x_s])
        ehs = None if encoder_hidden_states is None else torch.cat([encoder_hidden_states] * 2)
        cond = prepare_conditioning(unet, xx, torch.cat([timesteps, s]), ehs)
        enc = run_encoder(unet, xx, cond)
        pred = run_decoder(unet, _half(enc, B), _half(cond, B))
        feats = enc.named_features()
        feats_t = {n: feats[n][:B] for n in names}
        feats_s = {n: feats[n][B:] for n in names}
    else:
        cond = prepare_conditioning(unet, x_t, timesteps, encoder_hidden_states)
        enc = run_encoder(unet, x_t, cond)
        pred = run_decoder(unet, enc, cond)
        all_t = enc.named_features()
        feats_t = {n: all_t[n] for n in names}
        with torch.set_grad_enabled(torch.is_grad_enabled() and not config.stop_grad):
            feats_s = encoder_features(unet, x_s, s, encoder_hidden_states, blocks=list(names))
    if config.stop_grad:
        feats_s = {n: f.detach() for n, f in feats_s.items()}

    denoise = F.mse_loss(pred.float(), target.float())
    dists = {n: feature_distance(feats_t[n], feats_s[n], config.distance) for n in names}
    fcr = torch.stack(list(dists.values())).mean()
    loss = denoise + config.lam * fcr
    per_block = {n: d.detach() for n, d in dists.items()}
    return FCRLossOutput(loss, denoise, fcr, per_block, timesteps, deltas)
