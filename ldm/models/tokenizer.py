"""The CLIP byte-pair-encoding tokenizer, built offline: a thin adapter around transformers.

Stable Diffusion 1.x (OpenAI CLIP ViT-L/14) and 2.x (OpenCLIP ViT-H/14) share one BPE
vocabulary: 256 byte symbols, the same 256 symbols with the end-of-word marker ``</w>``,
48,894 merges and two special tokens, 49,408 ids in all. That vocabulary ships inside the
``open_clip_torch`` wheel as ``bpe_simple_vocab_16e6.txt.gz``; :func:`clip_vocabulary` turns it
into the ``vocab`` / ``merges`` that transformers' ``CLIPTokenizer`` is built from, with no
download. The byte-pair encoding itself is the Rust one of that tokenizer (``tokenizers``).

A prompt becomes ``[<|startoftext|>, tokens..., <|endoftext|>, pad...]`` of length ``max_length``
(77). The two model families differ only in the padding id:

* SD1 (``pad="eot"``): pads with ``<|endoftext|>`` (49407), as transformers' CLIPTokenizer does.
* SD2 (``pad="zero"``): pads with id 0 (the token ``"!"``), as ``open_clip.tokenize`` does. A
  literal ``!`` in a prompt stays BPE's ``!</w>`` (256), as in open_clip.

What this module adds to the transformers tokenizer, and why it is not left to transformers:

* Padding and truncation (a few lines of torch): the cut keeps the final ``<|endoftext|>`` and
  one warning per call names the dropped text, which transformers' truncation cannot report.
* ``clean="ftfy"`` (the default): exactly open_clip's ``SimpleTokenizer`` text path, i.e. what
  CLIP was trained with: ``ftfy.fix_text``, HTML unescaping (twice), whitespace collapsing,
  Python ``str.lower``, then words split by open_clip's pattern with the ``regex`` package,
  case-insensitively. Only the byte mapping and BPE of those words run in the transformers
  tokenizer's Rust model (passed pre-tokenized). Measured reasons for not using transformers'
  own normaliser and word split here: (1) NFC + Rust lower-case instead of ftfy + unescape +
  ``str.lower`` changes HTML entities, curly quotes, full-width letters, ligatures, the
  final sigma and the control characters Python counts as space (U+001C-U+001F);
  (2) even with the text cleaned in Python, splitting words in Rust gave other ids for 347 of
  ~130,000 code points swept: the Unicode tables of ``tokenizers``' regex engine predate
  recently assigned letters (U+0C5C, U+A7CE, U+10940, ...) that the ``regex`` package (and so
  open_clip) treats as letters, and U+0345 is dropped by the case-insensitive ``regex`` pattern.
  The special tokens ``<|startoftext|>`` / ``<|endoftext|>`` are split out of the raw prompt
  first and map to their ids, as transformers does (open_clip byte-pair-encodes them), so
  cleaning (lower-casing, HTML unescaping) never turns other text into one.
* ``clean="nfc"``: the transformers tokenizer unchanged (NFC, whitespace, Rust lower-case, its
  own word split, added tokens), so ids equal any diffusers ``tokenizer/`` folder's.
* ``save_pretrained`` writes the file set of published SD ``tokenizer/`` folders (``vocab.json``,
  ``merges.txt`` + two JSON configs), which transformers 4 and 5 load; transformers 5 itself
  writes only ``tokenizer.json``.

Nothing is read at import time: the vocabulary file is parsed and the transformers tokenizer
built on the first tokenization, once per process.
"""

from __future__ import annotations

import functools
import gzip
import html
import importlib.util
import json
import logging
import re
from pathlib import Path
from typing import TYPE_CHECKING, Literal, Sequence

import torch

if TYPE_CHECKING:
    from transformers import CLIPTokenizer

logger = logging.getLogger(__name__)

