"""Client-level DP at the server, where the privacy unit is a whole site.

Flower's ``DifferentialPrivacyServerSideFixedClipping`` clips each site's update to norm S,
averages the m updates with equal weights (m fixed: ``num_sampled_clients``), and adds
N(0, (sigma S / m)^2) to the average. Every site takes part in every round (no sampling
amplification is claimed).

**Relations, stated exactly.** Because m is fixed, "removing" a site means its clipped update
is replaced by *zero*: the sum moves by at most S. That is the **zero-out** relation, the one
client-level DP in Flower (and in McMahan et al. 2018) is about, and the headline epsilon here.
If instead one site's data may be replaced by anything (**replace-one**), its clipped update
moves from u to u' with ``|u - u'| <= 2S``: the same Gaussian with sensitivity 2S, reported
beside it. Both are composed over the released rounds with Google dp-accounting's privacy loss
distribution (pessimistic), which is tighter than the RDP bound Flower's accountant gives (that
figure is kept too, as a cross-check).
"""

from __future__ import annotations

from flwr.serverapp.strategy import DifferentialPrivacyServerSideFixedClipping, FedAvg
from flwr.supercore.privacy_accounting import GaussianPrivacyEvent, NeighboringRelation, PrivacyConfig, SamplingMethod
from flwr.supercore.privacy_accounting.rdp_accountant import RdpAccountant

from fedclip.privacy.accountant import check_delta, gaussian_pld
from fedclip.privacy.calibration import smallest_noise
from fedclip.privacy.events import Relation
from strategies.registry import SITE_WEIGHT_KEY

SITE_RELATIONS = {"zero_out": 1.0, "replace_one": 2.0}  # sensitivity of the clipped sum, in units of S


def site_level_accountant(*, num_sites: int, delta: float) -> RdpAccountant:
    return RdpAccountant(
        PrivacyConfig(
            target_delta=delta,
            population_size=num_sites,
            neighboring_relation=NeighboringRelation.ADD_OR_REMOVE_ONE,
            sampling_method=SamplingMethod.NO_AMPLIFICATION,
        )
    )


def site_level_epsilon(*, noise_multiplier: float, rounds: int, delta: float, relation: str = "zero_out") -> float:
    """PLD epsilon of ``rounds`` unsampled Gaussian releases of the clipped sum under ``relation``."""
    check_delta(delta)
    if relation not in SITE_RELATIONS:
        raise ValueError(f"relation: expected one of {sorted(SITE_RELATIONS)}, got {relation!r}")
    if rounds == 0:
        return 0.0
    pld = gaussian_pld(
        noise_multiplier=noise_multiplier,
        sensitivity=SITE_RELATIONS[relation],
        sample_rate=1.0,
        steps=rounds,
        relation=Relation.ADD_OR_REMOVE,
    )
    return float(pld.get_epsilon_for_delta(delta))


def calibrate_site_noise(*, target_epsilon: float, rounds: int, delta: float, tolerance: float = 0.01) -> float:
    """Smallest sigma (within ``tolerance``) whose zero-out epsilon after ``rounds`` is <= target."""
    if not target_epsilon > 0:
        raise ValueError(f"client-dp-epsilon: expected > 0, got {target_epsilon}")

    return smallest_noise(
        lambda sigma: site_level_epsilon(noise_multiplier=sigma, rounds=rounds, delta=delta),
        target_epsilon=target_epsilon,
        tolerance=tolerance,
    )


def site_level_report(
    *, noise_multiplier: float, clip_norm: float, releases: int, num_sites: int, delta: float
) -> dict[str, object]:
    """``site_level.json``: the site-level epsilons over ``releases`` noised aggregates.

    ``releases`` must come from the durable record (``LedgerStore.aggregates()``: every attempt at
    which the server computed an aggregate, written before it), never from the wrapper's own
    accountant, which a resumed process rebuilds at zero. Flower's RDP figure is recomputed from
    the same count with a fresh accountant, as a cross-check."""
    flower = site_level_accountant(num_sites=num_sites, delta=delta)
    if releases:
        flower.compose(
            GaussianPrivacyEvent(noise_multiplier=noise_multiplier, sample_size=num_sites, population_size=num_sites),
            count=releases,
        )
    return {
        "epsilon": site_level_epsilon(noise_multiplier=noise_multiplier, rounds=releases, delta=delta),
        "epsilon_replace_one": site_level_epsilon(
            noise_multiplier=noise_multiplier, rounds=releases, delta=delta, relation="replace_one"
        ),
        "epsilon_flower_rdp": flower.get_epsilon(delta) if releases else 0.0,
        "delta": delta,
        "noise_multiplier": noise_multiplier,
        "clip_norm": clip_norm,
        "rounds": releases,
        "unit": "site",
        "relation": "zero_out",
        "accountant": "dp-accounting PLD (pessimistic)",
        "counted_from": "the server's ledger: every attempt that computed an aggregate, resumes included",
    }


def with_site_level_dp(
    *, noise_multiplier: float, clip_norm: float, num_sites: int, delta: float
) -> DifferentialPrivacyServerSideFixedClipping:
    """FedAvg with equal site weights, wrapped in Flower's server-side DP (its accountant counts releases)."""
    inner = FedAvg(fraction_evaluate=0.0, min_train_nodes=1, min_available_nodes=1, weighted_by_key=SITE_WEIGHT_KEY)
    return DifferentialPrivacyServerSideFixedClipping(
        inner,
        noise_multiplier=noise_multiplier,
        clipping_norm=clip_norm,
        num_sampled_clients=num_sites,
        accountant=site_level_accountant(num_sites=num_sites, delta=delta),
    )
