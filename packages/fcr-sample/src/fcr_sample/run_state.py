"""Which sampling run and which step a UNet call belongs to.

A cache hook must know the step index of every UNet call and must forget everything when a new
sampling run starts. Searching ``scheduler.timesteps`` for the timestep value is fragile (repeated
timesteps, img2img offsets), so the step is *counted*: a run starts when the pipeline's scheduler
gets new timesteps (``set_timesteps`` always builds a new tensor) or when the caller says so
with :func:`start_sampling_run`; each UNet call then advances the count by one. The timestep
passed to the UNet is *checked* against the one the count predicts, so a sampler that calls the
UNet more than once per step fails loudly instead of caching the wrong thing.

What a hook keeps between the calls of one run is a typed :class:`HookState` (diffusers'
``BaseState``): a small dataclass the hook resets at the start of every run.

This module imports nothing else from the package; ``hooks.py`` builds on it.
"""

from __future__ import annotations

import dataclasses
import weakref
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from diffusers.hooks.hooks import BaseState

__all__ = ["HookState", "SamplingRun", "RunTracker"]


@dataclass
class HookState(BaseState):
    """Per-run state of a cache hook, as a dataclass; :meth:`reset` restores every field's default.

    Subclasses are ``@dataclass`` es whose fields all have defaults (use
    ``field(default_factory=...)`` for containers)::

        @dataclass
        class MyState(HookState):
            cached: torch.Tensor | None = None
            seen: set[int] = field(default_factory=set)
    """

    def reset(self, *args, **kwargs) -> None:
        if not dataclasses.is_dataclass(self):
            raise TypeError(f"{type(self).__name__} must be a @dataclass to use HookState.reset")
        for f in dataclasses.fields(self):
            if f.default_factory is not dataclasses.MISSING:
                setattr(self, f.name, f.default_factory())
            elif f.default is not dataclasses.MISSING:
                setattr(self, f.name, f.default)
            else:
                raise TypeError(f"{type(self).__name__}.{f.name} needs a default to be resettable")


@dataclass
class SamplingRun:
    """One sampling run: its timesteps (from the first step the UNet sees) and progress."""

    timesteps: torch.Tensor  # the timesteps of this run's UNet calls, in order
    num_schedule_steps: int  # the step count the key-step schedule is built for
    source: Any = None  # the tensor object the run was detected from (identity matters)
    calls: int = 0  # UNet calls made so far in this run

    @property
    def num_steps(self) -> int:
        return len(self.timesteps)


def _as_scalar_timestep(timestep) -> float:
    if torch.is_tensor(timestep):
        flat = timestep.detach().reshape(-1)
        if flat.numel() == 0:
            raise ValueError("empty timestep tensor")
        first = flat[0]
        if flat.numel() > 1 and not bool((flat == first).all()):
            raise ValueError(
                "fcr-sample caches need one timestep per UNet call, got a batch of different "
                f"timesteps {flat.tolist()[:8]}..."
            )
        return float(first)
    return float(timestep)


def _start_index(timesteps: torch.Tensor, first: float, name: str) -> int:
    """Where a pipeline run starts in the scheduler's timesteps when the scheduler does not say.

    img2img and inpainting start at a later timestep (strength < 1); schedulers with
    ``set_begin_index`` are told where, others (DDIM, PNDM, DDPM) are not, so the run's first
    timestep is located once. Every later call is still counted and checked.
    """
    hits = (timesteps == first).nonzero().flatten()
    if hits.numel() == 0:
        raise RuntimeError(
            f"{name}: the UNet was called with timestep {first:g}, which is not among the scheduler's "
            "timesteps; the cache cannot tell which step this is"
        )
    return int(hits[0])


