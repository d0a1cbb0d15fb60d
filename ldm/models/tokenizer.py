"""The CLIP byte-pair-encoding tokenizer, built offline.

Stable Diffusion 1.x (OpenAI CLIP ViT-L/14) and 2.x (OpenCLIP ViT-H/14) share one BPE
vocabulary: 256 byte symbols, the same 256 symbols with the end-of-word marker ``</w>``,
48,894 merges and two special tokens, 49,408 ids in all. That vocabulary ships inside the
``open_clip_torch`` wheel as ``bpe_simple_vocab_16e6.txt.gz``, so the real tokenizer (and the
``vocab.json`` / ``merges.txt`` a diffusers ``tokenizer/`` folder needs) is built here with no
download.

A prompt becomes ``[<|startoftext|>, tokens..., <|endoftext|>, pad...]`` of length ``max_length``
(77). The two model families differ only in the padding id:

* SD1 (``pad="eot"``): pads with ``<|endoftext|>`` (49407), as transformers' CLIPTokenizer does.
* SD2 (``pad="zero"``): pads with id 0 (the token ``"!"``), as ``open_clip.tokenize`` does.

Nothing is read at import time: the vocabulary file is parsed on the first tokenization and
cached for every tokenizer in the process.
"""

from __future__ import annotations

import functools
import gzip
import html
import importlib.util
import json
import logging
import unicodedata
from pathlib import Path
from typing import Literal, Sequence

import torch

logger = logging.getLogger(__name__)

SOT_TOKEN = "<|startoftext|>"
EOT_TOKEN = "<|endoftext|>"
END_OF_WORD = "</w>"
DEFAULT_MAX_LENGTH = 77
OPEN_CLIP_VOCAB_FILE = "bpe_simple_vocab_16e6.txt.gz"
# The gzip file holds a header line, then 262,144 merges of which CLIP uses the first 48,894
# (49,408 ids = 2 * 256 byte symbols + 48,894 merges + 2 special tokens).
NUM_CLIP_MERGES = 49408 - 2 * 256 - 2

# Pre-tokenizer of OpenAI CLIP: English contractions, letter runs, single digits, and runs of
# anything else that is neither space, letter nor digit. (Special tokens are split out of the
# raw text before this runs, as transformers does; open_clip and transformers both send any
# other spelling of them, e.g. upper case, through BPE like ordinary text.)
_WORD_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""

PadMode = Literal["eot", "zero"]
CleanMode = Literal["ftfy", "nfc"]


# --------------------------------------------------------------------------------------------
# Vocabulary
# --------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=1)
def bytes_to_symbols() -> dict[int, str]:
    """The byte-level BPE alphabet: every byte 0..255 -> one printable unicode character.

    Printable Latin-1 bytes map to themselves; the others (control characters, space, ...) map
    to code points 256 and up, in byte order. This is the table GPT-2 and CLIP use.
    """
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table = {byte: chr(byte) for byte in printable}
    next_code_point = 256
    for byte in range(256):
        if byte not in table:
            table[byte] = chr(next_code_point)
            next_code_point += 1
    return table


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


class BpeVocabulary:
    """Token strings -> ids plus the ordered list of BPE merges (earlier merge = higher priority)."""

    def __init__(self, token_to_id: dict[str, int], merges: Sequence[tuple[str, str]]):
        self.token_to_id = dict(token_to_id)
        self.merges = [tuple(pair) for pair in merges]

    def __len__(self) -> int:
        return len(self.token_to_id)

    @functools.cached_property
    def merge_ranks(self) -> dict[tuple[str, str], int]:
        return {pair: rank for rank, pair in enumerate(self.merges)}

    @functools.cached_property
    def id_to_token(self) -> dict[int, str]:
        return {index: token for token, index in self.token_to_id.items()}

    @classmethod
    def from_open_clip(cls, path: str | Path | None = None) -> "BpeVocabulary":
        """The CLIP vocabulary from open_clip's gzip merges file (ids exactly as OpenAI CLIP)."""
        lines = gzip.open(path or open_clip_vocabulary_file()).read().decode("utf-8").split("\n")
        merges = [tuple(line.split()) for line in lines[1 : NUM_CLIP_MERGES + 1]]
        symbols = list(bytes_to_symbols().values())
        tokens = symbols + [symbol + END_OF_WORD for symbol in symbols]
        tokens += ["".join(pair) for pair in merges]
        tokens += [SOT_TOKEN, EOT_TOKEN]
        return cls({token: index for index, token in enumerate(tokens)}, merges)

    @classmethod
    def from_files(cls, vocab_json: str | Path, merges_txt: str | Path) -> "BpeVocabulary":
        """Read a transformers-style ``vocab.json`` + ``merges.txt`` pair."""
        token_to_id = json.loads(Path(vocab_json).read_text(encoding="utf-8"))
        merges = []
        for line in Path(merges_txt).read_text(encoding="utf-8").split("\n"):
            if line.startswith("#version") or not line.strip():
                continue
            merges.append(tuple(line.split()))
        return cls(token_to_id, merges)

    @classmethod
    def from_tokenizer_json(cls, path: str | Path) -> "BpeVocabulary":
        """Read the BPE model (and added special tokens) of a ``tokenizers`` ``tokenizer.json``."""
        data = json.loads(Path(path).read_text(encoding="utf-8"))
        model = data["model"]
        if model.get("type", "BPE") != "BPE":
            raise ValueError(f"{path}: expected a BPE tokenizer, found {model.get('type')!r}")
        token_to_id = dict(model["vocab"])
        for added in data.get("added_tokens", []):
            token_to_id[added["content"]] = added["id"]
        merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model["merges"]]
        return cls(token_to_id, merges)


