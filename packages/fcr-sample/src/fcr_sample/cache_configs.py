"""The cache configs of fcr-sample — :class:`EncoderCacheConfig` (Faster Diffusion encoder
caching) and :class:`DeepCacheConfig` — as plain dataclasses that import no torch.

They are defined here so that a planner (fcr-eval's ``plan``) can build the very config objects a
run uses, and read their effective schedules, without importing torch or diffusers;
:mod:`fcr_sample.encoder_cache` and :mod:`fcr_sample.deep_cache` (which attach them to a UNet)
re-export them.

Example:
    >>> EncoderCacheConfig(stride=4).key_steps_for(10)
    [0, 4, 8]
    >>> DeepCacheConfig(cache_interval=5).label
    'DeepCache-N5-b0'
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from .schedules import NAMED_SCHEDULES, key_steps

__all__ = ["EncoderCacheConfig", "DeepCacheConfig", "AdaptiveCacheConfig", "ADAPTIVE_TARGETS", "SKIP_MODES",
           "LAYERS_PER_BRANCH_BLOCK", "nonuniform_full_steps"]


def _explicit_steps(steps, name: str) -> tuple[int, ...]:
    """An explicit step list as a sorted tuple of distinct ints; it must hold step 0 and no negative step."""
    out = tuple(sorted({int(s) for s in steps}))
    if not out or out[0] < 0:
        raise ValueError(f"{name} must be step indices >= 0, got {list(steps)}")
    if out[0] != 0:
        raise ValueError(f"{name} must include step 0, got {list(steps)}")
    return out


@dataclass(frozen=True)
class EncoderCacheConfig:
    """How encoder features are reused.

    Attributes:
        stride: uniform key-step stride k ("FD-k"): steps 0, k, 2k, ... are key. Ignored when
            ``key_steps`` or ``schedule="faster-diffusion"`` is given.
        key_steps: explicit key-step indices; must start at 0.
        schedule: ``"uniform"`` (use ``stride``) or ``"faster-diffusion"`` (the published
            non-uniform lists for 50 and 20 steps).
        always_key_first: make the first n steps key as well.
        parallel_decoding: run a group's decoders as one batch at its first step.
        max_parallel_steps: at most this many steps' decoders in one batch (``None`` for no cap).
            A longer group continues in further batches.
        max_parallel_bytes: a second cap on a decoder batch, by size: the decoder's largest
            activation for the whole batch (:func:`decoder_activation_bytes` per step × steps)
            stays within this many bytes. ``"auto"`` (default): :data:`PARALLEL_BYTES_AUTO` for
            the device, so that on a CPU a large image batch decodes step by step (batching
            steps there made FD-10 slower than sequential, and slower than no cache) while a
            small one still batches; ``None``: no size cap.
        prior_noise_alpha: Faster Diffusion's prior noise injection ``z_t += α·z_T`` for steps
            with ``t / T < prior_noise_tau``; 0 disables it (FD uses 0.003). It changes the
            latents between steps, so it runs as a step callback: :func:`fcr_sample.denoise`
            runs it by itself; a pipeline call needs
            ``callback_on_step_end=hook.prior_noise_step_end`` (a clear error says so otherwise).
        prior_noise_tau: threshold on ``t / num_train_timesteps`` (FD: 0.5).

    Example:
        >>> EncoderCacheConfig(stride=10)
        >>> EncoderCacheConfig(schedule="faster-diffusion", prior_noise_alpha=0.003)
    """

    stride: int | None = 10
    key_steps: tuple[int, ...] | None = None
    schedule: str = "uniform"
    always_key_first: int = 0
    parallel_decoding: bool = True
    max_parallel_steps: int | None = 10
    max_parallel_bytes: int | str | None = "auto"
    prior_noise_alpha: float = 0.0
    prior_noise_tau: float = 0.5

    def __post_init__(self):
        if self.schedule not in NAMED_SCHEDULES:
            raise ValueError(f"unknown schedule {self.schedule!r}; allowed are {NAMED_SCHEDULES}")
        if self.key_steps is not None:
            object.__setattr__(self, "key_steps", _explicit_steps(self.key_steps, "key_steps"))
        elif self.schedule == "uniform":
            if self.stride is None or int(self.stride) != self.stride or self.stride < 1:
                raise ValueError(f"stride must be an integer >= 1, got {self.stride!r}")
        if self.always_key_first < 0:
            raise ValueError(f"always_key_first must be >= 0, got {self.always_key_first}")
        if self.max_parallel_steps is not None and self.max_parallel_steps < 1:
            raise ValueError(
                f"max_parallel_steps must be >= 1 or None, got {self.max_parallel_steps}"
            )
        if not (
            self.max_parallel_bytes in (None, "auto")
            or (isinstance(self.max_parallel_bytes, int) and self.max_parallel_bytes >= 1)
        ):
            raise ValueError(
                f"max_parallel_bytes must be 'auto', None or a number of bytes >= 1, got {self.max_parallel_bytes!r}"
            )
        if self.prior_noise_alpha < 0:
            raise ValueError(f"prior_noise_alpha must be >= 0, got {self.prior_noise_alpha}")
        if not 0.0 <= self.prior_noise_tau <= 1.0:
            raise ValueError(
                f"prior_noise_tau is a fraction of the training timesteps in [0, 1], got {self.prior_noise_tau}"
            )

    def key_steps_for(self, num_steps: int) -> list[int]:
        """The effective key-step indices for a run of ``num_steps`` UNet calls.

        This is the schedule the hook uses (explicit ``key_steps`` first, then the published
        list, then the uniform ``stride``), so a planner can record it without re-deriving it.

        Example:
            >>> EncoderCacheConfig(stride=4).key_steps_for(10)
            [0, 4, 8]
            >>> EncoderCacheConfig(schedule="faster-diffusion").key_steps_for(20)  # stride ignored
            [0, 1, 2, 3, 5, 10, 15]
        """
        return key_steps(
            num_steps,
            stride=self.stride,
            steps=self.key_steps,
            schedule=self.schedule,
            always_key_first=self.always_key_first,
        )

    def key_steps_for_run(self, num_steps: int, num_schedule_steps: int | None = None) -> list[int]:
        """The key steps of one sampling run, after checking the config against that run.

        The config alone cannot know the run's length; this is where a value that does not fit
        it is refused, at the run's start (its first UNet call, or
        :func:`fcr_sample.start_sampling_run`), as ``fcr-eval plan`` refuses it in an experiment.

        Args:
            num_steps: the run's UNet calls (img2img: only the steps its strength runs).
            num_schedule_steps: the step count the scheduler was set to (the published
                Faster Diffusion lists are defined per count); default ``num_steps``.

        Raises:
            ValueError: a uniform ``stride`` larger than ``num_steps`` (step 0 would be the only key
                step whatever the stride; ``stride == num_steps`` is that schedule, spelt
                exactly), explicit ``key_steps`` past the run, or the published schedule for a
                step count it has no list for. The message names the value and the step count.

        Example:
            >>> EncoderCacheConfig(stride=4).key_steps_for_run(10)
            [0, 4, 8]
            >>> EncoderCacheConfig(stride=50).key_steps_for_run(5)
            ValueError: EncoderCacheConfig.stride = 50 is larger than this sampling run's 5 steps ...
        """
        if num_steps < 1:
            raise ValueError(f"a sampling run needs at least one step, got {num_steps}")
        stride = self.effective_stride
        if stride is not None and stride > num_steps:
            raise ValueError(
                f"EncoderCacheConfig.stride = {stride} is larger than this sampling run's {num_steps} steps, "
                "so step 0 would be its only key step and the stride would mean nothing; use a stride "
                f"<= {num_steps} (stride = {num_steps}: one key step), or sample with more steps"
            )
        # Uniform and explicit schedules count UNet calls (PNDM makes one more call than it has
        # steps); the published FD lists are defined per number of inference steps.
        published = self.schedule == "faster-diffusion" and self.key_steps is None
        n = (num_schedule_steps or num_steps) if published else num_steps
        return [k for k in self.key_steps_for(n) if k < num_steps]

    @property
    def effective_stride(self) -> int | None:
        """The uniform stride the schedule uses, or ``None`` when it is not uniform (explicit
        ``key_steps`` or the published schedule, where ``stride`` is ignored)."""
        if self.key_steps is not None or self.schedule != "uniform":
            return None
        return int(self.stride)

    @property
    def label(self) -> str:
        """Short name for tables and plots, e.g. ``FD-10``, ``FD-10-seq``, ``FD-published``."""
        if self.key_steps is not None:
            base = "FD-custom"
        elif self.schedule == "faster-diffusion":
            base = "FD-published"
        else:
            base = f"FD-{self.stride}"
        return base if self.parallel_decoding else base + "-seq"


#: How DeepCache picks its full steps: every N-th step, or the package's power curve.
SKIP_MODES = ("uniform", "non-uniform")

#: Layers per block that ``cache_branch_id = 3·block + layer`` assumes (SD: 2 resnets + 1).
LAYERS_PER_BRANCH_BLOCK = 3


def nonuniform_full_steps(
    num_steps: int, num_full: int, *, center: int, pow: float
) -> tuple[list[int], float]:
    """The DeepCache package's non-uniform full steps and the exponent it settled on.

    ``num_full + 1`` points are spaced evenly between ``(-center)^(1/p)`` and
    ``(num_steps - center)^(1/p)`` and raised back to the power ``p``, so they crowd around
    ``center``; the package takes these powers on the principal complex branch (a negative base
    gives a complex root), keeps the real part truncated toward zero, drops both ends of the
    distinct values, shifts them by ``center`` and prepends step 0. ``p`` starts at ``pow`` and
    drops by 0.02 until exactly ``num_full`` steps come out.

    Raises:
        ValueError: no exponent above 1 gives ``num_full`` distinct steps (fewer full steps, a
            smaller ``center`` or a larger ``pow`` help).

    Example:
        >>> nonuniform_full_steps(50, 10, center=15, pow=1.4)[0]
        [0, 5, 9, 13, 17, 21, 26, 31, 37, 43]
    """
    if num_full < 1:
        raise ValueError(f"num_full must be >= 1, got {num_full}")
    p = float(pow)
    while p > 1:
        lo = complex(-center) ** (1 / p)
        hi = complex(num_steps - center) ** (1 / p)
        points = np.linspace(lo, hi, num_full + 1) ** p
        distinct = np.unique(np.trunc(points.real).astype(np.int64))
        steps = [0] + [int(v) + center for v in distinct[1:-1]]
        if len(steps) == num_full:
            return steps, p
        p -= 0.02
    raise ValueError(
        f"DeepCache's non-uniform schedule finds no exponent in (1, {pow}] giving {num_full} full "
        f"steps out of {num_steps} around center={center}: lower cache_interval's full-step count, "
        "move center toward the start, or raise pow"
    )


@dataclass(frozen=True)
class DeepCacheConfig:
    """DeepCache settings, with the reference package's meaning.

    Attributes:
        cache_interval: N. Uniform: steps 0, N, 2N, ... are full. Non-uniform: ⌈n/N⌉ full steps.
        cache_branch_id: ``3·block + layer``: where the shallow path that still runs at cached
            steps ends (0 = shallowest; see the module docstring).
        skip_mode: ``"uniform"`` or ``"non-uniform"`` (:data:`SKIP_MODES`).
        pow: non-uniform only: the starting exponent of the power curve (the package's ``pow``).
        center: non-uniform only: the step the full steps crowd around (the package's ``center``).
        full_steps: explicit full-step indices (must include 0), e.g. a calibrated schedule
            (:func:`fcr_sample.calibrate_schedule`); ``cache_interval`` and ``skip_mode`` are then
            ignored.

    Example:
        >>> DeepCacheConfig(cache_interval=5, cache_branch_id=0).key_steps_for(20)
        [0, 5, 10, 15]
        >>> DeepCacheConfig(5, 0, skip_mode="non-uniform", pow=1.4, center=15).label
        'DeepCache-N5-b0-nonuniform-c15-p1.4'
        >>> DeepCacheConfig(full_steps=(0, 1, 3, 6, 12)).key_steps_for(20)
        [0, 1, 3, 6, 12]
    """

    cache_interval: int = 5
    cache_branch_id: int = 0
    skip_mode: str = "uniform"
    pow: float = 1.4
    center: int = 15
    full_steps: tuple[int, ...] | None = None

    def __post_init__(self):
        if self.full_steps is not None:
            object.__setattr__(self, "full_steps", _explicit_steps(self.full_steps, "full_steps"))
        if int(self.cache_interval) != self.cache_interval or self.cache_interval < 1:
            raise ValueError(f"cache_interval must be an integer >= 1, got {self.cache_interval!r}")
        if int(self.cache_branch_id) != self.cache_branch_id or self.cache_branch_id < 0:
            raise ValueError(
                f"cache_branch_id must be an integer >= 0 (3·block + layer), got {self.cache_branch_id!r}"
            )
        if self.skip_mode not in SKIP_MODES:
            raise ValueError(f"unknown skip_mode {self.skip_mode!r}; allowed are {SKIP_MODES}")
        if self.skip_mode == "non-uniform":
            if not self.pow > 1:
                raise ValueError(f"pow must be > 1 for the non-uniform schedule, got {self.pow}")
            if int(self.center) != self.center or self.center < 0:
                raise ValueError(f"center must be an integer step >= 0, got {self.center!r}")

    @property
    def cache_block_id(self) -> int:
        return self.cache_branch_id // LAYERS_PER_BRANCH_BLOCK

    @property
    def cache_layer_id(self) -> int:
        return self.cache_branch_id % LAYERS_PER_BRANCH_BLOCK

    def key_steps_for(self, num_steps: int) -> list[int]:
        """The full-step indices of a run of ``num_steps`` UNet calls (the effective schedule)."""
        if num_steps < 1:
            raise ValueError(f"num_steps must be >= 1, got {num_steps}")
        if self.full_steps is not None:
            return key_steps(num_steps, steps=self.full_steps)
        n = int(self.cache_interval)
        if n == 1:
            return list(range(num_steps))
        if self.skip_mode == "uniform":
            return list(range(0, num_steps, n))
        steps, _ = nonuniform_full_steps(
            num_steps, math.ceil(num_steps / n), center=int(self.center), pow=self.pow
        )
        return sorted(steps)

    def full_steps_for_run(self, num_steps: int, num_schedule_steps: int | None = None) -> list[int]:
        """The full steps of one sampling run, after checking the config against that run.

        Args:
            num_steps: the run's UNet calls (img2img: only the steps its strength runs).
            num_schedule_steps: the step count the scheduler was set to (the non-uniform curve is
                laid over it); default ``num_steps``.

        Raises:
            ValueError: ``cache_interval`` larger than ``num_steps`` (step 0 would be the only full
                step whatever the interval; ``cache_interval == num_steps`` is that schedule), or a
                non-uniform curve that finds no exponent for the run. The message names the value
                and the step count.

        Example:
            >>> DeepCacheConfig(cache_interval=5).full_steps_for_run(12)
            [0, 5, 10]
        """
        if num_steps < 1:
            raise ValueError(f"a sampling run needs at least one step, got {num_steps}")
        if self.full_steps is not None:
            return self.key_steps_for(num_steps)  # a step past the run is refused, with its value
        if self.cache_interval > num_steps:
            raise ValueError(
                f"DeepCacheConfig.cache_interval = {self.cache_interval} is larger than this sampling run's "
                f"{num_steps} steps, so step 0 would be its only full step and the interval would mean "
                f"nothing; use cache_interval <= {num_steps}, or sample with more steps"
            )
        n = num_steps if self.skip_mode == "uniform" else (num_schedule_steps or num_steps)
        return [k for k in self.key_steps_for(n) if k < num_steps]

    @property
    def label(self) -> str:
        """Short name for tables and plots: ``DeepCache-N5-b0`` (uniform), with
        ``-nonuniform-c{center}-p{pow}`` appended for the power-curve schedule;
        ``DeepCache-custom-b0`` for explicit ``full_steps``."""
        if self.full_steps is not None:
            return f"DeepCache-custom-b{self.cache_branch_id}"
        base = f"DeepCache-N{self.cache_interval}-b{self.cache_branch_id}"
        if self.skip_mode == "uniform":
            return base
        return f"{base}-nonuniform-c{self.center}-p{self.pow:g}"


#: What an adaptive cache refreshes: DeepCache's deep path or Faster Diffusion's encoder.
ADAPTIVE_TARGETS = ("deepcache", "fd")

#: :class:`AdaptiveCacheConfig`'s default threshold on the accumulated relative change of
#: ``conv_in``'s output (see the README's table for what other values give).
DEFAULT_ADAPTIVE_THRESHOLD = 0.2


@dataclass(frozen=True)
class AdaptiveCacheConfig:
    """A cache that decides at every step, from a cheap run-time signal, whether to refresh.

    The signal is the relative change of an early feature — the output of ``conv_in``, the
    UNet's first layer, recomputed at every step for a convolution's cost — between consecutive
    steps, ``mean|f_s − f_{s−1}| / mean|f_{s−1}|`` per sample, accumulated over the steps since
    the last refresh. A step refreshes (runs the whole UNet) when that sum reaches ``threshold``
    for any sample of the batch, and the sum restarts; otherwise it is served from the cache
    (DeepCache's shallow path, or FD's decoder on the cached encoder features). Step 0 always
    refreshes. ``threshold=0`` refreshes every step: the uncached sampler.

    Attributes:
        threshold: the accumulated relative change that triggers a refresh (>= 0).
        cache: what is cached between refreshes (:data:`ADAPTIVE_TARGETS`): ``"deepcache"``
            (the deep path, :class:`DeepCacheConfig` semantics) or ``"fd"`` (the encoder).
        cache_branch_id: DeepCache's cut (``3·block + layer``); ignored for ``"fd"``.
        max_cached_steps: at most this many consecutive steps served from the cache (``None``:
            no cap); a safety bound for trajectories where the signal stays flat.

    Example:
        >>> AdaptiveCacheConfig(threshold=0.2).label
        'Adaptive-DeepCache-b0-t0.2'
    """

    threshold: float = DEFAULT_ADAPTIVE_THRESHOLD
    cache: str = "deepcache"
    cache_branch_id: int = 0
    max_cached_steps: int | None = None

    def __post_init__(self):
        if not (isinstance(self.threshold, (int, float)) and math.isfinite(self.threshold) and self.threshold >= 0):
            raise ValueError(
                f"threshold must be a number >= 0 (the accumulated relative change of conv_in's output that "
                f"triggers a refresh; 0 refreshes every step), got {self.threshold!r}"
            )
        if self.cache not in ADAPTIVE_TARGETS:
            raise ValueError(f"unknown adaptive cache {self.cache!r}; allowed are {ADAPTIVE_TARGETS}")
        if int(self.cache_branch_id) != self.cache_branch_id or self.cache_branch_id < 0:
            raise ValueError(
                f"cache_branch_id must be an integer >= 0 (3·block + layer), got {self.cache_branch_id!r}"
            )
        if self.max_cached_steps is not None and (
            int(self.max_cached_steps) != self.max_cached_steps or self.max_cached_steps < 1
        ):
            raise ValueError(f"max_cached_steps must be an integer >= 1 or None, got {self.max_cached_steps!r}")

    def key_steps_for(self, num_steps: int) -> list[int]:
        """The steps that *may* run in full: all of them, since the signal decides at run time.

        A planner takes this as the cost's upper bound; the steps a run really refreshed are
        ``hook.signal.refresh_steps`` and its counters (:func:`fcr_sample.get_cache_stats`).
        """
        if num_steps < 1:
            raise ValueError(f"num_steps must be >= 1, got {num_steps}")
        return list(range(num_steps))

    @property
    def label(self) -> str:
        """``Adaptive-DeepCache-b0-t0.2``, ``Adaptive-FD-t0.2`` (``-m{max}`` with a cap)."""
        base = f"Adaptive-DeepCache-b{self.cache_branch_id}" if self.cache == "deepcache" else "Adaptive-FD"
        cap = f"-m{self.max_cached_steps}" if self.max_cached_steps is not None else ""
        return f"{base}-t{self.threshold:g}{cap}"
