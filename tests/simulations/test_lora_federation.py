"""A federation with LoRA adapters (``trainable = "lora-R"``), through the real ServerApp and
ClientApp on the in-process transport: the replies carry the adapters and nothing else, the server
averages each factor (A and B) on its own, the round models hold the adapters over the base
weights, and the auditor loads them."""

from __future__ import annotations

import json

import numpy as np
import torch
from flwr.app import ArrayRecord
from flwr.supercore.task_identity import TaskIdentity

from fedclip.models.arrays import load_arrays
from fedclip.models.factory import ModelConfig, create_model, save_checkpoint
from simulations.cli import parse_run_config
from simulations.commands import main
from simulations.hospital_clip.server_app import default_run_config, resolve_config, run
from tests.faults.local_grid import LocalGrid
from tests.models.test_lora import assert_same_function

TINY = (
    "num-sites=2 patients-per-site=6 public-patients=30 heldout-patients=8 images-per-patient=4 "
    "query-images-per-patient=3 idia-queries=3 idia-distractors=20 warm-start-epochs=0 local-steps=2 "
    "microbatch-size=3 target-epsilon=0.0 noise-multiplier=2.0 num-rounds=1 trainable='lora-2'"
)


class RecordingGrid(LocalGrid):
    """The in-process transport, keeping every train reply's arrays and weight."""

    def __init__(self, num_nodes: int) -> None:
        super().__init__(num_nodes)
        self.replies: list[tuple[dict[str, np.ndarray], float]] = []

    def pull_messages(self, message_ids):
        out = super().pull_messages(message_ids)
        for msg in out:
            if msg.metadata.message_type.startswith("train") and not msg.has_error() and "arrays" in msg.content:
                arrays = {k: v.numpy() for k, v in msg.content["arrays"].items()}
                self.replies.append((arrays, float(msg.content["metrics"]["site-weight"])))
        return out


def test_replies_carry_adapters_the_server_averages_each_factor_and_the_auditor_loads_them(tmp_path):
    TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 1, 1, 0
    out = tmp_path / "run"
    torch.manual_seed(123)  # a user's open_clip checkpoint file, the base every site starts from
    weights = create_model(ModelConfig()).model
    checkpoint = save_checkpoint(weights, tmp_path / "user_weights.pt")
    overrides = {"output-dir": str(out), "cache-dir": str(tmp_path / "cache"), "pretrained": str(checkpoint)}
    cfg = resolve_config(default_run_config(), {**parse_run_config(TINY), **overrides})
    grid = RecordingGrid(2)
    run(grid, cfg)

    # the federation started from exactly the user's weights (the server's round-0 model, as the
    # auditor and every site build it: the file, then the adapters, B = 0)
    assert json.loads((out / "config.json").read_text())["resolved-checkpoint"] == str(checkpoint)
    start = torch.load(out / "models" / "round_000.pt")["state_dict"]
    server = create_model(ModelConfig(pretrained=str(checkpoint), trainable="lora-2")).model
    load_arrays(server, ArrayRecord(torch_state_dict=start))
    assert_same_function(server, weights)
    end = torch.load(out / "models" / "round_001.pt")["state_dict"]
    # what travels and what is saved: the adapters (rank 2, every target of both towers), nothing else
    assert set(start) == set(end) and all(".lora_A." in k or ".lora_B." in k for k in end)
    assert len(end) == (4 + 2) * 2 * 2 * 2  # layers x blocks x towers x (A, B) of fedclip-tiny
    assert len(grid.replies) == 2 and all(set(arrays) == set(end) for arrays, _ in grid.replies)
    # the stated aggregation: each factor averaged (FedAvg's weighted mean), not the products merged
    weights = np.array([w for _, w in grid.replies])
    for name, tensor in end.items():
        mean = sum(w * arrays[name] for (arrays, _), w in zip(grid.replies, weights)) / weights.sum()
        np.testing.assert_allclose(tensor.numpy(), mean, rtol=1e-5, atol=1e-7, err_msg=name)
    name_a = next(k for k in end if k.endswith("attn.qlinear.lora_A.default.weight"))
    name_b = name_a.replace("lora_A", "lora_B")
    products = sum(w * arrays[name_b] @ arrays[name_a] for (arrays, _), w in zip(grid.replies, weights))
    assert not np.allclose(end[name_b].numpy() @ end[name_a].numpy(), products / weights.sum(), atol=1e-6)

    # the auditor builds the base model with adapters and loads each saved round over it
    assert main(["audit", str(out), "--targets", str(out / "data" / "manifest.csv")]) == 0
    assert (out / "audit" / "attack.csv").is_file()
