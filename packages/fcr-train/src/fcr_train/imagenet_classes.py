"""The 1000 ImageNet-1k (ILSVRC-2012) class names, in class-index order, as readable prompt words.

Used by exp-2 to turn labels into prompts ("a photo of a {class}", :func:`fcr_train.loaders.imagenet_prompts`).
The names follow the widely used simplified English names (one readable name per synset, e.g. index
0 "tench", 281 "tabby cat", 999 "toilet paper"), in the synset order of the ILSVRC-2012 devkit.
They ship as a data file, ``fcr_train/data/imagenet_classes.txt`` (one name per line, line i =
class index i).

Provenance: written from knowledge of that list for this package (no download). Its length (1000),
uniqueness and a set of index anchors are checked in ``tests/fcr_train/test_loaders.py``; the
exact wording of a few names may differ from other published simplified lists.
"""

from __future__ import annotations

from importlib import resources

__all__ = ["IMAGENET_CLASSES"]


def _load() -> tuple[str, ...]:
    text = resources.files(__package__).joinpath("data", "imagenet_classes.txt").read_text(encoding="utf-8")
    names = tuple(line for line in text.splitlines() if line)
    if len(names) != 1000:
        raise RuntimeError(f"fcr_train/data/imagenet_classes.txt holds {len(names)} names, expected 1000; "
                           "reinstall fcr-train")
    return names


#: Class names by ImageNet-1k class index.
IMAGENET_CLASSES: tuple[str, ...] = _load()
