import numpy as np
import pytest
import torch

from fedclip.models.factory import ModelConfig, create_model
from fedclip.training.config import DpConfig, TrainConfig
from fedclip.training.ghost_clipping import GhostClipping, GhostDPOptimizer, unsupported
from fedclip.training.local import make_optimizer
from fedclip.training.microbatch_grads import per_microbatch_grads
from tests.models.test_lora import lora_trained_a_little
from tests.training.test_microbatch_grads import _bank, _batch


def _reference(model, groups, images, tokens, *, bank=None):
    """The vmap reference's group gradients' norms, their sum for given clip factors, the losses."""
    grads, losses = per_microbatch_grads(model, groups, images, tokens, bank=bank)
    norms = torch.stack([g.reshape(len(g), -1).norm(dim=1) for g in grads.values()], dim=1).norm(dim=1)
    return norms, lambda factors: {n: torch.einsum("k,k...->...", factors, g) for n, g in grads.items()}, losses


@pytest.mark.parametrize(
    ("arch", "trainable", "size", "groups", "with_bank"),
    [
        (
            "fedclip-tiny",
            "last-1",
            32,
            [np.arange(0, 5), np.array([], dtype=np.int64), np.arange(5, 7), np.arange(7, 12)],
            False,
        ),
        ("fedclip-tiny", "last-1", 32, [np.array([i]) for i in (3, 0, 7, 11, 5)], True),
        ("fedclip-tiny", "projections", 32, [np.arange(0, 6), np.arange(6, 12)], False),
        (
            "fedclip-tiny",
            "all",
            32,
            [np.arange(0, 5), np.array([], dtype=np.int64), np.array([9]), np.arange(5, 9)],
            True,
        ),
        ("ViT-B-32", "last-1", 224, [np.array([0]), np.arange(1, 5)], False),
        ("fedclip-tiny", "lora-4", 32, [np.arange(0, 5), np.array([], dtype=np.int64), np.arange(5, 9)], True),
        ("fedclip-tiny", "lora-2-attn", 32, [np.array([i]) for i in (3, 0, 7)], True),
        ("fedclip-tiny", "bias", 32, [np.arange(0, 5), np.array([9]), np.arange(5, 9)], False),
    ],
)
def test_norms_and_clipped_sum_equal_opacus_clipping_the_reference(arch, trainable, size, groups, with_bank):
    """Unequal groups, an empty group, one pair per group out of order (the Gram route), a
    negative bank, every parameter (patch convolution, token embedding), a real open_clip
    architecture: the norms, the clipped sum of every parameter (fused q/k/v rows included) and
    the losses."""
    torch.manual_seed(0)
    model = lora_trained_a_little(create_model(ModelConfig(arch=arch, trainable=trainable)).model)
    images, tokens = _batch(12, size, model.context_length)
    bank = _bank(model) if with_bank else None
    ghost, losses, rows = GhostClipping(model)(groups, images, tokens, bank=bank)
    norms, clipped, ref_losses = _reference(model, groups, images, tokens, bank=bank)
    assert rows == {}
    # never below the true norm (the Gram route adds a bound on its rounding), and barely above it
    # (the bound is worst-case: 0.3% for ViT-B-32's 3,072-wide layers over a group of 4 x 50 tokens)
    assert (ghost.norms >= norms * (1 - 1e-6)).all(), (ghost.norms, norms)
    torch.testing.assert_close(ghost.norms.float(), norms, rtol=1e-2, atol=1e-6)
    factors = (0.5 / (ghost.norms + 1e-6)).clamp(max=1.0).float()
    assert (factors < 1).any(), "the test must clip something"
    sums = ghost.clipped_sum(factors)
    for name, p in model.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(sums[id(p)], clipped(factors)[name], rtol=1e-4, atol=1e-6, msg=name)
    torch.testing.assert_close(losses, ref_losses, rtol=1e-5, atol=1e-6)
    assert all(p.grad is None for p in model.parameters()), "no plain gradient is left behind"


