#!/usr/bin/env python
"""Measure img2img, inpainting and sketch-to-image on the default model, scored by the shipped judge.

    python scripts/toy/image_conditioning_eval.py                      # n = 48, the model's sampler and steps
    python scripts/toy/image_conditioning_eval.py --n 16 --steps 10 --grid /tmp/image_conditioning_grid.png
    python scripts/toy/image_conditioning_eval.py --sketch-strengths 0.6 0.75 0.9 --threads 1 \
        --grid /tmp/image_conditioning_grid.png                      # also 0.6 and 0.9; 1 thread on a busy CPU

Three experiments, each on ``--n`` cases; case ``i`` samples with seed ``--seed + i``:

(a) img2img at strength 0.5 from real procedural renders (``ProceduralDataset(--seed, "train")``)
    with their own caption: does the judge still read the input's object? Then the same inputs with
    a prompt asking for another colour ("an orange car"): is the new colour read, the object kept?
(b) inpainting (strength 1.0) of the object's bounding box (grown by 2 px) with a prompt for another
    object and colour: does the judge read the prompt's object and colour on the whole image, and
    how much does the background outside the mask change with ``paste_back`` (default) and without?
(c) sketch-to-image: img2img (strength 0.75) from a rough flat-colour blob (:func:`sketch`) at a
    random off-centre position, against txt2img with the same prompt and seed: object and colour
    accuracy and the distance from the sketch's centroid to the result's object centroid.

Every prompt asks for a (colour, object) pair of the training split on a background that the
procedural data allows for that colour, so the numbers measure the conditioning, not generalisation
to held-out pairs. Prints a markdown table (measurement, value, n), one-line summaries and the
command; ``--grid`` saves a few cases side by side.
"""

from __future__ import annotations

import argparse
import logging
import math
import random
import shlex
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw

from ldm.pipeline import Txt2ImgPipeline
from ldm.toy.evaluation import prompt_grid
from ldm.toy.judge import Judge
from ldm.toy.procedural import (
    BACKGROUND_COLOURS,
    OBJECT_COLOURS,
    OBJECTS,
    ProceduralDataset,
    Sample,
    background_choices,
    pairs_for_split,
    with_article,
)

logger = logging.getLogger("image_conditioning_eval")

IMG2IMG_STRENGTH = 0.5
INPAINT_STRENGTH = 1.0
EXPERIMENTS = ("img2img", "inpainting", "sketch")
SKETCH_STRENGTH = 0.75  # the one in the table's main rows; --sketch-strengths may add others
MASK_GROW = 2  # pixels added on every side of the object's bounding box
FOREGROUND_DISTANCE = 60.0  # RGB distance from the background colour above which a pixel is the object's
SKETCH_CENTER_RANGE = (0.3, 0.7)
SKETCH_SIZE_RANGE = (0.45, 0.65)
TRAIN_PAIRS = pairs_for_split("train")  # a tuple in a fixed order: random choices from it are reproducible
PROMPT_FORM = "{a_colour} {object}"  # e.g. "an orange car"
GRID_CASES = 4


# ---------------------------------------------------------------------------------------------
# Small helpers
# ---------------------------------------------------------------------------------------------


def prompt_for(colour: str, object: str) -> str:
    """The prompt of every changed or sketched request: 'a red car', 'an orange star'."""
    return PROMPT_FORM.format(a_colour=with_article(colour), object=object)


def case_rng(purpose: str, seed: int, index: int) -> random.Random:
    """A random stream for one case and one purpose, independent of the others."""
    return random.Random(f"{purpose}-{seed}-{index}")


def allowed_colours(background: str, *, object: str, exclude: Sequence[str] = ()) -> list[str]:
    """Colours that the procedural data draws on ``background`` for ``object`` (a training pair)."""
    return [colour for colour in OBJECT_COLOURS
            if colour not in exclude and background in background_choices(colour) and (colour, object) in TRAIN_PAIRS]


def share(hits: Sequence[bool]) -> str:
    """'87.5% (42/48)'."""
    if not hits:
        return "n/a (0/0)"
    return f"{100 * sum(hits) / len(hits):.1f}% ({sum(hits)}/{len(hits)})"


