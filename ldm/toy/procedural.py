"""Procedural captioned images: the dataset the default model is trained on.

Each sample is one bold, single-coloured object (12 kinds, 8 colours) on a flat background,
drawn at ``supersample`` times the output size with PIL and shrunk with a BOX filter, so
edges are antialiased. The caption is built from one of several templates whose words
always agree with what was drawn (colour, object, background, size and position words).

Everything is a pure function of ``(seed, split, index)``: ``ProceduralDataset(seed).sample(i)``
returns identical pixels and caption every time, on every machine.

A fixed set of (colour, object) pairs, ``HELD_OUT_PAIRS``, never appears in the ``"train"``
split; the ``"heldout"`` split yields only those pairs, so compositional generalisation
("a blue heart" without ever having seen one) can be measured.

Glossary:
    size      side of the object's bounding box as a fraction of the image side, in [0.45, 0.85]
    center    (x, y) of the bounding box centre as fractions of the image side; y grows downwards
    unit box  each kind is drawn in coordinates (u, v) in [-1, 1]^2 mapped onto the bounding box
"""

from __future__ import annotations

import json
import logging
import math
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np
from PIL import Image, ImageDraw

logger = logging.getLogger(__name__)

RGB = tuple[int, int, int]

OBJECTS: tuple[str, ...] = (
    "bicycle", "car", "house", "tree", "flower", "sun",
    "boat", "circle", "square", "triangle", "star", "heart",
)

OBJECT_COLOURS: dict[str, RGB] = {
    "red": (220, 30, 30),
    "orange": (255, 140, 0),
    "yellow": (240, 220, 30),
    "green": (30, 160, 50),
    "blue": (30, 70, 220),
    "purple": (130, 40, 170),
    "white": (245, 245, 245),
    "black": (15, 15, 15),
}
COLOURS: tuple[str, ...] = tuple(OBJECT_COLOURS)

BACKGROUND_COLOURS: dict[str, RGB] = {
    **OBJECT_COLOURS,
    "gray": (128, 128, 128),
    "pink": (255, 160, 200),
    "brown": (125, 75, 35),
    "cyan": (40, 200, 220),
}
BACKGROUNDS: tuple[str, ...] = tuple(BACKGROUND_COLOURS)

# A background must differ from the object colour by at least this Euclidean RGB distance
# (before jitter). It rules out e.g. orange on yellow, red on brown, white on pink, purple on gray.
MIN_BACKGROUND_DISTANCE = 110.0
OBJECT_JITTER = 15  # +- per channel
BACKGROUND_JITTER = 12

# 10 of the 96 (colour, object) pairs: every object at most once, every colour at most twice,
# so each colour and each object is still seen with 7+ other partners in training.
HELD_OUT_PAIRS: frozenset[tuple[str, str]] = frozenset({
    ("red", "triangle"),
    ("orange", "car"),
    ("yellow", "house"),
    ("green", "star"),
    ("blue", "heart"),
    ("purple", "boat"),
    ("white", "tree"),
    ("black", "flower"),
    ("orange", "square"),
    ("white", "sun"),
})

SIZE_RANGE = (0.45, 0.85)
SIZE_WORD_RANGES: dict[str, tuple[float, float]] = {"small": (0.45, 0.58), "big": (0.72, 0.85)}
POSITION_PHRASES: dict[str, str] = {
    "middle": "in the middle",
    "left": "on the left",
    "right": "on the right",
    "top": "at the top",
    "bottom": "at the bottom",
    "top left": "in the top left corner",
    "top right": "in the top right corner",
    "bottom left": "in the bottom left corner",
    "bottom right": "in the bottom right corner",
}
_CENTERED_TOLERANCE = 0.05  # |offset| below this counts as centred on that axis
_OFF_CENTER_MIN = 0.12  # |offset| above this counts as left/right/top/bottom
_POSITION_FREE_MARGIN = 0.04  # the bounding box may leave the frame by this much
_MAX_SIZE_WITH_OFFSET = 0.65  # objects placed off-centre by a template are at most this big

