"""Sum the sites' integer vectors over Flower's SecAgg+: the server learns the sum, no site's vector.

Both halves of one protocol: ``secure_sum`` drives Flower's own ``SecAggPlusWorkflow`` from a
Message-API ServerApp, and ``secure_sum_mod`` is the ClientApp mod that runs Flower's
``secaggplus_mod`` for those messages and lets every other message through. No cryptography here:
key agreement, secret sharing, masks and their removal are Flower's.

**Exact integers through Flower's quantizer.** SecAgg+ quantizes floats: it clips to
[-c, c], maps to [0, T) by (x + c) T / (2c) with stochastic rounding, weights by
``num_examples / max_weight`` and sums modulo 2**32. A site hands it its vector already reduced
to [0, 2**bits) and shifted by -c, with c = 2**(bits-1), T = 2**bits, weight 1 and max weight 1:
then every step is exact (x + c is an integer below 2**31, so the rounding is the identity and
nothing is clipped), the modulo-2**32 sum of S sites is the plain integer sum as long as
S * 2**bits < 2**32 (``max_bits``; Flower also sums the sites' weights, S * 2**bits, which must not
wrap to 0), and the server reduces the decoded sum modulo 2**bits.
So the server sees the sites' vectors summed modulo 2**bits, and each masked vector alone is
uniform modulo 2**32 to it (``tests/strategies/test_secure_sum.py`` tests both).

**What the server still sees in clear**: which sites answered each stage, and each site's
``report`` (the small ConfigRecord returned beside the vector: FitRes metrics, not masked). A site
must put nothing data-dependent there outside an accounted mechanism.

**Whom it trusts**: fewer than ``threshold`` sites colluding with an honest-but-curious server
(Bonawitz et al. 2017; Bell et al. 2020). By default ``secure_sum`` shares keys among all sites
(SecAgg's complete graph), where the threshold alone decides; ``neighbours`` gives each site
SecAgg+'s random ring of that many (Flower's server shuffles the sites and draws it: the guarantee
holds with high probability against a server that follows the protocol, not one that picks the
graph). The complete graph's cost grows with the square of the sites: Flower's Shamir sharing in
Python took 0.45 s per secret at 64 sites with threshold 64 (``benchmarks/secure_round.py``). Flower derives each mask from a 32-bit seed of numpy's Mersenne Twister
(``pseudo_rand_gen``): a limit of Flower's implementation, said in docs/privacy.md.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.app.message_type import MessageType
from flwr.client.mod import secaggplus_mod
from flwr.common import Code, FitIns, FitRes, Status, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, RECORD_KEY_STATE
from flwr.compat.common import recorddict_compat as compat
from flwr.server.client_manager import SimpleClientManager
from flwr.server.compat.grid_client_proxy import GridClientProxy
from flwr.server.compat.legacy_context import LegacyContext
from flwr.server.strategy import Strategy as LegacyStrategy
from flwr.server.workflow import SecAggPlusWorkflow
from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD, MAIN_PARAMS_RECORD
from flwr.server.workflow.constant import Key as WorkflowKey
from flwr.server.workflow.secure_aggregation.secaggplus_workflow import WorkflowState
from flwr.serverapp import Grid

MODULUS_BITS = 32  # Flower's SecAgg+ sums modulo 2**32 at most
VECTOR = "secure-sum"  # the ArrayRecord a site's handler returns its vector in (one array, "vector")
REPORT = "report"  # the ConfigRecord beside it: sent in clear
ARRAY_NAMES = "secure-sum-array-names"  # the instructions' array names, in the legacy config they travel in
STAGES = ("setup", "share-keys", "collect-masked-vectors", "unmask")


class SecureSumFailed(RuntimeError):
    """The sum could not be formed; the message names the stage and how many sites were left."""

    def __init__(
        self, message: str, *, stage: str, in_sum: tuple[int, ...] = (), errors: Mapping[int, str] | None = None
    ) -> None:
        super().__init__(message)
        self.stage, self.in_sum, self.errors = stage, in_sum, dict(errors or {})


@dataclass(frozen=True)
class SecureSumResult:
    """The decoded sum (int64, centred in [-2**(bits-1), 2**(bits-1))), the node ids whose vectors
    are in it (a site that dropped after sending its masked vector counts: its mask was recovered),
    and each of those sites' clear report."""

    total: np.ndarray
    in_sum: tuple[int, ...]
    reports: Mapping[int, dict] = field(default_factory=dict)
    errors: Mapping[int, str] = field(default_factory=dict)  # node id -> the error a site answered with