def as_array(image: Image.Image) -> np.ndarray:
    """RGB PIL image -> int16 array [H, W, 3] (room for differences)."""
    return np.asarray(image.convert("RGB"), dtype=np.int16)


# ---------------------------------------------------------------------------------------------
# Masks, sketches and centroids
# ---------------------------------------------------------------------------------------------


def object_box(center: tuple[float, float], size: float, image_size: int, grow: int = MASK_GROW
               ) -> tuple[int, int, int, int]:
    """Pixel box ``(x0, y0, x1, y1)`` (end exclusive) of an object's bounding box, grown and clipped."""
    half = size * image_size / 2 + grow
    cx, cy = center[0] * image_size, center[1] * image_size
    x0, y0 = max(0, math.floor(cx - half)), max(0, math.floor(cy - half))
    x1, y1 = min(image_size, math.ceil(cx + half)), min(image_size, math.ceil(cy + half))
    return x0, y0, x1, y1


def box_mask(box: tuple[int, int, int, int], image_size: int) -> Image.Image:
    """A black 'L' mask with the box white (white = repaint)."""
    mask = np.zeros((image_size, image_size), dtype=np.uint8)
    x0, y0, x1, y1 = box
    mask[y0:y1, x0:x1] = 255
    return Image.fromarray(mask, mode="L")


def sketch(object: str, colour: str, background: str, center: tuple[float, float], size: float,
           image_size: int = 64) -> Image.Image:
    """A rough flat-colour blob roughly shaped like ``object``: one or two plain shapes, no detail.

    Round things (circle, sun, flower head) are discs, square/house/car/boat rectangles (car and
    boat wider than tall; the house with a triangular roof, the flower with a stem), tree/triangle
    triangles (the tree on a trunk), the star two crossed triangles, the heart a disc over a
    downward triangle, the bicycle two discs. ``center`` and ``size`` are fractions of the image side,
    as in :func:`ldm.toy.procedural.render`; colours are the plain, unjittered named colours.
    """
    fg = OBJECT_COLOURS[colour]
    image = Image.new("RGB", (image_size, image_size), BACKGROUND_COLOURS[background])
    draw = ImageDraw.Draw(image)
    cx, cy, h = center[0] * image_size, center[1] * image_size, size * image_size / 2

    def box(u0: float, v0: float, u1: float, v1: float) -> list[float]:  # unit-box corners -> pixels
        return [cx + u0 * h, cy + v0 * h, cx + u1 * h, cy + v1 * h]

    def poly(*uvs: tuple[float, float]) -> list[tuple[float, float]]:
        return [(cx + u * h, cy + v * h) for u, v in uvs]

    if object in ("circle", "sun"):
        draw.ellipse(box(-0.9, -0.9, 0.9, 0.9), fill=fg)
    elif object == "flower":
        draw.rectangle(box(-0.1, 0.0, 0.1, 1.0), fill=fg)
        draw.ellipse(box(-0.6, -1.0, 0.6, 0.2), fill=fg)
    elif object == "square":
        draw.rectangle(box(-0.85, -0.85, 0.85, 0.85), fill=fg)
    elif object == "house":
        draw.rectangle(box(-0.7, -0.1, 0.7, 0.95), fill=fg)
        draw.polygon(poly((-0.95, 0.0), (0.0, -0.95), (0.95, 0.0)), fill=fg)
    elif object == "car":
        draw.rectangle(box(-1.0, -0.1, 1.0, 0.6), fill=fg)
        draw.rectangle(box(-0.5, -0.55, 0.5, -0.1), fill=fg)
    elif object == "boat":
        draw.rectangle(box(-1.0, 0.4, 1.0, 0.9), fill=fg)
        draw.polygon(poly((0.0, -0.95), (0.7, 0.4), (-0.5, 0.4)), fill=fg)
    elif object in ("tree", "triangle"):
        draw.polygon(poly((0.0, -1.0), (0.9, 0.6 if object == "tree" else 0.85),
                          (-0.9, 0.6 if object == "tree" else 0.85)), fill=fg)
        if object == "tree":
            draw.rectangle(box(-0.15, 0.5, 0.15, 1.0), fill=fg)
    elif object == "star":
        draw.polygon(poly((0.0, -1.0), (0.9, 0.55), (-0.9, 0.55)), fill=fg)
        draw.polygon(poly((0.0, 0.9), (0.9, -0.45), (-0.9, -0.45)), fill=fg)
    elif object == "heart":
        draw.ellipse(box(-0.95, -0.85, 0.95, 0.15), fill=fg)
        draw.polygon(poly((-0.95, -0.3), (0.95, -0.3), (0.0, 0.95)), fill=fg)
    elif object == "bicycle":
        draw.ellipse(box(-1.0, -0.45, 0.0, 0.55), fill=fg)
        draw.ellipse(box(0.0, -0.45, 1.0, 0.55), fill=fg)
    else:
        raise ValueError(f"no sketch for {object!r}; expected one of {OBJECTS}")
    return image


