"""Where a cache's error enters: per-step, per-feature attribution on the real sampling trajectory.

An encoder cache (FD-k) or DeepCache serves the steps between two key steps from features computed
at the key step. :func:`attribute_cache_error` walks the *uncached* trajectory (fresh features at
every step) and, at every step the cache would serve, compares the cached path against the fresh
one with the *same* input, so each number isolates the error that step adds:

* the one-step error of the cached prediction (relative, in ε and in the predicted x0);
* its attribution to each cached feature: only that feature stale (the others fresh), and only
  that feature fresh (the others stale);
* the change of each cached feature on the trajectory itself (σ²_Δ, the feature energy, their
  ratio) and the decoder's gain: one-step error per unit of scale-free feature change;
* optionally the propagation: the final sample's error when only that step is served from cache.

"Stale" is what the cache really holds: the features of the step's preceding key step on the same
uncached trajectory, with key steps from the cache config's own ``key_steps_for``. The cut between
cached and recomputed parts is the caches' own: the encoder/decoder split of
:mod:`fcr_sample.unet_parts` for FD (features grouped as ``conv_in``, ``down_blocks.i``,
``mid_block``), and for DeepCache the output of the last module
:func:`~fcr_sample.deep_cache.cached_module_names` reuses — the one reused feature the running
shallow path reads.

Example:
    >>> res = attribute_cache_error(unet, DDIMScheduler(), x_T, cond, null, steps=20,
    ...                             guidance_scale=2.0, cache=EncoderCacheConfig(stride=10),
    ...                             propagation=True)
    >>> [(s.step, s.eps_error, s.final_error) for s in res.steps]  # steps 1-9, 11-19
    >>> res.to_rows()[0]  # {"step": 1, "timestep": ..., "feature": "all", "quantity": ...}
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from dataclasses import dataclass, replace
from typing import Any

import torch
from tqdm import tqdm

from .deep_cache import DeepCacheConfig, cached_module_names
from .encoder_cache import EncoderCacheConfig
from .features import select_feature_names
from .hooks import find_cache_hooks
from .unet_parts import EncoderOutput, prepare_conditioning, run_decoder, run_encoder

__all__ = ["FeatureAttribution", "StepAttribution", "CacheAttribution", "attribute_cache_error",
           "propagated_error_matrix"]

#: The ``feature`` of rows that describe a step as a whole (all cached features stale together).
ALL_FEATURES = "all"
#: The quantities :meth:`CacheAttribution.to_rows` writes, per step and per feature.
STEP_QUANTITIES = ("key_step", "eps_error", "x0_error", "change", "energy", "relative_change",
                   "decoder_gain", "final_error")
FEATURE_QUANTITIES = ("only_stale_error", "only_fresh_error", "change", "energy",
                      "relative_change", "decoder_gain")


# -- the typed result ------------------------------------------------------------------------


@dataclass(frozen=True)
class FeatureAttribution:
    """One cached feature at one served step. Errors are relative squared errors
    ``‖ε_cached − ε_fresh‖² / ‖ε_fresh‖²`` pooled over the batch (a ratio of sums).

    Attributes:
        feature: ``"conv_in"``, ``"down_blocks.i"`` (all its residuals), ``"mid_block"``, or the
            DeepCache module whose output is reused.
        only_stale_error: the one-step ε error with only this feature stale, the others fresh.
        only_fresh_error: the one-step ε error with only this feature fresh, the others stale.
        change: σ²_Δ, the mean squared difference between the stale and the fresh feature.
        energy: the mean square of the fresh feature.
        relative_change: ``change / energy`` (scale-free).
        decoder_gain: ``only_stale_error / relative_change``; ``None`` where nothing changed.
    """

    feature: str
    only_stale_error: float
    only_fresh_error: float
    change: float
    energy: float
    relative_change: float
    decoder_gain: float | None


@dataclass(frozen=True)
class StepAttribution:
    """One served step: all cached features stale, as the cache runs it.

    Attributes:
        step / timestep / key_step: the step index, its timestep, the key step it reuses.
        eps_error / x0_error: one-step relative error in ε and in the scheduler's predicted x0
            (``None`` when the scheduler reports no x0, e.g. DPM-Solver++).
        change / energy / relative_change / decoder_gain: as for a feature, pooled over all cached
            features; the gain is ``eps_error / relative_change``.
        final_error: ``‖x_final' − x_final‖² / ‖x_final‖²`` when only this step is served from
            the cache (``None`` unless asked for with ``propagation=True``).
        features: per cached feature, in forward order.
    """

    step: int
    timestep: float
    key_step: int
    eps_error: float
    x0_error: float | None
    change: float
    energy: float
    relative_change: float
    decoder_gain: float | None
    final_error: float | None
    features: tuple[FeatureAttribution, ...]


@dataclass(frozen=True)
class CacheAttribution:
    """What :func:`attribute_cache_error` measured for one cache, batch and weights.

    Attributes:
        cache: the cache config's ``label`` (``FD-10``, ``DeepCache-N5-b0``).
        num_steps / key_steps: the run and its key (full) steps.
        steps: one entry per measured step, in order.
    """

    cache: str
    num_steps: int
    key_steps: tuple[int, ...]
    steps: tuple[StepAttribution, ...]

    def to_rows(self) -> list[dict[str, Any]]:
        """Plain rows ``{step, timestep, feature, quantity, value}`` for a results store.

        Step-wide quantities have ``feature == "all"``; ``None`` values (no x0, no propagation,
        an undefined gain) give no row.
        """
        rows: list[dict[str, Any]] = []
        for s in self.steps:
            parts = [(ALL_FEATURES, s, STEP_QUANTITIES)] + [(f.feature, f, FEATURE_QUANTITIES)
                                                           for f in s.features]
            rows += [{"step": s.step, "timestep": s.timestep, "feature": name, "quantity": q,
                      "value": float(getattr(obj, q))}
                     for name, obj, quantities in parts for q in quantities
                     if getattr(obj, q) is not None]
        return rows


# -- the two cache paths: fresh forward, features, and a decode with chosen features stale ---


@dataclass
class _Fresh:
    """One step's uncached forward: raw (unguided) output, its features and its inputs."""

    eps: torch.Tensor
    state: Any  # FD: the EncoderOutput; DeepCache: the reused module's output
    inputs: tuple[torch.Tensor, Any, torch.Tensor]  # model input, timestep, text states
    cond: Any = None  # FD: the step's Conditioning (its own time embedding)


