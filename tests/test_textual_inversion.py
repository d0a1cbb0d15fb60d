"""Textual-inversion embeddings: the three file layouts, the same image as diffusers' load_textual_inversion
on a tiny model, negative-prompt use, chunk boundaries and the one-line refusals."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from ldm.errors import CheckpointError
from ldm.formats.textual_inversion import read_embedding, read_embeddings_folder
from ldm.models.prompt_encoding import EMBEDDING_PLACEHOLDER, split_into_chunks
from tests.conftest import tiny_pipeline

WIDTH = 32  # the tiny pipeline's text width


def _vectors(n: int, seed: int, width: int = WIDTH) -> torch.Tensor:
    return torch.randn(n, width, generator=torch.Generator().manual_seed(seed)) * 0.5


def write_a1111_pt(path, vectors, name="trained"):
    torch.save({"string_to_token": {"*": 265}, "string_to_param": {"*": torch.nn.Parameter(vectors)},
                "name": name, "step": 1000, "sd_checkpoint": "abc", "sd_checkpoint_name": "model"}, path)
    return path


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    pipe = tiny_pipeline(seed=4)
    folder = tmp_path_factory.mktemp("ti") / "sd"
    pipe.save_pretrained(folder, format="diffusers")
    return folder


def _diffusers_image(folder, loads, prompt, negative):
    import diffusers

    sd = diffusers.StableDiffusionPipeline.from_pretrained(folder, local_files_only=True, safety_checker=None)
    sd.scheduler = diffusers.EulerDiscreteScheduler.from_config(sd.scheduler.config)
    sd.set_progress_bar_config(disable=True)
    for path, token in loads:
        sd.load_textual_inversion(str(path), token=token)
    return sd(prompt, negative_prompt=negative, num_inference_steps=3, guidance_scale=5.0, height=32, width=32,
              generator=torch.Generator().manual_seed(9), output_type="pt").images


def _our_image(folder, loads, prompt, negative):
    from ldm.pipeline import Txt2ImgPipeline

    pipe = Txt2ImgPipeline.from_pretrained(folder)
    for path, token in loads:
        pipe.load_textual_inversion(path, token=token)
    return pipe(prompt, negative, sampler="euler", steps=3, guidance_scale=5.0, seed=9, output_type="pt")


def test_embeddings_give_the_same_image_as_diffusers_load_textual_inversion(saved, tmp_path):
    """A two-vector A1111 .pt in the prompt and a one-vector A1111 .safetensors in the negative prompt."""
    style = write_a1111_pt(tmp_path / "mystyle.pt", _vectors(2, 1))
    save_file({"emb_params": _vectors(1, 2)}, tmp_path / "badquality.safetensors")
    loads = [(style, "mystyle"), (tmp_path / "badquality.safetensors", "badquality")]
    prompt, negative = "a red ball in mystyle, sharp", "badquality, blurry"
    ours = _our_image(saved, loads, prompt, negative)
    theirs = _diffusers_image(saved, loads, prompt, negative)
    assert (ours - theirs).abs().max().item() < 1e-4
    plain = _our_image(saved, [], prompt, negative)
    assert (ours - plain).abs().max().item() > 1e-3  # the embeddings change the image


def test_diffusers_learned_embeds_file_uses_its_own_token(saved, tmp_path):
    save_file({"<cat-toy>": _vectors(1, 3)[0]}, tmp_path / "learned_embeds.safetensors")
    loads = [(tmp_path / "learned_embeds.safetensors", None)]
    prompt = "a <cat-toy> on a table"
    assert (_our_image(saved, loads, prompt, "") - _diffusers_image(saved, loads, prompt, "")).abs().max() < 1e-4


def test_the_three_layouts_read_alike(tmp_path):
    vectors = _vectors(3, 4)
    a1111_pt = read_embedding(write_a1111_pt(tmp_path / "style.pt", vectors))
    save_file({"emb_params": vectors}, tmp_path / "style2.safetensors")
    a1111_st = read_embedding(tmp_path / "style2.safetensors")
    torch.save({"<style>": vectors}, tmp_path / "learned_embeds.bin")
    diffusers_bin = read_embedding(tmp_path / "learned_embeds.bin")
    assert (a1111_pt.token, a1111_st.token, diffusers_bin.token) == ("style", "style2", "<style>")
    for embedding in (a1111_pt, a1111_st, diffusers_bin):
        assert torch.equal(embedding.vectors, vectors)
    assert read_embedding(tmp_path / "style.pt", token="other").token == "other"
    assert [e.token for e in read_embeddings_folder(tmp_path)] == ["learned_embeds", "style", "style2"]


def test_an_embedding_is_never_split_across_chunks():
    pipe = tiny_pipeline(seed=4)
    tokenizer = pipe.text_encoder.tokenizer
    size = tokenizer.max_length - 2
    vectors = _vectors(3, 5)
    filler = " ".join(["red"] * (size - 2))  # leaves 2 places in the first chunk: 3 vectors do not fit
    chunks = split_into_chunks(tokenizer, f"{filler} mystyle ball", {"mystyle": vectors})
    assert len(chunks) == 2 and len(chunks[0].tokens) == size - 2
    assert chunks[1].tokens[:3] == [EMBEDDING_PLACEHOLDER] * 3 and chunks[1].embeddings[0][0] == 0
    assert torch.equal(chunks[1].embeddings[0][1], vectors)
    weighted = split_into_chunks(tokenizer, "(mystyle:1.5) ball", {"mystyle": vectors})[0]
    assert weighted.weights[:3] == [1.5] * 3  # the weight of the text around it


def test_width_mismatch_and_bad_files_are_one_line_refusals(tmp_path):
    pipe = tiny_pipeline(seed=4)
    write_a1111_pt(tmp_path / "sd2style.pt", _vectors(2, 6, width=WIDTH * 2))
    with pytest.raises(CheckpointError, match="width 64, but this model's text encoder takes 32"):
        pipe.load_textual_inversion(tmp_path / "sd2style.pt")
    save_file({"clip_l": _vectors(1, 1), "clip_g": _vectors(1, 2, width=64)}, tmp_path / "xl.safetensors")
    with pytest.raises(CheckpointError, match="SDXL embedding"):
        read_embedding(tmp_path / "xl.safetensors")

    class RunsCode:
        def __reduce__(self):
            return (print, ("this must never run",))

    torch.save({"string_to_param": {"*": RunsCode()}}, tmp_path / "evil.pt")
    with pytest.raises(CheckpointError, match="refusing to load"):
        read_embedding(tmp_path / "evil.pt")
    (tmp_path / "broken.pt").write_bytes(b"not a pickle")
    with pytest.raises(CheckpointError, match="corrupt") as corrupt:
        read_embedding(tmp_path / "broken.pt")
    assert "\n" not in str(corrupt.value)
    with pytest.raises(CheckpointError, match="not found"):
        read_embedding(tmp_path / "missing.pt")


def test_embeddings_folder_on_the_command_line(tmp_path, capsys):
    from ldm.cli import txt2img
    from ldm.images import read_a1111_parameters
    from PIL import Image

    model = tmp_path / "model"
    tiny_pipeline(seed=4).save_pretrained(model)
    folder = tmp_path / "embeddings"
    folder.mkdir()
    write_a1111_pt(folder / "badhands.pt", _vectors(2, 7))
    common = ["a red ball", "--model", str(model), "--steps", "2", "--quiet"]
    assert txt2img.main([*common, "--negative-prompt", "badhands", "--embeddings", str(folder),
                         "--outdir", str(tmp_path / "with")]) == 0
    assert txt2img.main([*common, "--negative-prompt", "badhands", "--outdir", str(tmp_path / "without")]) == 0
    with_embedding = next((tmp_path / "with").glob("*.png"))
    without = next((tmp_path / "without").glob("*.png"))
    assert read_a1111_parameters(Image.open(with_embedding).info["parameters"])["Negative prompt"] == "badhands"
    assert Image.open(with_embedding).tobytes() != Image.open(without).tobytes()
    write_a1111_pt(folder / "wide.pt", _vectors(1, 8, width=64))
    capsys.readouterr()
    assert txt2img.main([*common, "--embeddings", str(folder), "--outdir", str(tmp_path / "x")]) == 2
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and "wide" in error[0] and "width 64" in error[0]
