"""A concept the default model has never seen, for the fine-tuning demonstration: crescent moons.

The generator here is separate from the procedural dataset: ``ldm/toy/procedural.py`` never draws a
moon and none of its captions says "moon" (so the shipped text encoder's "moon" token embedding was
never trained). Only the colour tables are shared, so that moons come in the same 8 named colours
on the same backgrounds and the judge's colour head can read them.

What "learned the concept" means is measured by :class:`ConceptDetector`: a logistic regression on
the frozen judge's features, fitted on real moons against real procedural images of the 12 known
kinds (both also passed through the model's VAE, so that the blur of decoded images is not a cue).
It reads the fraction of generated images that are moons.
"""

from __future__ import annotations

import json
import logging
import math
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch
from PIL import Image, ImageDraw

from ldm.toy.evaluation import vae_round_trip
from ldm.toy.procedural import (
    BACKGROUND_COLOURS, BACKGROUND_JITTER, COLOURS, OBJECT_COLOURS, OBJECT_JITTER, ProceduralDataset,
    background_choices, resolve_colour, size_word, with_article,
)

logger = logging.getLogger(__name__)

# Training captions. The evaluation prompt template (EVAL_TEMPLATE) is none of these.
TEMPLATES: tuple[str, ...] = (
    "{a_colour} moon",
    "{colour} moon",
    "{a_colour} moon on {a_bg} background",
    "a picture of {a_colour} moon",
    "{a_size} {colour} moon",
    "{a_colour} crescent moon, {bg} background",
)
EVAL_TEMPLATE = "an illustration of {a_colour} moon"


@dataclass(frozen=True)
class MoonSample:
    image: Image.Image
    caption: str
    colour: str
    background: str


def draw_moon(rng: random.Random, image_size: int = 64, supersample: int = 2) -> MoonSample:
    """One random crescent: a disc with a second, background-coloured disc cut out of one side.

    Colour, background, size (0.45-0.85 of the side), position, the bite's size and direction are
    random; drawn at ``supersample`` times the size and box-filtered down, like the procedural data.
    """
    colour = rng.choice(COLOURS)
    background = rng.choice(background_choices(colour))
    fg = resolve_colour(colour, OBJECT_COLOURS, OBJECT_JITTER, rng)
    bg = resolve_colour(background, BACKGROUND_COLOURS, BACKGROUND_JITTER, rng)
    side = image_size * supersample
    size = rng.uniform(0.45, 0.85)
    radius = size * side / 2
    cx = side * (0.5 + rng.uniform(-1, 1) * max(0.0, 0.5 - size / 2))
    cy = side * (0.5 + rng.uniform(-1, 1) * max(0.0, 0.5 - size / 2))
    bite = radius * rng.uniform(0.78, 0.9)
    offset = radius * rng.uniform(0.35, 0.5)
    angle = rng.uniform(-0.6, 0.6) + (0 if rng.random() < 0.5 else math.pi)  # bite from the right or left
    bx, by = cx + offset * math.cos(angle), cy - offset * math.sin(angle)
    canvas = Image.new("RGB", (side, side), bg)
    draw = ImageDraw.Draw(canvas)
    draw.ellipse([cx - radius, cy - radius, cx + radius, cy + radius], fill=fg)
    draw.ellipse([bx - bite, by - bite, bx + bite, by + bite], fill=bg)
    image = canvas.resize((image_size, image_size), Image.Resampling.BOX)
    template = rng.choice(TEMPLATES)
    caption = template.format(colour=colour, a_colour=with_article(colour), bg=background,
                              a_bg=with_article(background), a_size=with_article(size_word(size)))
    return MoonSample(image, caption, colour, background)


def moon_samples(n: int, seed: int, image_size: int = 64) -> list[MoonSample]:
    """``n`` moons; sample ``i`` depends only on ``(seed, i)``."""
    return [draw_moon(random.Random(f"moon/{seed}/{i}"), image_size) for i in range(n)]


