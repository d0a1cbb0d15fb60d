"""AUTOMATIC1111's prompt syntax: the web UI's documented examples and the rules behind them."""

import pytest

from ldm.prompt_syntax import parse_weighted


def rounded(pieces):
    return [(text, round(weight, 6)) for text, weight in pieces]


@pytest.mark.parametrize("prompt, expected", [
    ("normal text", [("normal text", 1.0)]),
    ("an (important) word", [("an ", 1.0), ("important", 1.1), (" word", 1.0)]),
    ("(unbalanced", [("unbalanced", 1.1)]),
    ("\\(literal\\]", [("(literal]", 1.0)]),
    ("(unnecessary)(parens)", [("unnecessaryparens", 1.1)]),
    ("a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))).",
     [("a ", 1.0), ("house", 1.573), (" ", 1.1), ("on", 1.0), (" a ", 1.1), ("hill", 0.55),
      (", sun, ", 1.1), ("sky", 1.4641), (".", 1.1)]),
    ("[faint] and ((strong))", [("faint", round(1 / 1.1, 6)), (" and ", 1.0), ("strong", 1.21)]),
    ("(red:1.3) bicycle", [("red", 1.3), (" bicycle", 1.0)]),
    ("a cat BREAK a dog", [("a cat", 1.0), ("BREAK", -1.0), ("a dog", 1.0)]),
    ("BREAKFAST and breaking", [("BREAKFAST and breaking", 1.0)]),
    ("ratio 16:9 (photo:0.8)", [("ratio 16:9 ", 1.0), ("photo", 0.8)]),
])
def test_a1111_examples(prompt, expected):
    assert rounded(parse_weighted(prompt)) == expected


def test_weight_one_is_no_weight():
    assert parse_weighted("a (red:1.0) car") == [("a red car", 1.0)]


def test_empty_prompt_is_one_empty_piece():
    assert parse_weighted("") == [("", 1.0)]


# ---------------------------------------------------------------------------------------- encoding

import torch  # noqa: E402

from ldm.models.prompt_encoding import encode_prompts, split_into_chunks  # noqa: E402
from tests.conftest import tiny_pipeline  # noqa: E402


@pytest.fixture(scope="module")
def encoder():
    return tiny_pipeline(seed=1).text_encoder


def words(n: int, word: str = "cat") -> str:
    return " ".join([word] * n)


def test_plain_short_prompt_gives_exactly_the_old_conditioning(encoder):
    prompts = ["a red bicycle on a blue background", ""]
    expected = encoder(encoder.tokenizer(prompts))
    assert torch.equal(encode_prompts(encoder, prompts), expected)


def test_long_prompts_are_chunked_and_their_end_matters(encoder):
    long = words(140) + " in the rain"
    other = words(140) + " in the snow"
    assert len(split_into_chunks(encoder.tokenizer, long)) == 2
    a, b = encode_prompts(encoder, [long]), encode_prompts(encoder, [other])
    assert a.shape == (1, 2 * 77, encoder.config.width)
    assert torch.equal(a[:, :77], b[:, :77]) and not torch.equal(a[:, 77:], b[:, 77:])


def test_break_starts_a_new_chunk(encoder):
    tokenizer = encoder.tokenizer
    chunks = split_into_chunks(tokenizer, "a cat BREAK a dog")
    assert [tokenizer.decode(c.tokens) for c in chunks] == ["a cat", "a dog"]
    together = encode_prompts(encoder, ["a cat BREAK a dog"])
    assert torch.equal(together[:, 77:], encode_prompts(encoder, ["a dog"]))


def test_a_full_chunk_moves_the_words_after_its_last_comma(encoder):
    tokenizer = encoder.tokenizer
    chunks = split_into_chunks(tokenizer, words(70) + ", " + words(10, "dog"))
    assert len(chunks[0].tokens) == 71 and tokenizer.decode(chunks[1].tokens) == words(10, "dog")


def test_weights_scale_tokens_and_keep_the_mean(encoder):
    plain = encode_prompts(encoder, ["a red car"])
    assert torch.equal(encode_prompts(encoder, ["a (red:1.0) car"]), plain)
    weighted = encode_prompts(encoder, ["a (red:1.5) car"])
    torch.testing.assert_close(weighted.mean(), plain.mean())
    ratio = weighted[0, 2] / plain[0, 2]  # token 2 is "red" (after <start> and "a")
    other = weighted[0, 1] / plain[0, 1]
    torch.testing.assert_close(ratio / other, torch.full_like(ratio, 1.5), rtol=1e-4, atol=1e-4)


def test_prompts_of_different_lengths_are_padded_with_empty_chunks(encoder):
    both = encode_prompts(encoder, [words(100), "a cat"])
    assert both.shape[1] == 2 * 77
    assert torch.equal(both[1:, 77:], encode_prompts(encoder, [""]))


def test_the_end_of_a_150_token_prompt_changes_the_image():
    pipe = tiny_pipeline(seed=2)
    options = dict(steps=2, seed=0, output_type="pt")
    rain = pipe(words(145) + " in the rain", **options)
    snow = pipe(words(145) + " in the snow", **options)
    assert not torch.equal(rain, snow)


def test_clip_skip_2_equals_diffusers_with_the_penultimate_clip_layer(tmp_path):
    """AUTOMATIC1111's "Clip skip 2" is diffusers' ``clip_skip=1``: the penultimate CLIP block, then the final
    LayerNorm. (diffusers' own ``clip_skip`` reaches for ``text_model``, which transformers 5 removed, so the
    embeddings are built here with transformers the way diffusers builds them and handed over.)"""
    import diffusers

    pipe = tiny_pipeline(seed=5)
    pipe.save_pretrained(tmp_path / "sd", format="diffusers")
    ours = pipe("a red bicycle", "blurry", sampler="euler", steps=3, guidance_scale=5.0, seed=2, clip_skip=2,
                output_type="pt")
    theirs = diffusers.StableDiffusionPipeline.from_pretrained(tmp_path / "sd", local_files_only=True)
    theirs.set_progress_bar_config(disable=True)

    def penultimate(text):
        ids = theirs.tokenizer(text, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
        hidden = theirs.text_encoder(ids, output_hidden_states=True).hidden_states[-2]
        text_model = getattr(theirs.text_encoder, "text_model", theirs.text_encoder)
        return text_model.final_layer_norm(hidden)

    with torch.no_grad():
        images = theirs(prompt_embeds=penultimate("a red bicycle"), negative_prompt_embeds=penultimate("blurry"),
                        num_inference_steps=3, guidance_scale=5.0, height=32, width=32,
                        generator=torch.Generator().manual_seed(2), output_type="pt").images
    assert (ours - images).abs().max().item() < 1e-4
    assert not torch.equal(ours, pipe("a red bicycle", "blurry", sampler="euler", steps=3, guidance_scale=5.0,
                                      seed=2, output_type="pt"))
    with pytest.raises(ValueError, match="clip_skip"):
        pipe("x", clip_skip=0, steps=1)

