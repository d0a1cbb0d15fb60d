"""CLIP tokenizer and text encoders against their oracles: open_clip and transformers.

Tokenizer ids must equal ``open_clip.tokenize`` / ``SimpleTokenizer`` (default ``clean="ftfy"``,
both paddings, a varied corpus and a sweep of code points) and transformers' CLIPTokenizer
(``clean="nfc"``, and any diffusers ``tokenizer/`` folder). Encoders are tiny random towers whose
outputs must match open_clip's own modules and transformers' CLIPTextModel loaded through the
diffusers key map (max abs diff < 1e-4). Full-size SD1/SD2 layouts are checked on the meta device.
"""

from __future__ import annotations

import json
import logging

import pytest
import torch
from safetensors.torch import save_file

from ldm.formats import text_keys as text_keymap
from ldm.models.text_encoders import (
    CLIPTextEncoder,
    OpenCLIPTextEncoder,
    TextEncoder,
    TextEncoderConfig,
    build_text_encoder,
)
from ldm.models.tokenizer import ClipTokenizer

TOLERANCE = 1e-4

# Prompts on which OpenAI/open_clip cleaning (ftfy) and transformers' (NFC) agree.
PROMPTS = [
    "a red bicycle",
    "",
    "A PHOTO of an Astronaut riding a horse, 4k, trending on ArtStation!!!",
    "what's up? (masterpiece:1.2) [cat|dog] {x} <y> #tag @user $5 100% a_b-c",
    "café naïve résumé Zürich — 東京タワー, Москва, 🚲🔥 ümlaut",
    "  spaces\tand\nnewlines   everywhere  ",
    "numbers 1234567 and 3.14",
    " ".join(f"word{i}" for i in range(60)),  # longer than 77 tokens: truncated
]
# Prompts where ftfy changes the text (HTML entities, curly quotes, full-width letters, ligatures).
FTFY_PROMPTS = ["fish &amp; chips", "a \u201cquoted\u201d word", "\uff26\uff35\uff2c\uff2c width", "\ufb01ne"]
# Text where cleaning or word splitting is easy to get wrong: Python's context-dependent final
# sigma, characters Python but not every regex engine treats as space, U+0345 (which the
# case-insensitive `regex` pattern drops), letters new in recent Unicode versions (U+0C5C, U+A7CE,
# U+10940), HTML entities, mojibake, combining marks, and special tokens in other spellings.
TRICKY_PROMPTS = [
    "\u039f\u0394\u039f\u03a3 \u03a3\u039f\u03a6\u039f\u03a3 \u03c2",
    "a\x00b\x1cc\x1fd\x7fe\x85f\u2028g\xa0h\u3000i\u200bj\ufeffk\u180el\x0bm\x0cn\ro",
    "\u0345\u0399 a\u0345a", "a\u0c5ca a\ua7cea \U00010940\U00010941 1\u0c5c1",
    "&lt;b&gt; &amp;amp; &#39;x&#39; &nbsp;y &#769;e", "Ã©tÃ© â€œmojibakeâ€\x9d", "e\u0301 n\u0303 \u0301x",
    "\u0130stanbul \u0131 \u1e9e \ufb00 \u01c5 \u212b", "\uff46\uff55\uff4c\uff4c \uff11\uff12",
    "\u00bd \u00b2 \u0663 \u216b \u2464 \U0001d7d9",
    "\U0001f468\u200d\U0001f469\u200d\U0001f467 \U0001f44d\U0001f3fd \U0001f3f3\ufe0f\u200d\U0001f308 \U0001f1eb\U0001f1f7",
    "I'M YOU'LL it's we've THEY'RE 's'S'''s",
    "<|ENDOFTEXT|>x <|StartOfText|>", "&lt;|endoftext|&gt;", "!!! a!b hello!",
]
# The oracle corpus: plain prompts, punctuation, numbers, scripts, lengths (truncation), spacing.
CORPUS = PROMPTS + FTFY_PROMPTS + TRICKY_PROMPTS + [
    " ", "\t\n  \n", "trailing ", " leading", "MiXeD CaSe", "C++ C# node.js me@host.com http://x.org/a?b=1&c=2",
    "(((best quality))), [[low]], {{{x}}}, (cat:1.3), <lora:x:0.5>", "1,000,000 3.14159 -42 +7 1e-5 0x1F 2024-01-01",
    "\u0627\u0644\u0639\u0631\u0628\u064a\u0629 \u05e2\u05d1\u05e8\u05d9\u05ea \u0939\u093f\u0928\u094d\u0926\u0940 \u0e44\u0e17\u0e22",
    "x" * 300, "\u65e5\u672c\u8a9e" * 40, "\U0001f525" * 100, "a, " * 80, " ".join(["supercalifragilistic"] * 30),
]


