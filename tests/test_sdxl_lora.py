"""SDXL LoRA files against diffusers' ``StableDiffusionXLPipeline.load_lora_weights`` on the same tiny random
model: kohya files adapting the U-Net and both text encoders (``lora_te2_*``: OpenCLIP bigG, whose q/k/v are
row blocks of one fused weight here), and the diffusers/peft files diffusers itself writes
(``save_lora_weights``, with its ``lora_adapter_metadata`` alpha)."""

from __future__ import annotations

import pytest
import torch

from ldm.formats.lora import load_lora, merge_lora, set_lora_scale, unload_lora
from tests.test_sdxl import NEGATIVE, PROMPT, diffusers_sdxl, saved_sdxl  # noqa: F401 (fixture)

diffusers = pytest.importorskip("diffusers")
peft = pytest.importorskip("peft")

OPTIONS = dict(sampler="euler", steps=3, guidance_scale=5.0, seed=11, output_type="pt")


def diffusers_image(xl) -> torch.Tensor:
    return xl(PROMPT, negative_prompt=NEGATIVE, generator=torch.Generator().manual_seed(11), num_inference_steps=3,
              guidance_scale=5.0, height=32, width=32, output_type="pt").images


def write_kohya_sdxl_lora_all_towers(pipe, path) -> None:
    """sd-scripts' SDXL names with seeded random weights: U-Net attention (SGM layout), te1 (CLIP ViT-L) q/v/out,
    te2 (bigG, transformers names) q/k/v (ranks 2, 3, 1), out_proj, fc1 and fc2; alpha 1.5 on te2 (one alpha per
    text encoder: diffusers' kohya reader keeps only the most common one of a text encoder)."""
    from safetensors.torch import save_file

    generator = torch.Generator().manual_seed(0)
    tensors = {}

    def add(name: str, out_features: int, in_features: int, rank: int, alpha: float) -> None:
        tensors[f"{name}.lora_down.weight"] = torch.randn(rank, in_features, generator=generator) * 0.3
        tensors[f"{name}.lora_up.weight"] = torch.randn(out_features, rank, generator=generator) * 0.3
        tensors[f"{name}.alpha"] = torch.tensor(alpha)

    for name, layer in pipe.unet.named_modules():
        if name.endswith(("attn1.to_q", "attn2.to_k", "attn2.to_out.0")):
            add("lora_unet_" + name.replace(".", "_"), *layer.weight.shape, rank=2, alpha=1.0)
    for name, layer in pipe.text_encoder.embedders[0].named_modules():
        if name.endswith(("self_attn.q_proj", "self_attn.v_proj", "self_attn.out_proj")):
            add("lora_te1_" + name.removeprefix("transformer.").replace(".", "_"), *layer.weight.shape, rank=2,
                alpha=1.0)
    bigg = pipe.text_encoder.embedders[1].config
    width, hidden = bigg.width, bigg.intermediate_size
    for block in range(bigg.layers):
        prefix = f"lora_te2_text_model_encoder_layers_{block}_"
        for part, rank in (("q", 2), ("k", 3), ("v", 1)):
            add(f"{prefix}self_attn_{part}_proj", width, width, rank=rank, alpha=1.5)
        add(prefix + "self_attn_out_proj", width, width, rank=2, alpha=1.5)
        add(prefix + "mlp_fc1", hidden, width, rank=2, alpha=1.5)
        add(prefix + "mlp_fc2", width, hidden, rank=2, alpha=1.5)
    save_file(tensors, str(path))


