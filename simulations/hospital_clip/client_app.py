"""The hospital's ClientApp: answer each message here, or hand it to the site's long-lived worker.

What a site does with a message is in ``site_rounds.py`` (read it top to bottom). This module only
dispatches, and imports nothing heavy: Flower's deployment runtime starts a fresh process for every
message, and a node whose config names a ``site-worker`` socket (``fedclip site-worker``) pays for
Flower's import and the hand-over, not for torch, open_clip and Opacus, the base model and the
site's data, which the worker keeps in memory across rounds.
"""

from __future__ import annotations

from flwr.app import Context, Message
from flwr.clientapp import ClientApp
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS

from simulations.hospital_clip.site_worker import WORKER_KEY, forward  # light: sockets and Flower's serde


def secure_sum(msg: Message, context: Context, call_next) -> Message:
    """Flower's SecAgg+ for a secure sum's messages (``strategies.secure_sum``); every other message
    passes through without importing it (the strategies package brings torch with it)."""
    if RECORD_KEY_CONFIGS not in msg.content.config_records:
        return call_next(msg, context)
    from strategies.secure_sum import secure_sum_mod

    return secure_sum_mod(msg, context, call_next)


app = ClientApp(mods=[secure_sum])


def _answer(msg: Message, context: Context) -> Message:
    socket_path = context.node_config.get(WORKER_KEY)
    if socket_path:
        return forward(str(socket_path), msg, context)
    from simulations.hospital_clip.site_rounds import handle

    return handle(msg, context)


@app.query()
def query(msg: Message, context: Context) -> Message:
    return _answer(msg, context)


@app.train()
def train(msg: Message, context: Context) -> Message:
    return _answer(msg, context)