def _tiny(kind: str, **overrides) -> TextEncoderConfig:
    openclip = kind == "openclip"
    values = dict(kind=kind, vocab_size=1000, width=32, layers=3, heads=4, max_length=16, projection_dim=24,
                  act="gelu" if openclip else "quick_gelu", layer="penultimate" if openclip else "last",
                  pad="zero" if openclip else "eot")
    return TextEncoderConfig(**{**values, **overrides})


def _random_ids(cfg: TextEncoderConfig, batch: int = 3) -> torch.Tensor:
    return torch.randint(0, cfg.vocab_size, (batch, cfg.max_length), generator=torch.Generator().manual_seed(0))


def _seeded_encoder(cfg: TextEncoderConfig, seed: int = 0):
    torch.manual_seed(seed)
    encoder = build_text_encoder(cfg).eval()
    with torch.no_grad():  # LayerNorms start at (1, 0): randomise them so they are tested too
        for name, parameter in encoder.named_parameters():
            if "ln" in name or "layer_norm" in name:
                parameter.add_(0.1 * torch.randn_like(parameter))
    return encoder


def _save_diffusers_text_encoder(encoder, cfg: TextEncoderConfig, folder, **kwargs) -> None:
    """Write ``text_encoder/`` as diffusers does: transformers config.json + model.safetensors."""
    from transformers import CLIPTextConfig

    config = CLIPTextConfig(**text_keymap.diffusers_config(cfg)).to_dict()
    config["architectures"] = ["CLIPTextModel"]
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config))
    save_file(text_keymap.to_diffusers(encoder.state_dict(), cfg, **kwargs), str(folder / "model.safetensors"))


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return (a - b).abs().max().item()


# ------------------------------------------------------------------------------------------
# Tokenizer
# ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def saved_vocabulary(tmp_path_factory):
    folder = tmp_path_factory.mktemp("clip_vocab")
    ClipTokenizer().save_vocabulary(folder)
    return folder


def test_known_token_ids_and_padding():
    eot = ClipTokenizer(pad="eot")(["a red bicycle"])[0]
    zero = ClipTokenizer(pad="zero")(["a red bicycle"])[0]
    assert eot.shape == (77,) and eot.dtype == torch.long
    assert eot[:5].tolist() == [49406, 320, 736, 11652, 49407]
    assert (eot[5:] == 49407).all() and (zero[5:] == 0).all()
    assert torch.equal(eot[:5], zero[:5])
    assert ClipTokenizer().vocab_size == 49408
    assert ClipTokenizer().decode(ClipTokenizer().encode_text("A Red  bicycle!")) == "a red bicycle !"


@pytest.mark.parametrize("pad", ["zero", "eot"])
def test_matches_open_clip_on_a_varied_corpus(pad):
    import open_clip

    expected = open_clip.tokenize(CORPUS)  # zero padding; the cut keeps a final <|endoftext|>
    if pad == "eot":  # the same ids, padded with <|endoftext|> after the first one
        expected = torch.where(torch.cumsum(expected == 49407, dim=1) > 0, torch.full_like(expected, 49407), expected)
    assert torch.equal(ClipTokenizer(pad=pad)(CORPUS), expected)


