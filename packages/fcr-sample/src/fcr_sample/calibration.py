"""Calibrated schedules: a cache's full steps chosen from a short measured run, not spread evenly.

A uniform schedule (FD-k, DeepCache-N) refreshes every k-th step whatever the trajectory does.
:func:`calibrate_schedule` runs the *uncached* sampler once on a handful of prompts, records at
every step the features the cache would reuse — FD: the encoder's outputs (``conv_in``, every
down-block residual, the mid block); DeepCache: the outputs of the modules
:func:`~fcr_sample.deep_cache.cached_module_names` lists — and measures, for every pair of steps
``i < j``, the relative change ``‖F_j − F_i‖ / ‖F_j‖`` (per sample, averaged): what step ``j``
would be served if it reused step ``i``'s features. A dynamic programme then picks the ``budget``
full steps (step 0 among them) that minimise the summed change over all served steps — among all
schedules, early-heavy ones included (Block Caching, Wimbauer et al., CVPR 2024,
https://arxiv.org/abs/2312.03209, calibrates per block from the same kind of measurement). The sum
is of norms, not squares, because consecutive stale steps' errors add coherently
(``docs/mechanism/README.md``).

The result is a :class:`CalibratedSchedule`: ``.config()`` is the existing config with explicit
steps (``EncoderCacheConfig(key_steps=...)``, ``DeepCacheConfig(full_steps=...)``), and it saves
to JSON with the identity of the UNet (class, config, a weights fingerprint), the scheduler (class
and config) and the step count; loading it for another model, scheduler or step count is refused
with :class:`ScheduleMismatchError`.

Example:
    >>> sched = calibrate_schedule(pipe, "deepcache", budget=8, prompts=["a cat", "a dog", "a car"],
    ...                            num_inference_steps=20)
    >>> sched.steps
    (0, 1, 2, 3, 5, 8, 12, 16)
    >>> sched.save("deepcache-8of20.json")
    >>> CalibratedSchedule.load("deepcache-8of20.json").apply(pipe)  # refuses another model
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from .cache_configs import ADAPTIVE_TARGETS, DeepCacheConfig, EncoderCacheConfig
from .hooks import (
    bind_unet_args,
    conditioning_kwargs,
    encode_call,
    find_cache_hooks,
    resolve_target,
)
from .unet_parts import prepare_conditioning

logger = logging.getLogger(__name__)

__all__ = ["CalibratedSchedule", "ScheduleMismatchError", "calibrate_schedule", "calibrate_schedule_from_error",
           "model_identity",
           "scheduler_identity", "feature_change_matrix", "best_full_steps"]

#: Calibrated caches: the same two targets as the adaptive cache.
CALIBRATED_TARGETS = ADAPTIVE_TARGETS
#: The file format written by :meth:`CalibratedSchedule.save`.
FORMAT = "fcr-sample calibrated schedule"
FORMAT_VERSION = 1
#: At most this many feature values per sample are kept per step (a fixed random subset beyond),
#: so that calibrating an SD-sized UNet holds steps × samples × this many floats.
MAX_FEATURE_VALUES = 1 << 16


class ScheduleMismatchError(ValueError):
    """A saved calibrated schedule used with another model, scheduler or step count than it was made for."""


# -- identity --------------------------------------------------------------------------------


def _plain(value: Any) -> Any:
    """A JSON round-trip of ``value`` (tuples become lists), so a loaded identity compares equal."""
    return json.loads(json.dumps(value, sort_keys=True, default=str))


def model_identity(unet) -> dict[str, str]:
    """What a calibrated schedule is tied to: the UNet's class, config and weights.

    The weights fingerprint hashes each parameter's name, shape, sum and sum of magnitudes (float64,
    6 significant digits), so other weights — a fine-tune, or the same weights cast to another
    dtype — count as another model.
    """
    config = {k: v for k, v in dict(unet.config).items() if not k.startswith("_")}
    h = hashlib.sha256()
    with torch.no_grad():
        for name, p in unet.named_parameters():
            d = p.detach().double()
            h.update(f"{name}{tuple(p.shape)}{float(d.sum()):.6e}{float(d.abs().sum()):.6e};".encode())
    config_text = json.dumps(_plain(config), sort_keys=True)
    return {"class": type(unet).__name__, "config_sha256": hashlib.sha256(config_text.encode()).hexdigest()[:16],
            "weights_sha256": h.hexdigest()[:16]}


def scheduler_identity(scheduler) -> dict[str, Any]:
    """The scheduler's class and config (its public keys), as a calibrated schedule stores them."""
    config = {k: v for k, v in dict(scheduler.config).items() if not k.startswith("_")}
    return {"class": type(scheduler).__name__, "config": _plain(config)}


