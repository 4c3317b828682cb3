"""The hospital's ClientApp: answer which site it is, and train locally under per-batch DP.

Every reply carries model parameters (the trainable ones), the example count and training loss
(released in the clear: outside the DP guarantee, as site sizes usually are), and the privacy
event. Nothing else: no images, captions, names or ids (``tests/simulations`` inspects replies).
"""

from __future__ import annotations

import math

from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fedclip.models.arrays import load_arrays, model_to_arrays
from fedclip.training.config import DpConfig, TrainConfig
from fedclip.training.local import train_local
from simulations.hospital_clip.task import fresh_model, pick_device, site_for_partition, site_training_data
from strategies.privacy_budget import PRIVACY_RECORD

app = ClientApp()


def _site(context: Context, config: ConfigRecord) -> tuple[str, str]:
    """(manifest, site) of this node: its node config in a deployment, else its partition."""
    manifest = str(context.node_config.get("manifest", config["manifest"]))
    if "site" in context.node_config:
        return manifest, str(context.node_config["site"])
    partition = int(context.node_config.get("partition-id", 0))
    return manifest, site_for_partition(manifest, int(config["num-sites"]), int(config["seed"]), partition,
                                        bool(config["pool-sites"]))


@app.query()
def query(msg: Message, context: Context) -> Message:
    config = msg.content["config"]
    _, site = _site(context, config)
    return Message(RecordDict({"site": ConfigRecord({"site": site})}), reply_to=msg)


@app.train()
def train(msg: Message, context: Context) -> Message:
    config = msg.content["config"]
    manifest, site = _site(context, config)
    # the base weights: the server's path in a simulation, the node's own copy in a deployment
    checkpoint = str(context.node_config.get("checkpoint", config["checkpoint"]))
    data = site_training_data(manifest, site, int(config["num-sites"]), int(config["seed"]), str(config["arch"]),
                              checkpoint, bool(config["pool-sites"]))
    device = pick_device()
    model = fresh_model(str(config["arch"]), checkpoint, str(config["trainable"]), device)
    load_arrays(model, msg.content["arrays"])
    dp = DpConfig(mode=str(config["dp-mode"]), privacy_unit=str(config["privacy-unit"]),
                  noise_multiplier=float(config["noise-multiplier"]), max_grad_norm=float(config["max-grad-norm"]),
                  sample_rate=float(config["sample-rate"]), num_microbatches=int(config["num-microbatches"]),
                  delta=float(config["delta"]), accountant=str(config["accountant"]), hash_key=f"fedclip:{site}")
    round_ = int(config["server-round"]) + int(config["round-offset"])
    result = train_local(model, data, dp=dp, train=TrainConfig(steps=int(config["local-steps"]), lr=float(config["lr"])),
                         seed=int(config["seed"]) * 100_003 + round_ * 1009 + sum(map(ord, site)))
    losses = [v for v in result.losses if not math.isnan(v)]
    content = RecordDict({
        "arrays": model_to_arrays(model, trainable_only=True),
        # site-weight: equal weights, which client-level DP's accounting requires
        "metrics": MetricRecord({"num-examples": len(data), "site-weight": 1.0,
                                 "train-loss": sum(losses) / len(losses) if losses else 0.0}),
        PRIVACY_RECORD: ConfigRecord(result.event.to_dict()),
    })
    return Message(content, reply_to=msg)