def test_optimizer_takes_ghost_groups_and_steps_as_with_group_gradients():
    """Same noise seed, same model: a step from ghost groups equals a step from the reference's
    group gradients (clipping, noise, scaling and the update are Opacus' in both)."""
    torch.manual_seed(2)
    model = create_model(ModelConfig(trainable="last-1")).model
    images, tokens = _batch(8, 32, model.context_length)
    groups = [np.arange(0, 3), np.arange(3, 8)]
    dp = DpConfig(noise_multiplier=0.7, max_grad_norm=0.3, sample_rate=1.0, microbatch_size=4, declared_units=8)
    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    after = []
    for use_ghost in (True, False):
        with torch.no_grad():
            for n, p in model.named_parameters():
                p.copy_(start[n])
        opt = make_optimizer(
            model, dp, TrainConfig(lr=1e-2), expected_microbatches=2, noise_generator=torch.Generator().manual_seed(5)
        )
        assert isinstance(opt, GhostDPOptimizer)
        if use_ghost:
            opt.ghost_groups = GhostClipping(model)(groups, images, tokens)[0]
        else:
            grads, _ = per_microbatch_grads(model, groups, images, tokens)
            for n, p in model.named_parameters():
                if p.requires_grad:
                    p.grad_sample = grads[n]
        opt.step()
        opt.zero_grad(set_to_none=True)
        assert opt.ghost_groups is None
        after.append({n: p.detach().clone() for n, p in model.named_parameters()})
    for name in after[0]:
        torch.testing.assert_close(after[0][name], after[1][name], rtol=1e-4, atol=1e-6, msg=name)
    assert any(not torch.equal(after[0][n], start[n]) for n in start)


def test_models_it_does_not_cover_are_named():
    assert unsupported(create_model(ModelConfig(trainable="all")).model) is None
    model = create_model(ModelConfig(trainable="last-1")).model
    model.logit_bias = torch.nn.Parameter(torch.zeros([]))  # SigLIP's bias: not in the twin
    assert "logit bias" in unsupported(model)
    with pytest.raises(ValueError, match="grad-engine: 'ghost' does not support this model"):
        GhostClipping(model)


def test_ghost_is_refused_where_per_group_gradients_are_needed():
    from fedclip.training.group_grads import make_grad_engine

    model = create_model(ModelConfig(trainable="last-1")).model
    with pytest.raises(ValueError, match="'ghost' gives no per-group gradients"):
        make_grad_engine(model, "ghost", group_gradients_needed=True)
    auto = make_grad_engine(model, "auto", group_gradients_needed=True)
    assert not auto.ghost_covered and "ghost" not in {auto.choose(k) for k in (2, 16, 128)}


def test_a_parameter_counted_twice_is_refused():
    """Two shares of one parameter (a module applied twice) would make the summed squares a wrong
    norm: refused, not computed."""
    from fedclip.training.ghost_clipping import _each_once

    weight = torch.nn.Parameter(torch.zeros(2))
    share = (weight, torch.zeros(3), lambda pair_f, group_f: torch.zeros(2))
    _each_once([share])
    with pytest.raises(RuntimeError, match="used twice in one forward"):
        _each_once([share, share])


def test_gram_norm_is_never_below_the_true_norm_when_terms_cancel():
    """Near-cancelling tokens (W = sum_t g_t a_t^T tiny against each term): float32 Gram sums lose
    most of their digits here; the rounding bound keeps the norm at or above the float64 truth."""
    from fedclip.training.ghost_clipping import _Layout, _matmul_weight

    g = torch.Generator().manual_seed(3)
    a = torch.randn(1, 1, 48, generator=g).repeat(1, 16, 1) + 1e-4 * torch.randn(1, 16, 48, generator=g)
    signs = torch.tensor([1.0, -1.0]).repeat(8)[None, :, None]
    grad = signs * torch.randn(1, 1, 64, generator=g)  # pairs of tokens cancel up to the 1e-4 noise
    layout = _Layout(
        position=torch.zeros(1, 1, dtype=torch.long),
        valid=torch.ones(1, 1, dtype=torch.bool),
        owner=torch.zeros(1, dtype=torch.long),
    )
    weight = torch.nn.Parameter(torch.zeros(64, 48))
    _, sq, _ = _matmul_weight(weight, a, grad, layout, transposed=False)
    true = (grad[0].double().T @ a[0].double()).norm()
    assert 16 * (48 + 64) < 48 * 64  # the Gram route is the one taken
    assert sq.sqrt().item() >= true.item()


