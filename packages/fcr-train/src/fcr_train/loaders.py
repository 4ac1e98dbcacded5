"""Loaders for the designed datasets in their usual on-disk forms.

Each ``*_records`` function reads an index (table, JSON, caption file, shard or folder tree) into
:class:`fcr_train.data.CaptionRecord` lists; :func:`build_dataset` turns a
:class:`fcr_train.api.DataConfig` into an :class:`fcr_train.data.ImageCaptionDataset`.
Nothing is downloaded: images must be on disk.

* LAION-Aesthetics subsets — parquet or CSV with an image-path column and a caption column
  (:func:`laion_records`), or webdataset tar shards of ``key.jpg`` + ``key.txt``/``key.json``
  (:func:`webdataset_records`);
* ArtBench-10 — class folders ``root/[train|test/]<style>/*.jpg`` (:func:`artbench_records`);
* MS-COCO captions — ``captions_train2017.json`` / ``captions_val2017.json`` (:func:`coco_records`);
* Flickr30k — ``results_20130124.token``, Kaggle ``results.csv`` (``|``-separated) or
  ``captions.txt`` (``image,caption``) (:func:`flickr30k_records`);
* ImageNet-1k class names as prompts — :func:`imagenet_prompts` (the list ships in
  :mod:`fcr_train.imagenet_classes`).

Prompt-only helpers for evaluation: :func:`coco_prompts`, :func:`flickr30k_prompts`,
:func:`imagenet_prompts`.
"""

from __future__ import annotations

import csv
import glob
import json
import logging
import os
import tarfile
from collections import defaultdict
from pathlib import Path

from .data import CaptionRecord, ImageCaptionDataset

__all__ = [
    "IMAGE_EXTENSIONS",
    "ARTBENCH_STYLES",
    "laion_records",
    "webdataset_records",
    "artbench_records",
    "coco_records",
    "flickr30k_records",
    "coco_prompts",
    "flickr30k_prompts",
    "imagenet_prompts",
    "build_dataset",
]

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp")
ARTBENCH_STYLES = ("art_nouveau", "baroque", "expressionism", "impressionism", "post_impressionism", "realism",
                   "renaissance", "romanticism", "surrealism", "ukiyo_e")
_IMAGE_COLUMNS = ("image_path", "path", "filepath", "file_name", "filename", "file", "image", "img", "url", "URL")
_CAPTION_COLUMNS = ("caption", "text", "TEXT", "prompt", "captions", "title")


def _require(path: str | os.PathLike, what: str) -> Path:
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"{what} not found: {p}")
    return p


def _resolve(name: str, images_dir: Path) -> str:
    p = Path(name)
    return str(p if p.is_absolute() else images_dir / p)


def _pick(columns, wanted, given, what, path) -> str:
    if given:
        if given not in columns:
            raise ValueError(f"{path}: no column {given!r} for {what}; columns are {list(columns)}")
        return given
    for c in wanted:
        if c in columns:
            return c
    raise ValueError(f"{path}: cannot find the {what} column (tried {list(wanted)}); columns are {list(columns)}. "
                     f"Name it with --{what.split()[0]}-column.")


def laion_records(path: str | os.PathLike, images_dir: str | os.PathLike | None = None,
                  image_column: str | None = None, caption_column: str | None = None) -> list[CaptionRecord]:
    """LAION-style table (``.parquet``, ``.csv`` or ``.tsv``) of image path + caption.

    Relative image paths are resolved against ``images_dir`` (default: the table's folder).
    A column of URLs is refused: download first (e.g. img2dataset) and use the files or shards.
    """
    path = _require(path, "LAION table")
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        table = pq.read_table(path)
        columns = table.column_names
        img_col = _pick(columns, _IMAGE_COLUMNS, image_column, "image column", path)
        cap_col = _pick(columns, _CAPTION_COLUMNS, caption_column, "caption column", path)
        images, captions = table.column(img_col).to_pylist(), table.column(cap_col).to_pylist()
    elif path.suffix in (".csv", ".tsv"):
        with path.open(newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f, delimiter="\t" if path.suffix == ".tsv" else ",")
            rows = list(reader)
            columns = reader.fieldnames or []
        img_col = _pick(columns, _IMAGE_COLUMNS, image_column, "image column", path)
        cap_col = _pick(columns, _CAPTION_COLUMNS, caption_column, "caption column", path)
        images, captions = [r[img_col] for r in rows], [r[cap_col] for r in rows]
    else:
        raise ValueError(f"{path}: LAION tables must be .parquet, .csv or .tsv")
    if images and str(images[0]).startswith(("http://", "https://")):
        raise ValueError(f"{path}: column {img_col!r} holds URLs; nothing is downloaded at run time. Download the images "
                         "first (e.g. img2dataset) and point at the files (--images-dir) or the webdataset shards (--data webdataset).")
    root = Path(images_dir) if images_dir else path.parent
    return [CaptionRecord(_resolve(str(i), root), "" if c is None else str(c)) for i, c in zip(images, captions, strict=True) if i]


