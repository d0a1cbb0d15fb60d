"""Tests for the procedural captioned dataset (ldm/toy/procedural.py)."""

from __future__ import annotations

import json
import math
import re
import time

import numpy as np
import pytest

from ldm.toy import procedural as P
from ldm.toy.procedural import (
    BACKGROUND_COLOURS, CAPTION_TEMPLATES, COLOURS, HELD_OUT_PAIRS, OBJECT_COLOURS, OBJECTS,
    POSITION_PHRASES, ProceduralDataset, export_imagefolder, render,
)


def pixels(sample) -> np.ndarray:
    return np.asarray(sample.image)


def test_same_seed_same_samples_and_random_access_matches_iteration():
    a, b = ProceduralDataset(3), ProceduralDataset(3)
    stream = iter(ProceduralDataset(3))
    for index in range(40):
        from_stream = next(stream)
        for sample in (a.sample(index), b.sample(index)):
            assert sample.caption == from_stream.caption
            assert np.array_equal(pixels(sample), pixels(from_stream))
    # Random access out of order returns the same as in order.
    assert np.array_equal(pixels(a.sample(7)), pixels(b.take(1, start=7)[0]))


def test_different_seeds_and_splits_differ():
    a, b = ProceduralDataset(0).take(20), ProceduralDataset(1).take(20)
    assert sum(np.array_equal(pixels(x), pixels(y)) for x, y in zip(a, b)) == 0
    assert [s.caption for s in a] != [s.caption for s in b]
    c = ProceduralDataset(0, split="all").take(20)
    assert [s.caption for s in a] != [s.caption for s in c]


def test_image_format_and_size():
    sample = ProceduralDataset(0).sample(0)
    assert sample.image.mode == "RGB" and sample.image.size == (64, 64)
    assert ProceduralDataset(0, image_size=32).sample(0).image.size == (32, 32)
    assert ProceduralDataset(0, image_size=96).sample(5).image.size == (96, 96)


def test_held_out_pairs_cover_every_colour_and_object_with_partners_left():
    assert 8 <= len(HELD_OUT_PAIRS) <= 12  # about 10 % of 96
    train_pairs = set(P.pairs_for_split("train"))
    assert len(train_pairs) == 96 - len(HELD_OUT_PAIRS)
    for colour in COLOURS:
        assert sum(c == colour for c, _ in train_pairs) >= 6
    for obj in OBJECTS:
        assert sum(o == obj for _, o in train_pairs) >= 6


def test_train_stream_never_yields_held_out_pairs_and_heldout_only_those():
    train = ProceduralDataset(11, "train")
    seen = set()
    for index in range(6000):
        # Only the attribute draw matters here; check pairs via the sample's labels.
        s = train.sample(index)
        assert (s.colour, s.object) not in HELD_OUT_PAIRS, (index, s.caption)
        seen.add((s.colour, s.object))
    assert seen == set(P.pairs_for_split("train"))  # and every allowed pair does occur
    heldout = ProceduralDataset(11, "heldout")
    held_seen = {(s.colour, s.object) for s in heldout.take(500)}
    assert held_seen == set(HELD_OUT_PAIRS)


def test_all_kinds_colours_templates_appear():
    samples = ProceduralDataset(5, "all").take(1500)
    assert {s.object for s in samples} == set(OBJECTS)
    assert {s.colour for s in samples} == set(COLOURS)
    assert {s.background for s in samples} == set(BACKGROUND_COLOURS)
    assert {s.template for s in samples} == set(range(len(CAPTION_TEMPLATES)))
    assert len(CAPTION_TEMPLATES) >= 10


_COLOUR_WORDS = set(BACKGROUND_COLOURS)


def test_caption_words_match_attributes():
    size_words = {"small", "big", "medium"}
    for s in ProceduralDataset(9, "all").take(2000):
        words = re.findall(r"[a-z]+", s.caption)
        assert s.object in words and s.colour in words
        assert [w for w in words if w in OBJECTS] == [s.object]
        # Colour words: the object colour first, then the background (if named) and nothing else.
        colours_named = [w for w in words if w in _COLOUR_WORDS]
        if "background" in words:
            assert colours_named == [s.colour, s.background]
        else:
            assert colours_named == [s.colour]
        # Articles agree with the next word.
        for article, nxt in zip(words, words[1:]):
            if article in ("a", "an"):
                assert article == ("an" if nxt[0] in "aeiou" else "a"), s.caption
        # Size words match the drawn size.
        named_sizes = [w for w in words if w in size_words]
        if named_sizes:
            assert named_sizes == [s.size_word] and s.size_word != "medium"
            low, high = P.SIZE_WORD_RANGES[s.size_word]
            assert low <= s.size < high
        # Position phrases match the drawn centre.
        phrases = [k for k, v in POSITION_PHRASES.items() if s.caption.endswith(v)]
        if phrases:
            assert phrases == [s.position_word]
            dx, dy = s.center[0] - 0.5, s.center[1] - 0.5
            if "left" in s.position_word:
                assert dx <= -0.12
            if "right" in s.position_word:
                assert dx >= 0.12
            if "top" in s.position_word:
                assert dy <= -0.12
            if "bottom" in s.position_word:
                assert dy >= 0.12
            if s.position_word == "middle":
                assert abs(dx) < 0.05 and abs(dy) < 0.05