# {a_colour}: colour with its article ("an orange"); {bg_a}: background with its article.
CAPTION_TEMPLATES: tuple[str, ...] = (
    "{a_colour} {object}",
    "{a_size} {colour} {object}",
    "{a_colour} {object} on {a_bg} background",
    "{a_size} {colour} {object} on {a_bg} background",
    "a picture of {a_colour} {object}",
    "{colour} {object}",
    "a photo of {a_colour} {object} {position}",
    "{a_colour} {object} {position}",
    "a drawing of {a_colour} {object} on {a_bg} background",
    "{a_colour} {object} in front of {a_bg} background",
    "an image of {a_size} {colour} {object}",
    "{a_colour} {object}, {bg} background",
)

SPLITS = ("train", "heldout", "all")


def with_article(word: str) -> str:
    """'orange' -> 'an orange', 'red' -> 'a red'."""
    return ("an " if word[0] in "aeiou" else "a ") + word


def background_choices(colour: str) -> tuple[str, ...]:
    """Background names far enough from the object colour ``colour``."""
    target = OBJECT_COLOURS[colour]
    return tuple(
        name for name, rgb in BACKGROUND_COLOURS.items()
        if math.dist(rgb, target) >= MIN_BACKGROUND_DISTANCE
    )


def pairs_for_split(split: str) -> tuple[tuple[str, str], ...]:
    """All (colour, object) pairs a split may yield, in a fixed order."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    every = [(c, o) for o in OBJECTS for c in COLOURS]
    if split == "all":
        return tuple(every)
    held = split == "heldout"
    return tuple(p for p in every if (p in HELD_OUT_PAIRS) == held)


def size_word(size: float) -> str:
    """'small', 'medium' or 'big' for a size fraction (see SIZE_WORD_RANGES)."""
    if size < SIZE_WORD_RANGES["small"][1]:
        return "small"
    if size >= SIZE_WORD_RANGES["big"][0]:
        return "big"
    return "medium"


def position_word(center: tuple[float, float]) -> str | None:
    """Key of POSITION_PHRASES describing ``center``, or None when it is in between."""

    def axis(offset: float, negative: str, positive: str) -> str | None:
        if abs(offset) < _CENTERED_TOLERANCE:
            return ""
        if offset <= -_OFF_CENTER_MIN:
            return negative
        if offset >= _OFF_CENTER_MIN:
            return positive
        return None

    horizontal = axis(center[0] - 0.5, "left", "right")
    vertical = axis(center[1] - 0.5, "top", "bottom")
    if horizontal is None or vertical is None:
        return None
    return (f"{vertical} {horizontal}".strip()) or "middle"


# ---------------------------------------------------------------------------------------------
# Drawing. Each kind is a function (draw, box, fg, bg) drawing into unit-box coordinates.
# ---------------------------------------------------------------------------------------------


class _UnitBox:
    """Maps unit-box coordinates (u, v) in [-1, 1] to pixels of the supersampled canvas."""

    def __init__(self, cx: float, cy: float, half: float, mirror: bool, min_stroke: float):
        self.cx, self.cy, self.half, self.mirror = cx, cy, half, mirror
        self.min_stroke = min_stroke

    def point(self, u: float, v: float) -> tuple[float, float]:
        return (self.cx + (-u if self.mirror else u) * self.half, self.cy + v * self.half)

    def points(self, uvs: Sequence[tuple[float, float]]) -> list[tuple[float, float]]:
        return [self.point(u, v) for u, v in uvs]

    def circle_box(self, u: float, v: float, r: float) -> list[float]:
        x, y = self.point(u, v)
        rad = r * self.half
        return [x - rad, y - rad, x + rad, y + rad]

    def rect(self, u0: float, v0: float, u1: float, v1: float) -> list[float]:
        (x0, y0), (x1, y1) = self.point(u0, v0), self.point(u1, v1)
        return [min(x0, x1), min(y0, y1), max(x0, x1), max(y0, y1)]

    def stroke(self, width: float) -> int:
        """Stroke width in pixels for a unit-box width, never thinner than ``min_stroke``."""
        return max(int(round(width * self.half)), int(math.ceil(self.min_stroke)))


def _thick_line(draw: ImageDraw.ImageDraw, box: _UnitBox, uvs, width: float, fill: RGB) -> None:
    """A polyline with round joints and round caps (so frames look solid)."""
    px = box.stroke(width)
    pts = box.points(uvs)
    draw.line(pts, fill=fill, width=px, joint="curve")
    for x, y in (pts[0], pts[-1]):
        r = px / 2
        draw.ellipse([x - r, y - r, x + r, y + r], fill=fill)


def _ring(draw, box: _UnitBox, u, v, r_outer, width, fill) -> None:
    x, y = box.point(u, v)
    rad = r_outer * box.half
    draw.ellipse([x - rad, y - rad, x + rad, y + rad], outline=fill, width=box.stroke(width))


def _draw_circle(draw, box, fg, bg):
    draw.ellipse(box.circle_box(0, 0, 1.0), fill=fg)


def _draw_square(draw, box, fg, bg):
    draw.rectangle(box.rect(-0.85, -0.85, 0.85, 0.85), fill=fg)


def _draw_triangle(draw, box, fg, bg):
    draw.polygon(box.points([(0, -1.0), (1.0, 0.85), (-1.0, 0.85)]), fill=fg)


def _star_points(n: int, r_outer: float, r_inner: float, v_shift: float):
    pts = []
    for k in range(2 * n):
        angle = -math.pi / 2 + k * math.pi / n
        r = r_outer if k % 2 == 0 else r_inner
        pts.append((r * math.cos(angle), r * math.sin(angle) + v_shift))
    return pts


_STAR = _star_points(5, 1.05, 0.45, 0.08)


def _draw_star(draw, box, fg, bg):
    draw.polygon(box.points(_STAR), fill=fg)


def _heart_points(n: int = 48):
    # The classic parametric heart x = 16 sin^3 t, y = 13 cos t - 5 cos 2t - 2 cos 3t - cos 4t.
    pts = []
    for k in range(n):
        t = 2 * math.pi * k / n
        x = 16 * math.sin(t) ** 3
        y = 13 * math.cos(t) - 5 * math.cos(2 * t) - 2 * math.cos(3 * t) - math.cos(4 * t)
        pts.append((x / 16.5, -(y + 2.5) / 15.0))
    return pts


_HEART = _heart_points()


def _draw_heart(draw, box, fg, bg):
    draw.polygon(box.points(_HEART), fill=fg)


def _draw_sun(draw, box, fg, bg):
    draw.ellipse(box.circle_box(0, 0, 0.52), fill=fg)
    for k in range(8):  # 8 detached, tapering rays
        a = k * math.pi / 4
        c, s = math.cos(a), math.sin(a)
        pc, ps = -s, c  # perpendicular
        base, tip, half_w = 0.68, 1.0, 0.15
        draw.polygon(box.points([
            (base * c + half_w * pc, base * s + half_w * ps),
            (tip * c + 0.06 * pc, tip * s + 0.06 * ps),
            (tip * c - 0.06 * pc, tip * s - 0.06 * ps),
            (base * c - half_w * pc, base * s - half_w * ps),
        ]), fill=fg)


def _draw_house(draw, box, fg, bg):
    draw.rectangle(box.rect(-0.7, -0.1, 0.7, 0.95), fill=fg)  # body
    draw.polygon(box.points([(-0.98, 0.0), (0.0, -0.95), (0.98, 0.0)]), fill=fg)  # roof
    draw.rectangle(box.rect(-0.15, 0.4, 0.17, 0.95), fill=bg)  # door
    draw.rectangle(box.rect(0.33, 0.15, 0.55, 0.4), fill=bg)  # window
    draw.rectangle(box.rect(-0.55, 0.15, -0.33, 0.4), fill=bg)  # window


def _draw_tree(draw, box, fg, bg):
    draw.rectangle(box.rect(-0.18, 0.1, 0.18, 1.0), fill=fg)  # trunk
    for u, v, r in ((0.0, -0.45, 0.55), (-0.45, -0.05, 0.45), (0.45, -0.05, 0.45), (0.0, 0.05, 0.45)):
        draw.ellipse(box.circle_box(u, v, r), fill=fg)  # cloud-like crown


def _draw_flower(draw, box, fg, bg):
    _thick_line(draw, box, [(0.0, -0.2), (0.0, 1.0)], 0.16, fg)  # stem
    draw.polygon(box.points([(0.0, 0.7), (0.55, 0.35), (0.6, 0.45), (0.05, 0.85)]), fill=fg)  # leaf
    head_v = -0.4
    for k in range(6):
        a = k * math.pi / 3 + math.pi / 6
        draw.ellipse(box.circle_box(0.37 * math.cos(a), head_v + 0.37 * math.sin(a), 0.24), fill=fg)
    draw.ellipse(box.circle_box(0.0, head_v, 0.14), fill=bg)  # centre


def _draw_car(draw, box, fg, bg):
    draw.polygon(box.points([(-0.95, -0.05), (0.95, -0.05), (1.0, 0.45), (-1.0, 0.45)]), fill=fg)  # body
    draw.polygon(box.points([(-0.55, -0.05), (-0.4, -0.55), (0.35, -0.55), (0.6, -0.05)]), fill=fg)  # cabin
    draw.polygon(box.points([(-0.38, -0.1), (-0.28, -0.43), (-0.05, -0.43), (-0.05, -0.1)]), fill=bg)
    draw.polygon(box.points([(0.07, -0.1), (0.07, -0.43), (0.28, -0.43), (0.43, -0.1)]), fill=bg)
    for u in (-0.55, 0.55):
        draw.ellipse(box.circle_box(u, 0.5, 0.36), fill=bg)  # gap around each wheel
        draw.ellipse(box.circle_box(u, 0.5, 0.27), fill=fg)  # wheel


def _draw_boat(draw, box, fg, bg):
    draw.polygon(box.points([(-1.0, 0.45), (1.0, 0.45), (0.65, 0.9), (-0.65, 0.9)]), fill=fg)  # hull
    _thick_line(draw, box, [(0.0, 0.45), (0.0, -0.95)], 0.14, fg)  # mast
    draw.polygon(box.points([(0.14, -0.85), (0.14, 0.3), (0.8, 0.3)]), fill=fg)  # main sail
    draw.polygon(box.points([(-0.14, -0.6), (-0.14, 0.3), (-0.6, 0.3)]), fill=fg)  # jib


def _draw_bicycle(draw, box, fg, bg):
    rear, front, crank = (-0.56, 0.32), (0.56, 0.32), (-0.02, 0.32)
    seat, head = (-0.22, -0.22), (0.38, -0.22)
    for hub in (rear, front):
        _ring(draw, box, hub[0], hub[1], 0.43, 0.2, fg)  # wheels
    frame_width = 0.17
    _thick_line(draw, box, [rear, seat, head, front], frame_width, fg)  # seat stay, top tube, fork
    _thick_line(draw, box, [rear, crank, head], frame_width, fg)  # chain stay, down tube
    _thick_line(draw, box, [crank, seat, (-0.27, -0.42)], frame_width, fg)  # seat tube + post
    _thick_line(draw, box, [(-0.45, -0.47), (-0.08, -0.47)], 0.16, fg)  # saddle
    _thick_line(draw, box, [head, (0.45, -0.52), (0.7, -0.55)], frame_width, fg)  # stem + bar


_DRAWERS: dict[str, Callable] = {
    "bicycle": _draw_bicycle, "car": _draw_car, "house": _draw_house, "tree": _draw_tree,
    "flower": _draw_flower, "sun": _draw_sun, "boat": _draw_boat, "circle": _draw_circle,
    "square": _draw_square, "triangle": _draw_triangle, "star": _draw_star, "heart": _draw_heart,
}
MIRRORABLE = frozenset({"bicycle", "car", "boat", "flower"})


def render(
    object: str,
    colour: str | RGB,
    background: str | RGB,
    *,
    size: float = 0.7,
    center: tuple[float, float] = (0.5, 0.5),
    rng: random.Random | None = None,
    image_size: int = 64,
    supersample: int = 2,
    mirror: bool = False,
) -> Image.Image:
    """Draw one object on a flat background.

    Args:
        object: one of OBJECTS.
        colour, background: a colour name (jittered with ``rng``) or an exact RGB tuple.
        size: bounding-box side as a fraction of the image side.
        center: bounding-box centre (x, y) as fractions of the image side.
        rng: source of colour jitter; None means no jitter.
        image_size: output side in pixels; drawing happens at ``image_size * supersample``.
        mirror: flip the object left-right (only visible for asymmetric kinds).

    Returns:
        An RGB PIL image of ``image_size x image_size``.
    """
    if object not in _DRAWERS:
        raise ValueError(f"unknown object {object!r}; expected one of {OBJECTS}")
    fg = resolve_colour(colour, OBJECT_COLOURS, OBJECT_JITTER, rng)
    bg = resolve_colour(background, BACKGROUND_COLOURS, BACKGROUND_JITTER, rng)
    canvas_size = image_size * supersample
    canvas = Image.new("RGB", (canvas_size, canvas_size), bg)
    box = _UnitBox(
        cx=center[0] * canvas_size,
        cy=center[1] * canvas_size,
        half=size * canvas_size / 2,
        mirror=mirror,
        min_stroke=3 * supersample * image_size / 64,  # >= 3 px at 64x64 for thin parts
    )
    _DRAWERS[object](ImageDraw.Draw(canvas), box, fg, bg)
    if supersample == 1:
        return canvas
    return canvas.resize((image_size, image_size), Image.Resampling.BOX)


def resolve_colour(colour, table: dict[str, RGB], jitter: int, rng: random.Random | None) -> RGB:
    """An RGB tuple as is, or a colour name from ``table`` with each channel moved by up to
    ``+-jitter`` (drawn from ``rng``; no jitter when ``rng`` is None)."""
    if not isinstance(colour, str):
        return tuple(int(c) for c in colour)
    if colour not in table:
        raise ValueError(f"unknown colour {colour!r}; expected one of {tuple(table)}")
    base = table[colour]
    if rng is None:
        return base
    return tuple(min(255, max(0, c + rng.randint(-jitter, jitter))) for c in base)


# ---------------------------------------------------------------------------------------------
# Samples and the dataset stream
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Sample:
    """One captioned image and the attributes it was generated from."""

    image: Image.Image
    caption: str
    object: str
    colour: str
    background: str
    size: float
    center: tuple[float, float]
    size_word: str  # "small" | "medium" | "big", from `size`
    position_word: str | None  # key of POSITION_PHRASES, from `center`; None when in between
    template: int  # index into CAPTION_TEMPLATES
    mirror: bool


def _sample_size(template: str, rng: random.Random) -> float:
    """Object size; a template with a size word draws it from that word's range."""
    if "{a_size}" in template:
        word = rng.choice(("small", "big"))
        low, high = SIZE_WORD_RANGES[word]
        return rng.uniform(low, high - 1e-3)  # strictly inside the word's range
    if "{position}" in template:
        return rng.uniform(SIZE_RANGE[0], _MAX_SIZE_WITH_OFFSET)  # room to move off-centre
    return rng.uniform(*SIZE_RANGE)


