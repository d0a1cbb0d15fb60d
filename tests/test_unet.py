"""U-Net tests: equivalence with diffusers.UNet2DConditionModel through the key map (same random
weights), full SD1/SD2 layouts on the meta device, attention against a naive softmax, configs,
gradient checkpointing."""

from __future__ import annotations

import math

import pytest
import torch

from ldm.models import attention as attention_module
from ldm.models.attention import attention, available_backends, use_attention_backend
from ldm.formats.compvis import unet_config_from_compvis
from ldm.formats.unet_keys import config_from_diffusers, diffusers_config, from_diffusers, to_diffusers
from ldm.models.unet import UNetConfig, UNetModel, timestep_embedding

diffusers = pytest.importorskip("diffusers")

# model.params.unet_config.params of the CompVis YAMLs.
SD1_PARAMS = {  # configs/stable-diffusion/v1-inference.yaml
    "image_size": 32, "in_channels": 4, "out_channels": 4, "model_channels": 320,
    "attention_resolutions": [4, 2, 1], "num_res_blocks": 2, "channel_mult": [1, 2, 4, 4],
    "num_heads": 8, "use_spatial_transformer": True, "transformer_depth": 1, "context_dim": 768,
    "use_checkpoint": True, "legacy": False,
}
SD2_PARAMS = {  # configs/stable-diffusion/v2-inference-v.yaml
    "use_checkpoint": True, "use_fp16": True, "image_size": 32, "in_channels": 4, "out_channels": 4,
    "model_channels": 320, "attention_resolutions": [4, 2, 1], "num_res_blocks": 2,
    "channel_mult": [1, 2, 4, 4], "num_head_channels": 64, "use_spatial_transformer": True,
    "use_linear_in_transformer": True, "transformer_depth": 1, "context_dim": 1024, "legacy": False,
}
X4_PARAMS = {  # configs/stable-diffusion/x4-upscaling.yaml (the SD 2 x4 upscaler)
    "use_checkpoint": True, "num_classes": 1000, "image_size": 128, "in_channels": 7, "out_channels": 4,
    "model_channels": 256, "attention_resolutions": [2, 4, 8], "num_res_blocks": 2, "channel_mult": [1, 2, 2, 4],
    "disable_self_attentions": [True, True, True, False], "disable_middle_self_attn": False, "num_heads": 8,
    "use_spatial_transformer": True, "transformer_depth": 1, "context_dim": 1024, "legacy": False,
    "use_linear_in_transformer": True,
}

# Tiny SD1 style: conv proj_in/out, a fixed head count, no attention at full resolution.
TINY_SD1 = UNetConfig(model_channels=32, channel_mult=(1, 2), attention_resolutions=(2,), num_heads=2,
                      context_dim=16, norm_groups=8)
# Tiny SD2 style: linear proj, fixed head size (so head counts differ per level: 4, 8, 8),
# upcast attention, depth-2 transformers, no attention at the last level.
TINY_SD2 = UNetConfig(model_channels=32, channel_mult=(1, 2, 2), num_res_blocks=1, attention_resolutions=(1, 2),
                      num_heads=-1, num_head_channels=8, context_dim=24, transformer_depth=2,
                      use_linear_in_transformer=True, upcast_attention=True, norm_groups=8)
# Tiny x4-upscaler style: 7 input channels (latents + low-resolution RGB), a noise-level label embedding,
# and the first attention of each block turned into cross-attention on the levels that say so.
TINY_X4 = UNetConfig(in_channels=7, model_channels=32, channel_mult=(1, 2, 2), num_res_blocks=1,
                     attention_resolutions=(2, 4), num_heads=4, context_dim=24, use_linear_in_transformer=True,
                     norm_groups=8, num_classes=1000, disable_self_attentions=(True, True, False))
TINY_CONFIGS = [TINY_SD1, TINY_SD2, TINY_X4]
TINY_IDS = ["sd1-style", "sd2-style", "x4-style"]


@pytest.fixture(autouse=True, scope="module")
def _single_thread():
    """Tiny models: one intra-op thread avoids OpenMP oversubscription on a busy 2-core machine
    (measured: a tiny forward takes ~0.05 s with 1 thread, up to ~12 s with 2 under load)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def _randomize(model: torch.nn.Module, seed: int = 0) -> None:
    """Non-zero random weights everywhere (the zero-initialised convs would hide mistakes)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=generator) * 0.2)


