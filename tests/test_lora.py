"""LoRA: zero-init identity, save/load round trip, merge equivalence, scales, several files, diffusers oracle."""

from __future__ import annotations

import copy

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from conftest import tiny_pipeline
from ldm.formats import lora
from ldm.errors import CheckpointError, ConfigError

pytest.importorskip("peft")


@pytest.fixture(scope="module")
def base():
    return tiny_pipeline()


@pytest.fixture
def pipe(base):
    return copy.deepcopy(base)


@torch.no_grad()
def run(pipe) -> torch.Tensor:
    """One U-Net call on fixed inputs, conditioned through the text encoder: ``[2, 4, 16, 16]``."""
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 16, 16, generator=generator)
    t = torch.tensor([10, 700])
    context = pipe.text_encoder.encode(["a red bicycle", "a blue square"])
    return pipe.unet(x, t, context)


@torch.no_grad()
def perturb(module: torch.nn.Module, seed: int) -> None:
    """Give the adapters random values (as after training)."""
    generator = torch.Generator().manual_seed(seed)
    for parameter in lora.lora_parameters(module):
        parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.2)


def trained_lora_file(base, path, *, rank=4, alpha=2.0, seed=1, text=True, targets=lora.UNET_TARGETS):
    """A saved LoRA with random adapter values; returns the file path."""
    pipe = copy.deepcopy(base)
    lora.add_lora(pipe.unet, rank, alpha, targets)
    perturb(pipe.unet, seed)
    if text:
        lora.add_lora(pipe.text_encoder, rank, alpha, lora.TEXT_ENCODER_TARGETS)
        perturb(pipe.text_encoder, seed + 100)
    lora.save_lora(path, unet=pipe.unet, text_encoder=pipe.text_encoder if text else None,
                   metadata={"base_model": "tiny"})
    return path


@torch.no_grad()
def apply_by_hand(pipe, files_and_scales) -> None:
    """Oracle: W += scale * alpha / r * up @ down for every entry of every file (kohya semantics)."""
    from ldm.formats.lora import layer_lookup_table

    table = layer_lookup_table({"unet": pipe.unet, "text_encoder": pipe.text_encoder})
    modules = {"unet": pipe.unet, "text_encoder": pipe.text_encoder}
    for path, scale in files_and_scales:
        tensors = load_file(str(path))
        for key in tensors:
            if not key.endswith(".lora_down.weight"):
                continue
            name = key[: -len(".lora_down.weight")]
            down, up = tensors[key], tensors[f"{name}.lora_up.weight"]
            alpha = float(tensors[f"{name}.alpha"])
            component, module_path = table[name]
            weight = modules[component].get_submodule(module_path).weight
            weight += (scale * alpha / down.shape[0] * (up.flatten(1) @ down.flatten(1))).reshape(weight.shape)


# --------------------------------------------------------------------------------------------
# training side
# --------------------------------------------------------------------------------------------


