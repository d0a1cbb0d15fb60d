"""AutoencoderKL: equivalence with diffusers (same random weights), SD1 key layout, key maps, posterior, config."""

from __future__ import annotations

import pytest
import torch

from autoencoder import AutoencoderConfig, AutoencoderKL, DiagonalGaussian
from ldm.formats.compvis import vae_config_from_compvis
from ldm.formats.vae_keys import config_from_diffusers, diffusers_config, from_diffusers, key_map, to_diffusers

diffusers = pytest.importorskip("diffusers")

TOLERANCE = 1e-4

TINY_CONFIGS = {
    # two levels, no mid attention, one res block: the shape of the package's default VAE, smaller
    "no-attention": AutoencoderConfig(
        base_channels=8, channel_mult=(1, 2), num_res_blocks=1, norm_groups=4, mid_attention=False
    ),
    # three levels with a repeated multiplier, mid attention, two res blocks, odd latent width, scaling 0.5
    "attention": AutoencoderConfig(
        base_channels=8, channel_mult=(1, 2, 2), num_res_blocks=2, norm_groups=4, latent_channels=3,
        mid_attention=True, scaling_factor=0.5,
    ),  # fmt: skip
}

# The Stable Diffusion 1.x/2.x first-stage YAML (`first_stage_config.params`).
SD_DDCONFIG = {
    "double_z": True, "z_channels": 4, "resolution": 256, "in_channels": 3, "out_ch": 3, "ch": 128,
    "ch_mult": [1, 2, 4, 4], "num_res_blocks": 2, "attn_resolutions": [], "dropout": 0.0,
}  # fmt: skip