def naive_attention(q, k, v, num_heads):
    """softmax(q k^T / sqrt(D)) v per head, written out; [B, L, H*D] in and out."""
    b, lq, width = q.shape
    d = width // num_heads
    split = lambda x: x.reshape(b, x.shape[1], num_heads, d).transpose(1, 2)  # noqa: E731
    weights = torch.softmax(split(q) @ split(k).transpose(-1, -2) / math.sqrt(d), dim=-1)
    return (weights @ split(v)).transpose(1, 2).reshape(b, lq, width)


# ---------------------------------------------------------------------------------------------
# attention()
# ---------------------------------------------------------------------------------------------


def test_attention_matches_naive_softmax_fp32():
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(2, n, 4 * 8, generator=g) for n in (9, 5, 5))
    out = attention(q, k, v, num_heads=4)
    assert out.shape == (2, 9, 32)
    assert (out - naive_attention(q, k, v, 4)).abs().max() < 1e-5
    assert (attention(q, k, v, num_heads=4, upcast=True) - naive_attention(q, k, v, 4)).abs().max() < 1e-5


def test_attention_upcast_computes_in_fp32_and_casts_back():
    g = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(1, n, 2 * 16, generator=g).to(torch.bfloat16) for n in (6, 7, 7))
    reference = naive_attention(q.float(), k.float(), v.float(), 2)
    upcast = attention(q, k, v, num_heads=2, upcast=True)
    assert upcast.dtype == torch.bfloat16
    # Only the final rounding to bf16 separates it from the fp32 reference (half an ulp: 2**-9 rel.).
    assert ((upcast.float() - reference).abs() <= reference.abs() * 2**-8 + 1e-6).all()


def test_attention_rejects_width_not_divisible_by_heads():
    x = torch.randn(1, 3, 10)
    with pytest.raises(ValueError, match="num_heads"):
        attention(x, x, x, num_heads=3)


def test_attention_uses_sdpa_on_cpu_even_with_xformers(monkeypatch):
    calls = []

    class FakeXformersOps:
        @staticmethod
        def memory_efficient_attention(q, k, v):
            calls.append(q.shape)
            raise AssertionError("xformers must not run on CPU tensors")

    monkeypatch.setattr(attention_module, "_xformers_ops", lambda: FakeXformersOps)
    x = torch.randn(1, 4, 8)
    assert (attention(x, x, x, num_heads=2) - naive_attention(x, x, x, 2)).abs().max() < 1e-5
    assert calls == []


# ---------------------------------------------------------------------------------------------
# equivalence with diffusers
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("config", TINY_CONFIGS, ids=TINY_IDS)
def test_forward_matches_diffusers(config):
    ours = UNetModel(config).eval()
    _randomize(ours)
    theirs = diffusers.UNet2DConditionModel(**diffusers_config(config)).eval()
    theirs.load_state_dict(to_diffusers(ours.state_dict(), config), strict=True)

    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, config.in_channels, 16, 16, generator=g)
    t = torch.tensor([3.7, 811.25])  # fractional timesteps
    context = torch.randn(2, 7, config.context_dim, generator=g)
    labels = torch.tensor([20, 349]) if config.num_classes else None
    with torch.no_grad():
        expected = theirs(x, t, encoder_hidden_states=context, class_labels=labels).sample
        actual = ours(x, t, context, class_labels=labels)
    assert actual.shape == (2, 4, 16, 16)
    assert expected.abs().max() > 0.1  # a meaningful output, not zeros
    assert (actual - expected).abs().max() < 1e-4


@pytest.mark.parametrize("config", TINY_CONFIGS, ids=TINY_IDS)
def test_diffusers_config_round_trip(config):
    kwargs = diffusers_config(config)
    assert config_from_diffusers(kwargs) == config
    model_config = dict(diffusers.UNet2DConditionModel(**kwargs).config)  # as saved in config.json
    assert config_from_diffusers(model_config) == config


