"""SDXL tests: the U-Net with per-level depths and the vector conditioning against diffusers'
``UNet2DConditionModel`` (``addition_embed_type="text_time"``) with the same random weights, the full
base and refiner layouts on the meta device, the CompVis and diffusers config maps; the two text
encoders and the pooled output against transformers' ``CLIPTextModel`` / ``CLIPTextModelWithProjection``."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from ldm.formats.compvis import unet_config_from_compvis
from ldm.formats.unet_keys import config_from_diffusers, diffusers_config, to_diffusers
from ldm.models.sdxl_conditioning import (
    base_time_ids,
    conditioning_vector,
    refiner_time_ids,
    sdxl_base_unet_config,
    sdxl_refiner_unet_config,
)
from ldm.formats import text_keys
from ldm.models.text_encoders import SDXLTextEncoder, TextEncoderConfig, repadded
from ldm.models.tokenizer import ClipTokenizer
from ldm.models.unet import UNetConfig, UNetModel
from tests.test_unet import _randomize, check_full_layout_maps_one_to_one

diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")

# model.params.network_config.params of Stability's generative-models YAMLs.
SDXL_BASE_PARAMS = {  # configs/inference/sd_xl_base.yaml
    "adm_in_channels": 2816, "num_classes": "sequential", "use_checkpoint": True, "in_channels": 4,
    "out_channels": 4, "model_channels": 320, "attention_resolutions": [4, 2], "num_res_blocks": 2,
    "channel_mult": [1, 2, 4], "num_head_channels": 64, "use_linear_in_transformer": True,
    "transformer_depth": [1, 2, 10], "context_dim": 2048, "spatial_transformer_attn_type": "softmax-xformers",
}
SDXL_REFINER_PARAMS = {  # configs/inference/sd_xl_refiner.yaml
    "adm_in_channels": 2560, "num_classes": "sequential", "use_checkpoint": True, "in_channels": 4,
    "out_channels": 4, "model_channels": 384, "attention_resolutions": [4, 2], "num_res_blocks": 2,
    "channel_mult": [1, 2, 4, 4], "num_head_channels": 64, "use_linear_in_transformer": True,
    "transformer_depth": 4, "context_dim": [1280, 1280, 1280, 1280],
    "spatial_transformer_attn_type": "softmax-xformers",
}
POOLED = 16  # the tiny pooled text embedding
# Tiny SDXL style: no attention at the first level, per-level depths and head counts (fixed head size),
# a 6-number micro-conditioning vector.
TINY_XL = UNetConfig(model_channels=32, channel_mult=(1, 2, 4), num_res_blocks=1, attention_resolutions=(2, 4),
                     num_heads=-1, num_head_channels=8, context_dim=24, transformer_depth=(1, 2, 3),
                     use_linear_in_transformer=True, norm_groups=8, adm_in_channels=POOLED + 6 * 256)


# ---------------------------------------------------------------------------------------------
# the U-Net
# ---------------------------------------------------------------------------------------------


def test_tiny_sdxl_unet_matches_diffusers_text_time():
    ours = UNetModel(TINY_XL).eval()
    _randomize(ours)
    theirs = diffusers.UNet2DConditionModel(**diffusers_config(TINY_XL)).eval()
    theirs.load_state_dict(to_diffusers(ours.state_dict(), TINY_XL), strict=True)

    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 4, 16, 16, generator=g)
    t = torch.tensor([3.7, 811.25])
    context = torch.randn(2, 7, TINY_XL.context_dim, generator=g)
    pooled = torch.randn(2, POOLED, generator=g)
    time_ids = torch.tensor([base_time_ids((1024, 768), (0, 0), (1024, 1024)),
                             base_time_ids((512, 512), (16, 48), (896, 1152))])
    with torch.no_grad():
        expected = theirs(x, t, encoder_hidden_states=context,
                          added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids}).sample
        actual = ours(x, t, context, y=conditioning_vector(pooled, time_ids))
        other_sizes = ours(x, t, context, y=conditioning_vector(pooled, time_ids.flip(0)))
    assert expected.abs().max() > 0.1
    assert (actual - expected).abs().max() < 1e-4
    assert (other_sizes - actual).abs().max() > 1e-3  # the micro-conditioning reaches the output


def test_vector_is_required_exactly_when_configured():
    model = UNetModel(TINY_XL).eval()
    x, t, context = torch.zeros(1, 4, 8, 8), torch.tensor([1.0]), torch.zeros(1, 3, TINY_XL.context_dim)
    with pytest.raises(ValueError, match="adm_in_channels"):
        model(x, t, context)
    with pytest.raises(ValueError, match="features"):
        model(x, t, context, y=torch.zeros(1, 7))


def test_conditioning_vector_layout():
    pooled = torch.arange(6.0).reshape(2, 3)
    y = conditioning_vector(pooled, refiner_time_ids((64, 32), (0, 8), 6.0))
    assert y.shape == (2, 3 + 5 * 256)
    assert torch.equal(y[:, :3], pooled)
    # number 0 is 64: cos(64 * freq) for the first half, sin for the second; number 3 (left = 8) next.
    freqs = torch.exp(-torch.log(torch.tensor(10_000.0)) * torch.arange(128) / 128)
    assert torch.allclose(y[0, 3:3 + 128], torch.cos(64 * freqs))
    assert torch.allclose(y[1, 3 + 3 * 256 + 128:3 + 4 * 256], torch.sin(8 * freqs))


@pytest.mark.parametrize("params, preset, expected_count", [
    (SDXL_BASE_PARAMS, sdxl_base_unet_config(), 2_567_463_684),
    (SDXL_REFINER_PARAMS, sdxl_refiner_unet_config(), None),
], ids=["base", "refiner"])
def test_full_sdxl_layouts_map_one_to_one(params, preset, expected_count):
    config = unet_config_from_compvis(params)
    assert config == preset
    counts = check_full_layout_maps_one_to_one(config)
    if expected_count is not None:
        assert sum(counts.values()) == expected_count
    assert "label_emb.0.0.weight" in counts and "label_emb.0.2.bias" in counts


def test_sdxl_diffusers_config_json_reads_back():
    """The text_time options as diffusers' SDXL base config.json writes them."""
    saved = dict(diffusers.UNet2DConditionModel(**diffusers_config(TINY_XL)).config)
    assert saved["addition_embed_type"] == "text_time" and saved["addition_time_embed_dim"] == 256
    assert config_from_diffusers(saved) == TINY_XL
    with pytest.raises(ValueError, match="addition_time_embed_dim"):
        config_from_diffusers({**saved, "addition_time_embed_dim": 128})
    with pytest.raises(ValueError, match="addition_embed_type"):
        config_from_diffusers({**saved, "addition_embed_type": "text_image"})