# -- the measurement -------------------------------------------------------------------------


def _flatten(value) -> list[torch.Tensor]:
    if torch.is_tensor(value):
        return [value]
    if isinstance(value, (tuple, list)):
        return [t for v in value for t in _flatten(v)]
    return []


class _Recorder:
    """Per UNet call: the cached features, one row per sample, a fixed subset of their values."""

    def __init__(self, max_values: int):
        self.max_values = max_values
        self.steps: list[torch.Tensor] = []
        self._index: torch.Tensor | None = None

    def add(self, tensors: list[torch.Tensor]) -> None:
        b = tensors[0].shape[0]
        rows = torch.cat([t.detach().reshape(b, -1).float() for t in tensors], dim=1)
        if self._index is None and rows.shape[1] > self.max_values:
            g = torch.Generator().manual_seed(0)
            self._index = torch.randperm(rows.shape[1], generator=g)[: self.max_values].sort().values
        if self._index is not None:
            rows = rows[:, self._index.to(rows.device)]
        self.steps.append(rows.cpu())


@contextmanager
def _record_features(unet, cache: str, cache_branch_id: int, recorder: _Recorder) -> Iterator[None]:
    """While open, every ``unet(...)`` call adds the features ``cache`` would reuse to ``recorder``."""
    if cache == "deepcache":
        from .deep_cache import deep_cache_layers

        with deep_cache_layers(unet, DeepCacheConfig(cache_branch_id=cache_branch_id)) as st:
            st.refreshing = True

            def after(module, args, output):
                recorder.add([t for v in st.outputs.values() for t in _flatten(v)])

            handle = unet.register_forward_hook(after)
            try:
                yield
            finally:
                handle.remove()
        return

    def before(module, args, kwargs):
        a = bind_unet_args(module, args, kwargs)
        with torch.no_grad():
            cond = prepare_conditioning(module, a["sample"], a["timestep"], a["encoder_hidden_states"],
                                        **conditioning_kwargs(a))
            enc = encode_call(module, a, cond)
        recorder.add([*enc.down_block_res_samples, enc.mid])

    handle = unet.register_forward_pre_hook(before, with_kwargs=True)
    try:
        yield
    finally:
        handle.remove()


def feature_change_matrix(steps: list[torch.Tensor]) -> torch.Tensor:
    """``D[i, j]`` (``i < j``): the relative change ``‖F_j − F_i‖ / ‖F_j‖`` per sample, averaged.

    ``steps[s]`` holds step ``s``'s features, one row per sample; ``D`` is 0 on and below the
    diagonal.
    """
    n = len(steps)
    d = torch.zeros(n, n, dtype=torch.float64)
    norms = [s.double().norm(dim=1).clamp_min(1e-12) for s in steps]
    for j in range(1, n):
        fj = steps[j].double()
        for i in range(j):
            d[i, j] = ((fj - steps[i].double()).norm(dim=1) / norms[j]).mean()
    return d


