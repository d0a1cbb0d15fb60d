"""AUTOMATIC1111's prompt language: emphasis weights and BREAK.

``parse_weighted(text)`` splits a prompt into ``(text, weight)`` pieces the way the web UI reads it:

- ``(words)`` multiplies the weight of ``words`` by 1.1, ``((words))`` by 1.1**2, ``[words]`` divides
  it by 1.1, ``(words:1.3)`` multiplies it by 1.3; brackets nest and multiply;
- ``\\(`` ``\\)`` ``\\[`` ``\\]`` ``\\\\`` are the literal characters; an opening bracket that is never
  closed applies to the rest of the prompt;
- ``BREAK`` (upper case, a word of its own) ends the current 75-token chunk: it comes back as the
  piece ``(BREAK, -1)``;
- neighbouring pieces of equal weight are merged.

Only the syntax lives here (no tokenizer, no torch); :mod:`ldm.models.prompt_encoding` turns the
pieces into chunked, weighted text-encoder conditioning.
"""

from __future__ import annotations

import re

EMPHASIS = 1.1  # one pair of round brackets
BREAK = "BREAK"
BREAK_WEIGHT = -1.0

# One lexical unit per match: an escape, an opening bracket, ":number)" closing a weighted group,
# a closing bracket, a run of ordinary characters, or a lone colon.
_UNIT = re.compile(r"""
    \\[()\[\]\\]            # escaped bracket or backslash
  | \\                      # a lone backslash
  | [(\[]                   # opening bracket
  | :\s*([+-]?[.\d]+)\s*\)  # ":1.3)" -- the weight of a round-bracket group
  | [)\]]                   # closing bracket
  | [^\\()\[\]:]+           # ordinary text
  | :                       # a colon that closes nothing
""", re.VERBOSE)
_BREAK = re.compile(r"\s*\bBREAK\b\s*", re.S)


def parse_weighted(text: str) -> list[tuple[str, float]]:
    """``text`` -> ``[(piece, weight), ...]``; weight ``-1`` marks a BREAK piece."""
    pieces: list[list] = []  # [text, weight], mutable while brackets close
    open_round: list[int] = []  # index into pieces where each open "(" started
    open_square: list[int] = []

    def scale_from(start: int, factor: float) -> None:
        for piece in pieces[start:]:
            piece[1] *= factor

    for match in _UNIT.finditer(text):
        unit, weight = match.group(0), match.group(1)
        if unit.startswith("\\") and len(unit) == 2:
            pieces.append([unit[1], 1.0])
        elif unit == "(":
            open_round.append(len(pieces))
        elif unit == "[":
            open_square.append(len(pieces))
        elif weight is not None and open_round:
            scale_from(open_round.pop(), float(weight))
        elif unit == ")" and open_round:
            scale_from(open_round.pop(), EMPHASIS)
        elif unit == "]" and open_square:
            scale_from(open_square.pop(), 1 / EMPHASIS)
        else:
            _append_text(pieces, unit)
    for start in open_round:
        scale_from(start, EMPHASIS)
    for start in open_square:
        scale_from(start, 1 / EMPHASIS)
    return _merge(pieces)


def _append_text(pieces: list[list], text: str) -> None:
    """Ordinary text, split at BREAK keywords (each becomes its own ``(BREAK, -1)`` piece)."""
    for i, part in enumerate(_BREAK.split(text)):
        if i > 0:
            pieces.append([BREAK, BREAK_WEIGHT])
        pieces.append([part, 1.0])


def _merge(pieces: list[list]) -> list[tuple[str, float]]:
    """Drop empty text, join neighbours of equal weight (BREAK pieces stay apart)."""
    merged: list[list] = []
    for text, weight in pieces:
        if text == "" and weight != BREAK_WEIGHT:
            continue
        if merged and weight == merged[-1][1] and weight != BREAK_WEIGHT:
            merged[-1][0] += text
        else:
            merged.append([text, weight])
    return [(text, weight) for text, weight in merged] or [("", 1.0)]


def is_plain(text: str) -> bool:
    """True when ``text`` uses none of the syntax (it then means exactly what the tokenizer reads)."""
    return parse_weighted(text) == [(text, 1.0)]