def test_compvis_label_embedding_options():
    assert unet_config_from_compvis(SDXL_BASE_PARAMS).adm_in_channels == 2816
    with pytest.raises(ValueError, match="adm_in_channels"):
        unet_config_from_compvis({k: v for k, v in SDXL_BASE_PARAMS.items() if k != "adm_in_channels"})
    with pytest.raises(ValueError, match="sequential"):
        unet_config_from_compvis({k: v for k, v in SDXL_BASE_PARAMS.items() if k != "num_classes"})
    with pytest.raises(ValueError, match="one depth per level"):
        UNetConfig(channel_mult=(1, 2), attention_resolutions=(2,), transformer_depth=(1, 2, 3))
    assert UNetConfig.from_dict(TINY_XL.to_dict()) == TINY_XL


# ---------------------------------------------------------------------------------------------
# the text encoders
# ---------------------------------------------------------------------------------------------

TINY_CLIP_L = dataclasses.replace(TextEncoderConfig.sdxl_clip_l(), width=32, layers=3, heads=4, projection_dim=32)
TINY_BIGG = dataclasses.replace(TextEncoderConfig.sdxl_bigg(), width=48, layers=3, heads=4, projection_dim=POOLED)
PROMPTS = ["a red bicycle leaning on a wall", "", "an owl"]


def _transformers_twin(encoder, config: TextEncoderConfig, model_class):
    """The transformers model with ``encoder``'s weights (every block kept, the projection when present)."""
    hf_config = transformers.CLIPTextConfig(**text_keys.diffusers_config(dataclasses.replace(config, layer="last")))
    twin = model_class(hf_config).eval()
    state = text_keys.to_diffusers(encoder.state_dict(), dataclasses.replace(config, layer="last"),
                                   with_projection=model_class is transformers.CLIPTextModelWithProjection)
    names = twin.state_dict().keys()  # transformers 4 and 5 name these differently
    missing, unexpected = twin.load_state_dict({k if k in names else k.removeprefix("text_model."): v
                                                for k, v in state.items()}, strict=False)
    assert not unexpected and all("position_ids" in key for key in missing)
    return twin


