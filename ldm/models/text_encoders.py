"""Text encoders: token ids -> cross-attention ``context [B, L, width]`` for the U-Net.

Two families, one interface (:class:`TextEncoder`):

* ``kind="clip"`` -- OpenAI CLIP ViT-L/14 text tower (SD1). :class:`CLIPTextEncoder` holds a
  ``transformers.CLIPTextModel`` so its parameter names are ``transformer.text_model.*``,
  the SD1 checkpoint keys under ``cond_stage_model.``.
* ``kind="openclip"`` -- OpenCLIP ViT-H/14 text tower (SD2). :class:`OpenCLIPTextEncoder` is
  written here with open_clip's module names, so its parameter names are ``model.*``, the SD2
  checkpoint keys under ``cond_stage_model.``.

SDXL conditions on two of them at once (:class:`SDXLTextEncoder`): CLIP ViT-L and OpenCLIP ViT-bigG,
both at the penultimate block *without* the final LayerNorm (``final_norm=False``), concatenated along
the width, plus bigG's pooled, projected final token; its refiner uses bigG alone.

Both are pre-LayerNorm causal transformers (Radford et al. 2021, CLIP section 2.4): token
embedding + learned positions, ``layers`` blocks of ``x + attn(ln_1(x))``, ``x + mlp(ln_2(x))``,
then a final LayerNorm. ``layer="penultimate"`` (SD2; "clip skip 2" for SD1 models) takes the
output of the second-to-last block and applies the final LayerNorm to it.

Diffusers folders go through :mod:`ldm.formats.text_keys`.

Textual-inversion embeddings (:meth:`_TextEncoderBase.add_embedding`) are vectors that stand in for a
trigger word's token embeddings: ``forward(..., replacements=...)`` puts them at the given positions
of the token-embedding output (the web UI's way; diffusers appends rows to the vocabulary instead,
which gives the same hidden states).
"""

from __future__ import annotations

import dataclasses
import math
from collections import OrderedDict
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Iterator, Literal, Protocol, Sequence, runtime_checkable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ldm.config_io import strict_from_dict
from ldm.models.tokenizer import ClipTokenizer

_KINDS = ("clip", "openclip")
_ACTS = ("quick_gelu", "gelu")
_LAYERS = ("last", "penultimate")
_PADS = ("eot", "zero")