def best_full_steps(change: torch.Tensor, budget: int) -> tuple[tuple[int, ...], float]:
    """The ``budget`` full steps (step 0 first) minimising the summed change of the served steps.

    A served step ``j`` reuses the last full step ``i <= j`` and costs ``change[i, j]``. Exact, by
    dynamic programming over where each segment ends (O(budget · n²)).

    Returns:
        ``(steps, cost)``.

    Example:
        >>> best_full_steps(torch.tensor([[0, 1., 9], [0, 0, 1], [0, 0, 0]]), 2)
        ((0, 2), 1.0)
    """
    n = change.shape[0]
    if not 1 <= budget <= n:
        raise ValueError(f"budget = {budget} full steps does not fit a run of {n} steps; use 1..{n}")
    c = change.double()
    # seg[i, e]: steps i+1 .. e-1 served from full step i
    cum = torch.zeros(n, n + 1, dtype=torch.float64)
    for i in range(n):
        cum[i, i + 1:] = torch.cumsum(torch.cat([torch.zeros(1, dtype=torch.float64), c[i, i + 1:]]), 0)

    def seg(i: int, e: int) -> float:
        return float(cum[i, e])

    inf = math.inf
    # best[k][e]: least cost of steps [0, e) with k full steps, the k-th at some i < e, next full step e
    best = [[inf] * (n + 1) for _ in range(budget + 1)]
    arg = [[-1] * (n + 1) for _ in range(budget + 1)]
    for e in range(1, n + 1):
        best[1][e] = seg(0, e)
        arg[1][e] = 0
    for k in range(2, budget + 1):
        for e in range(k, n + 1):
            for i in range(k - 1, e):
                v = best[k - 1][i] + seg(i, e)
                if v < best[k][e]:
                    best[k][e], arg[k][e] = v, i
    steps, e = [], n
    for k in range(budget, 0, -1):
        i = arg[k][e]
        steps.append(i)
        e = i
    return tuple(sorted(steps)), best[budget][n]


# -- the result ------------------------------------------------------------------------------


