"""Building a study: pairs of samples (same prompt and seed, two variations) from the results store.

The pairs are balanced over variation pairs (each unordered pair of variations gets the same
number, as far as the samples allow) and over prompts (within that, the least-used prompt is
picked next). A share of the study is attention checks: a sample against a visibly broken copy of
itself, whose answer is known; raters who fail them are excluded by the analysis.

Every image a rater sees is the study's own copy under ``<study>/images/``, re-encoded (no
metadata) and named by a random id, so neither a file name nor a URL says which variation made it.

Example:
    >>> report = build_study("results/fcr.duckdb", "results/human-study.duckdb", n_pairs=1000)
    >>> report.n_pairs, report.n_attention
    (1000, 100)
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import os
import random
import secrets
from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from . import __version__
from .store import StudyStore, images_dir_for, utcnow

__all__ = [
    "ATTENTION_VARIATION",
    "StudyBuildError",
    "SampleRef",
    "BuildReport",
    "select_pairs",
    "break_image",
    "load_samples",
    "build_study",
    "add_raters",
    "hash_secret",
]

logger = logging.getLogger(__name__)

#: ``pairs.variation_b`` of attention checks (the broken image).
ATTENTION_VARIATION = "(attention-check: broken copy)"
#: Images smaller than this are enlarged (nearest neighbour, content unchanged) for display.
MIN_DISPLAY_SIZE = 256


class StudyBuildError(RuntimeError):
    """The study cannot be built from what the results store holds (the message says why)."""


@dataclass(frozen=True)
class SampleRef:
    """One stored sample: which variation made it, for which prompt and seed, and where it is."""

    variation: str
    run_id: str
    prompt_id: str
    prompt: str
    seed: int
    image_file: Path
    image_path: str  # as stored (relative to the results store's folder)


@dataclass
class BuildReport:
    study_id: str
    n_pairs: int
    n_attention: int
    variations: list[str]
    pairs_per_variation_pair: dict[str, int]
    n_prompts: int
    admin_secret: str = field(repr=False)
    warnings: list[str] = field(default_factory=list)


def hash_secret(secret: str) -> str:
    """sha256 hex of a high-entropy secret (invitation tokens, admin secret)."""
    return hashlib.sha256(secret.encode()).hexdigest()


def _water_fill(total: int, caps: Sequence[int]) -> list[int]:
    """Split ``total`` as evenly as possible over bins of capacity ``caps``."""
    quota = [0] * len(caps)
    left = total
    open_bins = [i for i, c in enumerate(caps) if c > 0]
    while left > 0 and open_bins:
        share, extra = divmod(left, len(open_bins))
        if share == 0:
            for i in open_bins[:extra]:
                quota[i] += 1
            break
        for i in open_bins:
            take = min(share, caps[i] - quota[i])
            quota[i] += take
            left -= take
        open_bins = [i for i in open_bins if quota[i] < caps[i]]
    return quota


def select_pairs(samples: Sequence[SampleRef], n_pairs: int, *, seed: int = 0
                 ) -> tuple[list[tuple[SampleRef, SampleRef]], list[str]]:
    """Choose ``n_pairs`` pairs of samples with the same prompt and seed from two variations.

    Balanced over the unordered variation pairs (quotas differ by at most one where samples
    allow) and over prompts (the least-used prompt is picked next). The a/b order of each pair is
    random. Returns the pairs and warnings (e.g. fewer candidates than asked for).

    Example:
        >>> pairs, warnings = select_pairs(samples, 900, seed=0)
    """
    rng = random.Random(seed)
    by_variation: dict[str, dict[tuple[str, int], SampleRef]] = defaultdict(dict)
    for s in sorted(samples, key=lambda s: (s.variation, s.prompt_id, s.seed, s.run_id)):
        by_variation[s.variation].setdefault((s.prompt_id, int(s.seed)), s)
    variations = sorted(by_variation)
    if len(variations) < 2:
        raise StudyBuildError(
            f"the samples come from {len(variations)} variation(s) ({', '.join(variations) or 'none'}); "
            "a preference study needs at least two"
        )
    vpairs = list(itertools.combinations(variations, 2))
    candidates = {vp: sorted(set(by_variation[vp[0]]) & set(by_variation[vp[1]])) for vp in vpairs}
    if not any(candidates.values()):
        raise StudyBuildError(
            "no two variations share a (prompt_id, seed): pairs must show the same prompt and "
            "seed, so sample every variation with the same prompts and seeds"
        )
    warnings: list[str] = []
    for vp, keys in candidates.items():
        if not keys:
            warnings.append(f"variations {vp[0]} and {vp[1]} share no prompt+seed; not compared")
    quotas = _water_fill(n_pairs, [len(candidates[vp]) for vp in vpairs])
    if sum(quotas) < n_pairs:
        warnings.append(
            f"only {sum(quotas)} distinct pairs of samples exist (asked for {n_pairs} besides "
            "attention checks); the study uses all of them"
        )
    prompt_use: Counter[str] = Counter()
    remaining = {vp: list(candidates[vp]) for vp in vpairs}
    for keys in remaining.values():
        rng.shuffle(keys)  # random tie-break among equally used prompts
    taken = dict.fromkeys(vpairs, 0)
    chosen: list[tuple[SampleRef, SampleRef]] = []
    order = list(range(len(vpairs)))
    while any(taken[vpairs[i]] < quotas[i] for i in order):
        rng.shuffle(order)
        for i in order:
            vp = vpairs[i]
            if taken[vp] >= quotas[i]:
                continue
            keys = remaining[vp]
            j = min(range(len(keys)), key=lambda k: prompt_use[keys[k][0]])
            key = keys.pop(j)
            prompt_use[key[0]] += 1
            taken[vp] += 1
            a, b = by_variation[vp[0]][key], by_variation[vp[1]][key]
            chosen.append((a, b) if rng.random() < 0.5 else (b, a))
    return chosen, warnings


def break_image(image: Image.Image, seed: int = 0) -> Image.Image:
    """A visibly broken copy of ``image`` for attention checks.

    The image is cut into a 4×4 grid whose tiles are shuffled (and every other one turned
    upside down), then covered in strong noise: no attentive rater prefers it to the original.
    """
    rng = np.random.default_rng(seed)
    img = image.convert("RGB")
    w, h = img.size
    grid = 4
    tw, th = max(1, w // grid), max(1, h // grid)
    tiles = [img.crop((x * tw, y * th, (x + 1) * tw, (y + 1) * th)) for y in range(grid) for x in range(grid)]
    perm = rng.permutation(len(tiles))
    if np.array_equal(perm, np.arange(len(tiles))):
        perm = perm[::-1]
    out = Image.new("RGB", (tw * grid, th * grid))
    for k, src in enumerate(perm):
        tile = tiles[src].rotate(180) if k % 2 else tiles[src]
        out.paste(tile, ((k % grid) * tw, (k // grid) * th))
    arr = np.asarray(out, dtype=np.float32)
    arr = arr + rng.normal(0.0, 70.0, size=arr.shape)
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8)).resize((w, h), Image.NEAREST)


def load_samples(results_store: str | os.PathLike, experiment_id: str | None = None,
                 variations: Sequence[str] | None = None) -> tuple[list[SampleRef], str]:
    """Read the sample references of the results store (read-only, through fcr-eval's store).

    Returns the samples and the experiment id they belong to. Refuses a store without samples
    and, when the store holds several experiments, asks which one.
    """
    from fcr_eval.store import ResultsStore

    store = ResultsStore.open_readonly(results_store)
    experiments = [r[0] for r in store.sql(
        "SELECT DISTINCT r.experiment_id FROM samples s JOIN runs r USING (run_id) ORDER BY 1"
    ).iter_rows()]
    if not experiments:
        raise StudyBuildError(
            f"the results store {results_store} holds no samples (its `samples` table is empty); "
            "run an experiment that saves sample images (fcr-eval) before building a study"
        )
    if experiment_id is None:
        if len(experiments) > 1:
            raise StudyBuildError(
                f"the results store holds samples of several experiments ({', '.join(experiments)}); "
                "choose one with --experiment"
            )
        experiment_id = experiments[0]
    elif experiment_id not in experiments:
        raise StudyBuildError(
            f"experiment {experiment_id!r} has no samples in {results_store} "
            f"(experiments with samples: {', '.join(experiments)})"
        )
    df = store.sql(
        "SELECT r.variation_id, s.run_id, s.prompt_id, s.prompt, s.seed, s.image_path "
        "FROM samples s JOIN runs r USING (run_id) WHERE r.experiment_id = ? "
        "ORDER BY r.variation_id, s.prompt_id, s.seed, s.run_id",
        [experiment_id],
    )
    out = []
    for variation, run_id, prompt_id, prompt, seed, image_path in df.iter_rows():
        if variations and variation not in variations:
            continue
        out.append(SampleRef(variation, run_id, str(prompt_id), prompt or "", int(seed),
                             store.image_file(image_path), image_path))
    if variations:
        missing = sorted(set(variations) - {s.variation for s in out})
        if missing:
            raise StudyBuildError(
                f"no samples of variation(s) {', '.join(missing)} in experiment {experiment_id!r}"
            )
    return out, experiment_id


def _save_study_image(src: Image.Image, images_dir: Path) -> tuple[str, int, int]:
    img = src.convert("RGB")
    w, h = img.size
    if max(w, h) < MIN_DISPLAY_SIZE:
        k = -(-MIN_DISPLAY_SIZE // max(w, h))
        img = img.resize((w * k, h * k), Image.NEAREST)
    image_id = secrets.token_hex(12)
    img.save(images_dir / f"{image_id}.png", format="PNG")  # a fresh file: no source metadata
    return image_id, img.width, img.height


def build_study(results_store: str | os.PathLike, study_path: str | os.PathLike, *,
                n_pairs: int = 1000, attention_share: float = 0.1, pairs_per_rater: int = 50,
                experiment_id: str | None = None, variations: Sequence[str] | None = None,
                seed: int = 0, progress: bool = False) -> BuildReport:
    """Build a study into ``study_path`` (its own DuckDB file) from the results store's samples.

    Args:
        results_store: the fcr-eval results store (opened read-only).
        study_path: the study file, e.g. ``results/human-study.duckdb``; must not hold a study.
        n_pairs: pairs in the study, attention checks included (the design asks for 1k).
        attention_share: share of ``n_pairs`` that are attention checks.
        pairs_per_rater: how many pairs one rater is asked to rate.
        experiment_id, variations: which samples to compare (default: the only experiment, all
            its variations).
        seed: seeds the pair choice and the broken images.

    Returns:
        A :class:`BuildReport`, including the admin secret (shown once; only its hash is stored).

    The study is written to a temporary file beside ``study_path`` and renamed at the end, so a
    failed build leaves no file at ``study_path`` (and removes the images it copied).
    """
    if n_pairs < 1:
        raise StudyBuildError("--pairs must be at least 1")
    if not 0.0 <= attention_share < 1.0:
        raise StudyBuildError("--attention-share must be in [0, 1)")
    if pairs_per_rater < 1:
        raise StudyBuildError("--pairs-per-rater must be at least 1")
    study_path = Path(study_path)
    if not study_path.parent.is_dir():
        raise StudyBuildError(f"the folder of --out {study_path} ({study_path.parent}) does not exist; "
                              "create it or pass --out in an existing folder")
    if study_path.is_dir():
        raise StudyBuildError(f"--out {study_path} is a directory; pass the study's DuckDB file, e.g. "
                              f"{study_path / 'human-study.duckdb'}")
    if study_path.exists():
        existing = StudyStore(study_path, read_only=True)
        try:
            if existing.has_study():
                raise StudyBuildError(
                    f"{study_path} already holds a study; votes are never overwritten: pass another --out"
                )
        finally:
            existing.close()
    samples, experiment_id = load_samples(results_store, experiment_id, variations)
    n_attention = int(round(n_pairs * attention_share)) if attention_share > 0 else 0
    if attention_share > 0 and n_pairs >= 2:
        n_attention = max(1, min(n_attention, n_pairs - 1))
    main, warnings = select_pairs(samples, n_pairs - n_attention, seed=seed)
    if len(main) < n_pairs - n_attention and attention_share > 0:
        n_attention = max(1, int(round(len(main) * attention_share / (1 - attention_share))))
    for w in warnings:
        logger.warning(w)

    rng = random.Random(seed + 1)
    images_dir = images_dir_for(study_path)
    new_dirs = [d for d in (images_dir.parent, images_dir) if not d.exists()]
    images_dir.mkdir(parents=True, exist_ok=True)
    building = study_path.with_name(f".{study_path.name}.building-{secrets.token_hex(4)}")
    study = StudyStore(building)
    created: list[Path] = []
    image_rows: list[list] = []
    image_of: dict[tuple[str, str], str] = {}

    def study_image(s: SampleRef) -> str:
        key = (s.run_id, s.image_path)
        if key not in image_of:
            try:
                with Image.open(s.image_file) as im:
                    image_id, w, h = _save_study_image(im, images_dir)
            except FileNotFoundError:
                raise StudyBuildError(
                    f"sample image {s.image_file} (run {s.run_id}) is missing; the results store "
                    "and its samples/ folder must move together"
                ) from None
            created.append(images_dir / f"{image_id}.png")
            image_rows.append([image_id, _rel(images_dir / f"{image_id}.png", study_path), "sample",
                               s.run_id, s.image_path, w, h])
            image_of[key] = image_id
        return image_of[key]

    study_id = f"study-{utcnow():%Y%m%d-%H%M%S}-{secrets.token_hex(3)}"
    pair_rows: list[list] = []
    try:
        iterator = main
        if progress:
            from tqdm import tqdm

            iterator = tqdm(main, desc="copying study images", unit="pair")
        for a, b in iterator:
            pair_rows.append([a, b, study_image(a), study_image(b), False, None])
        # Attention checks: a sample (cycled over the chosen pairs' prompts) vs a broken copy.
        sources = [s for pair in main for s in pair]
        rng.shuffle(sources)
        for k in range(n_attention):
            s = sources[k % len(sources)]
            good = study_image(s)
            with Image.open(s.image_file) as im:
                broken_id, w, h = _save_study_image(break_image(im, seed=seed * 100003 + k), images_dir)
            created.append(images_dir / f"{broken_id}.png")
            image_rows.append([broken_id, _rel(images_dir / f"{broken_id}.png", study_path),
                               "broken", s.run_id, s.image_path, w, h])
            broken = SampleRef(ATTENTION_VARIATION, s.run_id, s.prompt_id, s.prompt, s.seed,
                               s.image_file, s.image_path)
            if rng.random() < 0.5:
                pair_rows.append([s, broken, good, broken_id, True, "a"])
            else:
                pair_rows.append([broken, s, broken_id, good, True, "b"])
        rng.shuffle(pair_rows)

        admin_secret = secrets.token_urlsafe(24)
        vpair_counts = Counter(f"{min(a.variation, b.variation)} vs {max(a.variation, b.variation)}"
                               for a, b, _ia, _ib, att, _exp in pair_rows if not att)
        variation_names = sorted({s.variation for s in samples})
        config = {"n_pairs": n_pairs, "attention_share": attention_share, "pairs_per_rater": pairs_per_rater,
                  "experiment_id": experiment_id, "variations": list(variations or []), "seed": seed}
        with study.transaction() as con:
            con.execute(
                "INSERT INTO study VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                [study_id, utcnow(), str(Path(results_store).resolve()), experiment_id,
                 json.dumps(variation_names), len(pair_rows), n_attention, pairs_per_rater,
                 json.dumps(config), f"fcr-human-study {__version__}", secrets.token_hex(32),
                 hash_secret(admin_secret)],
            )
            con.executemany("INSERT INTO study_images VALUES (?, ?, ?, ?, ?, ?, ?)", image_rows)
            con.executemany(
                "INSERT INTO pairs VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                [[f"p{secrets.token_hex(8)}", study_id, pos, a.prompt_id, a.prompt, a.seed,
                  a.variation, b.variation, a.run_id, b.run_id, ia, ib, att, expected]
                 for pos, (a, b, ia, ib, att, expected) in enumerate(pair_rows)],
            )
        study.close()
        os.replace(building, study_path)  # the study appears whole or not at all
    except BaseException:
        study.close()
        for f in [*created, building, building.with_name(building.name + ".wal")]:
            f.unlink(missing_ok=True)
        for d in reversed(new_dirs):
            if d.is_dir() and not any(d.iterdir()):
                d.rmdir()
        raise
    logger.info("built %s: %d pairs (%d attention checks) in %s", study_id, len(pair_rows),
                n_attention, study_path)
    return BuildReport(
        study_id=study_id, n_pairs=len(pair_rows), n_attention=n_attention,
        variations=variation_names, pairs_per_variation_pair=dict(sorted(vpair_counts.items())),
        n_prompts=len({a.prompt_id for a, *_ in pair_rows}), admin_secret=admin_secret,
        warnings=warnings,
    )


def _rel(path: Path, study_path: str | os.PathLike) -> str:
    return path.resolve().relative_to(Path(study_path).resolve().parent).as_posix()


def add_raters(study_path: str | os.PathLike, n: int, label: str = "rater") -> list[tuple[str, str]]:
    """Create ``n`` raters with unguessable invitation tokens (``secrets.token_urlsafe``).

    Only the tokens' hashes are stored; the tokens are returned once, as (rater_id, token).

    Example:
        >>> for rater_id, token in add_raters("results/human-study.duckdb", 20): ...
    """
    store = StudyStore(study_path)
    try:
        if not store.has_study():
            raise StudyBuildError(f"{study_path} holds no study; run `fcr-human-study build` first")
        out = [(f"r-{secrets.token_hex(5)}", secrets.token_urlsafe(18)) for _ in range(n)]
        start = store.query("SELECT count(*) FROM raters")[0][0]
        with store.transaction() as con:
            con.executemany(
                "INSERT INTO raters VALUES (?, ?, ?, ?)",
                [[rid, hash_secret(tok), f"{label}-{start + i + 1}", utcnow()]
                 for i, (rid, tok) in enumerate(out)],
            )
    finally:
        store.close()
    return out