@pytest.fixture(autouse=True, scope="module")
def single_thread():
    """Tiny models gain nothing from threads, and on a shared 2-core machine threads spin and stall."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def random_model(cfg: AutoencoderConfig, seed: int = 0) -> AutoencoderKL:
    """Our model with every parameter random (GroupNorm affines too, so a swapped norm is caught)."""
    generator = torch.Generator().manual_seed(seed)
    model = AutoencoderKL(cfg).eval()
    with torch.no_grad():
        for param in model.parameters():
            param.copy_(0.2 * torch.randn(param.shape, generator=generator))
    return model


def diffusers_twin(ours: AutoencoderKL) -> torch.nn.Module:
    theirs = diffusers.AutoencoderKL(**diffusers_config(ours.config)).eval()
    theirs.load_state_dict(to_diffusers(ours.state_dict(), ours.config), strict=True)
    return theirs


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


# ----------------------------------------------------------------------------------------------------------
# Numerical equivalence with diffusers
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(TINY_CONFIGS))
def test_matches_diffusers_with_same_weights(name):
    ours = random_model(TINY_CONFIGS[name])
    theirs = diffusers_twin(ours)
    images = torch.rand(2, 3, 16, 24, generator=torch.Generator().manual_seed(1)) * 2 - 1  # non-square
    latents = torch.randn(2, ours.config.latent_channels, 4, 6, generator=torch.Generator().manual_seed(2))

    with torch.no_grad():
        posterior = ours.encode(images)
        reference = theirs.encode(images).latent_dist
        decoded = ours.decode(latents)
        reference_decoded = theirs.decode(latents).sample
        ours_sample = posterior.sample(torch.Generator().manual_seed(3))
        reference_sample = reference.sample(torch.Generator().manual_seed(3))
        recon, _ = ours(images, sample_posterior=False)
        reference_recon = theirs(images, sample_posterior=False).sample

    f = ours.downsample_factor
    assert posterior.mean.shape == (2, ours.config.latent_channels, 16 // f, 24 // f)
    assert decoded.shape == (2, 3, 4 * f, 6 * f)
    assert posterior.mean.abs().max() > 0.1 and decoded.abs().max() > 0.1  # not a degenerate comparison
    assert max_diff(posterior.mean, reference.mean) < TOLERANCE
    assert max_diff(posterior.logvar, reference.logvar) < TOLERANCE
    assert max_diff(decoded, reference_decoded) < TOLERANCE
    assert max_diff(ours_sample, reference_sample) < TOLERANCE
    assert max_diff(recon, reference_recon) < TOLERANCE


def test_mid_attention_changes_the_output():
    """Guards the equivalence test above: the attention branch really runs (and is not an identity)."""
    model = random_model(TINY_CONFIGS["attention"])
    images = torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        with_attention = model.encode(images).mean
        model.encoder.mid.attn_1.proj_out.weight.zero_()
        model.encoder.mid.attn_1.proj_out.bias.zero_()
        without_attention = model.encode(images).mean
    assert max_diff(with_attention, without_attention) > 1e-3


# ----------------------------------------------------------------------------------------------------------
# Full SD1 layout (meta device: structure only)
# ----------------------------------------------------------------------------------------------------------


def test_sd1_layout_maps_one_to_one_onto_diffusers():
    cfg = vae_config_from_compvis(SD_DDCONFIG, embed_dim=4, scaling_factor=0.18215)
    assert cfg == AutoencoderConfig()
    with torch.device("meta"):
        ours = AutoencoderKL(cfg)
        theirs = diffusers.AutoencoderKL(**diffusers_config(cfg))
    ours_sd, theirs_sd = ours.state_dict(), theirs.state_dict()

    # Known facts of the SD 1.x VAE checkpoint (first_stage_model.*): 248 tensors, 83,653,863 parameters.
    assert len(ours_sd) == 248
    assert sum(t.numel() for t in ours_sd.values()) == 83_653_863
    expected_shapes = {
        "encoder.down.1.block.0.nin_shortcut.weight": (256, 128, 1, 1),
        "encoder.down.2.downsample.conv.weight": (512, 512, 3, 3),
        "encoder.mid.attn_1.q.weight": (512, 512, 1, 1),
        "encoder.conv_out.weight": (8, 512, 3, 3),
        "decoder.up.0.block.0.nin_shortcut.weight": (128, 256, 1, 1),
        "decoder.up.1.block.2.conv2.weight": (256, 256, 3, 3),
        "decoder.up.3.upsample.conv.weight": (512, 512, 3, 3),
        "decoder.mid.attn_1.proj_out.weight": (512, 512, 1, 1),
        "quant_conv.weight": (8, 8, 1, 1),
        "post_quant_conv.weight": (4, 4, 1, 1),
    }
    assert {k: tuple(ours_sd[k].shape) for k in expected_shapes} == expected_shapes
    assert "encoder.down.3.downsample.conv.weight" not in ours_sd
    assert "decoder.up.0.upsample.conv.weight" not in ours_sd

    converted = to_diffusers(ours_sd, cfg)
    assert set(converted) == set(theirs_sd)
    assert {k: tuple(v.shape) for k, v in converted.items()} == {k: tuple(v.shape) for k, v in theirs_sd.items()}
    back = from_diffusers(theirs_sd, cfg)
    assert {k: tuple(v.shape) for k, v in back.items()} == {k: tuple(v.shape) for k, v in ours_sd.items()}

    # Independent oracle: diffusers' own single-file converter maps the same keys to the same places.
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

    checkpoint = {f"first_stage_model.{k}": v for k, v in ours_sd.items()}
    oracle = convert_ldm_vae_checkpoint(checkpoint, diffusers_config(cfg))
    assert {k: tuple(v.shape) for k, v in oracle.items()} == {k: tuple(v.shape) for k, v in converted.items()}


def test_sd1_config_round_trips_through_diffusers_config():
    cfg = AutoencoderConfig()
    assert config_from_diffusers(diffusers_config(cfg)) == cfg
    tiny = diffusers.AutoencoderKL(**diffusers_config(TINY_CONFIGS["attention"])).config
    assert (tiny.scaling_factor, tiny.mid_block_add_attention, tiny.latent_channels) == (0.5, True, 3)
    real_sd_vae_config = {  # config.json of the SD 1.x VAE folder in diffusers format
        "_class_name": "AutoencoderKL", "_diffusers_version": "0.6.0", "act_fn": "silu",
        "block_out_channels": [128, 256, 512, 512],
        "down_block_types": ["DownEncoderBlock2D"] * 4, "up_block_types": ["UpDecoderBlock2D"] * 4,
        "in_channels": 3, "latent_channels": 4, "layers_per_block": 2, "norm_num_groups": 32,
        "out_channels": 3, "sample_size": 512,
    }  # fmt: skip
    assert config_from_diffusers(real_sd_vae_config) == cfg
    with pytest.raises(ValueError, match="latent_scale"):
        config_from_diffusers({**real_sd_vae_config, "latent_scale": 1.0})
    with pytest.raises(ValueError, match="shift_factor"):
        config_from_diffusers({**real_sd_vae_config, "shift_factor": 0.1})


# ----------------------------------------------------------------------------------------------------------
# Key maps
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(TINY_CONFIGS))
def test_key_maps_are_exact_inverses(name):
    cfg = TINY_CONFIGS[name]
    ours_sd = random_model(cfg).state_dict()
    assert set(key_map(cfg)) == set(ours_sd)

    there = to_diffusers(ours_sd, cfg)
    back = from_diffusers(there, cfg)
    assert list(back) == list(ours_sd)
    assert all(torch.equal(back[k], ours_sd[k]) and back[k].shape == ours_sd[k].shape for k in ours_sd)

    theirs_sd = diffusers_twin(random_model(cfg, seed=5)).state_dict()
    again = to_diffusers(from_diffusers(theirs_sd, cfg), cfg)
    assert set(again) == set(theirs_sd)
    assert all(torch.equal(again[k], theirs_sd[k]) and again[k].shape == theirs_sd[k].shape for k in theirs_sd)


def test_from_diffusers_accepts_legacy_attention_names():
    cfg = TINY_CONFIGS["attention"]
    current = to_diffusers(random_model(cfg).state_dict(), cfg)
    legacy_names = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}

    def legacy(key: str) -> str:
        for new, old in legacy_names.items():
            key = key.replace(f"attentions.0.{new}.", f"attentions.0.{old}.")
        return key

    legacy_sd = {legacy(k): v for k, v in current.items()}
    assert any(".query.weight" in k for k in legacy_sd)
    from_legacy, from_current = from_diffusers(legacy_sd, cfg), from_diffusers(current, cfg)
    assert set(from_legacy) == set(from_current)
    assert all(torch.equal(from_legacy[k], from_current[k]) for k in from_current)


def test_key_maps_reject_unknown_keys():
    cfg = TINY_CONFIGS["no-attention"]
    ours_sd = random_model(cfg).state_dict()
    with pytest.raises(ValueError, match="encoder.mid.attn_1.q.weight"):
        to_diffusers({**ours_sd, "encoder.mid.attn_1.q.weight": torch.zeros(16, 16, 1, 1)}, cfg)
    with pytest.raises(ValueError, match="decoder.up_blocks.7"):
        from_diffusers({"decoder.up_blocks.7.resnets.0.conv1.weight": torch.zeros(1)}, cfg)


# ----------------------------------------------------------------------------------------------------------
# Scaled helpers, posterior, gradient checkpointing
# ----------------------------------------------------------------------------------------------------------


def test_scaled_helpers_apply_the_scaling_factor():
    model = random_model(TINY_CONFIGS["attention"])  # scaling_factor 0.5
    images = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1
    with torch.no_grad():
        posterior = model.encode(images)
        z = model.encode_latents(images)
        z_sampled = model.encode_latents(images, sample=True, generator=torch.Generator().manual_seed(7))
        assert torch.allclose(z, posterior.mean * 0.5)
        assert torch.allclose(z_sampled, posterior.sample(torch.Generator().manual_seed(7)) * 0.5)
        assert torch.allclose(model.decode_latents(z), model.decode(posterior.mean))
        assert not torch.allclose(model.decode_latents(z), model.decode(z))


def test_posterior_sampling_is_seeded_and_reparameterised():
    parameters = torch.randn(2, 8, 3, 5, generator=torch.Generator().manual_seed(0))
    posterior = DiagonalGaussian(parameters)
    first = posterior.sample(torch.Generator().manual_seed(42))
    second = posterior.sample(torch.Generator().manual_seed(42))
    other = posterior.sample(torch.Generator().manual_seed(43))
    assert torch.equal(first, second)
    assert not torch.allclose(first, other)
    noise = torch.randn(2, 4, 3, 5, generator=torch.Generator().manual_seed(42))
    mean, logvar = parameters[:, :4], parameters[:, 4:]
    assert torch.allclose(first, mean + torch.exp(0.5 * logvar) * noise)
    assert torch.equal(posterior.mode(), mean)


def test_posterior_kl_and_logvar_clamp():
    parameters = torch.randn(3, 8, 2, 4, generator=torch.Generator().manual_seed(0))
    posterior = DiagonalGaussian(parameters)
    q = torch.distributions.Normal(posterior.mean.double(), posterior.std.double())
    prior = torch.distributions.Normal(0.0, 1.0)
    expected = torch.distributions.kl_divergence(q, prior).sum(dim=[1, 2, 3])
    assert posterior.kl().shape == (3,)
    assert torch.allclose(posterior.kl().double(), expected, atol=1e-5)
    assert torch.allclose(DiagonalGaussian(torch.zeros(1, 8, 2, 2)).kl(), torch.zeros(1))

    extreme = DiagonalGaussian(torch.cat([torch.zeros(1, 1, 1, 2), torch.tensor([[[[100.0, -100.0]]]])], dim=1))
    assert extreme.logvar.flatten().tolist() == [20.0, -30.0]


def test_gradient_checkpointing_gives_the_same_gradients():
    cfg = TINY_CONFIGS["attention"]
    images = torch.rand(1, 3, 8, 8, generator=torch.Generator().manual_seed(0))

    def gradients(checkpointing: bool) -> dict[str, torch.Tensor]:
        model = random_model(cfg).train()
        model.gradient_checkpointing = checkpointing
        recon, posterior = model(images, sample_posterior=False)
        (recon.square().mean() + posterior.kl().mean()).backward()
        return {k: p.grad for k, p in model.named_parameters()}

    plain, checkpointed = gradients(False), gradients(True)
    assert all(torch.allclose(plain[k], checkpointed[k], atol=1e-6) for k in plain)


def test_default_package_vae_shape():
    """The package's default f=4 VAE: no mid attention parameters, latents at a quarter of the size."""
    cfg = AutoencoderConfig(base_channels=16, channel_mult=(1, 2, 4), num_res_blocks=1, norm_groups=8,
                            mid_attention=False)  # fmt: skip
    model = AutoencoderKL(cfg).eval()
    assert model.downsample_factor == 4
    assert not any(".attn_1." in k for k in model.state_dict())
    with torch.no_grad():
        z = model.encode_latents(torch.zeros(1, 3, 32, 32))
        assert z.shape == (1, 4, 8, 8)
        assert model.decode_latents(z).shape == (1, 3, 32, 32)


