"""Training data: sources, robust decoding and its report, transforms, buckets, the batch sampler, latent caching."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import write_bad_image_folder
from ldm.training import data
from ldm.errors import ConfigError

pytest.importorskip("datasets")


# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def bad_dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    write_bad_image_folder(root / "bad")
    rows = data.load_image_caption_dataset(root / "bad", cache_dir=root / "hf-cache")
    return data.ImageCaptionDataset(rows, resolution=32, min_side=8, huge_side=1000)


# --------------------------------------------------------------------------------------------
# bad data: loads, skips, converts and reports
# --------------------------------------------------------------------------------------------


def test_bad_folder_loads_and_reports_what_it_skipped(bad_dataset):
    report = bad_dataset.report
    assert report.total == 12
    assert report.unreadable == 3  # garbage, empty, truncated
    assert report.too_small == 1
    assert report.used == len(bad_dataset) == 8
    assert report.missing_captions == 2  # None and whitespace
    assert report.converted == {"L": 1, "RGBA": 1, "I;16": 1, "P": 1}
    assert report.downscaled == 1
    summary = report.summary()
    assert "8 of 12 images used" in summary and "3 unreadable" in summary and "1 too small" in summary
    assert any("garbage.png" in e and "not a recognised image format" in e for e in report.examples)
    assert any("tiny.png" in e and "too small" in e for e in report.examples)


def test_every_sample_is_an_rgb_tensor_in_range_and_unicode_captions_survive(bad_dataset):
    captions, item = {}, {}
    for i in range(len(bad_dataset)):
        name = bad_dataset.records[i].label.rsplit("/", 1)[-1]
        sample = bad_dataset[i]
        pixels = item[name] = sample["pixel_values"]
        captions[name] = sample["caption"]
        assert pixels.shape == (3, 32, 32) and pixels.dtype == torch.float32
        assert pixels.min() >= -1 and pixels.max() <= 1
    assert captions["blue.jpg"] == "café ☕ 日本語 🚲"
    assert captions["gray.png"] == "" and captions["transparent.png"] == ""
    # decoded colours: transparent -> white, 16-bit full scale -> 255, 0x8080 -> 128, palette -> green
    assert torch.equal(item["transparent.png"], torch.ones(3, 32, 32))
    assert torch.equal(item["gray16.png"], torch.ones(3, 32, 32))
    assert torch.allclose(item["rgb16.png"], torch.full((3, 32, 32), 128 / 127.5 - 1), atol=1e-6)
    assert torch.equal(item["palette.png"][:, 0, 0], torch.tensor([-1.0, 1.0, -1.0]))


def test_to_rgb_composites_alpha_on_white_and_rescales_16_bit():
    rgba = Image.fromarray(np.array([[[255, 0, 0, 0], [255, 0, 0, 255], [0, 0, 255, 128]]], dtype=np.uint8), "RGBA")
    out = np.asarray(data.to_rgb(rgba)).astype(int)
    # alpha compositing on white: a * colour + (1 - a) * 255
    expected = np.array([[[255, 255, 255], [255, 0, 0], [127, 127, 255]]])
    assert np.abs(out - expected).max() <= 1
    gray16 = Image.fromarray(np.array([[0, 65535, 32896, 60000]], dtype=np.uint16))
    assert gray16.mode == "I;16"
    assert np.asarray(data.to_rgb(gray16))[0, :, 0].tolist() == [0, 255, 128, round(60000 * 255 / 65535)]
    assert data.to_rgb(Image.new("L", (2, 2), 7)).getpixel((0, 0)) == (7, 7, 7)


def test_a_file_that_breaks_after_the_scan_is_replaced_not_fatal(tmp_path):
    folder = tmp_path / "late"
    folder.mkdir()
    for name, colour in (("a", (255, 0, 0)), ("b", (0, 255, 0))):
        Image.new("RGB", (32, 32), colour).save(folder / f"{name}.png")
        (folder / f"{name}.txt").write_text(name)
    dataset = data.ImageCaptionDataset(data.load_image_caption_dataset(folder), resolution=32)
    (folder / "a.png").write_bytes(b"broken later")
    item = dataset[0]
    assert item["caption"] == "b" and item["index"] == 1
    assert dataset.report.late_failures == 1


def test_rows_naming_missing_files_are_skipped_as_unreadable(tmp_path):
    Image.new("RGB", (16, 16)).save(tmp_path / "here.png")
    rows = [{"image": {"path": str(tmp_path / "here.png"), "bytes": None}, "text": "here"},
            {"image": {"path": str(tmp_path / "gone.png"), "bytes": None}, "text": "gone"}]
    dataset = data.ImageCaptionDataset(rows, resolution=16)
    assert len(dataset) == 1 and dataset.report.unreadable == 1
    assert "gone.png: unreadable (file not found)" in dataset.report.examples[0]


# --------------------------------------------------------------------------------------------
# sources and column errors
# --------------------------------------------------------------------------------------------


def test_txt_caption_folder_with_missing_and_empty_captions(tmp_path):
    folder = tmp_path / "txt"
    (folder / "sub").mkdir(parents=True)
    Image.new("RGB", (32, 32), (1, 2, 3)).save(folder / "a.png")
    (folder / "a.txt").write_text("  ünïcødé ✓ caption \n", encoding="utf-8")
    Image.new("RGB", (32, 32)).save(folder / "b.png")  # no caption file
    Image.new("RGB", (32, 32)).save(folder / "sub" / "c.jpg")
    (folder / "sub" / "c.txt").write_text("")
    rows = data.load_image_caption_dataset(folder)
    assert rows.column_names == ["image", "text"]
    dataset = data.ImageCaptionDataset(rows, resolution=16)
    assert [dataset[i]["caption"] for i in range(3)] == ["ünïcødé ✓ caption", "", ""]
    assert dataset.report.missing_captions == 2 and dataset.report.used == 3


def test_folder_without_any_caption_is_a_config_error(tmp_path):
    Image.new("RGB", (8, 8)).save(tmp_path / "a.png")
    with pytest.raises(ConfigError, match="no captions found"):
        data.load_image_caption_dataset(tmp_path)


def test_csv_metadata_with_custom_columns_and_missing_column_errors(tmp_path):
    folder = tmp_path / "csv"
    folder.mkdir()
    Image.new("RGB", (32, 32), (10, 20, 30)).save(folder / "x.png")
    (folder / "metadata.csv").write_text("file_name,prompt\nx.png,a prompt\n", encoding="utf-8")
    rows = data.load_image_caption_dataset(folder, caption_column="prompt", cache_dir=tmp_path / "cache")
    assert rows.column_names == ["image", "text"] and rows[0]["text"] == "a prompt"
    with pytest.raises(ConfigError) as error:
        data.load_image_caption_dataset(folder, caption_column="text", cache_dir=tmp_path / "cache")
    message = str(error.value)
    assert "caption column 'text'" in message and "image" in message and "prompt" in message and "\n" not in message
    with pytest.raises(ConfigError, match="image column 'img'"):
        data.load_image_caption_dataset(folder, image_column="img", caption_column="prompt",
                                        cache_dir=tmp_path / "cache")


def test_hub_id_offline_and_missing_folder_are_one_line_errors(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ConfigError, match="offline") as error:
        data.load_image_caption_dataset("someone/some-captions")
    assert "\n" not in str(error.value)
    with pytest.raises(ConfigError, match="not found"):
        data.load_image_caption_dataset(tmp_path / "nope")


# --------------------------------------------------------------------------------------------
# transforms
# --------------------------------------------------------------------------------------------


def _stripes() -> Image.Image:
    """40x20 image of four 10-pixel vertical stripes: red, green, blue, white."""
    colours = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 255)]
    array = np.concatenate([np.tile(np.array(c, np.uint8), (20, 10, 1)) for c in colours], axis=1)
    return Image.fromarray(array, "RGB")


def test_resize_shorter_side_then_center_crop():
    # 40x20 -> shorter side 16 gives 32x16 (stripes 8 wide); the centre 16 columns are green | blue
    out, (top, left) = data.resize_and_crop(_stripes(), (16, 16), crop="center")
    assert out.size == (16, 16) and (top, left) == (0, 8)
    pixels = np.asarray(out).astype(int)
    assert np.abs(pixels[:, 1:6] - [0, 255, 0]).max() <= 3
    assert np.abs(pixels[:, 10:15] - [0, 0, 255]).max() <= 3


def test_random_crop_and_flip_are_seeded_per_epoch_and_index(tmp_path):
    folder = tmp_path / "aug"
    folder.mkdir()
    _stripes().resize((80, 40)).save(folder / "s.png")
    (folder / "s.txt").write_text("stripes")
    rows = data.load_image_caption_dataset(folder)
    dataset = data.ImageCaptionDataset(rows, resolution=16, crop="random", random_flip=True, seed=3)
    plain = data.ImageCaptionDataset(rows, resolution=16)
    items = [dataset[(0, epoch)]["pixel_values"] for epoch in range(24)]
    assert torch.equal(items[5], dataset[(0, 5)]["pixel_values"])  # a pure function of (seed, epoch, index)
    assert len({tuple(x[:, 8, :].flatten().tolist()) for x in items}) > 4  # crops/flips vary by epoch
    flipping = data.ImageCaptionDataset(rows, resolution=16, random_flip=True, seed=3)
    flips = [bool(data.sample_rng(3, e, 0).random() < 0.5) for e in range(24)]
    assert 4 <= sum(flips) <= 20
    for epoch, flip in enumerate(flips):
        expected = plain[0]["pixel_values"]
        expected = torch.flip(expected, dims=[2]) if flip else expected
        assert torch.equal(flipping[(0, epoch)]["pixel_values"], expected)
    centred = plain.load(0, flip=True)["pixel_values"]
    assert torch.equal(centred, torch.flip(plain.load(0)["pixel_values"], dims=[2]))
    assert torch.equal(dataset.load(0, flip=False, crop="center")["pixel_values"], plain[0]["pixel_values"])


def test_image_to_tensor_range():
    image = Image.fromarray(np.array([[[0, 255, 51]]], dtype=np.uint8))
    assert torch.allclose(data.image_to_tensor(image).flatten(), torch.tensor([-1.0, 1.0, 51 / 127.5 - 1]), atol=1e-6)


# --------------------------------------------------------------------------------------------
# buckets and the batch sampler
# --------------------------------------------------------------------------------------------


def test_sd_buckets_are_the_expected_sizes():
    buckets = data.make_buckets(512, step=64, max_aspect=2.0)
    assert buckets == [(384, 640), (448, 576), (512, 512), (576, 448), (640, 384)]
    for width, height in data.make_buckets(768, step=64, max_aspect=3.0):
        assert width % 64 == 0 and height % 64 == 0 and width * height <= 768 * 768
        # maximal: no side can grow by a step (for its width the tallest that fits, or for its height the widest)
        assert width * (height + 64) > 768 * 768 or (width + 64) * height > 768 * 768
        assert 1 / 3 <= width / height <= 3


@pytest.mark.parametrize("size", [(1000, 500), (500, 1000), (512, 500), (700, 500), (570, 500), (500, 570), (3, 1)])
def test_nearest_bucket_minimises_log_aspect_distance(size):
    buckets = data.make_buckets(512)
    chosen = buckets[data.nearest_bucket(*size, buckets)]
    distance = [abs(np.log(w / h) - np.log(size[0] / size[1])) for w, h in buckets]
    assert abs(np.log(chosen[0] / chosen[1]) - np.log(size[0] / size[1])) == min(distance)
    assert data.nearest_bucket(1000, 500, buckets) == buckets.index((640, 384))


def test_bucketed_dataset_batches_share_one_size(tmp_path):
    folder = tmp_path / "buckets"
    folder.mkdir()
    sizes = [(90, 50), (100, 60), (50, 90), (64, 64), (70, 66), (60, 100), (120, 70)]
    for i, size in enumerate(sizes):
        Image.new("RGB", size, (i * 30, 0, 0)).save(folder / f"{i}.png")
        (folder / f"{i}.txt").write_text(f"image {i}")
    dataset = data.ImageCaptionDataset(data.load_image_caption_dataset(folder), resolution=64, bucketing=True,
                                       bucket_step=16)
    assert dataset.bucket_sizes == [(48, 80), (64, 64), (80, 48)]
    assert [dataset.bucket_sizes[b] for b in dataset.bucket_ids] == [
        (80, 48), (80, 48), (48, 80), (64, 64), (64, 64), (48, 80), (80, 48)]
    sampler = data.BucketBatchSampler(dataset.bucket_ids, batch_size=2, seed=0)
    loader = torch.utils.data.DataLoader(dataset, batch_sampler=sampler, collate_fn=data.collate_batch)
    seen = []
    for batch in loader:
        width, height = dataset.bucket_sizes[dataset.bucket_ids[int(batch["indices"][0])]]
        assert batch["pixel_values"].shape[1:] == (3, height, width)
        assert len({dataset.bucket_ids[int(i)] for i in batch["indices"]}) == 1
        seen += batch["indices"].tolist()
    assert sorted(seen) == list(range(len(sizes)))


def test_batch_sampler_is_deterministic_covers_every_index_and_resumes():
    bucket_ids = [i % 3 for i in range(23)] + [3]
    sampler = data.BucketBatchSampler(bucket_ids, batch_size=3, seed=7)
    epochs = [list(sampler) for _ in range(3)]
    assert sampler.epoch == 3
    again = data.BucketBatchSampler(bucket_ids, batch_size=3, seed=7)
    assert [list(again) for _ in range(3)] == epochs
    assert data.BucketBatchSampler(bucket_ids, batch_size=3, seed=8).epoch_batches(0) != sampler.epoch_batches(0)
    for epoch, batches in enumerate(epochs):
        assert len(batches) == sampler.batches_per_epoch == 3 + 3 + 3 + 1
        indices = [i for batch in batches for i, e in batch if e == epoch]
        assert sorted(indices) == list(range(len(bucket_ids)))
        assert all(len({bucket_ids[i] for i, _ in batch}) == 1 for batch in batches)
    assert epochs[0] != [[(i, 0) for i, _ in b] for b in epochs[1]]  # reshuffled each epoch
    batch_buckets = [bucket_ids[batch[0][0]] for batch in epochs[0]]
    assert batch_buckets != sorted(batch_buckets)  # buckets interleave: batch order is shuffled too
    stream = [batch for batches in epochs for batch in batches]
    for done in (0, 4, 10, 13, 25):
        resumed = data.BucketBatchSampler(bucket_ids, batch_size=3, seed=7)
        epoch, batch_index = resumed.position_after(done)
        resumed.load_state_dict({"epoch": epoch, "batch_index": batch_index})
        rest = []
        while resumed.epoch < 3:
            rest += list(resumed)
        assert rest == stream[done:]
    full = data.BucketBatchSampler(bucket_ids, batch_size=3, seed=7, drop_last=True)
    assert full.batches_per_epoch == 2 + 2 + 2 and all(len(b) == 3 for b in full)


def test_repeats_column_shows_each_image_that_often_per_epoch(tmp_path):
    folder = tmp_path / "repeats"
    folder.mkdir()
    rows = [("moon.png", "a moon", 4), ("a.png", "a tree", 1), ("b.png", "a car", None)]
    for name, _, _ in rows:
        Image.new("RGB", (32, 32), (200, 200, 0)).save(folder / name)
    import json
    (folder / "metadata.jsonl").write_text("".join(json.dumps({"file_name": f, "text": t, "n": r}) + "\n"
                                                   for f, t, r in rows), encoding="utf-8")
    source = data.load_image_caption_dataset(folder, repeats_column="n", cache_dir=tmp_path / "cache")
    dataset = data.ImageCaptionDataset(source, resolution=32)
    assert sorted(zip([r.caption for r in dataset.records], dataset.repeats)) == [("a car", 1), ("a moon", 4),
                                                                                   ("a tree", 1)]
    sampler = data.BucketBatchSampler(dataset.bucket_ids, batch_size=2, seed=0, repeats=dataset.repeats)
    moon = [r.caption for r in dataset.records].index("a moon")
    for epoch in range(3):
        indices = [i for batch in sampler for i, _ in batch]
        assert len(indices) == 6 and indices.count(moon) == 4
    with pytest.raises(ConfigError, match="repeats column 'count'"):
        data.load_image_caption_dataset(folder, repeats_column="count", cache_dir=tmp_path / "cache")
    (folder / "metadata.jsonl").write_text(json.dumps({"file_name": "a.png", "text": "x", "n": 0}) + "\n",
                                           encoding="utf-8")
    source = data.load_image_caption_dataset(folder, repeats_column="n", cache_dir=tmp_path / "cache2")
    with pytest.raises(ConfigError, match="repeats must be a whole number >= 1, got 0"):
        data.ImageCaptionDataset(source, resolution=32)


def test_repeats_need_a_metadata_file(tmp_path):
    folder = tmp_path / "txt"
    folder.mkdir()
    Image.new("RGB", (32, 32)).save(folder / "x.png")
    (folder / "x.txt").write_text("a caption", encoding="utf-8")
    with pytest.raises(ConfigError, match="no 'repeats' column"):
        data.load_image_caption_dataset(folder, repeats_column="repeats")


# --------------------------------------------------------------------------------------------
# latent caching
# --------------------------------------------------------------------------------------------


def _tiny_vae(seed: int = 0):
    from autoencoder.model import AutoencoderConfig, AutoencoderKL

    torch.manual_seed(seed)
    return AutoencoderKL(AutoencoderConfig(base_channels=8, channel_mult=(1, 2), num_res_blocks=1, norm_groups=4,
                                           mid_attention=False, scaling_factor=0.5)).eval()


def test_cache_latents_matches_the_vae_and_is_reused_until_something_changes(tmp_path, monkeypatch):
    folder = tmp_path / "cache-data"
    folder.mkdir()
    for i, size in enumerate([(40, 24), (24, 40), (32, 32)]):
        Image.new("RGB", size, (i * 80, 40, 200)).save(folder / f"{i}.png")
        (folder / f"{i}.txt").write_text(f"caption ✓ {i}", encoding="utf-8")
    dataset = data.ImageCaptionDataset(data.load_image_caption_dataset(folder), resolution=32, bucketing=True,
                                       bucket_step=8, random_flip=True)
    vae = _tiny_vae()
    path = tmp_path / "latents.safetensors"
    cached = data.cache_latents(vae, dataset, path, batch_size=2)
    assert len(cached) == 3 and cached.bucket_ids == dataset.bucket_ids
    with torch.no_grad():
        for i in range(3):
            expected = vae.encode_latents(dataset.load(i)["pixel_values"][None])[0]
            flipped = vae.encode_latents(dataset.load(i, flip=True)["pixel_values"][None])[0]
            assert (cached.latents[i] - expected).abs().max() < 1e-5
            assert (cached.flipped[i] - flipped).abs().max() < 1e-5
            assert cached[i]["caption"] == f"caption ✓ {i}"
    assert data.collate_batch([cached[(0, 1)]])["latents"].shape[0] == 1

    def refuse(*args, **kwargs):
        raise AssertionError("the cache should have been reused")

    monkeypatch.setattr(vae, "encode_latents", refuse)
    same_data = data.ImageCaptionDataset(data.load_image_caption_dataset(folder), resolution=32, bucketing=True,
                                         bucket_step=8, random_flip=True)
    reused = data.cache_latents(vae, same_data, path)
    assert all(torch.equal(a, b) for a, b in zip(reused.latents, cached.latents))
    monkeypatch.undo()
    changed = _tiny_vae(seed=1)
    calls = []
    original = changed.encode_latents
    monkeypatch.setattr(changed, "encode_latents", lambda images: calls.append(1) or original(images))
    data.cache_latents(changed, dataset, path)
    assert calls  # a different VAE invalidates the cache
    random_crop = data.ImageCaptionDataset(data.load_image_caption_dataset(folder), resolution=32, crop="random")
    with pytest.raises(ConfigError, match="crop"):
        data.cache_latents(vae, random_crop, tmp_path / "other.safetensors")


def test_inference_modules_do_not_import_datasets():
    import subprocess
    import sys

    code = "import sys, ldm.pipeline, ldm.formats.lora, ldm.training.data; print('datasets' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "False"