class _EncoderCachePath:
    """FD-k: the decoder reads the cached encoder outputs with the step's own time embedding."""

    def __init__(self, unet):
        self.unet = unet
        downs = ["conv_in"] + [f"down_blocks.{i}" for i in range(len(unet.down_blocks))]
        self.members = {g: frozenset(select_feature_names(unet, g)) for g in downs}
        # the cache reuses EncoderOutput.mid, the mid block's output (the last down block's
        # hidden state where a UNet has no mid block), under the name "mid_block"
        self.members["mid_block"] = frozenset({"mid_block"})
        self.features = tuple(self.members)

    def run(self, sample, t, ehs) -> _Fresh:
        cond = prepare_conditioning(self.unet, sample, t, ehs)
        enc = run_encoder(self.unet, sample, cond)
        return _Fresh(run_decoder(self.unet, enc, cond), enc, (sample, t, ehs), cond)

    def decode(self, fresh: _Fresh, stale: _Fresh, stale_features) -> torch.Tensor:
        names = frozenset().union(*(self.members[g] for g in stale_features))
        f, s = fresh.state, stale.state
        mixed = replace(
            f,
            down_block_res_samples=tuple(
                sv if n in names else fv
                for n, fv, sv in zip(f.names, f.down_block_res_samples, s.down_block_res_samples,
                                     strict=True)
            ),
            mid=s.mid if "mid_block" in names else f.mid,
        )
        return run_decoder(self.unet, mixed, fresh.cond)

    def tensors(self, state: EncoderOutput, feature: str) -> list[torch.Tensor]:
        named = state.named_features()
        return [named[n] for n in sorted(self.members[feature])]