def test_diffusers_attention_head_dim_trap():
    """diffusers' attention_head_dim is the number of heads: 8 for SD1, per level for SD2."""
    assert diffusers_config(unet_config_from_compvis(SD1_PARAMS))["attention_head_dim"] == 8
    assert diffusers_config(unet_config_from_compvis(SD2_PARAMS))["attention_head_dim"] == (5, 10, 20, 20)
    sd2 = config_from_diffusers({"block_out_channels": [320, 640, 1280, 1280], "attention_head_dim": [5, 10, 20, 20],
                                 "cross_attention_dim": 1024, "use_linear_projection": True})
    assert (sd2.num_heads, sd2.num_head_channels) == (-1, 64)


def test_config_from_diffusers_rejects_unsupported_features():
    with pytest.raises(ValueError, match="class_embed_type"):
        config_from_diffusers({**diffusers_config(TINY_SD1), "class_embed_type": "timestep"})
    with pytest.raises(ValueError, match="SimpleCrossAttnDownBlock2D"):
        config_from_diffusers({**diffusers_config(TINY_SD1),
                               "down_block_types": ["DownBlock2D", "SimpleCrossAttnDownBlock2D"]})


@pytest.mark.parametrize("params, expected_count", [(SD1_PARAMS, 859_520_964), (SD2_PARAMS, 865_910_724),
                                                   (X4_PARAMS, 473_398_020)],
                         ids=["sd1", "sd2", "x4-upscaler"])
def test_full_layout_keys_map_one_to_one(params, expected_count):
    config = unet_config_from_compvis(params)
    assert sum(check_full_layout_maps_one_to_one(config).values()) == expected_count


def check_full_layout_maps_one_to_one(config: UNetConfig) -> dict[str, int]:
    """Build ``config`` on the meta device, ours and diffusers'; assert the key maps carry every name and shape
    across both ways and diffusers' config reads back; return our parameter counts by name."""
    with torch.device("meta"):
        ours = UNetModel(config)
        theirs = diffusers.UNet2DConditionModel(**diffusers_config(config))
    ours_shapes = {k: v.shape for k, v in ours.state_dict().items()}
    theirs_shapes = {k: v.shape for k, v in theirs.state_dict().items()}

    assert {k: v.shape for k, v in to_diffusers(ours.state_dict(), config).items()} == theirs_shapes
    assert {k: v.shape for k, v in from_diffusers(theirs.state_dict(), config).items()} == ours_shapes
    assert len(ours_shapes) == len(theirs_shapes)
    assert sum(p.numel() for p in ours.parameters()) == sum(p.numel() for p in theirs.parameters())
    assert config_from_diffusers(dict(theirs.config)) == config
    return {name: p.numel() for name, p in ours.named_parameters()}


def test_full_sd1_original_checkpoint_names():
    """Spot checks against names in the original v1-5 checkpoint (686 U-Net tensors)."""
    with torch.device("meta"):
        keys = UNetModel(unet_config_from_compvis(SD1_PARAMS)).state_dict().keys()
    assert len(keys) == 686
    for name in ("time_embed.2.weight", "input_blocks.0.0.weight", "input_blocks.3.0.op.weight",
                 "input_blocks.4.0.skip_connection.weight", "input_blocks.4.1.proj_in.weight",
                 "input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight",
                 "input_blocks.1.1.transformer_blocks.0.ff.net.0.proj.weight",
                 "input_blocks.1.1.transformer_blocks.0.attn1.to_out.0.bias",
                 "middle_block.1.transformer_blocks.0.norm3.weight", "middle_block.2.out_layers.3.weight",
                 "output_blocks.2.1.conv.weight", "output_blocks.5.2.conv.weight", "output_blocks.8.2.conv.weight",
                 "output_blocks.11.1.proj_out.weight", "out.0.weight", "out.2.bias"):
        assert name in keys, name


def test_key_maps_are_exact_inverses():
    state = UNetModel(TINY_SD2).state_dict()
    mapped = to_diffusers(state, TINY_SD2)
    back = from_diffusers(mapped, TINY_SD2)
    assert list(back) == list(state)
    assert all(back[k] is state[k] for k in state)
    with pytest.raises(ValueError, match="no U-Net module"):
        to_diffusers({"nonsense.weight": torch.zeros(1)}, TINY_SD2)


# ---------------------------------------------------------------------------------------------
# configs and the model itself
# ---------------------------------------------------------------------------------------------


