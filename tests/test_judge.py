"""Tests for the judge classifier and the Frechet distance (ldm/toy/judge.py)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ldm.toy.judge import DEFAULT_JUDGE_PATH, Judge, JudgeConfig, frechet_distance
from ldm.toy.procedural import ProceduralDataset, images_to_tensor

FRESH_SEED = 424_242  # not a seed the shipped judge was trained or evaluated on


@pytest.fixture(scope="module")
def shipped_judge() -> Judge:
    return Judge.load()


@pytest.fixture(scope="module")
def fresh_samples():
    # 150 samples from every pair plus 50 from the held-out pairs only.
    return ProceduralDataset(FRESH_SEED, "all").take(150) + ProceduralDataset(FRESH_SEED, "heldout").take(50)


def test_shipped_weights_are_small_and_load_in_eval_mode(shipped_judge):
    assert DEFAULT_JUDGE_PATH.stat().st_size < 2 * 2**20
    assert not shipped_judge.training
    assert all(p.dtype == torch.float32 for p in shipped_judge.parameters())


def test_shipped_judge_classifies_fresh_real_images(shipped_judge, fresh_samples):
    results = shipped_judge.classify([s.image for s in fresh_samples])
    assert len(results) == 200
    object_acc = np.mean([r["object"] == s.object for r, s in zip(results, fresh_samples)])
    colour_acc = np.mean([r["colour"] == s.colour for r, s in zip(results, fresh_samples)])
    background_acc = np.mean([r["background"] == s.background for r, s in zip(results, fresh_samples)])
    assert object_acc >= 0.98 and colour_acc >= 0.98, (object_acc, colour_acc)
    assert background_acc >= 0.95, background_acc
    assert all(0.0 < r["object_prob"] <= 1.0 and 0.0 < r["colour_prob"] <= 1.0 for r in results)


def test_classify_accepts_tensors_and_other_sizes(shipped_judge, fresh_samples):
    images = [s.image for s in fresh_samples[:16]]
    from_pil = shipped_judge.classify(images)
    tensor = images_to_tensor(images)
    from_tensor = shipped_judge.classify(tensor)
    assert [r["object"] for r in from_pil] == [r["object"] for r in from_tensor]
    assert from_pil[0]["object_prob"] == pytest.approx(from_tensor[0]["object_prob"], abs=1e-6)
    # A 128x128 input is resized to 64x64 first and still read correctly.
    large = ProceduralDataset(FRESH_SEED, "all", image_size=128).take(16)
    results = shipped_judge.classify([s.image for s in large])
    assert np.mean([r["object"] == s.object for r, s in zip(results, large)]) >= 0.9


def test_features_shape_and_batch_independence(shipped_judge, fresh_samples):
    images = [s.image for s in fresh_samples[:10]]
    feats = shipped_judge.features(images)
    assert feats.shape == (10, shipped_judge.feature_dim) and feats.dtype == torch.float32
    one_by_one = torch.cat([shipped_judge.features([im]) for im in images])
    assert (feats - one_by_one).abs().max() < 1e-4  # eval-mode BatchNorm: no batch coupling


def test_save_load_round_trip(tmp_path):
    torch.manual_seed(0)
    judge = Judge(JudgeConfig(shape_channels=(4, 4, 8, 8), colour_channels=(4, 4, 4, 4))).eval()
    path = tmp_path / "judge.safetensors"
    judge.save(path, dtype=torch.float32, extra_metadata={"note": {"a": 1}})
    loaded = Judge.load(path)
    assert loaded.config == judge.config
    x = torch.rand(3, 3, 64, 64) * 2 - 1
    for head, logits in judge(x).items():
        assert torch.equal(logits, loaded(x)[head])


def test_config_round_trip_and_unknown_keys():
    config = JudgeConfig(shape_channels=(8, 8, 16, 16))
    assert JudgeConfig.from_dict(config.to_dict()) == config
    with pytest.raises(ValueError, match="widths"):
        JudgeConfig.from_dict({**config.to_dict(), "widths": 3})


def test_frechet_distance_of_a_set_with_itself_is_zero():
    feats = torch.randn(300, 16, generator=torch.Generator().manual_seed(0)) * 3 + 1
    assert abs(frechet_distance(feats, feats)) < 1e-8


def test_frechet_distance_matches_analytic_values():
    generator = torch.Generator().manual_seed(1)
    base = torch.randn(500, 8, dtype=torch.float64, generator=generator) @ torch.randn(8, 8, dtype=torch.float64,
                                                                                        generator=generator)
    base = base - base.mean(0)  # centred, so scaling it leaves the mean at 0
    shift = torch.arange(8, dtype=torch.float64) / 4
    # Same covariance, shifted mean: d^2 = |shift|^2 exactly.
    assert frechet_distance(base, base + shift) == pytest.approx(float(shift.square().sum()), rel=1e-9)
    # Scaled by a: S_b = a^2 S_a, (S_a S_b)^(1/2) = a S_a, so d^2 = |shift|^2 + (1 - a)^2 tr S_a.
    a = 1.7
    expected = float(shift.square().sum() + (1 - a) ** 2 * torch.cov(base.T).trace())
    assert frechet_distance(base, a * base + shift) == pytest.approx(expected, rel=1e-9)


def test_frechet_distance_matches_scipy_sqrtm_oracle():
    linalg = pytest.importorskip("scipy.linalg")
    rng = np.random.default_rng(2)
    a = rng.normal(size=(400, 6)) @ rng.normal(size=(6, 6))
    b = rng.normal(size=(300, 6)) @ rng.normal(size=(6, 6)) + 0.5
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    root = linalg.sqrtm(cov_a @ cov_b).real
    expected = ((mu_a - mu_b) ** 2).sum() + np.trace(cov_a + cov_b - 2 * root)
    assert frechet_distance(a, b) == pytest.approx(expected, rel=1e-8)


def test_frechet_distance_handles_singular_covariances_and_rejects_bad_shapes():
    few = torch.randn(5, 32, generator=torch.Generator().manual_seed(3))  # rank-deficient covariance
    value = frechet_distance(few, few + 1.0)
    assert value == pytest.approx(32.0, rel=1e-6)
    with pytest.raises(ValueError):
        frechet_distance(torch.zeros(5, 3), torch.zeros(5, 4))
    with pytest.raises(ValueError):
        frechet_distance(torch.zeros(1, 3), torch.zeros(5, 3))
