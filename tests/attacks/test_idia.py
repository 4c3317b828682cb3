import numpy as np
import pytest
import torch

from fedclip.attacks.idia import IdentityInferenceAttack, IdiaConfig, IdiaTargets, majority_decisions
from fedclip.models.factory import ModelConfig, create_model


def test_majority_rule_on_hand_made_predictions():
    # 3 people, 2 templates, 5 images; person p's true name is candidate p
    predicted = np.array(
        [
            [[0, 0, 0, 1, 2], [0, 0, 1, 1, 2]],  # template 0: majority 0 (correct); template 1: tie 0/1 -> skipped
            [[1, 1, 0, 0, 2], [2, 2, 2, 1, 1]],  # tie -> skipped; majority 2 (wrong)
            [[2, 2, 2, 2, 2], [2, 0, 2, 1, 2]],  # both correct
        ]
    )
    correct, member = majority_decisions(predicted, np.array([0, 1, 2]), tau=1)
    assert correct.tolist() == [1, 0, 2] and member.tolist() == [True, False, True]
    _, member2 = majority_decisions(predicted, np.array([0, 1, 2]), tau=2)
    assert member2.tolist() == [False, False, True]


def test_majority_needs_a_plurality_not_half():
    predicted = np.array([[[3, 3, 0, 1, 2]]])  # 2 of 5 votes, but the most
    correct, _ = majority_decisions(predicted, np.array([3]), tau=1)
    assert correct.tolist() == [1]


def test_bad_idia_config_names_the_key():
    with pytest.raises(ValueError, match="tau"):
        IdiaConfig(tau=0)
    with pytest.raises(ValueError, match="tau"):
        IdiaConfig(tau=6)
    with pytest.raises(ValueError, match="templates"):
        IdiaConfig(templates=("no placeholder",))
    with pytest.raises(ValueError, match="num_queries"):
        IdiaConfig(num_queries=0)


def test_targets_and_attack_on_the_synthetic_data(small_manifest):
    config = IdiaConfig(num_queries=4, num_distractors=30)
    bundle = create_model(ModelConfig())
    targets = IdiaTargets.from_frame(small_manifest.frame, config=config, preprocess=bundle.preprocess)
    members = small_manifest.rows("query")["patient_id"].nunique()
    nonmembers = small_manifest.rows("heldout")["patient_id"].nunique()
    assert int(targets.is_member.sum()) == members and int((~targets.is_member).sum()) == nonmembers
    assert targets.images.shape[:2] == (members + nonmembers, 4)
    assert len(targets.candidates) == members + nonmembers + 30 == len(set(targets.candidates))
    assert all(targets.candidates[i] for i in targets.truth)
    train_paths = set(small_manifest.rows("train")["filepath"])
    assert train_paths.isdisjoint(small_manifest.rows("query")["filepath"])
    torch.manual_seed(0)
    decisions = IdentityInferenceAttack(targets, tokenizer=bundle.tokenizer, config=config)(bundle.model)
    assert len(decisions.frame) == members + nonmembers
    assert set(decisions.frame.loc[decisions.frame["is_member"], "site"]) == {"hospital_0", "hospital_1", "hospital_2"}
    assert decisions.frame["correct_templates"].between(0, len(config.templates)).all()


def test_too_few_query_images_is_named(small_manifest):
    bundle = create_model(ModelConfig())
    with pytest.raises(ValueError, match="num_queries: patient .* has 4 query images, fewer than num_queries=9"):
        IdiaTargets.from_frame(small_manifest.frame, config=IdiaConfig(num_queries=9), preprocess=bundle.preprocess)


def test_distractors_come_from_the_name_lists_the_data_uses(small_manifest):
    from fedclip.data.names import first_and_surnames

    CENSUS_FIRST_NAMES, CENSUS_SURNAMES = first_and_surnames("census")

    config = IdiaConfig(num_queries=4, num_distractors=40, name_lists="census")
    targets = IdiaTargets.from_frame(
        small_manifest.frame, config=config, preprocess=create_model(ModelConfig()).preprocess
    )
    distractors = targets.candidates[-40:]
    assert all(d.split(" ")[0] in CENSUS_FIRST_NAMES and d.split(" ")[1] in CENSUS_SURNAMES for d in distractors)
    with pytest.raises(ValueError, match="idia name_lists"):
        IdiaConfig(name_lists="klingon")
