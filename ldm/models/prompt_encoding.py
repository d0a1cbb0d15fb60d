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

Textual-inversion embeddings (the text encoder's ``textual_inversions``): where a trigger word's
tokens appear in a prompt they are replaced by the embedding's ``n`` vectors (placeholder ids, the
vectors put in at encoding time), with the weight of the text around them; an embedding that would
cross a chunk boundary starts the next chunk, as in the web UI.

A prompt without syntax and with at most ``max_length - 2`` tokens gives exactly the ids the
tokenizer gives and exactly the hidden states the text encoder gives, as before this module
existed (no weighting is applied when every weight is 1).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping, Sequence

import torch
from torch import Tensor

from ldm.prompt_syntax import BREAK_WEIGHT, parse_weighted, prompt_schedule

COMMA_BACKTRACK = 20  # tokens; AUTOMATIC1111's "comma padding backtrack" default
EMBEDDING_PLACEHOLDER = 0  # the id at an embedding's positions (its vectors replace that id's embedding)


@dataclass
class Chunk:
    """One chunk's token ids and weights, without start/end tokens (at most ``size`` of them), and the
    embeddings in it: ``(position in tokens, vectors [n, D])``."""

    tokens: list[int] = field(default_factory=list)
    weights: list[float] = field(default_factory=list)
    embeddings: list[tuple[int, Tensor]] = field(default_factory=list)


def split_into_chunks(tokenizer, prompt: str, embeddings: Mapping[str, Tensor] | None = None) -> list[Chunk]:
    """``prompt`` -> weighted chunks of at most ``tokenizer.max_length - 2`` tokens (at least one chunk);
    ``embeddings``: textual-inversion vectors ``[n, D]`` by trigger word."""
    size = tokenizer.max_length - 2
    comma = tokenizer.encode_text(",")[0]
    triggers = _trigger_ids(tokenizer, embeddings or {})
    pieces = parse_weighted(prompt)
    texts = [text for text, weight in pieces if weight != BREAK_WEIGHT]
    token_lists = iter(tokenizer.encode_batch(texts)) if texts else iter(())
    chunks, current = [], Chunk()
    for _text, weight in pieces:
        if weight == BREAK_WEIGHT:
            chunks.append(current)
            current = Chunk()
            continue
        for item in _with_embeddings(next(token_lists), triggers):
            if isinstance(item, Tensor):  # an embedding: never split across chunks
                if len(current.tokens) + len(item) > size:
                    chunks.append(current)
                    current = Chunk()
                current.embeddings.append((len(current.tokens), item))
                current.tokens.extend([EMBEDDING_PLACEHOLDER] * len(item))
                current.weights.extend([weight] * len(item))
                continue
            if len(current.tokens) == size:
                current, carried = _close_at_comma(current, comma)
                chunks.append(current)
                current = carried
            current.tokens.append(item)
            current.weights.append(weight)
    if current.tokens or not chunks:
        chunks.append(current)
    return chunks


def _trigger_ids(tokenizer, embeddings: Mapping[str, Tensor]) -> list[tuple[tuple[int, ...], Tensor]]:
    """``[(the trigger word's token ids, vectors)]``, longest trigger first (it wins where triggers overlap)."""
    triggers = [(tuple(tokenizer.encode_text(word)), vectors) for word, vectors in embeddings.items()]
    return sorted(triggers, key=lambda trigger: -len(trigger[0]))


def _with_embeddings(tokens: list[int], triggers: list[tuple[tuple[int, ...], Tensor]]) -> list[int | Tensor]:
    """``tokens`` with each occurrence of a trigger's ids replaced by that embedding's vectors."""
    out: list[int | Tensor] = []
    i = 0
    while i < len(tokens):
        match = next(((ids, vectors) for ids, vectors in triggers if tuple(tokens[i:i + len(ids)]) == ids), None)
        if match is None:
            out.append(tokens[i])
            i += 1
        else:
            out.append(match[1])
            i += len(match[0])
    return out


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