def test_articles_and_known_caption_forms():
    caption = P.make_caption(CAPTION_TEMPLATES[3], object="bicycle", colour="orange", background="orange",
                             size_word="big")
    assert caption == "a big orange bicycle on an orange background"
    assert P.make_caption(CAPTION_TEMPLATES[0], object="car", colour="orange", background="red") == "an orange car"
    assert P.make_caption(CAPTION_TEMPLATES[6], object="star", colour="red", background="blue",
                          position_word="middle") == "a photo of a red star in the middle"


def test_background_is_far_from_object_colour_and_sizes_in_range():
    for s in ProceduralDataset(2, "all").take(1000):
        assert s.background != s.colour
        assert math.dist(OBJECT_COLOURS[s.colour], BACKGROUND_COLOURS[s.background]) >= P.MIN_BACKGROUND_DISTANCE
        assert P.SIZE_RANGE[0] <= s.size <= P.SIZE_RANGE[1]
        # The two most frequent pixel values are the (jittered) object and background colours.
        values, counts = np.unique(pixels(s).reshape(-1, 3), axis=0, return_counts=True)
        top_two = values[np.argsort(counts)[-2:]].astype(float)
        for name, table, jitter in ((s.colour, OBJECT_COLOURS, P.OBJECT_JITTER),
                                    (s.background, BACKGROUND_COLOURS, P.BACKGROUND_JITTER)):
            distance = np.abs(top_two - np.array(table[name])).max(axis=1).min()
            assert distance <= jitter, (s.caption, name, top_two)


def test_render_draws_object_inside_its_box_with_thick_strokes():
    bg, fg = (0, 0, 0), (255, 255, 255)
    for obj in OBJECTS:
        image = np.asarray(render(obj, fg, bg, size=0.5, center=(0.5, 0.5))).astype(float)
        mask = image.mean(-1) > 127
        ys, xs = np.nonzero(mask)
        assert mask.sum() > 150, obj  # a bold object, not a few pixels
        # Bounding box of side 32 px centred at 32 px (a little slack for antialiasing / the star's tips).
        assert xs.min() >= 14 and xs.max() <= 50 and ys.min() >= 14 and ys.max() <= 50, obj
    # Bicycle wheel rings and flower stems are >= 3 px thick at the smallest size.
    bike = np.asarray(render("bicycle", fg, bg, size=0.45)).mean(-1) > 127
    runs = _runs(bike[:, bike.shape[1] // 2 - 9])  # a column through the rear wheel
    assert runs and max(runs) >= 3


def _runs(column: np.ndarray) -> list[int]:
    lengths, current = [], 0
    for value in column:
        if value:
            current += 1
        elif current:
            lengths.append(current)
            current = 0
    return lengths + ([current] if current else [])


def test_render_rejects_unknown_names():
    with pytest.raises(ValueError, match="unknown object"):
        render("dragon", "red", "blue")
    with pytest.raises(ValueError, match="unknown colour"):
        render("car", "mauve", "blue")
    with pytest.raises(ValueError, match="split"):
        ProceduralDataset(0, split="test")


def test_generation_is_fast():
    dataset = ProceduralDataset(0)
    dataset.take(20)  # warm up
    start = time.perf_counter()
    dataset.take(500, start=20)
    per_image = (time.perf_counter() - start) / 500
    assert per_image < 2e-3, f"{per_image * 1e3:.2f} ms per image"  # target < 1 ms; slack for a busy CPU


def test_export_imagefolder_reads_with_datasets_offline(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    datasets = pytest.importorskip("datasets")
    folder = export_imagefolder(tmp_path / "shapes", 24, seed=4, split="heldout")
    rows = [json.loads(line) for line in (folder / "metadata.jsonl").read_text().splitlines()]
    assert len(rows) == 24 and set(rows[0]) == {"file_name", "text", "object", "colour", "background"}
    loaded = datasets.load_dataset("imagefolder", data_dir=str(folder), split="train",
                                   cache_dir=str(tmp_path / "cache"))
    assert len(loaded) == 24
    expected = ProceduralDataset(4, "heldout").take(24)
    # Zero-padded file names keep the folder order equal to the sample order.
    assert loaded["text"] == [s.caption for s in expected]
    assert loaded["object"] == [s.object for s in expected]
    assert loaded["colour"] == [s.colour for s in expected]
    assert loaded["background"] == [s.background for s in expected]
    for row, sample in zip(loaded, expected):  # PNG round trip is lossless
        assert np.array_equal(np.asarray(row["image"].convert("RGB")), pixels(sample))
