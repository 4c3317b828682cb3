"""Who a SuperNode is, and what it holds: its site, data, base weights, policy and ledger.

A *deployed* SuperNode declares its site in its node config, with its own manifest, base
checkpoint and state folder; it never takes a path or a policy from the server. A *simulated*
SuperNode (Flower gives it only ``partition-id``) plays the site of that partition, reads the
shared manifest the server names, keeps its ledger under the run folder's ``sites/``, and reads
its policy from ``site-policy-file`` if the run names one: in a simulation one person plays
every party.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from flwr.app import ConfigRecord, Context

from fedclip.privacy.ledger_store import LedgerStore
from fedclip.privacy.policy import SitePolicy, load_policy_file
from simulations.hospital_clip.site_errors import SiteConfigError
from simulations.hospital_clip.plan import parse_site_numbers
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


def site_identity(context: Context, config: ConfigRecord) -> SiteIdentity:
    node = context.node_config
    if "site" in node:
        missing = [k for k in DEPLOYED_KEYS if k not in node]
        if missing:
            raise SiteConfigError(f"node config: a deployed site needs {list(DEPLOYED_KEYS)}; missing {missing}")
        weight = float(node.get("site-weight", 1.0))
        if not weight > 0:
            raise SiteConfigError(f"node config: site-weight: expected > 0, got {weight}")
        return SiteIdentity(site=str(node["site"]), manifest=str(node["manifest"]), checkpoint=str(node["checkpoint"]),
                            state_dir=Path(str(node["state-dir"])), weight=weight, deployed=True,
                            outside_paths=str(node.get("allow-outside-paths", "false")).lower() == "true",
                            declared_units=int(node["declared-units"]) if "declared-units" in node else None)
    if "partition-id" not in node:
        # a deployed SuperNode started without --node-config used to play partition 0 with the
        # server's manifest: it claimed another hospital's name and trained on data it does not hold
        raise SiteConfigError(f"node config: this SuperNode has neither 'site' (a deployed hospital, which also needs "
                         f"{list(DEPLOYED_KEYS[1:])}) nor 'partition-id' (set by Flower's simulation runtime); start "
                         f"it with --node-config \"site='hospital_a' manifest='...' checkpoint='...' state-dir='...'\"")
    if "manifest" not in config:
        raise SiteConfigError("node config: this run is a deployment (run config 'sites'), whose server sends no data "
                         "paths; start this SuperNode as a hospital with --node-config \"site='...' manifest='...' "
                         "checkpoint='...' state-dir='...'\"")
    manifest = str(config["manifest"])
    outside = bool(config["allow-outside-paths"])
    site = site_for_partition(manifest, int(config["num-sites"]), int(config["seed"]),
                              int(node["partition-id"]), bool(config["pool-sites"]), outside)
    declared = parse_site_numbers(str(config.get("declared-units-map", "")), key="declared-units-map").get(site)
    return SiteIdentity(site=site, manifest=manifest, checkpoint=str(config["checkpoint"]),
                        state_dir=Path(str(config["site-state-root"])) / site, weight=1.0, deployed=False,
                        outside_paths=outside, declared_units=declared)


def site_policy(context: Context, config: ConfigRecord, me: SiteIdentity) -> SitePolicy:
    if me.deployed:
        return SitePolicy.from_mapping(context.node_config, source="node config")
    delta = float(config["delta"])
    path = str(config.get("site-policy-file", ""))
    if not path:
        return SitePolicy.simulated(delta)
    policies = load_policy_file(path, delta=delta)
    return policies.get(me.site, policies["*"])


def site_ledger(context: Context, config: ConfigRecord, me: SiteIdentity, *, delta: float) -> LedgerStore:
    return LedgerStore(me.state_dir / "ledger.sqlite", delta=delta, accountant=str(config["accountant"]))
