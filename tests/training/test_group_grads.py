import numpy as np
import pytest
import torch

from fedclip.data.tensors import PairData
from fedclip.models.factory import ModelConfig, create_model
from fedclip.training.config import DpConfig, TrainConfig
from fedclip.training.ghost_clipping import GhostClipping
from fedclip.training.group_grads import AutoGradEngine, GroupGradients, dense_grads, make_grad_engine
from fedclip.training.local import train_local
from fedclip.training.microbatch_grads import per_microbatch_grads
from tests.models.test_lora import lora_trained_a_little
from tests.training.test_microbatch_grads import _bank, _batch


def _assert_same(hooks, vmap):
    """Equal up to float32 rounding: the two engines sum in different orders (the twin over the live
    positions, vmap over the full context), so an entry near zero may differ by ~1e-6 of the tensor's
    largest entry (measured 1.3e-6 on one machine's CPU); a wrong or missing term is orders larger."""
    assert set(hooks) == set(vmap)
    for name, ref in vmap.items():
        scale = float(ref.abs().max())
        torch.testing.assert_close(hooks[name], ref, rtol=1e-4, atol=max(1e-6, 1e-5 * scale), msg=name)


@pytest.mark.parametrize(
    ("arch", "trainable", "size", "groups"),
    [
        ("fedclip-tiny", "all", 32, [np.arange(0, 5), np.array([], dtype=np.int64), np.arange(5, 7), np.arange(7, 12)]),
        ("fedclip-tiny", "projections", 32, [np.array([3]), np.array([0]), np.array([7])]),
        ("ViT-B-32", "last-1", 224, [np.arange(0, 3), np.arange(3, 5)]),
        ("fedclip-tiny", "lora-4", 32, [np.arange(0, 5), np.array([], dtype=np.int64), np.arange(5, 9)]),
        ("fedclip-tiny", "lora-2-mlp", 32, [np.arange(0, 3), np.array([4, 3]), np.arange(5, 9)]),
        ("fedclip-tiny", "bias", 32, [np.arange(0, 5), np.array([9]), np.arange(5, 9)]),
    ],
)
def test_one_backward_equals_the_vmap_reference(arch, trainable, size, groups):
    """Unequal groups, an empty group, one pair per group out of order, and a real open_clip
    architecture (random init): every trainable parameter's per-group gradient and each loss."""
    torch.manual_seed(0)
    model = lora_trained_a_little(create_model(ModelConfig(arch=arch, trainable=trainable)).model)
    images, tokens = _batch(12, size, model.context_length)
    hooks, hook_losses, rows = GroupGradients(model)(groups, images, tokens)
    vmap, vmap_losses = per_microbatch_grads(model, groups, images, tokens)
    if trainable == "all":  # the token embedding comes as the rows of the tokens seen, and only those
        assert set(rows) == {"token_embedding.weight"}
        live = tokens[np.concatenate(groups), :9]  # end of text at 8: the twin runs positions 0..8 only
        assert torch.equal(rows["token_embedding.weight"], torch.unique(live))
        assert hooks["token_embedding.weight"].shape[1] < 5000 < model.token_embedding.weight.shape[0]
    _assert_same(dense_grads(model, hooks, rows), vmap)
    torch.testing.assert_close(hook_losses, vmap_losses, rtol=1e-5, atol=1e-6)
    assert all(p.grad is None for p in model.parameters()), "the one backward must not leave gradients behind"


def test_one_backward_with_a_negative_bank_and_after_model_updates():
    torch.manual_seed(1)
    model = create_model(ModelConfig(trainable="last-1")).model
    engine = GroupGradients(model)
    bank = _bank(model)
    images, tokens = _batch(9, 32, model.context_length)
    groups = [np.arange(0, 4), np.arange(4, 9)]
    for _ in range(2):  # the engine is built once per run: a changed model must be seen
        hooks, _, rows = engine(groups, images, tokens, bank=bank)
        assert rows == {}  # last-1: no embedding
        _assert_same(hooks, per_microbatch_grads(model, groups, images, tokens, bank=bank)[0])
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.05 * torch.randn_like(p))