@dataclass
class TextEncoderConfig:
    """Shape and behaviour of a CLIP-style text encoder.

    Attributes:
        kind: ``"clip"`` (transformers CLIPTextModel, SD1 keys) or ``"openclip"`` (SD2 keys).
        vocab_size: token embedding rows (49408 for the CLIP BPE vocabulary).
        width: hidden size = context channels handed to the U-Net.
        layers: transformer blocks.
        heads: attention heads per block.
        mlp_ratio: MLP hidden size / width.
        max_length: tokens per prompt = learned positions (77).
        act: MLP activation, ``"quick_gelu"`` (OpenAI CLIP) or ``"gelu"`` (OpenCLIP).
        layer: which block output becomes the context, ``"last"`` or ``"penultimate"``.
        pad: tokenizer padding, ``"eot"`` (SD1) or ``"zero"`` (SD2).
        projection_dim: columns of the OpenCLIP ``text_projection`` (unused by the U-Net).
        layer_norm_eps: epsilon of every LayerNorm.
        final_norm: apply the final LayerNorm to the chosen block's output (SD1, SD2); SDXL's
            embedders hand the raw penultimate hidden states to the U-Net.
    """

    kind: Literal["clip", "openclip"] = "clip"
    vocab_size: int = 49408
    width: int = 768
    layers: int = 12
    heads: int = 12
    mlp_ratio: float = 4.0
    max_length: int = 77
    act: Literal["quick_gelu", "gelu"] = "quick_gelu"
    layer: Literal["last", "penultimate"] = "last"
    pad: Literal["eot", "zero"] = "eot"
    projection_dim: int = 768
    layer_norm_eps: float = 1e-5
    final_norm: bool = True

    def __post_init__(self) -> None:
        for name, allowed in (("kind", _KINDS), ("act", _ACTS), ("layer", _LAYERS), ("pad", _PADS)):
            if getattr(self, name) not in allowed:
                raise ValueError(f"TextEncoderConfig.{name} must be one of {allowed}, got {getattr(self, name)!r}")
        if self.width % self.heads:
            raise ValueError(f"width {self.width} is not divisible by heads {self.heads}")
        if self.layer == "penultimate" and self.layers < 2:
            raise ValueError("layer='penultimate' needs at least 2 layers")

    @property
    def intermediate_size(self) -> int:
        """MLP hidden size, ``width * mlp_ratio`` (3072 for SD1, 4096 for SD2)."""
        return int(round(self.width * self.mlp_ratio))

    @property
    def num_layers_used(self) -> int:
        """Blocks that influence the output: all of them, or all but the last for "penultimate"."""
        return self.layers - 1 if self.layer == "penultimate" else self.layers

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        if self.final_norm:  # the default; absent from SD1/SD2 configs written before it existed
            del d["final_norm"]
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TextEncoderConfig":
        return strict_from_dict(cls, d)

    @classmethod
    def sd1(cls) -> "TextEncoderConfig":
        """Stable Diffusion 1.x: OpenAI CLIP ViT-L/14 text tower, last layer, eot padding."""
        return cls(kind="clip", width=768, layers=12, heads=12, act="quick_gelu", layer="last", pad="eot",
                   projection_dim=768)

    @classmethod
    def sd2(cls) -> "TextEncoderConfig":
        """Stable Diffusion 2.x: OpenCLIP ViT-H/14 text tower, penultimate layer, zero padding."""
        return cls(kind="openclip", width=1024, layers=24, heads=16, act="gelu", layer="penultimate", pad="zero",
                   projection_dim=1024)

    @classmethod
    def sdxl_clip_l(cls) -> "TextEncoderConfig":
        """SDXL's first embedder: OpenAI CLIP ViT-L/14, raw penultimate hidden states, eot padding."""
        return cls(kind="clip", width=768, layers=12, heads=12, act="quick_gelu", layer="penultimate", pad="eot",
                   projection_dim=768, final_norm=False)

    @classmethod
    def sdxl_bigg(cls) -> "TextEncoderConfig":
        """SDXL's second embedder (the refiner's only one): OpenCLIP ViT-bigG/14, raw penultimate hidden
        states, ``"!"`` (id 0) padding, pooled output projected to 1280."""
        return cls(kind="openclip", width=1280, layers=32, heads=20, act="gelu", layer="penultimate", pad="zero",
                   projection_dim=1280, final_norm=False)


@runtime_checkable
class TextEncoder(Protocol):
    """What the pipeline needs from a text encoder."""

    config: TextEncoderConfig
    tokenizer: ClipTokenizer

    def __call__(self, input_ids: Tensor) -> Tensor:
        """``input_ids [B, L]`` (L <= max_length) -> ``context [B, L, width]``."""
        ...

    def encode(self, prompts: Sequence[str]) -> Tensor:
        """Tokenize and encode: ``prompts`` -> ``context [B, max_length, width]``."""
        ...