class RunTracker:
    """Counts UNet calls within sampling runs, for one UNet.

    In *pipeline mode* (``pipeline`` given) a new run starts whenever ``pipeline.scheduler.timesteps``
    is a new tensor, i.e. after every ``set_timesteps``. In *manual mode* runs are started with
    :meth:`start`. In both, a run whose steps are all used restarts when the UNet is called again
    with the run's first timestep.
    """

    def __init__(self, pipeline=None, *, name: str = "cache"):
        self._pipeline_ref = weakref.ref(pipeline) if pipeline is not None else None
        self.name = name
        self.run: SamplingRun | None = None
        self._pending_manual: torch.Tensor | None = None
        self.runs_started = 0

    @property
    def pipeline(self):
        return self._pipeline_ref() if self._pipeline_ref is not None else None

    @property
    def scheduler(self):
        pipe = self.pipeline
        return getattr(pipe, "scheduler", None) if pipe is not None else None

    def start(self, timesteps: Sequence[float] | torch.Tensor) -> None:
        """Begin a new run over ``timesteps`` (manual mode; also allowed in pipeline mode)."""
        ts = torch.as_tensor(timesteps).detach().reshape(-1).cpu()
        if ts.numel() == 0:
            raise ValueError("a sampling run needs at least one timestep")
        self._pending_manual = ts

    def _new_run(self, timesteps: torch.Tensor, num_schedule_steps: int, source) -> SamplingRun:
        self.run = SamplingRun(
            timesteps=timesteps, num_schedule_steps=num_schedule_steps, source=source
        )
        self.runs_started += 1
        return self.run

    def _detect_run(self, timestep: float) -> SamplingRun | None:
        sched = self.scheduler
        if self._pending_manual is not None:
            ts, self._pending_manual = self._pending_manual, None
            # In pipeline mode the run is bound to the scheduler's current timesteps, so that the
            # run's later calls are not taken for a new pipeline run.
            source = getattr(sched, "timesteps", None) if sched is not None else None
            return self._new_run(ts, len(ts), source=ts if source is None else source)
        if sched is None:
            return self.run
        source = getattr(sched, "timesteps", None)
        if source is None:
            raise RuntimeError(
                f"{self.name}: the pipeline's scheduler has no timesteps; call the pipeline, or "
                "scheduler.set_timesteps(...) before calling the UNet"
            )
        if self.run is not None and self.run.source is source:
            return self.run
        order = getattr(sched, "order", 1)
        if order != 1:
            raise NotImplementedError(
                f"{self.name}: {type(sched).__name__} is a order-{order} scheduler that evaluates the "
                "UNet more than once per step; encoder caching is defined for one UNet call per step. "
                "Use DDIM, DPMSolverMultistep (DPM-Solver++), Euler, Euler-ancestral, PNDM, LMS or UniPC."
            )
        ts = torch.as_tensor(source).detach().reshape(-1).cpu()
        begin = getattr(sched, "begin_index", None)
        if begin is None:
            begin = _start_index(ts, timestep, self.name)
        ts = ts[begin:]
        n_sched = getattr(sched, "num_inference_steps", None) or len(ts)
        n_sched = n_sched if begin == 0 else len(ts)
        return self._new_run(ts, int(n_sched), source=source)

    def next_step(self) -> int | None:
        """The step index the next UNet call will get in the current run, without counting it;
        ``None`` when that call starts a new run (or no run is known yet)."""
        if self._pending_manual is not None or self.run is None:
            return None
        sched = self.scheduler
        if sched is not None and getattr(sched, "timesteps", None) is not self.run.source:
            return None
        if self.run.calls >= self.run.num_steps:
            return None
        return self.run.calls

    def begin_call(self, timestep) -> tuple[SamplingRun, int]:
        """Register one UNet call; returns the run and this call's step index."""
        t = _as_scalar_timestep(timestep)
        run = self._detect_run(t)
        if run is None:
            raise RuntimeError(
                f"{self.name} is applied to a bare UNet, so it cannot see the sampling loop: call "
                "fcr_sample.start_sampling_run(unet, scheduler.timesteps) before each run, or apply "
                "the cache to the pipeline instead"
            )
        if run.calls >= run.num_steps:
            if t == float(run.timesteps[0]):  # same timesteps sampled again without set_timesteps
                run = self._new_run(run.timesteps, run.num_schedule_steps, source=run.source)
            else:
                raise RuntimeError(
                    f"{self.name}: UNet called {run.calls + 1} times in a run of {run.num_steps} steps "
                    f"(timestep {t}). Does the sampler call the UNet more than once per step?"
                )
        step = run.calls
        expected = float(run.timesteps[step])
        if t != expected:
            raise RuntimeError(
                f"{self.name}: step {step} of this run expects timestep {expected:g} but the UNet was "
                f"called with {t:g}. The sampler calls the UNet in an order the cache cannot follow "
                "(several calls per step, e.g. Heun or separate CFG passes), so its features would be "
                "reused at the wrong steps. Remove the cache or use a one-call-per-step scheduler."
            )
        run.calls += 1
        return run, step