def _free_offset(size: float) -> float:
    """Largest |centre offset| keeping the box inside the frame up to a small margin."""
    return max(0.0, (1.0 - size) / 2) + _POSITION_FREE_MARGIN


def _sample_axis(kind: str, limit: float, rng: random.Random) -> float:
    """Offset from 0.5 along one axis: kind is '' (centred), '-' (left/top) or '+'."""
    if kind == "":
        return rng.uniform(-_CENTERED_TOLERANCE, _CENTERED_TOLERANCE) * 0.8
    low = _OFF_CENTER_MIN + 5e-3  # strictly past the threshold, whatever the rounding
    magnitude = rng.uniform(low, max(limit, low))
    return -magnitude if kind == "-" else magnitude


def _sample_center(template: str, size: float, rng: random.Random) -> tuple[float, float]:
    """Box centre; a template with a position phrase draws it inside that phrase's region."""
    limit = _free_offset(size)
    if "{position}" not in template:
        return 0.5 + rng.uniform(-limit, limit), 0.5 + rng.uniform(-limit, limit)
    word = rng.choice(tuple(POSITION_PHRASES))
    kinds = {"left": "-", "right": "+", "top": "-", "bottom": "+"}
    horizontal = next((kinds[w] for w in word.split() if w in ("left", "right")), "")
    vertical = next((kinds[w] for w in word.split() if w in ("top", "bottom")), "")
    return 0.5 + _sample_axis(horizontal, limit, rng), 0.5 + _sample_axis(vertical, limit, rng)