class _TextEncoderBase(nn.Module):
    """Shared parts: the config, a tokenizer with the matching padding, and :meth:`encode`."""

    def __init__(self, config: TextEncoderConfig):
        super().__init__()
        self.config = config
        self.tokenizer = ClipTokenizer(max_length=config.max_length, pad=config.pad)
        self.textual_inversions: dict[str, Tensor] = {}  # trigger word -> vectors [n, width] (not in the state dict)

    @property
    def width(self) -> int:
        return self.config.width

    def add_embedding(self, token: str, vectors: Tensor) -> None:
        """Make ``token`` in a prompt stand for ``vectors [n, width]`` (a textual-inversion embedding of
        ``n`` tokens); ``ValueError`` with a one-line message when the width is not this encoder's."""
        if vectors.ndim != 2 or vectors.shape[1] != self.width:
            raise ValueError(f"embedding {token!r} has vectors of width {vectors.shape[-1]}, but this model's text "
                             f"encoder takes {self.width} (an embedding trained for another model family?)")
        if not self.tokenizer.encode_text(token):
            raise ValueError(f"embedding trigger {token!r} holds no words")
        if vectors.shape[0] > self.config.max_length - 2:
            raise ValueError(f"embedding {token!r} has {vectors.shape[0]} vectors; a prompt chunk holds "
                             f"{self.config.max_length - 2}")
        self.textual_inversions[token] = vectors.detach().float().cpu()

    def token_embedding(self) -> nn.Embedding:
        raise NotImplementedError

    def encode(self, prompts: Sequence[str]) -> Tensor:
        """``prompts`` (B strings) -> ``context [B, max_length, width]`` on the module's device."""
        device = next(self.parameters()).device
        return self(self.tokenizer(list(prompts)).to(device))


# --------------------------------------------------------------------------------------------
# SD1: transformers CLIPTextModel
# --------------------------------------------------------------------------------------------


def clip_text_config_kwargs(config: TextEncoderConfig, num_layers: int | None = None) -> dict[str, Any]:
    """``transformers.CLIPTextConfig`` keyword arguments describing ``config``'s tower.

    ``num_layers`` overrides the block count (the diffusers export of a penultimate-layer model
    keeps only the blocks that are used). Special ids are the CLIP tokenizer's: bos = 49406,
    eos = 49407 for the full vocabulary (the last two ids in general).
    """
    return {
        "vocab_size": config.vocab_size,
        "hidden_size": config.width,
        "intermediate_size": config.intermediate_size,
        "num_hidden_layers": config.layers if num_layers is None else num_layers,
        "num_attention_heads": config.heads,
        "max_position_embeddings": config.max_length,
        "hidden_act": config.act,
        "layer_norm_eps": config.layer_norm_eps,
        "projection_dim": config.projection_dim,
        "bos_token_id": config.vocab_size - 2,
        "eos_token_id": config.vocab_size - 1,
        "pad_token_id": config.vocab_size - 1 if config.pad == "eot" else 0,
    }


def _best_attention_implementation(model_class) -> str:
    return "sdpa" if getattr(model_class, "_supports_sdpa", False) else "eager"


class _TextModelSlot(nn.Module):
    """Holds a transformers>=5 ``CLIPTextModel`` as ``text_model``.

    transformers 5 dropped the inner ``text_model`` level of ``CLIPTextModel``; this slot puts it
    back so parameter names stay ``transformer.text_model.*`` like every SD1 checkpoint.
    """

    def __init__(self, text_model: nn.Module):
        super().__init__()
        self.text_model = text_model


