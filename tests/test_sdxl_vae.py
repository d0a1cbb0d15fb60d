"""SDXL's VAE (scaling factor 0.13025): a separate VAE file through ``txt2img.py --vae``, and the float32
retry of a float16 decode that overflows (SDXL's VAE is known to; issue 13, item 4).

Oracles: for ``--vae``, the pipeline loaded from the same checkpoint with its VAE weights replaced by
hand (our own module names, so no key conversion of the code under test is involved); for the retry,
the same latents decoded by a float32 copy of the VAE.
"""

from __future__ import annotations

import copy
import logging

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from tests.test_sdxl import NEGATIVE, PROMPT, inferable_sdxl_config, tiny_sdxl_pipeline

SDXL_SCALING_FACTOR = 0.13025


def _pixels(image: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.array(image.convert("RGB"))).to(torch.int16)


@pytest.fixture(scope="module")
def sdxl_checkpoint(tmp_path_factory):
    """``(path, other_vae)``: an SDXL base single file with no stored config (everything, the VAE's
    scaling factor included, is read from its weights, as for a downloaded checkpoint), and a second set
    of random VAE weights with our (original) key names."""
    from ldm.formats.single_file_write import save_single_file
    from ldm.models.builder import perturb_zero_initialised
    from ldm.pipeline import Txt2ImgPipeline

    folder = tmp_path_factory.mktemp("sdxl_vae")
    torch.manual_seed(4)
    pipe = Txt2ImgPipeline.from_config(inferable_sdxl_config())
    perturb_zero_initialised([pipe.unet, pipe.vae])
    save_single_file(pipe, folder / "with-config.safetensors")
    save_file(load_file(str(folder / "with-config.safetensors")), str(folder / "tiny_sdxl.safetensors"))
    generator = torch.Generator().manual_seed(9)
    # The checkpoint's weights perturbed by half their spread: different images at the same scale.
    other_vae = {k: (v + 0.5 * v.std() * torch.randn(v.shape, generator=generator) if v.numel() > 1 else v)
                 for k, v in pipe.vae.state_dict().items()}
    return folder / "tiny_sdxl.safetensors", other_vae


def _vae_file(path, other_vae, layout: str) -> dict[str, torch.Tensor]:
    """Write ``other_vae`` as a standalone SDXL VAE release does; return the weights as stored (our names).

    ``original``: as Stability's ``sdxl_vae.safetensors`` (CompVis names without ``first_stage_model.``),
    plus a training-only ``loss.*`` tensor as some VAE releases keep. ``diffusers``: as madebyollin's
    sdxl-vae-fp16-fix ``diffusion_pytorch_model.safetensors`` (``AutoencoderKL`` names), stored in float16
    (as diffusers' ``.fp16`` variant files are) so that loading also casts it to the pipeline's dtype.
    """
    from ldm.formats import vae_keys

    if layout == "original":
        save_file({**other_vae, "loss.logvar": torch.zeros(())}, str(path))
        return other_vae
    stored = {k: v.half() for k, v in other_vae.items()}
    renamed = vae_keys.to_diffusers(stored, inferable_sdxl_config().vae)
    save_file({k: v.contiguous() for k, v in renamed.items()}, str(path))
    return {k: v.float() for k, v in stored.items()}


@pytest.mark.parametrize("layout, name", [("original", "sdxl_vae.safetensors"),
                                          ("diffusers", "diffusion_pytorch_model.safetensors")])
