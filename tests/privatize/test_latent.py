"""The latent mechanism: clipping per image, the noise the accounting assumes, and its epsilon."""

import math

import pytest
import torch
from scipy.optimize import brentq
from scipy.stats import norm

from fedclip.privatize.latent import (
    LatentNoise,
    Mechanism,
    calibrate_latent_noise,
    clip_latents,
    latent_epsilon,
    privatize_latents,
)


def _gaussian_mechanism_epsilon(distance: float, std: float, delta: float) -> float:
    """Closed form (Balle and Wang 2018) for N(0, std^2) against N(distance, std^2)."""
    r = distance / std
    return brentq(lambda e: norm.cdf(r / 2 - e / r) - math.exp(e) * norm.cdf(-r / 2 - e / r) - delta, 0, 200)


def test_each_latent_is_clipped_on_its_own():
    z = torch.tensor([[3.0, 4.0], [0.3, 0.4], [-6.0, 8.0]])
    clipped = clip_latents(z, radius=1.0, norm_order=2)
    assert torch.allclose(clipped, torch.tensor([[0.6, 0.8], [0.3, 0.4], [-0.6, 0.8]]))
    assert torch.allclose(clip_latents(z, radius=1.0, norm_order=1)[0], torch.tensor([3 / 7, 4 / 7]))


@pytest.mark.parametrize("mechanism", list(Mechanism))
def test_changing_one_image_changes_only_its_output(mechanism):
    noise = LatentNoise(mechanism=mechanism, radius=2.0, noise_multiplier=0.5)
    z = torch.randn(6, 50, generator=torch.Generator().manual_seed(0)) * 3
    changed = z.clone()
    changed[3] = -10 * changed[3]
    a = privatize_latents(z, noise=noise, generator=torch.Generator().manual_seed(5))
    b = privatize_latents(changed, noise=noise, generator=torch.Generator().manual_seed(5))
    differs = (a != b).any(dim=1)
    assert differs.tolist() == [False, False, False, True, False, False]


@pytest.mark.parametrize(
    "mechanism,expected_std", [(Mechanism.GAUSSIAN, 0.7 * 3.0), (Mechanism.LAPLACE, math.sqrt(2) * 0.7 * 3.0)]
)
def test_the_noise_has_the_std_the_accounting_assumes(mechanism, expected_std):
    noise = LatentNoise(mechanism=mechanism, radius=3.0, noise_multiplier=0.7)
    out = privatize_latents(torch.zeros(400, 500), noise=noise, generator=torch.Generator().manual_seed(1))
    assert out.std().item() == pytest.approx(expected_std, rel=0.01)
    assert out.mean().abs().item() < 0.01 * expected_std


def test_epsilon_is_the_replace_one_gaussian_of_distance_2s_composed_over_a_units_images():
    for images, multiplier in ((1, 2.0), (4, 2.0), (10, 6.0)):
        noise = LatentNoise(mechanism="gaussian", radius=5.0, noise_multiplier=multiplier)
        # k Gaussian releases of distance 2s, std m*s: one Gaussian of distance 2s*sqrt(k)
        expected = _gaussian_mechanism_epsilon(2 * math.sqrt(images), multiplier, 1e-5)
        assert latent_epsilon(noise, images=images, delta=1e-5) == pytest.approx(expected, rel=2e-3)
    laplace = LatentNoise(mechanism="laplace", radius=5.0, noise_multiplier=4.0)
    assert latent_epsilon(laplace, images=3, delta=1e-5) == pytest.approx(3 * 2 / 4.0)


@pytest.mark.parametrize("mechanism", list(Mechanism))
def test_calibration_never_overshoots_and_is_not_wasteful(mechanism):
    for target, images in ((1.0, 1), (8.0, 10)):
        noise = calibrate_latent_noise(mechanism, target_epsilon=target, delta=1e-5, images=images, radius=2.0)
        eps = latent_epsilon(noise, images=images, delta=1e-5)
        assert target * 0.99 <= eps <= target


def test_bad_noise_names_the_field():
    with pytest.raises(ValueError, match="radius"):
        LatentNoise(mechanism="gaussian", radius=0.0, noise_multiplier=1.0)
    with pytest.raises(ValueError, match="noise_multiplier"):
        LatentNoise(mechanism="gaussian", radius=1.0, noise_multiplier=float("inf"))
    with pytest.raises(ValueError):
        LatentNoise(mechanism="uniform", radius=1.0, noise_multiplier=1.0)


def test_gaussian_latent_noise_is_drawn_in_secure_mode_from_the_given_generator():
    """The same draw as DP training's optimizer (Opacus' secure mode: floating-point attacks on the
    noise), from the site's own generator: rebuilt here from Opacus with the same seed."""
    from opacus.optimizers.optimizer import _generate_noise

    latents = torch.randn(5, 12)
    noise = LatentNoise(mechanism=Mechanism.GAUSSIAN, radius=1.5, noise_multiplier=2.0)
    out = privatize_latents(latents, noise=noise, generator=torch.Generator().manual_seed(11))
    clipped = clip_latents(latents, radius=1.5, norm_order=2)
    expected = clipped + _generate_noise(
        3.0, torch.zeros(5, 12), generator=torch.Generator().manual_seed(11), secure_mode=True
    )
    torch.testing.assert_close(out, expected)
    plain = clipped + 3.0 * torch.randn(5, 12, generator=torch.Generator().manual_seed(11))
    assert not torch.allclose(out, plain)