@dataclass(frozen=True)
class CalibratedSchedule:
    """A cache's full steps chosen by :func:`calibrate_schedule`, tied to the model it was measured on.

    Attributes:
        cache: ``"fd"`` (the steps are key steps) or ``"deepcache"`` (full steps).
        steps: the full / key step indices, step 0 first.
        num_steps: the UNet calls of the run it was calibrated for.
        budget: ``len(steps)``.
        cache_branch_id: DeepCache's cut (0 for FD).
        served_change: the summed relative feature change of the served steps (the objective),
            averaged over the calibration samples; ``uniform_change`` is that of the uniform
            schedule with the same number of full steps where one exists (stride ⌈n/budget⌉), for
            comparison.
        model / scheduler: :func:`model_identity` and :func:`scheduler_identity` (``None`` when
            calibrated on a bare UNet without a scheduler).
        samples: calibration samples (batch rows, CFG halves included).
        objective: what was minimised: ``"feature_change"`` (:func:`calibrate_schedule`) or
            ``"propagated_error"`` (:func:`calibrate_schedule_from_error`; then ``served_change``
            and ``uniform_change`` are summed final-sample errors).
    """

    cache: str
    steps: tuple[int, ...]
    num_steps: int
    budget: int
    cache_branch_id: int
    served_change: float
    uniform_change: float | None
    model: dict[str, str]
    scheduler: dict[str, Any] | None
    samples: int
    objective: str = "feature_change"

    @property
    def label(self) -> str:
        """``FD-cal5``, ``DeepCache-cal8-b0``."""
        if self.cache == "fd":
            return f"FD-cal{self.budget}"
        return f"DeepCache-cal{self.budget}-b{self.cache_branch_id}"

    def config(self, **settings):
        """The cache config that runs this schedule: ``EncoderCacheConfig(key_steps=...)`` (FD; other
        settings such as ``parallel_decoding`` pass through) or ``DeepCacheConfig(full_steps=...)``."""
        if self.cache == "fd":
            return EncoderCacheConfig(key_steps=self.steps, **settings)
        return DeepCacheConfig(full_steps=self.steps, cache_branch_id=self.cache_branch_id, **settings)

    def check(self, pipe_or_unet, *, scheduler=None, num_steps: int | None = None) -> None:
        """Refuse use with another UNet, scheduler or step count than the schedule's.

        Raises:
            ScheduleMismatchError: what differs, and what to do.
        """
        unet, pipe = resolve_target(pipe_or_unet)
        scheduler = scheduler if scheduler is not None else getattr(pipe, "scheduler", None)
        if (mine := model_identity(unet)) != self.model:
            what = [k for k in self.model if self.model.get(k) != mine.get(k)]
            raise ScheduleMismatchError(
                f"this calibrated {self.label} schedule was measured on another UNet ({', '.join(what)} differ: "
                f"{self.model} vs {mine}); calibrate again on this model (calibrate_schedule)")
        if scheduler is not None and self.scheduler is not None and scheduler_identity(scheduler) != self.scheduler:
            theirs = scheduler_identity(scheduler)
            diff = sorted(k for k in {*theirs["config"], *self.scheduler["config"]}
                          if theirs["config"].get(k) != self.scheduler["config"].get(k))
            raise ScheduleMismatchError(
                f"this calibrated {self.label} schedule was measured with {self.scheduler['class']}, not "
                f"{theirs['class']}" + (f" (config keys {diff} differ)" if diff else "")
                + "; use that scheduler or calibrate again with this one")
        if num_steps is not None and num_steps != self.num_steps:
            raise ScheduleMismatchError(
                f"this calibrated {self.label} schedule is for {self.num_steps} steps, not {num_steps}; "
                f"sample with num_inference_steps={self.num_steps} or calibrate again for {num_steps}")

    def apply(self, pipe_or_unet, **settings):
        """:meth:`check` against ``pipe_or_unet``, then attach the cache; returns the hook."""
        self.check(pipe_or_unet)
        if self.cache == "fd":
            from .encoder_cache import apply_encoder_cache

            return apply_encoder_cache(pipe_or_unet, self.config(**settings))
        from .deep_cache import apply_deep_cache

        return apply_deep_cache(pipe_or_unet, self.config(**settings))

    def to_dict(self) -> dict[str, Any]:
        return {"format": FORMAT, "version": FORMAT_VERSION, **_plain(asdict(self))}

    def save(self, path: str | Path) -> Path:
        """Write the schedule and its identity as JSON (atomically)."""
        path = Path(path)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n")
        tmp.replace(path)
        return path

    @classmethod
    def load(cls, path: str | Path, pipe_or_unet=None, *, scheduler=None,
             num_steps: int | None = None) -> CalibratedSchedule:
        """Read a saved schedule; with ``pipe_or_unet`` (and ``num_steps``) also :meth:`check` it.

        Raises:
            ValueError: not a calibrated-schedule file (the message says what is wrong).
            ScheduleMismatchError: saved for another model, scheduler or step count.
        """
        path = Path(path)
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            raise ValueError(f"{path}: no such calibrated schedule file") from None
        except json.JSONDecodeError as e:
            raise ValueError(f"{path} is not a calibrated schedule (not JSON: {e})") from None
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise ValueError(f"{path} is not a calibrated schedule (no format {FORMAT!r}); "
                             "write one with CalibratedSchedule.save")
        if data.get("version") != FORMAT_VERSION:
            raise ValueError(f"{path}: calibrated schedule format version {data.get('version')}, this fcr-sample "
                             f"reads version {FORMAT_VERSION}; calibrate again")
        fields = {k: data[k] for k in cls.__dataclass_fields__ if k in data}
        if missing := sorted(set(cls.__dataclass_fields__) - set(fields)):
            raise ValueError(f"{path}: calibrated schedule lacks {missing}; calibrate again")
        fields["steps"] = tuple(int(s) for s in fields["steps"])
        sched = cls(**fields)
        if sched.cache not in CALIBRATED_TARGETS or sched.steps[:1] != (0,) or sched.budget != len(sched.steps) \
                or sched.steps[-1] >= sched.num_steps:
            raise ValueError(f"{path}: inconsistent calibrated schedule (cache {sched.cache!r}, steps "
                             f"{list(sched.steps)} of {sched.num_steps}); calibrate again")
        if pipe_or_unet is not None:
            sched.check(pipe_or_unet, scheduler=scheduler, num_steps=num_steps)
        return sched


def _uniform_cost(change: torch.Tensor, budget: int) -> float | None:
    n = change.shape[0]
    stride = math.ceil(n / budget)
    keys = list(range(0, n, stride))
    if len(keys) != budget:
        return None
    bounds = [*keys, n]
    return float(sum(change[i, j] for i, e in zip(bounds[:-1], bounds[1:], strict=False) for j in range(i + 1, e)))


