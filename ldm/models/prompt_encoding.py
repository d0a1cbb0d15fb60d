"""Prompts -> text-encoder conditioning, as AUTOMATIC1111 builds it: weights, BREAK and long prompts.

A prompt is parsed (:func:`ldm.prompt_syntax.parse_weighted`), tokenized without start/end
tokens, and cut into chunks of ``max_length - 2`` tokens (75 for Stable Diffusion). A chunk that
fills up moves its words after the last comma to the next chunk when that comma is at most
:data:`COMMA_BACKTRACK` tokens back; ``BREAK`` closes a chunk early. Each chunk becomes
``[start, tokens..., end, pad...]`` of ``max_length`` ids, is encoded on its own, and the chunks'
hidden states are concatenated along the sequence: ``[B, chunks * max_length, D]``.

Emphasis (AUTOMATIC1111's "Original" mode): each chunk's hidden states are multiplied by their
tokens' weights, then rescaled so that their mean is what it was before. We take that mean per
prompt (the web UI takes it over its batch), so an image never depends on its batch neighbours.

A prompt without syntax and with at most ``max_length - 2`` tokens gives exactly the ids the
tokenizer gives and exactly the hidden states the text encoder gives, as before this module
existed (no weighting is applied when every weight is 1).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import torch
from torch import Tensor

from ldm.prompt_syntax import BREAK_WEIGHT, parse_weighted

COMMA_BACKTRACK = 20  # tokens; AUTOMATIC1111's "comma padding backtrack" default


@dataclass
class Chunk:
    """One chunk's token ids and weights, without start/end tokens (at most ``size`` of them)."""

    tokens: list[int] = field(default_factory=list)
    weights: list[float] = field(default_factory=list)


def split_into_chunks(tokenizer, prompt: str) -> list[Chunk]:
    """``prompt`` -> weighted chunks of at most ``tokenizer.max_length - 2`` tokens (at least one chunk)."""
    size = tokenizer.max_length - 2
    comma = tokenizer.encode_text(",")[0]
    pieces = parse_weighted(prompt)
    texts = [text for text, weight in pieces if weight != BREAK_WEIGHT]
    token_lists = iter(tokenizer.encode_batch(texts)) if texts else iter(())
    chunks, current = [], Chunk()
    for _text, weight in pieces:
        if weight == BREAK_WEIGHT:
            chunks.append(current)
            current = Chunk()
            continue
        for token in next(token_lists):
            if len(current.tokens) == size:
                current, carried = _close_at_comma(current, comma)
                chunks.append(current)
                current = carried
            current.tokens.append(token)
            current.weights.append(weight)
    if current.tokens or not chunks:
        chunks.append(current)
    return chunks


def _close_at_comma(chunk: Chunk, comma: int) -> tuple[Chunk, Chunk]:
    """A full chunk -> (the chunk cut after its last comma, the carried-over rest) when that comma is
    at most :data:`COMMA_BACKTRACK` tokens from the end; else (the chunk, an empty one)."""
    if comma in chunk.tokens:
        cut = len(chunk.tokens) - chunk.tokens[::-1].index(comma)  # just after the last comma
        if len(chunk.tokens) - cut <= COMMA_BACKTRACK:
            return (Chunk(chunk.tokens[:cut], chunk.weights[:cut]),
                    Chunk(chunk.tokens[cut:], chunk.weights[cut:]))
    return chunk, Chunk()


def chunk_ids(tokenizer, chunk: Chunk) -> tuple[list[int], list[float]]:
    """A chunk -> ``[start, tokens..., end, pad...]`` ids and their weights (1 for the special tokens)."""
    pad = tokenizer.max_length - 2 - len(chunk.tokens)
    ids = [tokenizer.sot_id, *chunk.tokens, tokenizer.eot_id] + [tokenizer.pad_id] * pad
    return ids, [1.0, *chunk.weights, 1.0] + [1.0] * pad


def encode_prompts(text_encoder, prompts: Sequence[str], *, clip_skip: int = 1) -> Tensor:
    """Prompts -> conditioning ``[B, chunks * max_length, D]``, every prompt padded with encodings of
    the empty prompt to the chunk count of the longest (so a prompt and its negative, encoded in one
    call, line up); ``clip_skip`` as in :func:`ldm.models.text_encoders.blocks_used`."""
    tokenizer = text_encoder.tokenizer
    device = next(text_encoder.parameters()).device
    per_prompt = [split_into_chunks(tokenizer, prompt) for prompt in prompts]
    count = max(len(chunks) for chunks in per_prompt)
    rows = []
    for chunks in per_prompt:
        chunks = chunks + [Chunk()] * (count - len(chunks))
        ids, weights = zip(*(chunk_ids(tokenizer, chunk) for chunk in chunks))
        hidden = text_encoder(torch.tensor(ids, device=device), clip_skip=clip_skip)  # [chunks, L, D]
        rows.append(emphasise(hidden, torch.tensor(weights, device=device)).reshape(1, -1, hidden.shape[-1]))
    return torch.cat(rows)


def emphasise(hidden: Tensor, weights: Tensor) -> Tensor:
    """Hidden states ``[C, L, D]`` times token ``weights [C, L]``, rescaled to the original mean
    (AUTOMATIC1111's "Original" emphasis); unchanged when every weight is 1."""
    if bool((weights == 1).all()):
        return hidden
    original_mean = hidden.float().mean()
    weighted = hidden * weights[..., None].to(hidden.dtype)
    return weighted * (original_mean / weighted.float().mean()).to(hidden.dtype)