class _DeepCachePath:
    """DeepCache: the shallow path reads one reused feature, the last cached module's output.

    Only that output enters the modules that still run (the other cached modules feed only
    cached ones), so replacing it in a full forward gives DeepCache's cached step.
    """

    def __init__(self, unet, config: DeepCacheConfig):
        self.unet = unet
        name = cached_module_names(unet, config)[-1]
        self.module = unet.get_submodule(name)
        self.features = (name,)

    def _forward(self, inputs, hook) -> torch.Tensor:
        handle = self.module.register_forward_hook(hook)
        try:
            sample, t, ehs = inputs
            return self.unet(sample, t, ehs).sample
        finally:
            handle.remove()

    def run(self, sample, t, ehs) -> _Fresh:
        seen: list[Any] = []
        eps = self._forward((sample, t, ehs), lambda m, args, out: seen.append(out))
        return _Fresh(eps, seen[-1], (sample, t, ehs))

    def decode(self, fresh: _Fresh, stale: _Fresh, stale_features) -> torch.Tensor:
        if not stale_features:  # a forward without the replacement is the fresh one
            return fresh.eps
        return self._forward(fresh.inputs, lambda m, args, out: stale.state)

    def tensors(self, state: Any, feature: str) -> list[torch.Tensor]:
        if isinstance(state, tuple):  # attention blocks return (hidden,) with return_dict=False
            state = state[0]
        return [getattr(state, "sample", state)]


# -- measuring -------------------------------------------------------------------------------


def _rel_error(a: torch.Tensor, ref: torch.Tensor) -> float:
    return float((a - ref).double().pow(2).sum() / ref.double().pow(2).sum())


def _guided(raw: torch.Tensor, guidance_scale: float) -> torch.Tensor:
    if guidance_scale == 1.0:
        return raw
    u, c = raw.chunk(2)
    return u + guidance_scale * (c - u)


def _change(path, fresh: _Fresh, stale: _Fresh, features) -> tuple[float, float]:
    """``(σ²_Δ, energy)`` pooled over the tensors of ``features`` (means over all elements)."""
    diff = energy = numel = 0.0
    for feature in features:
        for f, s in zip(path.tensors(fresh.state, feature), path.tensors(stale.state, feature),
                        strict=True):
            diff += float((s - f).double().pow(2).sum())
            energy += float(f.double().pow(2).sum())
            numel += f.numel()
    return diff / numel, energy / numel


def _gain(error: float, relative_change: float) -> float | None:
    return error / relative_change if relative_change > 0 else None


def _feature_rows(path, fresh: _Fresh, stale: _Fresh, eps_fresh, guidance_scale):
    out = []
    for feature in path.features:
        others = tuple(f for f in path.features if f != feature)
        only_stale = _guided(path.decode(fresh, stale, (feature,)), guidance_scale)
        only_fresh = _guided(path.decode(fresh, stale, others), guidance_scale)
        change, energy = _change(path, fresh, stale, (feature,))
        rel = change / energy if energy > 0 else 0.0
        err = _rel_error(only_stale, eps_fresh)
        out.append(FeatureAttribution(feature, err, _rel_error(only_fresh, eps_fresh), change,
                                      energy, rel, _gain(err, rel)))
    return tuple(out)


def _measure_step(path, fresh, stale, eps_cached, *, step, timestep, key_step, eps_fresh,
                  guidance_scale, x0_fresh, x0_cached) -> StepAttribution:
    """The one-step quantities of a served step (``eps_cached``: all cached features stale)."""
    err = _rel_error(eps_cached, eps_fresh)
    change, energy = _change(path, fresh, stale, path.features)
    rel = change / energy if energy > 0 else 0.0
    x0_err = None if x0_fresh is None or x0_cached is None else _rel_error(x0_cached, x0_fresh)
    return StepAttribution(
        step=step, timestep=timestep, key_step=key_step, eps_error=err, x0_error=x0_err,
        change=change, energy=energy, relative_change=rel, decoder_gain=_gain(err, rel),
        final_error=None,
        features=_feature_rows(path, fresh, stale, eps_fresh, guidance_scale),
    )


