"""No raw data, captions or names ever leave a site: every reply of the real ClientApp inspected."""

import pandas as pd
import pytest
from flwr.app import Context, Message, MessageType, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from fedclip.models.arrays import model_to_arrays
from fedclip.models.factory import ModelConfig, create_model
from simulations.hospital_clip import client_app
from simulations.hospital_clip.config import SimulationConfig
from simulations.hospital_clip.server_app import train_config_record

EVENT_FIELDS = {"noise_multiplier", "sample_rate", "steps", "privacy_unit", "relation", "sensitivity"}


@pytest.fixture(autouse=True)
def task_identity():
    TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 1, 1, 0


def _strings(value):
    if isinstance(value, str):
        yield value
    elif isinstance(value, (list, tuple)):
        for v in value:
            yield from _strings(v)


def _secrets(manifest_path) -> set[str]:
    frame = pd.read_csv(manifest_path, dtype=str, keep_default_na=False)
    words = set(frame["patient_id"]) | set(frame["filepath"]) | set(frame["title"])
    words |= {part for name in frame["name"] for part in name.split()} | set(frame["name"])
    return {w for w in words if w}


@pytest.mark.parametrize("dp_mode", ["microbatch", "nonprivate"])
def test_every_reply_carries_only_updates_counts_loss_and_the_event(small_manifest_path, warm_checkpoint, dp_mode):
    cfg = SimulationConfig(num_sites=3, dp_mode=dp_mode, local_steps=2, target_epsilon=0.0, trainable="last-1")
    config = train_config_record(cfg, noise_multiplier=1.0, manifest=str(small_manifest_path),
                                 checkpoint=str(warm_checkpoint))
    config["server-round"] = 1
    model = create_model(ModelConfig(pretrained=str(warm_checkpoint), trainable="last-1")).model
    secrets = _secrets(small_manifest_path)
    for partition in range(3):
        context = Context(run_id=1, node_id=partition + 1, node_config={"partition-id": partition}, state=RecordDict(),
                          run_config={})
        query = Message(RecordDict({"config": config}), dst_node_id=partition + 1, message_type=MessageType.QUERY)
        train = Message(RecordDict({"arrays": model_to_arrays(model, trainable_only=True), "config": config}),
                        dst_node_id=partition + 1, message_type=MessageType.TRAIN)
        replies = [client_app(query, context), client_app(train, context)]
        assert not any(r.has_error() for r in replies), [r.error for r in replies if r.has_error()]
        site_reply, train_reply = (r.content for r in replies)
        assert set(site_reply.keys()) == {"site"} and dict(site_reply["site"]) == {"site": f"hospital_{partition}"}
        assert set(train_reply.keys()) == {"arrays", "metrics", "privacy"}
        trainable = {n for n, p in model.named_parameters() if p.requires_grad}
        assert set(train_reply["arrays"].keys()) == trainable
        assert set(train_reply["metrics"].keys()) == {"num-examples", "site-weight", "train-loss"}
        assert set(train_reply["privacy"].keys()) == EVENT_FIELDS
        for record in (site_reply["site"], train_reply["metrics"], train_reply["privacy"]):
            for value in record.values():
                for text in _strings(value):
                    assert text not in secrets and not any(s in text for s in secrets if len(s) > 3), text
        assert train_reply["privacy"]["steps"] == 2
