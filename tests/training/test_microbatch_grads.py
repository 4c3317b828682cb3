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


@pytest.mark.parametrize(("arch", "trainable", "size", "groups"), [
    ("fedclip-tiny", "all", 32, [np.arange(0, 5), np.arange(5, 7), np.arange(7, 16)]),
    ("ViT-B-32", "last-1", 224, [np.arange(0, 3), np.arange(3, 5)]),
])
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