@functools.lru_cache(maxsize=1)
def default_vocabulary() -> BpeVocabulary:
    """The CLIP vocabulary of the open_clip wheel, parsed once per process."""
    return BpeVocabulary.from_open_clip()


@functools.lru_cache(maxsize=1)
def _word_regex():
    import regex  # \p{L} classes need the `regex` package (a dependency of open_clip and transformers)

    return regex.compile(_WORD_PATTERN, regex.IGNORECASE)


# --------------------------------------------------------------------------------------------
# Text cleaning
# --------------------------------------------------------------------------------------------


def clean_text(text: str, mode: CleanMode = "ftfy") -> str:
    """Normalise a prompt before splitting it into words.

    ``"ftfy"``: OpenAI CLIP / open_clip: repair mojibake with ftfy, unescape HTML twice, collapse
    whitespace, lower-case. ``"nfc"``: transformers' CLIPTokenizer: NFC unicode normal form,
    collapse whitespace, lower-case. The two agree on ordinary prompts; they differ on HTML
    entities and on characters ftfy rewrites (curly quotes, full-width letters, ligatures).
    """
    if mode == "ftfy":
        import ftfy

        text = html.unescape(html.unescape(ftfy.fix_text(text)))
    elif mode == "nfc":
        text = unicodedata.normalize("NFC", text)
    else:
        raise ValueError(f"clean must be 'ftfy' or 'nfc', got {mode!r}")
    return " ".join(text.split()).lower()


# --------------------------------------------------------------------------------------------
# Tokenizer
# --------------------------------------------------------------------------------------------


def _merge_pair(symbols: list[str], pair: tuple[str, str]) -> list[str]:
    """Replace every adjacent occurrence of ``pair`` in ``symbols`` (left to right) by its join."""
    merged, i = [], 0
    while i < len(symbols):
        if i + 1 < len(symbols) and (symbols[i], symbols[i + 1]) == pair:
            merged.append(symbols[i] + symbols[i + 1])
            i += 2
        else:
            merged.append(symbols[i])
            i += 1
    return merged