# -- the walk --------------------------------------------------------------------------------


def _path_for(unet, cache):
    if isinstance(cache, EncoderCacheConfig):
        if cache.prior_noise_alpha > 0:
            raise ValueError(
                "attribution measures the cache on the uncached trajectory, which has no prior "
                f"noise injection: pass the EncoderCacheConfig with prior_noise_alpha=0 (got "
                f"{cache.prior_noise_alpha})"
            )
        return _EncoderCachePath(unet)
    if isinstance(cache, DeepCacheConfig):
        return _DeepCachePath(unet, cache)
    raise TypeError(
        f"cache must be an EncoderCacheConfig or a DeepCacheConfig, got {type(cache).__name__}"
    )


def _steps_from(path, scheduler, x, timesteps, start, ehs, guidance_scale) -> Iterator[tuple]:
    """Uncached steps ``start..`` from state ``x``: yields ``(i, t, x, fresh, eps)`` before each
    scheduler step; the caller steps ``scheduler`` and sends back the next state."""
    for i in range(start, len(timesteps)):
        t = timesteps[i]
        inp = scheduler.scale_model_input(x, t)
        sample = torch.cat([inp, inp]) if guidance_scale != 1.0 else inp
        fresh = path.run(sample, t, ehs)
        x = yield i, t, x, fresh, _guided(fresh.eps, guidance_scale)


def _replay_final(path, scheduler, x, timesteps, start, ehs, guidance_scale) -> torch.Tensor:
    """The final state of the uncached steps ``start..`` from ``x`` with ``scheduler`` as it is."""
    walk = _steps_from(path, scheduler, x, timesteps, start, ehs, guidance_scale)
    try:
        _, t, x, _, eps = next(walk)
        while True:
            x = scheduler.step(eps, t, x).prev_sample
            _, t, x, _, eps = walk.send(x)
    except StopIteration:
        return x


def attribute_cache_error(
    unet,
    scheduler,
    x_T: torch.Tensor,
    cond: torch.Tensor,
    null: torch.Tensor | None = None,
    *,
    cache: EncoderCacheConfig | DeepCacheConfig,
    steps: int,
    guidance_scale: float = 1.0,
    propagation: bool = False,
    measure_key_steps: bool = False,
    progress: bool = False,
) -> CacheAttribution:
    """Measure where ``cache``'s error enters along the uncached sampling trajectory.

    The trajectory is :func:`fcr_sample.denoise`'s (same scaling, CFG as one 2B batch,
    unconditional first); the UNet must carry no cache (the diagnostic applies the cache's logic
    itself and leaves the UNet exactly as it was). Runs under ``torch.no_grad``. Use a
    deterministic scheduler (DDIM, DPM-Solver++, Euler; not ancestral ones) for the propagation.

    Args:
        unet: a diffusers ``UNet2DConditionModel`` with no fcr-sample cache applied.
        scheduler: a diffusers scheduler; ``set_timesteps(steps)`` is called on it.
        x_T / cond / null / guidance_scale: as for :func:`fcr_sample.denoise`.
        cache: an :class:`EncoderCacheConfig` (FD-k, ``prior_noise_alpha=0``) or a
            :class:`DeepCacheConfig`; its run-level key steps (``key_steps_for_run`` / ``full_steps_for_run``) decide what is served.
        steps: number of sampler steps.
        propagation: also measure the final sample's error when only that step is served from
            the cache (one extra partial trajectory per measured step).
        measure_key_steps: also measure key steps, where the "stale" features are the step's own:
            every quantity there is exactly 0 (a self-check of the measurement).
        progress: show a tqdm bar.

    Returns:
        A :class:`CacheAttribution`; ``.to_rows()`` gives plain rows for a results store.

    Raises:
        ValueError: a cache is attached to ``unet``, CFG without ``null``, prior noise on.
        TypeError: ``cache`` is neither config.

    Example:
        >>> res = attribute_cache_error(unet, DDIMScheduler(), x_T, cond, null, steps=20,
        ...                             guidance_scale=2.0, cache=DeepCacheConfig(3, 0))
        >>> max(res.steps, key=lambda s: s.eps_error).step
    """
    _check_uncached(unet, guidance_scale, null, steps)
    path = _path_for(unet, cache)
    # the same run-level check as the caches themselves (a stride past the run is refused here too)
    run_keys = cache.key_steps_for_run(steps) if isinstance(cache, EncoderCacheConfig) else cache.full_steps_for_run(steps)
    keys = sorted(k for k in run_keys if k < steps)
    ehs = torch.cat([null, cond]) if guidance_scale != 1.0 else cond
    with torch.no_grad():
        scheduler.set_timesteps(steps, device=x_T.device)
        timesteps = scheduler.timesteps
        measured = _walk(path, scheduler, x_T * scheduler.init_noise_sigma, timesteps, ehs,
                         guidance_scale, keys, propagation, measure_key_steps, progress)
    return CacheAttribution(cache=cache.label, num_steps=steps, key_steps=tuple(keys),
                            steps=tuple(measured))


