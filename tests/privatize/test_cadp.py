"""CADP end to end: per-image privatization, the label's release, and the ``fedclip privatize`` command."""

import json
import math
import subprocess
import sys

import pandas as pd
import pytest
import torch

from fedclip.data.manifest import load_manifest
from fedclip.privatize.cadp import CadpConfig, privatize_images, randomized_response
from fedclip.privatize.dataset import PRIVATIZATION_FILE, images_per_unit
from fedclip.privatize.inn import ConditionalInn, InnConfig
from fedclip.privatize.latent import latent_epsilon

INN = InnConfig(image_size=8, blocks_per_scale=1, width=8, dense_blocks=1, dense_width=16)


def test_one_image_changed_changes_only_its_own_privatized_image():
    inn = ConditionalInn(INN)
    with torch.no_grad():  # a non-trivial network: perturb the zero-initialised last layers
        for p in (p for p in inn.parameters() if p.is_floating_point()):
            p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    images, labels = torch.rand(5, 3, 8, 8, generator=torch.Generator().manual_seed(0)), torch.tensor([0, 1, 2, 3, 4])
    changed = images.clone()
    changed[2] = 1 - changed[2]
    config = CadpConfig(target_epsilon=4.0)
    noise = config.noise_for(1)
    a, _ = privatize_images(inn, images, labels, config=config, noise=noise, generator=torch.Generator().manual_seed(3))
    b, _ = privatize_images(
        inn, changed, labels, config=config, noise=noise, generator=torch.Generator().manual_seed(3)
    )
    assert ((a - b).flatten(1).abs().max(dim=1).values > 0).tolist() == [False, False, True, False, False]
    assert a.min() >= 0 and a.max() <= 1


def test_no_label_is_released_unless_asked_and_randomized_response_keeps_at_its_rate():
    inn = ConditionalInn(INN)
    labels = torch.randint(0, 5, (40,), generator=torch.Generator().manual_seed(1))
    _, released = privatize_images(
        inn,
        torch.rand(40, 3, 8, 8),
        labels,
        config=CadpConfig(target_epsilon=4.0),
        noise=CadpConfig(target_epsilon=4.0).noise_for(1),
        generator=torch.Generator(),
    )
    assert (released == inn.unknown).all()
    many = torch.randint(0, 5, (40000,), generator=torch.Generator().manual_seed(2))
    out = randomized_response(many, classes=5, epsilon=1.0, generator=torch.Generator().manual_seed(3))
    keep = math.e / (math.e + 4)
    assert (out == many).float().mean().item() == pytest.approx(keep, abs=0.01)
    flipped = out[out != many]
    assert flipped.min() >= 0 and flipped.max() <= 4  # never the unknown label


def test_the_units_epsilon_splits_between_images_and_labels_and_never_exceeds_the_target():
    config = CadpConfig(target_epsilon=6.0, label="rr", label_epsilon=0.2)
    noise = config.noise_for(10)
    assert latent_epsilon(noise, images=10, delta=1e-5) <= 6.0 - 10 * 0.2
    assert config.unit_epsilon(noise, 10) == pytest.approx(6.0, rel=1e-3) and config.unit_epsilon(noise, 10) <= 6.0
    assert noise.radius == pytest.approx(1 / noise.noise_multiplier)  # radius 0: decode near the prior
    with pytest.raises(ValueError, match="leaves nothing"):
        CadpConfig(target_epsilon=1.0, label="rr", label_epsilon=0.2).noise_for(10)
    with pytest.raises(ValueError, match="only with label = 'rr'"):
        CadpConfig(target_epsilon=1.0, label_epsilon=0.2)
    with pytest.raises(ValueError, match="cadp epsilon"):
        CadpConfig(target_epsilon=float("inf"))


def test_the_privatize_command_releases_training_images_only_and_states_its_guarantee(small_manifest_path, tmp_path):
    out = tmp_path / "private"
    cmd = [
        sys.executable,
        "-m",
        "fedclip.cli",
        "privatize",
        "--manifest",
        str(small_manifest_path),
        "--out",
        str(out),
        "--epsilon",
        "8",
        "--inn-epochs",
        "1",
        "--image-size",
        "32",
    ]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads((out / PRIVATIZATION_FILE).read_text())
    original = load_manifest(small_manifest_path).frame
    train = original[original["split"] == "train"]
    assert report["images"] == len(train) and report["images_per_unit"] == images_per_unit(train, "identity") == 6
    assert report["epsilon"] <= 8.0 and "Not covered: the reports" in report["statement"]
    assert report["reproducible_seed"] is None  # OS randomness
    private = load_manifest(out / "manifest.csv").frame
    assert len(private) == len(original) and list(private["title"]) == list(original["title"])
    for split in ("public", "query", "heldout"):  # untouched copies
        a = original[original["split"] == split]["filepath"].iloc[0]
        b = private[private["split"] == split]["filepath"].iloc[0]
        assert open(a, "rb").read() == open(b, "rb").read()
    a, b = train["filepath"].iloc[0], private[private["split"] == "train"]["filepath"].iloc[0]
    assert open(a, "rb").read() != open(b, "rb").read()
    assert (out / "privatization.png").is_file() and (out / "inn.pt").is_file()
    again = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert again.returncode == 2 and "would spend again" in again.stderr
    assert isinstance(pd.read_csv(out / "manifest.csv"), pd.DataFrame)
