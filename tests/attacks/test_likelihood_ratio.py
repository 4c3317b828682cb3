"""The likelihood-ratio attacks: silent on their own reference, and they find members of a model
that memorised its training data (a real non-private fine-tuning, not a mock)."""

import copy

import numpy as np
import pandas as pd
import pytest
import torch

from fedclip.attacks.idia import IdiaConfig, IdiaTargets
from fedclip.attacks.likelihood_ratio import (
    PatientLikelihoodRatio,
    RecordLikelihoodRatio,
    name_log_probs,
    report_log_probs,
)
from fedclip.attacks.metrics import attack_tables
from fedclip.attacks.reference_models import reference_models
from fedclip.data.manifest import load_manifest
from fedclip.data.schema import Split
from fedclip.data.synthetic import SyntheticConfig, generate
from fedclip.data.tensors import load_pairs
from fedclip.models.factory import ModelConfig, create_model
from fedclip.training.config import DpConfig, Mode, TrainConfig
from fedclip.training.local import train_local

IDIA = IdiaConfig(num_queries=2, num_distractors=10)


@pytest.fixture(scope="module")
def setting(tmp_path_factory):
    path = generate(
        tmp_path_factory.mktemp("lira"),
        SyntheticConfig(
            seed=3,
            num_sites=1,
            patients_per_site=16,
            public_patients=4,
            heldout_patients=16,
            images_per_patient=4,
            query_images_per_patient=2,
        ),
    )
    frame = load_manifest(path).frame
    bundle = create_model(ModelConfig(trainable="all"))
    base = copy.deepcopy(bundle.model)
    record = RecordLikelihoodRatio(
        frame, reference=base, preprocess=bundle.preprocess, tokenizer=bundle.tokenizer, max_per_side=40, seed=0
    )
    patient = PatientLikelihoodRatio(
        IdiaTargets.from_frame(frame, config=IDIA, preprocess=bundle.preprocess),
        reference=base,
        tokenizer=bundle.tokenizer,
        config=IDIA,
    )
    return frame, bundle, base, record, patient


def test_both_attacks_score_nothing_on_their_reference(setting):
    frame, bundle, base, record, patient = setting
    for attack in (record, patient):
        d = attack(base)
        assert np.allclose(d.frame["score"], 0, atol=1e-5) and not d.frame["predicted_member"].any()
        assert (d.frame.loc[~d.frame["is_member"], "site"] == "").all() and d.frame.loc[
            d.frame["is_member"], "site"
        ].ne("").all()
    d = record(base)
    assert d.frame["is_member"].sum() == 40 and (~d.frame["is_member"]).sum() == 32  # 64 members sampled to 40; all 32
    assert len(patient(base).frame) == 32


def test_a_memorising_model_is_found_with_high_auc_and_tpr_at_low_fpr(setting):
    frame, bundle, base, record, patient = setting
    model = copy.deepcopy(base)
    members = load_pairs(
        frame[frame["split"] == str(Split.TRAIN)], preprocess=bundle.preprocess, tokenizer=bundle.tokenizer
    )
    train_local(
        model,
        members,
        dp=DpConfig(mode=Mode.NONPRIVATE, sample_rate=1.0),
        train=TrainConfig(steps=60, lr=2e-3),
        reproducible_seed=0,
    )
    row, _ = attack_tables(record(model), round_=1, max_site_epsilon=float("inf"), delta=1e-5, confidence=0.95)
    assert row["auc"] > 0.8 and row["tpr_at_1pct_fpr"] > 0.05
    assert row["tpr"] > row["fpr"]
    people, _ = attack_tables(patient(model), round_=1, max_site_epsilon=float("inf"), delta=1e-5, confidence=0.95)
    assert people["auc"] > 0.6


def test_the_record_attack_needs_members_and_non_members(setting):
    frame, bundle, base, *_ = setting
    with pytest.raises(ValueError, match="no 'heldout' rows"):
        RecordLikelihoodRatio(
            frame[frame["split"] != "heldout"], reference=base, preprocess=bundle.preprocess, tokenizer=bundle.tokenizer
        )
    with pytest.raises(ValueError, match="lira-records"):
        RecordLikelihoodRatio(
            frame, reference=base, preprocess=bundle.preprocess, tokenizer=bundle.tokenizer, max_per_side=0
        )
    assert isinstance(frame, pd.DataFrame)