def foreground_centroid(image: Image.Image, threshold: float = FOREGROUND_DISTANCE) -> tuple[float, float] | None:
    """Mean (x, y) of the pixels farther than ``threshold`` (RGB distance) from the background colour.

    The background colour is the per-channel median of the 1-pixel border (as the judge estimates
    it). Returns ``None`` when no pixel is foreground.
    """
    pixels = as_array(image).astype(np.float32)
    border = np.concatenate([pixels[0], pixels[-1], pixels[1:-1, 0], pixels[1:-1, -1]])
    distance = np.linalg.norm(pixels - np.median(border, axis=0), axis=-1)
    ys, xs = np.nonzero(distance > threshold)
    if len(xs) == 0:
        return None
    return float(xs.mean()), float(ys.mean())


def centroid_distances(images: Sequence[Image.Image], targets: Sequence[tuple[float, float]]) -> list[float | None]:
    """Pixel distance from each image's object centroid to its target point (``None``: no foreground)."""
    found = [foreground_centroid(image) for image in images]
    return [None if point is None else math.dist(point, target) for point, target in zip(found, targets)]


def difference_outside(image: Image.Image, reference: Image.Image, mask: Image.Image) -> np.ndarray:
    """Absolute per-channel uint8 differences at the pixels where ``mask`` is black (kept)."""
    keep = np.asarray(mask.convert("L")) < 128
    return np.abs(as_array(image) - as_array(reference))[keep]


# ---------------------------------------------------------------------------------------------
# Cases
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SketchCase:
    """One sketch-to-image request: what to draw, where, and the sketch itself."""

    object: str
    colour: str
    background: str
    center: tuple[float, float]
    size: float
    image: Image.Image
    centroid: tuple[float, float]

    @property
    def prompt(self) -> str:
        return prompt_for(self.colour, self.object)


def recolour(sample: Sample, rng: random.Random) -> str:
    """A colour other than the sample's that the data draws on its background for its object."""
    return rng.choice(allowed_colours(sample.background, object=sample.object, exclude=(sample.colour,)))


def replacement(sample: Sample, rng: random.Random) -> tuple[str, str]:
    """Another (colour, object) for the sample's box: both differ from the sample's, the pair is a
    training pair and the colour is drawn on the sample's background."""
    while True:
        object = rng.choice([o for o in OBJECTS if o != sample.object])
        colours = allowed_colours(sample.background, object=object, exclude=(sample.colour,))
        if colours:
            return rng.choice(colours), object


def sketch_case(rng: random.Random, image_size: int) -> SketchCase:
    """A random training pair on an allowed background, at a random off-centre place and size."""
    object = rng.choice(OBJECTS)
    colour = rng.choice([c for c, o in TRAIN_PAIRS if o == object])
    background = rng.choice(background_choices(colour))
    center = (rng.uniform(*SKETCH_CENTER_RANGE), rng.uniform(*SKETCH_CENTER_RANGE))
    size = rng.uniform(*SKETCH_SIZE_RANGE)
    image = sketch(object, colour, background, center, size, image_size)
    centroid = foreground_centroid(image)
    if centroid is None:  # cannot happen: every sketch has pixels far from its background
        raise AssertionError(f"empty sketch of a {colour} {object} on {background}")
    return SketchCase(object, colour, background, center, size, image, centroid)


# ---------------------------------------------------------------------------------------------
# Generation and scoring
# ---------------------------------------------------------------------------------------------


