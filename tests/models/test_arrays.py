import pytest
import torch

from fedclip.models.arrays import load_arrays, model_to_arrays
from fedclip.models.factory import ModelConfig, create_model


def test_round_trip_through_array_record():
    torch.manual_seed(0)
    source = create_model(ModelConfig()).model
    torch.manual_seed(1)
    target = create_model(ModelConfig()).model
    load_arrays(target, model_to_arrays(source))
    for (name, a), b in zip(source.state_dict().items(), target.state_dict().values()):
        assert torch.equal(a, b), name


def test_trainable_only_sends_only_what_is_trained_and_keeps_the_rest():
    source = create_model(ModelConfig(trainable="projections")).model
    arrays = model_to_arrays(source, trainable_only=True)
    assert set(arrays.keys()) == {"visual.proj", "text_projection", "logit_scale"}
    target = create_model(ModelConfig()).model
    before = target.token_embedding.weight.detach().clone()
    with torch.no_grad():
        source.visual.proj.add_(1.0)
    load_arrays(target, model_to_arrays(source, trainable_only=True))
    assert torch.equal(target.visual.proj, source.visual.proj)
    assert torch.equal(target.token_embedding.weight, before)


def test_mismatched_arrays_are_refused():
    model = create_model(ModelConfig()).model
    arrays = model_to_arrays(model, trainable_only=False)
    arrays["visual.proj"] = model_to_arrays(
        create_model(ModelConfig(arch="ViT-B-32", trainable="projections")).model, trainable_only=True
    )["visual.proj"]
    with pytest.raises(ValueError, match="visual.proj has shape"):
        load_arrays(model, arrays)
