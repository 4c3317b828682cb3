"""A grid that keeps at most ``window`` messages in flight, for simulations of many sites.

Why: Flower's simulation engine hands messages to its Ray actors by asking its in-memory state,
every 0.1 s and for every node, whether a message waits for it, and each such question scans
every stored message (``add_messages_to_queue`` and ``InMemoryLinkState.get_message_ins`` in
flwr 1.41). With a round's 1,000 messages pushed at once that is 1,000 x 1,000 checks per sweep,
a busy driver thread that, on a small machine, takes CPU from the actors training the sites.
Keeping a bounded window in flight keeps each sweep small; the actors still always have queued
work as long as the window exceeds their number.

It uses the Grid's own ``push_messages`` and ``pull_messages`` and is handed to
``Strategy.start`` in place of the grid, so the round loop stays Flower's. Messages not pushed
before ``timeout`` are never sent: the budget strategy sees no reply for them, keeps their
write-ahead charge (nothing is under-counted) and applies its failure quorum. A deployment pushes
everything at once (``window=0``): there each SuperNode fetches its own messages.

With a window, replies are *yielded* as they come back rather than returned as a list, so that
``PrivacyBudgetStrategy`` can fold each into a running aggregate and drop it
(``strategies.reducers``): the server then holds a window of messages, not a round of updates.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator

from flwr.app import Message
from flwr.serverapp import Grid


class WindowedGrid:
    """``grid`` with ``send_and_receive`` pushing at most ``window`` messages ahead of their
    replies (``window=0``: all at once, Flower's own behaviour); everything else is ``grid``'s."""

    def __init__(self, grid: Grid, *, window: int) -> None:
        if window < 0:
            raise ValueError(f"messages-in-flight: expected an integer >= 0 (0 = all at once), got {window}")
        self._grid = grid
        self.window = window

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        """The replies; with a window, yielded as they arrive (nothing is sent before the first is asked
        for), so a strategy can fold each into its aggregate and drop it."""
        if self.window == 0:
            return list(self._grid.send_and_receive(messages, timeout=timeout))
        waiting = list(messages)
        return self._windowed(waiting[::-1], timeout) if waiting else []  # an empty list reads as "no replies"

    def _windowed(self, waiting: list[Message], timeout: float | None) -> Iterator[Message]:
        """``waiting``: the messages in reverse order (``pop()`` sends them in the given order)."""
        deadline = None if timeout is None else time.time() + timeout
        in_flight: set[str] = set()
        while waiting or in_flight:
            while waiting and len(in_flight) < self.window:
                in_flight.update(self._grid.push_messages([waiting.pop()]))
            got = list(self._grid.pull_messages(in_flight)) if in_flight else []
            answered = {m.metadata.reply_to_message_id for m in got}
            if not answered <= in_flight:  # else the window would wait for replies that came back unnamed
                raise RuntimeError(
                    f"grid: replies to message ids it was not asked about {sorted(answered - in_flight)[:3]}; "
                    "a reply must name the id push_messages returned (reply_to_message_id)"
                )
            in_flight -= answered
            yield from got
            if deadline is not None and time.time() >= deadline:
                break
            if not got and in_flight:
                time.sleep(getattr(self._grid, "pull_interval", 0.1))  # the grid's own pace (Flower's: 0.1 s)

    def __getattr__(self, name: str):
        return getattr(self._grid, name)