def test_kohya_sdxl_lora_with_both_text_encoders_matches_diffusers(saved_sdxl, tmp_path):
    from ldm.pipeline import Txt2ImgPipeline

    _, folder = saved_sdxl
    pipe = Txt2ImgPipeline.from_pretrained(folder)
    write_kohya_sdxl_lora_all_towers(pipe, tmp_path / "kohya.safetensors")
    plain = pipe(PROMPT, NEGATIVE, **OPTIONS)
    ids = pipe.text_encoder.tokenizer([PROMPT])
    with torch.no_grad():
        plain_context, plain_pooled = pipe.text_encoder.forward_with_pooled(ids)
    adapter = load_lora(pipe, tmp_path / "kohya.safetensors", scale=0.7)
    ours = pipe(PROMPT, NEGATIVE, **OPTIONS)

    xl = diffusers_sdxl(folder, "euler")
    xl.load_lora_weights(str(tmp_path / "kohya.safetensors"), adapter_name="kohya")
    xl.set_adapters(["kohya"], adapter_weights=[0.7])
    theirs = diffusers_image(xl)
    assert (ours - plain).abs().max() > 1e-2
    print(f"kohya unet+te1+te2 LoRA, scale 0.7: max |ours - diffusers| = {(ours - theirs).abs().max():.1e}")
    assert (ours - theirs).abs().max().item() < 1e-4
    # bigG's context and pooled output alone (the q/k/v blocks of the fused weight), against transformers
    width_l = pipe.text_encoder.configs[0].width
    with torch.no_grad():
        context, pooled = pipe.text_encoder.forward_with_pooled(ids)
        out = xl.text_encoder_2(xl.tokenizer_2([PROMPT], padding="max_length", max_length=77,
                                               return_tensors="pt").input_ids, output_hidden_states=True)
    assert (context[..., width_l:] - plain_context[..., width_l:]).abs().max() > 1e-2
    assert (pooled - plain_pooled).abs().max() > 1e-2
    assert (context[..., width_l:] - out.hidden_states[-2]).abs().max() < 1e-5
    assert (pooled - out.text_embeds).abs().max() < 1e-5

    set_lora_scale(pipe, adapter, 1.0)
    xl.set_adapters(["kohya"], adapter_weights=[1.0])
    difference = (pipe(PROMPT, NEGATIVE, **OPTIONS) - diffusers_image(xl)).abs().max().item()
    print(f"kohya unet+te1+te2 LoRA, scale 1.0: max |ours - diffusers| = {difference:.1e}")
    assert difference < 1e-4
    set_lora_scale(pipe, adapter, 0.7)
    merge_lora(pipe)  # folds the fused-weight adapter into in_proj_weight; the plain state-dict names are back
    assert "embedders.1.model.transformer.resblocks.0.attn.in_proj_weight" in pipe.text_encoder.state_dict()
    assert (pipe(PROMPT, NEGATIVE, **OPTIONS) - ours).abs().max().item() < 1e-5


def test_two_sdxl_loras_with_bigg_add_up_and_unload(saved_sdxl, tmp_path):
    """A second file on the already wrapped bigG tower (out_proj inside the fused weight's wrapper) adds its
    update; unloading restores the base model bitwise."""
    from safetensors.torch import load_file, save_file

    pipe, _ = saved_sdxl
    write_kohya_sdxl_lora_all_towers(pipe, tmp_path / "a.safetensors")
    halved = {k: v * 0.5 if k.endswith("lora_up.weight") else v for k, v in load_file(tmp_path / "a.safetensors").items()}
    save_file(halved, str(tmp_path / "b.safetensors"))
    plain = pipe(PROMPT, NEGATIVE, **OPTIONS)
    load_lora(pipe, tmp_path / "a.safetensors", scale=0.5)
    load_lora(pipe, tmp_path / "b.safetensors", scale=1.0)
    both = pipe(PROMPT, NEGATIVE, **OPTIONS)
    unload_lora(pipe)
    assert torch.equal(pipe(PROMPT, NEGATIVE, **OPTIONS), plain)
    load_lora(pipe, tmp_path / "a.safetensors", scale=1.0)
    once = pipe(PROMPT, NEGATIVE, **OPTIONS)
    unload_lora(pipe)
    assert (both - plain).abs().max() > 1e-2
    assert (both - once).abs().max().item() < 1e-4  # 0.5 * a + 0.5 * a = a


def save_diffusers_sdxl_lora(folder, directory) -> None:
    """What diffusers' SDXL LoRA training writes: peft adapters (rank 4, alpha 2, one alpha_pattern entry) on the
    U-Net and both text encoders, random weights, saved by ``StableDiffusionXLPipeline.save_lora_weights`` with
    their ``lora_adapter_metadata``."""
    from peft import LoraConfig, inject_adapter_in_model
    from peft.utils import get_peft_model_state_dict

    xl = diffusers.StableDiffusionXLPipeline.from_pretrained(folder, local_files_only=True, add_watermarker=False)
    generator = torch.Generator().manual_seed(1)
    unet_config = LoraConfig(r=4, lora_alpha=2, target_modules=["to_q", "to_k", "to_v", "to_out.0"],
                             alpha_pattern={"attn2.to_k": 8})
    text_config = LoraConfig(r=4, lora_alpha=2, target_modules=["q_proj", "k_proj", "v_proj", "out_proj", "fc1"])
    networks = {"unet": (xl.unet, unet_config), "text_encoder": (xl.text_encoder, text_config),
                "text_encoder_2": (xl.text_encoder_2, text_config)}
    arguments = {}
    for name, (network, config) in networks.items():
        inject_adapter_in_model(config, network)  # what diffusers' and transformers' add_adapter do
        with torch.no_grad():
            for parameter_name, parameter in network.named_parameters():
                if "lora_" in parameter_name:
                    parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.3)
        arguments[f"{name}_lora_layers"] = get_peft_model_state_dict(network)
        arguments[f"{name}_lora_adapter_metadata"] = network.peft_config["default"].to_dict()
    diffusers.StableDiffusionXLPipeline.save_lora_weights(directory, **arguments)