def _shard_paths(path: str | os.PathLike) -> list[str]:
    p = Path(path)
    if p.is_dir():
        shards = sorted(str(s) for s in p.glob("*.tar"))
    elif any(ch in str(path) for ch in "*?["):
        shards = sorted(glob.glob(str(path)))
    else:
        shards = [str(_require(p, "webdataset shard"))]
    if not shards:
        raise FileNotFoundError(f"no .tar shards at {path}")
    return shards


def webdataset_records(path: str | os.PathLike) -> list[CaptionRecord]:
    """Webdataset shards: a folder of ``*.tar``, a glob, or one tar.

    Samples are grouped by key (the member name up to the first dot of its file name); the image
    is the first ``.jpg/.jpeg/.png/.webp`` member, the caption comes from ``.txt``/``.caption`` or
    the ``caption``/``text`` field of ``.json``. Samples without an image are skipped.
    """
    records: list[CaptionRecord] = []
    for shard in _shard_paths(path):
        try:
            tar = tarfile.open(shard)
        except (tarfile.TarError, OSError) as exc:
            logger.warning("skipping unreadable shard %s: %s", shard, exc)
            continue
        with tar:
            samples: dict[str, dict] = defaultdict(dict)
            order: list[str] = []
            for m in tar.getmembers():
                if not m.isfile():
                    continue
                d, base = os.path.split(m.name)
                key, _, ext = base.partition(".")
                key = f"{d}/{key}" if d else key
                if key not in samples:
                    order.append(key)
                ext = "." + ext.lower()
                if ext in IMAGE_EXTENSIONS and "image" not in samples[key]:
                    samples[key]["image"] = m.name
                elif ext in (".txt", ".caption"):
                    samples[key]["caption"] = tar.extractfile(m).read().decode("utf-8", "replace")
                elif ext == ".json" and "caption" not in samples[key]:
                    try:
                        meta = json.loads(tar.extractfile(m).read())
                        samples[key]["caption"] = str(meta.get("caption") or meta.get("text") or "")
                    except (json.JSONDecodeError, AttributeError):
                        pass
            missing = 0
            for key in order:
                s = samples[key]
                if "image" not in s:
                    missing += 1
                    continue
                records.append(CaptionRecord((shard, s["image"]), s.get("caption", "")))
            if missing:
                logger.warning("%s: %d sample(s) without an image member skipped", shard, missing)
    return records


def artbench_records(root: str | os.PathLike, split: str = "train",
                     template: str = "a painting in the style of {}") -> list[CaptionRecord]:
    """ArtBench-10 class folders; the caption is the style name through ``template``.

    Accepts ``root/<style>/*`` or ``root/<split>/<style>/*`` (the ImageFolder release).
    """
    root = _require(root, "ArtBench-10 folder")
    if (root / split).is_dir():
        root = root / split
    styles = sorted(d for d in root.iterdir() if d.is_dir())
    if not styles:
        raise FileNotFoundError(f"{root}: no class folders (expected e.g. {root}/baroque/*.jpg)")
    unknown = [d.name for d in styles if d.name not in ARTBENCH_STYLES]
    if unknown:
        logger.warning("%s: folders not among the ArtBench-10 styles: %s", root, unknown)
    records = []
    for d in styles:
        name = d.name.replace("_", " ").replace("ukiyo e", "ukiyo-e").replace("post impressionism", "post-impressionism")
        records += [CaptionRecord(str(f), template.format(name)) for f in sorted(d.iterdir())
                    if f.suffix.lower() in IMAGE_EXTENSIONS]
    return records


def _coco(path) -> tuple[dict, list[dict]]:
    path = _require(path, "COCO captions JSON")
    data = json.loads(Path(path).read_text())
    if "annotations" not in data or "images" not in data:
        raise ValueError(f"{path}: not a COCO captions file (needs 'images' and 'annotations')")
    return {im["id"]: im["file_name"] for im in data["images"]}, data["annotations"]


def coco_records(annotations: str | os.PathLike, images_dir: str | os.PathLike | None = None) -> list[CaptionRecord]:
    """MS-COCO captions JSON -> one record per caption (images relative to ``images_dir``)."""
    files, anns = _coco(annotations)
    root = Path(images_dir) if images_dir else Path(annotations).parent
    out = []
    for a in anns:
        if a["image_id"] not in files:
            logger.warning("COCO caption %s refers to unknown image %s; skipped", a.get("id"), a["image_id"])
            continue
        out.append(CaptionRecord(_resolve(files[a["image_id"]], root), a.get("caption") or ""))
    return out