def test_code_points_match_open_clip():
    """Every 7th code point up to U+31FFF in letter, digit and punctuation contexts, untruncated."""
    from open_clip.tokenizer import SimpleTokenizer

    oracle = SimpleTokenizer()
    points = [chr(c) for c in range(0, 0x32000, 7) if not 0xD800 <= c < 0xE000]
    texts = [" ".join(f"a{c}a 1{c}1 !{c}! {c}{c}" for c in points[i : i + 64]) for i in range(0, len(points), 64)]
    ours = ClipTokenizer().encode_batch(texts)
    assert [text for text, ids in zip(texts, ours) if ids != oracle.encode(text)] == []


def test_special_tokens_are_matched_verbatim_before_cleaning():
    """``<|startoftext|>`` / ``<|endoftext|>`` map to their ids as in transformers (open_clip BPEs
    them); other spellings, even ones that cleaning turns into them, stay ordinary text."""
    tokenizer = ClipTokenizer()
    assert tokenizer.encode_text("a<|endoftext|>b <|startoftext|>") == [320, 49407, 321, 49406]
    assert 49407 not in tokenizer.encode_text("<|ENDOFTEXT|> &lt;|endoftext|&gt;")


@pytest.mark.parametrize("max_length", [77, 12])
def test_eot_padding_matches_transformers_from_saved_vocabulary(saved_vocabulary, max_length):
    from transformers import CLIPTokenizer

    oracle = CLIPTokenizer.from_pretrained(str(saved_vocabulary), model_max_length=max_length)
    expected = oracle(PROMPTS, padding="max_length", truncation=True, max_length=max_length, return_tensors="pt")
    ours = ClipTokenizer(max_length=max_length, pad="eot")(PROMPTS)
    assert torch.equal(ours, expected.input_ids)
    assert torch.equal(ClipTokenizer(max_length=max_length, clean="nfc").to_transformers()(
        PROMPTS, padding="max_length", truncation=True, return_tensors="pt").input_ids, ours)
    # clean="nfc" is transformers' own normalisation, also where it differs from open_clip's
    expected = oracle(CORPUS, padding="max_length", truncation=True, max_length=max_length, return_tensors="pt")
    assert torch.equal(ClipTokenizer(max_length=max_length, clean="nfc")(CORPUS), expected.input_ids)


@pytest.mark.parametrize("pad", ["eot", "zero"])
@pytest.mark.parametrize("layout", ["tokenizer.json", "vocab+merges"])
def test_from_diffusers_folder_matches_the_folders_own_tokenizer(tmp_path, pad, layout):
    from transformers import CLIPTokenizer

    source = ClipTokenizer(pad=pad)
    if layout == "tokenizer.json":  # what transformers 5 writes
        source.to_transformers().save_pretrained(str(tmp_path / "tokenizer"))
    else:  # what published SD folders hold
        source.save_pretrained(tmp_path / "tokenizer")
    oracle = CLIPTokenizer.from_pretrained(str(tmp_path / "tokenizer"))
    ours = ClipTokenizer.from_diffusers_folder(tmp_path)  # the pipeline folder is accepted too
    assert (ours.pad, ours.max_length, ours.pad_id) == (pad, 77, oracle.pad_token_id)
    prompts = PROMPTS + FTFY_PROMPTS + ["Hi!! <|endoftext|> <|ENDOFTEXT|>x"]
    expected = oracle(prompts, padding="max_length", truncation=True, return_tensors="pt").input_ids
    assert torch.equal(ours(prompts), expected)


def test_truncation_keeps_final_eot_and_warns_once(caplog):
    tokenizer = ClipTokenizer(max_length=8)
    with caplog.at_level(logging.WARNING, logger="ldm.models.tokenizer"):
        ids = tokenizer(["one two three four five six seven eight nine", "short", "a b c d e f g"])
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    message = warnings[0].getMessage()
    assert "2 of 3" in message and "seven eight nine" in message and "'g'" in message
    assert ids[:, 0].eq(49406).all()
    assert ids[0, -1] == 49407 and ids[2, -1] == 49407
    assert tokenizer.decode(ids[0, 1:-1]) == "one two three four five six"
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="ldm.models.tokenizer"):
        tokenizer(["short"])
    assert not caplog.records


# ------------------------------------------------------------------------------------------
# Config
# ------------------------------------------------------------------------------------------