def encode_prompts(text_encoder, prompts: Sequence[str], *, clip_skip: int = 1,
                   pooled: bool = False) -> Tensor | tuple[Tensor, Tensor]:
    """Prompts -> conditioning ``[B, chunks * max_length, D]``, every prompt padded with encodings of
    the empty prompt to the chunk count of the longest (so a prompt and its negative, encoded in one
    call, line up); ``clip_skip`` as in :func:`ldm.models.text_encoders.blocks_used`.

    ``pooled`` (SDXL: an encoder with ``forward_with_pooled``): also return each prompt's pooled
    embedding ``[B, P]``, that of its first chunk (AUTOMATIC1111's choice for long prompts)."""
    tokenizer = text_encoder.tokenizer
    device = next(text_encoder.parameters()).device
    embeddings = text_encoder.textual_inversions
    per_prompt = [split_into_chunks(tokenizer, prompt, embeddings) for prompt in prompts]
    count = max(len(chunks) for chunks in per_prompt)
    rows, pooled_rows = [], []
    for chunks in per_prompt:
        chunks = chunks + [Chunk()] * (count - len(chunks))
        ids, weights = zip(*(chunk_ids(tokenizer, chunk) for chunk in chunks))
        # embedding vectors go after each chunk's start token: (chunk, 1 + position, vectors)
        replacements = [(c, 1 + position, vectors) for c, chunk in enumerate(chunks)
                        for position, vectors in chunk.embeddings]
        encode = text_encoder.forward_with_pooled if pooled else text_encoder
        hidden = encode(torch.tensor(ids, device=device), clip_skip=clip_skip,
                        replacements=replacements)  # [chunks, L, D] (and [chunks, P])
        if pooled:
            hidden, first_pooled = hidden[0], hidden[1][:1]
            pooled_rows.append(first_pooled)
        rows.append(emphasise(hidden, torch.tensor(weights, device=device)).reshape(1, -1, hidden.shape[-1]))
    return (torch.cat(rows), torch.cat(pooled_rows)) if pooled else torch.cat(rows)


def emphasise(hidden: Tensor, weights: Tensor) -> Tensor:
    """Hidden states ``[C, L, D]`` times token ``weights [C, L]``, rescaled to the original mean
    (AUTOMATIC1111's "Original" emphasis); unchanged when every weight is 1."""
    if bool((weights == 1).all()):
        return hidden
    original_mean = hidden.float().mean()
    weighted = hidden * weights[..., None].to(hidden.dtype)
    return weighted * (original_mean / weighted.float().mean()).to(hidden.dtype)



@dataclass
class ContextSchedule:
    """Conditioning that changes during sampling (prompt editing ``[a:b:when]``, alternation ``[a|b]``).

    ``contexts [N, L, D]`` holds every distinct text's encoding; ``rows[i]`` is row ``i``'s schedule
    ``[(last step, index into contexts), ...]`` (:func:`ldm.prompt_syntax.prompt_schedule`, steps from 1).
    :meth:`at` picks the context of denoiser call ``k`` (from 0) as the web UI does: the first entry
    with ``k <= last step``, else the first entry. The web UI counts denoiser calls, not steps, so a
    2nd-order sampler (Heun, DPM2, DPM++ SDE) walks the schedule twice as fast there, and here.
    """

    contexts: Tensor
    rows: list[list[tuple[int, int]]]

    @property
    def shape(self) -> torch.Size:
        """The shape of one call's conditioning, ``[B, L, D]``."""
        return torch.Size([len(self.rows), *self.contexts.shape[1:]])

    def at(self, call: int) -> Tensor:
        """Conditioning ``[B, L, D]`` for denoiser call ``call`` (0-based)."""
        picks = [next((index for last, index in row if call <= last), row[0][1]) for row in self.rows]
        return self.contexts[picks]


def schedule_contexts(text_encoder, prompts: Sequence[str], steps: int, *, clip_skip: int = 1,
                      hires_base_steps: int | None = None) -> Tensor | ContextSchedule:
    """Prompts (possibly with prompt editing or alternation) -> their conditioning: ``[B, chunks * L, D]``
    when no prompt changes during sampling (exactly :func:`encode_prompts` of the prompts), else a
    :class:`ContextSchedule` over the distinct texts, all encoded in one call (so padded alike)."""
    schedules = [prompt_schedule(prompt, steps, hires_base_steps=hires_base_steps) for prompt in prompts]
    if all(len(schedule) == 1 for schedule in schedules):
        return encode_prompts(text_encoder, [schedule[0][1] for schedule in schedules], clip_skip=clip_skip)
    texts = list(dict.fromkeys(text for schedule in schedules for _, text in schedule))
    contexts = encode_prompts(text_encoder, texts, clip_skip=clip_skip)
    rows = [[(last, texts.index(text)) for last, text in schedule] for schedule in schedules]
    return ContextSchedule(contexts, rows)
