"""The dishonest coordinator's ServerApp: an honest round plan (the real app's, from small.toml),
one message per attack, and everything that comes back written to ``loot-dir`` for the test."""

from __future__ import annotations

import json
import time
from pathlib import Path

from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.serverapp import Grid, ServerApp

from fedclip.models.arrays import model_to_arrays
from simulations.hospital_clip.config import load_toml
from simulations.hospital_clip.server_app import default_run_config, resolve_config, train_config_record
from simulations.hospital_clip.task import fresh_model, pick_device
from simulations.loopback import REPO

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    out = Path(str(context.run_config["loot-dir"]))
    out.mkdir(parents=True, exist_ok=True)
    small = load_toml(REPO / "simulations" / "hospital_clip" / "small.toml")
    cfg = resolve_config(
        default_run_config(),
        small,
        {
            "sites": "hospital_0",
            "manifest": str(context.run_config["manifest"]),
            "pretrained": str(context.run_config["pretrained"]),
            "declared-units": 6,
        },
    )
    record = train_config_record(cfg, noise_multiplier=cfg.noise_multiplier, manifest="", checkpoint="")
    record["server-round"] = 1  # as Flower's strategies add it
    arrays = model_to_arrays(fresh_model(cfg.arch, cfg.pretrained, cfg.trainable, pick_device()), trainable_only=True)
    deadline = time.time() + 120
    while not (nodes := list(grid.get_node_ids())) and time.time() < deadline:
        time.sleep(1)
    loot = []
    for k, attack in enumerate(json.loads(str(context.run_config["attacks"]))):
        msg = Message(
            RecordDict({"arrays": arrays, "config": record, "attack": ConfigRecord({"json": json.dumps(attack)})}),
            dst_node_id=nodes[0],
            message_type="train",
        )
        for reply in grid.send_and_receive([msg], timeout=600):
            if reply.has_error():
                loot.append({"attack": attack, "error": reply.error.reason})
                continue
            got = {"attack": attack, "configs": {}, "arrays": {}}
            for name, rec in reply.content.config_records.items():
                got["configs"][name] = {key: rec[key] for key in rec}
            for name, rec in reply.content.array_records.items():
                got["arrays"][name] = sorted(rec)
                for key in rec:
                    (out / f"{k}-{name}-{key}.npy").write_bytes(rec[key].numpy().tobytes())
            loot.append(got)
    (out / "loot.json").write_text(json.dumps(loot, indent=2, default=str))