def test_diffusers_sdxl_lora_file_matches_diffusers(saved_sdxl, tmp_path):
    from safetensors import safe_open
    from safetensors.torch import save_file

    from ldm.pipeline import Txt2ImgPipeline

    _, folder = saved_sdxl
    save_diffusers_sdxl_lora(folder, tmp_path / "lora")
    path = tmp_path / "lora" / "pytorch_lora_weights.safetensors"
    with safe_open(str(path), "pt") as handle:
        keys, metadata = list(handle.keys()), handle.metadata()
    assert any(k.startswith("text_encoder_2.") and ".self_attn.k_proj.lora_A." in k for k in keys)
    assert any(k.startswith("unet.") and k.endswith("lora_B.weight") for k in keys)

    pipe = Txt2ImgPipeline.from_pretrained(folder)
    plain = pipe(PROMPT, NEGATIVE, **OPTIONS)
    load_lora(pipe, path, scale=0.6)
    ours = pipe(PROMPT, NEGATIVE, **OPTIONS)
    xl = diffusers_sdxl(folder, "euler")
    xl.load_lora_weights(str(path), adapter_name="peft")
    xl.set_adapters(["peft"], adapter_weights=[0.6])
    assert (ours - plain).abs().max() > 1e-2
    difference = (ours - diffusers_image(xl)).abs().max().item()
    print(f"diffusers/peft SDXL LoRA, scale 0.6: max |ours - diffusers| = {difference:.1e}")
    assert difference < 1e-4

    # the same adapters under diffusers' older suffixes (lora.down / lora.up) load to the same model
    renamed = {}
    with safe_open(str(path), "pt") as handle:
        for key in handle.keys():
            renamed[key.replace(".lora_A.weight", ".lora.down.weight").replace(".lora_B.weight", ".lora.up.weight")] \
                = handle.get_tensor(key)
    save_file(renamed, str(tmp_path / "old-style.safetensors"), metadata=metadata)
    again = Txt2ImgPipeline.from_pretrained(folder)
    load_lora(again, tmp_path / "old-style.safetensors", scale=0.6)
    assert torch.equal(again(PROMPT, NEGATIVE, **OPTIONS), ours)


def test_bad_sdxl_lora_files_are_one_line_errors(saved_sdxl, tmp_path):
    from safetensors.torch import save_file

    from ldm.errors import CheckpointError

    pipe, _ = saved_sdxl
    width = pipe.text_encoder.embedders[1].config.width
    save_file({"lora_te2_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight": torch.zeros(2, width)},
              str(tmp_path / "half.safetensors"))
    with pytest.raises(CheckpointError, match="lacks its down or up weight"):
        load_lora(pipe, tmp_path / "half.safetensors")
    save_file({"lora_te2_text_model_encoder_layers_0_self_attn_k_proj.lora_down.weight": torch.zeros(2, width + 1),
               "lora_te2_text_model_encoder_layers_0_self_attn_k_proj.lora_up.weight": torch.zeros(width, 2)},
              str(tmp_path / "wide.safetensors"))
    with pytest.raises(CheckpointError, match="do not fit"):
        load_lora(pipe, tmp_path / "wide.safetensors")
    save_file({"text_encoder_2.text_model.encoder.layers.99.self_attn.q_proj.lora_A.weight": torch.zeros(2, width)},
              str(tmp_path / "deep.safetensors"))
    with pytest.raises(CheckpointError, match="fit no layer"):
        load_lora(pipe, tmp_path / "deep.safetensors")
    assert not any("lora_" in name for name in pipe.text_encoder.state_dict())  # nothing was attached