def test_sdxl_text_encoders_match_transformers():
    """Context = [CLIP-L hidden_states[-2], bigG hidden_states[-2]] (no final LayerNorm), pooled = bigG's
    projected end-of-text token, each tower fed its own tokenizer's padding (eot / "!")."""
    torch.manual_seed(0)
    encoder = SDXLTextEncoder([TINY_CLIP_L, TINY_BIGG]).eval()
    clip_l = _transformers_twin(encoder.embedders[0], TINY_CLIP_L, transformers.CLIPTextModel)
    bigg = _transformers_twin(encoder.embedders[1], TINY_BIGG, transformers.CLIPTextModelWithProjection)

    ids = encoder.tokenizer(PROMPTS)
    ids_2 = ClipTokenizer(pad="zero")(PROMPTS)  # diffusers' tokenizer_2 pads with "!"
    assert torch.equal(repadded(ids, encoder.tokenizer, encoder.embedders[1].tokenizer), ids_2)
    with torch.no_grad():
        context, pooled = encoder.forward_with_pooled(ids)
        expected_l = clip_l(ids, output_hidden_states=True).hidden_states[-2]
        out_g = bigg(ids_2, output_hidden_states=True)
    assert context.shape == (3, 77, 32 + 48) and pooled.shape == (3, POOLED)
    assert (context[..., :32] - expected_l).abs().max() < 1e-5
    assert (context[..., 32:] - out_g.hidden_states[-2]).abs().max() < 1e-5
    assert (pooled - out_g.text_embeds).abs().max() < 1e-5
    assert torch.equal(encoder(ids), context)
    # clip_skip 2 moves the context one block down in both towers, the pooled output stays the final one
    with torch.no_grad():
        skipped, pooled_skipped = encoder.forward_with_pooled(ids, clip_skip=2)
        assert (skipped[..., :32] - clip_l(ids, output_hidden_states=True).hidden_states[-3]).abs().max() < 1e-5
    assert torch.equal(pooled_skipped, pooled)


def test_sdxl_refiner_text_encoder_is_bigg_alone():
    torch.manual_seed(1)
    encoder = SDXLTextEncoder([TINY_BIGG]).eval()
    bigg = _transformers_twin(encoder.embedders[0], TINY_BIGG, transformers.CLIPTextModelWithProjection)
    ids = encoder.tokenizer(PROMPTS)
    assert int(ids[0, -1]) == 0  # its own tokenizer: "!" padding
    with torch.no_grad():
        context, pooled = encoder.forward_with_pooled(ids)
        out = bigg(ids, output_hidden_states=True)
    assert (context - out.hidden_states[-2]).abs().max() < 1e-5
    assert (pooled - out.text_embeds).abs().max() < 1e-5


def test_sdxl_text_encoder_parameter_names_are_the_original_checkpoints():
    names = SDXLTextEncoder([TINY_CLIP_L, TINY_BIGG]).state_dict().keys()
    assert "embedders.0.transformer.text_model.encoder.layers.0.self_attn.q_proj.weight" in names
    assert "embedders.1.model.transformer.resblocks.2.attn.in_proj_weight" in names
    assert "embedders.1.model.text_projection" in names
    with pytest.raises(ValueError, match="OpenCLIP"):
        SDXLTextEncoder([TINY_CLIP_L])
    assert TextEncoderConfig.from_dict(TINY_BIGG.to_dict()) == TINY_BIGG
    assert "final_norm" not in TextEncoderConfig.sd2().to_dict()  # SD1/SD2 configs read and write as before


# ---------------------------------------------------------------------------------------------
# the pipeline
# ---------------------------------------------------------------------------------------------

PROMPT, NEGATIVE = "a red bicycle on a blue background", "blurry"


