"""Which SuperNode is which site: asked once, before the first round.

In a simulation each node names the site of its partition; in a deployment a hospital names
itself in its node config, and with ``site-nodes`` the operator's mapping of authenticated node
ids is the truth each answer must agree with. A node that does not answer, claims a site that is
not expected, or claims one twice stops the run before anything is trained.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence

from flwr.app import ConfigRecord, Message, MessageType, RecordDict
from flwr.serverapp import Grid


def discover_sites(
    grid: Grid,
    config: ConfigRecord,
    *,
    expected: Sequence[str],
    node_ids: Mapping[str, int] | None = None,
    timeout: float = 600.0,
) -> dict[int, str]:
    """Which node is which site: {node id: site}.

    With ``node_ids`` (a deployment's ``site-nodes``: ids the SuperLink gave registered keys) the
    mapping is the operator's, and each node's own answer must agree with it; other nodes are not
    asked and never selected. Without it each node is asked (a QUERY whose reply names the site
    only) and must name a distinct ``expected`` site. A node that does not answer within
    ``timeout`` stops the run: without its name the budget strategy could select nobody, and the
    run would train nothing while claiming to be finished."""
    wanted = set((node_ids or {}).values())
    deadline = time.time() + timeout

    def ready(nodes: list[int]) -> bool:
        return wanted <= set(nodes) if wanted else len(nodes) >= len(expected)

    while not ready(nodes := list(grid.get_node_ids())):
        if time.time() > deadline:
            waiting = f"node ids {sorted(wanted - set(nodes))}" if wanted else f"{len(expected)} SuperNodes"
            raise RuntimeError(f"only {len(nodes)} SuperNodes connected within {timeout:.0f}s, waiting for {waiting}")
        time.sleep(0.5)
    if wanted:
        ignored = sorted(set(nodes) - wanted)
        if ignored:
            print(f"node(s) {ignored} are connected but not in site-nodes: not asked, never selected", flush=True)
        nodes = sorted(wanted)
    messages = [Message(RecordDict({"config": config}), dst_node_id=n, message_type=MessageType.QUERY) for n in nodes]
    sites: dict[int, str] = {}
    for reply in grid.send_and_receive(messages, timeout=timeout):
        node = reply.metadata.src_node_id
        if reply.has_error():
            raise RuntimeError(f"node {node} failed to say which site it is: {reply.error.reason}")
        sites[node] = str(reply.content["site"]["site"])
    silent = sorted(set(nodes) - set(sites))
    if silent:
        raise RuntimeError(
            f"node(s) {silent} did not say which site they are within {timeout:.0f}s "
            f"({len(sites)} of {len(nodes)} answered); the run cannot select them"
        )
    if node_ids:
        site_of = {node: site for site, node in node_ids.items()}
        wrong = [
            f"node {n} is registered as {site_of[n]!r} but says it is {s!r}"
            for n, s in sites.items()
            if s != site_of[n]
        ]
        if wrong:
            raise RuntimeError("site-nodes: " + "; ".join(wrong))
        return {n: site_of[n] for n in sites}
    claimed = sorted(sites.values())
    strangers = sorted(set(claimed) - set(expected))
    if strangers:
        raise RuntimeError(f"node(s) claim sites {strangers} that are not expected (sites: {sorted(expected)})")
    if len(set(claimed)) != len(claimed):
        twice = sorted({c for c in claimed if claimed.count(c) > 1})
        raise RuntimeError(f"two nodes claim the same site {twice}; each site must run exactly one SuperNode")
    return sites