class CLIPTextEncoder(_TextEncoderBase):
    """SD1's ``FrozenCLIPEmbedder``: a transformers ``CLIPTextModel`` under ``self.transformer``.

    ``forward(input_ids [B, L]) -> context [B, L, width]``: the final-LayerNorm output of the
    last block, or of the penultimate block when ``layer="penultimate"``.
    """

    def __init__(self, config: TextEncoderConfig):
        if config.kind != "clip":
            raise ValueError(f"CLIPTextEncoder needs kind='clip', got {config.kind!r}")
        super().__init__(config)
        from transformers import CLIPTextConfig, CLIPTextModel

        hf_config = CLIPTextConfig(
            **clip_text_config_kwargs(config), attn_implementation=_best_attention_implementation(CLIPTextModel)
        )
        model = CLIPTextModel(hf_config)
        # transformers 4 names parameters text_model.*; transformers 5 needs the slot.
        self.transformer = model if hasattr(model, "text_model") else _TextModelSlot(model)
        self._register_load_state_dict_pre_hook(_drop_position_ids, with_module=True)

    @property
    def hf_model(self) -> nn.Module:
        """The ``transformers.CLIPTextModel`` itself."""
        return self.transformer if not isinstance(self.transformer, _TextModelSlot) else self.transformer.text_model

    def _final_layer_norm(self) -> nn.LayerNorm:
        model = self.hf_model
        return model.final_layer_norm if hasattr(model, "final_layer_norm") else model.text_model.final_layer_norm

    def reset_derived_buffers(self) -> None:
        """Recompute ``position_ids [1, max_length]`` (an arange no checkpoint needs to hold) on the
        device of the weights; called after loading onto the meta device."""
        embeddings = self.hf_model.embeddings if hasattr(self.hf_model, "embeddings") else self.hf_model.text_model.embeddings
        device = embeddings.token_embedding.weight.device
        positions = torch.arange(self.config.max_length, device=device).expand((1, -1))
        embeddings.register_buffer("position_ids", positions, persistent=False)

    def token_embedding(self) -> nn.Embedding:
        model = self.hf_model
        return (model.embeddings if hasattr(model, "embeddings") else model.text_model.embeddings).token_embedding

    def forward(self, input_ids: Tensor, clip_skip: int = 1, replacements: Sequence[Replacement] = ()) -> Tensor:
        """``input_ids [B, L]`` -> ``context [B, L, width]`` (``clip_skip``: see :func:`blocks_used`;
        ``replacements``: token vectors to use instead of the ids' embeddings, see :func:`replaced_token_vectors`)."""
        blocks = blocks_used(self.config, clip_skip)
        with replaced_token_vectors(self.token_embedding(), replacements):
            if blocks == self.config.layers and self.config.final_norm:
                return self.hf_model(input_ids=input_ids).last_hidden_state
            # hidden_states = (embeddings, block 1, ..., block N): entry k is block k's output.
            hidden_states = self.hf_model(input_ids=input_ids, output_hidden_states=True).hidden_states
        if not self.config.final_norm:
            return hidden_states[blocks]
        return self._final_layer_norm()(hidden_states[blocks])


def _drop_position_ids(module, state_dict, prefix, *args, **kwargs) -> None:
    """SD1 checkpoints store ``...embeddings.position_ids`` (a constant arange); we do not."""
    state_dict.pop(f"{prefix}transformer.text_model.embeddings.position_ids", None)


# --------------------------------------------------------------------------------------------
# SD2: OpenCLIP text tower with open_clip's parameter names
# --------------------------------------------------------------------------------------------


class QuickGELU(nn.Module):
    """``x * sigmoid(1.702 x)``, the GELU approximation OpenAI CLIP was trained with."""

    def forward(self, x: Tensor) -> Tensor:
        return x * torch.sigmoid(1.702 * x)