@dataclass
class Report:
    """Table rows, summary lines and grid columns, filled by the experiments."""

    rows: list[tuple[str, str, int]] = field(default_factory=list)
    summaries: list[str] = field(default_factory=list)
    grid: dict[str, list[tuple[Image.Image, str]]] = field(default_factory=dict)

    def add(self, name: str, value: str, n: int) -> None:
        self.rows.append((name, value, n))

    def show(self, column: str, images: Sequence[Image.Image], captions: Sequence[str]) -> None:
        """Keep the first cases of one grid column."""
        self.grid[column] = list(zip(images[:GRID_CASES], captions[:GRID_CASES]))


class Generator:
    """The pipeline with this run's sampling options, one image per call, logging progress."""

    def __init__(self, pipe: Txt2ImgPipeline, steps: int | None, scale: float | None):
        self.pipe, self.steps, self.scale = pipe, steps, scale

    def many(self, what: str, prompts: Sequence[str], seeds: Sequence[int],
             per_case: Callable[[int], dict] = lambda i: {}) -> list[Image.Image]:
        """One image per prompt; ``per_case(i)`` gives case ``i``'s extra pipeline arguments."""
        started, images = time.perf_counter(), []
        for i, (prompt, seed) in enumerate(zip(prompts, seeds)):
            images.extend(self.pipe(prompt, seed=seed, steps=self.steps, guidance_scale=self.scale, **per_case(i)))
            if (i + 1) % 8 == 0 or i + 1 == len(prompts):
                logger.info("  %s: %d/%d (%.0f s)", what, i + 1, len(prompts), time.perf_counter() - started)
        return images


def judge_hits(judge: Judge, images: Sequence[Image.Image], head: str, wanted: Sequence[str]) -> list[bool]:
    """Whether the judge's ``head`` ("object" or "colour") reading of each image is the wanted one."""
    return [reading[head] == want for reading, want in zip(judge.classify(list(images)), wanted)]


def img2img_experiment(gen: Generator, judge: Judge, samples: Sequence[Sample], seeds: Sequence[int],
                       seed: int, report: Report) -> None:
    """(a) img2img from real renders, with their caption and with another colour in the prompt."""
    n, objects = len(samples), [s.object for s in samples]
    inputs = [s.image for s in samples]
    report.add("judge object on the real inputs (ceiling)", share(judge_hits(judge, inputs, "object", objects)), n)
    same = gen.many("img2img, own caption", [s.caption for s in samples], seeds,
                    lambda i: {"image": inputs[i], "strength": IMG2IMG_STRENGTH})
    kept = judge_hits(judge, same, "object", objects)
    report.add(f"(a) img2img {IMG2IMG_STRENGTH}, own caption: judge object = input object", share(kept), n)

    colours = [recolour(s, case_rng("recolour", seed, i)) for i, s in enumerate(samples)]
    prompts = [prompt_for(c, s.object) for c, s in zip(colours, samples)]
    changed = gen.many("img2img, new colour", prompts, seeds,
                       lambda i: {"image": inputs[i], "strength": IMG2IMG_STRENGTH})
    new_colour = judge_hits(judge, changed, "colour", colours)
    still = judge_hits(judge, changed, "object", objects)
    report.add(f"(a) img2img {IMG2IMG_STRENGTH}, new colour word: judge colour = new colour", share(new_colour), n)
    report.add(f"(a) img2img {IMG2IMG_STRENGTH}, new colour word: judge object = input object", share(still), n)
    report.summaries.append(
        f"(a) img2img at strength {IMG2IMG_STRENGTH}: the object is kept in {share(kept)} (target >= 90%); "
        f"asking for another colour ('{PROMPT_FORM}', e.g. '{prompts[0]}') gives the new colour in "
        f"{share(new_colour)} and keeps the object in {share(still)}.")
    report.show("input", inputs, [s.caption for s in samples])
    report.show(f"img2img {IMG2IMG_STRENGTH}", same, ["own caption"] * n)
    report.show("recoloured", changed, prompts)