def tiny_sdxl_config(*, refiner: bool = False):
    """An SDXL-shaped pipeline config with a few channels per layer (32x32 images, f=2)."""
    from autoencoder.model import AutoencoderConfig
    from ldm.config import PipelineConfig, SamplingDefaults
    from ldm.models.sdxl_conditioning import SDXLConfig
    from ldm.sampling.schedule import ScheduleConfig

    towers = [TINY_BIGG] if refiner else [TINY_CLIP_L, TINY_BIGG]
    return PipelineConfig(
        unet=UNetConfig(model_channels=32, channel_mult=(1, 2), num_res_blocks=1, attention_resolutions=(2,),
                        num_heads=8, context_dim=sum(t.width for t in towers),  # one attention width: 8 heads
                        transformer_depth=(1, 2), use_linear_in_transformer=True, norm_groups=8,
                        adm_in_channels=POOLED + (5 if refiner else 6) * 256),
        vae=AutoencoderConfig(base_channels=8, channel_mult=(1, 2), num_res_blocks=1, norm_groups=4,
                              mid_attention=True, scaling_factor=0.13025),
        text_encoder=towers[0], text_encoder_2=None if refiner else TINY_BIGG,
        schedule=ScheduleConfig(timestep_spacing="leading"),
        sampling=SamplingDefaults(height=32, width=32, steps=4, guidance_scale=5.0, sampler="euler"),
        sdxl=SDXLConfig(force_zeros_for_empty_prompt=not refiner),
    )


def tiny_sdxl_pipeline(seed: int = 0, **kwargs):
    from ldm.models.builder import perturb_zero_initialised
    from ldm.pipeline import Txt2ImgPipeline

    torch.manual_seed(seed)
    pipe = Txt2ImgPipeline.from_config(tiny_sdxl_config(**kwargs))
    perturb_zero_initialised([pipe.unet, pipe.vae])
    return pipe


def diffusers_sdxl(folder, sampler: str):
    from ldm.sampling.registry import SAMPLER_INFO

    xl = diffusers.StableDiffusionXLPipeline.from_pretrained(folder, local_files_only=True, add_watermarker=False)
    xl.scheduler = getattr(diffusers, SAMPLER_INFO[sampler].diffusers_class).from_config(xl.scheduler.config)
    xl.set_progress_bar_config(disable=True)
    return xl


@pytest.fixture(scope="module")
def saved_sdxl(tmp_path_factory):
    pipe = tiny_sdxl_pipeline(seed=3)
    folder = tmp_path_factory.mktemp("sdxl") / "diffusers"
    pipe.save_pretrained(folder, format="diffusers")
    return pipe, folder


@pytest.mark.parametrize("sampler", ["euler", "dpmpp_2m"])
def test_sdxl_pipeline_matches_diffusers(saved_sdxl, sampler):
    pipe, folder = saved_sdxl
    xl = diffusers_sdxl(folder, sampler)
    options = dict(num_inference_steps=4, guidance_scale=5.0, height=32, width=32, output_type="pt")
    theirs = xl(PROMPT, negative_prompt=NEGATIVE, generator=torch.Generator().manual_seed(11), **options).images
    ours = pipe(PROMPT, NEGATIVE, sampler=sampler, steps=4, guidance_scale=5.0, seed=11, output_type="pt")
    assert ours.shape == theirs.shape == (1, 3, 32, 32)
    assert (ours - theirs).abs().max().item() < 1e-4
    # diffusers' defaults: no negative prompt = zero conditioning (force_zeros_for_empty_prompt); other sizes
    theirs = xl(PROMPT, generator=torch.Generator().manual_seed(5), original_size=(64, 48),
                crops_coords_top_left=(8, 4), target_size=(40, 24), **options).images
    ours = pipe(PROMPT, sampler=sampler, steps=4, guidance_scale=5.0, seed=5, output_type="pt",
                original_size=(64, 48), crop_top_left=(8, 4), target_size=(40, 24))
    assert (ours - theirs).abs().max().item() < 1e-4