def _check_uncached(unet, guidance_scale: float, null, steps) -> None:
    if find_cache_hooks(unet):
        raise ValueError(
            "a cache is applied to this UNet: remove it first (remove_encoder_cache / "
            "remove_deep_cache); the attribution walks the uncached trajectory"
        )
    if guidance_scale != 1.0 and null is None:
        raise ValueError("classifier-free guidance (guidance_scale != 1) needs the unconditional states `null`")
    if int(steps) != steps or steps < 1:
        raise ValueError(f"steps must be an integer >= 1, got {steps!r}")


def propagated_error_matrix(
    unet,
    scheduler,
    x_T: torch.Tensor,
    cond: torch.Tensor,
    null: torch.Tensor | None = None,
    *,
    cache: EncoderCacheConfig | DeepCacheConfig,
    steps: int,
    guidance_scale: float = 1.0,
    exact: bool = False,
    progress: bool = False,
) -> torch.Tensor:
    """``E[i, j]`` (``i < j``): the final sample's relative error ``‖x'_0 − x_0‖ / ‖x_0‖`` when only
    step ``j`` is served from the cache, with the features of step ``i``, on the uncached trajectory.

    What a schedule that serves ``j`` from ``i`` costs in the output, not only in the features
    (``fcr_sample.calibrate_schedule_from_error`` picks a schedule from it). Arguments as
    :func:`attribute_cache_error` (only ``cache``'s kind and DeepCache's branch matter, not its
    schedule). Holds every step's cached features: meant for a calibration batch, not a run.

    Args:
        exact: replay every pair to the end (``n²/2`` cached decodes and about ``n³/6`` replayed
            UNet calls for ``n`` steps). Default: linearised — every pair's one-step error
            ``‖ε'_j − ε_j‖ / ‖ε_j‖`` (``n²/2`` cached decodes, no replay) times step ``j``'s measured
            propagation gain, the final error per unit of one-step error when step ``j`` is served
            from step ``j − 1`` (one replay per step, about ``n²/2`` UNet calls).

    Example:
        >>> E = propagated_error_matrix(unet, DDIMScheduler(), x_T, cond, null, steps=20,
        ...                             guidance_scale=2.0, cache=DeepCacheConfig(cache_branch_id=0))
        >>> E[0, 1:6]  # serving steps 1..5 from step 0
    """
    _check_uncached(unet, guidance_scale, null, steps)
    path = _path_for(unet, cache)
    ehs = torch.cat([null, cond]) if guidance_scale != 1.0 else cond
    n = int(steps)
    out_matrix = torch.zeros(n, n, dtype=torch.float64)
    with torch.no_grad():
        scheduler.set_timesteps(n, device=x_T.device)
        timesteps = scheduler.timesteps
        walk = _steps_from(path, scheduler, x_T * scheduler.init_noise_sigma, timesteps, 0, ehs, guidance_scale)
        records = []  # per step: timestep, state, fresh forward, the scheduler as it is before the step
        _, t, x, fresh, eps = next(walk)
        while True:
            records.append((t, x, fresh, copy.deepcopy(scheduler)))
            out = scheduler.step(eps, t, x)
            try:
                _, t, x, fresh, eps = walk.send(out.prev_sample)
            except StopIteration:
                break
        final = out.prev_sample
        pairs = [(i, j) for j in range(1, n) for i in (j - 1, *range(j - 1))]  # the gain's pair first
        gain = {}
        for i, j in tqdm(pairs, desc="propagated error", disable=not progress):
            t_j, x_j, fresh_j, sched_j = records[j]
            eps_cached = _guided(path.decode(fresh_j, records[i][2], path.features), guidance_scale)
            if not exact and i < j - 1:  # linearised: this pair's one-step error times the step's gain
                out_matrix[i, j] = gain[j] * _rel_error(eps_cached, _guided(fresh_j.eps, guidance_scale)) ** 0.5
                continue
            probe = copy.deepcopy(sched_j)
            x_next = probe.step(eps_cached, t_j, x_j).prev_sample
            end = _replay_final(path, probe, x_next, timesteps, j + 1, ehs, guidance_scale)
            out_matrix[i, j] = _rel_error(end, final) ** 0.5
            one_step = _rel_error(eps_cached, _guided(fresh_j.eps, guidance_scale)) ** 0.5
            gain[j] = float(out_matrix[i, j]) / one_step if one_step > 0 else 0.0
    return out_matrix