def test_txt2img_vae_file_replaces_the_sdxl_checkpoints_vae(sdxl_checkpoint, tmp_path, layout, name):
    from ldm.cli import txt2img
    from ldm.pipeline import Txt2ImgPipeline

    checkpoint, other_vae = sdxl_checkpoint
    expected_vae = _vae_file(tmp_path / name, other_vae, layout)
    out = tmp_path / "out"
    assert txt2img.main([PROMPT, "--negative-prompt", NEGATIVE, "--model", str(checkpoint), "--vae",
                         str(tmp_path / name), "--outdir", str(out), "--seed", "5", "--steps", "2", "--H", "32",
                         "--W", "32", "--quiet"]) == 0
    written = Image.open(out / "00000-5.png")

    loaded = Txt2ImgPipeline.from_single_file(checkpoint, vae=tmp_path / name)
    assert loaded.config.is_sdxl and loaded.config.vae.scaling_factor == SDXL_SCALING_FACTOR
    own = Txt2ImgPipeline.from_single_file(checkpoint)
    assert own.config == loaded.config  # the VAE file changes weights only
    options = dict(seed=5, steps=2, height=32, width=32)
    own_image = own(PROMPT, NEGATIVE, **options)[0]
    own.vae.load_state_dict(expected_vae, strict=True)  # the oracle: the VAE swapped by hand
    swapped_image = own(PROMPT, NEGATIVE, **options)[0]
    assert torch.equal(_pixels(written), _pixels(swapped_image))
    assert (_pixels(written) - _pixels(own_image)).abs().float().mean() > 5  # not the checkpoint's own VAE


def test_float16_sdxl_vae_that_overflows_is_decoded_again_in_float32(monkeypatch, caplog):
    pipe = tiny_sdxl_pipeline(seed=3).to("cpu", torch.float16)
    with torch.no_grad():
        # SDXL's overflow is inside the decoder: activations past float16's 65504 that the group norms
        # would scale back. Scaling the first decoder convolution reproduces that: inf in float16, while
        # in float32 the norms absorb the factor and the image stays an ordinary (unsaturated) one.
        pipe.vae.decoder.conv_in.weight.mul_(3e4)
        pipe.vae.decoder.conv_in.bias.mul_(3e4)
    decoded = []
    decode = pipe.decode
    monkeypatch.setattr(pipe, "decode", lambda z, **kw: decoded.append(z.clone()) or decode(z, **kw))
    with caplog.at_level(logging.WARNING, logger="ldm.pipeline"):
        images = pipe(PROMPT, NEGATIVE, steps=3, seed=2, output_type="pt")
    (z,) = decoded
    assert "decoding again in float32" in caplog.text
    assert z.dtype == torch.float32 and torch.isfinite(z).all()
    with torch.no_grad():
        assert not torch.isfinite(pipe.vae.decode_latents(z.half())).all()  # the float16 decode overflows
        full = copy.deepcopy(pipe.vae).float()
        assert full.config.scaling_factor == SDXL_SCALING_FACTOR
        expected = (full.decode_latents(z) / 2 + 0.5).clamp(0, 1)
    assert images.dtype == torch.float32 and torch.isfinite(images).all()
    assert (images - expected).abs().max() < 1e-5
    assert 0.05 < expected.mean() < 0.95 and expected.std() > 0.01  # a real image, not clamped to 0 or 1


@pytest.mark.parametrize("layout", ["original", "diffusers"])
def test_sdxl_checkpoint_without_a_vae_reads_the_vae_files_architecture(sdxl_checkpoint, tmp_path, layout):
    """A checkpoint shipped without ``first_stage_model.*`` ("no VAE" releases) plus a VAE file in either
    layout loads as the complete checkpoint does with that file (the VAE config read from the file)."""
    from ldm.pipeline import Txt2ImgPipeline

    checkpoint, other_vae = sdxl_checkpoint
    without_vae = tmp_path / "no_vae.safetensors"
    save_file({k: v for k, v in load_file(str(checkpoint)).items() if not k.startswith("first_stage_model.")},
              str(without_vae))
    expected_vae = _vae_file(tmp_path / "vae.safetensors", other_vae, layout)
    loaded = Txt2ImgPipeline.from_single_file(without_vae, vae=tmp_path / "vae.safetensors")
    assert loaded.config == Txt2ImgPipeline.from_single_file(checkpoint).config
    assert loaded.config.vae.scaling_factor == SDXL_SCALING_FACTOR
    state = loaded.vae.state_dict()
    assert state.keys() == expected_vae.keys() and all(torch.equal(state[k], expected_vae[k]) for k in state)
