"""Dirac gradient canaries: drawn from the auditor's secret, inserted as units, scored by the model's move."""

import copy

import numpy as np
import pytest
import torch

from fedclip.attacks.gradient_canaries import (
    GradientCanaryAudit,
    canaries_from_wire,
    canaries_to_wire,
    canary_rows,
    coordinate_values,
    draw_dirac_canaries,
)
from fedclip.data.manifest import load_manifest
from fedclip.data.tensors import load_pairs
from fedclip.models.factory import ModelConfig, create_model
from fedclip.training.config import DpConfig, TrainConfig
from fedclip.training.local import train_local

SECRET = bytes(range(32))


@pytest.fixture(scope="module")
def bundle(warm_checkpoint):
    return create_model(ModelConfig(pretrained=str(warm_checkpoint), trainable="last-1"))


def test_canaries_are_distinct_trainable_coordinates_with_a_coin_each(bundle):
    canaries = draw_dirac_canaries(bundle.model, per_site=200, sites=("a", "b"), secret=SECRET)
    coords = [c for site in canaries.values() for c in site.coordinates]
    assert len(coords) == len(set(coords)) == 400
    trainable = {n: p for n, p in bundle.model.named_parameters() if p.requires_grad}
    assert all(name in trainable and 0 <= i < trainable[name].numel() for name, i in coords)
    inclusion = np.concatenate([site.included for site in canaries.values()])
    assert 0.4 < inclusion.mean() < 0.6
    again = draw_dirac_canaries(bundle.model, per_site=200, sites=("a", "b"), secret=SECRET)
    assert again == canaries  # the auditor re-derives them from the secret
    assert canaries_from_wire(canaries_to_wire(canaries), "b") == canaries["b"]
    assert canaries_from_wire(canaries_to_wire(canaries), "c") is None and canaries_from_wire("", "a") is None
    with pytest.raises(ValueError, match="16 bytes"):
        draw_dirac_canaries(bundle.model, per_site=2, sites=("a",), secret=b"x")


def test_a_canary_row_has_the_clipping_norm_at_its_coordinate_only(bundle):
    canaries = draw_dirac_canaries(bundle.model, per_site=3, sites=("a",), secret=SECRET)["a"]
    rows = canary_rows(bundle.model, list(canaries.coordinates), norm=1.5)
    norms = torch.sqrt(sum(r.reshape(3, -1).pow(2).sum(dim=1) for r in rows.values()))
    assert torch.allclose(norms, torch.full((3,), 1.5))
    for r, (name, index) in enumerate(canaries.coordinates):
        assert float(rows[name][r].reshape(-1)[index]) == 1.5


@pytest.mark.parametrize("mode", ["nonprivate", "microbatch"])
def test_included_canaries_move_down_and_the_audit_sees_it(bundle, small_manifest_path, mode):
    frame = load_manifest(small_manifest_path).frame
    rows = frame[(frame["split"] == "train") & (frame["site"] == "hospital_0")]
    data = load_pairs(rows, preprocess=bundle.preprocess, tokenizer=bundle.tokenizer)
    canaries = draw_dirac_canaries(bundle.model, per_site=64, sites=("hospital_0",), secret=SECRET)
    audit = GradientCanaryAudit(canaries, reference=bundle.model)
    assert np.allclose(audit(bundle.model).frame["score"], 0)
    model = copy.deepcopy(bundle.model)
    dp = DpConfig(
        mode=mode,
        privacy_unit="identity",
        noise_multiplier=0.05 if mode != "nonprivate" else 0.0,
        max_grad_norm=1.0,
        sample_rate=0.5,
        microbatch_size=1,
        declared_units=8,
        delta=1e-5,
    )
    train_local(
        model, data, dp=dp, train=TrainConfig(steps=20, lr=0.01, optimizer="sgd"), canaries=canaries["hospital_0"]
    )
    frame = audit(model).frame
    assert frame["score"][frame["is_member"]].mean() > frame["score"][~frame["is_member"]].mean()
    members, others = frame["score"][frame["is_member"]], frame["score"][~frame["is_member"]]
    assert members.min() > others.max()  # with almost no noise, separated
    untouched = [c for c, inc in zip(canaries["hospital_0"].coordinates, canaries["hospital_0"].included) if not inc]
    assert (
        np.abs(coordinate_values(model, tuple(untouched)) - coordinate_values(bundle.model, tuple(untouched))).max()
        < members.min()
    )


def test_the_servers_view_scores_each_sites_canaries_on_its_own_replies(bundle):
    from flwr.app import ArrayRecord

    from fedclip.attacks.gradient_canaries import GradientCanaryReplies
    from fedclip.models.arrays import model_to_arrays

    canaries = draw_dirac_canaries(bundle.model, per_site=40, sites=("a", "b"), secret=SECRET)
    view = GradientCanaryReplies(canaries)
    assert view.decisions(1) is None  # nothing seen yet
    start = model_to_arrays(bundle.model, trainable_only=True).to_torch_state_dict()
    expected = np.zeros(80)
    for round_ in (1, 2):
        view.sent(round_, ArrayRecord(torch_state_dict=start))
        for s, site in enumerate(("a", "b")):
            reply = {n: t.clone() for n, t in start.items()}
            for k, (name, index) in enumerate(canaries[site].coordinates):
                reply[name].view(-1)[index] -= 0.5 * (k + 1) * (s + 1)  # moved down by a known amount
                expected[40 * s + k] += 0.5 * (k + 1) * (s + 1)
            view.observe(round_, site, ArrayRecord(torch_state_dict=reply))
    frame = view.decisions(2).frame
    np.testing.assert_allclose(frame["score"].to_numpy(), expected, rtol=1e-5)
    assert list(frame["is_member"]) == [*canaries["a"].included, *canaries["b"].included]
    with pytest.raises(ValueError, match="round 3 from a"):
        view.observe(3, "a", ArrayRecord(torch_state_dict=start))  # round 3 was never sent
