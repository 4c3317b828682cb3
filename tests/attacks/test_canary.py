"""The canary audit and the score metrics beside it: known answers and validity under the null."""

import numpy as np
import pytest

from fedclip.attacks.base import AttackDecisions
from fedclip.attacks.canary import CanaryAudit
from fedclip.attacks.metrics import attack_tables, roc_curve, score_metrics
from fedclip.attacks.one_run import audit_scores
from fedclip.data.canaries import CANARY_FILE, load_canaries
from fedclip.data.synthetic import SyntheticConfig, generate
from fedclip.models.factory import ModelConfig, create_model


def test_roc_and_auc_on_hand_made_scores():
    scores = np.array([0.9, 0.8, 0.7, 0.6, 0.5, 0.4])
    member = np.array([True, True, False, True, False, False])
    fpr, tpr = roc_curve(scores, member)
    assert list(fpr) == pytest.approx([0, 0, 0, 1 / 3, 1 / 3, 2 / 3, 1])
    assert list(tpr) == pytest.approx([0, 1 / 3, 2 / 3, 2 / 3, 1, 1, 1])
    m = score_metrics(scores, member)
    assert m["auc"] == pytest.approx(8 / 9)  # 8 of the 9 member/non-member pairs ordered right
    assert m["tpr_at_1pct_fpr"] == pytest.approx(2 / 3) and m["tpr_at_0.1pct_fpr"] == pytest.approx(2 / 3)
    tied = score_metrics(np.zeros(6), member)
    assert tied["auc"] == pytest.approx(0.5) and tied["tpr_at_1pct_fpr"] == 0  # ties move together


def test_a_perfect_score_certifies_and_chance_does_not():
    rng = np.random.default_rng(0)
    included = rng.random(128) < 0.5
    perfect = audit_scores(included.astype(float) + rng.normal(0, 0.01, 128), included, delta=1e-5)
    assert perfect.epsilon_lower_bound > 1.5 and perfect.correct == perfect.guesses
    # under the null (scores independent of inclusion) a bound above 0 is a false alarm: at most
    # 5% of the time at 95% confidence (the K guess counts are Bonferroni-corrected)
    alarms = sum(
        audit_scores(rng.normal(size=128), rng.random(128) < 0.5, delta=1e-5).epsilon_lower_bound > 0
        for _ in range(300)
    )
    assert alarms <= 0.05 * 300 + 3 * (0.05 * 0.95 * 300) ** 0.5


def test_attack_tables_fill_the_audit_columns_only_for_randomised_decisions():
    import pandas as pd

    frame = pd.DataFrame(
        {
            "target": list("abcd"),
            "site": ["s", "", "s", ""],
            "is_member": [True, False, True, False],
            "predicted_member": [True, False, True, False],
            "score": [2.0, 0.0, 1.0, -1.0],
        }
    )
    row, _ = attack_tables(
        AttackDecisions("x", frame, randomised=True), round_=1, max_site_epsilon=1.0, delta=1e-5, confidence=0.95
    )
    assert row["auc"] == 1.0 and row["audit_correct"] == row["audit_guesses"] > 0
    assert row["audited_epsilon"] == 0  # four canaries cannot certify anything at 95%
    plain, _ = attack_tables(AttackDecisions("x", frame), round_=1, max_site_epsilon=1.0, delta=1e-5, confidence=0.95)
    assert plain["audited_epsilon"] != plain["audited_epsilon"]  # NaN: membership was not a coin flip


def test_the_canary_audit_scores_nothing_on_its_own_reference(tmp_path):
    cfg = SyntheticConfig(
        seed=1,
        num_sites=2,
        patients_per_site=3,
        public_patients=2,
        heldout_patients=2,
        images_per_patient=3,
        query_images_per_patient=1,
        canaries=12,
    )
    generate(tmp_path, cfg, canary_secret=bytes(32))
    bundle = create_model(ModelConfig())
    audit = CanaryAudit(
        load_canaries(tmp_path / CANARY_FILE),
        reference=bundle.model,
        preprocess=bundle.preprocess,
        tokenizer=bundle.tokenizer,
    )
    decisions = audit(bundle.model)
    assert decisions.randomised and len(decisions.frame) == 12
    assert np.allclose(decisions.frame["score"], 0) and not decisions.frame["predicted_member"].any()
    assert (decisions.frame.loc[~decisions.frame["is_member"], "site"] == "").all()
    with torch_no_grad_perturbed(bundle.model):
        moved = audit(bundle.model).frame["score"]
    assert not np.allclose(moved, 0)


class torch_no_grad_perturbed:
    """Nudge every trainable weight, and put it back afterwards."""

    def __init__(self, model):
        import torch

        self.model, self.torch = model, torch
        self.saved = {n: p.detach().clone() for n, p in model.named_parameters()}

    def __enter__(self):
        with self.torch.no_grad():
            for p in self.model.parameters():
                p.add_(0.05 * self.torch.randn_like(p))

    def __exit__(self, *exc):
        with self.torch.no_grad():
            for n, p in self.model.named_parameters():
                p.copy_(self.saved[n])
