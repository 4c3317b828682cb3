"""WindowedGrid against a stand-in grid that replies to a message a few pulls after it was pushed
(a unit test of the window alone; the end-to-end simulations run it against Flower's engine)."""

from types import SimpleNamespace

import pytest

from strategies.windowed_grid import WindowedGrid


class _SlowGrid:
    """Replies to each pushed message on the ``delay``-th pull after its push; records pushes."""

    def __init__(self, delay: int = 2, refuse: frozenset = frozenset()) -> None:
        self.delay, self.refuse = delay, refuse
        self.pushed: list[str] = []
        self.age: dict[str, int] = {}
        self.most_in_flight = 0
        self.pull_interval = 0.0

    def push_messages(self, messages):
        ids = []
        for m in messages:
            self.pushed.append(m)
            if m not in self.refuse:  # a message the link does not store gets no id (Flower's behaviour)
                self.age[m] = 0
                ids.append(m)
        self.most_in_flight = max(self.most_in_flight, len(self.age))
        return ids

    def pull_messages(self, ids):
        out = []
        for i in ids:
            self.age[i] += 1
            if self.age[i] >= self.delay:
                out.append(SimpleNamespace(metadata=SimpleNamespace(reply_to_message_id=i), content=f"reply {i}"))
        for r in out:
            del self.age[r.metadata.reply_to_message_id]
        return out

    def get_node_ids(self):
        return [1, 2, 3]


def test_at_most_window_messages_are_in_flight_and_every_reply_comes_back():
    inner = _SlowGrid(delay=3)
    grid = WindowedGrid(inner, window=4)
    replies = list(grid.send_and_receive([f"m{i}" for i in range(25)], timeout=None))
    assert sorted(r.metadata.reply_to_message_id for r in replies) == sorted(f"m{i}" for i in range(25))
    assert inner.most_in_flight == 4
    assert inner.pushed == [f"m{i}" for i in range(25)], "sent once each, in the given order"
    assert grid.get_node_ids() == [1, 2, 3], "everything else is the grid's"


def test_a_timeout_leaves_unsent_messages_unsent_and_returns_what_came_back():
    inner = _SlowGrid(delay=10**9)  # never replies
    inner.pull_interval = 0.01
    grid = WindowedGrid(inner, window=2)
    assert list(grid.send_and_receive([f"m{i}" for i in range(10)], timeout=0.05)) == []
    assert inner.pushed == ["m0", "m1"], "only the first window was sent; the rest never left"


def test_a_message_the_link_refuses_does_not_stall_the_window():
    inner = _SlowGrid(delay=1, refuse=frozenset({"m1"}))
    replies = list(WindowedGrid(inner, window=2).send_and_receive(["m0", "m1", "m2"], timeout=None))
    assert sorted(r.metadata.reply_to_message_id for r in replies) == ["m0", "m2"]


def test_window_zero_is_flowers_own_send_and_receive_and_a_negative_window_is_refused():
    calls = []
    inner = SimpleNamespace(send_and_receive=lambda messages, timeout: calls.append((list(messages), timeout)) or ["r"])
    assert WindowedGrid(inner, window=0).send_and_receive(["a", "b"], timeout=5.0) == ["r"]
    assert calls == [(["a", "b"], 5.0)]
    with pytest.raises(ValueError, match="messages-in-flight"):
        WindowedGrid(inner, window=-1)


def test_a_reply_naming_no_message_in_flight_is_an_error_not_a_hang():
    class _Unnamed(_SlowGrid):
        def pull_messages(self, ids):
            return [SimpleNamespace(metadata=SimpleNamespace(reply_to_message_id=""), content="?") for _ in ids]

    with pytest.raises(RuntimeError, match="reply_to_message_id"):
        list(WindowedGrid(_Unnamed(), window=2).send_and_receive(["m0"], timeout=None))


def test_replies_are_yielded_as_they_arrive_and_nothing_is_sent_before_the_first_is_asked_for():
    inner = _SlowGrid(delay=1)
    replies = WindowedGrid(inner, window=2).send_and_receive([f"m{i}" for i in range(6)], timeout=None)
    assert inner.pushed == [], "lazy: the round is sent as its replies are read"
    first = next(iter(replies))
    assert first.metadata.reply_to_message_id in {"m0", "m1"}, "a reply to the first window"
    assert len(inner.pushed) < 6, "the first reply is handed over before the whole round has been sent"


def test_a_round_with_nothing_to_send_returns_an_empty_list():
    """Flower's strategies test ``if not replies``: a lazy iterator would read as replies to log."""
    assert WindowedGrid(_SlowGrid(), window=2).send_and_receive([], timeout=None) == []
