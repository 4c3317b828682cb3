"""summary.md says what the run protects, what it released, and when it is not private at all."""

import pandas as pd

from fedclip.reporting.run_files import RunFiles
from fedclip.reporting.summary import write_summary
from simulations.hospital_clip.config import SimulationConfig


def _frames():
    rounds = pd.DataFrame(
        [
            {
                "round": 1,
                "site": "h0",
                "status": "trained",
                "epsilon": 1.5,
                "budget": 4.0,
                "selected": True,
                "reason": "",
            },
            {
                "round": 1,
                "site": "h1",
                "status": "refused",
                "epsilon": 1.5,
                "budget": 4.0,
                "selected": True,
                "reason": "site policy refuses the round at h1: min-noise-multiplier: 1 < 2",
            },
        ]
    )
    attack = pd.DataFrame(
        [
            {
                "round": 1,
                "tpr": 0.1,
                "fpr": 0.0,
                "precision": 1.0,
                "accuracy": 0.5,
                "epsilon_lower_bound": 0.0,
                "max_site_epsilon": 1.5,
            }
        ]
    )
    utility = pd.DataFrame([{"round": 1, "zero_shot_accuracy": 0.5, "recall_at_1": 0.1, "recall_at_5": 0.2}])
    return rounds, attack, utility


def _summary(tmp_path, **overrides) -> str:
    config = SimulationConfig(**overrides).to_run_config()
    rounds, attack, utility = _frames()
    return write_summary(
        tmp_path / "summary.md", config=config, rounds=rounds, attack=attack, utility=utility, noise_multiplier=2.0
    ).read_text()


def test_the_default_summary_states_the_threat_model_and_what_was_released(tmp_path):
    text = _summary(tmp_path)
    assert "the server is the adversary" in text and "OS entropy" in text
    assert "no count, loss or other value computed from its data" in text
    assert "NOT PRIVATE" not in text
    assert "| 1 | h1 | refused | site policy refuses the round at h1" in text
    assert "indicative, not a certificate" in text and "Bonferroni" in text


def test_reproducible_noise_is_announced_as_not_private(tmp_path):
    text = _summary(tmp_path, reproducible_noise=True)
    assert "NOT PRIVATE AGAINST THE SERVER" in text.splitlines()[2]


def test_released_statistics_are_named_with_their_noise(tmp_path):
    text = _summary(tmp_path, release_loss_noise=3.0)
    assert "the mean training loss" in text and "noise multiplier 3.0" in text


def test_a_resumed_run_drops_rows_of_rounds_it_will_run_again(tmp_path):
    files = RunFiles(tmp_path)
    files.append(
        "utility",
        [
            {
                "round": r,
                "zero_shot_accuracy": 0.1,
                "recall_at_1": 0,
                "recall_at_5": 0,
                "validation_zero_shot_accuracy": "",
            }
            for r in range(4)
        ],
    )
    files.truncate_after(2)
    assert files.read("utility")["round"].tolist() == [0, 1, 2]


def test_deliberate_overrides_are_printed(tmp_path):
    text = _summary(tmp_path, allow_large_delta=True)
    assert "allow-large-delta = true" in text and "not meaningful" in text


def test_the_failure_rule_is_stated(tmp_path):
    assert "stops the run if any selected site fails" in _summary(tmp_path)
    assert "failure-quorum 0.75: a round counts if at least that share" in _summary(tmp_path, failure_quorum=0.75)


def test_rows_say_what_epsilon_is_about_and_input_level_audits_are_not_held_against_it(tmp_path):
    from fedclip.privacy.guarantee import guarantee_of

    rounds, attack, utility = _frames()
    g = guarantee_of(mode="cadp", privacy_unit="identity")
    rounds = rounds.assign(**g.as_columns())
    audit = {
        "round": 1,
        "attack": "canary",
        "tpr": 0.6,
        "fpr": 0.1,
        "epsilon_lower_bound": float("nan"),
        "auc": 0.8,
        "tpr_at_1pct_fpr": 0.2,
        "audited_epsilon": 3.0,
        "audit_guesses": 20,
        "audit_correct": 19,
        "max_site_epsilon": 1.5,
    }
    config = SimulationConfig().to_run_config()
    for comparable, warned in ((False, False), (True, True)):
        table = pd.DataFrame([{**audit, "comparable_to_epsilon": comparable}])
        text = write_summary(
            tmp_path / "summary.md", config=config, rounds=rounds, attack=table, utility=utility, noise_multiplier=2.0
        ).read_text()
        assert f"neighbouring data sets: {g.neighbours}**; covered: {g.covers}" in text
        assert ("WARNING: round 1: the canary audit certifies" in text) == warned
        assert ("1.500 (about images: not comparable)" in text) == (not warned)


def test_rounds_trained_counts_the_rounds_a_site_trained_not_those_it_was_selected_for(tmp_path):
    """A SuperNode lost in round 2 was selected twice and trained once (its charge stays: epsilon)."""
    rows = [
        {"round": r, "site": "h0", "status": s, "epsilon": 1.0 * r, "budget": 4.0, "selected": True, "reason": ""}
        for r, s in ((1, "trained"), (2, "lost"))
    ]
    _, attack, utility = _frames()
    text = write_summary(
        tmp_path / "summary.md",
        config=SimulationConfig().to_run_config(),
        rounds=pd.DataFrame(rows),
        attack=attack,
        utility=utility,
        noise_multiplier=2.0,
        site_ledgers={"h0": 1.0},
    ).read_text()
    # trained once, charged twice by the server; the site's own ledger holds the round it trained
    assert "| h0 | 1 | 2 | 2.000 | 1.000 | 4.0 |" in text
    assert "a lost site (no reply) is charged in its own ledger if it received the round" in text