class ClipTokenizer:
    """CLIP BPE tokenizer: ``tokenizer(prompts) -> LongTensor [B, max_length]``.

    Args:
        max_length: tokens per prompt including ``<|startoftext|>`` and ``<|endoftext|>`` (77).
        pad: ``"eot"`` pads with ``<|endoftext|>`` (SD1), ``"zero"`` pads with id 0 (SD2/OpenCLIP).
        clean: text normalisation, see :func:`clean_text`. ``"ftfy"`` is the one CLIP was trained
            with; ``"nfc"`` reproduces transformers' CLIPTokenizer exactly.
        vocabulary: defaults to the CLIP vocabulary inside the open_clip wheel (loaded lazily).
        special_tokens: strings matched verbatim in the raw prompt and mapped straight to their
            ids, before cleaning and BPE (transformers' "added tokens"). Defaults to
            ``<|startoftext|>`` and ``<|endoftext|>``.
    """

    def __init__(
        self,
        max_length: int = DEFAULT_MAX_LENGTH,
        pad: PadMode = "eot",
        clean: CleanMode = "ftfy",
        vocabulary: BpeVocabulary | None = None,
        special_tokens: Sequence[str] = (SOT_TOKEN, EOT_TOKEN),
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
        self._vocabulary = vocabulary
        self.special_tokens = tuple(special_tokens)
        self._word_cache: dict[str, list[int]] = {}

    def __repr__(self) -> str:
        return f"ClipTokenizer(max_length={self.max_length}, pad={self.pad!r}, clean={self.clean!r})"

    # ---- vocabulary -------------------------------------------------------------------------

    @property
    def vocabulary(self) -> BpeVocabulary:
        if self._vocabulary is None:
            self._vocabulary = default_vocabulary()
        return self._vocabulary

    @property
    def vocab_size(self) -> int:
        return len(self.vocabulary)

    @property
    def sot_id(self) -> int:
        return self.vocabulary.token_to_id[SOT_TOKEN]

    @property
    def eot_id(self) -> int:
        return self.vocabulary.token_to_id[EOT_TOKEN]

    @property
    def pad_id(self) -> int:
        return self.eot_id if self.pad == "eot" else 0

    # ---- encoding ---------------------------------------------------------------------------

    def _bpe(self, word: str) -> list[int]:
        """Ids of one pre-tokenized word, its bytes already mapped to BPE symbols."""
        cached = self._word_cache.get(word)
        if cached is not None:
            return cached
        ranks = self.vocabulary.merge_ranks
        symbols = [*word[:-1], word[-1] + END_OF_WORD]
        while len(symbols) > 1:
            pairs = set(zip(symbols, symbols[1:]))
            best = min(pairs, key=lambda pair: ranks.get(pair, float("inf")))
            if best not in ranks:
                break
            symbols = _merge_pair(symbols, best)
        ids = [self.vocabulary.token_to_id[symbol] for symbol in symbols]
        self._word_cache[word] = ids
        return ids

    def _encode_plain(self, text: str) -> list[int]:
        """Ids of text that holds no special token: clean, split into words, BPE each word."""
        byte_symbols = bytes_to_symbols()
        ids: list[int] = []
        for word in _word_regex().findall(clean_text(text, self.clean)):
            ids.extend(self._bpe("".join(byte_symbols[b] for b in word.encode("utf-8"))))
        return ids

    def encode_text(self, text: str) -> list[int]:
        """Token ids of ``text`` without start/end tokens and without truncation."""
        if not self.special_tokens:
            return self._encode_plain(text)
        ids: list[int] = []
        for piece in _split_special(text, self.special_tokens):
            if piece in self.special_tokens:
                ids.append(self.vocabulary.token_to_id[piece])
            elif piece:
                ids.extend(self._encode_plain(piece))
        return ids

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
        dropped: list[str] = []
        for row, prompt in enumerate(prompts):
            tokens = self.encode_text(prompt)
            if len(tokens) > room:
                dropped.append(self.decode(tokens[room:]))
                tokens = tokens[:room]
            ids[row, : len(tokens) + 2] = torch.tensor([self.sot_id, *tokens, self.eot_id])
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
        symbol_to_byte = {symbol: byte for byte, symbol in bytes_to_symbols().items()}
        pieces = []
        for index in ids:
            token = self.vocabulary.id_to_token[int(index)]
            if token in (SOT_TOKEN, EOT_TOKEN):
                pieces.append(token + " ")
                continue
            raw = bytes(symbol_to_byte[ch] for ch in token.replace(END_OF_WORD, ""))
            pieces.append(raw.decode("utf-8", errors="replace") + (" " if token.endswith(END_OF_WORD) else ""))
        return "".join(pieces).strip()

    # ---- interop with transformers / diffusers ----------------------------------------------

    def save_vocabulary(self, directory: str | Path) -> tuple[Path, Path]:
        """Write ``vocab.json`` and ``merges.txt`` (the files transformers' CLIPTokenizer reads)."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        vocab_path, merges_path = directory / "vocab.json", directory / "merges.txt"
        vocab_path.write_text(json.dumps(self.vocabulary.token_to_id, ensure_ascii=False), encoding="utf-8")
        merges = ["#version: 0.2", *(" ".join(pair) for pair in self.vocabulary.merges)]
        merges_path.write_text("\n".join(merges) + "\n", encoding="utf-8")
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

    @property
    def pad_token(self) -> str:
        """The pad token as a string: ``<|endoftext|>`` (SD1) or ``"!"`` (id 0, SD2)."""
        return self.vocabulary.id_to_token[self.pad_id]

    def to_transformers(self):
        """An equivalent ``transformers.CLIPTokenizer`` (pad token and ``model_max_length`` set).

        Call it as ``tok(prompts, padding="max_length", truncation=True, max_length=...)``.
        Two known differences from ``self``: transformers normalises with NFC (our
        ``clean="nfc"``), not ftfy; and with ``pad="zero"`` the pad token ``"!"`` becomes a
        special token, so a literal ``!`` in a prompt maps to id 0 instead of BPE's ``!</w>``
        (256). That is how diffusers' SD2 tokenizer behaves; ``open_clip.tokenize`` gives 256.
        """
        from transformers import CLIPTokenizer

        return CLIPTokenizer(
            vocab=dict(self.vocabulary.token_to_id),
            merges=list(self.vocabulary.merges),
            pad_token=self.pad_token,
            model_max_length=self.max_length,
        )

    @classmethod
    def from_diffusers_folder(cls, folder: str | Path) -> "ClipTokenizer":
        """Build from a diffusers ``tokenizer/`` folder (or a pipeline folder that contains one).

        Reads ``tokenizer.json`` or ``vocab.json`` + ``merges.txt``, and the pad token and
        ``model_max_length`` from ``tokenizer_config.json`` / ``special_tokens_map.json``. Uses
        ``clean="nfc"`` so that ids equal those of the folder's own transformers tokenizer.
        """
        folder = Path(folder)
        if not _has_tokenizer_files(folder) and _has_tokenizer_files(folder / "tokenizer"):
            folder = folder / "tokenizer"
        if (folder / "tokenizer.json").is_file():
            vocabulary = BpeVocabulary.from_tokenizer_json(folder / "tokenizer.json")
        elif (folder / "vocab.json").is_file() and (folder / "merges.txt").is_file():
            vocabulary = BpeVocabulary.from_files(folder / "vocab.json", folder / "merges.txt")
        else:
            raise FileNotFoundError(f"{folder}: no tokenizer.json nor vocab.json + merges.txt")
        settings = _read_tokenizer_settings(folder)
        pad_token = settings.get("pad_token", EOT_TOKEN)
        special_tokens = settings.get("special_tokens") or [SOT_TOKEN, EOT_TOKEN, pad_token]
        pad_id = vocabulary.token_to_id.get(pad_token)
        if pad_id == vocabulary.token_to_id.get(EOT_TOKEN):
            pad: PadMode = "eot"
        elif pad_id == 0:
            pad = "zero"
        else:
            raise ValueError(f"{folder}: pad token {pad_token!r} (id {pad_id}) is neither <|endoftext|> nor id 0")
        max_length = settings.get("model_max_length", DEFAULT_MAX_LENGTH)
        if not isinstance(max_length, int) or max_length > 100_000:  # transformers' "unset" is 1e30
            max_length = DEFAULT_MAX_LENGTH
        return cls(max_length=max_length, pad=pad, clean="nfc", vocabulary=vocabulary, special_tokens=special_tokens)


def _split_special(text: str, special_tokens: Sequence[str]) -> list[str]:
    """Split ``text`` around verbatim occurrences of special tokens (longest match first).

    ``"a!b"`` with special ``"!"`` -> ``["a", "!", "b"]``.
    """
    import regex

    alternatives = "|".join(regex.escape(token) for token in sorted(set(special_tokens), key=len, reverse=True))
    return regex.split(f"({alternatives})", text)


def _has_tokenizer_files(folder: Path) -> bool:
    return (folder / "tokenizer.json").is_file() or (folder / "vocab.json").is_file()


def _token_content(token) -> str:
    """A special token as saved by transformers: a plain string or ``{"content": ...}``."""
    return token["content"] if isinstance(token, dict) else token


def _read_tokenizer_settings(folder: Path) -> dict:
    """``pad_token``, ``model_max_length`` and ``special_tokens`` of a transformers tokenizer folder.

    Special tokens are ``tokenizer.json``'s added tokens when that file exists, else the
    bos/eos/unk/pad entries of the config files (the tokens transformers adds when it loads them).
    """
    settings: dict = {}
    named_tokens: list[str] = []
    for name in ("special_tokens_map.json", "tokenizer_config.json"):  # later file wins
        path = folder / name
        if not path.is_file():
            continue
        data = json.loads(path.read_text(encoding="utf-8"))
        if data.get("pad_token") is not None:
            settings["pad_token"] = _token_content(data["pad_token"])
        if "model_max_length" in data:
            settings["model_max_length"] = data["model_max_length"]
        for key in ("bos_token", "eos_token", "unk_token", "pad_token"):
            if data.get(key) is not None:
                named_tokens.append(_token_content(data[key]))
    tokenizer_json = folder / "tokenizer.json"
    if tokenizer_json.is_file():
        added = json.loads(tokenizer_json.read_text(encoding="utf-8")).get("added_tokens", [])
        settings["special_tokens"] = [token["content"] for token in added]
    elif named_tokens:
        settings["special_tokens"] = list(dict.fromkeys(named_tokens))
    return settings
