"""The dishonest coordinator's ClientApp, run at the hospital as its app user: each message names
an attack (``attack``), and the ClientApp sends home whatever it gets."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.clientapp import ClientApp

from simulations.hospital_clip.site_worker import WORKER_KEY, forward

app = ClientApp()


def _loot(msg: Message, found: dict, *extra: tuple[str, ArrayRecord]) -> Message:
    return Message(RecordDict({"loot": ConfigRecord({"json": json.dumps(found)}), **dict(extra)}), reply_to=msg)


def _ask(msg: Message, context: Context, **changes) -> Message:
    """The site's worker, asked for the server's round with ``changes`` to its plan."""
    honest = msg.content.config_records.get("honest", msg.content["config"])
    msg.content["honest"] = honest
    msg.content["config"] = ConfigRecord({**{k: honest[k] for k in honest}, **changes})
    return forward(str(context.node_config[WORKER_KEY]), msg, context)


@app.train()
def train(msg: Message, context: Context) -> Message:
    attack = json.loads(str(msg.content["attack"]["json"]))
    del msg.content["attack"]
    if attack["kind"] == "read":  # (a) the hospital's files, as a bundle would just open them
        taken, denied = {}, {}
        for path in attack["paths"]:
            try:
                taken[path] = Path(path).read_bytes().hex()
            except OSError as exc:
                denied[path] = f"{type(exc).__name__}: {exc.strerror}"
        if not taken:  # nothing to send home: the round fails, as any bundle's that just opens the files
            raise PermissionError(f"the hospital's files: {denied}")
        return _loot(msg, {"taken": taken, "denied": denied})
    if attack["kind"] == "weaker":  # (b) a round the hospital's policy does not allow
        found = {}
        for name, changes in attack["plans"].items():
            try:
                reply = _ask(msg, context, **changes)
            except RuntimeError as exc:
                found[name] = f"refused: {exc}"
            else:
                found[name] = "answered"
                return _loot(msg, found, ("arrays", reply.content["arrays"]))
        return _loot(msg, found)
    if attack["kind"] == "replay":  # (c) the same round again and again, each as a new run
        answered, refusal, reply = 0, "", None
        for attempt in range(int(attack["times"])):
            try:
                reply = _ask(msg, context, **{"run-name": f"replay-{attempt}"})
            except RuntimeError as exc:
                refusal = str(exc)
                break
            answered += 1
        found = {"answered": answered, "refusal": refusal}
        return _loot(msg, found, *([("arrays", reply.content["arrays"])] if reply is not None else []))
    if attack["kind"] == "tamper":  # (d) the worker's reply, changed before it is sent
        reply = _ask(msg, context)
        honest = reply.content["arrays"]
        tampered = ArrayRecord({k: Array(np.asarray(honest[k].numpy() * 100.0 + 1.0)) for k in honest})
        return _loot(msg, {"tampered": sorted(honest)}, ("arrays", tampered), ("honest", honest))
    raise ValueError(f"unknown attack {attack['kind']!r}")
