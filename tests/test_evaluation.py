"""The evaluation recipe: prompts, metric arithmetic, Frechet floor, VAE round trip, and a smoke run."""

from __future__ import annotations

import json
import re
from collections import Counter

import pytest
import torch
from PIL import Image

from ldm.toy.evaluation import (
    EVAL_TEMPLATES,
    EvalPrompt,
    EvaluationResult,
    EvaluationSettings,
    accuracy,
    eval_caption,
    evaluate,
    evaluation_prompts,
    generate_images,
    grid_selection,
    markdown_report,
    normalise_caption,
    per_pair_both_correct,
    prompt_grid,
    render_real_images,
    training_captions,
    vae_round_trip,
    write_outputs,
)
from ldm.toy.procedural import HELD_OUT_PAIRS, ProceduralDataset, pairs_for_split


@pytest.fixture(scope="module")
def judge():
    from ldm.toy.judge import Judge

    return Judge.load()


# ------------------------------------------------------------------ prompts


def test_default_prompts_are_balanced_and_cover_every_held_out_pair():
    prompts = evaluation_prompts(240, heldout_per_pair=5, seed=7)
    assert len(prompts) == 240
    assert [p.seed for p in prompts] == list(range(7, 247))
    held = Counter((p.colour, p.object) for p in prompts if p.held_out)
    seen = Counter((p.colour, p.object) for p in prompts if not p.held_out)
    assert held == {pair: 5 for pair in HELD_OUT_PAIRS}
    assert set(seen) == set(pairs_for_split("train"))  # all 86 seen pairs, and no held-out pair
    assert set(seen.values()) == {2, 3} and sum(seen.values()) == 190  # 190 / 86: floor or ceil each
    objects = Counter(p.object for p in prompts if not p.held_out)
    assert max(objects.values()) - min(objects.values()) <= 3
    for pair in HELD_OUT_PAIRS:  # repeats of a pair use different phrasings
        phrasings = [p.prompt for p in prompts if (p.colour, p.object) == pair]
        assert len(set(phrasings)) == 5


def test_held_out_prompts_cycle_through_all_pairs_first():
    prompts = [p for p in evaluation_prompts(240) if p.held_out]
    assert {(p.colour, p.object) for p in prompts[:10]} == HELD_OUT_PAIRS


def test_prompts_need_room_for_the_held_out_part():
    with pytest.raises(ValueError, match="held-out"):
        evaluation_prompts(49, heldout_per_pair=5)
    assert len(evaluation_prompts(10, heldout_per_pair=1)) == 10


def test_training_caption_enumeration_contains_what_the_stream_writes():
    captions = training_captions()
    for split in ("train", "heldout"):
        for sample in ProceduralDataset(3, split).take(400):
            assert normalise_caption(sample.caption) in captions, sample.caption


def test_no_evaluation_prompt_is_a_training_caption():
    captions = training_captions()
    every_phrasing = [eval_caption(t, c, o) for t in EVAL_TEMPLATES for c, o in pairs_for_split("all")]
    every_phrasing += [p.prompt for p in evaluation_prompts(240)]
    clashes = [p for p in every_phrasing if normalise_caption(p) in captions]
    assert clashes == []
    # The check can fail: a training template filled the same way is caught.
    assert normalise_caption("An orange  car, ") in captions


def test_prompts_use_correct_articles():
    for prompt in (p.prompt for p in evaluation_prompts(240)):
        assert not re.search(r"\ba [aeiou]", prompt), prompt
        assert not re.search(r"\ban [^aeiou\s]", prompt), prompt
    assert eval_caption("there is {a_colour} {object}", "orange", "car") == "there is an orange car"


# ------------------------------------------------------------------ metrics


def _prompt(colour, object, held_out=False, seed=0):
    return EvalPrompt(f"{colour} {object}", colour, object, held_out, seed)


def test_accuracy_arithmetic_on_known_labels():
    prompts = [_prompt("red", "car"), _prompt("red", "car"), _prompt("blue", "sun"), _prompt("green", "tree"),
               _prompt("red", "triangle", True), _prompt("blue", "heart", True)]
    readings = [{"object": "car", "colour": "red"},     # both right
                {"object": "car", "colour": "blue"},    # object only
                {"object": "star", "colour": "blue"},   # colour only
                {"object": "boat", "colour": "white"},  # neither
                {"object": "triangle", "colour": "red"},
                {"object": "heart", "colour": "red"}]
    result = accuracy(readings, prompts)
    assert result["seen"] == {"n": 4, "object": 0.5, "colour": 0.5, "both": 0.25}
    assert result["held_out"] == {"n": 2, "object": 1.0, "colour": 0.5, "both": 0.5}
    assert result["all"] == {"n": 6, "object": 4 / 6, "colour": 3 / 6, "both": 2 / 6}
    assert per_pair_both_correct(readings, prompts, held_out=True) == {"red triangle": 1.0, "blue heart": 0.0}
    assert accuracy(readings[:4], prompts[:4])["held_out"] == {"n": 0, "object": None, "colour": None, "both": None}
    with pytest.raises(ValueError):
        accuracy(readings[:3], prompts)