def test_config_round_trip_presets_and_unknown_key():
    for cfg in (TextEncoderConfig.sd1(), TextEncoderConfig.sd2(), _tiny("openclip")):
        assert TextEncoderConfig.from_dict(cfg.to_dict()) == cfg
    sd1, sd2 = TextEncoderConfig.sd1(), TextEncoderConfig.sd2()
    assert (sd1.kind, sd1.width, sd1.layers, sd1.heads, sd1.act, sd1.layer, sd1.pad) == (
        "clip", 768, 12, 12, "quick_gelu", "last", "eot")
    assert (sd2.kind, sd2.width, sd2.layers, sd2.heads, sd2.act, sd2.layer, sd2.pad, sd2.projection_dim) == (
        "openclip", 1024, 24, 16, "gelu", "penultimate", "zero", 1024)
    with pytest.raises(ValueError, match="widht"):
        TextEncoderConfig.from_dict({"widht": 3})
    with pytest.raises(ValueError, match="act"):
        TextEncoderConfig(act="relu")


# ------------------------------------------------------------------------------------------
# Encoders vs oracles
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("layer", ["last", "penultimate"])
def test_clip_kind_matches_transformers_clip_text_model(tmp_path, layer):
    from transformers import CLIPTextModel

    cfg = _tiny("clip", layer=layer)
    ours = _seeded_encoder(cfg)
    _save_diffusers_text_encoder(ours, cfg, tmp_path)
    oracle = CLIPTextModel.from_pretrained(str(tmp_path)).eval()
    ids = _random_ids(cfg)
    with torch.no_grad():
        out = oracle(input_ids=ids, output_hidden_states=True)
        # diffusers' clip_skip: final LayerNorm applied to the penultimate block's output
        expected = out.last_hidden_state if layer == "last" else oracle.final_layer_norm(out.hidden_states[-2])
        diff = _max_diff(ours(ids), expected)
    assert diff < TOLERANCE
    assert isinstance(ours, CLIPTextEncoder) and isinstance(ours, TextEncoder)
    if layer == "last":
        assert text_keymap.config_from_diffusers(json.loads((tmp_path / "config.json").read_text())) == cfg


def _open_clip_tower(cfg: TextEncoderConfig):
    import open_clip.transformer as oct
    from torch import nn

    return oct.TextTransformer(
        context_length=cfg.max_length, vocab_size=cfg.vocab_size, width=cfg.width, heads=cfg.heads,
        layers=cfg.layers, mlp_ratio=cfg.mlp_ratio, output_dim=cfg.projection_dim,
        act_layer=oct.QuickGELU if cfg.act == "quick_gelu" else nn.GELU,
    ).eval()


def _open_clip_context(tower, ids: torch.Tensor, num_blocks: int) -> torch.Tensor:
    """SD2's FrozenOpenCLIPEmbedder.encode_with_transformer, through open_clip's own modules."""
    x = tower.token_embedding(ids) + tower.positional_embedding
    batch_first = getattr(tower.transformer, "batch_first", False)
    x = x if batch_first else x.permute(1, 0, 2)  # older open_clip runs blocks as [L, B, W]
    for block in tower.transformer.resblocks[:num_blocks]:
        x = block(x, attn_mask=tower.attn_mask)
    x = x if batch_first else x.permute(1, 0, 2)
    return tower.ln_final(x)


@pytest.mark.parametrize("act,layer", [("gelu", "penultimate"), ("gelu", "last"), ("quick_gelu", "penultimate")])
def test_openclip_kind_matches_open_clip(act, layer):
    cfg = _tiny("openclip", act=act, layer=layer)
    ours = _seeded_encoder(cfg)
    tower = _open_clip_tower(cfg)
    weights = {k[len("model."):]: v for k, v in ours.state_dict().items() if k != "model.logit_scale"}
    tower.load_state_dict(weights, strict=True)  # same names, same shapes
    ids = _random_ids(cfg)
    with torch.no_grad():
        diff = _max_diff(ours(ids), _open_clip_context(tower, ids, cfg.num_layers_used))
    assert diff < TOLERANCE
    assert isinstance(ours, OpenCLIPTextEncoder) and isinstance(ours, TextEncoder)