def test_canaries_join_ghost_groups_as_the_per_group_path_adds_them():
    """An auditor's canary rows (norm exactly C) beside ghost groups: the clipped sum the optimizer
    noises is the one the per-group path computes with the rows concatenated to its gradients."""
    import copy

    from fedclip.attacks.gradient_canaries import canary_rows, draw_dirac_canaries
    from fedclip.training.local import dp_hand_over

    torch.manual_seed(4)
    model = create_model(ModelConfig(trainable="last-1")).model
    images, tokens = _batch(6, 32, model.context_length)
    groups = [np.arange(0, 2), np.arange(2, 4), np.arange(4, 6)]
    canaries = draw_dirac_canaries(model, per_site=5, sites=("a",), secret=bytes(range(32)))["a"]
    rows = canary_rows(model, list(canaries.coordinates), norm=1.0)
    rows = {n: r * torch.linspace(0.5, 3.0, len(r)).view(-1, *[1] * (r.dim() - 1)) for n, r in rows.items()}
    dp = DpConfig(noise_multiplier=1.0, max_grad_norm=1.0, sample_rate=1.0, microbatch_size=2, declared_units=6)
    sums = {}
    for engine in ("ghost", "reference"):
        m = copy.deepcopy(model)
        opt = make_optimizer(m, dp, TrainConfig(), expected_microbatches=3, noise_generator=None)
        if engine == "ghost":
            computed = GhostClipping(m)(groups, images, tokens)
        else:
            computed = (*per_microbatch_grads(m, groups, images, tokens), {})
        dp_hand_over(m, opt, computed, canaries=rows)
        opt.clip_and_accumulate()  # Opacus' first named step; noise comes after, and is not compared
        sums[engine] = {n: p.summed_grad.clone() for n, p in m.named_parameters() if p.requires_grad}
    for name in sums["ghost"]:
        torch.testing.assert_close(sums["ghost"][name], sums["reference"][name], rtol=1e-4, atol=1e-5)
    name, index = canaries.coordinates[0]
    assert sums["ghost"][name].reshape(-1)[index] != 0  # the canaries are in it (clipped: rows above C shrink)


def test_captions_of_different_lengths_match_the_reference():
    """Each caption ends elsewhere (end of text at 4..20 of 32): the twin skips the token
    positions after the longest, and norms and sums still equal the reference's (which runs the
    full context), for groups large enough to take the written route and for one pair each."""
    torch.manual_seed(5)
    model = create_model(ModelConfig(trainable="last-1")).model
    images, tokens = _batch(12, 32, model.context_length)
    for row, end in enumerate([4, 20, 7, 11, 5, 9, 13, 6, 8, 10, 12, 15]):
        tokens[row, end], tokens[row, end + 1 :] = 49407, 0
        tokens[row, :end] = tokens[row, :end].clamp(max=5000)
    for groups in ([np.arange(0, 6), np.arange(6, 12)], [np.array([i]) for i in range(12)]):
        ghost, _, _ = GhostClipping(model)(groups, images, tokens)
        norms, clipped, _ = _reference(model, groups, images, tokens)
        assert (ghost.norms >= norms * (1 - 1e-6)).all()
        torch.testing.assert_close(ghost.norms.float(), norms, rtol=1e-2, atol=1e-6)
        factors = (0.5 / (ghost.norms + 1e-6)).clamp(max=1.0).float()
        sums = ghost.clipped_sum(factors)
        for name, p in model.named_parameters():
            if p.requires_grad:
                torch.testing.assert_close(sums[id(p)], clipped(factors)[name], rtol=1e-4, atol=1e-6, msg=name)


def test_reduced_precision_matmuls_are_switched_off_for_ghost_steps_and_restored(monkeypatch):
    """The rounding bound assumes IEEE float32 matmuls: under TF32 (a GPU) or bf16 (oneDNN on a
    CPU) the norms and the clipped sum are computed at full precision, and the user's settings
    come back afterwards."""
    import fedclip.training.ghost_clipping as ghost_module

    seen = []
    real = ghost_module._gram_rounding
    settings = (torch.backends.cuda.matmul, torch.backends.mkldnn.matmul)
    monkeypatch.setattr(
        ghost_module,
        "_gram_rounding",
        lambda ag, gg: (seen.append(tuple(s.fp32_precision for s in settings)), real(ag, gg))[1],
    )
    monkeypatch.setattr(ghost_module, "_warned_precision", False)
    torch.manual_seed(0)
    model = create_model(ModelConfig(arch="fedclip-tiny", trainable="last-1")).model
    images, tokens = _batch(8, 32, model.context_length)
    previous = tuple(s.fp32_precision for s in settings)
    try:
        torch.backends.cuda.matmul.fp32_precision, torch.backends.mkldnn.matmul.fp32_precision = "tf32", "bf16"
        with pytest.warns(UserWarning, match=r"reduced-precision float32 matmuls \(bf16, tf32\) are switched off"):
            ghost, _, _ = GhostClipping(model)([np.array([i]) for i in range(8)], images, tokens)
        ghost.clipped_sum(torch.full((8,), 0.5))
        assert seen and set(seen) == {("ieee", "ieee")}  # the Gram route ran at full precision
        assert tuple(s.fp32_precision for s in settings) == ("tf32", "bf16")
    finally:
        for setting, value in zip(settings, previous):
            setting.fp32_precision = value


def test_half_precision_parameters_are_refused_by_the_ghost_engine():
    model = create_model(ModelConfig(arch="fedclip-tiny", trainable="last-1")).model.to(torch.bfloat16)
    assert any(p.requires_grad and p.dtype == torch.bfloat16 for p in model.parameters())
    with pytest.raises(ValueError, match="'ghost' does not support this model: parameters are not float32"):
        GhostClipping(model)