SOT_TOKEN = "<|startoftext|>"
EOT_TOKEN = "<|endoftext|>"
END_OF_WORD = "</w>"
DEFAULT_MAX_LENGTH = 77
OPEN_CLIP_VOCAB_FILE = "bpe_simple_vocab_16e6.txt.gz"
# The gzip file holds a header line, then 262,144 merges of which CLIP uses the first 48,894
# (49,408 ids = 2 * 256 byte symbols + 48,894 merges + 2 special tokens).
NUM_CLIP_MERGES = 49408 - 2 * 256 - 2
# open_clip's (and OpenAI CLIP's) pre-tokenizer, applied case-insensitively with the `regex`
# package: English contractions, letter runs, single digits, and runs of anything else that is
# neither space, letter nor digit.
CLIP_WORD_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""

PadMode = Literal["eot", "zero"]
CleanMode = Literal["ftfy", "nfc"]


# --------------------------------------------------------------------------------------------
# Vocabulary and the transformers tokenizer
# --------------------------------------------------------------------------------------------


def open_clip_vocabulary_file() -> Path:
    """Path of ``bpe_simple_vocab_16e6.txt.gz`` inside the installed ``open_clip`` package.

    Located through the import system without importing open_clip (its import builds a tokenizer).
    """
    spec = importlib.util.find_spec("open_clip")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(
            "The CLIP vocabulary ships with open_clip_torch; install it with `pip install open_clip_torch`."
        )
    for folder in spec.submodule_search_locations:
        path = Path(folder) / OPEN_CLIP_VOCAB_FILE
        if path.is_file():
            return path
    raise FileNotFoundError(f"{OPEN_CLIP_VOCAB_FILE} not found in the open_clip package {spec.origin}")


@functools.lru_cache(maxsize=1)
def clip_vocabulary() -> tuple[dict[str, int], list[tuple[str, str]]]:
    """``(vocab, merges)`` of CLIP from open_clip's gzip merges file, ids exactly as OpenAI CLIP.

    The first 256 ids are the byte-level alphabet (each byte as one printable character, the
    table GPT-2 and CLIP share; printable bytes stand for themselves, the others for U+0100 on,
    in byte order, so code-point order is the table's order), then the same with ``</w>``, then
    one token per merge, then ``<|startoftext|>`` and ``<|endoftext|>``.
    """
    from tokenizers.pre_tokenizers import ByteLevel

    lines = gzip.open(open_clip_vocabulary_file()).read().decode("utf-8").split("\n")
    merges = [tuple(line.split()) for line in lines[1 : NUM_CLIP_MERGES + 1]]
    symbols = sorted(ByteLevel.alphabet())
    tokens = [*symbols, *(symbol + END_OF_WORD for symbol in symbols), *("".join(pair) for pair in merges)]
    tokens += [SOT_TOKEN, EOT_TOKEN]
    return {token: index for index, token in enumerate(tokens)}, merges


def _transformers_tokenizer(vocab, merges, pad_token: str = EOT_TOKEN, max_length: int = DEFAULT_MAX_LENGTH):
    from transformers import CLIPTokenizer

    # model_max_length must be set: transformers' default (1e30) breaks its truncation.
    return CLIPTokenizer(vocab=dict(vocab), merges=list(merges), pad_token=pad_token, model_max_length=max_length)


@functools.lru_cache(maxsize=1)
def default_transformers_tokenizer() -> "CLIPTokenizer":
    """transformers' ``CLIPTokenizer`` on the open_clip vocabulary (pad ``<|endoftext|>``), built once."""
    return _transformers_tokenizer(*clip_vocabulary())


def _open_clip_backend(tokenizer: "CLIPTokenizer"):
    """A ``tokenizers.Tokenizer`` sharing ``tokenizer``'s BPE model, for words split in Python.

    No normaliser, no word splitting and no added tokens: :class:`ClipTokenizer` does those the
    open_clip way and passes the words pre-tokenized; this maps their bytes and runs the BPE.
    """
    from tokenizers import Tokenizer, pre_tokenizers

    backend = Tokenizer(tokenizer.backend_tokenizer.model)
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    return backend