def test_openclip_kind_matches_its_diffusers_export_and_loads_back_as_clip(tmp_path):
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    cfg = _tiny("openclip")
    ours = _seeded_encoder(cfg)
    ids = _random_ids(cfg)
    _save_diffusers_text_encoder(ours, cfg, tmp_path)
    oracle = CLIPTextModel.from_pretrained(str(tmp_path)).eval()
    assert oracle.config.num_hidden_layers == cfg.layers - 1 and oracle.config.hidden_act == "gelu"

    # the folder read back: a 2-layer gelu CLIP tower, last layer, zero padding (SD2 in diffusers)
    loaded_cfg = text_keymap.config_from_diffusers(json.loads((tmp_path / "config.json").read_text()))
    assert (loaded_cfg.kind, loaded_cfg.act, loaded_cfg.layer, loaded_cfg.pad, loaded_cfg.layers) == (
        "clip", "gelu", "last", "zero", cfg.layers - 1)
    from safetensors.torch import load_file

    reloaded = build_text_encoder(loaded_cfg).eval()
    reloaded.load_state_dict(text_keymap.from_diffusers(load_file(str(tmp_path / "model.safetensors")), loaded_cfg))

    with torch.no_grad():
        context = ours(ids)
        diff_oracle = _max_diff(context, oracle(input_ids=ids).last_hidden_state)
        diff_reloaded = _max_diff(context, reloaded(ids))
    assert diff_oracle < TOLERANCE and diff_reloaded < TOLERANCE

    # with_projection: text_projection is transposed into a Linear weight
    exported = text_keymap.to_diffusers(ours.state_dict(), cfg, with_projection=True)
    with_projection = CLIPTextModelWithProjection(oracle.config).eval()
    names = with_projection.state_dict().keys()  # transformers 4 and 5 name these differently
    with_projection.load_state_dict({k if k in names else k.removeprefix("text_model."): v
                                     for k, v in exported.items()}, strict=True)
    with torch.no_grad():
        projected = with_projection(input_ids=ids).last_hidden_state @ with_projection.text_projection.weight.T
        assert _max_diff(projected, context @ ours.model.text_projection) < TOLERANCE

    # back to our layout: everything but the unused last block and logit_scale, bit for bit
    back = text_keymap.from_diffusers(exported, cfg)
    expected = {k: v for k, v in ours.state_dict().items()
                if k != "model.logit_scale" and not k.startswith(f"model.transformer.resblocks.{cfg.layers - 1}.")}
    assert back.keys() == expected.keys()
    assert all(torch.equal(back[k], expected[k]) for k in expected)


def test_clip_key_maps_are_exact_inverses_and_reject_unknown_keys():
    cfg = _tiny("clip")
    state = _seeded_encoder(cfg).state_dict()
    exported = text_keymap.to_diffusers(state, cfg)
    assert all(k.startswith("text_model.") for k in exported)
    back = text_keymap.from_diffusers(exported, cfg)
    assert back.keys() == state.keys() and all(torch.equal(back[k], state[k]) for k in state)
    # transformers 5 writes keys without "text_model."
    unprefixed = {k.removeprefix("text_model."): v for k, v in exported.items()}
    assert text_keymap.from_diffusers(unprefixed, cfg).keys() == state.keys()
    with pytest.raises(ValueError, match="not_a_key"):
        text_keymap.to_diffusers({**state, "not_a_key": torch.zeros(1)}, cfg)
    with pytest.raises(ValueError, match="not_a_key"):
        text_keymap.from_diffusers({**exported, "text_projection.weight": torch.zeros(1), "not_a_key": torch.zeros(1)},
                                   _tiny("openclip"))


def test_encode_uses_a_tokenizer_with_the_configs_padding():
    for kind in ("clip", "openclip"):
        cfg = _tiny(kind, vocab_size=49408, max_length=77)
        encoder = _seeded_encoder(cfg)
        assert encoder.tokenizer.pad == cfg.pad and encoder.tokenizer.max_length == 77
        with torch.no_grad():
            context = encoder.encode(["a red bicycle", "two"])
            assert context.shape == (2, 77, cfg.width)
            assert torch.equal(context, encoder(encoder.tokenizer(["a red bicycle", "two"])))


