"""The attacker's reference scores survive a resume: read back only under the same recipe and targets."""

import numpy as np

from fedclip.attacks.likelihood_ratio import _Reference, _ReferenceScored
from fedclip.attacks.reference_cache import recipe_key, restore, save


class _Scored(_ReferenceScored):
    """The reference-keeping part of a likelihood-ratio attack, without a model to score."""

    def __init__(self, base):
        self.reference = _Reference(np.asarray(base, dtype=np.float32))


def _views(seed=0):
    rng = np.random.default_rng(seed)
    return {
        "global": [_Scored(rng.normal(size=5))],
        "reply": [_Scored(rng.normal(size=5)), _Scored(rng.normal(size=3))],
    }


def _train(views, count=2):
    rng = np.random.default_rng(7)
    for attacks in views.values():
        for attack in attacks:
            for _ in range(count):
                attack.reference.add(rng.normal(size=attack.reference.base.shape).astype(np.float32))


def test_saved_scores_come_back_and_score_as_before(tmp_path):
    first = _views()
    _train(first)
    key = recipe_key(count=2, rounds=3, dp={"sigma": 1.2}, seed=0)
    save(tmp_path / "refs.npz", first, key=key)
    again = _views()
    assert restore(tmp_path / "refs.npz", again, key=key) == ""
    observed = np.linspace(-1, 1, 5, dtype=np.float32)
    for view in first:
        for old, new in zip(first[view], again[view]):
            assert len(new.reference.out) == 2
            size = old.reference.base.shape[0]
            np.testing.assert_array_equal(old.reference.score(observed[:size]), new.reference.score(observed[:size]))


def test_another_recipe_other_targets_or_a_broken_file_train_again(tmp_path):
    path = tmp_path / "refs.npz"
    first = _views()
    _train(first)
    key = recipe_key(count=2, rounds=3, seed=0)
    save(path, first, key=key)

    again = _views()
    assert "another recipe" in restore(path, again, key=recipe_key(count=2, rounds=4, seed=0))
    assert "base model changed" in restore(path, _views(seed=1), key=key)  # other targets' base scores
    fewer = {"global": again["global"]}
    assert "another set of attacks" in restore(path, fewer, key=key)
    assert all(not a.reference.out for attacks in again.values() for a in attacks)  # nothing half-restored

    assert restore(tmp_path / "missing.npz", again, key=key) == "none saved"
    path.write_bytes(b"not an npz")
    assert "unreadable" in restore(path, again, key=key)


def test_the_recipe_key_is_stable_and_sees_every_field():
    assert recipe_key(a=1, b=[1, 2]) == recipe_key(b=[1, 2], a=1)
    assert recipe_key(a=1, b=[1, 2]) != recipe_key(a=1, b=[1, 3])