def _activation(name: str) -> nn.Module:
    return QuickGELU() if name == "quick_gelu" else nn.GELU()


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention with ``nn.MultiheadAttention``'s parameter names.

    ``in_proj_weight [3W, W]`` stacks the query, key and value projections (in that order).
    """

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.in_proj_weight = nn.Parameter(torch.empty(3 * width, width))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * width))
        self.out_proj = nn.Linear(width, width)
        nn.init.normal_(self.in_proj_weight, std=width**-0.5)

    def forward(self, x: Tensor) -> Tensor:
        """``x [B, L, W]`` -> ``[B, L, W]``; token i attends to tokens 0..i."""
        batch, length, width = x.shape
        q, k, v = F.linear(x, self.in_proj_weight, self.in_proj_bias).chunk(3, dim=-1)
        q, k, v = (t.reshape(batch, length, self.heads, -1).transpose(1, 2) for t in (q, k, v))  # [B, H, L, D]
        # softmax(q k^T / sqrt(D) + causal mask) v  (Vaswani et al. 2017, eq. 1)
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.out_proj(out.transpose(1, 2).reshape(batch, length, width))


class ResidualAttentionBlock(nn.Module):
    """Pre-LN transformer block: ``x + attn(ln_1(x))``, then ``x + mlp(ln_2(x))``."""

    def __init__(self, config: TextEncoderConfig):
        super().__init__()
        width = config.width
        self.ln_1 = nn.LayerNorm(width, eps=config.layer_norm_eps)
        self.attn = CausalSelfAttention(width, config.heads)
        self.ln_2 = nn.LayerNorm(width, eps=config.layer_norm_eps)
        self.mlp = nn.Sequential(
            OrderedDict(
                c_fc=nn.Linear(width, config.intermediate_size),
                gelu=_activation(config.act),
                c_proj=nn.Linear(config.intermediate_size, width),
            )
        )

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class Transformer(nn.Module):
    """A stack of :class:`ResidualAttentionBlock` named ``resblocks`` (open_clip's layout)."""

    def __init__(self, config: TextEncoderConfig):
        super().__init__()
        self.resblocks = nn.ModuleList(ResidualAttentionBlock(config) for _ in range(config.layers))

    def forward(self, x: Tensor, num_blocks: int | None = None) -> Tensor:
        """Run the first ``num_blocks`` blocks (all by default) on ``x [B, L, W]``."""
        for block in self.resblocks[:num_blocks]:
            x = block(x)
        return x


class OpenCLIPTextTower(nn.Module):
    """The parameters of open_clip's CLIP text tower, named exactly as in SD2 checkpoints.

    ``token_embedding``, ``positional_embedding [L, W]``, ``transformer.resblocks.*``,
    ``ln_final``, ``text_projection [W, P]`` and ``logit_scale`` (a scalar). The image tower
    of the original model is not kept (SD2 deletes it too).
    """

    def __init__(self, config: TextEncoderConfig):
        super().__init__()
        self.token_embedding = nn.Embedding(config.vocab_size, config.width)
        self.positional_embedding = nn.Parameter(torch.empty(config.max_length, config.width))
        self.transformer = Transformer(config)
        self.ln_final = nn.LayerNorm(config.width, eps=config.layer_norm_eps)
        self.text_projection = nn.Parameter(torch.empty(config.width, config.projection_dim))
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))  # CLIP's initial temperature
        nn.init.normal_(self.token_embedding.weight, std=0.02)
        nn.init.normal_(self.positional_embedding, std=0.01)
        nn.init.normal_(self.text_projection, std=config.width**-0.5)

    def forward(self, input_ids: Tensor, num_blocks: int | None = None, final_norm: bool = True) -> Tensor:
        """``input_ids [B, L]`` -> the output of block ``num_blocks`` (through ``ln_final`` when
        ``final_norm``), ``[B, L, W]``."""
        length = input_ids.shape[1]
        hidden = self.transformer(self.token_embedding(input_ids) + self.positional_embedding[:length], num_blocks)
        return self.ln_final(hidden) if final_norm else hidden

    def pooled(self, hidden: Tensor, num_blocks: int, input_ids: Tensor, eot_id: int) -> Tensor:
        """CLIP's text embedding: run the blocks after ``num_blocks`` on ``hidden [B, L, W]`` (that block's
        raw output), ``ln_final``, take each row's first ``eot_id`` token and project: ``[B, projection_dim]``."""
        for block in self.transformer.resblocks[num_blocks:]:
            hidden = block(hidden)
        final = self.ln_final(hidden)
        positions = (input_ids == eot_id).int().argmax(dim=-1)  # the first end-of-text token of each row
        return final[torch.arange(final.shape[0], device=final.device), positions] @ self.text_projection