def coco_prompts(annotations: str | os.PathLike, per_image: int = 1) -> list[dict]:
    """Evaluation prompts from a COCO captions file: ``[{"image_id", "file_name", "prompt"}]``
    with the first ``per_image`` captions of each image (annotation order)."""
    files, anns = _coco(annotations)
    seen: dict[int, int] = defaultdict(int)
    out = []
    for a in anns:
        if seen[a["image_id"]] < per_image and a["image_id"] in files:
            seen[a["image_id"]] += 1
            out.append({"image_id": a["image_id"], "file_name": files[a["image_id"]], "prompt": a["caption"].strip()})
    return out


def _flickr_rows(path: Path) -> list[tuple[str, str]]:
    text = path.read_text(encoding="utf-8")
    lines = [ln for ln in text.splitlines() if ln.strip()]
    if not lines:
        raise ValueError(f"{path}: empty captions file")
    if "\t" in lines[0] and "#" in lines[0].split("\t")[0]:  # results_20130124.token
        rows = []
        for ln in lines:
            name, _, cap = ln.partition("\t")
            rows.append((name.split("#")[0].strip(), cap.strip()))
        return rows
    header = lines[0].lower()
    if "|" in lines[0] and "image_name" in header:  # Kaggle results.csv
        rows = []
        for ln in lines[1:]:
            parts = [p.strip() for p in ln.split("|")]
            if len(parts) >= 3:
                rows.append((parts[0], "|".join(parts[2:]).strip()))
        return rows
    if header.startswith("image") and "caption" in header:  # captions.txt: image,caption
        reader = csv.reader(lines[1:])
        return [(r[0].strip(), ",".join(r[1:]).strip()) for r in reader if r]
    raise ValueError(f"{path}: unknown Flickr30k captions format; expected results_20130124.token "
                     "('name.jpg#0<TAB>caption'), results.csv ('image_name| comment_number| comment') or "
                     "captions.txt ('image,caption')")


def flickr30k_records(captions: str | os.PathLike, images_dir: str | os.PathLike | None = None) -> list[CaptionRecord]:
    """Flickr30k captions (5 per image) -> one record per caption."""
    path = _require(captions, "Flickr30k captions file")
    root = Path(images_dir) if images_dir else path.parent / "flickr30k_images"
    return [CaptionRecord(_resolve(name, root), cap) for name, cap in _flickr_rows(path)]


def flickr30k_prompts(captions: str | os.PathLike, per_image: int = 1) -> list[dict]:
    """Evaluation prompts: ``[{"file_name", "prompt"}]``, the first ``per_image`` captions per image."""
    seen: dict[str, int] = defaultdict(int)
    out = []
    for name, cap in _flickr_rows(_require(captions, "Flickr30k captions file")):
        if seen[name] < per_image:
            seen[name] += 1
            out.append({"file_name": name, "prompt": cap})
    return out


def imagenet_prompts(template: str = "a photo of a {}.") -> list[dict]:
    """ImageNet-1k labels as prompts: ``[{"class_index", "class_name", "prompt"}]`` (1000 entries)."""
    from .imagenet_classes import IMAGENET_CLASSES

    return [{"class_index": i, "class_name": n, "prompt": template.format(n)} for i, n in enumerate(IMAGENET_CLASSES)]


def build_dataset(data, resolution: int, mode: str = "RGB") -> ImageCaptionDataset:
    """A :class:`~fcr_train.data.ImageCaptionDataset` from a :class:`fcr_train.api.DataConfig`."""
    if data.path is None:
        raise ValueError(f"--data {data.kind} needs --data-path (the table, JSON, captions file, shard folder or class root)")
    if data.kind == "laion":
        records = laion_records(data.path, data.images_dir, data.image_column, data.caption_column)
    elif data.kind == "webdataset":
        records = webdataset_records(data.path)
    elif data.kind == "artbench":
        records = artbench_records(data.path, data.split)
    elif data.kind == "coco":
        records = coco_records(data.path, data.images_dir)
    elif data.kind == "flickr30k":
        records = flickr30k_records(data.path, data.images_dir)
    else:
        raise ValueError(f"unknown data kind {data.kind!r} (laion, webdataset, artbench, coco, flickr30k, fashion-mnist)")
    if data.limit is not None:
        records = records[: data.limit]
    logger.info("%s: %d image-caption pairs from %s", data.kind, len(records), data.path)
    dataset = ImageCaptionDataset(records, resolution=resolution, mode=mode, name=f"{data.kind}:{data.path}")
    dataset.require_readable()  # before the trainer creates its run folder
    return dataset