def test_zero_initialised_adapter_leaves_the_output_unchanged_and_trains_only_lora(base, pipe):
    expected = run(base)
    unet_layers = lora.add_lora(pipe.unet, rank=4, alpha=4)
    text_layers = lora.add_lora(pipe.text_encoder, rank=4, targets=lora.TEXT_ENCODER_TARGETS)
    assert len(unet_layers) == 14 * 4  # 7 transformer blocks x (self + cross attention) x 4 projections
    assert all(n.endswith(("to_q", "to_k", "to_v", "to_out.0")) for n in unet_layers)
    assert len(text_layers) == 2 * 4
    assert torch.equal(run(pipe), expected)
    trainable = [n for n, p in pipe.unet.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    assert len(lora.lora_parameters(pipe.unet)) == len(trainable) == 2 * len(unet_layers)
    # a gradient reaches the adapters (up = lora_B gets one even at zero init)
    x = torch.randn(1, 4, 16, 16)
    pipe.unet(x, torch.tensor([5]), torch.randn(1, 77, 32)).square().mean().backward()
    assert all(p.grad is not None for n, p in pipe.unet.named_parameters() if ".lora_B." in n)
    assert any(p.grad.abs().sum() > 0 for n, p in pipe.unet.named_parameters() if ".lora_B." in n)


def test_saved_file_is_small_kohya_format_with_metadata(base, tmp_path):
    path = trained_lora_file(base, tmp_path / "a.safetensors")
    tensors = load_file(str(path))
    key = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
    assert tensors[f"{key}.lora_down.weight"].shape == (4, 32)
    assert tensors[f"{key}.lora_up.weight"].shape == (32, 4)
    assert float(tensors[f"{key}.alpha"]) == 2.0
    assert "lora_te_text_model_encoder_layers_1_self_attn_out_proj.lora_up.weight" in tensors
    assert len(tensors) == 3 * (14 * 4 + 2 * 4)
    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata()
    assert metadata["ss_network_dim"] == "4" and metadata["ss_network_alpha"] == "2"
    assert metadata["base_model"] == "tiny" and metadata["ldm_lora_format"] == "kohya-lora"
    unet_numel = sum(p.numel() for p in base.unet.parameters())
    assert sum(t.numel() for t in tensors.values()) < 0.2 * unet_numel


# --------------------------------------------------------------------------------------------
# inference side
# --------------------------------------------------------------------------------------------


def test_save_then_load_gives_bitwise_the_same_output(base, tmp_path):
    trained = copy.deepcopy(base)
    lora.add_lora(trained.unet, 4, 2.0)
    lora.add_lora(trained.text_encoder, 4, 2.0, lora.TEXT_ENCODER_TARGETS)
    perturb(trained.unet, 1)
    perturb(trained.text_encoder, 101)
    lora.save_lora(tmp_path / "a.safetensors", unet=trained.unet, text_encoder=trained.text_encoder)
    loaded = copy.deepcopy(base)
    lora.load_lora(loaded, tmp_path / "a.safetensors")
    expected = run(trained)
    assert not torch.equal(expected, run(base))
    assert torch.equal(run(loaded), expected)


def test_loaded_lora_equals_the_kohya_formula_and_merging_keeps_the_output(base, pipe, tmp_path):
    path = trained_lora_file(base, tmp_path / "a.safetensors")
    lora.load_lora(pipe, path, scale=0.6)
    adapted = run(pipe)
    oracle = copy.deepcopy(base)
    apply_by_hand(oracle, [(path, 0.6)])
    assert (adapted - run(oracle)).abs().max() < 1e-5
    lora.merge_lora(pipe)
    assert (run(pipe) - adapted).abs().max() < 1e-5
    assert list(pipe.unet.state_dict()) == list(base.unet.state_dict())  # plain layers and names again
    assert list(pipe.text_encoder.state_dict()) == list(base.text_encoder.state_dict())
    for key, weight in oracle.unet.state_dict().items():
        assert (pipe.unet.state_dict()[key] - weight).abs().max() < 1e-6, key


def test_scale_zero_equals_the_base_model_and_unload_restores_it(base, pipe, tmp_path):
    path = trained_lora_file(base, tmp_path / "a.safetensors")
    name = lora.load_lora(pipe, path, scale=0.0)
    assert torch.equal(run(pipe), run(base))
    lora.set_lora_scale(pipe, name, 1.0)
    assert not torch.equal(run(pipe), run(base))
    lora.unload_lora(pipe)
    assert torch.equal(run(pipe), run(base))
    assert list(pipe.unet.state_dict()) == list(base.unet.state_dict())


def test_two_loras_with_scales_add_up(base, pipe, tmp_path):
    first = trained_lora_file(base, tmp_path / "a.safetensors", rank=4, alpha=2.0, seed=1)
    second = trained_lora_file(base, tmp_path / "b.safetensors", rank=2, alpha=4.0, seed=2, text=False,
                               targets=("to_k", "to_out.0", "proj_in", "ff.net.2"))
    names = [lora.load_lora(pipe, first, scale=0.7), lora.load_lora(pipe, second, scale=-0.4)]
    assert names == ["lora_0", "lora_1"]
    both = run(pipe)
    oracle = copy.deepcopy(base)
    apply_by_hand(oracle, [(first, 0.7), (second, -0.4)])
    assert (both - run(oracle)).abs().max() < 1e-5
    only_first = copy.deepcopy(base)
    lora.load_lora(only_first, first, scale=0.7)
    assert (both - run(only_first)).abs().max() > 1e-3  # the second file does contribute
    lora.merge_lora(pipe)
    assert (run(pipe) - both).abs().max() < 1e-5


def test_compvis_and_diffusers_peft_key_layouts_load_the_same(base, tmp_path):
    path = trained_lora_file(base, tmp_path / "a.safetensors", text=False)
    tensors = load_file(str(path))
    reference = copy.deepcopy(base)
    lora.load_lora(reference, path)
    expected = run(reference)

    from ldm.formats.unet_keys import module_map

    compvis_of = {f"lora_unet_{theirs.replace('.', '_')}": f"lora_unet_{ours.replace('.', '_')}"
                  for ours, theirs in module_map(base.unet.config).items()}
    compvis, peft_style = {}, {}
    for key, tensor in tensors.items():
        prefix = next(p for p in compvis_of if key.startswith(p + "_"))
        compvis[compvis_of[prefix] + key[len(prefix):]] = tensor
        name, _, part = key.partition(".")
        if part == "alpha":
            continue  # diffusers files carry no alpha: it equals the rank; fold our alpha/rank into up
        diffusers_path = _diffusers_module_path(name, base)
        scale = float(tensors[f"{name}.alpha"]) / tensors[f"{name}.lora_down.weight"].shape[0]
        peft_style[f"unet.{diffusers_path}.lora_{'A' if part.startswith('lora_down') else 'B'}.weight"] = (
            tensor if part.startswith("lora_down") else tensor * scale)
    save_file(compvis, str(tmp_path / "compvis.safetensors"))
    save_file(peft_style, str(tmp_path / "peft.safetensors"))
    for variant in ("compvis", "peft"):
        pipe = copy.deepcopy(base)
        lora.load_lora(pipe, tmp_path / f"{variant}.safetensors")
        assert (run(pipe) - expected).abs().max() < 1e-6, variant


def _diffusers_module_path(kohya_name: str, base) -> str:
    from ldm.formats.lora import layer_lookup_table

    table = layer_lookup_table({"unet": base.unet, "text_encoder": base.text_encoder})
    ours = table[kohya_name][1]
    return next(k[len("unet."):] for k, v in table.items() if k.startswith("unet.") and v == ("unet", ours))


def test_our_file_loads_into_diffusers_with_the_same_result(base, tmp_path):
    diffusers = pytest.importorskip("diffusers")
    from diffusers.loaders import StableDiffusionLoraLoaderMixin

    from ldm.formats.unet_keys import diffusers_config, to_diffusers

    path = trained_lora_file(base, tmp_path / "a.safetensors", text=False,
                             targets=("to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.2"))
    ours = copy.deepcopy(base)
    lora.load_lora(ours, path, scale=1.0)
    theirs = diffusers.UNet2DConditionModel(**diffusers_config(base.unet.config)).eval()
    theirs.load_state_dict(to_diffusers(base.unet.state_dict(), base.unet.config), strict=True)
    state_dict, alphas = StableDiffusionLoraLoaderMixin.lora_state_dict(dict(load_file(str(path))))
    StableDiffusionLoraLoaderMixin.load_lora_into_unet(state_dict, alphas, unet=theirs, adapter_name="ours")
    generator = torch.Generator().manual_seed(3)
    x, context = torch.randn(1, 4, 16, 16, generator=generator), torch.randn(1, 77, 32, generator=generator)
    t = torch.tensor([400])
    with torch.no_grad():
        expected = ours.unet(x, t, context)
        got = theirs(x, t, encoder_hidden_states=context).sample
        assert (expected - base.unet(x, t, context)).abs().max() > 1e-3  # the LoRA changes the output
    assert (got - expected).abs().max() < 1e-4


# --------------------------------------------------------------------------------------------
# errors
# --------------------------------------------------------------------------------------------


def test_errors_are_one_line_user_errors(base, pipe, tmp_path):
    with pytest.raises(ConfigError, match="matches the LoRA targets"):
        lora.add_lora(pipe.unet, 4, targets=("no_such_layer",))
    with pytest.raises(ConfigError, match="rank"):
        lora.add_lora(pipe.unet, 0)
    path = trained_lora_file(base, tmp_path / "a.safetensors", text=False)
    tensors = dict(load_file(str(path)))
    tensors["lora_unet_not_a_layer.lora_down.weight"] = torch.zeros(4, 32)
    save_file(tensors, str(tmp_path / "bad.safetensors"))
    with pytest.raises(CheckpointError, match="lora_unet_not_a_layer"):
        lora.load_lora(pipe, tmp_path / "bad.safetensors")
    wrong = {k: (torch.zeros(4, 7) if k.endswith("lora_down.weight") else t) for k, t in load_file(str(path)).items()}
    save_file(wrong, str(tmp_path / "wrong.safetensors"))
    with pytest.raises(CheckpointError, match="shape"):
        lora.load_lora(copy.deepcopy(base), tmp_path / "wrong.safetensors")
    from ldm.models.text_encoders import TextEncoderConfig, build_text_encoder

    openclip = build_text_encoder(TextEncoderConfig(kind="openclip", width=32, layers=2, heads=2, act="gelu",
                                                    layer="penultimate", pad="zero", projection_dim=32))
    with pytest.raises(ConfigError, match="OpenCLIP"):
        lora.add_lora(openclip, 4, targets=lora.TEXT_ENCODER_TARGETS)
