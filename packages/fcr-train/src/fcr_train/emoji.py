"""The emoji set: Noto colour emoji rendered with Pillow, named and grouped by Unicode.

The second embedded backbone's data (design.md section 3, "optional RGB set"). Everything ships in
Debian packages, so nothing is downloaded:

* images: ``fonts-noto-color-emoji`` (``NotoColorEmoji.ttf``, a CBDT bitmap font whose only
  strike is size 109), rendered on white, cropped to the glyph, padded square, resized to
  :data:`EMOJI_IMAGE_SIZE` with Lanczos;
* captions and classes: ``unicode-data``'s ``emoji/emoji-test.txt`` (the Unicode Consortium's list:
  every fully-qualified emoji with its CLDR name, group and subgroup). The caption is the name
  (``"grinning face"``, ``"flag: Germany"``, ``"waving hand: medium skin tone"``); the class is the
  Unicode group (9 groups; ``Component`` — bare skin-tone swatches and hair parts — is left out).

The held-out split is fixed by :data:`SPLIT_SEED` and stratified by group; it is drawn over
*base emoji* (the code points without skin-tone modifiers), so the five skin tones of one gesture
are all on the same side and the held-out images are not near-copies of training images.

Example:
    >>> data = load_emoji_set()
    >>> images, labels = data.images("train"), data.labels("train")    # uint8 (N, 32, 32, 3), (N,)
    >>> data.captions("train")[:2]
    ['grinning face', 'grinning face with big eyes']
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .data import to_model_range
from .vocabulary import EMOJI_GROUPS, EMOJI_SPLITS

__all__ = [
    "EMOJI_FONT_PATHS",
    "EMOJI_TEST_PATHS",
    "EMOJI_GROUPS",
    "EMOJI_IMAGE_SIZE",
    "EMOJI_SPLITS",
    "FONT_SIZE",
    "HELD_OUT_FRACTION",
    "SPLIT_SEED",
    "EmojiEntry",
    "EmojiSet",
    "EmojiDataset",
    "emoji_font_path",
    "emoji_test_path",
    "parse_emoji_test",
    "split_entries",
    "render_emoji",
    "load_emoji_set",
]

logger = logging.getLogger(__name__)

EMOJI_FONT_PATHS = ("/usr/share/fonts/truetype/noto/NotoColorEmoji.ttf",)
EMOJI_TEST_PATHS = ("/usr/share/unicode/emoji/emoji-test.txt",)
#: The font's only bitmap strike: CBDT fonts render at this size or not at all.
FONT_SIZE = 109
#: Side of the rendered images in pixels (the VAE maps 32² RGB to 8² × 4 latents).
EMOJI_IMAGE_SIZE = 32
HELD_OUT_FRACTION = 0.15
SPLIT_SEED = 0
_SKIN_TONES = {0x1F3FB, 0x1F3FC, 0x1F3FD, 0x1F3FE, 0x1F3FF}


def _find(env: str, candidates: Sequence[str], what: str, package: str) -> Path:
    tried = [p for p in (os.environ.get(env), *candidates) if p]
    for p in tried:
        if Path(p).is_file():
            return Path(p)
    raise FileNotFoundError(
        f"{what} not found (looked at {tried}). Install the Debian package `{package}` "
        f"(apt-get install {package}; ./run.sh sync does it) or point {env} at the file.")


def emoji_font_path() -> Path:
    """``NotoColorEmoji.ttf`` (``$FCR_EMOJI_FONT`` or the Debian path).

    Raises:
        FileNotFoundError: naming the Debian package to install.
    """
    return _find("FCR_EMOJI_FONT", EMOJI_FONT_PATHS, "the Noto colour emoji font", "fonts-noto-color-emoji")


def emoji_test_path() -> Path:
    """Unicode's ``emoji-test.txt`` (``$FCR_EMOJI_TEST`` or the Debian path).

    Raises:
        FileNotFoundError: naming the Debian package to install.
    """
    return _find("FCR_EMOJI_TEST", EMOJI_TEST_PATHS, "Unicode's emoji-test.txt", "unicode-data")


@dataclass(frozen=True)
class EmojiEntry:
    """One fully-qualified emoji of ``emoji-test.txt``.

    Attributes:
        codepoints: e.g. ``"1F44B 1F3FD"``; text: the emoji itself; name: its CLDR name (the caption);
        group / subgroup: Unicode's; label: index of ``group`` in :data:`EMOJI_GROUPS`;
        base: the code points without skin-tone modifiers (the unit of the held-out split).
    """

    codepoints: str
    text: str
    name: str
    group: str
    subgroup: str
    label: int
    base: str


def parse_emoji_test(path: str | os.PathLike | None = None) -> list[EmojiEntry]:
    """The fully-qualified emoji of ``emoji-test.txt`` in file order, ``Component`` left out.

    Raises:
        ValueError: the file has no ``# group:`` lines or no fully-qualified emoji (not that file).
    """
    path = Path(path) if path else emoji_test_path()
    group = subgroup = None
    out: list[EmojiEntry] = []
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.startswith("# group:"):
            group = line.split(":", 1)[1].strip()
        elif line.startswith("# subgroup:"):
            subgroup = line.split(":", 1)[1].strip()
        elif "; fully-qualified" in line and group in EMOJI_GROUPS:
            cps, rest = line.split(";", 1)
            # rest: " fully-qualified     # 😀 E1.0 grinning face"
            comment = rest.split("#", 1)[1].strip().split(" ", 2)
            if len(comment) < 3:
                raise ValueError(f"{path}: cannot read the name in line {line!r}")
            points = [int(c, 16) for c in cps.split()]
            out.append(EmojiEntry(
                codepoints=" ".join(f"{p:04X}" for p in points),
                text="".join(chr(p) for p in points),
                name=comment[2],
                group=group,
                subgroup=subgroup or "",
                label=EMOJI_GROUPS.index(group),
                base=" ".join(f"{p:04X}" for p in points if p not in _SKIN_TONES),
            ))
    if not out:
        raise ValueError(f"{path} holds no fully-qualified emoji of the groups {EMOJI_GROUPS}; "
                         "is it Unicode's emoji-test.txt?")
    return out


def split_entries(entries: Sequence[EmojiEntry], fraction: float = HELD_OUT_FRACTION, seed: int = SPLIT_SEED
                  ) -> dict[str, np.ndarray]:
    """Indices of the ``train`` and ``test`` (held-out) splits.

    Per group, the distinct base emoji are shuffled with ``seed`` and the first ``fraction`` of them
    (at least one) are held out with every skin-tone variant; indices keep file order.
    """
    if not 0 < fraction < 1:
        raise ValueError(f"held-out fraction must be in (0, 1), got {fraction}")
    rng = np.random.default_rng(seed)
    held: set[str] = set()
    for g in EMOJI_GROUPS:
        bases = sorted({e.base for e in entries if e.group == g})
        if not bases:
            continue
        order = rng.permutation(len(bases))
        held.update(bases[i] for i in order[: max(1, round(fraction * len(bases)))])
    test = np.array([i for i, e in enumerate(entries) if e.base in held], dtype=np.int64)
    train = np.array([i for i, e in enumerate(entries) if e.base not in held], dtype=np.int64)
    return {"train": train, "test": test}


@functools.lru_cache(maxsize=2)
def _font(path: str):
    from PIL import ImageFont

    return ImageFont.truetype(path, FONT_SIZE)


def render_emoji(text: str, size: int = EMOJI_IMAGE_SIZE, font_path: str | os.PathLike | None = None) -> np.ndarray:
    """One emoji as uint8 RGB ``(size, size, 3)``: glyph on white, cropped, padded square, Lanczos.

    Raises:
        ValueError: the font draws nothing for ``text``.
    """
    from PIL import Image, ImageDraw

    font = _font(str(font_path or emoji_font_path()))
    canvas = Image.new("RGBA", (2 * FONT_SIZE, 2 * FONT_SIZE), (255, 255, 255, 0))
    ImageDraw.Draw(canvas).text((FONT_SIZE // 4, FONT_SIZE // 4), text, font=font, embedded_color=True)
    box = canvas.getbbox()
    if box is None:
        raise ValueError(f"the emoji font draws nothing for {text!r}")
    glyph = canvas.crop(box)
    side = max(glyph.size)
    square = Image.new("RGBA", (side, side), (255, 255, 255, 0))
    square.paste(glyph, ((side - glyph.width) // 2, (side - glyph.height) // 2))
    white = Image.new("RGBA", square.size, (255, 255, 255, 255))
    rgb = Image.alpha_composite(white, square).convert("RGB")
    return np.asarray(rgb.resize((size, size), Image.LANCZOS), dtype=np.uint8)


class EmojiSet:
    """The parsed emoji list, its fixed split, and images rendered on first use (then kept).

    Attributes:
        entries: every :class:`EmojiEntry`; split: ``{"train", "test"}`` → entry indices;
        size: image side; source: what the data came from (files, their SHA-256, split rule) —
        stored with every number made from it.
    """

    def __init__(self, size: int = EMOJI_IMAGE_SIZE, fraction: float = HELD_OUT_FRACTION, seed: int = SPLIT_SEED):
        self.font_path = emoji_font_path()
        self.test_path = emoji_test_path()
        self.entries = parse_emoji_test(self.test_path)
        self.split = split_entries(self.entries, fraction, seed)
        self.size = size
        self._images: dict[int, np.ndarray] = {}
        self.source = {
            "font": str(self.font_path), "font_sha256": _sha256(self.font_path),
            "emoji_test": str(self.test_path), "emoji_test_sha256": _sha256(self.test_path),
            "image_size": size, "held_out_fraction": fraction, "split_seed": seed,
            "split_unit": "base emoji (skin tones together), stratified by group",
            "n": {k: int(len(v)) for k, v in self.split.items()},
        }

    def indices(self, split: str) -> np.ndarray:
        if split not in EMOJI_SPLITS:
            raise ValueError(f"emoji split must be one of {EMOJI_SPLITS}, got {split!r}")
        return self.split[split]

    def images(self, split: str, limit: int | None = None) -> np.ndarray:
        """uint8 ``(N, size, size, 3)`` of ``split`` (the first ``limit``)."""
        idx = self.indices(split)[:limit]
        missing = [i for i in idx.tolist() if i not in self._images]
        if len(missing) > 200:
            logger.info("rendering %d emoji at %d² (about 10 ms each)", len(missing), self.size)
        for i in missing:
            self._images[i] = render_emoji(self.entries[i].text, self.size, self.font_path)
        return np.stack([self._images[i] for i in idx.tolist()]) if len(idx) else \
            np.zeros((0, self.size, self.size, 3), np.uint8)

    def labels(self, split: str, limit: int | None = None) -> np.ndarray:
        return np.array([self.entries[i].label for i in self.indices(split)[:limit].tolist()], dtype=np.int64)

    def captions(self, split: str, limit: int | None = None) -> list[str]:
        return [self.entries[i].name for i in self.indices(split)[:limit].tolist()]

    def all_captions(self) -> list[str]:
        """Every entry's name, in entry order (index = entry index: the prompt-state table)."""
        return [e.name for e in self.entries]


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@functools.lru_cache(maxsize=2)
def load_emoji_set(size: int = EMOJI_IMAGE_SIZE) -> EmojiSet:
    """The emoji set with the recorded split (one per process and size)."""
    return EmojiSet(size)


class EmojiDataset(torch.utils.data.Dataset):
    """Rendered emoji with their names as captions (the trainer's dict items).

    ``pixels`` ``(3, size, size)`` in [-1, 1]; ``caption`` the name; ``prompt_index`` the entry index
    (row of the prompt-state table over :meth:`EmojiSet.all_captions`); ``label`` the group.
    """

    def __init__(self, split: str = "train", limit: int | None = None, data: EmojiSet | None = None):
        self.data = data or load_emoji_set()
        self.index = self.data.indices(split)[:limit]
        imgs = self.data.images(split, limit)
        self.pixels = torch.from_numpy(to_model_range(imgs)).permute(0, 3, 1, 2)
        self.split = split

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, i: int) -> dict:
        e = self.data.entries[int(self.index[i])]
        return {"pixels": self.pixels[i], "caption": e.name, "prompt_index": int(self.index[i]), "label": e.label}