def max_bits(num_sites: int) -> int:
    """The widest sum Flower's SecAgg+ carries exactly for ``num_sites`` sites (module docstring)."""
    if num_sites < 2:
        raise ValueError(f"num_sites: a secure sum needs at least 2 sites, got {num_sites}")
    return int(math.floor(math.log2((2**MODULUS_BITS - 1) / num_sites)))  # num_sites * 2**bits < 2**32


def check_secure_sum(*, num_sites: int, bits: int, threshold: int, neighbours: int = 0) -> None:
    """The refusals a plan meets before anything runs, each naming its key."""
    if neighbours and (
        int(neighbours) != neighbours or neighbours < 3 or neighbours % 2 == 0 or neighbours > num_sites
    ):
        raise ValueError(
            f"secure-agg-neighbours: expected 0 (every site) or an odd number in [3, {num_sites}] (each site "
            f"shares its keys with that many sites, itself included), got {neighbours}"
        )
    if neighbours and threshold >= neighbours:
        raise ValueError(
            f"secure-agg-threshold: expected fewer than secure-agg-neighbours ({neighbours}): a site's masks are "
            f"recovered from the shares of that many neighbours, got {threshold}"
        )
    widest = max_bits(num_sites)
    if int(bits) != bits or not 2 <= bits <= widest:
        raise ValueError(
            f"secure-agg-bits: expected an integer in [2, {widest}] for {num_sites} sites "
            f"(Flower's SecAgg+ sums modulo 2**32, and {num_sites} sites * 2**bits must fit), got {bits}"
        )
    if int(threshold) != threshold or not 2 <= threshold <= num_sites:
        raise ValueError(
            f"secure-agg-threshold: expected an integer in [2, {num_sites}] (the sites that must stay for "
            f"the sum to be decoded; at most the number of sites), got {threshold}"
        )


class _ListingGrid:
    """The grid with ``send_and_receive`` returning a list: Flower's workflow reads a stage's
    replies twice, and a grid that yields them one by one (``strategies.windowed_grid``) would
    leave the second reading empty."""

    def __init__(self, grid: Grid) -> None:
        self._grid = grid
        self.errors: dict[int, str] = {}  # the first error each site answered with (a refusal names its rule)

    def send_and_receive(self, messages, *, timeout: float | None = None):  # noqa: ANN001
        replies = list(self._grid.send_and_receive(messages, timeout=timeout))
        for r in replies:
            if r.has_error():
                self.errors.setdefault(r.metadata.src_node_id, str(r.error.reason))
        return replies

    def __getattr__(self, name: str):
        return getattr(self._grid, name)


class _OneSum(LegacyStrategy):
    """The legacy strategy SecAggPlusWorkflow needs: it hands out the given instructions and keeps
    what the workflow decoded, nothing else."""

    def __init__(self, instructions: Mapping[int, FitIns], proxies: Mapping[int, GridClientProxy]) -> None:
        self._instructions, self._proxies = instructions, proxies
        self.results: list[tuple[GridClientProxy, FitRes]] | None = None

    def initialize_parameters(self, client_manager):  # noqa: ANN001
        return None

    def configure_fit(self, server_round, parameters, client_manager):  # noqa: ANN001
        return [(self._proxies[nid], ins) for nid, ins in self._instructions.items()]

    def aggregate_fit(self, server_round, results, failures):  # noqa: ANN001
        self.results = list(results)
        return None, {}

    def configure_evaluate(self, server_round, parameters, client_manager):  # noqa: ANN001
        return []

    def aggregate_evaluate(self, server_round, results, failures):  # noqa: ANN001
        return None, {}

    def evaluate(self, server_round, parameters):  # noqa: ANN001
        return None