def test_sdxl_diffusers_folder_round_trip(saved_sdxl, tmp_path):
    from ldm.pipeline import Txt2ImgPipeline

    pipe, folder = saved_sdxl
    loaded = Txt2ImgPipeline.from_pretrained(folder)
    assert loaded.config.unet == pipe.config.unet and loaded.config.sdxl == pipe.config.sdxl
    assert loaded.config.text_encoder_configs == pipe.config.text_encoder_configs
    for name in ("unet", "vae", "text_encoder"):
        ours, theirs = getattr(pipe, name).state_dict(), getattr(loaded, name).state_dict()
        assert ours.keys() == theirs.keys(), name
        assert all(torch.equal(ours[k], theirs[k]) for k in ours if "logit_scale" not in k), name
    options = dict(sampler="euler", steps=3, guidance_scale=5.0, seed=2, output_type="pt")
    assert torch.equal(loaded(PROMPT, NEGATIVE, **options), pipe(PROMPT, NEGATIVE, **options))
    # the folder as diffusers itself writes it (all its config keys, transformers' own text-encoder names)
    diffusers_sdxl(folder, "euler").save_pretrained(tmp_path / "by-diffusers")
    rewritten = Txt2ImgPipeline.from_pretrained(tmp_path / "by-diffusers")
    assert torch.equal(rewritten(PROMPT, NEGATIVE, **options), pipe(PROMPT, NEGATIVE, **options))


def test_sdxl_options_are_checked(saved_sdxl):
    from ldm.errors import ArgumentError

    pipe, _ = saved_sdxl
    with pytest.raises(ArgumentError, match="original_size"):
        pipe(PROMPT, steps=1, original_size=(0, 32))
    with pytest.raises(ArgumentError, match="not supported for SDXL"):
        pipe("a [cat:dog:0.5]", steps=2)
    from tests.conftest import tiny_pipeline

    with pytest.raises(ArgumentError, match="for SDXL models"):
        tiny_pipeline()(PROMPT, steps=1, crop_top_left=(8, 0))


# ---------------------------------------------------------------------------------------------
# original single files
# ---------------------------------------------------------------------------------------------


def inferable_sdxl_config(*, refiner: bool = False):
    """A small SDXL config whose every setting can be read back from its weights (32 norm groups,
    64-channel heads, the SDXL VAE's scaling factor, the native sampling of an inferred model)."""
    from autoencoder.model import AutoencoderConfig
    from ldm.formats.single_file_config import native_sampling

    clip_l = dataclasses.replace(TextEncoderConfig.sdxl_clip_l(), width=64, layers=2, heads=1, projection_dim=64)
    bigg = dataclasses.replace(TextEncoderConfig.sdxl_bigg(), width=128, layers=2, heads=2, projection_dim=POOLED)
    towers = [bigg] if refiner else [clip_l, bigg]
    vae = AutoencoderConfig(base_channels=32, channel_mult=(1, 2), num_res_blocks=1, norm_groups=32,
                            mid_attention=True, scaling_factor=0.13025)
    base = tiny_sdxl_config(refiner=refiner)
    return dataclasses.replace(
        base,
        unet=UNetConfig(model_channels=64, channel_mult=(1, 2, 2), num_res_blocks=1, attention_resolutions=(2, 4),
                        num_heads=-1, num_head_channels=64, context_dim=sum(t.width for t in towers),
                        transformer_depth=(1, 1, 2), use_linear_in_transformer=True,
                        adm_in_channels=POOLED + (5 if refiner else 6) * 256),
        vae=vae, text_encoder=towers[0], text_encoder_2=None if refiner else bigg,
        sampling=native_sampling(128, vae))


@pytest.mark.parametrize("refiner", [False, True], ids=["base", "refiner"])
def test_sdxl_single_file_is_read_from_its_weights_and_written_back_bitwise(tmp_path, refiner):
    from safetensors.torch import load_file, save_file

    from ldm.formats.single_file_write import save_single_file
    from ldm.models.builder import perturb_zero_initialised
    from ldm.pipeline import Txt2ImgPipeline

    torch.manual_seed(4)
    config = inferable_sdxl_config(refiner=refiner)
    pipe = Txt2ImgPipeline.from_config(config)
    perturb_zero_initialised([pipe.unet, pipe.vae])
    save_single_file(pipe, tmp_path / "ours.safetensors")
    original = load_file(str(tmp_path / "ours.safetensors"))
    tower = "embedders.0.model" if refiner else "embedders.1.model"
    for key in ("model.diffusion_model.label_emb.0.0.weight", "first_stage_model.decoder.conv_out.weight",
                f"conditioner.{tower}.text_projection", f"conditioner.{tower}.transformer.resblocks.1.attn.in_proj_weight"):
        assert key in original, key
    if not refiner:
        assert "conditioner.embedders.0.transformer.text_model.embeddings.position_ids" in original
    save_file(original, str(tmp_path / "plain.safetensors"))  # no stored config: read from the weights

    loaded = Txt2ImgPipeline.from_single_file(tmp_path / "plain.safetensors")
    assert loaded.config == config
    options = dict(steps=2, guidance_scale=5.0, seed=1, height=32, width=32, output_type="pt")
    assert torch.equal(loaded(PROMPT, NEGATIVE, **options), pipe(PROMPT, NEGATIVE, **options))
    save_single_file(loaded, tmp_path / "again.safetensors")
    again = load_file(str(tmp_path / "again.safetensors"))
    assert again.keys() == original.keys() and all(torch.equal(again[k], original[k]) for k in original)


