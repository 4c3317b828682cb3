import copy

import pytest
import torch

from fedclip.models.attention import split_attention
from fedclip.models.factory import ModelConfig, create_model, save_checkpoint
from fedclip.models.lora import _PATTERNS, add_lora
from fedclip.models.trainable import LORA_TARGETS, TrainableSpec


def lora_trained_a_little(model: torch.nn.Module) -> torch.nn.Module:
    """LoRA's B starts at zero, so A's gradient is zero at the start: give B (and every adapter) a
    random value, as after some training, so that both factors' gradients are tested. A no-op for a
    model without adapters."""
    with torch.no_grad():
        for name, param in model.named_parameters():
            if ".lora_B." in name:
                param.normal_(std=0.5)
    return model


def assert_same_function(model: torch.nn.Module, reference: torch.nn.Module) -> None:
    """Both models embed the same images and captions alike (a model with adapters against its base)."""
    torch.manual_seed(5)
    images, tokens = torch.randn(2, 3, 32, 32), torch.randint(1, 400, (2, reference.context_length))
    model.eval(), reference.eval()
    with torch.no_grad():
        for mine, theirs in zip(model(images, tokens)[:2], reference(images, tokens)[:2]):
            torch.testing.assert_close(mine, theirs, rtol=1e-4, atol=1e-5)


def test_every_target_name_has_a_pattern():
    assert set(_PATTERNS) == set(LORA_TARGETS)


def test_split_attention_gives_the_same_outputs():
    torch.manual_seed(0)
    mha = torch.nn.MultiheadAttention(16, 4, batch_first=True)
    x = torch.randn(3, 5, 16)
    mask = torch.full((5, 5), float("-inf")).triu(1)
    torch.testing.assert_close(split_attention(mha)(x, x, x, attn_mask=mask)[0], mha(x, x, x, attn_mask=mask)[0])


@pytest.mark.parametrize("trainable", ["lora-4", "lora-2-attn", "lora-2-mlp"])
def test_lora_starts_from_the_base_model_and_trains_only_adapters(trainable):
    """B = 0: the model with adapters computes what the base computes (attention split into q/k/v
    layers included); only adapters are trainable, rank R on every target of both towers
    (fedclip-tiny: 2 blocks a tower)."""
    torch.manual_seed(0)
    base = create_model(ModelConfig(trainable="all")).model.eval()
    lora = copy.deepcopy(base)
    spec = TrainableSpec.parse(trainable)
    names = add_lora(lora, spec)
    assert_same_function(lora, base)
    trained = {n: p for n, p in lora.named_parameters() if p.requires_grad}
    per_block = {"attn": 4, "mlp": 2}
    expected = sum(per_block[t] for t in spec.lora_targets) * 2 * 2 * 2  # layers x blocks x towers x (A, B)
    assert sorted(trained) == sorted(names) and len(trained) == expected
    assert all(".lora_A." in n or ".lora_B." in n for n in trained)
    assert all(min(p.shape) == spec.lora_rank for p in trained.values())
    assert all(not p.any() for n, p in trained.items() if ".lora_B." in n)


@pytest.mark.parametrize(
    ("trainable", "message"),
    [
        ("lora-0", "rank must be >= 1"),
        ("lora-4-ffn", "names LoRA target 'ffn'"),
        ("lora", "expected 'all'"),
        ("biases", "expected 'all'"),
    ],
)
def test_bad_lora_settings_are_named(trainable, message):
    with pytest.raises(ValueError, match=message):
        ModelConfig(trainable=trainable)


def test_lora_on_an_architecture_without_the_targets_is_refused_before_building():
    with pytest.raises(ValueError, match="RN50.*ResNet"):
        ModelConfig(arch="RN50", trainable="lora-8")


def test_bias_trains_every_bias_and_nothing_else():
    model = create_model(ModelConfig(trainable="bias")).model
    trained = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trained and all(n.endswith("bias") for n in trained)
    assert any(n.endswith("attn.in_proj_bias") for n in trained) and any(n.endswith("ln_final.bias") for n in trained)
    frozen_biases = [n for n, p in model.named_parameters() if n.endswith(".bias") and not p.requires_grad]
    assert frozen_biases == []


@pytest.mark.parametrize("trainable", ["all", "projections", "last-1", "bias", "lora-4", "lora-2-attn"])
def test_a_checkpoint_file_is_the_base_of_every_trainable_set(tmp_path, trainable):
    """A user's open_clip checkpoint (``pretrained = "/path/file.pt"``): every weight of the file is
    the model's, under whatever name adapters give it, and the model computes what the file's does."""
    torch.manual_seed(7)
    weights = create_model(ModelConfig()).model
    path = save_checkpoint(weights, tmp_path / "user.pt")
    torch.manual_seed(8)
    model = create_model(ModelConfig(pretrained=str(path), trainable=trainable)).model
    assert_same_function(model, weights)
    if not trainable.startswith("lora"):
        mine = model.state_dict()
        assert all(torch.equal(mine[n], t) for n, t in weights.state_dict().items())


@pytest.mark.parametrize("layout", ["bare.pt", "weights.safetensors"])
def test_checkpoints_as_released_load_under_lora_too(tmp_path, layout):
    """Released open_clip weights are often a bare state dict or a safetensors file."""
    from safetensors.torch import save_file

    torch.manual_seed(9)
    weights = create_model(ModelConfig()).model
    path = tmp_path / layout
    state = {n: t.contiguous() for n, t in weights.state_dict().items()}
    save_file(state, path) if layout.endswith("safetensors") else torch.save(state, path)
    assert_same_function(create_model(ModelConfig(pretrained=str(path), trainable="lora-2")).model, weights)