def secure_sum(
    grid: Grid,
    *,
    instructions: Mapping[int, tuple[ArrayRecord, ConfigRecord]],
    bits: int,
    threshold: int,
    round_: int,
    neighbours: int = 0,
    timeout: float | None = None,
    before_unmask: Callable[[tuple[int, ...]], None] | None = None,
) -> SecureSumResult:
    """One secure sum over the nodes in ``instructions`` (node id -> the arrays and config its
    handler gets). Raises ``SecureSumFailed`` when fewer than ``threshold`` sites are left at a stage.
    ``before_unmask`` is told whose masked vectors the sum holds before the server can unmask it
    (write-ahead: a crash after that point must not lose the release)."""
    check_secure_sum(num_sites=len(instructions), bits=bits, threshold=threshold, neighbours=neighbours)
    grid = _ListingGrid(grid)
    run_id = 0
    proxies = {nid: GridClientProxy(nid, grid, run_id) for nid in instructions}
    fit_ins = {  # Flower's legacy instructions carry unnamed arrays: their names travel in the config
        nid: FitIns(
            compat.arrayrecord_to_parameters(arrays, keep_input=True), {**dict(config), ARRAY_NAMES: "\n".join(arrays)}
        )
        for nid, (arrays, config) in instructions.items()
    }
    strategy = _OneSum(fit_ins, proxies)
    manager = SimpleClientManager()
    for proxy in proxies.values():
        manager.register(proxy)
    state = RecordDict(
        {
            MAIN_CONFIGS_RECORD: ConfigRecord({WorkflowKey.CURRENT_ROUND: int(round_)}),
            MAIN_PARAMS_RECORD: ArrayRecord(),
        }
    )
    context = LegacyContext(
        Context(run_id=run_id, node_id=0, node_config={}, state=state, run_config={}),
        strategy=strategy,
        client_manager=manager,
    )
    workflow = SecAggPlusWorkflow(
        # every site a neighbour of every other (SecAgg's complete graph), or SecAgg+'s ring of
        # ``neighbours``: Shamir sharing costs grow with the shares times the threshold (module docstring)
        num_shares=int(neighbours) if neighbours and neighbours < len(instructions) else 1.0,
        reconstruction_threshold=int(threshold),
        max_weight=1.0,
        clipping_range=float(2 ** (bits - 1)),
        quantization_range=2**bits,
        modulus_range=2**MODULUS_BITS,
        timeout=timeout,
    )
    flow = WorkflowState()
    steps = (
        workflow.setup_stage,
        workflow.share_keys_stage,
        workflow.collect_masked_vectors_stage,
        workflow.unmask_stage,
    )
    for stage, step in zip(STAGES, steps, strict=True):
        if stage == "unmask" and before_unmask is not None:
            before_unmask(tuple(sorted(p.node_id for p, _ in flow.legacy_results)))
        if not step(grid, context, flow):
            raise SecureSumFailed(
                f"secure sum, round {round_}: stopped at the {stage} stage with {len(flow.active_node_ids)} of "
                f"{len(instructions)} sites left, below the reconstruction threshold {threshold}",
                stage=stage,
                in_sum=tuple(sorted(p.node_id for p, _ in flow.legacy_results)),
                errors=grid.errors,
            )
        if stage in ("setup", "share-keys"):
            # A site lost before it shared its keys has no mask in anyone's vector. Flower's workflow
            # still lists it as dead at the unmask stage and asks the others for key shares they never
            # got, which fails the whole sum; so only sites that shared their keys count from here.
            flow.sampled_node_ids = set(flow.active_node_ids)
    if strategy.results is None:  # pragma: no cover - the workflow always aggregates after a completed unmask
        raise SecureSumFailed(f"secure sum, round {round_}: no sum was decoded", stage="unmask")
    in_sum = tuple(sorted(proxy.node_id for proxy, _ in strategy.results))
    (mean,) = parameters_to_ndarrays(strategy.results[0][1].parameters)
    if not np.isfinite(mean).all():  # pragma: no cover - check_secure_sum keeps the weights from wrapping
        raise SecureSumFailed(f"secure sum, round {round_}: the decoded sum is not finite", stage="unmask")
    half = 1 << (bits - 1)
    # Flower returns the mean of what the sites handed it, each vector shifted by -half
    shifted_sum = np.rint(np.asarray(mean, dtype=np.float64) * len(in_sum)).astype(np.int64)
    total = np.mod(shifted_sum + len(in_sum) * half + half, 1 << bits) - half
    return SecureSumResult(
        total=total,
        in_sum=in_sum,
        reports={p.node_id: dict(r.metrics) for p, r in strategy.results},
        errors=grid.errors,
    )


