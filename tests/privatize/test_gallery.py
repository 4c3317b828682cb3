"""``fedclip gallery``: a picture of every input-level mechanism, from public images only."""

import subprocess
import sys

import pandas as pd
import pytest
from PIL import Image

from fedclip.data.synthetic import SyntheticConfig, generate
from fedclip.privatize.gallery import render_gallery
from fedclip.privatize.inn import ConditionalInn, InnConfig


@pytest.fixture(scope="module")
def masked(tmp_path_factory):
    return generate(
        tmp_path_factory.mktemp("gallery"),
        SyntheticConfig(
            seed=4,
            num_sites=1,
            patients_per_site=3,
            public_patients=12,
            heldout_patients=2,
            images_per_patient=2,
            query_images_per_patient=1,
            identity_region=0.5,
        ),
    )


def test_the_gallery_command_draws_every_mechanism_on_public_images(masked, tmp_path):
    out = tmp_path / "gallery.png"
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "fedclip.cli",
            "gallery",
            "--manifest",
            str(masked),
            "--out",
            str(out),
            "--inn-epochs",
            "1",
            "--epsilon",
            "4",
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    width, height = Image.open(out).size
    assert width > 800 and height > 600  # five rows: original, mask, CADP, MaskDP, mask-replace


def test_the_gallery_refuses_data_without_public_rows(masked, tmp_path):
    frame = pd.read_csv(masked, dtype=str, keep_default_na=False)
    private_only = masked.parent / "private_only.csv"
    frame[frame["split"] != "public"].to_csv(private_only, index=False)
    inn = ConditionalInn(InnConfig(blocks_per_scale=1, width=8, dense_blocks=0))
    with pytest.raises(ValueError, match="public images only"):
        render_gallery(private_only, tmp_path / "g.png", inn=inn, epsilon=4.0, images_per_unit=2)
