import pytest
import torch
from torch import nn

from fedclip.models.factory import ModelConfig, create_model
from fedclip.training.grad_sample_twin import GradSampleTwin, unsupported_reason
from tests.training.test_microbatch_grads import _batch


def test_twin_computes_the_models_features_and_sees_its_updates():
    """Same outputs as open_clip's own forward, before and after an in-place update of the model
    (the twin shares storage, including the q/k/v views of the fused attention weights)."""
    torch.manual_seed(0)
    model = create_model(ModelConfig(trainable="all")).model
    twin = GradSampleTwin(model)
    images, tokens = _batch(5, 32, model.context_length)
    for _ in range(2):
        with torch.no_grad():
            image_f, text_f, _ = model(images, tokens)
            twin_image, twin_text = twin(images, tokens)
        torch.testing.assert_close(twin_image, image_f, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(twin_text, text_f, rtol=1e-5, atol=1e-6)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.05 * torch.randn_like(p))
    shared = {id(p) for p in model.parameters()}
    assert all(id(p) in shared or p in twin.attention_views for p in twin.parameters())


def test_models_the_twin_does_not_cover_are_named():
    assert "not open_clip's CLIP" in unsupported_reason(nn.Linear(2, 2))
    model = create_model(ModelConfig(trainable="all")).model
    assert unsupported_reason(model) is None
    model.transformer.grad_checkpointing = True
    assert "checkpointing" in unsupported_reason(model)
    model.transformer.grad_checkpointing = False
    model.logit_bias = nn.Parameter(torch.zeros([]))
    assert "logit bias" in unsupported_reason(model)
    with pytest.raises(ValueError, match="grad-sample twin: .*logit bias"):
        GradSampleTwin(model)


def _text_lengths_seen(twin, tokens):
    seen = []
    handle = twin.token_embedding.register_forward_hook(lambda m, inputs, out: seen.append(inputs[0].shape[1]))
    with torch.no_grad():
        features = twin.encode_text(tokens)
    handle.remove()
    return seen, features


def test_the_text_tower_runs_on_live_positions_only_and_gives_the_models_features():
    """Captions ending at different positions: the twin's causal text tower sees positions up to
    the batch's last end of text and nothing after, and its features are the model's (which runs
    every position). Without a causal mask every position is kept."""
    torch.manual_seed(1)
    model = create_model(ModelConfig(trainable="all")).model
    _, tokens = _batch(6, 32, model.context_length)
    for row, end in enumerate([3, 11, 5, 17, 8, 6]):
        tokens[row, end], tokens[row, end + 1 :] = 49407, 0
        tokens[row, :end] = tokens[row, :end].clamp(max=5000)
    twin = GradSampleTwin(model)
    assert twin.causal
    seen, features = _text_lengths_seen(twin, tokens)
    assert seen == [18], "positions 0..17: the last end of text is at 17"
    with torch.no_grad():
        expected = model.encode_text(tokens)
    torch.testing.assert_close(features, expected, rtol=1e-5, atol=1e-6)

    model.attn_mask = torch.zeros_like(model.attn_mask)  # every position sees every other: nothing may be cut
    open_twin = GradSampleTwin(model)
    assert not open_twin.causal
    seen, features = _text_lengths_seen(open_twin, tokens)
    assert seen == [model.context_length]
    with torch.no_grad():
        torch.testing.assert_close(features, model.encode_text(tokens), rtol=1e-5, atol=1e-6)