def secure_sum_mod(msg: Message, context: Context, call_next: Callable[[Message, Context], Message]) -> Message:
    """ClientApp mod: Flower's ``secaggplus_mod`` for secure-sum messages; others pass through.

    In the stage that collects masked vectors the site's own train handler runs on a message
    holding the instructions (ArrayRecord "arrays", ConfigRecord "config"); it answers with its
    vector, already in [0, 2**bits), in ArrayRecord ``VECTOR`` and its clear ``REPORT``."""
    if msg.metadata.message_type != MessageType.TRAIN or RECORD_KEY_CONFIGS not in msg.content.config_records:
        return call_next(msg, context)
    return secaggplus_mod(msg, context, lambda m, c: _as_fit_reply(m, c, call_next))


def _as_fit_reply(msg: Message, context: Context, call_next: Callable[[Message, Context], Message]) -> Message:
    fitins = compat.recorddict_to_fitins(msg.content, keep_input=True)
    protocol = msg.content.config_records[RECORD_KEY_CONFIGS]
    config = dict(fitins.config)
    names = [n for n in str(config.pop(ARRAY_NAMES, "")).split("\n") if n]
    unnamed = compat.parameters_to_arrayrecord(fitins.parameters, keep_input=True) if names else ArrayRecord()
    if len(names) != len(unnamed):
        raise ValueError(f"secure sum: {len(unnamed)} arrays arrived with {len(names)} names")
    arrays = ArrayRecord({name: unnamed[key] for name, key in zip(names, unnamed, strict=True)})
    msg.content = RecordDict({"arrays": arrays, "config": ConfigRecord(config), RECORD_KEY_CONFIGS: protocol})
    reply = call_next(msg, context)
    if reply.has_error():
        raise RuntimeError(f"secure sum: the site's handler failed: {reply.error.reason}")
    if VECTOR not in reply.content.array_records:
        raise ValueError(f"secure sum: the site's handler returned no ArrayRecord {VECTOR!r}")
    vector = reply.content.array_records[VECTOR]["vector"].numpy().astype(np.int64).ravel()
    modulus = int(context.state.config_records[RECORD_KEY_STATE]["target_range"])
    if vector.size and (vector.min() < 0 or vector.max() >= modulus):
        raise ValueError(f"secure sum: the site's vector must lie in [0, {modulus}) (wrap it first)")
    report = dict(reply.content.config_records[REPORT]) if REPORT in reply.content.config_records else {}
    shifted = vector.astype(np.float64) - modulus // 2  # Flower adds c = modulus / 2 back, exactly
    fitres = FitRes(Status(Code.OK, ""), ndarrays_to_parameters([shifted]), 1, report)
    return Message(compat.fitres_to_recorddict(fitres, keep_input=True), reply_to=msg)
