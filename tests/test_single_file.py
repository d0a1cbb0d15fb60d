"""Original single-file checkpoints: detection, strict and safe loading, EMA, VAE files, round trips,
agreement with diffusers' own ``from_single_file``, and the convert / txt2img command lines."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from ldm.models.builder import perturb_zero_initialised
from tests.conftest import tiny_pipeline, tiny_pipeline_config

ROOT = Path(__file__).resolve().parent.parent
PROMPT, NEGATIVE = "a red bicycle on a blue background", "blurry"
SAMPLE = dict(steps=4, guidance_scale=5.0, sampler="euler", height=32, width=32, output_type="pt")
UNET, VAE, TEXT = "model.diffusion_model.", "first_stage_model.", "cond_stage_model."


# --------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------


def original_keys(pipe, *, ema_unet=None) -> dict[str, torch.Tensor]:
    """A pipeline's weights as CompVis code saves them, written out by hand (independent of our writer):
    prefixed keys, SD 1.x ``position_ids``, LitEma names, DDPM schedule buffers."""
    from ldm.sampling.schedule import NoiseSchedule

    state = {UNET + k: v.clone() for k, v in pipe.unet.state_dict().items()}
    state |= {VAE + k: v.clone() for k, v in pipe.vae.state_dict().items()}
    state |= {TEXT + k: v.clone() for k, v in pipe.text_encoder.state_dict().items()}
    if pipe.config.text_encoder.kind == "clip":
        state[TEXT + "transformer.text_model.embeddings.position_ids"] = torch.arange(77).unsqueeze(0)
    schedule = NoiseSchedule(pipe.config.schedule)
    state["betas"], state["alphas_cumprod"] = schedule.betas.float(), schedule.alphas_cumprod.float()
    if ema_unet is not None:
        # CompVis LitEma: one buffer per parameter of DiffusionWrapper, dots removed from the name.
        state |= {"model_ema." + ("diffusion_model." + k).replace(".", ""): v for k, v in ema_unet.items()}
        state["model_ema.decay"] = torch.tensor(0.9999)
        state["model_ema.num_updates"] = torch.tensor(7, dtype=torch.int32)
    return state


def assert_bitwise(a: dict, b: dict) -> None:
    assert sorted(a) == sorted(b)
    different = [k for k in a if a[k].dtype != b[k].dtype or not torch.equal(a[k], b[k])]
    assert not different, different[:5]


def one_line_error(error_info) -> str:
    message = str(error_info.value)
    assert "\n" not in message and message
    return message


def load_script(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def oracle_config(text_kind: str, prediction: str):
    """A tiny config every part of which a CompVis YAML plus the weights can express (32 norm groups,
    64-channel text heads), so ours and diffusers read the same YAML."""
    from dataclasses import replace

    from ldm.models.text_encoders import TextEncoderConfig

    config = tiny_pipeline_config(prediction=prediction, text_kind=text_kind)
    openclip = text_kind == "openclip"
    return replace(
        config,
        unet=replace(config.unet, norm_groups=32, context_dim=64),
        vae=replace(config.vae, base_channels=32, norm_groups=32),
        text_encoder=TextEncoderConfig(kind=text_kind, width=64, layers=2, heads=1,
                                       act="gelu" if openclip else "quick_gelu",
                                       layer="penultimate" if openclip else "last",
                                       pad="zero" if openclip else "eot", projection_dim=64),
    )


@pytest.fixture(scope="module")
def sd1(tmp_path_factory):
    """A tiny SD 1.x-style pipeline and its original single file (no metadata, as in the wild)."""
    pipe = tiny_pipeline(seed=3)
    path = tmp_path_factory.mktemp("sd1") / "tiny-sd1.safetensors"
    save_file(original_keys(pipe), str(path))
    return pipe, path


@pytest.fixture(scope="module")
def sd2(tmp_path_factory):
    """A tiny SD 2.x-style pipeline (OpenCLIP, penultimate layer, linear projections) and its file."""
    pipe = tiny_pipeline(seed=5, text_kind="openclip")
    path = tmp_path_factory.mktemp("sd2") / "tiny-sd2.safetensors"
    save_file(original_keys(pipe), str(path))
    return pipe, path


# --------------------------------------------------------------------------------------------
# Detection on full-size key sets (meta device: shapes only, no memory)
# --------------------------------------------------------------------------------------------


def full_size_parts(config):
    from autoencoder.model import AutoencoderKL
    from ldm.models.text_encoders import build_text_encoder
    from ldm.models.unet import UNetModel

    with torch.device("meta"):
        return {"unet": UNetModel(config.unet).state_dict(), "vae": AutoencoderKL(config.vae).state_dict(),
                "text_encoder": build_text_encoder(config.text_encoder).state_dict()}


def test_full_size_sd1_and_sd2_are_detected_and_match_the_shipped_yamls():
    from autoencoder.model import AutoencoderConfig
    from ldm.config import PipelineConfig, SamplingDefaults
    from ldm.sampling.schedule import ScheduleConfig
    from ldm.formats.compvis import config_from_compvis
    from ldm.formats.single_file import OriginalCheckpoint
    from ldm.formats.single_file_config import infer_config
    from ldm.formats.single_file_write import check_fits
    from ldm.models.text_encoders import TextEncoderConfig
    from ldm.models.unet import UNetConfig

    sd1 = PipelineConfig(UNetConfig(), AutoencoderConfig(), TextEncoderConfig.sd1(), ScheduleConfig(),
                         SamplingDefaults())
    sd2_unet = UNetConfig(num_heads=-1, num_head_channels=64, context_dim=1024, use_linear_in_transformer=True,
                          upcast_attention=True)
    sd2 = PipelineConfig(sd2_unet, AutoencoderConfig(), TextEncoderConfig.sd2(), ScheduleConfig(), SamplingDefaults())
    sd2_v = PipelineConfig(sd2_unet, AutoencoderConfig(), TextEncoderConfig.sd2(), ScheduleConfig(prediction="v"),
                           SamplingDefaults(height=768, width=768))
    for expected, yaml_name in ((sd1, "sd-v1-inference.yaml"), (sd2, "sd-v2-inference.yaml"),
                                (sd2_v, "sd-v2-inference-v.yaml")):
        parts = full_size_parts(expected)
        assert len(parts["unet"]) == 686  # SD 1.x/2.x U-Net tensors
        assert infer_config(parts, prediction=expected.schedule.prediction) == expected, yaml_name
        data = yaml.safe_load((ROOT / "configs" / yaml_name).read_text())
        assert config_from_compvis(data, parts, source=yaml_name) == expected, yaml_name
        check_fits(OriginalCheckpoint(expected, parts, None, None, {}, False, yaml_name))  # strict, on meta

    # An SD 2.x text encoder exported from diffusers (23 blocks, no text_projection / logit_scale)
    # is read as the 23-layer GELU CLIP tower diffusers itself uses; the v YAML agrees.
    exported = {k: v for k, v in full_size_parts(sd2)["text_encoder"].items()
                if ".resblocks.23." not in k and k not in ("model.text_projection", "model.logit_scale")}
    parts = {**full_size_parts(sd2), "text_encoder": exported}
    text = infer_config(parts).text_encoder
    assert (text.kind, text.layers, text.layer, text.act, text.pad, text.width) == \
        ("clip", 23, "last", "gelu", "zero", 1024)
    data = yaml.safe_load((ROOT / "configs" / "sd-v2-inference-v.yaml").read_text())
    assert config_from_compvis(data, parts).text_encoder == text


def test_ema_names_follow_compvis_litema():
    from ldm.formats.single_file import ema_key

    # LitEma(DiffusionWrapper): "diffusion_model." + name, every dot removed, under "model_ema."
    assert ema_key("input_blocks.1.0.in_layers.0.weight") == "model_ema.diffusion_modelinput_blocks10in_layers0weight"
    assert ema_key("out.2.bias") == "model_ema.diffusion_modelout2bias"


# --------------------------------------------------------------------------------------------
# Round trips
# --------------------------------------------------------------------------------------------


def test_sd1_original_to_ours_to_diffusers_to_ours_to_original_is_bitwise(sd1, tmp_path):
    from ldm.pipeline import Txt2ImgPipeline
    from ldm.formats.single_file import SCHEDULE_BUFFERS
    from ldm.formats.single_file_write import save_single_file

    pipe, path = sd1
    ours = Txt2ImgPipeline.from_single_file(path, pipe.config)
    ours.save_pretrained(tmp_path / "diffusers", format="diffusers")
    back = Txt2ImgPipeline.from_pretrained(tmp_path / "diffusers")
    save_single_file(back, tmp_path / "back.safetensors")

    original = {k: v for k, v in load_file(str(path)).items() if k not in SCHEDULE_BUFFERS}
    assert_bitwise(load_file(str(tmp_path / "back.safetensors")), original)
    # The written file carries its config: it loads with no config at all, to the same images.
    again = Txt2ImgPipeline.from_pretrained(tmp_path / "back.safetensors")
    assert torch.equal(again(PROMPT, seed=2, **SAMPLE), pipe(PROMPT, seed=2, **SAMPLE))


def test_sd2_round_trips(sd2, tmp_path):
    """Original -> ours -> original is bitwise. Through diffusers the text encoder drops what diffusers drops
    (the unused last block, text_projection, logit_scale); everything else is bitwise, images are equal."""
    from ldm.pipeline import Txt2ImgPipeline
    from ldm.formats.single_file import SCHEDULE_BUFFERS
    from ldm.formats.single_file_write import save_single_file

    pipe, path = sd2
    original = {k: v for k, v in load_file(str(path)).items() if k not in SCHEDULE_BUFFERS}
    ours = Txt2ImgPipeline.from_single_file(path, pipe.config)
    save_single_file(ours, tmp_path / "direct.safetensors")
    assert_bitwise(load_file(str(tmp_path / "direct.safetensors")), original)

    ours.save_pretrained(tmp_path / "diffusers", format="diffusers")
    back = Txt2ImgPipeline.from_pretrained(tmp_path / "diffusers")
    save_single_file(back, tmp_path / "back.safetensors")
    dropped = [k for k in original if ".resblocks.1." in k or k.endswith(("text_projection", "logit_scale"))]
    assert len(dropped) == 14  # 12 tensors of the last block + 2
    assert_bitwise(load_file(str(tmp_path / "back.safetensors")),
                   {k: v for k, v in original.items() if k not in dropped})
    reread = Txt2ImgPipeline.from_single_file(tmp_path / "back.safetensors")
    assert torch.equal(reread(PROMPT, NEGATIVE, seed=4, **SAMPLE), pipe(PROMPT, NEGATIVE, seed=4, **SAMPLE))


# --------------------------------------------------------------------------------------------
# diffusers' own single-file loader as the oracle
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("text_kind, prediction", [("clip", "eps"), ("openclip", "v")])
def test_same_tensors_and_image_as_diffusers_from_single_file(tmp_path, text_kind, prediction):
    """diffusers reads the U-Net and VAE config from the CompVis YAML; for the text encoder, tokenizer and
    scheduler it needs a diffusers folder (with only the YAML it downloads openai/clip-vit-large-patch14's
    config from the hub). A local folder holding configs only, no weights, serves offline."""
    import diffusers

    from ldm.formats import text_keys as text_keymap
    from ldm.formats import unet_keys as unet_keymap
    from ldm.formats import vae_keys as vae_keymap
    from ldm.pipeline import Txt2ImgPipeline
    from ldm.formats.compvis import save_compvis_yaml

    config = oracle_config(text_kind, prediction)
    torch.manual_seed(11)
    made = Txt2ImgPipeline.from_config(config)
    perturb_zero_initialised([made.unet, made.vae])
    save_file(original_keys(made), str(tmp_path / "model.safetensors"))
    save_compvis_yaml(config, tmp_path / "model.yaml")
    made.save_pretrained(tmp_path / "configs-only", format="diffusers")
    for weights in (tmp_path / "configs-only").glob("*/*.safetensors"):
        weights.unlink()

    ours = Txt2ImgPipeline.from_single_file(tmp_path / "model.safetensors", tmp_path / "model.yaml")
    assert ours.config.unet == config.unet and ours.config.vae == config.vae
    assert ours.config.text_encoder == config.text_encoder and ours.config.schedule == config.schedule
    theirs = diffusers.StableDiffusionPipeline.from_single_file(
        str(tmp_path / "model.safetensors"), original_config=str(tmp_path / "model.yaml"),
        config=str(tmp_path / "configs-only"), local_files_only=True, safety_checker=None)

    for name, keymap in (("unet", unet_keymap), ("vae", vae_keymap), ("text_encoder", text_keymap)):
        mine = keymap.to_diffusers(getattr(ours, name).state_dict(), getattr(config, name))
        other = {k: v for k, v in getattr(theirs, name).state_dict().items() if not k.endswith("position_ids")}
        if name == "text_encoder":  # transformers 5 drops the text_model. level
            other = {(k if k.startswith("text_model.") else "text_model." + k): v for k, v in other.items()}
        assert_bitwise(mine, other)

    assert theirs.scheduler.config.prediction_type == {"eps": "epsilon", "v": "v_prediction"}[prediction]
    theirs.scheduler = diffusers.EulerDiscreteScheduler.from_config(theirs.scheduler.config)
    theirs.set_progress_bar_config(disable=True)
    image = theirs(PROMPT, negative_prompt=NEGATIVE, num_inference_steps=4, guidance_scale=5.0, height=32, width=32,
                   generator=torch.Generator("cpu").manual_seed(3), output_type="pt").images
    assert (ours(PROMPT, NEGATIVE, seed=3, **SAMPLE) - image).abs().max().item() < 1e-4


# --------------------------------------------------------------------------------------------
# Configuration sources, prediction, EMA, VAE files
# --------------------------------------------------------------------------------------------


def test_prediction_comes_from_yaml_beside_file_or_flag(tmp_path):
    from ldm.pipeline import Txt2ImgPipeline
    from ldm.formats.compvis import save_compvis_yaml
    from ldm.formats.single_file import read_single_file

    config = oracle_config("clip", "v")
    torch.manual_seed(0)
    save_file(original_keys(Txt2ImgPipeline.from_config(config)), str(tmp_path / "m.safetensors"))
    save_compvis_yaml(config, tmp_path / "v.yaml")
    assert yaml.safe_load((tmp_path / "v.yaml").read_text())["model"]["params"]["parameterization"] == "v"

    def read(*args, **kwargs):
        return read_single_file(tmp_path / "m.safetensors", *args, **kwargs).config

    assert read(tmp_path / "v.yaml").schedule.prediction == "v"
    assert read(tmp_path / "v.yaml", prediction="eps").schedule.prediction == "eps"
    (tmp_path / "v.yaml").rename(tmp_path / "m.yaml")  # AUTOMATIC1111's convention: same name, beside it
    beside = read()
    assert (beside.unet, beside.vae, beside.text_encoder, beside.schedule) == \
        (config.unet, config.vae, config.text_encoder, config.schedule)
    (tmp_path / "m.yaml").unlink()  # inferred from the weights: eps unless told
    assert read().schedule.prediction == "eps"
    assert read(prediction="v").schedule.prediction == "v"


def test_ema_weights_are_chosen_and_named_as_compvis_does(sd1, tmp_path):
    from ldm.config import save_config
    from ldm.errors import CheckpointError
    from ldm.formats.single_file import read_single_file

    pipe, _ = sd1
    training = pipe.unet.state_dict()
    ema = {k: v + 0.01 for k, v in training.items()}
    path = tmp_path / "full-ema.safetensors"
    save_file(original_keys(pipe, ema_unet=ema), str(path))

    auto = read_single_file(path, pipe.config)
    assert auto.used_ema and all(torch.equal(auto.parts["unet"][k], ema[k]) for k in ema)
    no_ema = read_single_file(path, pipe.config, ema=False)
    assert not no_ema.used_ema and all(torch.equal(no_ema.parts["unet"][k], training[k]) for k in training)

    _, plain = sd1
    with pytest.raises(CheckpointError, match="no EMA weights") as error:
        read_single_file(plain, pipe.config, ema=True)
    one_line_error(error)
    state = load_file(str(path))
    del state["model_ema.diffusion_modelout2bias"]
    save_file(state, str(tmp_path / "broken-ema.safetensors"))
    with pytest.raises(CheckpointError, match="EMA U-Net.*missing: model_ema.diffusion_modelout2bias"):
        read_single_file(tmp_path / "broken-ema.safetensors", pipe.config)

    convert = load_script("convert_checkpoint")
    config_yaml = tmp_path / "config.yaml"
    save_config(pipe.config, config_yaml)
    for flags, expect_unet, expect_ema in (([], training, True), (["--ema-only"], ema, False),
                                           (["--no-ema"], training, False)):
        out = tmp_path / f"out{'-'.join(flags)}.safetensors"
        assert convert.main([str(path), str(out), "--to", "original", "--config", str(config_yaml), "--quiet",
                             *flags]) == 0
        written = load_file(str(out))
        assert all(torch.equal(written[UNET + k], expect_unet[k]) for k in expect_unet)
        assert any(k.startswith("model_ema.") for k in written) == expect_ema
        if expect_ema:  # lossless: every tensor of the input but the schedule buffers
            assert_bitwise(written, {k: v for k, v in load_file(str(path)).items()
                                     if k not in ("betas", "alphas_cumprod")})


def test_separate_vae_file_in_any_layout_replaces_the_checkpoints(sd1, tmp_path):
    from ldm.formats import vae_keys as vae_keymap
    from ldm.pipeline import Txt2ImgPipeline
    from ldm.formats.single_file import read_single_file

    pipe, path = sd1
    other_vae = {k: torch.randn_like(v) for k, v in pipe.vae.state_dict().items()}
    layouts = {
        "plain.safetensors": {**other_vae, "loss.logvar": torch.zeros(())},  # as VAE releases ship them
        "prefixed.safetensors": {VAE + k: v for k, v in other_vae.items()},
        "diffusers.safetensors": vae_keymap.to_diffusers(other_vae, pipe.config.vae),
    }
    for name, state in layouts.items():
        save_file({k: v.contiguous() for k, v in state.items()}, str(tmp_path / name))
        got = read_single_file(path, pipe.config, vae=tmp_path / name).parts["vae"]
        assert_bitwise(got, other_vae)
    loaded = Txt2ImgPipeline.from_single_file(path, pipe.config, vae=tmp_path / "plain.safetensors")
    assert_bitwise(loaded.vae.state_dict(), other_vae)


def test_early_sd1_text_key_names_load_and_a_different_stored_schedule_warns(sd1, tmp_path, caplog):
    """Early SD 1.x files name CLIP keys without ``text_model.`` (transformers < 4.20)."""
    from ldm.formats.single_file import read_single_file

    pipe, path = sd1
    state = load_file(str(path))
    old_names = {k.replace("transformer.text_model.", "transformer."): v for k, v in state.items()}
    old_names["alphas_cumprod"] = torch.linspace(0.99, 0.01, 1000)  # not the SD schedule
    save_file(old_names, str(tmp_path / "old.safetensors"))
    with caplog.at_level("WARNING"):
        old = read_single_file(tmp_path / "old.safetensors", pipe.config)
    assert_bitwise(old.parts["text_encoder"], read_single_file(path, pipe.config).parts["text_encoder"])
    assert "alphas_cumprod differ from the configured schedule" in caplog.text


# --------------------------------------------------------------------------------------------
# Safety and errors
# --------------------------------------------------------------------------------------------


def _create_marker(path: str) -> dict:
    """The payload of the malicious pickle: proof that code ran."""
    Path(path).write_text("code ran")
    return {}


class _Malicious:
    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return _create_marker, (self.marker,)


def test_ckpt_loads_weights_only_and_a_code_running_pickle_is_refused(sd1, tmp_path):
    from ldm.errors import CheckpointError
    from ldm.formats.single_file import read_single_file

    pipe, path = sd1
    good = tmp_path / "model.ckpt"
    torch.save({"state_dict": load_file(str(path)), "global_step": 470000}, good)
    from_ckpt, from_safetensors = read_single_file(good, pipe.config), read_single_file(path, pipe.config)
    for name in ("unet", "vae", "text_encoder"):
        assert_bitwise(from_ckpt.parts[name], from_safetensors.parts[name])

    marker = tmp_path / "marker.txt"
    evil = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {"model.diffusion_model.out.2.bias": _Malicious(marker)}}, evil)
    with pytest.raises(CheckpointError, match="refusing to load") as error:
        read_single_file(evil, pipe.config)
    one_line_error(error)
    assert not marker.exists()
    torch.load(evil, weights_only=False)  # the payload is live: an unsafe loader runs it
    assert marker.read_text() == "code ran"


def test_broken_and_foreign_files_give_one_line_errors(sd1, tmp_path):
    from ldm.errors import CheckpointError, LdmError
    from ldm.pipeline import Txt2ImgPipeline
    from ldm.formats.single_file import read_single_file

    pipe, path = sd1
    data = path.read_bytes()
    (tmp_path / "truncated.safetensors").write_bytes(data[: len(data) // 2])
    (tmp_path / "empty.safetensors").write_bytes(b"")
    save_file({k: v for k, v in pipe.vae.state_dict().items()}, str(tmp_path / "vae.safetensors"))
    save_file({"conditioner.embedders.0.transformer.text_model.final_layer_norm.weight": torch.ones(2),
               "model.diffusion_model.out.2.bias": torch.ones(2)}, str(tmp_path / "sdxl.safetensors"))
    cases = {
        "truncated.safetensors": "corrupt or truncated",
        "empty.safetensors": "empty",
        "vae.safetensors": "only VAE weights",
        "sdxl.safetensors": "SDXL",
        "missing.safetensors": "not found",
    }
    for name, expected in cases.items():
        with pytest.raises(CheckpointError, match=expected) as error:
            Txt2ImgPipeline.from_single_file(tmp_path / name)
        one_line_error(error)
    # Wrong architecture: SD 1.x weights with an SD 2.x config, and with no config at all for a
    # tiny model whose sizes differ from what inference assumes.
    with pytest.raises(CheckpointError, match="OpenCLIP text encoder") as error:
        read_single_file(path, tiny_pipeline_config(text_kind="openclip"))
    one_line_error(error)
    with pytest.raises(LdmError) as error:
        Txt2ImgPipeline.from_single_file(path)
    one_line_error(error)


def test_keys_that_do_not_fit_are_named(sd1, tmp_path):
    from ldm.errors import CheckpointError
    from ldm.pipeline import Txt2ImgPipeline

    pipe, path = sd1
    state = load_file(str(path))
    edits = {
        "unexpected: input_blocks.1.0.extra.weight": {UNET + "input_blocks.1.0.extra.weight": torch.ones(1)},
        "missing: out.2.bias": {UNET + "out.2.bias": None},
        r"shape mismatch: out.2.weight \(4, 32, 3, 1\) vs \(4, 32, 3, 3\)":
            {UNET + "out.2.weight": state[UNET + "out.2.weight"][..., :1].contiguous()},
        "outside model.diffusion_model.*: ema_scheduler.step": {"ema_scheduler.step": torch.ones(1)},
    }
    for expected, change in edits.items():
        broken = {**state, **change}
        broken = {k: v for k, v in broken.items() if v is not None}
        save_file(broken, str(tmp_path / "broken.safetensors"))
        with pytest.raises(CheckpointError, match=expected) as error:
            Txt2ImgPipeline.from_single_file(tmp_path / "broken.safetensors", pipe.config)
        one_line_error(error)


# --------------------------------------------------------------------------------------------
# Command lines
# --------------------------------------------------------------------------------------------


def test_convert_script_writes_fp16_diffusers_and_native_and_reports_errors(sd2, tmp_path, capsys):
    from ldm.config import save_config
    from ldm.pipeline import Txt2ImgPipeline

    pipe, path = sd2
    convert = load_script("convert_checkpoint")
    save_config(pipe.config, tmp_path / "config.yaml")
    out = tmp_path / "diffusers"
    assert convert.main([str(path), str(out), "--to", "diffusers", "--fp16", "--config",
                         str(tmp_path / "config.yaml"), "--quiet"]) == 0
    assert load_file(str(out / "unet" / "diffusion_pytorch_model.safetensors"))["conv_in.weight"].dtype == torch.float16
    assert convert.main([str(out), str(tmp_path / "native"), "--to", "native", "--quiet"]) == 0
    native = Txt2ImgPipeline.from_pretrained(tmp_path / "native")
    assert torch.equal(native.unet.state_dict()["out.2.weight"], pipe.unet.state_dict()["out.2.weight"].half().float())

    capsys.readouterr()
    errors = [
        ([str(path), str(tmp_path / "x.ckpt"), "--to", "original"], "writes a .safetensors file"),
        ([str(tmp_path / "nope.safetensors"), str(tmp_path / "y"), "--to", "native"], "input not found"),
        ([str(out), str(tmp_path / "z"), "--to", "native", "--prediction", "v"], "apply to single-file input"),
    ]
    for argv, expected in errors:
        with pytest.raises(SystemExit) as exit_info:
            convert.main(argv)
        assert exit_info.value.code == 2
        err = capsys.readouterr().err
        assert expected in err and err.count("\n") == 1
    (tmp_path / "bad.safetensors").write_bytes(b"\x00" * 10)
    assert convert.main([str(tmp_path / "bad.safetensors"), str(tmp_path / "w"), "--to", "native", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "corrupt or truncated" in err and err.count("\n") == 1


def test_txt2img_runs_a_single_file_with_config_and_rejects_flags_for_folders(sd1, tmp_path, capsys):
    from ldm.config import save_config

    pipe, path = sd1
    txt2img = load_script("txt2img")
    save_config(pipe.config, tmp_path / "config.yaml")
    assert txt2img.main(["a red bicycle", "--model", str(path), "--config", str(tmp_path / "config.yaml"),
                         "--steps", "2", "--outdir", str(tmp_path / "out"), "--quiet"]) == 0
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["00000-0.png"]
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        txt2img.main(["a cat", "--prediction", "v"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "single-file checkpoint" in err and err.count("\n") == 1
