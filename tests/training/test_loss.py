"""The group loss every gradient engine differentiates."""

import torch
import torch.nn.functional as F

from fedclip.training.loss import clip_loss, clip_loss_with_bank, group_loss
from fedclip.training.negative_bank import NegativeBank


def _features(n: int, d: int = 8, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(n, d, generator=g), dim=-1), F.normalize(torch.randn(n, d, generator=g), dim=-1)


def test_without_a_bank_it_is_the_contrastive_loss_of_the_group():
    images, texts = _features(5)
    scale = torch.tensor(10.0)
    assert torch.allclose(group_loss(images, texts, scale), clip_loss(images, texts, scale))
    valid = torch.tensor([True, True, False, True, True])
    assert torch.allclose(group_loss(images, texts, scale, valid), clip_loss(images, texts, scale, valid))
    # padding changes nothing: the masked loss is the loss of the valid pairs alone
    assert torch.allclose(group_loss(images, texts, scale, valid), clip_loss(images[valid], texts[valid], scale))


def test_with_a_bank_it_contrasts_against_the_public_negatives():
    images, texts = _features(3)
    bank = NegativeBank(*_features(16, seed=1))
    scale = torch.tensor(10.0)
    every = torch.ones(3, dtype=torch.bool)
    with_bank = group_loss(images, texts, scale, bank=bank)
    assert torch.allclose(with_bank, clip_loss_with_bank(images, texts, scale, every, bank.images, bank.texts))
    assert not torch.allclose(with_bank, clip_loss(images, texts, scale))  # the negatives count
