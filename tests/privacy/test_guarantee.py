"""What each mode's epsilon is about: the data sets it cannot tell apart, and what it covers."""

import pytest

from fedclip.privacy.guarantee import SITE_LEVEL, guarantee_of


def test_one_term_per_unit_is_add_or_remove_and_covers_the_pairs():
    for mode in ("microbatch", "unit", "paper"):
        g = guarantee_of(mode=mode, privacy_unit="identity", microbatch_size=1)
        assert g.neighbours == "add or remove one patient (one clipped term added or removed: add-or-remove accounting)"
        assert g.membership and "image-report pairs" in g.covers


def test_shared_micro_batches_say_their_accounting_is_replace_one():
    g = guarantee_of(mode="microbatch", privacy_unit="identity", microbatch_size=5)
    assert g.neighbours.startswith("add or remove one patient") and "replace-one accounting" in g.neighbours


def test_record_level_says_a_patient_is_covered_by_group_privacy_only():
    g = guarantee_of(mode="microbatch", privacy_unit="record")
    assert "one image-report pair" in g.neighbours and "group privacy" in g.neighbours


@pytest.mark.parametrize("mode", ["cadp", "maskdp"])
def test_input_level_is_replace_one_over_images_and_not_about_membership(mode):
    g = guarantee_of(mode=mode, privacy_unit="identity")
    assert g.neighbours.startswith("replace one patient's images") and not g.membership
    assert "not the reports, the number of images, or membership" in g.covers


def test_no_epsilon_no_guarantee_and_unknown_modes_are_named():
    assert guarantee_of(mode="nonprivate", privacy_unit="identity").covers == "nothing"
    assert not guarantee_of(mode="mask-replace", privacy_unit="identity").membership
    assert "zero out one site's clipped update" in SITE_LEVEL.neighbours
    with pytest.raises(ValueError, match="dp-mode: no guarantee is defined for 'fast'"):
        guarantee_of(mode="fast", privacy_unit="identity")
