"""A site's own policy, parsed from its node config or a policy file, and what it refuses."""

import math

import pytest

from fedclip.privacy.events import DpEvent
from fedclip.privacy.ledger import PrivacyLedger
from fedclip.privacy.policy import DEPLOYED_DEFAULT, PolicyRefusal, SitePolicy, load_policy_file

E = DpEvent(
    noise_multiplier=2.0, sample_rate=0.5, steps=10, privacy_unit="identity", relation="replace_one", sensitivity=1.0
)
EMPTY = PrivacyLedger(delta=1e-5)


def _check(policy: SitePolicy, *, mode="microbatch", events=(E,), reproducible=False, total=EMPTY, run=EMPTY):
    policy.check(site="h", mode=mode, events=events, reproducible=reproducible, total=total, this_run=run)


def test_a_deployed_default_policy_allows_private_modes_only_and_no_seeded_noise():
    policy = SitePolicy.from_mapping({"partition-id": 3}, source="node config")
    _check(policy)
    _check(policy, mode="paper")
    with pytest.raises(PolicyRefusal, match="h: allowed-dp-modes: dp-mode 'nonprivate'"):
        _check(policy, mode="nonprivate", events=(DpEvent(**{**E.to_dict(), "noise_multiplier": 0.0}),))
    with pytest.raises(PolicyRefusal, match="reproducible-noise"):
        _check(policy, reproducible=True)


def test_a_hospital_that_sets_no_cap_is_capped_at_epsilon_10_and_told_so():
    policy = SitePolicy.from_mapping({"site": "h"}, source="node config", defaults=DEPLOYED_DEFAULT)
    assert policy.max_epsilon_run == policy.max_epsilon_total == 10.0
    step = DpEvent(**{**E.to_dict(), "steps": 1})
    spent = PrivacyLedger(delta=1e-5).record_all([step] * 14)  # already near the cap
    assert 8 < spent.epsilon() < 10
    _check(policy, events=(step,), total=PrivacyLedger(delta=1e-5).record_all([step] * 2))
    with pytest.raises(PolicyRefusal, match="max-epsilon-total: this round would bring epsilon to"):
        _check(policy, events=(E,), total=spent)
    line = policy.describe(site="h", given={"site": "h"})
    assert "max-epsilon-total=10 (default)" in line and "min-noise-multiplier=0 (default)" in line
    own = SitePolicy.from_mapping({"max-epsilon-total": 4.0}, source="node config", defaults=DEPLOYED_DEFAULT)
    line = own.describe(site="h", given={"max-epsilon-total": 4.0})
    assert "max-epsilon-total=4 " in line + " " and "max-epsilon-run=10 (default)" in line
    unlimited = SitePolicy.from_mapping({"max-epsilon-total": "inf"}, source="node config", defaults=DEPLOYED_DEFAULT)
    assert math.isinf(unlimited.max_epsilon_total)  # a hospital may lift the cap, by saying so


def test_node_config_sets_each_rule():
    policy = SitePolicy.from_mapping(
        {
            "allowed-dp-modes": "microbatch",
            "min-noise-multiplier": 3.0,
            "max-epsilon-run": 5.0,
            "max-epsilon-total": 8.0,
            "delta": 1e-6,
        },
        source="node config",
    )
    assert policy.allowed_dp_modes == ("microbatch",) and policy.delta == 1e-6
    with pytest.raises(PolicyRefusal, match="min-noise-multiplier: noise multiplier 2 .* is below this site's floor 3"):
        _check(policy)
    spent = PrivacyLedger(delta=1e-6, events=(DpEvent(**{**E.to_dict(), "noise_multiplier": 3.0}),) * 3)
    strong = (DpEvent(**{**E.to_dict(), "noise_multiplier": 3.0}),)
    _check(policy, events=strong, total=PrivacyLedger(delta=1e-6))
    with pytest.raises(PolicyRefusal, match="max-epsilon-run"):
        _check(policy, events=strong, run=spent, total=spent)


def test_paper_mode_meets_the_floor_with_its_effective_noise():
    """Paper mode's sensitivity is 2C: sigma 5 is the noise of sigma 2.5 per unit of sensitivity."""
    policy = SitePolicy.from_mapping({"min-noise-multiplier": 3.0}, source="node config")
    paper = DpEvent(
        noise_multiplier=5.0,
        sample_rate=0.5,
        steps=10,
        privacy_unit="identity",
        relation="add_or_remove",
        sensitivity=2.0,
    )
    with pytest.raises(
        PolicyRefusal, match=r"noise multiplier 2\.5 \(sigma / sensitivity\) is below this site's floor 3"
    ):
        _check(policy, mode="paper", events=(paper,))
    _check(policy, mode="paper", events=(DpEvent(**{**paper.to_dict(), "noise_multiplier": 6.0}),))


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"allowed-dp-modes": "microbach"}, "allowed-dp-modes"),
        ({"min-noise-multiplier": -1}, "min-noise-multiplier"),
        ({"max-epsilon-total": 0}, "max-epsilon-total"),
        ({"max-epsilon-run": "lots"}, "node config: site policy"),
        ({"delta": 1.5}, "delta"),
    ],
)
def test_bad_policy_values_name_the_key(values, message):
    with pytest.raises(ValueError, match=message):
        SitePolicy.from_mapping(values, source="node config")


def test_policy_file_has_defaults_and_per_site_tables(tmp_path):
    path = tmp_path / "p.toml"
    path.write_text('[default]\nmin-noise-multiplier = 1.0\n[hospital_1]\nallowed-dp-modes = ["microbatch"]\n')
    policies = load_policy_file(path, delta=1e-5)
    assert policies["*"].min_noise_multiplier == 1.0 and "nonprivate" in policies["*"].allowed_dp_modes
    assert (
        policies["hospital_1"].allowed_dp_modes == ("microbatch",)
        and policies["hospital_1"].min_noise_multiplier == 1.0
    )
    assert math.isinf(policies["hospital_1"].max_epsilon_total)
    path.write_text("[hospital_1]\nmax-epsilon = 3\n")
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['max-epsilon'\]"):
        load_policy_file(path, delta=1e-5)