@functools.lru_cache(maxsize=1)
def _word_regex():
    import regex  # \p{L} classes need the `regex` package (a dependency of open_clip and transformers)

    return regex.compile(CLIP_WORD_PATTERN, regex.IGNORECASE)


def clean_text(text: str) -> str:
    """open_clip's / OpenAI CLIP's prompt cleaning: ftfy, HTML unescape twice, whitespace, lower case."""
    import ftfy

    return " ".join(html.unescape(html.unescape(ftfy.fix_text(text))).split()).lower()


# --------------------------------------------------------------------------------------------
# Tokenizer
# --------------------------------------------------------------------------------------------


class ClipTokenizer:
    """CLIP BPE tokenizer: ``tokenizer(prompts) -> LongTensor [B, max_length]``.

    Args:
        max_length: tokens per prompt including ``<|startoftext|>`` and ``<|endoftext|>`` (77).
        pad: ``"eot"`` pads with ``<|endoftext|>`` (SD1), ``"zero"`` pads with id 0 (SD2/OpenCLIP).
        clean: ``"ftfy"``: open_clip's cleaning (:func:`clean_text`), the one CLIP was trained
            with; ``"nfc"``: the transformers tokenizer's own normalisation, i.e. its exact ids.
        transformers_tokenizer: the transformers ``CLIPTokenizer`` to wrap; defaults to the CLIP
            vocabulary inside the open_clip wheel (built lazily). Its added tokens are the
            special tokens, matched verbatim in the raw prompt (see :meth:`from_diffusers_folder`).
    """

    def __init__(
        self,
        max_length: int = DEFAULT_MAX_LENGTH,
        pad: PadMode = "eot",
        clean: CleanMode = "ftfy",
        *,
        transformers_tokenizer: "CLIPTokenizer | None" = None,
    ):
        if pad not in ("eot", "zero"):
            raise ValueError(f"pad must be 'eot' or 'zero', got {pad!r}")
        if clean not in ("ftfy", "nfc"):
            raise ValueError(f"clean must be 'ftfy' or 'nfc', got {clean!r}")
        if max_length < 2:
            raise ValueError(f"max_length must leave room for the start and end tokens, got {max_length}")
        self.max_length = max_length
        self.pad = pad
        self.clean = clean
        self._transformers = transformers_tokenizer

    def __repr__(self) -> str:
        return f"ClipTokenizer(max_length={self.max_length}, pad={self.pad!r}, clean={self.clean!r})"

    # ---- vocabulary -------------------------------------------------------------------------

    @property
    def transformers_tokenizer(self) -> "CLIPTokenizer":
        """The wrapped transformers ``CLIPTokenizer`` (its own pad token, not necessarily ours)."""
        if self._transformers is None:
            self._transformers = default_transformers_tokenizer()
        return self._transformers

    @functools.cached_property
    def _backend(self):
        if self.clean == "nfc":
            return self.transformers_tokenizer.backend_tokenizer
        return _open_clip_backend(self.transformers_tokenizer)

    @functools.cached_property
    def _special_ids(self) -> dict[str, int]:
        added = self.transformers_tokenizer.backend_tokenizer.get_added_tokens_decoder()
        return {token.content: index for index, token in added.items()}

    @functools.cached_property
    def _special_pattern(self) -> re.Pattern:
        """Splits around verbatim special tokens (longest first): ``"a!b"`` -> ``["a", "!", "b"]``."""
        tokens = sorted(self._special_ids, key=len, reverse=True)
        return re.compile("(" + "|".join(map(re.escape, tokens)) + ")") if tokens else re.compile("(?!)")

    @property
    def vocab_size(self) -> int:
        return len(self.transformers_tokenizer)

    def _id(self, token: str) -> int:
        return self.transformers_tokenizer.backend_tokenizer.token_to_id(token)

    @property
    def sot_id(self) -> int:
        return self._id(SOT_TOKEN)

    @property
    def eot_id(self) -> int:
        return self._id(EOT_TOKEN)

    @property
    def pad_id(self) -> int:
        return self.eot_id if self.pad == "eot" else 0

    @property
    def pad_token(self) -> str:
        """The pad token as a string: ``<|endoftext|>`` (SD1) or ``"!"`` (id 0, SD2)."""
        return self.transformers_tokenizer.backend_tokenizer.id_to_token(self.pad_id)

    def vocab_and_merges(self) -> tuple[dict[str, int], list[tuple[str, str]]]:
        """``(token -> id in id order, merges in priority order)`` of the wrapped tokenizer."""
        backend = self.transformers_tokenizer.backend_tokenizer
        model = json.loads(backend.to_str())["model"]
        vocab = {**model["vocab"], **backend.get_vocab(with_added_tokens=True)}
        merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model["merges"]]
        return dict(sorted(vocab.items(), key=lambda item: item[1])), merges

    # ---- encoding ---------------------------------------------------------------------------

    def encode_batch(self, prompts: Sequence[str]) -> list[list[int]]:
        """Token ids of each prompt without start/end tokens and without truncation."""
        if isinstance(prompts, str):
            prompts = [prompts]
        if self.clean == "nfc":
            return [e.ids for e in self._backend.encode_batch_fast(list(prompts), add_special_tokens=False)]
        # Special tokens out of the raw text first ([text, special, text, ...]), then clean and BPE.
        pieces = [self._special_pattern.split(prompt) for prompt in prompts]
        words = [_word_regex().findall(clean_text(text)) for parts in pieces for text in parts[::2]]
        encoded = iter(self._backend.encode_batch_fast(words, is_pretokenized=True, add_special_tokens=False))
        rows = []
        for parts in pieces:
            row: list[int] = []
            for k, part in enumerate(parts):
                row.extend(next(encoded).ids if k % 2 == 0 else [self._special_ids[part]])
            rows.append(row)
        return rows

    def encode_text(self, text: str) -> list[int]:
        """Token ids of ``text`` without start/end tokens and without truncation."""
        return self.encode_batch([text])[0]

    def __call__(self, prompts: str | Sequence[str]) -> torch.Tensor:
        """Tokenize a batch of prompts.

        Returns:
            LongTensor [B, max_length]: ``[sot, tokens..., eot, pad...]``. A prompt with more than
            ``max_length - 2`` tokens is cut to fit, keeping the final ``<|endoftext|>``; one
            warning per call says how many prompts were cut and what was dropped.
        """
        if isinstance(prompts, str):
            prompts = [prompts]
        ids = torch.full((len(prompts), self.max_length), self.pad_id, dtype=torch.long)
        room = self.max_length - 2
        sot, eot = self.sot_id, self.eot_id
        dropped: list[str] = []
        for row, tokens in enumerate(self.encode_batch(prompts)):
            if len(tokens) > room:
                dropped.append(self.decode(tokens[room:]))
                tokens = tokens[:room]
            ids[row, : len(tokens) + 2] = torch.tensor([sot, *tokens, eot])
        if dropped:
            logger.warning(
                "%d of %d prompts exceed %d tokens and were truncated; dropped text: %s",
                len(dropped),
                len(prompts),
                self.max_length,
                "; ".join(repr(text) for text in dropped),
            )
        return ids

    def decode(self, ids: Sequence[int] | torch.Tensor) -> str:
        """Text of token ids (special and padding tokens are kept as their strings)."""
        if isinstance(ids, torch.Tensor):
            ids = ids.tolist()
        return self.transformers_tokenizer.backend_tokenizer.decode([int(i) for i in ids], skip_special_tokens=False)

    # ---- interop with transformers / diffusers ----------------------------------------------

    def save_vocabulary(self, directory: str | Path) -> tuple[Path, Path]:
        """Write ``vocab.json`` and ``merges.txt`` (the files transformers' CLIPTokenizer reads)."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        vocab, merges = self.vocab_and_merges()
        vocab_path, merges_path = directory / "vocab.json", directory / "merges.txt"
        vocab_path.write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
        lines = ["#version: 0.2", *(" ".join(pair) for pair in merges)]
        merges_path.write_text("\n".join(lines) + "\n", encoding="utf-8")
        return vocab_path, merges_path

    def save_pretrained(self, directory: str | Path) -> Path:
        """Write a diffusers ``tokenizer/`` folder: vocab, merges, pad token and max length.

        Uses the file set every published SD folder has (``vocab.json``, ``merges.txt``,
        ``special_tokens_map.json``, ``tokenizer_config.json``), which transformers 4 and 5 load.
        """
        directory = Path(directory)
        self.save_vocabulary(directory)
        special = {"bos_token": SOT_TOKEN, "eos_token": EOT_TOKEN, "unk_token": EOT_TOKEN, "pad_token": self.pad_token}
        config = {**special, "model_max_length": self.max_length, "tokenizer_class": "CLIPTokenizer"}
        (directory / "special_tokens_map.json").write_text(json.dumps(special, indent=2), encoding="utf-8")
        (directory / "tokenizer_config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")
        return directory

    def to_transformers(self) -> "CLIPTokenizer":
        """An equivalent ``transformers.CLIPTokenizer`` (pad token and ``model_max_length`` set).

        Call it as ``tok(prompts, padding="max_length", truncation=True, max_length=...)``.
        Two known differences from ``self``: transformers normalises with NFC (our
        ``clean="nfc"``), not ftfy; and with ``pad="zero"`` the pad token ``"!"`` becomes a
        special token, so a literal ``!`` in a prompt maps to id 0 instead of BPE's ``!</w>``
        (256). That is how diffusers' SD2 tokenizer behaves; ``open_clip.tokenize`` gives 256.
        """
        return _transformers_tokenizer(*self.vocab_and_merges(), pad_token=self.pad_token, max_length=self.max_length)

    @classmethod
    def from_diffusers_folder(cls, folder: str | Path) -> "ClipTokenizer":
        """Build from a diffusers ``tokenizer/`` folder (or a pipeline folder that contains one).

        The folder (``tokenizer.json`` or ``vocab.json`` + ``merges.txt``, and the configs that
        set the pad token and ``model_max_length``) is loaded with transformers'
        ``CLIPTokenizer.from_pretrained`` and wrapped with ``clean="nfc"``, so ids equal the
        folder's own tokenizer's, including an SD2 pad token ``"!"`` mapping a literal ``!`` to 0.
        """
        from transformers import CLIPTokenizer

        folder = Path(folder)
        if not _has_tokenizer_files(folder) and _has_tokenizer_files(folder / "tokenizer"):
            folder = folder / "tokenizer"
        if not (folder / "tokenizer.json").is_file() and not (
            (folder / "vocab.json").is_file() and (folder / "merges.txt").is_file()
        ):
            raise FileNotFoundError(f"{folder}: no tokenizer.json nor vocab.json + merges.txt")
        tokenizer = CLIPTokenizer.from_pretrained(str(folder))
        pad_id = tokenizer.pad_token_id
        if pad_id is None or pad_id == tokenizer.convert_tokens_to_ids(EOT_TOKEN):
            pad: PadMode = "eot"
        elif pad_id == 0:
            pad = "zero"
        else:
            raise ValueError(f"{folder}: pad token {tokenizer.pad_token!r} (id {pad_id}) is neither <|endoftext|> nor id 0")
        max_length = tokenizer.model_max_length
        if not isinstance(max_length, int) or max_length > 100_000:  # transformers' "unset" is 1e30
            max_length = DEFAULT_MAX_LENGTH
        return cls(max_length=max_length, pad=pad, clean="nfc", transformers_tokenizer=tokenizer)


def _has_tokenizer_files(folder: Path) -> bool:
    return (folder / "tokenizer.json").is_file() or (folder / "vocab.json").is_file()