def make_caption(template: str, *, object: str, colour: str, background: str,
                 size_word: str | None = None, position_word: str | None = None) -> str:
    """Fill a caption template; articles agree with the next word ('an orange')."""
    return template.format(
        object=object,
        colour=colour,
        a_colour=with_article(colour),
        bg=background,
        a_bg=with_article(background),
        a_size=with_article(size_word) if size_word else "",
        position=POSITION_PHRASES[position_word] if position_word else "",
    )


def make_sample(rng: random.Random, pairs: Sequence[tuple[str, str]], image_size: int = 64) -> Sample:
    """Draw one random sample whose (colour, object) pair is taken from ``pairs``.

    The object kind is uniform over the kinds present in ``pairs``, then the colour is
    uniform over that kind's colours in ``pairs``.
    """
    kinds = sorted({o for _, o in pairs}, key=OBJECTS.index)
    object = rng.choice(kinds)
    colour = rng.choice([c for c, o in pairs if o == object])
    background = rng.choice(background_choices(colour))
    template_index = rng.randrange(len(CAPTION_TEMPLATES))
    template = CAPTION_TEMPLATES[template_index]
    size = _sample_size(template, rng)
    center = _sample_center(template, size, rng)
    mirror = object in MIRRORABLE and rng.random() < 0.5
    image = render(object, colour, background, size=size, center=center, rng=rng,
                   image_size=image_size, mirror=mirror)
    words = {"size_word": size_word(size), "position_word": position_word(center)}
    caption = make_caption(
        template, object=object, colour=colour, background=background,
        size_word=words["size_word"] if "{a_size}" in template else None,
        position_word=words["position_word"] if "{position}" in template else None,
    )
    return Sample(image=image, caption=caption, object=object, colour=colour, background=background,
                  size=size, center=center, template=template_index, mirror=mirror, **words)


