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

The schema is one module per table, each dataclass beside its check: :mod:`~fcr_eval.spec.models`,
:mod:`~fcr_eval.spec.datasets`, :mod:`~fcr_eval.spec.sampling`, :mod:`~fcr_eval.spec.finetune`,
:mod:`~fcr_eval.spec.evaluation`, :mod:`~fcr_eval.spec.robustness`, :mod:`~fcr_eval.spec.variations`
(expansion and each variation's resolved settings), :mod:`~fcr_eval.spec.human_study`,
:mod:`~fcr_eval.spec.contrasts` and :mod:`~fcr_eval.spec.criteria`; the words they accept are in
:mod:`~fcr_eval.spec.vocabulary`, the generic checker (``file:line``, types, finite numbers) in
:mod:`~fcr_eval.spec.checker`. This module is the loader: the file, its profiles, the order the
tables are checked in, and the checks that span tables (what the runner would refuse). The tables'
names are re-exported here, where the rest of the code imports them from.
"""

from __future__ import annotations

import difflib
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

from fcr_train.vocabulary import EMBEDDED_MODELS, PROMPT_TEMPLATES

from fcr_eval.spec.checker import INT_MAX, Checker, ExperimentFileError, Locator, deep_merge
from fcr_eval.spec.contrasts import ContrastSpec, load_contrasts
from fcr_eval.spec.criteria import CriteriaConfig, load_criteria
from fcr_eval.spec.datasets import DatasetSpec, fashion_mnist_size, load_datasets
from fcr_eval.spec.evaluation import EvaluationSpec, check_attribution_variations, load_evaluation
from fcr_eval.spec.finetune import EarlyStoppingSpec, FinetuneSpec, load_finetune
from fcr_eval.spec.human_study import HumanStudySpec, load_human_study
from fcr_eval.spec.models import ModelSpec, load_models
from fcr_eval.spec.names import NAME_RULE, name_problem
from fcr_eval.spec.robustness import RobustnessSpec, load_robustness
from fcr_eval.spec.sampling import SamplingSpec, load_sampling
from fcr_eval.spec.variations import (
    VariationSettings,
    VariationSpec,
    load_variations,
    resolve_variation,
)
from fcr_eval.spec.vocabulary import (
    METRICS,
    REFERENCE_METRICS,
    SAMPLERS,
    SCHEDULERS,
    SD_IMAGE_KINDS,
    SD_PROMPT_KINDS,
)

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
    "SAMPLERS",
    "SCHEDULERS",
    "METRICS",
]


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
    loc = Locator(path, text)
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ExperimentFileError(f"{path}: not valid TOML: {e}") from e
    chk = Checker(loc, None)
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


def _resolve(path: Path, loc: Locator, raw: dict, profile: str | None, quiet: bool = False) -> Experiment:
    """The file in ``profile`` (``None``: as written), expanded and checked, table by table in the
    order below (the first mistake is the one reported)."""
    profiles = raw.get("profiles", {})
    over = profiles[profile] if profile is not None else {}
    if profile is not None:
        raw = deep_merge({k: v for k, v in raw.items() if k != "profiles"}, over)
    chk = Checker(loc, profile, over, quiet)

    head = raw.get("experiment")
    if not isinstance(head, dict) or "id" not in head:
        chk.fail("the file needs an [experiment] table with id = \"...\" and description", "experiment")
    for k in head:
        if k not in ("id", "description", "notes"):
            chk.fail(f"unknown key experiment.{k}; allowed: id, description, notes", "experiment", k)
    exp_id = head["id"]
    chk.name(exp_id, "experiment.id", "experiment", "id")

    models = load_models(chk, raw.get("models", []))
    datasets = load_datasets(chk, raw.get("datasets", []))
    sampling = load_sampling(chk, raw.get("sampling", {}), datasets)
    finetune = load_finetune(chk, raw.get("finetune", {}), datasets)
    evaluation = load_evaluation(chk, raw.get("evaluation", {}), datasets)
    robustness = load_robustness(chk, raw.get("robustness", []))
    seeds = _load_seeds(chk, raw.get("seeds", [0]))
    variations, raw_index = load_variations(chk, raw.get("variations", []), profile, profiles, models, datasets,
                                            robustness, sampling, finetune)
    ids = [v.id for v in variations]
    samplers = {v.id: v.sampler for v in variations}  # what the checks below need of each variation
    criteria = load_criteria(chk, raw["criteria"], ids, evaluation) if "criteria" in raw else None
    check_attribution_variations(chk, evaluation, samplers)
    contrasts = load_contrasts(chk, raw.get("contrasts", []), ids, profile, profiles, samplers)
    human = load_human_study(chk, raw["human_study"], ids) if "human_study" in raw else None

    _check_finetune_table(chk, raw, variations, finetune, raw_index)
    _check_runnable(chk, models, datasets, sampling, evaluation, robustness, variations, finetune, raw_index)

    return Experiment(
        id=exp_id, description=head.get("description", ""), notes=head.get("notes", ""), path=path,
        profile=profile, profiles=tuple(profiles), models=models, datasets=datasets, sampling=sampling,
        finetune=finetune, evaluation=evaluation, robustness=robustness, variations=tuple(variations),
        seeds=tuple(seeds), criteria=criteria, human_study=human, resolved=raw, contrasts=contrasts,
    )


def _load_seeds(chk: Checker, seeds) -> list[int]:
    """``seeds = [...]``: distinct non-negative integers."""
    if not isinstance(seeds, list) or not seeds or not all(isinstance(s, int) and not isinstance(s, bool)
                                                             for s in seeds):
        chk.fail(f"seeds = {seeds!r} must be a non-empty list of integers", None, "seeds")
    if len(set(seeds)) != len(seeds):
        chk.fail(f"seeds = {seeds!r} has duplicates", None, "seeds")
    if any(s < 0 or s > INT_MAX for s in seeds):
        chk.fail(f"seeds = {seeds!r}: every seed must be in [0, 2**31): the results store keeps seeds in 32-bit "
                 "INTEGER columns, and numpy and torch generators take non-negative seeds", None, "seeds")
    return seeds


def _check_emoji_runnable(chk: Checker, datasets: dict[str, DatasetSpec], robustness: dict[str, RobustnessSpec],
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


def _check_runnable(chk: Checker, models: dict[str, ModelSpec], datasets: dict[str, DatasetSpec],
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
    if embedded and sampling.dtype != "float32":  # every embedded context samples in float32: a run must not be
        # stored as another precision than the one that produced it (both backbones, pixel and latent)
        chk.fail(f"sampling.dtype = {sampling.dtype!r}: the embedded model ({sorted(embedded)[0]}) samples in "
                 "float32 only (a small UNet on CPU, where half precision would change the numbers, not "
                 "the speed); leave dtype out or set \"float32\"", "sampling", "dtype")
    if embedded and {models[m].backbone for m in used} == {"emoji"}:
        _check_emoji_runnable(chk, datasets, robustness, variations, index)
        return
    if embedded:
        ref_split = ref.split if ref is not None and ref.kind == "fashion-mnist" else None
        if ref is None or ref.kind == "fashion-mnist":
            size = ref.limit if ref is not None and ref.limit else fashion_mnist_size(ref_split or "test")
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


def _check_finetune_table(chk: Checker, raw: dict, variations: list[VariationSpec], finetune: FinetuneSpec,
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
             "data, steps and batch_size", "variations", first.objective_key, index[first.id])
