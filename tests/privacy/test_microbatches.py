import numpy as np
import pytest

from fedclip.privacy.microbatches import block_of, group_records, unit_ids


def test_an_identity_never_spans_two_microbatches(small_manifest):
    frame = small_manifest.rows("train")
    units = unit_ids(privacy_unit="identity", patient_ids=frame["patient_id"], record_ids=frame["filepath"])
    groups = group_records(units, num_blocks=5, key="k")
    owner = {}
    for b, records in enumerate(groups):
        for r in records:
            assert owner.setdefault(units[r], b) == b
    assert sorted(np.concatenate(groups).tolist()) == list(range(len(frame)))


def test_assignment_is_stable_across_rounds_and_neighbouring_datasets():
    units = [f"patient-{i}" for i in range(200)]
    a = block_of(units, num_blocks=7, key="site-key")
    assert np.array_equal(a, block_of(units, num_blocks=7, key="site-key"))
    # removing one unit leaves every other unit where it was
    assert np.array_equal(np.delete(a, 17), block_of(units[:17] + units[18:], num_blocks=7, key="site-key"))
    assert not np.array_equal(a, block_of(units, num_blocks=7, key="other-key"))
    counts = np.bincount(a, minlength=7)
    assert counts.min() > 10  # roughly balanced: 200 / 7 ~ 29 each


def test_record_units_are_records():
    assert unit_ids(privacy_unit="record", patient_ids=["p", "p"], record_ids=["a", "b"]) == ["a", "b"]
    with pytest.raises(ValueError, match="num_blocks"):
        block_of(["a"], num_blocks=0, key="k")
