"""Stability's sgm inference YAML (``sd_xl_base.yaml`` / ``sd_xl_refiner.yaml`` layout) beside an SDXL single
file, or given as ``config=``, read as its config (:mod:`ldm.formats.sgm_yaml`)."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from ldm.config_io import write_yaml
from ldm.errors import ConfigError
from ldm.models.builder import perturb_zero_initialised
from ldm.pipeline import Txt2ImgPipeline
from tests.test_sdxl import NEGATIVE, PROMPT, inferable_sdxl_config

VECTOR_KEYS = {False: ["original_size_as_tuple", "crop_coords_top_left", "target_size_as_tuple"],
               True: ["original_size_as_tuple", "crop_coords_top_left", "aesthetic_score"]}


def sgm_yaml(config, *, refiner: bool, scaling: str = "EpsScaling") -> dict:
    """The YAML Stability ships for SDXL (configs/inference/sd_xl_*.yaml: targets, keys, comments' values),
    with ``config``'s tiny sizes."""
    unet, vae = config.unet, config.vae
    clip = {"is_trainable": False, "input_key": "txt", "target": "sgm.modules.encoders.modules.FrozenCLIPEmbedder",
            "params": {"layer": "hidden", "layer_idx": config.text_encoder.layers - 1}}
    bigg = {"is_trainable": False, "input_key": "txt",
            "target": "sgm.modules.encoders.modules.FrozenOpenCLIPEmbedder2",
            "params": {"arch": "ViT-bigG-14", "version": "laion2b_s39b_b160k", "freeze": True,
                       "layer": "penultimate", "always_return_pooled": True, "legacy": False}}
    vectors = [{"is_trainable": False, "input_key": key, "target": "sgm.modules.encoders.modules.ConcatTimestepEmbedderND",
                "params": {"outdim": 256}} for key in VECTOR_KEYS[refiner]]
    return {"model": {"target": "sgm.models.diffusion.DiffusionEngine", "params": {
        "scale_factor": 0.13025, "disable_first_stage_autocast": True,
        "denoiser_config": {"target": "sgm.modules.diffusionmodules.denoiser.DiscreteDenoiser", "params": {
            "num_idx": 1000,
            "scaling_config": {"target": f"sgm.modules.diffusionmodules.denoiser_scaling.{scaling}"},
            "discretization_config": {"target": "sgm.modules.diffusionmodules.discretizer.LegacyDDPMDiscretization"}}},
        "network_config": {"target": "sgm.modules.diffusionmodules.openaimodel.UNetModel", "params": {
            "adm_in_channels": unet.adm_in_channels, "num_classes": "sequential", "use_checkpoint": True,
            "in_channels": unet.in_channels, "out_channels": 4, "model_channels": unet.model_channels,
            "attention_resolutions": list(unet.attention_resolutions), "num_res_blocks": unet.num_res_blocks,
            "channel_mult": list(unet.channel_mult), "num_head_channels": unet.num_head_channels,
            "use_spatial_transformer": True, "use_linear_in_transformer": True,
            "transformer_depth": list(unet.transformer_depth), "context_dim": unet.context_dim,
            "spatial_transformer_attn_type": "softmax-xformers", "legacy": False}},
        "conditioner_config": {"target": "sgm.modules.GeneralConditioner",
                               "params": {"emb_models": ([] if refiner else [clip]) + [bigg] + vectors}},
        "first_stage_config": {"target": "sgm.models.autoencoder.AutoencoderKLInferenceWrapper", "params": {
            "embed_dim": 4, "monitor": "val/rec_loss",
            "ddconfig": {"attn_type": "vanilla-xformers", "double_z": True, "z_channels": 4, "resolution": 256,
                         "in_channels": 3, "out_ch": 3, "ch": vae.base_channels, "ch_mult": list(vae.channel_mult),
                         "num_res_blocks": vae.num_res_blocks, "attn_resolutions": [], "dropout": 0.0},
            "lossconfig": {"target": "torch.nn.Identity"}}}}}}


def bare_file(tmp_path, refiner: bool):
    """A random-weight SDXL file without a stored config -> (its pipeline, the file)."""
    from safetensors.torch import load_file, save_file

    from ldm.formats.single_file_write import save_single_file

    torch.manual_seed(9)
    pipe = Txt2ImgPipeline.from_config(inferable_sdxl_config(refiner=refiner))
    perturb_zero_initialised([pipe.unet, pipe.vae])
    save_single_file(pipe, tmp_path / "written.safetensors")
    save_file(load_file(str(tmp_path / "written.safetensors")), str(tmp_path / "model.safetensors"))
    return pipe, tmp_path / "model.safetensors"


@pytest.mark.parametrize("refiner", [False, True], ids=["base", "refiner"])
def test_sgm_yaml_beside_the_file_is_its_config(tmp_path, refiner):
    """The YAML gives what the weights cannot: here v prediction (VScaling); the rest equals the weights'."""
    pipe, path = bare_file(tmp_path, refiner)
    write_yaml(sgm_yaml(pipe.config, refiner=refiner, scaling="VScaling"), path.with_suffix(".yaml"))
    loaded = Txt2ImgPipeline.from_single_file(path)
    expected = dataclasses.replace(pipe.config, schedule=dataclasses.replace(pipe.config.schedule, prediction="v"))
    assert loaded.config == expected
    pipe.replace_config_sections({"schedule": {"prediction": "v"}})
    options = dict(steps=2, guidance_scale=5.0, seed=1, height=32, width=32, output_type="pt")
    assert torch.equal(loaded(PROMPT, NEGATIVE, **options), pipe(PROMPT, NEGATIVE, **options))
    write_yaml(sgm_yaml(pipe.config, refiner=refiner), tmp_path / "eps.yaml")  # config= wins over the one beside
    assert Txt2ImgPipeline.from_single_file(path, tmp_path / "eps.yaml").config.schedule.prediction == "eps"


def test_sgm_yaml_options_we_do_not_run_are_one_line_errors(tmp_path):
    pipe, path = bare_file(tmp_path, refiner=False)
    good = sgm_yaml(pipe.config, refiner=False)

    def refused(edit, match: str) -> None:
        data = sgm_yaml(pipe.config, refiner=False)
        edit(data["model"]["params"])
        write_yaml(data, tmp_path / "bad.yaml")
        with pytest.raises(ConfigError, match=match) as error:
            Txt2ImgPipeline.from_single_file(path, tmp_path / "bad.yaml")
        assert str(error.value).count("bad.yaml") == 1 and "\n" not in str(error.value)

    refused(lambda p: p["denoiser_config"]["params"]["scaling_config"].update(
        target="sgm.modules.diffusionmodules.denoiser_scaling.EDMScaling"), "EDMScaling")
    refused(lambda p: p["denoiser_config"]["params"]["discretization_config"].update(
        target="sgm.modules.diffusionmodules.discretizer.EDMDiscretization"), "LegacyDDPMDiscretization")
    refused(lambda p: p["conditioner_config"]["params"]["emb_models"][0]["params"].update(layer="last"),
            "penultimate")
    refused(lambda p: p["conditioner_config"]["params"]["emb_models"][4].update(input_key="aesthetic_score"),
            "aesthetic_score")
    refused(lambda p: p["conditioner_config"]["params"]["emb_models"].pop(0), "FrozenCLIPEmbedder")
    refused(lambda p: p["network_config"]["params"].update(use_scale_shift_norm=True), "use_scale_shift_norm")
    refused(lambda p: p.pop("first_stage_config"), "first_stage_config")
    write_yaml(good, tmp_path / "good.yaml")
    assert Txt2ImgPipeline.from_single_file(path, tmp_path / "good.yaml").config == pipe.config