def inpainting_experiment(gen: Generator, judge: Judge, samples: Sequence[Sample], seeds: Sequence[int],
                          seed: int, image_size: int, report: Report) -> None:
    """(b) repaint each object's bounding box with another object and colour, with and without paste-back."""
    n = len(samples)
    masks = [box_mask(object_box(s.center, s.size, image_size), image_size) for s in samples]
    targets = [replacement(s, case_rng("inpaint", seed, i)) for i, s in enumerate(samples)]
    prompts = [prompt_for(colour, object) for colour, object in targets]
    results, read = {}, {}
    for paste_back in (True, False):
        results[paste_back] = gen.many(f"inpainting, paste_back={paste_back}", prompts, seeds, lambda i: {
            "image": samples[i].image, "mask_image": masks[i], "strength": INPAINT_STRENGTH, "paste_back": paste_back})
        read[paste_back] = (share(judge_hits(judge, results[paste_back], "object", [o for _, o in targets])),
                            share(judge_hits(judge, results[paste_back], "colour", [c for c, _ in targets])))
        report.add(f"(b) inpaint box, paste_back={paste_back}: judge object = prompt object", read[paste_back][0], n)
        report.add(f"(b) inpaint box, paste_back={paste_back}: judge colour = prompt colour", read[paste_back][1], n)
    pasted = [difference_outside(out, s.image, m) for out, s, m in zip(results[True], samples, masks)]
    raw = [difference_outside(out, s.image, m) for out, s, m in zip(results[False], samples, masks)]
    with_outside = sum(len(d) > 0 for d in pasted)
    worst, mean_raw = max(int(d.max(initial=0)) for d in pasted), float(np.concatenate(raw).mean())
    report.add("(b) outside the mask, paste_back=True: max |output - input| (uint8)", str(worst), with_outside)
    report.add("(b) outside the mask, paste_back=False: mean |output - input| (uint8)", f"{mean_raw:.2f}",
               with_outside)
    report.add("(b) outside the mask, paste_back=False: max |output - input| (uint8)",
               str(max(int(d.max(initial=0)) for d in raw)), with_outside)
    report.summaries.append(
        f"(b) inpainting the object's box (+{MASK_GROW} px) at strength {INPAINT_STRENGTH} with another object and "
        f"colour ('{PROMPT_FORM}'): the judge reads the prompt's object in {read[True][0]} and its colour in "
        f"{read[True][1]}; outside the mask paste_back keeps the input exactly (max difference {worst}), "
        f"the model alone (paste_back=False) changes it by {mean_raw:.2f} on average.")
    report.show("inpaint mask", [m.convert("RGB") for m in masks], [f"object box +{MASK_GROW} px"] * n)
    report.show("inpainted", results[True], prompts)


def sketch_experiment(gen: Generator, judge: Judge, cases: Sequence[SketchCase], seeds: Sequence[int],
                      strengths: Sequence[float], report: Report) -> None:
    """(c) img2img from rough sketches against txt2img with the same prompt and seed."""
    n, prompts = len(cases), [c.prompt for c in cases]
    objects, colours = [c.object for c in cases], [c.colour for c in cases]
    centroids = [c.centroid for c in cases]
    sketches = [c.image for c in cases]
    report.add("(c) judge object on the raw sketches", share(judge_hits(judge, sketches, "object", objects)), n)
    baseline = "txt2img (no sketch)"
    runs = {**{f"sketch img2img {s}": s for s in strengths}, baseline: None}
    lines = {}
    for name, strength in runs.items():
        per_case = (lambda i: {}) if strength is None else (lambda i, s=strength: {"image": sketches[i], "strength": s})
        images = gen.many(name, prompts, seeds, per_case)
        object_hits = judge_hits(judge, images, "object", objects)
        colour_hits = judge_hits(judge, images, "colour", colours)
        found = [d for d in centroid_distances(images, centroids) if d is not None]
        mean_distance = f"{np.mean(found):.1f} px" if found else "n/a"
        report.add(f"(c) {name}: judge object = prompt object", share(object_hits), n)
        report.add(f"(c) {name}: judge colour = prompt colour", share(colour_hits), n)
        report.add(f"(c) {name}: mean distance sketch centroid -> object centroid "
                   f"({n - len(found)} without foreground)", mean_distance, len(found))
        lines[name] = f"object {share(object_hits)}, colour {share(colour_hits)}, centroid off by {mean_distance}"
        if strength == SKETCH_STRENGTH:
            report.show("sketch", sketches, prompts)
            report.show(f"from sketch {SKETCH_STRENGTH}", images, prompts)
    main = f"sketch img2img {SKETCH_STRENGTH}"
    report.summaries.append(f"(c) sketch-to-image ('{PROMPT_FORM}') at strength {SKETCH_STRENGTH}: {lines[main]}; "
                            f"txt2img with the same prompt and seeds: {lines[baseline]}.")
    report.summaries += [f"(c) {name}: {line}." for name, line in lines.items() if name not in (main, baseline)]