def test_reference_models_are_shadow_federations_reproducible_and_leave_the_base_alone(setting):
    frame, bundle, base, *_ = setting
    public = load_pairs(
        frame[frame["split"] == str(Split.PUBLIC)], preprocess=bundle.preprocess, tokenizer=bundle.tokenizer
    )
    before = [p.detach().clone() for p in base.parameters()]
    dp = DpConfig(mode=Mode.MICROBATCH, noise_multiplier=1.0, sample_rate=0.5, declared_units=1)

    def shadows(count):
        return list(
            reference_models(
                base,
                public,
                count=count,
                sites=2,
                rounds=2,
                patients=3,
                dp=dp,
                train=TrainConfig(steps=2, lr=1e-3),
                seed=0,
            )
        )

    made = shadows(2)
    assert [r.view for r in made] == ["reply", "reply", "global"] * 2
    assert all(torch.equal(a, b) for a, b in zip(before, base.parameters())), "the base model is untouched"
    trainable = [n for n, p in base.named_parameters() if p.requires_grad]
    state = [dict(r.model.named_parameters()) for r in made]
    for name in trainable[-2:]:  # the shadow global model is the mean of its sites' final-round models
        torch.testing.assert_close(state[2][name], (state[0][name] + state[1][name]) / 2)
    assert not torch.equal(state[2][trainable[-1]], state[5][trainable[-1]]), "two federations differ"
    assert all(torch.equal(a, b) for a, b in zip(made[2].model.parameters(), shadows(1)[2].model.parameters()))
    with pytest.raises(ValueError, match="lira-references: .*dp-mode distributed"):
        next(
            reference_models(
                base,
                public,
                count=1,
                sites=2,
                rounds=1,
                patients=3,
                dp=DpConfig(mode=Mode.DISTRIBUTED, declared_units=4),
                train=TrainConfig(steps=1),
                seed=0,
            )
        )
    with pytest.raises(ValueError, match="lira-references: expected an integer >= 1"):
        next(reference_models(base, public, count=0, sites=2, rounds=1, patients=3, dp=dp, train=TrainConfig(), seed=0))


def test_with_reference_models_both_attacks_score_offline_lira_with_a_pooled_variance(setting):
    """Against an independent computation: (log p(model) - mean over references) / s, s the
    references' spread about each target's mean, pooled over targets; one reference: no division."""
    frame, bundle, base, *_ = setting
    targets = IdiaTargets.from_frame(frame, config=IDIA, preprocess=bundle.preprocess)
    patient = PatientLikelihoodRatio(targets, reference=base, tokenizer=bundle.tokenizer, config=IDIA)
    record = RecordLikelihoodRatio(
        frame, reference=base, preprocess=bundle.preprocess, tokenizer=bundle.tokenizer, max_per_side=40, seed=0
    )
    shifted = []
    for k in range(3):
        model = copy.deepcopy(base)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(k)) * 1e-2)
        shifted.append(model)

    def log_p(attack, model):
        if attack is patient:
            return name_log_probs(model, targets, tokenizer=bundle.tokenizer, templates=IDIA.templates)
        return report_log_probs(model, record.images, record.tokens)

    attacked = shifted[2]
    for attack in (patient, record):
        observed = log_p(attack, attacked)
        attack.add_reference(shifted[0])
        one = attack(attacked).frame["score"].to_numpy()
        np.testing.assert_allclose(one, observed - log_p(attack, shifted[0]), rtol=1e-5, atol=1e-6)
        attack.add_reference(shifted[1])
        out = np.stack([log_p(attack, shifted[0]), log_p(attack, shifted[1])])
        spread = np.sqrt(np.mean([np.var(out[:, i], ddof=1) for i in range(out.shape[1])]))
        expected = (observed - out.mean(axis=0)) / spread
        np.testing.assert_allclose(attack(attacked).frame["score"].to_numpy(), expected, rtol=1e-4, atol=1e-5)
        # the replies' view collects its own references, starting again from the base model
        twin = attack.sibling()
        np.testing.assert_allclose(twin(attacked).frame["score"].to_numpy(), observed - log_p(attack, base), atol=1e-5)
        np.testing.assert_allclose(attack(attacked).frame["score"].to_numpy(), expected, rtol=1e-4, atol=1e-5)
