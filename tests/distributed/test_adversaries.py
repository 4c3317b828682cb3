import pytest

from fedclip.distributed.adversaries import adversary_variances, check_colluders, planned_share


def test_the_server_faces_every_share_in_the_sum_colluders_remove_the_largest_others():
    shares = {"a": 1.0, "b": 2.0, "c": 3.0, "d": 4.0}
    got = adversary_variances(shares, colluders=2)
    assert got["server"] == 10.0
    # a patient at a: the two largest others (d, c) collude -> 1 + 2
    assert got["colluding"] == 3.0
    assert got["own-share"] == 1.0
    assert adversary_variances(shares, colluders=0)["colluding"] == 10.0
    assert adversary_variances(shares, colluders=3)["colluding"] == 1.0  # only the site's own share is left


def test_a_planned_share_meets_the_target_at_the_threshold_and_more_survivors_add_noise():
    share = planned_share(12.0, min_survivors=3)
    assert adversary_variances({s: share for s in "abc"}, colluders=0)["server"] == pytest.approx(12.0)
    assert adversary_variances({s: share for s in "abcde"}, colluders=0)["server"] > 12.0


def test_bad_inputs_are_refused_by_name():
    with pytest.raises(ValueError, match="shares"):
        adversary_variances({}, colluders=0)
    with pytest.raises(ValueError, match="colluders"):
        adversary_variances({"a": 1.0}, colluders=-1)
    with pytest.raises(ValueError, match="secure-agg-colluders"):
        check_colluders(3, threshold=3)
    check_colluders(2, threshold=3)
    with pytest.raises(ValueError, match="min_survivors"):
        planned_share(1.0, min_survivors=0)
