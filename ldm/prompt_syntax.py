"""AUTOMATIC1111's prompt language: emphasis weights, BREAK, prompt editing and alternation.

``parse_weighted(text)`` splits a prompt into ``(text, weight)`` pieces the way the web UI reads it:

- ``(words)`` multiplies the weight of ``words`` by 1.1, ``((words))`` by 1.1**2, ``[words]`` divides
  it by 1.1, ``(words:1.3)`` multiplies it by 1.3; brackets nest and multiply;
- ``\\(`` ``\\)`` ``\\[`` ``\\]`` ``\\\\`` are the literal characters; an opening bracket that is never
  closed applies to the rest of the prompt;
- ``BREAK`` (upper case, a word of its own) ends the current 75-token chunk: it comes back as the
  piece ``(BREAK, -1)``;
- neighbouring pieces of equal weight are merged.

``prompt_schedule(text, steps)`` reads prompt editing ``[from:to:when]`` and alternation ``[a|b]``
first (the text then changes with the step; see the grammar further down).

Only the syntax lives here (no tokenizer, no torch); :mod:`ldm.models.prompt_encoding` turns the
pieces into chunked, weighted text-encoder conditioning.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

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


# ---------------------------------------------------------------------- prompt editing and alternation
#
# The web UI reads a prompt with a small grammar before the weights (its ``prompt_parser``):
#
#   start:      (prompt | stray)*            stray: one of [ ] ( ) :  taken as text
#   prompt:     (emphasized | scheduled | alternate | plain)*
#   emphasized: "(" prompt ")" | "(" prompt ":" prompt ")" | "[" prompt "]"
#   scheduled:  "[" [prompt ":"] prompt ":" NUMBER "]"   (whitespace allowed around NUMBER)
#   alternate:  "[" prompt ("|" prompt)+ "]"
#   plain:      characters other than \ [ ] ( ) : |, or a backslash escape
#
# A prompt that does not fit (a "|" outside brackets, a trailing lone backslash) is read as plain text.
# ``[from:to:when]`` uses ``from`` up to step ``when`` (a whole number) or ``when * steps`` (a number
# with a decimal point), ``to`` after it; ``[to:when]`` adds, ``[from::when]`` removes;
# ``[a|b|c]`` cycles through its options every step. Emphasis inside keeps its brackets: it is
# read afterwards by :func:`parse_weighted` on each step's text.

_PLAIN = re.compile(r"(?:[^\\\[\]():|]|\\.)+", re.S)
_NUMBER = re.compile(r"\s*([+-]?(?:\d+\.\d*|\.\d+|\d+)(?:[eE][+-]?\d+)?)\s*\]")
_STRAY = "[]():"


@dataclass(frozen=True)
class _Scheduled:
    before: tuple
    after: tuple
    when: str  # the NUMBER as written (a decimal point makes it a fraction of the steps)


@dataclass(frozen=True)
class _Alternate:
    options: tuple


def prompt_schedule(prompt: str, steps: int, *, hires_base_steps: int | None = None) -> list[tuple[int, str]]:
    """The texts a prompt stands for during sampling: ``[(last step, text), ...]`` with steps counted
    from 1 and the last entry ending at ``steps`` (the web UI's ``get_learned_conditioning_prompt_schedules``).

    For a hires fix's second pass give ``hires_base_steps`` (the first pass's steps; ``steps`` is then
    the second pass's): whole-number steps then count from the start of the first pass and fractions
    from 1 to 2 cover the second pass, as in the web UI.
    """
    tree = _parse(prompt)
    if tree is None:
        return [(steps, prompt)]
    int_offset, fraction_offset = (0, 0.0) if hires_base_steps is None else (hires_base_steps, 1.0)
    ends = {steps}
    _collect_steps(tree, steps, int_offset, fraction_offset, ends)
    return [(end, _text_at(tree, end, steps, int_offset, fraction_offset)) for end in sorted(ends)]


def _parse(text: str) -> tuple | None:
    """The top level: prompts, with stray brackets and colons as text; ``None`` when the text does not fit."""
    nodes, pos = [], 0
    while pos < len(text):
        items, pos = _parse_prompt(text, pos)
        nodes.extend(items)
        if pos < len(text):
            if text[pos] not in _STRAY:
                return None
            nodes.append(text[pos])
            pos += 1
    return tuple(nodes)


def _parse_prompt(text: str, pos: int) -> tuple[list, int]:
    """As many prompt items as fit from ``pos``: ``(nodes, position after them)``."""
    nodes = []
    while pos < len(text):
        if text[pos] in "([":
            parsed = _parse_bracket(text, pos)
            if parsed is None:
                break
            node, pos = parsed
            nodes.extend(node)
            continue
        match = _PLAIN.match(text, pos)
        if match is None:
            break
        nodes.append(match.group(0))
        pos = match.end()
    return nodes, pos


def _parse_bracket(text: str, pos: int) -> tuple[list, int] | None:
    """A scheduled, alternate or emphasized group at ``pos`` (tried in that order), or ``None``."""
    if text[pos] == "(":
        inner, end = _parse_prompt(text, pos + 1)
        if end < len(text) and text[end] == ")":
            return ["(", *inner, ")"], end + 1
        if end < len(text) and text[end] == ":":
            weight, end = _parse_prompt(text, end + 1)
            if end < len(text) and text[end] == ")":
                return ["(", *inner, ":", *weight, ")"], end + 1
        return None
    first, end = _parse_prompt(text, pos + 1)
    if end >= len(text):
        return None
    if text[end] == ":":
        scheduled = _parse_scheduled(text, first, end)
        if scheduled is not None:
            return scheduled
    if text[end] == "|":
        options = [tuple(first)]
        while end < len(text) and text[end] == "|":
            option, end = _parse_prompt(text, end + 1)
            options.append(tuple(option))
        if end < len(text) and text[end] == "]":
            return [_Alternate(tuple(options))], end + 1
        return None
    if text[end] == "]":
        return ["[", *first, "]"], end + 1
    return None


def _parse_scheduled(text: str, first: list, colon: int) -> tuple[list, int] | None:
    """``[first:second:NUMBER]`` or ``[first:NUMBER]`` with ``first`` read up to ``colon``."""
    second, end = _parse_prompt(text, colon + 1)
    if end < len(text) and text[end] == ":":
        number = _NUMBER.match(text, end + 1)
        if number is not None:
            return [_Scheduled(tuple(first), tuple(second), number.group(1))], number.end()
    number = _NUMBER.match(text, colon + 1)
    if number is not None:
        return [_Scheduled((), tuple(first), number.group(1))], number.end()
    return None


def _when(node: _Scheduled, steps: int, int_offset: int, fraction_offset: float) -> int:
    """The last step of ``node.before``: a whole number counts steps, a decimal one a fraction of them."""
    value = float(node.when)
    value = (value - fraction_offset) * steps if "." in node.when else value - int_offset
    return min(steps, int(value))


def _walk(nodes: tuple):
    for node in nodes:
        yield node
        if isinstance(node, _Scheduled):
            yield from _walk(node.before)
            yield from _walk(node.after)
        elif isinstance(node, _Alternate):
            for option in node.options:
                yield from _walk(option)


def _collect_steps(nodes: tuple, steps: int, int_offset: int, fraction_offset: float, ends: set[int]) -> None:
    for node in _walk(nodes):
        if isinstance(node, _Scheduled):
            when = _when(node, steps, int_offset, fraction_offset)
            if when >= 1:
                ends.add(when)
        elif isinstance(node, _Alternate):
            ends.update(range(1, steps + 1))


def _text_at(nodes: tuple, step: int, steps: int, int_offset: int, fraction_offset: float) -> str:
    """The prompt's text at ``step`` (1-based)."""
    parts = []
    for node in nodes:
        if isinstance(node, _Scheduled):
            chosen = node.before if step <= _when(node, steps, int_offset, fraction_offset) else node.after
            parts.append(_text_at(chosen, step, steps, int_offset, fraction_offset))
        elif isinstance(node, _Alternate):
            parts.append(_text_at(node.options[(step - 1) % len(node.options)], step, steps, int_offset,
                                  fraction_offset))
        else:
            parts.append(node)
    return "".join(parts)