class ProceduralDataset:
    """An infinite, deterministic stream of captioned procedural images.

    ``sample(i)`` depends only on ``(seed, split, i, image_size)``; iterating yields
    ``sample(0), sample(1), ...``.

    Args:
        seed: non-negative integer.
        split: "train" (never a held-out pair), "heldout" (only held-out pairs) or "all".
        image_size: output side in pixels.
    """

    def __init__(self, seed: int = 0, split: str = "train", image_size: int = 64):
        if seed < 0:
            raise ValueError(f"seed must be >= 0, got {seed}")
        self.pairs = pairs_for_split(split)
        self.seed, self.split, self.image_size = int(seed), split, int(image_size)

    def _rng(self, index: int) -> random.Random:
        if index < 0:
            raise IndexError(f"index must be >= 0, got {index}")
        # Disjoint integer seeds for every (seed, split, index) with index < 2**64.
        return random.Random((self.seed << 66) + (SPLITS.index(self.split) << 64) + index)

    def sample(self, index: int) -> Sample:
        return make_sample(self._rng(index), self.pairs, self.image_size)

    def __iter__(self) -> Iterator[Sample]:
        index = 0
        while True:
            yield self.sample(index)
            index += 1

    def take(self, n: int, start: int = 0) -> list[Sample]:
        """Samples ``start .. start + n - 1``."""
        return [self.sample(i) for i in range(start, start + n)]