def test_config_dict_round_trip_and_unknown_keys():
    assert UNetConfig.from_dict(TINY_SD2.to_dict()) == TINY_SD2
    with pytest.raises(ValueError, match="attn_heads"):
        UNetConfig.from_dict({**TINY_SD1.to_dict(), "attn_heads": 4})


def test_from_compvis_reads_yaml_params():
    sd1, sd2 = unet_config_from_compvis(SD1_PARAMS), unet_config_from_compvis(SD2_PARAMS)
    assert sd1 == UNetConfig()
    assert (sd2.num_heads, sd2.num_head_channels) == (-1, 64)
    assert (sd2.context_dim, sd2.use_linear_in_transformer) == (1024, True)
    x4 = unet_config_from_compvis(X4_PARAMS)
    assert (x4.in_channels, x4.num_classes, x4.disable_self_attentions) == (7, 1000, (True, True, True, False))
    with pytest.raises(ValueError, match="num_classes"):
        unet_config_from_compvis({**SD2_PARAMS, "num_classes": "sequential"})  # SDXL's vector conditioning
    with pytest.raises(ValueError, match="use_scale_shift_norm"):
        unet_config_from_compvis({**SD1_PARAMS, "use_scale_shift_norm": True})
    with pytest.raises(ValueError, match="mystery_option"):
        unet_config_from_compvis({**SD1_PARAMS, "mystery_option": 1})


def test_config_rejects_inconsistent_values():
    with pytest.raises(ValueError, match="attention_resolutions"):
        UNetConfig(channel_mult=(1, 2), attention_resolutions=(4,))
    with pytest.raises(ValueError, match="heads"):
        UNetConfig(model_channels=32, channel_mult=(1,), attention_resolutions=(1,), num_heads=3, norm_groups=8)


def test_timestep_embedding_is_cos_then_sin():
    t = torch.tensor([0.0, 2.5])
    emb = timestep_embedding(t, 8)
    freqs = 10_000 ** (-torch.arange(4) / 4)
    assert torch.allclose(emb[1], torch.cat([torch.cos(2.5 * freqs), torch.sin(2.5 * freqs)]))
    assert torch.equal(emb[0], torch.tensor([1.0] * 4 + [0.0] * 4))


def test_small_model_runs_and_checks_spatial_size():
    model = UNetModel(TINY_SD1)
    out = model(torch.randn(1, 4, 8, 8), torch.tensor(10.0), torch.randn(1, 3, 16))  # scalar t broadcasts
    assert out.shape == (1, 4, 8, 8)
    with pytest.raises(ValueError, match="divisible"):
        model(torch.randn(1, 4, 9, 8), torch.tensor([1.0]), torch.randn(1, 3, 16))


def test_gradient_checkpointing_gives_same_gradients():
    model = UNetModel(TINY_SD2).train()
    _randomize(model, seed=4)
    g = torch.Generator().manual_seed(5)
    x, context = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 3, 24, generator=g)
    t = torch.tensor([10.5, 500.0])
    calls = []
    model.input_blocks[1][0].in_layers.register_forward_hook(lambda *_: calls.append(1))

    def gradients():
        model.zero_grad()
        model(x, t, context).square().mean().backward()
        return {name: p.grad.clone() for name, p in model.named_parameters()}

    plain = gradients()
    assert len(calls) == 1
    model.set_gradient_checkpointing(True)
    checkpointed = gradients()
    assert len(calls) == 3  # forward + recomputation in backward: checkpointing really ran
    for name, grad in plain.items():
        assert (grad - checkpointed[name]).abs().max() < 1e-6, name


def test_attention_backend_can_be_forced():
    q, k, v = (torch.randn(2, 5, 8) for _ in range(3))
    with use_attention_backend("sdpa"):
        forced = attention(q, k, v, num_heads=2)
    torch.testing.assert_close(forced, attention(q, k, v, num_heads=2))
    assert "sdpa" in available_backends()
    if "xformers" not in available_backends():
        with use_attention_backend("xformers"), pytest.raises(RuntimeError, match="xformers"):
            attention(q, k, v, num_heads=2)
    with pytest.raises(ValueError, match="unknown attention backend"):
        with use_attention_backend("flash"):
            pass