class OpenCLIPTextEncoder(_TextEncoderBase):
    """SD2's ``FrozenOpenCLIPEmbedder``: the OpenCLIP text tower under ``self.model``.

    ``forward(input_ids [B, L]) -> context [B, L, width]``. With ``layer="penultimate"`` the
    last block is skipped (it never influences the output) and ``ln_final`` is applied to the
    penultimate block's output.
    """

    def __init__(self, config: TextEncoderConfig):
        if config.kind != "openclip":
            raise ValueError(f"OpenCLIPTextEncoder needs kind='openclip', got {config.kind!r}")
        super().__init__(config)
        self.model = OpenCLIPTextTower(config)

    def token_embedding(self) -> nn.Embedding:
        return self.model.token_embedding

    def forward(self, input_ids: Tensor, clip_skip: int = 1, replacements: Sequence[Replacement] = ()) -> Tensor:
        """``input_ids [B, L]`` -> ``context [B, L, width]`` (``clip_skip``: see :func:`blocks_used`;
        ``replacements``: see :func:`replaced_token_vectors`)."""
        with replaced_token_vectors(self.token_embedding(), replacements):
            return self.model(input_ids, num_blocks=blocks_used(self.config, clip_skip),
                              final_norm=self.config.final_norm)

    def forward_with_pooled(self, input_ids: Tensor, clip_skip: int = 1,
                            replacements: Sequence[Replacement] = ()) -> tuple[Tensor, Tensor]:
        """``input_ids [B, L]`` -> ``(context [B, L, width], pooled [B, projection_dim])``: the context as
        :meth:`forward` gives it, and the projected final-LayerNorm output of the last block at each
        row's end-of-text token (the blocks up to the context's run once)."""
        blocks = blocks_used(self.config, clip_skip)
        with replaced_token_vectors(self.token_embedding(), replacements):
            raw = self.model(input_ids, num_blocks=blocks, final_norm=False)
            pooled = self.model.pooled(raw, blocks, input_ids, self.tokenizer.eot_id)
        return (raw if not self.config.final_norm else self.model.ln_final(raw)), pooled


# (row, position, vectors [n, width]): the token embeddings of row ``row`` at positions position..position+n-1
Replacement = tuple[int, int, Tensor]


@contextmanager
def replaced_token_vectors(embedding: nn.Embedding, replacements: Sequence[Replacement]) -> Iterator[None]:
    """While active, ``embedding``'s output ``[B, L, width]`` carries each replacement's vectors at its
    row and positions (a forward hook on this one module, removed on exit)."""
    if not replacements:
        yield
        return

    def put_vectors(_module: nn.Module, _inputs, output: Tensor) -> Tensor:
        output = output.clone()
        for row, position, vectors in replacements:
            output[row, position:position + vectors.shape[0]] = vectors.to(output)
        return output

    handle = embedding.register_forward_hook(put_vectors)
    try:
        yield
    finally:
        handle.remove()


def blocks_used(config: TextEncoderConfig, clip_skip: int = 1) -> int:
    """How many transformer blocks run before the final LayerNorm, for AUTOMATIC1111's "Clip skip".

    ``clip_skip=1`` is the model's own choice (the last block for SD1, the penultimate for SD2);
    each step up drops one more block from the end (``clip_skip=2`` on SD1 = the penultimate block,
    as the web UI and NovelAI-style anime models use it).
    """
    if not isinstance(clip_skip, int) or isinstance(clip_skip, bool) or clip_skip < 1:
        raise ValueError(f"clip_skip must be an integer >= 1, got {clip_skip!r}")
    blocks = config.num_layers_used - (clip_skip - 1)
    if blocks < 1:
        raise ValueError(f"clip_skip {clip_skip} would skip every block of this {config.layers}-block text encoder")
    return blocks


def build_text_encoder(config: TextEncoderConfig) -> CLIPTextEncoder | OpenCLIPTextEncoder:
    """The encoder for ``config.kind`` with freshly initialised weights."""
    if config.kind == "clip":
        return CLIPTextEncoder(config)
    return OpenCLIPTextEncoder(config)


