"""The server's validation patients: apart from the test set, by patient, refused if none is left."""

import pandas as pd
import pytest

from simulations.hospital_clip.server_app import split_validation


def test_validation_and_test_share_no_patient_and_cover_the_held_out_rows():
    heldout = pd.DataFrame({"patient_id": [f"p{i % 7}" for i in range(28)], "image": range(28)})
    validation, test = split_validation(heldout, patients=3)
    assert set(validation["patient_id"]) == {"p0", "p1", "p2"}
    assert not set(validation["patient_id"]) & set(test["patient_id"])
    assert len(validation) + len(test) == len(heldout) and len(validation) == 12
    none, everything = split_validation(heldout, patients=0)
    assert none.empty and len(everything) == len(heldout)
    with pytest.raises(ValueError, match="validation-patients: 7 of the data's 7 held-out patients"):
        split_validation(heldout, patients=7)
