"""Training-free feature guidance: it lowers the feature distance, is exact at scale 0, refuses bad settings."""
from __future__ import annotations

import pytest
import torch
from conftest import make_tiny_model
from torch import nn

from featinv.config import DiffusionConfig, FeatureGuidanceConfig, SampleConfig
from featinv.diffusion.guidance import feature_guided_eps_fn
from featinv.diffusion.reconstruct import Reconstructor
from featinv.diffusion.samplers import ddim_timesteps, sample
from featinv.diffusion.schedule import alphas_cumprod

AC = alphas_cumprod(DiffusionConfig())


class Toy:
    """An exact ε-model (latents ~ N(0, I): E[ε | x_t] = √(1-ᾱ)·x_t), a conv 'decoder' and a conv 'classifier'."""

    def __init__(self):
        torch.manual_seed(0)
        self.decoder = nn.Conv2d(4, 3, 3, padding=1).requires_grad_(False)
        self.classifier = nn.Sequential(nn.Conv2d(3, 8, 3, stride=2, padding=1), nn.ReLU()).requires_grad_(False)
        self.calls = {"eps": 0, "features": 0}

    def eps(self, x, t):
        self.calls["eps"] += 1
        return (1 - AC[t]).sqrt().view(-1, 1, 1, 1) * x

    def features(self, images):
        self.calls["features"] += 1
        return self.classifier(images)


def distance(toy: Toy, latents: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        f = toy.classifier(toy.decoder(latents))
    return (f - target).flatten(1).square().sum(1) / target.flatten(1).square().sum(1)


def run(toy: Toy, target: torch.Tensor, guidance: FeatureGuidanceConfig, sampler: str = "ddim") -> torch.Tensor:
    x_T = torch.randn(4, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    eps_fn = feature_guided_eps_fn(toy.eps, toy.decoder, toy.features, target, AC, guidance)
    return sample(sampler, eps_fn, x_T, AC, ddim_timesteps(10, spacing="trailing"))


@pytest.mark.parametrize("sampler", ["ddim", "dpmpp_2m"])
def test_guidance_lowers_the_feature_distance_with_the_same_noise(sampler):
    toy = Toy()
    target = toy.classifier(toy.decoder(torch.randn(4, 4, 8, 8, generator=torch.Generator().manual_seed(2))))
    plain = distance(toy, run(toy, target, FeatureGuidanceConfig(), sampler), target)
    guided = distance(toy, run(toy, target, FeatureGuidanceConfig(scale=50.0), sampler), target)
    assert (guided < 0.5 * plain).all(), (plain, guided)  # every sample, not just on average


def test_scale_zero_and_unguided_steps_equal_the_plain_sampler_bit_for_bit():
    toy = Toy()
    target = torch.randn(4, 8, 4, 4)
    plain = run(toy, target, FeatureGuidanceConfig())
    assert toy.calls["features"] == 0  # scale 0: no classifier pass at all
    assert torch.equal(run(toy, target, FeatureGuidanceConfig(scale=0.0, t_min=0, t_max=999)), plain)
    # scale > 0, but no sampler timestep in [t_min, t_max]: the same, without a classifier pass
    steps = ddim_timesteps(10, spacing="trailing")
    between = FeatureGuidanceConfig(scale=5.0, t_min=int(steps[0]) + 1, t_max=int(steps[1]) - 1)
    assert torch.equal(run(toy, target, between), plain) and toy.calls["features"] == 0
    # only the last step guided: one classifier pass, and the result moves
    last = run(toy, target, FeatureGuidanceConfig(scale=5.0, t_max=int(steps[0])))
    assert toy.calls["features"] == 1 and not torch.equal(last, plain)


@pytest.mark.parametrize("kw, message", [
    (dict(scale=-1.0), r"^FeatureGuidanceConfig\.scale must be a finite number >= 0, got -1\.0$"),
    (dict(scale=float("nan")), r"FeatureGuidanceConfig\.scale must be a finite number >= 0"),
    (dict(t_min=-1), r"^FeatureGuidanceConfig\.t_min must be >= 0, got -1$"),
    (dict(t_min=500, t_max=100), r"^FeatureGuidanceConfig\.t_max \(100\) must be >= t_min \(500\)$"),
])
def test_bad_settings_are_one_line_errors(kw, message):
    with pytest.raises(ValueError, match=message):
        FeatureGuidanceConfig(**kw)


def test_a_feature_function_without_gradient_is_a_one_line_error():
    toy = Toy()
    no_grad_features = torch.no_grad()(toy.features)
    eps_fn = feature_guided_eps_fn(toy.eps, toy.decoder, no_grad_features, torch.randn(4, 8, 4, 4), AC,
                                   FeatureGuidanceConfig(scale=1.0))
    with pytest.raises(ValueError, match="no gradient") as err:
        sample("ddim", eps_fn, torch.randn(4, 4, 8, 8), AC, ddim_timesteps(2))
    assert "\n" not in str(err.value)


def test_reconstructor_guides_a_featinv_model_and_its_unconditional_mode(tiny_job):
    """Through the Reconstructor option: FeatInv with guidance, and the model with the feature map dropped
    (classifier-free scale 0 with uncond="features" runs the unconditional branch alone)."""
    model, backbone = make_tiny_model(512), tiny_job["backbone"]
    images = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    keys = ["a", "b"]
    for cfg in (SampleConfig(steps=3, guidance_scale=1.0, seed=0),
                SampleConfig(steps=3, guidance_scale=0.0, uncond="features", seed=0)):
        plain = Reconstructor(model, backbone, cfg)
        target = plain.features(images)
        guided = Reconstructor(model, backbone, cfg, guidance=FeatureGuidanceConfig(scale=50.0))
        off = Reconstructor(model, backbone, cfg, guidance=FeatureGuidanceConfig(scale=0.0))
        rec_plain, rec_guided = plain(images, keys)[:, 0], guided(images, keys)[:, 0]
        assert torch.equal(off(images, keys)[:, 0], rec_plain)

        def dist(rec):
            return (plain.features(rec) - target).flatten(1).square().sum(1)

        assert (dist(rec_guided) < dist(rec_plain)).all(), (cfg, dist(rec_plain), dist(rec_guided))


def test_classifier_free_scale_zero_is_the_unconditional_branch_alone():
    from featinv.diffusion.guidance import guided_eps_fn

    seen = []
    fn = guided_eps_fn(lambda x, t, c: (seen.append(x.shape[0]), x * c)[1], dict(c=torch.full((2, 1), 2.0)),
                       dict(c=torch.full((2, 1), 3.0)), 0.0)
    assert torch.equal(fn(torch.ones(2, 1), torch.zeros(2)), torch.full((2, 1), 3.0)) and seen == [2]

