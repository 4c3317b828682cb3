"""Client-level DP at the server, where the privacy unit is a whole site.

Flower's ``DifferentialPrivacyServerSideFixedClipping`` clips each site's update to norm S,
averages the m updates with equal weights, and adds N(0, (sigma S / m)^2) to the average: the
sum of clipped updates has sensitivity S when one site is added or removed, so each round is a
Gaussian mechanism with noise multiplier sigma. Every site takes part in every round (no
sampling amplification is claimed), and Flower's own ``RdpAccountant`` composes the rounds.

With few sites this is expensive, and that is the point of showing it: a site-level epsilon
of a few over a handful of rounds needs sigma of several, so the noise on the average is of the
order of S / m * sigma, comparable to the updates themselves.
"""

from __future__ import annotations

from flwr.serverapp.strategy import DifferentialPrivacyServerSideFixedClipping, FedAvg
from flwr.supercore.privacy_accounting import (
    GaussianPrivacyEvent,
    NeighboringRelation,
    PrivacyConfig,
    SamplingMethod,
)
from flwr.supercore.privacy_accounting.rdp_accountant import RdpAccountant

SITE_WEIGHT_KEY = "site-weight"


def site_level_accountant(*, num_sites: int, delta: float) -> RdpAccountant:
    return RdpAccountant(PrivacyConfig(target_delta=delta, population_size=num_sites,
                                       neighboring_relation=NeighboringRelation.ADD_OR_REMOVE_ONE,
                                       sampling_method=SamplingMethod.NO_AMPLIFICATION))


def site_level_epsilon(*, noise_multiplier: float, rounds: int, num_sites: int, delta: float) -> float:
    accountant = site_level_accountant(num_sites=num_sites, delta=delta)
    accountant.compose(GaussianPrivacyEvent(noise_multiplier=noise_multiplier, sample_size=num_sites,
                                            population_size=num_sites), count=rounds)
    return float(accountant.get_epsilon(delta))


def calibrate_site_noise(*, target_epsilon: float, rounds: int, num_sites: int, delta: float, tolerance: float = 0.01) -> float:
    """Smallest sigma (within ``tolerance``) whose site-level epsilon after ``rounds`` is <= target."""
    if not target_epsilon > 0:
        raise ValueError(f"client-dp-epsilon: expected > 0, got {target_epsilon}")
    low, high = 0.0, 1.0
    while site_level_epsilon(noise_multiplier=high, rounds=rounds, num_sites=num_sites, delta=delta) > target_epsilon:
        low, high = high, high * 2
    while high - low > tolerance * high:
        mid = (low + high) / 2
        if mid > 0 and site_level_epsilon(noise_multiplier=mid, rounds=rounds, num_sites=num_sites, delta=delta) <= target_epsilon:
            high = mid
        else:
            low = mid
    return high


def with_site_level_dp(*, noise_multiplier: float, clip_norm: float, num_sites: int,
                       delta: float) -> DifferentialPrivacyServerSideFixedClipping:
    """FedAvg with equal site weights, wrapped in Flower's accounted server-side DP."""
    inner = FedAvg(fraction_evaluate=0.0, min_train_nodes=1, min_available_nodes=1, weighted_by_key=SITE_WEIGHT_KEY)
    return DifferentialPrivacyServerSideFixedClipping(inner, noise_multiplier=noise_multiplier, clipping_norm=clip_norm,
                                                      num_sampled_clients=num_sites,
                                                      accountant=site_level_accountant(num_sites=num_sites, delta=delta))
