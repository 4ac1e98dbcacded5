"""The FCR fine-tuning loop on 🤗 accelerate.

One function, :func:`train`, written out so it can be read top to bottom (nanoGPT style):
AdamW with linear warm-up, gradient accumulation, mixed precision, optional gradient
checkpointing and EMA, checkpoints every N steps with exact resume, per-step logs to the run
folder, and an early-stopping hook that calls a validation metric supplied by the caller
(fcr-eval supplies moving FID).

Run folder layout (``TrainConfig.output_dir``)::

    config.json         full config + code version + hardware (written at start, updated at end)
    metrics.jsonl       one line per optimizer step: loss, l_denoise, l_fcr, l_fcr_weighted (λ·l_fcr),
                        fcr_to_denoise (λ·l_fcr / l_denoise), d/<block>, step_time_s, lr; with the
                        output-consistency term also l_oc, l_oc_weighted, oc_to_denoise; with the
                        rollout term l_rollout, l_rollout_weighted, rollout_to_denoise
    validation.jsonl    one line per validation call (step, metric)
    train.log           the log
    checkpoints/step_0000500/
        model.safetensors, optimizer.bin, random_states_0.pkl, custom_checkpoint_*.pkl  (accelerate state)
        unet/           diffusers save_pretrained of the trained UNet
        unet_ema/       the EMA weights (when ema_decay is set)
        trainer_state.json
    summary.json        what the run produced (also returned as RunResult)

Multi-GPU / multi-node: launch the CLI with ``accelerate launch -m fcr_train.cli finetune ...``.

Why one module of this size: the training loop is written out in one place on purpose (read it
top to bottom: data, FCR loss, accumulation, EMA, validation, checkpoint, resume); splitting it
would scatter the order-dependent steps that exact resume relies on.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import time
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from fcr_sample.features import BLOCK_GROUPS, select_feature_names

from .checkpoints import (
    STATE_FILE,
    CheckpointError,
    model_mismatch,
    settings_mismatch,
    unreadable_reason,
)
from .data import BadSampleCounter, collate_skip_bad
from .locking import ProcessLock
from .loss import FCRConfig, FCRLossOutput, fcr_loss, sample_timesteps
from .output_consistency import (
    OutputConsistencyConfig,
    OutputConsistencyLossOutput,
    check_output_consistency,
    output_consistency_loss,
    sample_oc_timesteps,
)
from .provenance import run_provenance
from .rollout import (
    RolloutConfig,
    RolloutLossOutput,
    check_rollout,
    rollout_loss,
    sample_key_steps,
    sampling_scheduler,
)
from .sampler import ResumableBatchSampler

__all__ = [
    "TrainConfig",
    "RunResult",
    "EMA",
    "EarlyStopping",
    "EmbeddedConditioner",
    "FCRObjective",
    "OutputConsistencyObjective",
    "RolloutObjective",
    "train",
    "latest_checkpoint",
]

logger = logging.getLogger(__name__)

#: The lock file a training run holds in its output folder (see :mod:`fcr_train.locking`).
OUTPUT_LOCK_NAME = ".fcr-train.lock"


@dataclass
class TrainConfig:
    """Everything the loop needs besides model and data; stored in ``config.json``.

    Attributes:
        output_dir: the run folder.
        max_steps: optimizer steps (each = ``grad_accum`` micro-batches).
        batch_size: rows per process per micro-batch (global batch = batch_size x grad_accum x processes).
        lr, weight_decay, adam_betas, adam_eps: AdamW.
        warmup_steps: linear LR warm-up from 0, then constant.
        max_grad_norm: gradient clipping (``None`` = off).
        mixed_precision: ``"no"``, ``"fp16"`` or ``"bf16"`` (accelerate).
        grad_checkpointing: recompute block activations in backward (less memory, slower).
        ema_decay: keep an EMA of the weights with this decay (``None`` = off).
        checkpoint_every: save a resumable checkpoint every N steps (and at the end).
        keep_checkpoints: keep only the newest N checkpoints (``None`` = all).
        validate_every: call the validation callback every N steps (``None`` = never).
        early_stopping_patience: stop after this many validations without improvement (``None`` = never).
        early_stopping_min_delta: improvement smaller than this does not count.
        early_stopping_mode: ``"min"`` (e.g. FID) or ``"max"``.
        seed: seeds data order, t, Δ, noise, flips and condition dropout.
        hflip: random horizontal flip with p = 0.5.
        cond_dropout: probability of training a row with the null text states (for guidance).
        num_workers: DataLoader workers.
        max_bad_fraction / max_bad_count: stop when this many samples were unreadable.
        max_time_s: stop (with a checkpoint) once this call has run this long; the steps done
            are in the result, so the run can be reproduced with ``max_steps`` set to them.
        resume: ``True`` = continue from the newest checkpoint in output_dir (if any), or a path.
            With ``True``, a checkpoint whose files are cut off is reported and the previous
            complete one is used; a path is used as given. Either way a checkpoint of another
            model (other weight names or shapes) is refused before anything is written.
        cpu: force CPU even when a GPU exists.
        progress: show a tqdm bar.
        log_every: write a step line (losses and λ·L_FCR / L_denoise) to train.log every N steps
            (and at the first and last step); every step is always in metrics.jsonl.
        fcr: :class:`FCRConfig`.
        output_consistency: :class:`~fcr_train.output_consistency.OutputConsistencyConfig`, or
            ``None`` (default) for no output-consistency term. Exclusive with FCR (``fcr.lam``
            must be 0): see ``__post_init__``.
        rollout: :class:`~fcr_train.rollout.RolloutConfig`, or ``None`` (default) for no rollout
            term. Exclusive with FCR and output consistency.
    """

    output_dir: str = "runs/fcr"
    max_steps: int = 1000
    batch_size: int = 16
    grad_accum: int = 1
    lr: float = 1e-5
    weight_decay: float = 1e-2
    adam_betas: tuple[float, float] = (0.9, 0.999)
    adam_eps: float = 1e-8
    warmup_steps: int = 0
    max_grad_norm: float | None = 1.0
    mixed_precision: str = "no"
    grad_checkpointing: bool = False
    ema_decay: float | None = None
    checkpoint_every: int = 500
    keep_checkpoints: int | None = None
    validate_every: int | None = None
    early_stopping_patience: int | None = None
    early_stopping_min_delta: float = 0.0
    early_stopping_mode: str = "min"
    seed: int = 0
    hflip: bool = True
    cond_dropout: float = 0.0
    num_workers: int = 0
    max_bad_fraction: float = 0.01
    max_bad_count: int | None = None
    max_time_s: float | None = None
    resume: bool | str = False
    cpu: bool = False
    progress: bool = True
    log_every: int = 50
    fcr: FCRConfig = field(default_factory=FCRConfig)
    output_consistency: OutputConsistencyConfig | None = None
    rollout: RolloutConfig | None = None

    def __post_init__(self):
        # Exclusive rather than summed: the two terms draw (t, Δ) on opposite sides of t (FCR pairs
        # t with the less noisy t − Δ, t ~ U(Δ, T−1); output consistency pairs it with the key step
        # t + Δ, t ~ U(0, T−1−Δ)), so one draw cannot serve both without changing the timestep
        # distribution that existing FCR runs were trained with; and issue 18 compares them as
        # separate arms, where a sum would leave no clean λ·L / L_denoise share for either.
        if self.output_consistency is not None and self.fcr.lam > 0:
            raise ValueError(f"the output-consistency term and FCR are exclusive: set fcr.lam = 0 (got "
                             f"{self.fcr.lam}) or leave output_consistency unset")
        # The rollout term draws its own key steps on the sampler's grid and keeps the control's
        # t ~ U(0, T−1) for L_denoise; it is one arm of its own, as the other two.
        if self.rollout is not None and (self.fcr.lam > 0 or self.output_consistency is not None):
            raise ValueError("the rollout term is exclusive with FCR and output consistency: set fcr.lam = 0 "
                             f"(got {self.fcr.lam}) and leave output_consistency unset, or leave rollout unset")

    def to_dict(self) -> dict:
        d = asdict(self)
        d["fcr"] = self.fcr.to_dict()
        d["output_consistency"] = None if self.output_consistency is None else self.output_consistency.to_dict()
        d["rollout"] = None if self.rollout is None else self.rollout.to_dict()
        return d


@dataclass
class RunResult:
    """What a training run produced (also written to ``summary.json``).

    Attributes:
        run_dir: the run folder.
        steps: optimizer steps completed.
        checkpoints: checkpoint folders still on disk, oldest first.
        last_checkpoint: newest checkpoint folder.
        final_unet: folder loadable with ``UNet2DConditionModel.from_pretrained`` (EMA weights if EMA was on).
        best_checkpoint / best_metric: from validation (``None`` without validation).
        stopped_early: early stopping ended the run.
        losses: per-step total loss of this process (resumed runs: only the steps run here).
        fcr_to_denoise: per-step λ·L_FCR / L_denoise, the same steps as ``losses`` (the share of
            the loss the FCR term carries; 0 for λ = 0).
        oc_to_denoise: per-step λ·L_oc / L_denoise of the output-consistency term, the same
            steps as ``losses`` (empty when the run has no such term).
        rollout_to_denoise: per-step λ·L_rollout / L_denoise of the rollout term (empty without it).
        last_logs: the final step's log record.
        wall_time_s: seconds spent in this call.
    """

    run_dir: Path
    steps: int
    checkpoints: list[Path]
    last_checkpoint: Path | None
    final_unet: Path | None
    best_checkpoint: Path | None = None
    best_metric: float | None = None
    stopped_early: bool = False
    stopped_by_time: bool = False
    losses: list[float] = field(default_factory=list)
    fcr_to_denoise: list[float] = field(default_factory=list)
    oc_to_denoise: list[float] = field(default_factory=list)
    rollout_to_denoise: list[float] = field(default_factory=list)
    last_logs: dict = field(default_factory=dict)
    wall_time_s: float = 0.0

    def to_dict(self) -> dict:
        d = asdict(self)
        for k in ("run_dir", "last_checkpoint", "final_unet", "best_checkpoint"):
            d[k] = None if d[k] is None else str(d[k])
        d["checkpoints"] = [str(p) for p in self.checkpoints]
        return d


class EMA:
    """Exponential moving average of parameters; decay warms up as min(decay, (1+n)/(10+n))."""

    def __init__(self, model: torch.nn.Module, decay: float):
        self.decay = decay
        self.num_updates = 0
        self.shadow = {k: p.detach().clone().float() for k, p in model.named_parameters() if p.requires_grad}

    @torch.no_grad()
    def update(self, model: torch.nn.Module) -> None:
        self.num_updates += 1
        d = min(self.decay, (1 + self.num_updates) / (10 + self.num_updates))
        for k, p in model.named_parameters():
            if k in self.shadow:
                self.shadow[k].lerp_(p.detach().float(), 1 - d)

    @contextmanager
    def applied(self, model: torch.nn.Module):
        """Temporarily load the EMA weights into ``model``."""
        backup = {k: p.detach().clone() for k, p in model.named_parameters() if k in self.shadow}
        self.copy_to(model)
        try:
            yield model
        finally:
            with torch.no_grad():
                for k, p in model.named_parameters():
                    if k in backup:
                        p.copy_(backup[k])

    @torch.no_grad()
    def copy_to(self, model: torch.nn.Module) -> None:
        for k, p in model.named_parameters():
            if k in self.shadow:
                p.copy_(self.shadow[k].to(p.dtype))

    def state_dict(self) -> dict:
        return {"decay": self.decay, "num_updates": self.num_updates, "shadow": self.shadow}

    def load_state_dict(self, state: dict) -> None:
        self.decay, self.num_updates = state["decay"], state["num_updates"]
        self.shadow = {k: v.clone() for k, v in state["shadow"].items()}


@dataclass
class EarlyStopping:
    """Stop after ``patience`` validations without an improvement of more than ``min_delta``."""

    patience: int | None = None
    min_delta: float = 0.0
    mode: str = "min"
    best: float | None = None
    best_step: int | None = None
    bad_rounds: int = 0

    def __post_init__(self):
        if self.mode not in ("min", "max"):
            raise ValueError(f"early_stopping_mode must be 'min' or 'max', got {self.mode!r}")

    def update(self, value: float, step: int) -> bool:
        """Record a metric; returns True when training should stop."""
        better = self.best is None or (
            value < self.best - self.min_delta if self.mode == "min" else value > self.best + self.min_delta
        )
        if better:
            self.best, self.best_step, self.bad_rounds = float(value), step, 0
        else:
            self.bad_rounds += 1
        return self.patience is not None and self.bad_rounds >= self.patience


class EmbeddedConditioner:
    """Batch -> ``(x0, text states)`` for pixel-space data with a fixed prompt list.

    ``prompt_states[i]`` belongs to prompt index ``i`` (see ``batch["prompt_index"]``);
    ``null_states`` are the empty prompt's states (condition dropout).
    """

    def __init__(self, prompt_states: torch.Tensor, null_states: torch.Tensor):
        self.prompt_states = prompt_states
        self.null_states = null_states

    def __call__(self, batch: dict, device: torch.device, generator: torch.Generator | None = None):
        return batch["pixels"].to(device), self.prompt_states[batch["prompt_index"].cpu()].to(device)

    def describe(self) -> dict:
        return {"kind": "embedded", "prompt_states": list(self.prompt_states.shape)}


class FCRObjective(torch.nn.Module):
    """The UNet plus its loss, as one module so that DDP wraps the whole FCR forward."""

    def __init__(self, unet: torch.nn.Module, scheduler, config: FCRConfig):
        super().__init__()
        self.unet = unet
        self.scheduler = scheduler
        self.config = config

    def forward(self, x0, encoder_hidden_states, noise, timesteps, deltas) -> FCRLossOutput:
        return fcr_loss(self.unet, self.scheduler, x0, encoder_hidden_states, self.config,
                        noise=noise, timesteps=timesteps, deltas=deltas)


class OutputConsistencyObjective(FCRObjective):
    """The UNet plus the output-consistency loss (``config``: an
    :class:`~fcr_train.output_consistency.OutputConsistencyConfig`), one module for DDP."""

    def forward(self, x0, encoder_hidden_states, noise, timesteps, deltas) -> OutputConsistencyLossOutput:
        return output_consistency_loss(self.unet, self.scheduler, x0, encoder_hidden_states, self.config,
                                       noise=noise, timesteps=timesteps, deltas=deltas)


class RolloutObjective(FCRObjective):
    """The UNet plus the rollout loss (``config``: a :class:`~fcr_train.rollout.RolloutConfig`),
    one module for DDP. The DDIM sampler of the rollouts is built once, on ``scheduler``'s
    schedule; ``null_states`` are the unconditional text states (guided rollouts)."""

    def __init__(self, unet: torch.nn.Module, scheduler, config: RolloutConfig, null_states: torch.Tensor | None = None):
        super().__init__(unet, scheduler, config)
        self.sampler = sampling_scheduler(scheduler, config)
        self.null_states = null_states

    def forward(self, x0, encoder_hidden_states, noise, timesteps, key_steps) -> RolloutLossOutput:
        null = None if self.null_states is None else self.null_states.to(x0.device, encoder_hidden_states.dtype)
        return rollout_loss(self.unet, self.scheduler, x0, encoder_hidden_states, self.config, null_states=null,
                            noise=noise, timesteps=timesteps, key_steps=key_steps, sampler=self.sampler)


class _TrainState:
    """Counters that accelerate checkpoints alongside model, optimizer and LR schedule.

    The random draws of micro-batch ``m`` on process ``r`` (t, Δ, ε, flips, condition dropout,
    VAE posterior samples) come from a generator seeded with ``(seed, r, m)``, so a resumed run
    needs only ``micro`` to repeat them, on any number of processes.
    """

    def __init__(self, seed: int, ema: EMA | None, stopper: EarlyStopping, bad: BadSampleCounter):
        self.step = 0
        self.micro = 0
        self.seed = seed
        self.generator = torch.Generator()
        self.ema = ema
        self.stopper = stopper
        self.bad = bad
        self.best_checkpoint: str | None = None

    def generator_for(self, micro: int) -> torch.Generator:
        return self.generator.manual_seed((self.seed * 1_000_003 + micro) % (2**63 - 1))

    def state_dict(self) -> dict:
        return {
            "step": self.step,
            "micro": self.micro,
            "ema": self.ema.state_dict() if self.ema else None,
            "stopper": asdict(self.stopper),
            "bad": self.bad.state_dict(),
            "best_checkpoint": self.best_checkpoint,
        }

    def load_state_dict(self, state: dict) -> None:
        self.step, self.micro = int(state["step"]), int(state["micro"])
        if self.ema is not None and state.get("ema") is not None:
            self.ema.load_state_dict(state["ema"])
        # Only the counters: patience, min_delta and mode come from this run's config (which
        # config.json records), not from the run that wrote the checkpoint.
        for k in ("best", "best_step", "bad_rounds"):
            setattr(self.stopper, k, state["stopper"][k])
        self.bad.load_state_dict(state["bad"])
        self.best_checkpoint = state.get("best_checkpoint")


def _complete_checkpoints(run_dir: str | os.PathLike) -> list[Path]:
    """Checkpoints with ``trainer_state.json`` (written last), oldest first; a ``.tmp`` folder is
    one whose save was cut before its rename, never a checkpoint."""
    return sorted(p for p in (Path(run_dir) / "checkpoints").glob("step_*")
                  if not p.name.endswith(".tmp") and (p / STATE_FILE).is_file())


def latest_checkpoint(run_dir: str | os.PathLike) -> Path | None:
    """Newest complete checkpoint (one with ``trainer_state.json``) in ``run_dir/checkpoints``."""
    ckpts = _complete_checkpoints(run_dir)
    return ckpts[-1] if ckpts else None


def _check_blocks(unet: torch.nn.Module, fcr: FCRConfig) -> None:
    """Resolve ``fcr.blocks`` on ``unet`` now, so a name that is not a feature of this UNet stops
    the run before its folder exists (the loss resolves it only at the first step, and only with
    lam > 0: with lam = 0 the blocks are not used)."""
    if fcr.lam <= 0:
        return
    try:
        select_feature_names(unet, fcr.blocks)
    except ValueError as exc:
        shown = fcr.blocks if isinstance(fcr.blocks, str) else ",".join(fcr.blocks)
        raise ValueError(f"FCRConfig.blocks = {shown!r}: {exc}. Pass one of {', '.join(BLOCK_GROUPS)} or "
                         "comma-separated feature-name prefixes of this UNet") from None


def _resume_candidates(config: TrainConfig, run_dir: Path, unet: torch.nn.Module,
                       new_settings: dict) -> tuple[list[Path], list[str]]:
    """The checkpoints a resume may load, newest first, and one line per newer one skipped.

    Read-only, run before anything is written. A ``resume`` path must itself be whole and of this
    model. With ``resume=True`` a checkpoint whose files are cut off is skipped for the previous
    complete one (the error names them all when none is whole); a checkpoint of another model is
    refused at once, since the older ones of that folder come from the same run. So is a resume
    whose ``new_settings`` (``config.json``'s ``train`` / ``run`` / ``dataset``) differ from the
    stored run's in a setting that changes results.
    """
    if not config.resume:
        return [], []
    if not isinstance(config.resume, bool):
        path = Path(config.resume)
        problem = unreadable_reason(path)
        if problem is None and (mismatch := model_mismatch(path, unet)):
            problem = f"it is a checkpoint of another model: {mismatch}"
        if problem:
            raise CheckpointError(f"cannot resume from {path}: {problem}. Pass a complete checkpoint of this "
                                  f"model, or start without resuming")
        _check_settings(path.parent.parent if path.parent.name == "checkpoints" else None, new_settings,
                        f"from {path}")
        return [path], []
    usable, skipped = [], []
    for ckpt in reversed(_complete_checkpoints(run_dir)):
        problem = unreadable_reason(ckpt)
        if problem:
            skipped.append(f"{ckpt}: {problem}")
            continue
        mismatch = model_mismatch(ckpt, unet)
        if mismatch:
            raise CheckpointError(f"cannot resume from {ckpt}: it is a checkpoint of another model: {mismatch}. "
                                  f"Resume with the model that wrote {run_dir}, or use another output folder")
        usable.append(ckpt)
    if skipped and not usable:
        raise CheckpointError(f"cannot resume in {run_dir}: no checkpoint can be loaded ({'; '.join(skipped)}). "
                              "Delete the broken checkpoint folders to start over, or use another output folder")
    if usable:
        _check_settings(run_dir, new_settings, f"in {run_dir}")
    return usable, skipped


def _check_settings(run_dir: Path | None, new_settings: dict, where: str) -> None:
    """Refuse a resume whose settings differ from the stored run's in one that changes results
    (``checkpoints.settings_mismatch``): a resume is exact, or it does not happen."""
    stored_file = None if run_dir is None else run_dir / "config.json"
    if stored_file is None or not stored_file.is_file():
        logger.warning("resuming %s: no config.json of the run that wrote the checkpoint, so its settings "
                       "cannot be compared with these", where)
        return
    try:
        stored = json.loads(stored_file.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise CheckpointError(f"cannot resume {where}: {stored_file} is not readable JSON ({exc}), so the resume "
                              "cannot be checked to be exact. Restore it, or start a new run in another "
                              "output folder") from None
    differ = settings_mismatch(stored, new_settings)
    if differ:
        raise CheckpointError(
            f"cannot resume {where}: a resume continues the run exactly, and these settings differ from "
            f"the ones in {stored_file}: {'; '.join(differ)}. Resume with the stored settings, or start a "
            "new run in another output folder")


def _load_resume_checkpoint(accelerator, candidates: list[Path], skipped: list[str], explicit: bool) -> Path | None:
    """Load the newest candidate that loads; report each one that does not.

    The header checks of :func:`_resume_candidates` catch files that are cut off; a file whose
    content is damaged inside (or of a format accelerate does not expect) fails only here. A
    failed load may leave part of its state applied, which the next, complete load overwrites
    whole (model, optimizer, LR schedule, RNG and train counters are all in every checkpoint).
    """
    for line in skipped:
        logger.warning("checkpoint %s; resuming from the previous complete one", line)
    failed = list(skipped)
    for ckpt in candidates:
        try:
            accelerator.load_state(str(ckpt))
        except Exception as exc:  # noqa: BLE001 - any failure to load means: try the previous checkpoint
            reason = f"{ckpt}: it does not load ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})"
            if explicit:
                raise CheckpointError(f"cannot resume from {reason}. Pass a complete checkpoint of this model, "
                                      "or start without resuming") from exc
            failed.append(reason)
            logger.warning("checkpoint %s; trying the previous complete one", reason)
            continue
        return ckpt
    if candidates:
        raise CheckpointError(f"cannot resume: no checkpoint can be loaded ({'; '.join(failed)}). Delete the broken "
                              "checkpoint folders to start over, or use another output folder")
    return None


def _unwrap_unet(accelerator, objective) -> torch.nn.Module:
    return accelerator.unwrap_model(objective).unet


def _save_checkpoint(accelerator, objective, state: _TrainState, run_dir: Path, keep: int | None) -> Path:
    """Write ``checkpoints/step_N`` atomically (tmp folder + rename), prune old ones."""
    final = run_dir / "checkpoints" / f"step_{state.step:07d}"
    tmp = final.with_name(final.name + ".tmp")
    if accelerator.is_main_process and tmp.exists():
        shutil.rmtree(tmp)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp), safe_serialization=True)
    if accelerator.is_main_process:
        unet = _unwrap_unet(accelerator, objective)
        unet.save_pretrained(tmp / "unet")
        if state.ema is not None:
            with state.ema.applied(unet):
                unet.save_pretrained(tmp / "unet_ema")
        (tmp / "trainer_state.json").write_text(json.dumps(
            {"step": state.step, "micro_batches": state.micro, "bad_samples": state.bad.state_dict(),
             "saved_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")}, indent=2))
        if final.exists():
            shutil.rmtree(final)
        tmp.rename(final)
        if keep is not None:
            ckpts = sorted(p for p in final.parent.glob("step_*") if not p.name.endswith(".tmp"))
            for old in ckpts[:-keep]:
                if state.best_checkpoint is None or Path(state.best_checkpoint) != old:
                    shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    logger.info("saved checkpoint %s", final)
    return final


def _write_jsonl(path: Path, record: dict) -> None:
    with path.open("a") as f:
        f.write(json.dumps(record) + "\n")


def _truncate_jsonl(path: Path, max_step: int) -> None:
    """Drop log lines past the resumed checkpoint (they will be re-run)."""
    if not path.is_file():
        return
    lines = [ln for ln in path.read_text().splitlines() if ln.strip() and json.loads(ln)["step"] <= max_step]
    path.write_text("".join(ln + "\n" for ln in lines))


def _attach_file_log(run_dir: Path) -> logging.Handler:
    handler = logging.FileHandler(run_dir / "train.log")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.getLogger("fcr_train").addHandler(handler)
    if logging.getLogger("fcr_train").getEffectiveLevel() > logging.INFO:
        logging.getLogger("fcr_train").setLevel(logging.INFO)
    return handler


def train(
    unet: torch.nn.Module,
    scheduler,
    dataset: torch.utils.data.Dataset,
    conditioner: Callable,
    config: TrainConfig,
    *,
    validation_fn: Callable[[torch.nn.Module, int], float] | None = None,
    step_callback: Callable[[int, dict], None] | None = None,
    run_metadata: dict | None = None,
) -> RunResult:
    """Train ``unet`` with L_denoise + λ·FCR (or + λ·L_oc, ``config.output_consistency``, or
    + λ·L_rollout, ``config.rollout``) on ``dataset``.

    Args:
        unet: the diffusers UNet to train (the only trained module; VAE/text encoder live in ``conditioner``).
        scheduler: training noise scheduler (its ``prediction_type`` picks ε / v targets).
        dataset: map-style dataset of dicts (see :mod:`fcr_train.data`).
        conditioner: ``conditioner(batch, device, generator) -> (x0, text_states)``; has
            ``null_states`` (for ``cond_dropout``) and ``describe()``.
        config: :class:`TrainConfig`.
        validation_fn: ``fn(unet, step) -> float`` called every ``validate_every`` steps with the
            (EMA) UNet in eval mode; drives early stopping and ``best_checkpoint``.
        step_callback: ``fn(step, logs)`` after every optimizer step (raise to abort).
        run_metadata: extra facts stored in ``config.json`` (model source, dataset description).

    Returns:
        :class:`RunResult`.

    Example:
        >>> result = train(unet, DDPMScheduler(), FashionMNISTDataset(limit=512), conditioner,
        ...                TrainConfig(output_dir="runs/x", max_steps=100, fcr=FCRConfig(lam=0.1)))
        >>> result.final_unet
    """
    from accelerate import Accelerator
    from accelerate.utils import set_seed
    from tqdm.auto import tqdm

    t_start = time.time()
    oc = config.output_consistency
    if oc is not None:  # before the run folder exists: a bad setting leaves nothing behind
        check_output_consistency(unet, scheduler.config.num_train_timesteps, oc,
                                 grad_checkpointing=config.grad_checkpointing)
    ro = config.rollout
    if ro is not None:
        check_rollout(unet, scheduler, ro, grad_checkpointing=config.grad_checkpointing)
        if ro.guidance_scale != 1.0 and getattr(conditioner, "null_states", None) is None:
            raise ValueError(f"a guided rollout (guidance_scale = {ro.guidance_scale}) needs the conditioner's "
                             "unconditional states (null_states); this conditioner has none: set guidance_scale = 1")
    run_dir = Path(config.output_dir)
    # Everything a bad input can fail is checked before the run folder is created or written.
    _check_blocks(unet, config.fcr)
    settings = {"train": config.to_dict(), "run": run_metadata or {},
                "dataset": {"type": type(dataset).__name__, "size": len(dataset)}}
    resume_candidates, resume_skipped = _resume_candidates(config, run_dir, unet, settings)
    run_dir.mkdir(parents=True, exist_ok=True)
    # accelerate keeps process-wide singletons; the experiment runner calls train() many times in
    # one process with different precision / accumulation, so start each run from a clean state
    # (the distributed PartialState, if any, is kept).
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state()
    GradientState._reset_state()
    accelerator = Accelerator(
        mixed_precision=config.mixed_precision,
        gradient_accumulation_steps=config.grad_accum,
        cpu=config.cpu,
    )
    # One writer per output folder: taken before anything is written into it, so a second run on
    # the same folder is refused (naming this one) and changes nothing of it.
    lock = ProcessLock(run_dir / OUTPUT_LOCK_NAME, what=f"training output folder {run_dir}") \
        if accelerator.is_main_process else None
    if lock is not None:
        lock.acquire()
    handler = None
    try:
        handler = _attach_file_log(run_dir) if accelerator.is_main_process else None
        set_seed(config.seed)
        unet.train()
        unet.requires_grad_(True)
        if config.grad_checkpointing:
            unet.enable_gradient_checkpointing()
        if ro is not None:
            objective = RolloutObjective(unet, scheduler, ro,
                                         conditioner.null_states if ro.guidance_scale != 1.0 else None)
        elif oc is not None:
            objective = OutputConsistencyObjective(unet, scheduler, oc)
        else:
            objective = FCRObjective(unet, scheduler, config.fcr)
        key_grid = objective.sampler.timesteps if ro is not None else None  # the rollouts' DDIM grid
        params = [p for p in unet.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=config.lr, betas=tuple(config.adam_betas),
                                      eps=config.adam_eps, weight_decay=config.weight_decay)
        warmup = max(0, config.warmup_steps)
        lr_schedule = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda s: min(1.0, (s + 1) / warmup) if warmup else 1.0
        )
        objective, optimizer = accelerator.prepare(objective, optimizer)
        ema = EMA(_unwrap_unet(accelerator, objective), config.ema_decay) if config.ema_decay else None
        state = _TrainState(
            config.seed + 7919 * accelerator.process_index,
            ema,
            EarlyStopping(config.early_stopping_patience, config.early_stopping_min_delta, config.early_stopping_mode),
            BadSampleCounter(config.max_bad_fraction, config.max_bad_count, min_seen=min(200, len(dataset))),
        )
        accelerator.register_for_checkpointing(lr_schedule, state)

        resume_from = _load_resume_checkpoint(accelerator, resume_candidates, resume_skipped,
                                              explicit=not isinstance(config.resume, bool))
        if resume_from is not None:
            _truncate_jsonl(run_dir / "metrics.jsonl", state.step)
            _truncate_jsonl(run_dir / "validation.jsonl", state.step)
            logger.info("resumed from %s at step %d (micro-batch %d)", resume_from, state.step, state.micro)
        elif config.resume:
            logger.info("--resume: no checkpoint in %s yet, starting fresh", run_dir)

        if accelerator.is_main_process:
            (run_dir / "config.json").write_text(json.dumps({
                "train": settings["train"],
                "conditioner": conditioner.describe() if hasattr(conditioner, "describe") else str(type(conditioner)),
                "scheduler": dict(scheduler.config),
                "unet_config": dict(unet.config),
                "dataset": settings["dataset"],
                "run": settings["run"],
                "resumed_from": str(resume_from) if resume_from else None,
                "provenance": run_provenance(accelerator),
            }, indent=2, default=str))

        sampler = ResumableBatchSampler(len(dataset), config.batch_size, seed=config.seed, start=state.micro,
                                        rank=accelerator.process_index, world_size=accelerator.num_processes)
        loader = torch.utils.data.DataLoader(dataset, batch_sampler=sampler, collate_fn=collate_skip_bad,
                                             num_workers=config.num_workers)
        device = accelerator.device
        bar = tqdm(total=config.max_steps, initial=state.step, disable=not (config.progress and accelerator.is_main_process),
                   desc="fcr-train", dynamic_ncols=True)
        losses: list[float] = []
        fcr_to_denoise: list[float] = []
        oc_to_denoise: list[float] = []
        rollout_to_denoise: list[float] = []
        checkpoints_written: list[Path] = []
        last_logs: dict = {}
        stopped_early = stopped_by_time = False
        acc = _StepAccumulator()
        step_t0 = time.perf_counter()
        last_saved_step = state.step if resume_from else -1

        data_iter = iter(loader)
        while state.step < config.max_steps:
            batch = next(data_iter)
            g = state.generator_for(state.micro)
            state.micro += 1
            state.bad.update(batch["n_seen"], batch["n_bad"], batch["bad"])
            if len(batch["caption"]) == 0:
                continue
            with accelerator.accumulate(objective):
                x0, text = conditioner(batch, device, g)
                n = x0.shape[0]
                if config.hflip:
                    flip = (torch.rand(n, generator=g) < 0.5).to(device)
                    x0 = torch.where(flip[:, None, None, None], x0.flip(-1), x0)
                if config.cond_dropout > 0:
                    drop = (torch.rand(n, generator=g) < config.cond_dropout).to(device)
                    null = conditioner.null_states.to(device, text.dtype).expand_as(text)
                    text = torch.where(drop[:, None, None], null, text)
                T = scheduler.config.num_train_timesteps
                if oc is not None:
                    t, delta = sample_oc_timesteps(n, T, oc, generator=g, device=device)
                else:  # FCR's draw; with λ = 0 (and for the rollout term's L_denoise) the control's t ~ U(0, T−1)
                    t, delta = sample_timesteps(n, T, config.fcr.delta_max, generator=g, device=device,
                                                fcr=config.fcr.lam > 0, delta_scale=config.fcr.timesteps_per_delta(T))
                noise = torch.randn(x0.shape, generator=g).to(device, x0.dtype)
                if ro is not None:  # drawn after the control's draws, so L_denoise sees the control's t and ε
                    delta = sample_key_steps(ro.rows(n), key_grid, T, ro, generator=g)
                with accelerator.autocast():
                    out = objective(x0, text, noise, t, delta)
                accelerator.backward(out.loss)
                if accelerator.sync_gradients and config.max_grad_norm:
                    accelerator.clip_grad_norm_(params, config.max_grad_norm)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            acc.add(out)
            if not accelerator.sync_gradients:
                continue

            lr_schedule.step()
            state.step += 1
            if ema is not None:
                ema.update(_unwrap_unet(accelerator, objective))
            logs = acc.pop()
            logs.update(step=state.step, lr=lr_schedule.get_last_lr()[0],
                        step_time_s=time.perf_counter() - step_t0, bad_samples=state.bad.bad,
                        **_fcr_share(config.fcr.lam, logs))
            if oc is not None:
                logs.update(_term_share("oc", oc.lam, logs))
                oc_to_denoise.append(logs["oc_to_denoise"])
            if ro is not None:
                logs.update(_term_share("rollout", ro.lam, logs))
                rollout_to_denoise.append(logs["rollout_to_denoise"])
            losses.append(logs["loss"])
            fcr_to_denoise.append(logs["fcr_to_denoise"])
            if state.step == 1 or state.step % max(1, config.log_every) == 0 or state.step == config.max_steps:
                term = "oc" if oc is not None else "rollout" if ro is not None else "fcr"
                logger.info("step %d: loss %.5g  l_denoise %.5g  l_%s %.5g  λ·l_%s/l_denoise %.4g", state.step,
                            logs["loss"], logs["l_denoise"], term, logs[f"l_{term}"], term, logs[f"{term}_to_denoise"])
            last_logs = logs
            if accelerator.is_main_process:
                _write_jsonl(run_dir / "metrics.jsonl", logs)
            bar.update(1)
            bar.set_postfix(loss=f"{logs['loss']:.4f}", fcr=f"{logs['l_fcr']:.4f}", s=f"{logs['step_time_s']:.2f}")

            # Validate before checkpointing: a resumed run starts after this step and does not
            # validate it again, so the checkpoint must already hold this validation's
            # early-stopping counters and best checkpoint.
            validated = bool(validation_fn is not None and config.validate_every and state.step % config.validate_every == 0)
            if validated:
                stop = _validate(accelerator, objective, state, validation_fn, run_dir)
                if state.stopper.best_step == state.step:
                    state.best_checkpoint = str(run_dir / "checkpoints" / f"step_{state.step:07d}")
                if stop:
                    stopped_early = True
                    logger.info("early stopping at step %d (best %.5g at step %s)", state.step, state.stopper.best, state.stopper.best_step)
            if validated or state.step % config.checkpoint_every == 0 or state.step == config.max_steps:
                checkpoints_written.append(_save_checkpoint(accelerator, objective, state, run_dir, config.keep_checkpoints))
                last_saved_step = state.step
            if step_callback is not None:
                step_callback(state.step, logs)
            if stopped_early:
                break
            if config.max_time_s is not None and time.time() - t_start > config.max_time_s:
                logger.info("time budget of %.0f s reached at step %d; stopping", config.max_time_s, state.step)
                stopped_by_time = True
                break
            step_t0 = time.perf_counter()
        bar.close()
        if last_saved_step != state.step:
            checkpoints_written.append(_save_checkpoint(accelerator, objective, state, run_dir, config.keep_checkpoints))

        ckpts = _complete_checkpoints(run_dir)
        last = ckpts[-1] if ckpts else None
        final_unet = None if last is None else last / ("unet_ema" if ema is not None else "unet")
        result = RunResult(
            run_dir=run_dir, steps=state.step, checkpoints=ckpts, last_checkpoint=last, final_unet=final_unet,
            best_checkpoint=Path(state.best_checkpoint) if state.best_checkpoint else None,
            best_metric=state.stopper.best, stopped_early=stopped_early, stopped_by_time=stopped_by_time, losses=losses,
            fcr_to_denoise=fcr_to_denoise, oc_to_denoise=oc_to_denoise, rollout_to_denoise=rollout_to_denoise,
            last_logs=last_logs,
            wall_time_s=time.time() - t_start,
        )
        if accelerator.is_main_process:
            (run_dir / "summary.json").write_text(json.dumps(result.to_dict(), indent=2))
        return result
    finally:
        if handler is not None:
            logging.getLogger("fcr_train").removeHandler(handler)
            handler.close()
        if lock is not None:
            lock.release()


def _validate(accelerator, objective, state: _TrainState, validation_fn, run_dir: Path) -> bool:
    unet = _unwrap_unet(accelerator, objective)
    unet.eval()
    try:
        if state.ema is not None:
            with state.ema.applied(unet), torch.no_grad():
                value = float(validation_fn(unet, state.step))
        else:
            with torch.no_grad():
                value = float(validation_fn(unet, state.step))
    finally:
        unet.train()
    if not math.isfinite(value):
        raise ValueError(f"validation metric at step {state.step} is {value}; the validation callback must return a finite float")
    stop = state.stopper.update(value, state.step)
    if accelerator.is_main_process:
        _write_jsonl(run_dir / "validation.jsonl", {"step": state.step, "metric": value, "best": state.stopper.best,
                                                    "best_step": state.stopper.best_step})
    logger.info("validation at step %d: %.5g (best %.5g at step %s)", state.step, value, state.stopper.best, state.stopper.best_step)
    return stop


def _fcr_share(lam: float, logs: dict) -> dict:
    """λ·L_FCR and its ratio to L_denoise for one step: how much of the loss the FCR term is
    (design.md §5: ~0.1 % with Δ in timesteps, which makes the fine-tune practically λ = 0)."""
    weighted = lam * logs["l_fcr"]
    return {"l_fcr_weighted": weighted,
            "fcr_to_denoise": weighted / logs["l_denoise"] if logs["l_denoise"] > 0 else float("nan")}


def _term_share(term: str, lam: float, logs: dict) -> dict:
    """λ·L_<term> and its ratio to L_denoise for one step (output consistency's ``oc`` or the
    rollout term's share of the loss)."""
    weighted = lam * logs[f"l_{term}"]
    return {f"l_{term}_weighted": weighted,
            f"{term}_to_denoise": weighted / logs["l_denoise"] if logs["l_denoise"] > 0 else float("nan")}


class _StepAccumulator:
    """Means of the loss terms over the micro-batches of one optimizer step (kept as floats,
    so no autograd graph outlives its backward)."""

    def __init__(self):
        self.items: list[dict[str, float]] = []

    def add(self, out: FCRLossOutput | OutputConsistencyLossOutput | RolloutLossOutput) -> None:
        rec = {"loss": float(out.loss.detach()), "l_denoise": float(out.denoise.detach())}
        if isinstance(out, OutputConsistencyLossOutput):
            rec.update(l_fcr=0.0, l_oc=float(out.oc.detach()))  # l_fcr kept: readers of metrics.jsonl expect it
        elif isinstance(out, RolloutLossOutput):
            rec.update(l_fcr=0.0, l_rollout=float(out.rollout.detach()))
        else:
            rec["l_fcr"] = float(out.fcr.detach())
            rec.update({f"d/{name}": float(v) for name, v in out.per_block.items()})
        self.items.append(rec)

    def pop(self) -> dict:
        n = len(self.items)
        logs = {k: sum(it[k] for it in self.items) / n for k in self.items[0]}
        self.items = []
        return logs