def _walk(path, scheduler, x, timesteps, ehs, guidance_scale, keys, propagation,
          measure_key_steps, progress) -> list[StepAttribution]:
    """Walk the uncached trajectory, measuring served steps; then replay for the propagation."""
    key_set, measured, branches = set(keys), [], []
    stale = None  # (key step, its fresh forward): what the cache holds
    walk = _steps_from(path, scheduler, x, timesteps, 0, ehs, guidance_scale)
    with tqdm(total=len(timesteps), desc="cache attribution", disable=not progress) as bar:
        i, t, x, fresh, eps = next(walk)
        while True:
            if i in key_set:
                stale = (i, fresh)
            # the cached branch steps a copy of the scheduler as it is before this step
            # (multistep schedulers keep state); the propagation continues from that copy
            probe = copy.deepcopy(scheduler) if i not in key_set or measure_key_steps else None
            out = scheduler.step(eps, t, x)
            if probe is not None:
                eps_cached = _guided(path.decode(fresh, stale[1], path.features), guidance_scale)
                cached_out = probe.step(eps_cached, t, x)
                measured.append(_measure_step(
                    path, fresh, stale[1], eps_cached, step=i, timestep=float(t),
                    key_step=stale[0], eps_fresh=eps, guidance_scale=guidance_scale,
                    x0_fresh=getattr(out, "pred_original_sample", None),
                    x0_cached=getattr(cached_out, "pred_original_sample", None),
                ))
                if propagation:
                    branches.append((len(measured) - 1, i + 1, cached_out.prev_sample, probe))
            bar.update(1)
            try:
                i, t, x, fresh, eps = walk.send(out.prev_sample)
            except StopIteration:
                break
    final = out.prev_sample
    for idx, start, x_branch, probe in tqdm(branches, desc="propagation", disable=not progress):
        end = _replay_final(path, probe, x_branch, timesteps, start, ehs, guidance_scale)
        measured[idx] = replace(measured[idx], final_error=_rel_error(end, final))
    return measured