def test_frechet_floor_is_small_next_to_a_clearly_different_set(judge):
    from ldm.toy.judge import frechet_distance

    pairs = [p for p in pairs_for_split("all")] * 2  # 192 images
    real_a = render_real_images(pairs, stream="test-a")
    real_b = render_real_images(pairs, stream="test-b")
    assert render_real_images(pairs[:3], stream="test-a")[2].tobytes() == real_a[2].tobytes()  # deterministic
    assert real_a[0].tobytes() != real_b[0].tobytes()  # independent
    wrong_kinds = render_real_images([(c, "circle") for c, _ in pairs], stream="test-c")
    features_a = judge.features(real_a)
    floor = frechet_distance(features_a, judge.features(real_b))
    different = frechet_distance(features_a, judge.features(wrong_kinds))
    assert 0 < floor < 0.1 * different, (floor, different)


def test_vae_round_trip_of_an_identity_autoencoder_returns_the_pixels():
    class IdentityPosterior:
        def __init__(self, x):
            self.x = x

        def mode(self):
            return self.x

    class IdentityVAE(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.anchor = torch.nn.Parameter(torch.zeros(1))

        def encode(self, x):
            return IdentityPosterior(x)

        def decode(self, z):
            return z

    images = render_real_images([("red", "car"), ("blue", "heart"), ("white", "sun")], stream="id", image_size=32)
    out = vae_round_trip(IdentityVAE(), images, batch_size=2)
    assert [o.tobytes() for o in out] == [i.tobytes() for i in images]


def test_markdown_marks_targets():
    def row(n, o, c, b):
        return {"n": n, "object": o, "colour": c, "both": b}

    acc = {"seen": row(190, 0.95, 0.89, 0.85), "held_out": row(50, 0.8, 0.7, 0.6), "all": row(240, 0, 0, 0)}
    result = EvaluationResult(
        model="m", settings={**EvaluationSettings().__dict__, "steps": 20, "guidance_scale": 5.0,
                             "sampler": "euler", "height": 64, "width": 64},
        accuracy={"generated": acc, "vae_round_trip": acc, "real": acc},
        frechet={"generated_vs_real": 6.0, "real_vs_real": 1.5, "vae_vs_real": 2.0, "ratio": 4.0},
        held_out_pairs={"red triangle": 0.6}, seconds_per_image=0.5, seconds={}, samples=[])
    text = markdown_report(result)
    assert "| generated | seen | 190 | 95.0% ✓ | 89.0% ✗ | 85.0% |" in text
    assert "| generated | held-out | 50 | 80.0% | 70.0% | 60.0% ✓ |" in text
    assert "| generated / floor | 4.00x ✗ |" in text
    assert "0.50 s per image" in text


def test_prompt_grid_layout():
    images = [Image.new("RGB", (32, 32), c) for c in ("red", "blue", "green")]
    grid = prompt_grid(images, ["a", "b", "a long prompt that wraps over lines"], columns=2, cell=64, text_lines=3)
    assert grid.size == (2 * (64 + 4) + 4, 2 * (64 + 4 + 3 * 11 + 4) + 4)
    assert grid.getpixel((4 + 10, 4 + 10)) == (255, 0, 0)  # first image, scaled, top-left
    prompts = evaluation_prompts(240)
    chosen = grid_selection(prompts, 32)
    assert len(chosen) == 32 and sum(prompts[i].held_out for i in chosen) == 8


# ------------------------------------------------------------------ smoke run on a tiny pipeline


def test_generation_with_batch_one_is_exactly_txt2img():
    from tests.conftest import tiny_pipeline

    pipe = tiny_pipeline()
    prompts = evaluation_prompts(12, heldout_per_pair=1, seed=5)[:2]
    options = EvaluationSettings(steps=2).sampling_options(pipe)
    images = generate_images(pipe, prompts, options, batch_size=1)
    alone = pipe(prompts[1].prompt, seed=prompts[1].seed, steps=2)[0]
    assert images[1].tobytes() == alone.tobytes()
    with pytest.raises(ValueError, match="consecutive"):
        generate_images(pipe, [prompts[1], prompts[0]], options, batch_size=2)


def test_evaluation_smoke_run_on_a_tiny_pipeline(tmp_path, judge):
    from tests.conftest import tiny_pipeline

    settings = EvaluationSettings(n=12, heldout_per_pair=1, seed=3, steps=2, batch_size=6)
    result = evaluate(tiny_pipeline(), judge, settings, model="tiny")
    assert result.accuracy["generated"]["seen"]["n"] == 2
    assert result.accuracy["generated"]["held_out"]["n"] == 10
    assert result.accuracy["real"]["all"]["both"] >= 0.9  # labels line up with what was rendered
    assert result.frechet["real_vs_real"] > 0 and result.frechet["generated_vs_real"] > 0
    assert result.seconds_per_image > 0 and len(result.images) == 12
    assert result.images[0].size == (32, 32)  # the tiny model's native size
    assert [s["seed"] for s in result.samples] == list(range(3, 15))

    paths = write_outputs(result, tmp_path / "eval", tmp_path / "grid.png")
    saved = json.loads(paths["json"].read_text())
    assert saved["model"] == "tiny" and saved["settings"]["steps"] == 2 and saved["settings"]["sampler"] == "euler"
    assert saved["accuracy"] == json.loads(json.dumps(result.accuracy))
    assert "| generated | held-out | 10 |" in paths["markdown"].read_text()
    assert Image.open(paths["grid"]).size[0] > 8 * 128
