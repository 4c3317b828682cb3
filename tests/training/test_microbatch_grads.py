import numpy as np
import pytest
import torch

from fedclip.models.factory import ModelConfig, create_model
from fedclip.training.loss import clip_loss
from fedclip.training.microbatch_grads import per_microbatch_grads


def _batch(n: int, image_size: int, context: int = 32, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(n, 3, image_size, image_size, generator=g)
    tokens = torch.randint(1, 5000, (n, context), generator=g)
    tokens[:, 8] = 49407  # end-of-text, where open_clip pools the text
    tokens[:, 9:] = 0
    return images, tokens


def _loop_grads(model, groups, images, tokens):
    out = []
    for g in groups:
        model.zero_grad()
        image_f, text_f, scale = model(images[g], tokens[g])
        clip_loss(image_f, text_f, scale).backward()
        out.append({n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad})
    return out


@pytest.mark.parametrize(
    ("arch", "trainable", "size", "groups"),
    [
        ("fedclip-tiny", "all", 32, [np.arange(0, 5), np.arange(5, 7), np.arange(7, 16)]),
        ("ViT-B-32", "last-1", 224, [np.arange(0, 3), np.arange(3, 5)]),
    ],
)
def test_vmap_gradients_equal_one_backward_per_microbatch(arch, trainable, size, groups):
    """Unequal micro-batch sizes (so padding is exercised), open_clip's own attention modules,
    on the tiny architecture and on a real open_clip architecture (random init)."""
    torch.manual_seed(0)
    model = create_model(ModelConfig(arch=arch, trainable=trainable)).model
    images, tokens = _batch(int(max(g.max() for g in groups)) + 1, size, model.context_length)
    grads, losses = per_microbatch_grads(model, groups, images, tokens)
    expected = _loop_grads(model, groups, images, tokens)
    assert losses.shape == (len(groups),)
    for k, exp in enumerate(expected):
        for name, g in exp.items():
            torch.testing.assert_close(grads[name][k], g, rtol=1e-4, atol=1e-5, msg=f"{name} of micro-batch {k}")


def test_no_microbatch_gives_empty_grad_samples():
    model = create_model(ModelConfig(trainable="projections")).model
    images, tokens = _batch(4, 32)
    grads, losses = per_microbatch_grads(model, [], images, tokens)
    assert set(grads) == {"visual.proj", "text_projection", "logit_scale"}
    assert all(g.shape[0] == 0 for g in grads.values()) and len(losses) == 0


def _bank(model, n: int = 6):
    from fedclip.training.negative_bank import NegativeBank

    images, tokens = _batch(n, 32, model.context_length, seed=9)
    with torch.no_grad():
        image_f, text_f, _ = model(images, tokens)
    return NegativeBank(images=image_f, texts=text_f)


def test_a_units_gradient_against_the_bank_depends_on_its_own_data_only():
    """The sensitivity argument of unit mode: change every other unit and one unit's gradient stays."""
    torch.manual_seed(0)
    model = create_model(ModelConfig(trainable="last-1")).model
    bank = _bank(model)
    images, tokens = _batch(9, 32, model.context_length)
    other_images, other_tokens = _batch(9, 32, model.context_length, seed=4)
    images2, tokens2 = images.clone(), tokens.clone()
    images2[3:], tokens2[3:] = other_images[3:], other_tokens[3:]  # every pair of the other units replaced
    groups = [np.arange(0, 3), np.arange(3, 5), np.arange(5, 9)]
    first, _ = per_microbatch_grads(model, groups, images, tokens, bank=bank)
    second, _ = per_microbatch_grads(model, groups, images2, tokens2, bank=bank)
    for name in first:
        torch.testing.assert_close(first[name][0], second[name][0], rtol=1e-5, atol=1e-7)
    assert any(not torch.allclose(first[n][1], second[n][1]) for n in first)
    # without the bank the same holds (a unit's block loss never sees another unit), and the bank matters
    plain, _ = per_microbatch_grads(model, groups, images, tokens)
    assert any(not torch.allclose(plain[n][0], first[n][0]) for n in first)


def test_a_single_pair_unit_still_learns_against_the_bank():
    torch.manual_seed(0)
    model = create_model(ModelConfig(trainable="projections")).model
    images, tokens = _batch(2, 32, model.context_length)
    grads, losses = per_microbatch_grads(model, [np.arange(0, 1)], images, tokens, bank=_bank(model))
    assert float(losses[0]) > 0 and any(float(g.abs().sum()) > 0 for g in grads.values())
    lonely, lonely_loss = per_microbatch_grads(model, [np.arange(0, 1)], images, tokens)
    assert float(lonely_loss[0]) == pytest.approx(0.0, abs=1e-6)  # one pair and no negatives: nothing to learn