def test_sd1_checkpoint_position_ids_are_accepted():
    cfg = _tiny("clip")
    encoder = build_text_encoder(cfg)
    state = encoder.state_dict()
    assert "transformer.text_model.embeddings.position_ids" not in state  # not persistent
    state["transformer.text_model.embeddings.position_ids"] = torch.arange(cfg.max_length)[None]
    encoder.load_state_dict(state, strict=True)


# ------------------------------------------------------------------------------------------
# Full-size layouts (meta device: no memory, no compute)
# ------------------------------------------------------------------------------------------


def _sd1_layout() -> dict[str, tuple[int, ...]]:
    """``cond_stage_model.*`` of an SD 1.x checkpoint, prefix removed."""
    p = "transformer.text_model."
    layout = {p + "embeddings.token_embedding.weight": (49408, 768),
              p + "embeddings.position_embedding.weight": (77, 768),
              p + "final_layer_norm.weight": (768,), p + "final_layer_norm.bias": (768,)}
    for i in range(12):
        b = f"{p}encoder.layers.{i}."
        for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
            layout[f"{b}self_attn.{proj}.weight"] = (768, 768)
            layout[f"{b}self_attn.{proj}.bias"] = (768,)
        for norm in ("layer_norm1", "layer_norm2"):
            layout[f"{b}{norm}.weight"] = layout[f"{b}{norm}.bias"] = (768,)
        layout.update({f"{b}mlp.fc1.weight": (3072, 768), f"{b}mlp.fc1.bias": (3072,),
                       f"{b}mlp.fc2.weight": (768, 3072), f"{b}mlp.fc2.bias": (768,)})
    return layout


def _sd2_layout() -> dict[str, tuple[int, ...]]:
    """``cond_stage_model.*`` of an SD 2.x checkpoint, prefix removed."""
    layout = {"model.token_embedding.weight": (49408, 1024), "model.positional_embedding": (77, 1024),
              "model.ln_final.weight": (1024,), "model.ln_final.bias": (1024,),
              "model.text_projection": (1024, 1024), "model.logit_scale": ()}
    for i in range(24):
        b = f"model.transformer.resblocks.{i}."
        layout.update({f"{b}attn.in_proj_weight": (3072, 1024), f"{b}attn.in_proj_bias": (3072,),
                       f"{b}attn.out_proj.weight": (1024, 1024), f"{b}attn.out_proj.bias": (1024,),
                       f"{b}mlp.c_fc.weight": (4096, 1024), f"{b}mlp.c_fc.bias": (4096,),
                       f"{b}mlp.c_proj.weight": (1024, 4096), f"{b}mlp.c_proj.bias": (1024,)})
        for norm in ("ln_1", "ln_2"):
            layout[f"{b}{norm}.weight"] = layout[f"{b}{norm}.bias"] = (1024,)
    return layout


@pytest.mark.parametrize("preset,layout", [(TextEncoderConfig.sd1, _sd1_layout), (TextEncoderConfig.sd2, _sd2_layout)])
def test_full_size_layout_equals_the_checkpoint(preset, layout):
    cfg = preset()
    with torch.device("meta"):
        encoder = build_text_encoder(cfg)
        context = encoder(torch.zeros(2, 77, dtype=torch.long))
    shapes = {k: tuple(v.shape) for k, v in encoder.state_dict().items()}
    assert shapes == layout()
    assert context.shape == (2, 77, cfg.width)
    # the diffusers export of SD2 has 23 blocks, like stabilityai/stable-diffusion-2's text_encoder
    exported = text_keymap.to_diffusers(encoder.state_dict(), cfg)
    layers = {int(k.split(".")[3]) for k in exported if k.startswith("text_model.encoder.layers.")}
    assert len(layers) == (23 if cfg.kind == "openclip" else 12)
    if cfg.kind == "openclip":
        assert exported["text_model.encoder.layers.22.self_attn.q_proj.weight"].shape == (1024, 1024)
