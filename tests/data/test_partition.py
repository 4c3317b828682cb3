import pytest

from fedclip.data.partition import assign_sites_by_patient, members, partition_by_site


def test_partition_by_site_keeps_every_member_row(small_manifest):
    parts = partition_by_site(small_manifest.frame)
    assert sorted(parts) == ["hospital_0", "hospital_1", "hospital_2"]
    assert sum(len(p) for p in parts.values()) == len(members(small_manifest.frame))
    assert all(set(p["split"]) == {"train", "query"} for p in parts.values())


@pytest.mark.parametrize("num_sites", [1, 2, 5])
def test_split_by_patient_never_splits_a_patient(small_manifest, num_sites):
    frame = assign_sites_by_patient(small_manifest.frame, num_sites=num_sites, seed=3)
    parts = partition_by_site(frame)
    assert len(parts) == num_sites
    owners = {}
    for site, part in parts.items():
        for pid in part["patient_id"].unique():
            assert owners.setdefault(pid, site) == site
    assert sum(len(p) for p in parts.values()) == len(members(small_manifest.frame))
    sizes = [p["patient_id"].nunique() for p in parts.values()]
    assert max(sizes) - min(sizes) <= 1


def test_split_by_patient_is_seeded(small_manifest):
    a = assign_sites_by_patient(small_manifest.frame, num_sites=3, seed=1)["site"].tolist()
    b = assign_sites_by_patient(small_manifest.frame, num_sites=3, seed=1)["site"].tolist()
    c = assign_sites_by_patient(small_manifest.frame, num_sites=3, seed=2)["site"].tolist()
    assert a == b and a != c


def test_too_many_sites_and_missing_sites_are_refused(small_manifest):
    with pytest.raises(ValueError, match="num_sites"):
        assign_sites_by_patient(small_manifest.frame, num_sites=1000, seed=0)
    frame = small_manifest.frame.copy()
    frame.loc[frame["split"] == "train", "site"] = ""
    with pytest.raises(ValueError, match="site: .* member row"):
        partition_by_site(frame)