def export_moon_folder(directory: str | Path, n: int, seed: int = 0, image_size: int = 64, *,
                       prior: int = 0, prior_seed: int = 7, repeats: int = 1) -> Path:
    """Write ``n`` moons as PNGs plus ``metadata.jsonl`` (``file_name``, ``text``, ``colour``,
    ``repeats``), the ``imagefolder`` layout ``scripts/train.py`` reads. Refuses a folder that already
    has metadata.

    ``prior > 0`` adds that many images of the known kinds (procedural training-split images with
    their captions, seed ``prior_seed``): "prior preservation" (Ruiz et al. 2023, DreamBooth), which
    keeps a fine-tune from forgetting the old concepts while it learns the new one. ``repeats`` is
    written for each moon (1 for the prior images); with ``data.repeats_column: repeats`` the trainer
    shows every moon that many times per epoch, e.g. n * repeats = prior for DreamBooth's 1:1 mix.
    """
    directory = Path(directory)
    if (directory / "metadata.jsonl").exists():
        raise FileExistsError(f"{directory / 'metadata.jsonl'} exists; not overwriting a dataset")
    directory.mkdir(parents=True, exist_ok=True)
    rows = []
    for i, sample in enumerate(moon_samples(n, seed, image_size)):
        sample.image.save(directory / f"moon-{i:04d}.png")
        rows.append({"file_name": f"moon-{i:04d}.png", "text": sample.caption, "colour": sample.colour,
                     "repeats": repeats})
    for i, sample in enumerate(ProceduralDataset(prior_seed, "train", image_size).take(prior)):
        sample.image.save(directory / f"prior-{i:04d}.png")
        rows.append({"file_name": f"prior-{i:04d}.png", "text": sample.caption, "colour": sample.colour,
                     "repeats": 1})
    (directory / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    logger.info("wrote %d moons (seed %d, repeats %d) and %d prior images to %s", n, seed, repeats, prior, directory)
    return directory


def eval_prompts(per_colour: int = 8) -> list[tuple[str, str]]:
    """``(prompt, colour)`` for every colour, ``per_colour`` times (one seed each)."""
    return [(EVAL_TEMPLATE.format(a_colour=with_article(c)), c) for c in COLOURS for _ in range(per_colour)]


class ConceptDetector:
    """Moon or not, from the judge's features: ``p = sigmoid(w . f + b)``, ``f`` standardised ``[B, F]``."""

    def __init__(self, judge) -> None:
        self.judge = judge
        self.mean = self.std = self.weight = None
        self.bias = torch.zeros(())

    def _standardised(self, images) -> torch.Tensor:
        return (self.judge.features(images) - self.mean) / self.std

    def fit(self, positives: Sequence[Image.Image], negatives: Sequence[Image.Image], *, steps: int = 500,
            weight_decay: float = 1e-3) -> "ConceptDetector":
        """Fit on two image lists (full-batch L-BFGS on the logistic loss)."""
        features = self.judge.features([*positives, *negatives])
        labels = torch.cat([torch.ones(len(positives)), torch.zeros(len(negatives))])
        self.mean, self.std = features.mean(0), features.std(0).clamp_min(1e-6)
        x = (features - self.mean) / self.std
        weight = torch.zeros(x.shape[1], requires_grad=True)
        bias = torch.zeros((), requires_grad=True)
        optimizer = torch.optim.LBFGS([weight, bias], max_iter=steps, line_search_fn="strong_wolfe")

        def closure():
            optimizer.zero_grad()
            loss = torch.nn.functional.binary_cross_entropy_with_logits(x @ weight + bias, labels)
            loss = loss + weight_decay * weight.pow(2).sum()
            loss.backward()
            return loss

        optimizer.step(closure)
        self.weight, self.bias = weight.detach(), bias.detach()
        return self

    @torch.no_grad()
    def probability(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """``P(moon)`` per image, ``[B]``."""
        return torch.sigmoid(self._standardised(images) @ self.weight + self.bias)


def fit_detector(judge, vae, *, n: int = 600, seed: int = 1000) -> tuple[ConceptDetector, dict]:
    """Fit a :class:`ConceptDetector` on ``n`` moons and ``n`` procedural images (seeds disjoint from
    the fine-tuning set), each real and through ``vae``; return it with its accuracy on a fresh
    held-out set of the same make-up."""
    def sets(offset: int) -> tuple[list, list]:
        moons = [s.image for s in moon_samples(n, seed + offset)]
        others = [s.image for s in ProceduralDataset(seed + offset, "all").take(n)]
        return moons + vae_round_trip(vae, moons), others + vae_round_trip(vae, others)

    detector = ConceptDetector(judge).fit(*sets(0))
    moons, others = sets(1)
    accuracy = {"moons": (detector.probability(moons) > 0.5).float().mean().item(),
                "other_kinds": (detector.probability(others) <= 0.5).float().mean().item()}
    logger.info("concept detector held-out accuracy: moons %.1f%%, other kinds %.1f%%",
                100 * accuracy["moons"], 100 * accuracy["other_kinds"])
    return detector, accuracy
