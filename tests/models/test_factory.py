import pytest
import torch

from fedclip.models.factory import TINY_ARCH, ModelConfig, create_model, save_checkpoint
from fedclip.models.trainable import TrainableSpec, apply_trainable


def test_tiny_arch_is_small_and_encodes_the_data(small_manifest):
    bundle = create_model(ModelConfig())
    n = sum(p.numel() for p in bundle.model.parameters())
    assert 3_000_000 < n < 4_000_000
    tokens = bundle.tokenizer(["Chest X-ray of Mary Smith: pneumonia."])
    assert tokens.shape == (1, 32)
    image_f, text_f, scale = bundle.model(torch.zeros(1, 3, 32, 32), tokens)
    assert image_f.shape == text_f.shape == (1, 64)


def test_local_checkpoint_round_trip(tmp_path):
    torch.manual_seed(0)
    original = create_model(ModelConfig()).model
    path = save_checkpoint(original, tmp_path / "ckpt.pt")
    torch.manual_seed(1)
    loaded = create_model(ModelConfig(pretrained=str(path))).model
    fresh = create_model(ModelConfig()).model
    for (name, a), b, c in zip(
        original.state_dict().items(), loaded.state_dict().values(), fresh.state_dict().values()
    ):
        assert torch.equal(a, b), name
    assert not all(torch.equal(a, c) for a, c in zip(original.state_dict().values(), fresh.state_dict().values()))


def test_bad_model_config_names_the_field(tmp_path):
    with pytest.raises(ValueError, match="arch: unknown"):
        ModelConfig(arch="ViT-Nope")
    with pytest.raises(ValueError, match="pretrained: 'no-such-tag'"):
        ModelConfig(pretrained="no-such-tag")
    with pytest.raises(ValueError, match="trainable"):
        ModelConfig(trainable="last-0")


def test_corrupt_checkpoint_fails_with_the_field_named(tmp_path):
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"garbage")
    with pytest.raises(Exception, match="pretrained|bad.pt"):
        create_model(ModelConfig(pretrained=str(bad)))


@pytest.mark.parametrize(
    ("spec", "expected_prefixes"),
    [
        ("projections", {"visual.proj", "text_projection", "logit_scale"}),
        (
            "last-1",
            {
                "visual.proj",
                "text_projection",
                "logit_scale",
                "visual.transformer.resblocks.1",
                "transformer.resblocks.1",
                "visual.ln_post",
                "ln_final",
            },
        ),
    ],
)
def test_trainable_selection(spec, expected_prefixes):
    model = create_model(ModelConfig(trainable=spec)).model
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(any(n.startswith(p) for p in expected_prefixes) for n in trainable)
    assert {p for p in expected_prefixes if any(n.startswith(p) for n in trainable)} == expected_prefixes
    frozen = [n for n, p in model.named_parameters() if not p.requires_grad]
    assert "token_embedding.weight" in frozen and "visual.conv1.weight" in frozen


def test_all_trains_everything_and_last_k_bounds_are_checked():
    model = create_model(ModelConfig()).model
    assert all(p.requires_grad for p in model.parameters())
    with pytest.raises(ValueError, match="last-3 but the vision tower has 2 blocks"):
        apply_trainable(model, TrainableSpec.parse("last-3"))


def test_real_open_clip_architecture_builds_with_last_k():
    model = create_model(ModelConfig(arch="ViT-B-32", trainable="last-2")).model
    trainable = {n.split(".")[0] for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"visual", "transformer", "text_projection", "logit_scale", "ln_final"}
    assert TINY_ARCH != "ViT-B-32"
