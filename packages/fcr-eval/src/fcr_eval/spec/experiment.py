"""Experiment files: a designed study as TOML, loaded into typed dataclasses and validated.

An experiment file states everything a study needs (models, datasets, fine-tune settings, run
variations, seeds, metrics, robustness protocols, human study, success criteria) and named
*profiles* that scale it (``quick``, ``full``). :func:`load_experiment` merges the chosen profile
over the base, expands list-valued variation fields into one variation per value, and checks
every key and value; a mistake raises :class:`ExperimentFileError` naming ``file:line``, the key,
the bad value and what is allowed.

Example::

    exp = load_experiment("experiments/mini-exp-1.toml", profile="quick")
    [v.id for v in exp.variations]       # ['no-cache', 'fd-5', 'fd-10', ...]

Variation expansion: ``stride = [5, 10, 20]`` with ``id = "fcr-{lambda_fcr:.2f}-fd-{stride}"``
gives three variations; every list-valued expandable field must appear in the id as ``{field}``.
A variation with ``profiles = ["full"]`` exists only in those profiles.

Why one module of this size: it is the experiment-file schema — each spec dataclass, its
fields and the check of each field sit together, so a new setting is added (and validated) in one
place; the generic checker (`_Checker`, `_Locator`) is small and serves only this schema.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import itertools
import logging
import math
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# The vocabularies below are owned by the modules that define the concepts; experiment files are
# checked against them.
# They import without torch, so loading an experiment file stays light.
from fcr_sample.schedules import NAMED_SCHEDULES
from fcr_sample.vocabulary import BLOCK_GROUPS as BLOCKS
from fcr_train.vocabulary import (
    DELTA_UNITS,
    DISTANCES,
    EMBEDDED_BACKBONES,
    EMBEDDED_MODELS,
    EMOJI_SPLITS,
    FASHION_MNIST_SPLITS,
    OC_CACHES,
    OC_TRAINABLE,
    PROMPT_TEMPLATES,
)

from fcr_eval.spec.contrasts import ContrastSpec, ContrastSpecError, check_contrast
from fcr_eval.spec.criteria import CriteriaConfig
from fcr_eval.spec.names import NAME_RULE, name_problem
from fcr_eval.spec.vocabulary import CACHED_SAMPLERS, PROTOCOL_SETTINGS, SAMPLERS, SCHEDULERS
from fcr_eval.spec.vocabulary import ROBUSTNESS_PROTOCOLS as ROBUSTNESS_KINDS

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on 3.10 only
    import tomli as tomllib

__all__ = [
    "ExperimentFileError",
    "ModelSpec",
    "DatasetSpec",
    "SamplingSpec",
    "EarlyStoppingSpec",
    "FinetuneSpec",
    "EvaluationSpec",
    "RobustnessSpec",
    "VariationSpec",
    "VariationSettings",
    "resolve_variation",
    "HumanStudySpec",
    "Experiment",
    "load_experiment",
    "EMBEDDED_MODELS",
    "PACKAGED_DATASET_KINDS",
    "SAMPLERS",
    "SCHEDULERS",
    "METRICS",
]

METRICS = (
    "fd", "fid", "kid", "is", "precision_recall", "class_agreement", "clip_score", "sec_per_image",
    "unet_forwards", "flops", "peak_memory", "sigma2_delta", "finetune_compute", "robustness", "clip_drift",
    "cache_attribution",
)
DATASET_KINDS = ("fashion-mnist", "emoji", "laion", "webdataset", "artbench", "coco", "flickr30k", "imagenet-classes")
DATASET_ROLES = ("finetune", "eval", "mini_val", "reference")
EXTRACTORS = ("efficientnet_lite0", "inception")
EXPANDABLE = ("model", "stride", "lambda_fcr", "lambda_oc", "delta_max", "delta_unit", "distance", "blocks", "scheduler",
              "robustness", "eval_prompts")
# Dataset kinds that ship with a package: the runner reads the installed files, never `path`.
PACKAGED_DATASET_KINDS = ("fashion-mnist", "emoji", "imagenet-classes")
# What a Stable Diffusion run can read (fcr_eval.run.contexts): prompts from these kinds, real
# reference images from these.
SD_PROMPT_KINDS = ("coco", "flickr30k", "imagenet-classes")
SD_IMAGE_KINDS = ("coco", "flickr30k", "laion", "artbench")
# Metrics that compare the samples with real reference images.
REFERENCE_METRICS = ("fd", "fid", "kid", "precision_recall", "sigma2_delta")
#: The largest integer a setting may hold: counts and step numbers reach torch and numpy as 32-bit
#: integers (seeds, checked on their own, may go up to 2**63).
INT_MAX = 2**31 - 1

logger = logging.getLogger(__name__)


class ExperimentFileError(ValueError):
    """An experiment file is malformed; the message names file:line, the key and what is allowed."""


# --------------------------------------------------------------------------------------------
# The typed form
# --------------------------------------------------------------------------------------------


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


@dataclass(frozen=True)
class DatasetSpec:
    """A data set and its role (``finetune``, ``eval`` prompts, ``mini_val``, ``reference`` images)."""

    id: str
    kind: str
    role: str
    description: str = ""
    path: str | None = None
    images_dir: str | None = None
    split: str | None = None
    limit: int | None = None
    resolution: int | None = None
    hflip: float = 0.0
    prompt_template: str | None = None


@dataclass(frozen=True)
class SamplingSpec:
    scheduler: str = "ddim"
    num_inference_steps: int = 50
    guidance_scale: float = 7.5
    resolution: int | None = None
    batch_size: int = 64
    n_samples: int = 1000
    eval_prompts: str | None = None
    dtype: str = "float32"


@dataclass(frozen=True)
class EarlyStoppingSpec:
    """Early stopping on a moving quality metric over a mini validation set."""

    metric: str = "fd_moving"
    every: int = 500
    mini_val_size: int = 3000
    window: int = 3
    patience: int = 3
    mini_val: str | None = None


@dataclass(frozen=True)
class FinetuneSpec:
    data: str | None = None
    steps: int = 10_000
    batch_size: int = 128
    lr: float = 1e-5
    optimizer: str = "adamw"
    weight_decay: float = 1e-2
    warmup_steps: int = 0
    delta_max: int = 10
    delta_unit: str = "timesteps"  # "sampler_steps": Δ counts steps of this experiment's sampler
    distance: str = "mse"  # fcr_train.loss.DISTANCES
    blocks: str = "all"
    ema_decay: float | None = None
    checkpoint_every: int = 500
    per_seed: bool = True
    mixed_precision: str = "no"
    cond_dropout: float = 0.1
    early_stopping: EarlyStoppingSpec | None = None


@dataclass(frozen=True)
class EvaluationSpec:
    metrics: tuple[str, ...] = ("fd", "kid", "precision_recall", "sec_per_image", "unet_forwards", "flops",
                                "peak_memory", "sigma2_delta")
    feature_extractor: str = "efficientnet_lite0"
    feature_image_size: int = 224
    inception_weights: str | None = None
    clip_model: str | None = None
    reference: str | None = None
    n_reference: int = 10_000
    timing_batch_sizes: tuple[int, ...] = (1, 8)
    timing_repeats: int = 3
    timing_seeds: str = "all"
    # Rounds of the experiment's interleaved timing session (every variation timed back to back in
    # each round; speed-up criteria with a CI). 0 = none. An experiment-level setting, not a run's.
    timing_rounds: int = 0
    sigma2_delta_max: int = 10
    sigma2_samples: int = 256
    sigma2_blocks: str = "all"
    clip_drift_samples: int = 256
    # "cache_attribution" in metrics: fcr_sample.attribute_cache_error on each cached run's first
    # attribution_samples samples (its own weights, x_T and prompts); propagation = also the final
    # sample's error when only one step is served from the cache (one partial trajectory per step).
    attribution_samples: int = 32
    attribution_propagation: bool = True
    # The cached variations to attribute (None: every cached variation of the profile).
    attribution_variations: tuple[str, ...] | None = None
    kid_subset_size: int = 1000
    pr_k: int = 3
    save_samples: bool = True
    grid_per_class: int = 8


@dataclass(frozen=True)
class RobustnessSpec:
    """A stress applied at sampling time; ``kind`` is one of fcr_eval.metrics.robustness.PROTOCOLS."""

    id: str
    kind: str
    description: str = ""
    settings: dict = field(default_factory=dict)


@dataclass(frozen=True)
class VariationSpec:
    """One run variation. ``lambda_fcr = None`` samples the model's own weights; a number (0
    included) samples an FCR fine-tune with that λ (λ = 0 is the plain fine-tuning control).
    ``lambda_oc`` (> 0, instead of ``lambda_fcr``) samples a fine-tune with the output-consistency
    term (:mod:`fcr_train.output_consistency`) against ``oc_cache``'s stale features; ``delta_max``,
    ``delta_unit`` and ``distance`` mean for it what they mean for FCR."""

    id: str
    model: str
    sampler: str = "none"
    description: str = ""
    stride: int | None = None
    parallel_decoding: bool = True
    schedule: str = "uniform"
    prior_noise_alpha: float = 0.0
    cache_branch_id: int = 0
    lambda_fcr: float | None = None
    lambda_oc: float | None = None
    oc_cache: str | None = None  # fcr_train.vocabulary.OC_CACHES; default "fd"
    oc_trainable: str | None = None  # fcr_train.vocabulary.OC_TRAINABLE; default "recomputed"
    delta_max: int | None = None
    delta_unit: str | None = None
    distance: str | None = None
    blocks: str | None = None
    finetune_data: str | None = None
    scheduler: str | None = None
    num_inference_steps: int | None = None
    guidance_scale: float | None = None
    resolution: int | None = None
    robustness: str = "none"
    eval_prompts: str | None = None
    profiles: tuple[str, ...] | None = None

    @property
    def finetuned(self) -> bool:
        return self.lambda_fcr is not None or self.lambda_oc is not None

    @property
    def objective(self) -> str | None:
        """What the variation's fine-tune trains: ``"fcr"`` (λ = 0: the plain control),
        ``"output_consistency"``, or ``None`` (the model's own weights)."""
        if self.lambda_oc is not None:
            return "output_consistency"
        return "fcr" if self.lambda_fcr is not None else None

    @property
    def objective_text(self) -> str:
        """The fine-tune's setting as the file states it (``lambda_fcr = 0.15``, ``lambda_oc = 0.5``)."""
        if self.lambda_oc is not None:
            return f"lambda_oc = {self.lambda_oc:g}"
        return f"lambda_fcr = {self.lambda_fcr:g}" if self.lambda_fcr is not None else "no fine-tune"


@dataclass(frozen=True)
class VariationSettings:
    """A variation's settings with the experiment's defaults filled in: the one place a
    variation's effective step count, guidance, scheduler and FCR options are derived (the spec
    checks them, the planner carries them). FCR fields are ``None`` for a variation that samples
    the model's own weights."""

    steps: int
    guidance_scale: float
    scheduler: str
    delta_unit: str | None = None
    distance: str | None = None
    delta_max: int | None = None
    blocks: str | None = None
    finetune_data: str | None = None
    lambda_oc: float | None = None  # set: the output-consistency objective (lambda_fcr is then None)
    oc_cache: str | None = None
    oc_trainable: str | None = None


def resolve_variation(v: VariationSpec, sampling: SamplingSpec, finetune: FinetuneSpec) -> VariationSettings:
    """Fill ``v``'s unset settings from the experiment's ``[sampling]`` and ``[finetune]`` tables.

    In sampler steps Δ_max defaults to the stride the fine-tune serves; in timesteps to
    ``finetune.delta_max`` (the paper's 10).

    Example:
        >>> resolve_variation(exp.variation("fcr-ss-fd-10"), exp.sampling, exp.finetune).delta_max
        10
    """
    steps = v.num_inference_steps if v.num_inference_steps is not None else sampling.num_inference_steps
    guidance = v.guidance_scale if v.guidance_scale is not None else sampling.guidance_scale
    scheduler = v.scheduler or sampling.scheduler
    if not v.finetuned:
        return VariationSettings(steps, guidance, scheduler)
    unit = v.delta_unit or finetune.delta_unit
    delta_max = v.delta_max or (v.stride if unit == "sampler_steps" and v.stride else finetune.delta_max)
    oc = v.lambda_oc is not None
    return VariationSettings(steps, guidance, scheduler, delta_unit=unit, distance=v.distance or finetune.distance,
                             delta_max=delta_max, blocks=None if oc else (v.blocks or finetune.blocks),
                             finetune_data=v.finetune_data or finetune.data, lambda_oc=v.lambda_oc,
                             oc_cache=(v.oc_cache or "fd") if oc else None,
                             oc_trainable=(v.oc_trainable or "recomputed") if oc else None)


@dataclass(frozen=True)
class HumanStudySpec:
    pairs: int = 1000
    comparisons: tuple[tuple[str, str], ...] = ()
    attention_checks: int = 0
    pairs_per_rater: int = 50
    description: str = ""


@dataclass(frozen=True)
class Experiment:
    """A loaded, validated, profile-resolved experiment."""

    id: str
    description: str
    path: Path
    profile: str | None
    profiles: tuple[str, ...]
    models: dict[str, ModelSpec]
    datasets: dict[str, DatasetSpec]
    sampling: SamplingSpec
    finetune: FinetuneSpec
    evaluation: EvaluationSpec
    robustness: dict[str, RobustnessSpec]
    variations: tuple[VariationSpec, ...]
    seeds: tuple[int, ...]
    criteria: CriteriaConfig | None
    human_study: HumanStudySpec | None
    notes: str = ""
    resolved: dict = field(default_factory=dict, repr=False)
    contrasts: tuple[ContrastSpec, ...] = ()  # the [[contrasts]] of this profile (fcr_eval.analysis.contrasts)

    def settings(self, v: VariationSpec) -> VariationSettings:
        """``v``'s effective settings (:func:`resolve_variation`)."""
        return resolve_variation(v, self.sampling, self.finetune)

    def variation(self, variation_id: str) -> VariationSpec:
        for v in self.variations:
            if v.id == variation_id:
                return v
        raise KeyError(f"{self.id} has no variation {variation_id!r}; it has {[v.id for v in self.variations]}")

    @property
    def embedded(self) -> bool:
        return all(m.embedded for m in self.models.values())


# --------------------------------------------------------------------------------------------
# Loading and validation
# --------------------------------------------------------------------------------------------


class _Locator:
    """Best-effort ``file:line`` for a key path (tomllib gives no positions)."""

    def __init__(self, path: Path, text: str):
        self.path, self.lines = path, text.splitlines()

    def _header_line(self, section: str, index: int | None) -> int | None:
        pat = re.compile(rf"^\s*\[\[\s*{re.escape(section)}\s*\]\]" if index is not None
                         else rf"^\s*\[\s*{re.escape(section)}\s*\]")
        hits = [i for i, ln in enumerate(self.lines) if pat.match(ln)]
        if index is not None:
            return hits[index] if index < len(hits) else None
        return hits[0] if hits else None

    def line(self, section: str | None, key: str | None, index: int | None = None) -> int | None:
        start = 0
        end = len(self.lines)
        if section:
            h = self._header_line(section, index)
            if h is None:
                for i, ln in enumerate(self.lines):  # inline table / dotted key
                    if re.match(rf"^\s*{re.escape(section.split('.')[-1])}\s*=", ln):
                        return i + 1
                return None
            start = h
            for j in range(h + 1, len(self.lines)):
                if re.match(r"^\s*\[", self.lines[j]):
                    end = j
                    break
            if key is None:
                return h + 1
        if key is None:
            return None
        pat = re.compile(rf"^\s*\"?{re.escape(key)}\"?\s*=")
        for i in range(start, end):
            if pat.match(self.lines[i]):
                return i + 1
        return (start + 1) if section else None

    def where(self, section: str | None, key: str | None = None, index: int | None = None) -> str:
        ln = self.line(section, key, index)
        return f"{self.path}:{ln}" if ln else str(self.path)


class _Checker:
    """Checks values and raises :class:`ExperimentFileError` at ``file:line``.

    ``over`` is the chosen profile's table: a key that the profile sets is located in
    ``[profiles.<name>.<section>]``, not in the base table it overrides. ``quiet`` silences the
    warnings (the other profiles are checked too, without repeating the chosen one's warnings).
    """

    def __init__(self, loc: _Locator, profile: str | None, over: dict | None = None, quiet: bool = False):
        self.loc, self.profile, self.over, self.quiet = loc, profile, over or {}, quiet

    def _place(self, section: str | None, key: str | None, index: int | None) -> tuple:
        """Where a key is written: in the profile's table when the profile sets it."""
        if not self.over or self.profile is None:
            return section, key, index
        prefix = f"profiles.{self.profile}"
        if section is None:
            return (prefix, key, None) if key in self.over else (section, key, index)
        node: Any = self.over
        for part in section.split("."):
            node = node.get(part) if isinstance(node, dict) else None
        if isinstance(node, dict) and (key is None or key in node):
            return f"{prefix}.{section}", key, None
        if isinstance(node, list) and index is not None:
            return f"{prefix}.{section}", key, index
        return section, key, index

    def where(self, section: str | None, key: str | None = None, index: int | None = None) -> str:
        return self.loc.where(*self._place(section, key, index))

    def fail(self, msg: str, section: str | None = None, key: str | None = None, index: int | None = None):
        suffix = f" (profile {self.profile!r})" if self.profile else ""
        raise ExperimentFileError(f"{self.where(section, key, index)}: {msg}{suffix}")

    def warn(self, msg: str, section: str | None = None, key: str | None = None, index: int | None = None):
        if not self.quiet:
            logger.warning("%s: %s", self.where(section, key, index), msg)

    def name(self, value: Any, what: str, section: str | None, key: str | None = "id", index: int | None = None):
        """``value`` must be an id (:mod:`fcr_eval.spec.names`): it names folders and files."""
        problem = name_problem(value)
        if problem:
            self.fail(f"{what} = {problem}; an id is {NAME_RULE}", section, key, index)

    def number(self, v: Any, name: str, section, key, index) -> None:
        """``v`` (and every number inside a list or table) must be finite and representable."""
        if isinstance(v, bool):
            return
        if isinstance(v, float) and not math.isfinite(v):
            self.fail(f"{name} = {v} is not a finite number (TOML's nan and inf are refused: every setting is a "
                      "real value)", section, key, index)
        if isinstance(v, int) and abs(v) > INT_MAX:
            self.fail(f"{name} = {v} is past what the toolkit can represent: integers are at most 2**31 - 1 = "
                      f"{INT_MAX}", section, key, index)
        if isinstance(v, dict):
            for k, x in v.items():
                self.number(x, f"{name}.{k}", section, key, index)
        if isinstance(v, list):
            for x in v:
                self.number(x, f"{name}[]", section, key, index)

    def build(self, cls, raw: Any, section: str, index: int | None = None, label: str | None = None, **extra):
        label = label or section
        if not isinstance(raw, dict):
            self.fail(f"[{label}] must be a table, got {type(raw).__name__}", section, None, index)
        names = {f.name: f for f in dataclasses.fields(cls)}
        for k in raw:
            if k not in names or k in extra:
                close = difflib.get_close_matches(k, list(names), n=1)
                hint = f"; did you mean {close[0]!r}?" if close else ""
                allowed = ", ".join(n for n in names if n not in extra)
                self.fail(f"unknown key {label}.{k}{hint} Allowed keys: {allowed}", section, k, index)
        missing = [n for n, f in names.items() if n not in raw and n not in extra
                   and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
        if missing:
            self.fail(f"[{label}] is missing required key(s) {missing}", section, None, index)
        values = {}
        for k, v in raw.items():
            self.number(v, f"{label}.{k}", section, k, index)
            values[k] = self.coerce(names[k].type, v, f"{label}.{k}", section, k, index)
        try:
            return cls(**values, **extra)
        except (ContrastSpecError, ExperimentFileError):
            raise
        except (TypeError, ValueError) as e:  # a spec's own __post_init__ check
            self.fail(f"[{label}]: {e}", section, None, index)

    def coerce(self, typ: Any, v: Any, name: str, section, key, index):
        t = str(typ).replace(" ", "")
        optional = "None" in t
        if v is None and optional:
            return None

        def bad(want: str):
            self.fail(f"{name} = {v!r} is not {want}", section, key, index)

        base = t.replace("|None", "")
        if base == "bool":
            if not isinstance(v, bool):
                bad("true or false")
            return v
        if base == "int":
            if isinstance(v, bool) or not isinstance(v, int):
                bad("an integer")
            return v
        if base == "float":
            if isinstance(v, bool) or not isinstance(v, (int, float)):
                bad("a number")
            return float(v)
        if base == "str":
            if not isinstance(v, str):
                bad("a string")
            return v
        if base == "dict":
            if not isinstance(v, dict):
                bad("a table")
            return dict(v)
        if base.startswith("tuple[tuple[str,str]"):
            if not isinstance(v, list) or not all(isinstance(p, list) and len(p) == 2 for p in v):
                bad("a list of [variation_a, variation_b] pairs")
            return tuple(tuple(str(x) for x in p) for p in v)
        if base.startswith("tuple["):
            inner = base[len("tuple["):].split(",")[0]
            if not isinstance(v, list):
                bad(f"a list of {inner}")
            return tuple(self.coerce(inner, x, name, section, key, index) for x in v)
        if base == "EarlyStoppingSpec":
            if v is False:  # a profile switches early stopping off with `early_stopping = false`
                return None
            return self.build(EarlyStoppingSpec, v, f"{section}.early_stopping" if section else "early_stopping",
                              label=name)
        return v

    def one_of(self, value, allowed, name, section, key, index=None):
        if value not in allowed:
            close = difflib.get_close_matches(str(value), [str(a) for a in allowed], n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            self.fail(f"{name} = {value!r} is not allowed{hint}; use one of {list(allowed)}", section, key, index)


def _deep_merge(base: dict, over: dict) -> dict:
    out = copy.deepcopy(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _deep_merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


TOP_LEVEL = ("experiment", "models", "datasets", "sampling", "finetune", "evaluation", "robustness", "variations",
             "seeds", "criteria", "human_study", "profiles", "contrasts")


def load_experiment(path: str | Path, profile: str | None = None) -> Experiment:
    """Load, profile-resolve, expand and validate an experiment file.

    Args:
        path: the ``.toml`` file.
        profile: a name under ``[profiles]`` (e.g. ``quick``); ``None`` = the file as written.

    Raises:
        ExperimentFileError: with ``file:line``, the key, the bad value and what is allowed.
        FileNotFoundError: no such file.

    Example:
        >>> exp = load_experiment("experiments/mini-exp-1.toml", profile="quick")
        >>> exp.seeds
        (0, 1)
    """
    path = Path(path)
    if path.is_dir():
        raise ExperimentFileError(f"{path} is a directory; pass an experiment .toml file, e.g. {path / 'mini-exp-1.toml'}")
    if not path.is_file():
        raise FileNotFoundError(f"experiment file {path} does not exist")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ExperimentFileError(f"{path} is not UTF-8 text (byte {e.start}); an experiment file is TOML") from None
    loc = _Locator(path, text)
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ExperimentFileError(f"{path}: not valid TOML: {e}") from e
    chk = _Checker(loc, None)
    for k in raw:
        if k not in TOP_LEVEL:
            close = difflib.get_close_matches(k, TOP_LEVEL, n=1)
            chk.fail(f"unknown top-level key {k!r}{'; did you mean ' + repr(close[0]) + '?' if close else ''} "
                     f"Allowed: {', '.join(TOP_LEVEL)}", None, None)
    profiles = raw.get("profiles", {})
    if not isinstance(profiles, dict):
        chk.fail("[profiles] must be a table of named profiles", "profiles")
    for name, over in profiles.items():
        problem = name_problem(name)
        if problem:  # a quoted or odd key: the first [profiles.…] header that spells it (else the first)
            heads = [i for i, ln in enumerate(loc.lines) if re.match(r"^\s*\[+\s*profiles\.", ln)]
            line = next((i for i in heads if name and name in loc.lines[i]), heads[0] if heads else None)
            raise ExperimentFileError(f"{path}{f':{line + 1}' if line is not None else ''}: profile name = {problem}; "
                                      f"an id is {NAME_RULE}")
        if not isinstance(over, dict):
            chk.fail(f"profile {name!r} must be a table ([profiles.{name}])", "profiles", name)
        for k in over:
            if k not in TOP_LEVEL or k in ("profiles", "experiment", "variations"):
                chk.fail(f"profile {name!r} may override {[t for t in TOP_LEVEL if t not in ('profiles', 'experiment', 'variations')]}"
                         f", not {k!r} (restrict variations with `profiles = [...]` on the variation)",
                         f"profiles.{name}", None)
    if profile is not None and profile not in profiles:
        raise ExperimentFileError(f"{path}: no profile {profile!r}; the file defines {sorted(profiles) or 'none'}")
    # The chosen form first (its errors and warnings), then every other profile and the base form,
    # quietly: a mistake in a profile is reported whichever profile is run.
    exp = _resolve(path, loc, raw, profile)
    for other in (None, *profiles):
        if other != profile:
            _resolve(path, loc, raw, other, quiet=True)
    return exp


def _resolve(path: Path, loc: _Locator, raw: dict, profile: str | None, quiet: bool = False) -> Experiment:
    """The file in ``profile`` (``None``: as written), expanded and checked."""
    profiles = raw.get("profiles", {})
    over = profiles[profile] if profile is not None else {}
    if profile is not None:
        raw = _deep_merge({k: v for k, v in raw.items() if k != "profiles"}, over)
    chk = _Checker(loc, profile, over, quiet)

    head = raw.get("experiment")
    if not isinstance(head, dict) or "id" not in head:
        chk.fail("the file needs an [experiment] table with id = \"...\" and description", "experiment")
    for k in head:
        if k not in ("id", "description", "notes"):
            chk.fail(f"unknown key experiment.{k}; allowed: id, description, notes", "experiment", k)
    exp_id = head["id"]
    chk.name(exp_id, "experiment.id", "experiment", "id")

    models: dict[str, ModelSpec] = {}
    for i, m in enumerate(raw.get("models", [])):
        spec = chk.build(ModelSpec, m, "models", i, label=f"models[{i}]")
        chk.name(spec.id, f"models[{i}].id", "models", "id", i)
        if spec.id in models:
            chk.fail(f"duplicate model id {spec.id!r}", "models", "id", i)
        models[spec.id] = spec
    if not models:
        chk.fail("at least one [[models]] entry is needed", None)

    datasets: dict[str, DatasetSpec] = {}
    for i, d in enumerate(raw.get("datasets", [])):
        spec = chk.build(DatasetSpec, d, "datasets", i, label=f"datasets[{i}]")
        chk.name(spec.id, f"datasets[{i}].id", "datasets", "id", i)
        if spec.id in datasets:
            chk.fail(f"duplicate dataset id {spec.id!r}", "datasets", "id", i)
        chk.one_of(spec.kind, DATASET_KINDS, f"datasets[{i}].kind", "datasets", "kind", i)
        chk.one_of(spec.role, DATASET_ROLES, f"datasets[{i}].role", "datasets", "role", i)
        if not 0.0 <= spec.hflip <= 1.0:
            chk.fail(f"datasets[{i}].hflip = {spec.hflip} must be a probability in [0, 1]", "datasets", "hflip", i)
        _check_dataset(chk, spec, i)
        datasets[spec.id] = spec

    def dataset_ref(value, name, section, key, index=None, roles=None):
        if value is None:
            return
        chk.one_of(value, list(datasets), name, section, key, index)
        if roles and datasets[value].role not in roles:
            chk.fail(f"{name} = {value!r} has role {datasets[value].role!r}; expected {list(roles)}", section, key, index)

    sampling = chk.build(SamplingSpec, raw.get("sampling", {}), "sampling")
    chk.one_of(sampling.scheduler, SCHEDULERS, "sampling.scheduler", "sampling", "scheduler")
    for k in ("num_inference_steps", "batch_size", "n_samples"):
        if getattr(sampling, k) < 1:
            chk.fail(f"sampling.{k} = {getattr(sampling, k)} must be >= 1", "sampling", k)
    _check_guidance(chk, sampling.guidance_scale, "sampling.guidance_scale", "sampling", None)
    if sampling.resolution is not None and sampling.resolution < 8:
        chk.fail(f"sampling.resolution = {sampling.resolution} must be >= 8 pixels (or left out: the model's own)",
                 "sampling", "resolution")
    dataset_ref(sampling.eval_prompts, "sampling.eval_prompts", "sampling", "eval_prompts", roles=("eval",))
    chk.one_of(sampling.dtype, ("float32", "float16", "bfloat16"), "sampling.dtype", "sampling", "dtype")

    finetune = chk.build(FinetuneSpec, raw.get("finetune", {}), "finetune")
    chk.one_of(finetune.blocks, BLOCKS, "finetune.blocks", "finetune", "blocks")
    chk.one_of(finetune.delta_unit, DELTA_UNITS, "finetune.delta_unit", "finetune", "delta_unit")
    chk.one_of(finetune.distance, DISTANCES, "finetune.distance", "finetune", "distance")
    chk.one_of(finetune.optimizer, ("adamw",), "finetune.optimizer", "finetune", "optimizer")
    chk.one_of(finetune.mixed_precision, ("no", "fp16", "bf16"), "finetune.mixed_precision", "finetune",
               "mixed_precision")
    for k in ("steps", "batch_size", "delta_max", "checkpoint_every"):
        if getattr(finetune, k) < 1:
            chk.fail(f"finetune.{k} = {getattr(finetune, k)} must be >= 1", "finetune", k)
    if finetune.lr <= 0:
        chk.fail(f"finetune.lr = {finetune.lr} must be > 0", "finetune", "lr")
    for k in ("warmup_steps", "weight_decay"):
        if getattr(finetune, k) < 0:
            chk.fail(f"finetune.{k} = {getattr(finetune, k)} must be >= 0", "finetune", k)
    if not 0.0 <= finetune.cond_dropout <= 1.0:
        chk.fail(f"finetune.cond_dropout = {finetune.cond_dropout} must be a probability in [0, 1]", "finetune",
                 "cond_dropout")
    if finetune.ema_decay is not None and not 0.0 <= finetune.ema_decay < 1.0:
        chk.fail(f"finetune.ema_decay = {finetune.ema_decay} must be in [0, 1)", "finetune", "ema_decay")
    dataset_ref(finetune.data, "finetune.data", "finetune", "data", roles=("finetune",))
    if finetune.early_stopping is not None:
        es = finetune.early_stopping
        chk.one_of(es.metric, ("fd_moving", "fid_moving"), "finetune.early_stopping.metric",
                   "finetune.early_stopping", "metric")
        for k in ("every", "mini_val_size", "window", "patience"):
            if getattr(es, k) < 1:
                chk.fail(f"finetune.early_stopping.{k} must be >= 1", "finetune.early_stopping", k)
        dataset_ref(es.mini_val, "finetune.early_stopping.mini_val", "finetune.early_stopping", "mini_val",
                    roles=("mini_val", "eval"))

    evaluation = chk.build(EvaluationSpec, raw.get("evaluation", {}), "evaluation")
    for m in evaluation.metrics:
        chk.one_of(m, METRICS, "evaluation.metrics[]", "evaluation", "metrics")
    chk.one_of(evaluation.feature_extractor, EXTRACTORS, "evaluation.feature_extractor", "evaluation",
               "feature_extractor")
    chk.one_of(evaluation.timing_seeds, ("all", "first"), "evaluation.timing_seeds", "evaluation", "timing_seeds")
    if any(b < 1 for b in evaluation.timing_batch_sizes):
        chk.fail("evaluation.timing_batch_sizes must be >= 1", "evaluation", "timing_batch_sizes")
    if evaluation.sigma2_delta_max < 1 or evaluation.sigma2_samples < 1 or evaluation.n_reference < 2:
        chk.fail("evaluation.sigma2_delta_max, sigma2_samples must be >= 1 and n_reference >= 2", "evaluation")
    chk.one_of(evaluation.sigma2_blocks, BLOCKS, "evaluation.sigma2_blocks", "evaluation", "sigma2_blocks")
    clip_metrics = [m for m in evaluation.metrics if m in ("clip_score", "clip_drift")]
    if clip_metrics and not evaluation.clip_model:
        chk.fail(f"evaluation.metrics has {clip_metrics}, which need evaluation.clip_model = a local CLIP folder "
                 "(transformers layout, e.g. a copy of openai/clip-vit-large-patch14)", "evaluation", "metrics")
    if evaluation.timing_rounds < 0:
        chk.fail(f"evaluation.timing_rounds = {evaluation.timing_rounds} must be >= 0 (0 = no interleaved timing)",
                 "evaluation", "timing_rounds")
    if evaluation.clip_drift_samples < 1:
        chk.fail("evaluation.clip_drift_samples must be >= 1", "evaluation", "clip_drift_samples")
    if evaluation.attribution_samples < 1:
        chk.fail(f"evaluation.attribution_samples = {evaluation.attribution_samples} must be >= 1 (the "
                 "samples of each cached run that the cache-error attribution walks)", "evaluation",
                 "attribution_samples")
    dataset_ref(evaluation.reference, "evaluation.reference", "evaluation", "reference", roles=("reference", "eval"))

    robustness: dict[str, RobustnessSpec] = {"none": RobustnessSpec("none", "none", "no stress")}
    for i, r in enumerate(raw.get("robustness", [])):
        spec = chk.build(RobustnessSpec, r, "robustness", i, label=f"robustness[{i}]")
        chk.name(spec.id, f"robustness[{i}].id", "robustness", "id", i)
        chk.one_of(spec.kind, ROBUSTNESS_KINDS, f"robustness[{i}].kind", "robustness", "kind", i)
        allowed = PROTOCOL_SETTINGS
        for k in spec.settings:
            if k not in allowed[spec.kind]:
                chk.fail(f"robustness[{i}].settings.{k} is not a setting of {spec.kind!r}; allowed: "
                         f"{sorted(allowed[spec.kind])}", "robustness", "settings", i)
        robustness[spec.id] = spec

    seeds = raw.get("seeds", [0])
    if not isinstance(seeds, list) or not seeds or not all(isinstance(s, int) and not isinstance(s, bool)
                                                             for s in seeds):
        chk.fail(f"seeds = {seeds!r} must be a non-empty list of integers", None, "seeds")
    if len(set(seeds)) != len(seeds):
        chk.fail(f"seeds = {seeds!r} has duplicates", None, "seeds")
    if any(s < 0 or s >= 2**63 for s in seeds):
        chk.fail(f"seeds = {seeds!r}: every seed must be in [0, 2**63) (numpy and torch generators take "
                 "non-negative seeds)", None, "seeds")

    variations: list[VariationSpec] = []
    raw_index: dict[str, int] = {}  # variation id → its [[variations]] table (for file:line)
    default_model = next(iter(models))
    for i, v in enumerate(raw.get("variations", [])):
        if not isinstance(v, dict):
            chk.fail(f"variations[{i}] must be a table", "variations", None, i)
        lists = {k: v[k] for k in EXPANDABLE if isinstance(v.get(k), list)}
        if "id" not in v or not isinstance(v["id"], str):
            chk.fail(f"variations[{i}] needs id = \"...\"", "variations", None, i)
        for k in lists:
            if "{" + k not in v["id"]:
                chk.fail(f"variations[{i}].{k} is a list, so its id {v['id']!r} must contain {{{k}}} "
                         "(one variation per value)", "variations", k, i)
        for combo in itertools.product(*lists.values()) if lists else [()]:
            one = {**v, **dict(zip(lists, combo, strict=False))}
            fmt = {k: one.get(k) for k in EXPANDABLE}
            try:
                one["id"] = v["id"].format(**fmt)
            except (KeyError, ValueError, IndexError) as e:
                chk.fail(f"variations[{i}].id {v['id']!r} cannot be formatted ({e}); placeholders may be "
                         f"{list(EXPANDABLE)}", "variations", "id", i)
            one.setdefault("model", default_model)
            chk.name(one["id"], f"variations[{i}].id" + (f" (from {v['id']!r})" if one["id"] != v["id"] else ""),
                     "variations", "id", i)
            spec = chk.build(VariationSpec, one, "variations", i, label=f"variations[{i}] ({one['id']})")
            _check_profile_names(chk, spec.profiles, f"variations[{i}] ({spec.id}).profiles", profiles, "variations", i)
            if spec.profiles is not None and profile not in spec.profiles:
                continue
            _check_variation(chk, spec, i, models, datasets, robustness, sampling, finetune)
            variations.append(spec)
            raw_index[spec.id] = i
    if not variations:
        chk.fail("no [[variations]] in this profile" if profile else "no [[variations]] (each one restricts itself "
                 "to profiles with `profiles = [...]`)", "variations")
    ids = [v.id for v in variations]
    dup = sorted({x for x in ids if ids.count(x) > 1})
    if dup:
        chk.fail(f"duplicate variation ids {dup}", "variations")

    criteria = None
    if "criteria" in raw:
        criteria = chk.build(CriteriaConfig, raw["criteria"], "criteria")  # roles + thresholds, design.md §1
        if criteria.r2_variations is not None:
            if not isinstance(criteria.r2_variations, list):
                chk.fail("criteria.r2_variations must be a list of variation ids", "criteria", "r2_variations")
            criteria = dataclasses.replace(criteria, r2_variations=tuple(criteria.r2_variations))
        for k in ("baseline", "candidate", "no_fcr_reference"):
            val = getattr(criteria, k)
            if val is not None:
                chk.one_of(val, ids, f"criteria.{k}", "criteria", k)
        for val in criteria.r2_variations or ():
            chk.one_of(val, ids, "criteria.r2_variations[]", "criteria", "r2_variations")

    for val in evaluation.attribution_variations or ():
        chk.one_of(val, ids, "evaluation.attribution_variations[]", "evaluation", "attribution_variations")
        if "cache_attribution" not in evaluation.metrics:
            chk.fail("evaluation.attribution_variations names the variations to attribute, but "
                     "\"cache_attribution\" is not in evaluation.metrics", "evaluation", "attribution_variations")
            break

    contrasts = _load_contrasts(chk, raw.get("contrasts", []), ids, profile, profiles)

    human = None
    if "human_study" in raw:
        human = chk.build(HumanStudySpec, raw["human_study"], "human_study")
        for a, b in human.comparisons:
            for val in (a, b):
                chk.one_of(val, ids, "human_study.comparisons[]", "human_study", "comparisons")

    _check_finetune_table(chk, raw, variations, finetune, raw_index)
    _check_runnable(chk, models, datasets, sampling, evaluation, robustness, variations, finetune, raw_index)

    return Experiment(
        id=exp_id, description=head.get("description", ""), notes=head.get("notes", ""), path=path,
        profile=profile, profiles=tuple(profiles), models=models, datasets=datasets, sampling=sampling,
        finetune=finetune, evaluation=evaluation, robustness=robustness, variations=tuple(variations),
        seeds=tuple(seeds), criteria=criteria, human_study=human, resolved=raw, contrasts=contrasts,
    )


def _check_dataset(chk: _Checker, d: DatasetSpec, i: int) -> None:
    sec = "datasets"
    if d.kind in PACKAGED_DATASET_KINDS:
        for key in ("path", "images_dir"):
            if getattr(d, key) is not None:
                chk.fail(f"datasets[{i}] ({d.id}).{key} = {getattr(d, key)!r} is not read for kind {d.kind!r}: the "
                         "runner uses the installed package's files (Fashion-MNIST: Debian dataset-fashion-mnist "
                         f"under /usr/share/datasets/fashion-mnist). Remove {key}", sec, key, i)
    if d.kind == "fashion-mnist" and d.split is not None:
        chk.one_of(d.split, ("train", "test"), f"datasets[{i}] ({d.id}).split", sec, "split", i)
    if d.kind == "emoji" and d.split is not None:
        chk.one_of(d.split, EMOJI_SPLITS, f"datasets[{i}] ({d.id}).split", sec, "split", i)
    if d.kind == "emoji" and d.prompt_template is not None:
        chk.fail(f"datasets[{i}] ({d.id}).prompt_template: the emoji backbone's prompts are the emoji names "
                 "themselves (its captions); remove prompt_template", sec, "prompt_template", i)
    if d.limit is not None and d.limit < 1:
        chk.fail(f"datasets[{i}] ({d.id}).limit = {d.limit} must be >= 1 (or left out: all samples)", sec, "limit", i)
    if d.kind == "fashion-mnist" and d.limit is not None and d.limit > _fashion_mnist_size(d.split):
        chk.fail(f"datasets[{i}] ({d.id}).limit = {d.limit} is more than the {_fashion_mnist_size(d.split)} images of "
                 f"Fashion-MNIST's {d.split or 'train'} split; use at most that (or leave limit out)", sec, "limit", i)
    if d.prompt_template is not None:
        tpl = d.prompt_template.replace("{class}", "{}")  # imagenet-classes also accepts {class}
        try:
            ok = "{}" in tpl and tpl.format("x") != tpl
        except (IndexError, KeyError, ValueError):
            ok = False
        if not ok:
            chk.fail(f"datasets[{i}] ({d.id}).prompt_template = {d.prompt_template!r} needs exactly the placeholder "
                     "{} where the class name goes (e.g. \"a photo of a {}\"), and no other braces", sec,
                     "prompt_template", i)
    if d.resolution is not None and d.resolution < 8:
        chk.fail(f"datasets[{i}] ({d.id}).resolution = {d.resolution} must be >= 8 pixels", sec, "resolution", i)


def _check_emoji_runnable(chk: _Checker, datasets: dict[str, DatasetSpec], sampling: SamplingSpec,
                          evaluation: EvaluationSpec, robustness: dict[str, RobustnessSpec],
                          variations: list[VariationSpec], index: dict[str, int]) -> None:
    """The emoji backbone reads only its own data set (prompts, reference and fine-tuning data)."""
    wrong = sorted(d.id for d in datasets.values() if d.kind != "emoji")
    if wrong:
        chk.fail(f"datasets {wrong} are not of kind \"emoji\": the emoji backbone's prompts, reference images and "
                 "fine-tuning data are the emoji set (Debian fonts-noto-color-emoji + unicode-data)", "datasets")
    for v in variations:
        if robustness[v.robustness].kind not in ("none", "schedule_perturbation"):
            chk.fail(f"variation {v.id!r} uses robustness {v.robustness!r} ({robustness[v.robustness].kind}), which "
                     "the emoji backbone does not run (its VAE and UNet are trained at 32² only)", "variations",
                     "robustness", index[v.id])


def _fashion_mnist_size(split: str | None) -> int:
    return FASHION_MNIST_SPLITS[split or "train"]


def _check_profile_names(chk: _Checker, names: tuple[str, ...] | None, what: str, profiles: dict, section: str,
                         index: int) -> None:
    """Every name in a variation's or contrast's ``profiles = [...]`` is a profile of the file."""
    unknown = [p for p in names or () if p not in profiles]
    if unknown:
        chk.fail(f"{what} names {', '.join(map(repr, unknown))}, which the file does not define; its profiles are "
                 f"{sorted(profiles) or 'none'} (a [profiles.<name>] table makes one)", section, "profiles", index)


def _check_finetune_table(chk: _Checker, raw: dict, variations: list[VariationSpec], finetune: FinetuneSpec,
                          index: dict[str, int]) -> None:
    """A fine-tune is hours of compute: it runs on the file's own [finetune] table, never on defaults."""
    if "finetune" in raw:
        return
    tuned = [v for v in variations if v.finetuned]
    if not tuned:
        return
    first = tuned[0]
    shown = ", ".join(f"{k} = {getattr(finetune, k)!r}" for k in ("steps", "batch_size", "lr", "delta_max", "blocks",
                                                                  "checkpoint_every", "data"))
    chk.fail(f"variation {first.id!r} sets {first.objective_text}, which fine-tunes the model, but the file "
             f"has no [finetune] table, so it would fine-tune with the defaults ({shown}; "
             f"{finetune.steps:,} steps × batch {finetune.batch_size}). Add a [finetune] table stating at least "
             "data, steps and batch_size", "variations", "lambda_oc" if first.lambda_oc is not None else "lambda_fcr",
             index[first.id])


def _check_runnable(chk: _Checker, models: dict[str, ModelSpec], datasets: dict[str, DatasetSpec],
                    sampling: SamplingSpec, evaluation: EvaluationSpec, robustness: dict[str, RobustnessSpec],
                    variations: list[VariationSpec], finetune: FinetuneSpec, index: dict[str, int]) -> None:
    """What the runner would refuse for a run (fcr_eval.run.contexts), refused here, before any plan."""
    used = {v.model for v in variations}
    embedded = {models[m].source for m in used if models[m].embedded}
    ev = evaluation
    if embedded and len(embedded) != len(used):
        chk.fail(f"the variations use embedded and Stable Diffusion models ({sorted(used)}); one family per file",
                 "models")
    if len(embedded) > 1:
        chk.fail(f"the variations use several embedded models ({sorted(embedded)}); one embedded model per file",
                 "models")
    ref = datasets[ev.reference] if ev.reference else None
    backbones = {models[m].backbone for m in used if models[m].embedded}
    if embedded and backbones == {"emoji"}:
        _check_emoji_runnable(chk, datasets, sampling, evaluation, robustness, variations, index)
        return
    if embedded:
        ref_split = ref.split if ref is not None and ref.kind == "fashion-mnist" else None
        if ref is None or ref.kind == "fashion-mnist":
            size = ref.limit if ref is not None and ref.limit else _fashion_mnist_size(ref_split or "test")
            if ev.n_reference > size:
                chk.fail(f"evaluation.n_reference = {ev.n_reference} is more than the {size} reference images "
                         f"(Fashion-MNIST {ref_split or 'test'} split{', limit' if ref is not None and ref.limit else ''})"
                         f"; use n_reference <= {size}", "evaluation", "n_reference")
        for v in variations:
            rob = robustness[v.robustness]
            if rob.kind == "ood_prompts":
                chk.fail(f"variation {v.id!r} uses robustness {rob.id!r} (ood_prompts), which needs a Stable Diffusion "
                         "model: the embedded model has text states for its class prompts only", "variations",
                         "robustness", index[v.id])
            prompts = v.eval_prompts or sampling.eval_prompts
            tpl = datasets[prompts].prompt_template if prompts else None
            if tpl is not None and tpl not in PROMPT_TEMPLATES:
                chk.fail(f"datasets ({prompts}).prompt_template = {tpl!r} has no text states in the embedded model; "
                         f"use one of {list(PROMPT_TEMPLATES)}", "datasets", "prompt_template",
                         list(datasets).index(prompts))
        return
    if ref is None and any(m in ev.metrics for m in REFERENCE_METRICS):
        needs = [m for m in ev.metrics if m in REFERENCE_METRICS]
        chk.fail(f"evaluation.metrics has {needs}, which need real images: set evaluation.reference to a dataset of "
                 f"kind {list(SD_IMAGE_KINDS)}", "evaluation", "metrics")
    if ref is not None and ref.kind not in SD_IMAGE_KINDS:
        chk.fail(f"evaluation.reference = {ref.id!r} is of kind {ref.kind!r}, which has no images; a reference "
                 f"needs real images ({', '.join(SD_IMAGE_KINDS)})", "evaluation", "reference")
    if ref is not None and ref.limit and ev.n_reference > ref.limit:
        chk.fail(f"evaluation.n_reference = {ev.n_reference} is more than the reference's limit = {ref.limit} "
                 f"images ({ref.id}); lower n_reference or raise the dataset's limit", "evaluation", "n_reference")
    for v in variations:
        if robustness[v.robustness].kind == "ood_prompts":
            continue
        prompts = v.eval_prompts or sampling.eval_prompts
        if prompts is None:
            chk.fail(f"variation {v.id!r} has no evaluation prompts: set sampling.eval_prompts (or the variation's "
                     "eval_prompts) to a dataset with role = \"eval\"", "sampling", "eval_prompts")
        if datasets[prompts].kind not in SD_PROMPT_KINDS:
            chk.fail(f"variation {v.id!r}: dataset {prompts!r} of kind {datasets[prompts].kind!r} cannot give "
                     f"prompts to a Stable Diffusion model; use one of kinds {list(SD_PROMPT_KINDS)}",
                     "variations", "eval_prompts", index[v.id])
        for res, where in ((v.resolution, "variations"), (sampling.resolution, "sampling")):
            if res is not None and res % 8:
                chk.fail(f"resolution = {res} (variation {v.id!r}) is not a multiple of 8, the VAE's factor",
                         where, "resolution", index[v.id] if where == "variations" else None)
        if v.finetuned and not (v.finetune_data or finetune.data):
            chk.fail(f"variation {v.id!r} fine-tunes ({v.objective_text}) but no fine-tuning data is named: "
                     "set finetune.data to a dataset with role = \"finetune\"", "finetune", "data")


def _check_guidance(chk: _Checker, g: float, name: str, section: str, index: int | None) -> None:
    if g < 0:
        chk.fail(f"{name} = {g} must be >= 0 (1 = no classifier-free guidance; the designed studies use 2-7.5)",
                 section, "guidance_scale", index)
    if g < 1 or g > 30:
        chk.warn(f"{name} = {g} is unusual (1 = no guidance, typical 2-7.5; below 1 weakens the prompt, above ~30 "
                 "saturates the images)", section, "guidance_scale", index)


def _check_variation(chk: _Checker, v: VariationSpec, i: int, models, datasets, robustness,
                     sampling: SamplingSpec, finetune: FinetuneSpec) -> None:
    sec = "variations"
    for k in ("num_inference_steps", "resolution"):
        val = getattr(v, k)
        if val is not None and val < (1 if k == "num_inference_steps" else 8):
            chk.fail(f"variations[{i}] ({v.id}).{k} = {val} must be >= {1 if k == 'num_inference_steps' else 8} "
                     f"(or left out: sampling.{k})", sec, k, i)
    if v.guidance_scale is not None:
        _check_guidance(chk, v.guidance_scale, f"variations[{i}] ({v.id}).guidance_scale", sec, i)
    settings = resolve_variation(v, sampling, finetune)
    steps = settings.steps
    if settings.delta_unit == "sampler_steps" and settings.delta_max is not None and settings.delta_max >= steps:
        chk.fail(f"variations[{i}] ({v.id}): Δ_max = {settings.delta_max} sampler steps must be below the {steps} "
                 "steps it counts (Δ·T/steps must stay inside the schedule); set delta_max", sec, "delta_max", i)
    if v.sampler in ("fd", "deepcache") and v.schedule == "uniform" and v.stride is not None:
        if v.stride > steps:
            chk.fail(f"variations[{i}] ({v.id}).stride = {v.stride} is larger than its {steps} sampling steps, so "
                     f"no step would reuse the cache as designed; use a stride <= {steps}", sec, "stride", i)
    if v.prior_noise_alpha < 0:
        chk.fail(f"variations[{i}] ({v.id}).prior_noise_alpha = {v.prior_noise_alpha} must be >= 0 (Faster "
                 "Diffusion uses 0.003)", sec, "prior_noise_alpha", i)
    if v.cache_branch_id < 0:
        chk.fail(f"variations[{i}] ({v.id}).cache_branch_id = {v.cache_branch_id} must be >= 0", sec,
                 "cache_branch_id", i)
    if v.delta_max is not None and v.delta_max < 1:
        chk.fail(f"variations[{i}] ({v.id}).delta_max = {v.delta_max} must be >= 1", sec, "delta_max", i)
    chk.one_of(v.model, list(models), f"variations[{i}] ({v.id}).model", sec, "model", i)
    chk.one_of(v.sampler, SAMPLERS, f"variations[{i}] ({v.id}).sampler", sec, "sampler", i)
    if v.sampler in CACHED_SAMPLERS and v.schedule == "uniform" and (v.stride is None or v.stride < 1):
        chk.fail(f"variations[{i}] ({v.id}) uses sampler {v.sampler!r} and needs stride >= 1 "
                 "(FD key-step stride / DeepCache cache interval)", sec, "stride", i)
    if v.sampler == "none" and v.stride is not None:
        chk.fail(f"variations[{i}] ({v.id}) has stride = {v.stride} but sampler = 'none'; use sampler 'fd' or "
                 "'deepcache', or drop stride", sec, "stride", i)
    chk.one_of(v.schedule, NAMED_SCHEDULES, f"variations[{i}] ({v.id}).schedule", sec, "schedule", i)
    if v.scheduler is not None:
        chk.one_of(v.scheduler, SCHEDULERS, f"variations[{i}] ({v.id}).scheduler", sec, "scheduler", i)
    if v.lambda_fcr is not None and v.lambda_fcr < 0:
        chk.fail(f"variations[{i}] ({v.id}).lambda_fcr = {v.lambda_fcr} must be >= 0 (0 = fine-tune without FCR)",
                 sec, "lambda_fcr", i)
    if v.blocks is not None:
        chk.one_of(v.blocks, BLOCKS, f"variations[{i}] ({v.id}).blocks", sec, "blocks", i)
    if v.delta_unit is not None:
        chk.one_of(v.delta_unit, DELTA_UNITS, f"variations[{i}] ({v.id}).delta_unit", sec, "delta_unit", i)
    if v.distance is not None:
        chk.one_of(v.distance, DISTANCES, f"variations[{i}] ({v.id}).distance", sec, "distance", i)
    if not v.finetuned and any(x is not None for x in (v.delta_max, v.blocks, v.finetune_data, v.delta_unit,
                                                       v.distance)):
        chk.fail(f"variations[{i}] ({v.id}) sets fine-tune options but no lambda_fcr or lambda_oc (no fine-tune)",
                 sec, None, i)
    _check_output_consistency(chk, v, i)
    chk.one_of(v.robustness, list(robustness), f"variations[{i}] ({v.id}).robustness", sec, "robustness", i)
    for k, roles in (("eval_prompts", ("eval",)), ("finetune_data", ("finetune",))):
        val = getattr(v, k)
        if val is not None:
            chk.one_of(val, list(datasets), f"variations[{i}] ({v.id}).{k}", sec, k, i)
            if datasets[val].role not in roles:
                chk.fail(f"variations[{i}] ({v.id}).{k} = {val!r} has role {datasets[val].role!r}, expected "
                         f"{list(roles)}", sec, k, i)


def _check_output_consistency(chk: _Checker, v: VariationSpec, i: int) -> None:
    """``lambda_oc`` and its options: one objective per fine-tune, each option only with its term."""
    sec = "variations"
    if v.lambda_oc is None:
        for k in ("oc_cache", "oc_trainable"):
            if getattr(v, k) is not None:
                chk.fail(f"variations[{i}] ({v.id}).{k} is an option of the output-consistency term, but the "
                         "variation sets no lambda_oc", sec, k, i)
        return
    if v.lambda_fcr is not None:
        chk.fail(f"variations[{i}] ({v.id}) sets both lambda_fcr and lambda_oc: a fine-tune trains one term "
                 "besides denoising; make two variations", sec, "lambda_oc", i)
    if not v.lambda_oc > 0:
        chk.fail(f"variations[{i}] ({v.id}).lambda_oc = {v.lambda_oc} must be > 0 (the λ = 0 control is "
                 "lambda_fcr = 0)", sec, "lambda_oc", i)
    if v.blocks is not None:
        chk.fail(f"variations[{i}] ({v.id}).blocks chooses FCR's encoder blocks; the output-consistency term "
                 "compares the UNet's outputs (oc_cache says whose stale features): drop blocks", sec, "blocks", i)
    if v.oc_cache is not None:
        chk.one_of(v.oc_cache, OC_CACHES, f"variations[{i}] ({v.id}).oc_cache", sec, "oc_cache", i)
    if v.oc_trainable is not None:
        chk.one_of(v.oc_trainable, OC_TRAINABLE, f"variations[{i}] ({v.id}).oc_trainable", sec, "oc_trainable", i)


def _load_contrasts(chk: _Checker, raw: Any, variation_ids: list[str], profile: str | None,
                    profiles: dict) -> tuple[ContrastSpec, ...]:
    """``[[contrasts]]`` → :class:`~fcr_eval.analysis.contrasts.ContrastSpec`, every name checked against this profile."""
    if not isinstance(raw, list):
        chk.fail("contrasts must be an array of tables ([[contrasts]])", None, "contrasts")
    out: list[ContrastSpec] = []
    for i, c in enumerate(raw):
        name = c.get("id", "?") if isinstance(c, dict) else "?"
        try:
            spec = chk.build(ContrastSpec, c, "contrasts", i, label=f"contrasts[{i}] ({name})")
            _check_profile_names(chk, spec.profiles, f"contrast {name!r} (contrasts[{i}]).profiles", profiles,
                                 "contrasts", i)
            if spec.profiles is not None and profile not in spec.profiles:
                continue
            check_contrast(spec, variation_ids)
        except ContrastSpecError as e:
            chk.fail(f"contrast {name!r} (contrasts[{i}]): {e}", "contrasts", e.key, i)
        out.append(spec)
    ids = [c.id for c in out]
    dup = sorted({x for x in ids if ids.count(x) > 1})
    if dup:
        chk.fail(f"duplicate contrast ids {dup}", "contrasts")
    return tuple(out)
