"""The emoji set: parsed from Unicode's emoji-test.txt, rendered from the Noto colour emoji font,
a held-out split fixed by a seed that keeps skin-tone variants of one emoji together."""

from __future__ import annotations

import numpy as np
import pytest
from fcr_train import emoji
from fcr_train.emoji import (
    EMOJI_GROUPS,
    EmojiDataset,
    load_emoji_set,
    parse_emoji_test,
    render_emoji,
    split_entries,
)


@pytest.fixture(scope="module")
def entries():
    return parse_emoji_test()


def test_parse_reads_names_groups_and_subgroups_of_fully_qualified_emoji(entries):
    by_text = {e.text: e for e in entries}
    face = by_text["\U0001F600"]
    assert (face.name, face.group, face.subgroup) == ("grinning face", "Smileys & Emotion", "face-smiling")
    assert face.label == EMOJI_GROUPS.index("Smileys & Emotion")
    wave = by_text["\U0001F44B\U0001F3FD"]
    assert wave.name == "waving hand: medium skin tone" and wave.base == "1F44B"
    assert by_text["\U0001F1EF\U0001F1F5"].name == "flag: Japan"
    assert {e.group for e in entries} == set(EMOJI_GROUPS)  # Component left out
    assert len(entries) == len({e.codepoints for e in entries}) > 3000


def test_split_is_fixed_by_its_seed_and_keeps_an_emojis_skin_tones_together(entries):
    a, b = split_entries(entries), split_entries(entries)
    assert all(np.array_equal(a[k], b[k]) for k in a)
    assert not np.array_equal(split_entries(entries, seed=1)["test"], a["test"])
    train, test = set(a["train"].tolist()), set(a["test"].tolist())
    assert not train & test and len(train | test) == len(entries)
    test_bases = {entries[i].base for i in test}
    assert not any(entries[i].base in test_bases for i in train)
    # stratified: every group is on both sides, in about the held-out fraction of its base emoji
    for c in range(len(EMOJI_GROUPS)):
        bases_test = {entries[i].base for i in test if entries[i].label == c}
        bases_all = {e.base for e in entries if e.label == c}
        assert bases_test and abs(len(bases_test) / len(bases_all) - emoji.HELD_OUT_FRACTION) < 0.02


def test_the_recorded_split_sizes_are_what_the_shipped_weights_saw():
    data = load_emoji_set()
    assert data.source["n"] == {"train": 3089, "test": 566}
    assert data.source["split_seed"] == 0 and len(data.source["emoji_test_sha256"]) == 64


def test_render_draws_the_glyph_in_colour_on_white():
    img = render_emoji("\U0001F600")  # grinning face: yellow
    assert img.shape == (32, 32, 3) and img.dtype == np.uint8
    assert (img[0, 0] == 255).all()  # corner is background
    r, g, b = img[16, 8].astype(int)
    assert r > 200 and g > 150 and b < 120  # the face is yellow, not grey
    assert not np.array_equal(img, render_emoji("\U0001F1EF\U0001F1F5"))
    assert render_emoji("\U0001F600", size=16).shape == (16, 16, 3)


def test_dataset_items_carry_the_name_the_entry_index_and_the_group():
    data = load_emoji_set()
    ds = EmojiDataset("test", limit=5, data=data)
    item = ds[3]
    e = data.entries[int(data.indices("test")[3])]
    assert item["caption"] == e.name and item["label"] == e.label
    assert data.all_captions()[item["prompt_index"]] == e.name
    assert item["pixels"].shape == (3, 32, 32) and -1 <= float(item["pixels"].min()) < float(item["pixels"].max()) <= 1


def test_missing_debian_packages_are_named(monkeypatch):
    monkeypatch.setattr(emoji, "EMOJI_FONT_PATHS", ("/nonexistent/NotoColorEmoji.ttf",))
    monkeypatch.delenv("FCR_EMOJI_FONT", raising=False)
    with pytest.raises(FileNotFoundError, match="apt-get install fonts-noto-color-emoji"):
        emoji.emoji_font_path()
    monkeypatch.setattr(emoji, "EMOJI_TEST_PATHS", ("/nonexistent/emoji-test.txt",))
    monkeypatch.delenv("FCR_EMOJI_TEST", raising=False)
    with pytest.raises(FileNotFoundError, match="apt-get install unicode-data"):
        emoji.emoji_test_path()


def test_a_file_that_is_not_emoji_test_txt_is_refused(tmp_path):
    bad = tmp_path / "emoji-test.txt"
    bad.write_text("hello\n")
    with pytest.raises(ValueError, match="is it Unicode's emoji-test.txt"):
        parse_emoji_test(bad)
    with pytest.raises(ValueError, match="emoji split must be one of"):
        load_emoji_set().indices("validation")
