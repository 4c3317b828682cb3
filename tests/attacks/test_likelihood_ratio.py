"""The likelihood-ratio attacks: silent on their own reference, and they find members of a model
that memorised its training data (a real non-private fine-tuning, not a mock)."""

import copy

import numpy as np
import pandas as pd
import pytest

from fedclip.attacks.idia import IdiaConfig, IdiaTargets
from fedclip.attacks.likelihood_ratio import PatientLikelihoodRatio, RecordLikelihoodRatio
from fedclip.attacks.metrics import attack_tables
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
