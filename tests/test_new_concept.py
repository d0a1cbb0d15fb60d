"""The fine-tuning demonstration's concept generator and moon detector (ldm/toy/new_concept.py)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from ldm.toy import new_concept

from ldm.toy import procedural


def test_moons_are_deterministic_and_captioned_with_their_colour():
    a, b = new_concept.moon_samples(6, seed=3), new_concept.moon_samples(6, seed=3)
    assert [s.caption for s in a] == [s.caption for s in b]
    assert all(np.array_equal(np.asarray(x.image), np.asarray(y.image)) for x, y in zip(a, b))
    assert [s.caption for s in new_concept.moon_samples(6, seed=4)] != [s.caption for s in a]
    for sample in new_concept.moon_samples(40, seed=0):
        assert sample.image.size == (64, 64) and sample.image.mode == "RGB"
        assert "moon" in sample.caption and sample.colour in sample.caption.split()


def test_the_default_dataset_never_draws_or_says_moon():
    assert "moon" not in procedural.OBJECTS
    assert not any("moon" in template for template in procedural.CAPTION_TEMPLATES)
    assert not any("moon" in s.caption for s in procedural.ProceduralDataset(0).take(200))
    # the evaluation prompt is not a training caption template
    assert new_concept.EVAL_TEMPLATE not in new_concept.TEMPLATES


def test_export_writes_an_imagefolder_and_never_overwrites(tmp_path):
    folder = new_concept.export_moon_folder(tmp_path / "moons", 5, seed=1)
    rows = [json.loads(line) for line in (folder / "metadata.jsonl").read_text().splitlines()]
    assert len(rows) == 5 and all((folder / r["file_name"]).is_file() for r in rows)
    with pytest.raises(FileExistsError):
        new_concept.export_moon_folder(folder, 5, seed=2)
    mixed = new_concept.export_moon_folder(tmp_path / "mixed", 4, seed=1, prior=3, repeats=5)
    rows = [json.loads(line) for line in (mixed / "metadata.jsonl").read_text().splitlines()]
    captions = [r["text"] for r in rows]
    assert len(captions) == 7 and all("moon" in c for c in captions[:4])
    assert not any("moon" in c for c in captions[4:])  # prior preservation: the known kinds
    assert [r["repeats"] for r in rows] == [5] * 4 + [1] * 3  # moons x5 per epoch with data.repeats_column


@pytest.mark.slow
def test_detector_separates_moons_from_the_twelve_known_kinds():
    from ldm.toy.judge import Judge
    from ldm.pipeline import Txt2ImgPipeline

    vae = Txt2ImgPipeline.from_pretrained().vae
    detector, accuracy = new_concept.fit_detector(Judge.load(), vae, n=150)
    assert accuracy["moons"] > 0.9 and accuracy["other_kinds"] > 0.9, accuracy