def test_diffusers_from_single_file_reads_our_sdxl_file(saved_sdxl, tmp_path):
    """diffusers' own SDXL key conversion (component configs from our folder) gives the same image."""
    from ldm.formats.single_file_write import save_single_file

    pipe, folder = saved_sdxl
    save_single_file(pipe, tmp_path / "xl.safetensors")
    xl = diffusers.StableDiffusionXLPipeline.from_single_file(tmp_path / "xl.safetensors", config=str(folder),
                                                              local_files_only=True, add_watermarker=False)
    xl.set_progress_bar_config(disable=True)
    theirs = xl(PROMPT, negative_prompt=NEGATIVE, generator=torch.Generator().manual_seed(11), num_inference_steps=4,
                guidance_scale=5.0, height=32, width=32, output_type="pt").images
    ours = pipe(PROMPT, NEGATIVE, sampler="euler", steps=4, guidance_scale=5.0, seed=11, output_type="pt")
    assert (ours - theirs).abs().max().item() < 1e-4


def test_sdxl_refiner_img2img_matches_diffusers(tmp_path):
    """The refiner (bigG alone, aesthetic-score conditioning, an empty negative prompt encoded) as img2img."""
    from PIL import Image

    pipe = tiny_sdxl_pipeline(seed=8, refiner=True)
    pipe.save_pretrained(tmp_path / "refiner", format="diffusers")
    refiner = diffusers.StableDiffusionXLImg2ImgPipeline.from_pretrained(tmp_path / "refiner", local_files_only=True,
                                                                         add_watermarker=False)
    refiner.set_progress_bar_config(disable=True)
    image = Image.fromarray((torch.rand(32, 32, 3, generator=torch.Generator().manual_seed(0)) * 255).byte().numpy())
    theirs = refiner(PROMPT, image=image, strength=0.6, num_inference_steps=5, guidance_scale=5.0,
                     generator=torch.Generator().manual_seed(7), output_type="pt").images
    ours = pipe(PROMPT, image=image, strength=0.6, sampler="euler", steps=5, guidance_scale=5.0, seed=7,
                output_type="pt")
    assert (ours - theirs).abs().max().item() < 1e-4


# ---------------------------------------------------------------------------------------------
# LoRA
# ---------------------------------------------------------------------------------------------


def write_kohya_sdxl_lora(pipe, path, *, with_bigg: bool = False) -> None:
    """A kohya-style SDXL LoRA (sd-scripts' names: SGM U-Net layout, lora_te1_ for CLIP ViT-L) with seeded
    random weights on every attention projection of the U-Net and of the first text encoder."""
    from safetensors.torch import save_file

    generator = torch.Generator().manual_seed(0)
    tensors = {}

    def add(name: str, weight: torch.Tensor) -> None:
        rank = 2
        tensors[f"{name}.lora_down.weight"] = torch.randn(rank, weight.shape[1], generator=generator) * 0.3
        tensors[f"{name}.lora_up.weight"] = torch.randn(weight.shape[0], rank, generator=generator) * 0.3
        tensors[f"{name}.alpha"] = torch.tensor(1.0)

    for path_, layer in pipe.unet.named_modules():
        if path_.endswith(("attn1.to_q", "attn1.to_k", "attn2.to_v", "attn2.to_out.0")):
            add("lora_unet_" + path_.replace(".", "_"), layer.weight)
    clip_l = pipe.text_encoder.embedders[0]
    for path_, layer in clip_l.named_modules():
        if path_.endswith(("self_attn.q_proj", "self_attn.v_proj", "self_attn.out_proj")):
            add("lora_te1_" + path_.removeprefix("transformer.").replace(".", "_"), layer.weight)
    if with_bigg:
        tensors["lora_te2_text_model_encoder_layers_0_self_attn_q_proj.alpha"] = torch.tensor(1.0)
    save_file(tensors, str(path))


