"""Client-level DP at the server: the relation is stated, and the PLD bound is the tighter one."""

import math

import pytest

from strategies.client_level import calibrate_site_noise, site_level_accountant, site_level_epsilon


def _flower_rdp_epsilon(sigma: float, rounds: int, num_sites: int, delta: float) -> float:
    from flwr.supercore.privacy_accounting import GaussianPrivacyEvent

    accountant = site_level_accountant(num_sites=num_sites, delta=delta)
    accountant.compose(
        GaussianPrivacyEvent(noise_multiplier=sigma, sample_size=num_sites, population_size=num_sites), count=rounds
    )
    return float(accountant.get_epsilon(delta))


def test_pld_is_tighter_than_flowers_rdp_for_the_same_noise():
    sigma = 9.94  # the README's old calibration: RDP epsilon 1.0 over 6 rounds at delta 1e-5
    rdp = _flower_rdp_epsilon(sigma, 6, 4, 1e-5)
    pld = site_level_epsilon(noise_multiplier=sigma, rounds=6, delta=1e-5)
    assert rdp == pytest.approx(1.0, abs=0.01)
    assert 0.85 < pld < rdp  # about 0.91


def test_zero_out_and_replace_one_are_both_reported_and_ordered():
    zero = site_level_epsilon(noise_multiplier=3.0, rounds=5, delta=1e-5, relation="zero_out")
    replace = site_level_epsilon(noise_multiplier=3.0, rounds=5, delta=1e-5, relation="replace_one")
    # replace-one moves the clipped sum by 2S: exactly the zero-out mechanism at half the noise
    assert replace == pytest.approx(site_level_epsilon(noise_multiplier=1.5, rounds=5, delta=1e-5), rel=1e-6)
    assert replace > 1.8 * zero
    assert site_level_epsilon(noise_multiplier=3.0, rounds=0, delta=1e-5) == 0.0
    with pytest.raises(ValueError, match="relation"):
        site_level_epsilon(noise_multiplier=3.0, rounds=5, delta=1e-5, relation="add_or_remove")


@pytest.mark.parametrize("target", [1.0, 8.0])
def test_calibrated_site_noise_meets_the_target_and_is_nearly_tight(target):
    sigma = calibrate_site_noise(target_epsilon=target, rounds=6, delta=1e-5)
    assert site_level_epsilon(noise_multiplier=sigma, rounds=6, delta=1e-5) <= target
    assert site_level_epsilon(noise_multiplier=sigma * 0.97, rounds=6, delta=1e-5) > target * 0.99
    assert math.isfinite(sigma)