def calibrate_schedule(
    pipe_or_unet,
    cache: str = "deepcache",
    budget: int = 8,
    *,
    prompts: list[str] | None = None,
    num_inference_steps: int | None = None,
    run: Callable[[], Any] | None = None,
    num_steps: int | None = None,
    cache_branch_id: int = 0,
    scheduler=None,
    max_feature_values: int = MAX_FEATURE_VALUES,
    **pipe_kwargs,
) -> CalibratedSchedule:
    """Choose ``budget`` full steps for a cache from one uncached calibration run.

    Args:
        pipe_or_unet: a diffusers pipeline (then give ``prompts`` and ``num_inference_steps``; other
            keyword arguments, e.g. ``guidance_scale``, ``generator``, go to the pipeline call), or a
            bare UNet (then give ``run`` and ``num_steps``).
        cache: ``"deepcache"`` (its full steps) or ``"fd"`` (the encoder's key steps).
        budget: full steps per run, step 0 included (``budget == steps``: every step, no cache).
        prompts: calibration prompts (a handful; one pipeline call with them as a batch).
        num_inference_steps: the step count the schedule is for.
        run: instead of ``prompts``: a callable that makes one uncached sampling run (e.g. a
            :func:`fcr_sample.denoise` call on a bare UNet, or a pipeline call of your own).
        num_steps: with ``run``: the UNet calls of one run (several runs may be made; they are averaged).
        cache_branch_id: DeepCache's cut.
        scheduler: the scheduler to tie the schedule to (default: the pipeline's).
        max_feature_values: values per sample and step kept for the measurement.

    Returns:
        A :class:`CalibratedSchedule`.

    Raises:
        ValueError: an unknown cache, a budget outside ``1..steps``, a cache already applied, or
            missing / contradictory arguments; the message says which.

    Example:
        >>> sched = calibrate_schedule(pipe, "fd", budget=5, prompts=prompts, num_inference_steps=20)
        >>> apply_encoder_cache(pipe, sched.config())
    """
    if cache not in CALIBRATED_TARGETS:
        raise ValueError(f"unknown cache {cache!r} to calibrate; allowed are {CALIBRATED_TARGETS}")
    if int(budget) != budget or budget < 1:
        raise ValueError(f"budget must be a number of full steps >= 1, got {budget!r}")
    unet, pipe = resolve_target(pipe_or_unet)
    if find_cache_hooks(unet):
        raise ValueError("calibrate_schedule measures the uncached sampler: remove the cache applied to this UNet first")
    if run is None:
        if pipe is None:
            raise ValueError("calibrating a bare UNet needs run= (a callable making one sampling run) and num_steps=")
        if not prompts or num_inference_steps is None:
            raise ValueError("calibrating a pipeline needs prompts=[...] (a handful) and num_inference_steps=")
        n = int(num_inference_steps)
        if budget > n:
            raise ValueError(f"budget = {budget} full steps is more than the {n} steps of the run; use 1..{n}")

        def run():
            return pipe(prompt=list(prompts), num_inference_steps=n, **pipe_kwargs)
    elif prompts is not None or num_inference_steps is not None or pipe_kwargs:
        raise ValueError("give either run= (with num_steps=) or prompts= and num_inference_steps=, not both")
    elif num_steps is None:
        raise ValueError("calibrating with run= needs num_steps= (the UNet calls of one run)")
    else:
        n = int(num_steps)
        if budget > n:
            raise ValueError(f"budget = {budget} full steps is more than the {n} steps of the run; use 1..{n}")
    if cache == "deepcache":
        from .deep_cache import cached_module_names

        cached_module_names(unet, DeepCacheConfig(cache_branch_id=cache_branch_id))  # a branch too deep fails here

    recorder = _Recorder(max_feature_values)
    with _record_features(unet, cache, cache_branch_id, recorder):
        run()
    calls = len(recorder.steps)
    if num_steps is None:
        n = calls  # img2img (strength < 1) makes fewer UNet calls than inference steps
        if budget > n:
            raise ValueError(f"budget = {budget} full steps is more than the run's {n} UNet calls; use 1..{n}")
    if calls == 0 or calls % n:
        raise ValueError(f"the calibration run made {calls} UNet calls, not a multiple of num_steps = {n}")
    runs = [recorder.steps[r * n:(r + 1) * n] for r in range(calls // n)]
    per_step = [torch.cat([r[s] for r in runs]) for s in range(n)]  # runs stacked as more samples
    change = feature_change_matrix(per_step)
    scheduler = scheduler if scheduler is not None else getattr(pipe, "scheduler", None)
    return _schedule(change, cache, int(budget), cache_branch_id, unet, scheduler, int(per_step[0].shape[0]),
                     "feature_change")


def _schedule(change, cache, budget, cache_branch_id, unet, scheduler, samples, objective) -> CalibratedSchedule:
    steps, cost = best_full_steps(change, budget)
    sched = CalibratedSchedule(
        cache=cache, steps=steps, num_steps=int(change.shape[0]), budget=budget,
        cache_branch_id=int(cache_branch_id) if cache == "deepcache" else 0,
        served_change=float(cost), uniform_change=_uniform_cost(change, budget),
        model=model_identity(unet), scheduler=scheduler_identity(scheduler) if scheduler is not None else None,
        samples=samples, objective=objective)
    logger.info("calibrated %s by %s: steps %s (objective %.3f, uniform %s)", sched.label, objective, list(steps),
                cost, sched.uniform_change)
    return sched


def calibrate_schedule_from_error(
    unet,
    scheduler,
    x_T: torch.Tensor,
    cond: torch.Tensor,
    null: torch.Tensor | None = None,
    *,
    cache: str = "deepcache",
    budget: int | Sequence[int],
    steps: int,
    guidance_scale: float = 1.0,
    cache_branch_id: int = 0,
    exact: bool = False,
    progress: bool = False,
) -> CalibratedSchedule | list[CalibratedSchedule]:
    """Choose ``budget`` full steps by the attribution's *propagated* error instead of the feature change.

    For every pair of steps ``i < j`` the uncached trajectory is replayed to the end with only
    step ``j`` served from step ``i``'s features
    (:func:`fcr_sample.attribution.propagated_error_matrix`); the schedule minimises the summed
    final-sample error of its served steps. It sees what the feature change cannot: an early
    step's error is carried through all later steps. By default the matrix is linearised (each
    pair's one-step error times its step's measured propagation gain: about ``n²`` UNet calls for
    ``n`` steps); ``exact=True`` replays every pair (about ``n³/6``). Arguments
    as :func:`fcr_sample.denoise` for the trajectory (a bare UNet with no cache; CFG as one batch).
    ``budget`` may be a list: one measurement then gives a schedule per budget (a list).

    Example:
        >>> sched = calibrate_schedule_from_error(unet, DDIMScheduler(), x_T, cond, null, cache="deepcache",
        ...                                       budget=8, steps=20, guidance_scale=2.0)
    """
    from .attribution import propagated_error_matrix

    if cache not in CALIBRATED_TARGETS:
        raise ValueError(f"unknown cache {cache!r} to calibrate; allowed are {CALIBRATED_TARGETS}")
    budgets = [budget] if isinstance(budget, int) else list(budget)
    for b in budgets:
        if int(b) != b or not 1 <= b <= steps:
            raise ValueError(f"budget = {b!r} full steps does not fit a run of {steps} steps; use 1..{steps}")
    config = DeepCacheConfig(cache_branch_id=cache_branch_id) if cache == "deepcache" else EncoderCacheConfig()
    unet, _ = resolve_target(unet)
    if cache == "deepcache":
        from .deep_cache import cached_module_names

        cached_module_names(unet, config)  # a branch too deep fails here
    error = propagated_error_matrix(unet, scheduler, x_T, cond, null, cache=config, steps=steps,
                                    guidance_scale=guidance_scale, exact=exact, progress=progress)
    out = [_schedule(error, cache, int(b), cache_branch_id, unet, scheduler, int(x_T.shape[0]), "propagated_error")
           for b in budgets]
    return out[0] if isinstance(budget, int) else out
