"""MaskDP: only the masked region changes, per image, with the noise the accounting assumes; the
generator's masks, the manifest's mask column and the ``fedclip privatize`` methods that use them."""

import json
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from fedclip.data.manifest import ManifestError, load_manifest
from fedclip.data.synthetic import SyntheticConfig, generate
from fedclip.privatize.latent import LatentNoise
from fedclip.privatize.maskdp import NEUTRAL, MaskDpConfig, load_masks, noise_masked, replace_masked

MASKED = SyntheticConfig(
    seed=2,
    num_sites=2,
    patients_per_site=4,
    public_patients=6,
    heldout_patients=3,
    images_per_patient=3,
    query_images_per_patient=2,
    identity_region=0.5,
)


@pytest.fixture(scope="module")
def masked_manifest(tmp_path_factory):
    return generate(tmp_path_factory.mktemp("masked"), MASKED)


def _batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    images = torch.rand(4, 3, 16, 16, generator=g)
    masks = torch.zeros(4, 16, 16, dtype=torch.bool)
    masks[:, 4:10, 2:8] = True
    masks[2, 0:3, 0:3] = True  # masks differ per image
    return images, masks


def test_pixels_outside_the_mask_are_untouched_by_noise_and_by_replacement():
    images, masks = _batch()
    noise = LatentNoise(mechanism="gaussian", radius=1.0, noise_multiplier=0.5)
    for out in (
        noise_masked(images, masks, noise=noise, generator=torch.Generator().manual_seed(1)),
        replace_masked(images, masks, stand_ins=torch.zeros(2, 3, 16, 16), generator=torch.Generator()),
    ):
        outside = ~masks[:, None].expand_as(images)
        assert torch.equal(out[outside], images[outside])
        assert not torch.equal(out[~outside], images[~outside])
    replaced = replace_masked(images, masks, stand_ins=torch.zeros(2, 3, 16, 16), generator=torch.Generator())
    assert (replaced[masks[:, None].expand_as(images)] == 0).all()  # nothing of the original inside


def test_one_image_changed_inside_its_mask_changes_only_its_output():
    images, masks = _batch()
    changed = images.clone()
    changed[1, :, 5, 5] = 1 - changed[1, :, 5, 5]
    noise = LatentNoise(mechanism="laplace", radius=2.0, noise_multiplier=0.3)
    a = noise_masked(images, masks, noise=noise, generator=torch.Generator().manual_seed(4))
    b = noise_masked(changed, masks, noise=noise, generator=torch.Generator().manual_seed(4))
    assert ((a != b).flatten(1).any(dim=1)).tolist() == [False, True, False, False]


def test_the_masked_noise_has_the_std_the_accounting_assumes():
    images = torch.full((200, 3, 16, 16), NEUTRAL)  # centred masked vector 0: nothing clipped
    masks = torch.zeros(200, 16, 16, dtype=torch.bool)
    masks[:, :8] = True
    noise = LatentNoise(mechanism="gaussian", radius=0.5, noise_multiplier=0.1)  # std 0.05: no clamping at 0 or 1
    out = noise_masked(images, masks, noise=noise, generator=torch.Generator().manual_seed(0))
    assert (out[masks[:, None].expand_as(out)] - NEUTRAL).std().item() == pytest.approx(0.05, rel=0.02)


def test_the_generator_emits_a_mask_per_image_that_covers_the_identity_patch(masked_manifest):
    frame = load_manifest(masked_manifest).frame
    assert (frame["mask"] != "").all()
    masks = load_masks(frame, size=32)
    assert masks.float().mean(dim=(1, 2)).tolist() == pytest.approx([0.25] * len(frame))  # a 16 x 16 patch
    # outside its patch an image carries no identity: the background is neutral grey plus noise and findings
    first = frame.iloc[0]
    pixels = np.asarray(Image.open(first["filepath"]).convert("RGB"), dtype=np.float32) / 255
    outside = ~masks[0].numpy()
    assert abs(np.median(pixels[outside]) - NEUTRAL) < 0.1


def test_a_row_without_a_mask_and_a_mask_outside_the_folder_are_named(masked_manifest, tmp_path):
    frame = pd.read_csv(masked_manifest, dtype=str, keep_default_na=False)
    frame.loc[frame["split"] == "train", "mask"] = ""
    with pytest.raises(ValueError, match="manifest line"):
        load_masks(load_manifest(masked_manifest).frame.assign(mask=""), size=32)
    frame.loc[0, "mask"] = "/etc/passwd"
    bad = masked_manifest.parent / "bad.csv"
    frame.to_csv(bad, index=False)
    with pytest.raises(ManifestError, match="line 2, column 'mask'"):
        load_manifest(bad)
    with pytest.raises(ValueError, match="claims no epsilon"):
        MaskDpConfig(method="replace", target_epsilon=1.0)


@pytest.mark.parametrize("method", ["maskdp", "mask-replace"])
def test_the_privatize_command_applies_maskdp_and_states_what_it_covers(masked_manifest, tmp_path, method):
    out = tmp_path / method
    args = ["--epsilon", "4"] if method == "maskdp" else []
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "fedclip.cli",
            "privatize",
            "--method",
            method,
            "--manifest",
            str(masked_manifest),
            "--out",
            str(out),
            *args,
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads((out / "privatization.json").read_text())
    if method == "maskdp":
        assert report["epsilon"] <= 4.0 and "the mask itself" in report["statement"]
    else:
        assert report["epsilon"] is None and "anonymization" in report["statement"]
    original, private = load_manifest(masked_manifest).frame, load_manifest(out / "manifest.csv").frame
    train = original["split"] == "train"
    for a, b, m in zip(original.loc[train, "filepath"], private.loc[train, "filepath"], private.loc[train, "mask"]):
        x, y = (np.asarray(Image.open(p).convert("RGB")) for p in (a, b))
        keep = np.asarray(Image.open(m).convert("L")) <= 127
        assert np.array_equal(x[keep], y[keep]) and not np.array_equal(x, y)
    assert (out / "privatization.png").is_file()