class SDXLTextEncoder(nn.Module):
    """SDXL's conditioner (sgm ``GeneralConditioner``): text embedders whose contexts are concatenated
    along the width, and the pooled output of the last one.

    Base: ``embedders.0`` CLIP ViT-L (``kind="clip"``) and ``embedders.1`` OpenCLIP ViT-bigG
    (``kind="openclip"``), context ``[B, L, 768 + 1280]``; refiner: bigG alone, ``[B, L, 1280]``. Parameter
    names are the original checkpoint's below ``conditioner.``. Token ids come from the first embedder's
    tokenizer; each embedder gets them with its own padding (bigG pads with ``"!"``, id 0, after the
    end-of-text token, as diffusers' ``tokenizer_2``).
    """

    def __init__(self, configs: Sequence[TextEncoderConfig]):
        super().__init__()
        if not configs or configs[-1].kind != "openclip":
            raise ValueError("SDXL's last text embedder must be an OpenCLIP tower (it gives the pooled output)")
        self.configs = list(configs)
        self.embedders = nn.ModuleList(build_text_encoder(config) for config in configs)
        self.tokenizer = self.embedders[0].tokenizer
        self.textual_inversions: dict[str, Tensor] = {}

    @property
    def width(self) -> int:
        """Context channels: the sum of the embedders' widths."""
        return sum(config.width for config in self.configs)

    @property
    def pooled_dim(self) -> int:
        """Width of the pooled output (the last embedder's projection)."""
        return self.configs[-1].projection_dim

    def add_embedding(self, token: str, vectors: Tensor) -> None:
        """Textual-inversion embeddings for SDXL carry one vector set per embedder; not read yet."""
        raise ValueError(f"embedding {token!r}: textual-inversion embeddings are not supported for SDXL models yet")

    def forward(self, input_ids: Tensor, clip_skip: int = 1, replacements: Sequence[Replacement] = (), *,
                with_pooled: bool = False) -> Tensor | tuple[Tensor, Tensor]:
        """``input_ids [B, L]`` -> ``context [B, L, width]``, or ``(context, pooled [B, P])`` with ``with_pooled``
        (what training calls, through the module's own ``__call__`` as a data-parallel wrapper needs)."""
        context, pooled = self.forward_with_pooled(input_ids, clip_skip, replacements)
        return (context, pooled) if with_pooled else context

    def forward_with_pooled(self, input_ids: Tensor, clip_skip: int = 1,
                            replacements: Sequence[Replacement] = ()) -> tuple[Tensor, Tensor]:
        """``input_ids [B, L]`` (the first embedder's tokenizer) -> ``(context [B, L, width], pooled [B, P])``."""
        if replacements:
            raise ValueError("textual-inversion embeddings are not supported for SDXL models yet")
        contexts = [embedder(repadded(input_ids, self.tokenizer, embedder.tokenizer), clip_skip)
                    for embedder in self.embedders[:-1]]
        last = self.embedders[-1]
        context, pooled = last.forward_with_pooled(repadded(input_ids, self.tokenizer, last.tokenizer), clip_skip)
        return torch.cat([*contexts, context], dim=-1), pooled

    def encode(self, prompts: Sequence[str]) -> Tensor:
        """``prompts`` (B strings) -> ``context [B, max_length, width]`` on the module's device."""
        device = next(self.parameters()).device
        return self(self.tokenizer(list(prompts)).to(device))


def repadded(input_ids: Tensor, source: ClipTokenizer, target: ClipTokenizer) -> Tensor:
    """Token ids ``[B, L]`` padded by ``source`` -> the same ids with ``target``'s padding (every position
    after a row's first end-of-text token holds ``target.pad_id``)."""
    if source.pad_id == target.pad_id:
        return input_ids
    is_eot = (input_ids == source.eot_id).int()
    after_first_eot = (is_eot.cumsum(dim=-1) - is_eot) > 0
    return input_ids.masked_fill(after_first_eot, target.pad_id)
