"""Who a SuperNode is, and what it holds: its site, data, base weights, policy and ledger.

A *deployed* SuperNode declares its site in its node config, with its own manifest, base
checkpoint and state folder; it never takes a path or a policy from the server. A *simulated*
SuperNode (Flower gives it only ``partition-id``) plays the site of that partition, reads the
shared manifest the server names, keeps its ledger under the run folder's ``sites/``, and reads
its policy from ``site-policy-file`` if the run names one: in a simulation one person plays
every party.
"""

from __future__ import annotations

import difflib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from flwr.app import Context

from fedclip.privacy.ledger_store import LedgerStore
from fedclip.privacy.policy import DEPLOYED_DEFAULT, POLICY_KEYS, SitePolicy, load_policy_file
from simulations.hospital_clip.plan import RoundPlan, SharedFiles, SiteData, parse_site_numbers
from simulations.hospital_clip.site_errors import SiteConfigError
from simulations.hospital_clip.task import site_for_partition

DEPLOYED_KEYS = ("site", "manifest", "checkpoint", "state-dir")


@dataclass(frozen=True)
class SiteIdentity:
    site: str
    manifest: str
    checkpoint: str
    state_dir: Path
    weight: float
    deployed: bool
    outside_paths: bool = False
    declared_units: int | None = None  # the site's own public size, if it declares one

    @property
    def cache_dir(self) -> Path | None:
        """Where a deployed site keeps its preprocessed data between processes (None: simulated,
        whose Ray actors live across rounds and cache in memory)."""
        return self.state_dir / "cache" if self.deployed else None


# every key a deployed hospital's node config may hold; a misspelt policy key would otherwise be
# ignored and leave the hospital without the floor or cap it meant to set
NODE_KEYS = (*DEPLOYED_KEYS, "site-weight", "declared-units", "allow-outside-paths", "site-worker", *POLICY_KEYS)


def check_node_keys(node: Mapping[str, Any]) -> None:
    """Refuse a deployed node config with a key fedclip does not know, naming it and the nearest known key."""
    unknown = sorted(set(node) - set(NODE_KEYS))
    if unknown:
        hints = [
            f"{k!r} (did you mean {close[0]!r}?)"
            if (close := difflib.get_close_matches(k, NODE_KEYS, n=1))
            else repr(k)
            for k in unknown
        ]
        raise SiteConfigError(f"node config: unknown key(s) {', '.join(hints)}; known keys: {list(NODE_KEYS)}")


def site_identity(context: Context, record: Mapping[str, Any]) -> SiteIdentity:
    """Which site this node is, and where its files are: from its node config (a deployed
    hospital), or from the plan's shared files and its partition id (a simulated site)."""
    node = context.node_config
    if "site" in node:
        check_node_keys(node)
        missing = [k for k in DEPLOYED_KEYS if k not in node]
        if missing:
            raise SiteConfigError(f"node config: a deployed site needs {list(DEPLOYED_KEYS)}; missing {missing}")
        weight = float(node.get("site-weight", 1.0))
        if not weight > 0:
            raise SiteConfigError(f"node config: site-weight: expected > 0, got {weight}")
        return SiteIdentity(
            site=str(node["site"]),
            manifest=str(node["manifest"]),
            checkpoint=str(node["checkpoint"]),
            state_dir=Path(str(node["state-dir"])),
            weight=weight,
            deployed=True,
            outside_paths=str(node.get("allow-outside-paths", "false")).lower() == "true",
            declared_units=int(node["declared-units"]) if "declared-units" in node else None,
        )
    if "partition-id" not in node:
        # a deployed SuperNode started without --node-config used to play partition 0 with the
        # server's manifest: it claimed another hospital's name and trained on data it does not hold
        raise SiteConfigError(
            f"node config: this SuperNode has neither 'site' (a deployed hospital, which also needs "
            f"{list(DEPLOYED_KEYS[1:])}) nor 'partition-id' (set by Flower's simulation runtime); start "
            f"it with --node-config \"site='hospital_a' manifest='...' checkpoint='...' state-dir='...'\""
        )
    files = SharedFiles.from_record(record)
    if files is None:
        raise SiteConfigError(
            "node config: this run is a deployment (run config 'sites'), whose server sends no data "
            "paths; start this SuperNode as a hospital with --node-config \"site='...' manifest='...' "
            "checkpoint='...' state-dir='...'\""
        )
    data = SiteData.from_record(record)
    site = site_for_partition(
        files.manifest,
        data.num_sites,
        int(record["seed"]),
        int(node["partition-id"]),
        data.pool_sites,
        data.allow_outside_paths,
    )
    declared = parse_site_numbers(files.declared_units_map, key="declared-units-map").get(site)
    return SiteIdentity(
        site=site,
        manifest=files.manifest,
        checkpoint=files.checkpoint,
        state_dir=Path(files.site_state_root) / site,
        weight=1.0,
        deployed=False,
        outside_paths=data.allow_outside_paths,
        declared_units=declared,
    )


def deployed_policy(context: Context) -> SitePolicy:
    """A hospital's own rules: its node config's policy keys over ``DEPLOYED_DEFAULT``."""
    return SitePolicy.from_mapping(context.node_config, source="node config", defaults=DEPLOYED_DEFAULT)


def site_policy(context: Context, plan: RoundPlan, me: SiteIdentity) -> SitePolicy:
    if me.deployed:
        return deployed_policy(context)
    path = plan.files.site_policy_file if plan.files is not None else ""
    if not path:
        return SitePolicy.simulated(plan.dp.delta)
    policies = load_policy_file(path, delta=plan.dp.delta)
    return policies.get(me.site, policies["*"])


def site_ledger(plan: RoundPlan, me: SiteIdentity, *, delta: float) -> LedgerStore:
    return LedgerStore(me.state_dir / "ledger.sqlite", delta=delta, accountant=plan.dp.accountant)