# ---------------------------------------------------------------------------------------------
# Output
# ---------------------------------------------------------------------------------------------


def markdown_table(rows: Sequence[tuple[str, str, int]]) -> str:
    lines = ["| measurement | value | n |", "|---|---|---|"]
    lines += [f"| {name} | {value} | {n} |" for name, value, n in rows]
    return "\n".join(lines) + "\n"


def save_grid(report: Report, path: Path) -> None:
    """One row per case, one column per stage (input ... from sketch), captions under each image."""
    columns = list(report.grid)
    cases = min(len(report.grid[c]) for c in columns)
    images, captions = [], []
    for i in range(cases):
        for column in columns:
            image, caption = report.grid[column][i]
            images.append(image)
            captions.append(f"{column}: {caption}")
    path.parent.mkdir(parents=True, exist_ok=True)
    prompt_grid(images, captions, columns=len(columns), cell=96, text_lines=4).save(path)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=48, help="cases per experiment (default 48)")
    parser.add_argument("--seed", type=int, default=0,
                        help="dataset seed and seed of case 0; case i samples with seed + i (default 0)")
    parser.add_argument("--steps", type=int, help="sampling steps (default: the model's)")
    parser.add_argument("--scale", type=float, help="guidance scale (default: the model's)")
    parser.add_argument("--experiments", nargs="+", choices=EXPERIMENTS, default=list(EXPERIMENTS),
                        help="which experiments to run (default: all)")
    parser.add_argument("--sketch-strengths", type=float, nargs="+", default=[SKETCH_STRENGTH],
                        help=f"img2img strengths from the sketches (default {SKETCH_STRENGTH}; e.g. 0.6 0.75 0.9)")
    parser.add_argument("--threads", type=int,
                        help="CPU threads for torch (default: torch's); 1 is much faster on a CPU shared with other work")
    parser.add_argument("--grid", type=Path, help="save a PNG of a few cases at every stage")
    parser.add_argument("--quiet", action="store_true", help="only the report, no progress logs")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO, format="%(message)s")
    if args.n < 1:
        print("image_conditioning_eval.py: error: --n must be at least 1", file=sys.stderr)
        return 2
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    strengths = sorted({SKETCH_STRENGTH, *args.sketch_strengths})
    started = time.perf_counter()
    pipe, judge = Txt2ImgPipeline.from_pretrained(), Judge.load()
    image_size = pipe.config.sampling.height
    gen, report = Generator(pipe, args.steps, args.scale), Report()
    seeds = [args.seed + i for i in range(args.n)]
    samples = ProceduralDataset(seed=args.seed, split="train", image_size=image_size).take(args.n)
    sketches = [sketch_case(case_rng("sketch", args.seed, i), image_size) for i in range(args.n)]

    timings = {}
    for name, run in (("img2img", lambda: img2img_experiment(gen, judge, samples, seeds, args.seed, report)),
                      ("inpainting", lambda: inpainting_experiment(gen, judge, samples, seeds, args.seed,
                                                                   image_size, report)),
                      ("sketch", lambda: sketch_experiment(gen, judge, sketches, seeds, strengths, report))):
        if name not in args.experiments:
            continue
        logger.info("%s ...", name)
        t0 = time.perf_counter()
        run()
        timings[name] = time.perf_counter() - t0

    if args.grid is not None:
        save_grid(report, args.grid)
    options = pipe.sampling_options(steps=args.steps, guidance_scale=args.scale)
    print(markdown_table(report.rows))
    print("\n".join(report.summaries))
    print(f"\nsampler {options.sampler}, {options.steps} steps, guidance {options.guidance_scale:g}; "
          + ", ".join(f"{k} {v:.0f} s" for k, v in timings.items())
          + f"; {time.perf_counter() - started:.0f} s in all" + (f"; grid: {args.grid}" if args.grid else ""))
    print(f"command: python {shlex.join(sys.argv)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