def test_kohya_sdxl_lora_gives_the_image_of_diffusers_load_lora_weights(saved_sdxl, tmp_path):
    from ldm.formats.lora import load_lora, merge_lora, unload_lora
    from ldm.pipeline import Txt2ImgPipeline

    _, folder = saved_sdxl
    pipe = Txt2ImgPipeline.from_pretrained(folder)
    write_kohya_sdxl_lora(pipe, tmp_path / "lora.safetensors")
    options = dict(sampler="euler", steps=4, guidance_scale=5.0, seed=11, output_type="pt")
    plain = pipe(PROMPT, NEGATIVE, **options)
    load_lora(pipe, tmp_path / "lora.safetensors", scale=0.7)
    ours = pipe(PROMPT, NEGATIVE, **options)

    xl = diffusers_sdxl(folder, "euler")
    xl.load_lora_weights(str(tmp_path / "lora.safetensors"))
    xl.fuse_lora(lora_scale=0.7)
    theirs = xl(PROMPT, negative_prompt=NEGATIVE, generator=torch.Generator().manual_seed(11), num_inference_steps=4,
                guidance_scale=5.0, height=32, width=32, output_type="pt").images
    assert (ours - plain).abs().max() > 1e-2  # the LoRA changes the image
    assert (ours - theirs).abs().max().item() < 1e-4
    merge_lora(pipe)
    assert (pipe(PROMPT, NEGATIVE, **options) - ours).abs().max().item() < 1e-5
    unload_lora(pipe)


def test_kohya_sdxl_lora_with_a_bigg_layer_lacking_weights_is_refused(saved_sdxl, tmp_path):
    """lora_te2_* loads (tests/test_sdxl_lora.py); an entry with an alpha but no down/up weights is one error."""
    from ldm.errors import CheckpointError
    from ldm.formats.lora import load_lora

    pipe, _ = saved_sdxl
    write_kohya_sdxl_lora(pipe, tmp_path / "te2.safetensors", with_bigg=True)
    with pytest.raises(CheckpointError, match="lacks its down or up weight"):
        load_lora(pipe, tmp_path / "te2.safetensors")


def test_sdxl_single_file_round_trip_through_diffusers(saved_sdxl, tmp_path):
    """original -> ours -> diffusers folder -> ours -> original: every tensor back bitwise, except OpenCLIP's
    logit_scale (no diffusers counterpart; unused for conditioning), which comes back as CLIP's initial value."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    from ldm.formats.single_file_write import save_single_file
    from ldm.pipeline import Txt2ImgPipeline

    pipe, _ = saved_sdxl
    save_single_file(pipe, tmp_path / "original.safetensors")
    original = load_file(str(tmp_path / "original.safetensors"))
    original["conditioner.embedders.1.model.logit_scale"] = torch.tensor(4.0)  # a trained temperature
    with safe_open(str(tmp_path / "original.safetensors"), "pt") as handle:
        metadata = handle.metadata()  # our stored config (the tiny model's norm groups are not in the weights)
    save_file(original, str(tmp_path / "original.safetensors"), metadata=metadata)
    ours = Txt2ImgPipeline.from_single_file(tmp_path / "original.safetensors")
    ours.save_pretrained(tmp_path / "diffusers", format="diffusers")
    save_single_file(Txt2ImgPipeline.from_pretrained(tmp_path / "diffusers"), tmp_path / "back.safetensors")
    back = load_file(str(tmp_path / "back.safetensors"))
    assert original.keys() == back.keys()
    assert [k for k in original if not torch.equal(original[k], back[k])] == ["conditioner.embedders.1.model.logit_scale"]


def test_sdxl_empty_negative_rows_are_zeroed_per_row(saved_sdxl):
    """force_zeros_for_empty_prompt applies per image: a batch mixing "" and a negative prompt gives each
    image as it comes alone."""
    pipe, _ = saved_sdxl
    options = dict(sampler="euler", steps=2, guidance_scale=5.0, seed=3, output_type="pt")
    batch = pipe([PROMPT, PROMPT], ["", NEGATIVE], batch_invariant=False, **options)
    alone = torch.cat([pipe(PROMPT, "", **options), pipe(PROMPT, NEGATIVE, **{**options, "seed": 4})])
    assert (batch - alone).abs().max().item() < 1e-4