def test_engine_choice():
    model = create_model(ModelConfig(trainable="projections")).model
    assert isinstance(make_grad_engine(model, "hooks"), GroupGradients)
    assert isinstance(make_grad_engine(model, "ghost"), GhostClipping)
    assert not isinstance(make_grad_engine(model, "vmap"), (GroupGradients, AutoGradEngine, GhostClipping))
    for trainable in ("projections", "last-1", "all", "bias", "lora-4"):  # ghost norms cover every trainable set
        auto = make_grad_engine(create_model(ModelConfig(trainable=trainable)).model, "auto")
        assert [auto.choose(k) for k in (1, 2, 128)] == ["single", "ghost", "ghost"], trainable
    # with an auditor's canaries (per-group gradients needed): hooks or vmap, as measured
    auto = make_grad_engine(model, "auto", group_gradients_needed=True)
    assert [auto.choose(k) for k in (1, 2, 128)] == ["single", "hooks", "hooks"]
    auto = make_grad_engine(create_model(ModelConfig(trainable="all")).model, "auto", group_gradients_needed=True)
    assert [auto.choose(k) for k in (1, 4, 8, 128)] == ["single", "vmap", "hooks", "hooks"]
    model = create_model(ModelConfig(trainable="last-1")).model
    auto = make_grad_engine(model, "auto", group_gradients_needed=True)
    assert [auto.choose(k) for k in (2, 128)] == ["vmap", "vmap"]
    images, tokens = _batch(4, 32, model.context_length)
    auto([np.arange(2), np.arange(2, 4)], images, tokens)
    assert auto.hooks is None and auto.ghost is None  # never chosen, never built (~20 ms per site and round)
    model.logit_bias = torch.nn.Parameter(torch.zeros([]))
    assert not isinstance(make_grad_engine(model, "auto"), (GroupGradients, AutoGradEngine))  # the reference
    with pytest.raises(ValueError, match="grad-engine: 'hooks' does not support this model"):
        make_grad_engine(model, "hooks")
    with pytest.raises(ValueError, match="grad_engine"):
        TrainConfig(grad_engine="fast")


@pytest.mark.parametrize(
    ("engine", "trainable"),
    [
        ("hooks", "all"),
        ("ghost", "all"),
        ("ghost", "last-1"),
        ("ghost", "lora-4"),
        ("hooks", "lora-2"),
        ("ghost", "bias"),
    ],
)
def test_training_is_the_same_with_every_engine(engine, trainable):
    """Through ``train_local``, same reproducible seed (same sampling and noise), same steps: each
    engine ends where the vmap reference ends, so switching engines changes cost, not the
    mechanism (ghost: norms and a clipped sum instead of per-group gradients)."""
    images, tokens = _batch(24, 32)
    data = PairData(
        images=images,
        tokens=tokens,
        patient_ids=tuple(f"p{i // 3}" for i in range(24)),
        names=("n",) * 24,
        conditions=("c",) * 24,
        record_ids=tuple(f"r{i}" for i in range(24)),
    )
    dp = DpConfig(noise_multiplier=1.0, max_grad_norm=0.5, sample_rate=0.5, microbatch_size=1, declared_units=8)
    ends = []
    for name in (engine, "vmap"):
        torch.manual_seed(0)
        model = create_model(ModelConfig(trainable=trainable)).model  # all: incl. the row-sparse embedding
        lora_trained_a_little(model)
        frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
        start = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
        train_local(model, data, dp=dp, train=TrainConfig(steps=3, lr=1e-3, grad_engine=name), reproducible_seed=7)
        ends.append({n: p.detach().clone() for n, p in model.named_parameters()})
        # the noise covers the trainable coordinates, every one of them, and nothing else
        assert all(torch.equal(ends[-1][n], t) for n, t in frozen.items())
        moved = {n: float((ends[-1][n] != t).float().mean()) for n, t in start.items()}
        assert min(moved.values()) > 0.9999, moved  # (a float32 Gaussian draw is exactly 0 about once in 2^24)
    _assert_same(*ends)


@pytest.mark.parametrize("bank", [False, True])
def test_a_single_group_is_a_plain_backward(bank):
    torch.manual_seed(2)
    model = create_model(ModelConfig(trainable="last-1")).model
    negatives = _bank(model) if bank else None
    images, tokens = _batch(6, 32, model.context_length)
    for group in (np.array([4, 0, 2]), np.array([], dtype=np.int64)):
        grads, losses, rows = make_grad_engine(model, "auto")([group], images, tokens, bank=negatives)
        ref, ref_losses = per_microbatch_grads(model, [group], images, tokens, bank=negatives)
        assert rows == {}
        _assert_same(grads, ref)
        torch.testing.assert_close(losses, ref_losses, rtol=1e-5, atol=1e-6)