# ----------------------------------------------------------------------------------------------------------
# Config
# ----------------------------------------------------------------------------------------------------------


def test_config_dict_round_trip_and_unknown_key():
    cfg = TINY_CONFIGS["attention"]
    d = cfg.to_dict()
    assert d["channel_mult"] == [1, 2, 2]
    restored = AutoencoderConfig.from_dict(d)
    assert restored == cfg and isinstance(restored.channel_mult, tuple)
    with pytest.raises(ValueError, match="z_channel"):
        AutoencoderConfig.from_dict({**d, "z_channel": 4})


def test_config_validation_and_compvis_reader():
    with pytest.raises(ValueError, match="norm_groups"):
        AutoencoderConfig(base_channels=12, norm_groups=8)
    no_attention = vae_config_from_compvis({**SD_DDCONFIG, "attn_type": "none"}, embed_dim=4)
    assert no_attention.mid_attention is False
    with pytest.raises(ValueError, match="attn_resolutions"):
        vae_config_from_compvis({**SD_DDCONFIG, "attn_resolutions": [32]}, embed_dim=4)
    with pytest.raises(ValueError, match="embed_dim"):
        vae_config_from_compvis(SD_DDCONFIG, embed_dim=3)
    with pytest.raises(ValueError, match="chanels"):
        vae_config_from_compvis({**SD_DDCONFIG, "chanels": 3}, embed_dim=4)