def images_to_tensor(images: Sequence[Image.Image]):
    """PIL RGB images -> float32 Tensor[B, 3, H, W] in [-1, 1]."""
    import torch

    array = np.stack([np.asarray(im.convert("RGB"), dtype=np.uint8) for im in images])
    return torch.from_numpy(array).permute(0, 3, 1, 2).float().div_(127.5).sub_(1.0)


def export_imagefolder(
    directory: str | Path,
    n: int,
    seed: int = 0,
    split: str = "train",
    image_size: int = 64,
) -> Path:
    """Write ``n`` samples as PNGs plus a ``metadata.jsonl`` for the ``imagefolder`` loader.

    Each metadata row has ``file_name``, ``text`` (the caption), ``object``, ``colour`` and
    ``background``; ``datasets.load_dataset("imagefolder", data_dir=directory)`` reads it offline.

    Returns:
        The directory path.
    """
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    dataset = ProceduralDataset(seed, split, image_size)
    width = max(6, len(str(n - 1)))
    with open(directory / "metadata.jsonl", "w", encoding="utf-8") as metadata:
        for index in range(n):
            sample = dataset.sample(index)
            file_name = f"{index:0{width}d}.png"
            sample.image.save(directory / file_name)
            row = {"file_name": file_name, "text": sample.caption, "object": sample.object,
                   "colour": sample.colour, "background": sample.background}
            metadata.write(json.dumps(row) + "\n")
    logger.info("wrote %d %s samples (seed %d) to %s", n, split, seed, directory)
    return directory
