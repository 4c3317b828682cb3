"""What a hospital does with each message: say which site it is, and train locally under its own policy.

Run by the ClientApp (``client_app.py``) in its own process, or by the site's long-lived worker
(``site_worker.py``) that the ClientApp hands messages to. A train round, top to bottom: parse the plan the server sent; check it against this site's
policy and its own durable ledger (refusing with the rule's name if it breaks one); charge the
ledger before touching data; train with noise and sampling from OS entropy; settle the ledger;
reply. The reply carries the trainable parameters, the privacy events, and the site's declared
public weight: nothing computed from the data outside an accounted mechanism. The training loss
and the unit count are released only when the run asks, noised and charged
(``fedclip.privacy.release``).
"""

from __future__ import annotations

import json
import math
import time

from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict

from fedclip.attacks.gradient_canaries import canaries_from_wire
from fedclip.data.tensors import PairData
from fedclip.models.arrays import load_arrays, model_to_arrays
from fedclip.privacy.events import events_to_wire
from fedclip.privacy.ledger_store import MixedUnits, Status
from fedclip.privacy.policy import PolicyRefusal
from fedclip.privacy.randomness import site_randomness
from fedclip.privacy.release import noisy_count, noisy_loss
from fedclip.reporting.run_files import RunFiles
from fedclip.reporting.spending import write_spending
from fedclip.training.distributed import contribution, flat_trainable, update_contribution
from fedclip.training.local import train_local
from fedclip.training.loss import clip_loss
from simulations.hospital_clip.input_privacy import kept_private_rows, privatize_site_rows
from simulations.hospital_clip.plan import RoundPlan
from simulations.hospital_clip.site import SiteIdentity, deployed_policy, site_identity, site_ledger, site_policy
from simulations.hospital_clip.site_errors import is_public, redacted
from simulations.hospital_clip.task import (
    fresh_model,
    own_training_data,
    pick_device,
    rows_training_data,
    site_public_data,
    site_training_data,
    site_training_rows,
)
from strategies.distributed import EVENTS_KEY, UNITS_KEY
from strategies.faults import crash_point
from strategies.privacy_budget import PRIVACY_RECORD
from strategies.secure_sum import REPORT, VECTOR


def query(msg: Message, context: Context) -> Message:
    """Name this site; a deployed one also prints its effective policy in its own log as the run starts."""
    me = site_identity(context, msg.content["config"])
    if me.deployed:
        print(deployed_policy(context).describe(site=me.site, given=context.node_config), flush=True)
    return Message(RecordDict({"site": ConfigRecord({"site": me.site})}), reply_to=msg)


def _check_and_charge(me: SiteIdentity, plan: RoundPlan, context: Context, *, events: tuple, run: str, round_: int):
    """Check the round against the site's policy and ledger, charge it; the ledger, the attempt and the
    events charged (dp-mode distributed: against the adversary the site's policy names)."""
    policy = site_policy(context, plan, me)
    if plan.secure is not None:
        events = plan.events(policy.distributed_adversary)
    ledger = site_ledger(plan, me, delta=policy.delta)
    try:  # the caps see everything this ledger holds; a second privacy unit is refused, not set apart
        try:
            ledger.check_unit(me.site, events)
        except MixedUnits as exc:
            raise PolicyRefusal(me.site, "privacy-unit", str(exc)) from None
        policy.check(
            site=me.site,
            mode=plan.mode,
            events=events,
            reproducible=plan.reproducible_noise,
            total=ledger.ledger(me.site),
            this_run=ledger.ledger(me.site, run=run),
        )
    except ValueError as exc:
        if isinstance(exc, PolicyRefusal):  # the site's own record of it: spending.md lists refusals
            RunFiles(me.state_dir).append(
                "site_refusals",
                [{"round": round_, "run": run, "at": time.time(), "rule": exc.rule, "reason": str(exc)}],
            )
            write_spending(ledger, me.state_dir)
        ledger.close()
        raise
    attempt = ledger.begin_round(round_)
    ledger.charge(me.site, round_, events, attempt=attempt, run=run)  # durable before any data is touched
    write_spending(ledger, me.state_dir)  # the site's own account holds the charge too, should it die before settling
    return ledger, attempt, events


def _close(ledger, me: SiteIdentity, round_: int, *, attempt: int, status: Status, **settled) -> None:
    """Settle this round's charge, write the site's own account of its spending (never sent), close."""
    ledger.settle(me.site, round_, attempt=attempt, status=status, **settled)
    write_spending(ledger, me.state_dir)
    ledger.close()


def _training_data(me: SiteIdentity, plan: RoundPlan, kept=None) -> PairData:
    data = plan.data
    if plan.input is not None:  # this site's privatized images: ``kept`` from an earlier round, else released now
        rows = kept
        if rows is None:
            rows = privatize_site_rows(
                site_training_rows(me.manifest, me.site, data.num_sites, plan.seed, data.pool_sites, me.outside_paths),
                site=me.site,
                plan=plan.input,
                unit=str(plan.dp.privacy_unit),
                state_dir=me.state_dir,
                manifest=me.manifest,
                outside_paths=me.outside_paths,
            )
        return rows_training_data(rows, arch=data.arch, checkpoint=me.checkpoint)
    if me.deployed:  # its own manifest, preprocessed once and kept in its state folder
        return own_training_data(
            me.manifest,
            me.site,
            arch=data.arch,
            checkpoint=me.checkpoint,
            cache_dir=me.cache_dir,
            outside_paths=me.outside_paths,
        )
    return site_training_data(
        me.manifest, me.site, data.num_sites, plan.seed, data.arch, me.checkpoint, data.pool_sites, me.outside_paths
    )


def run_name(plan: RoundPlan, msg: Message) -> str:
    """The run a charge belongs to (``max-epsilon-run``): the server's durable run name, which a
    resumed run keeps, else Flower's run id. A server can always name a new run, so only
    ``max-epsilon-total`` binds a dishonest one."""
    return plan.run_name or str(msg.metadata.run_id)


def train(msg: Message, context: Context) -> Message:
    started = time.time()
    config = msg.content["config"]
    me = site_identity(context, config)
    plan = RoundPlan.from_record(config, hash_key=f"fedclip:{me.site}", declared_units=me.declared_units)
    round_ = int(config["server-round"]) + plan.round_offset  # Flower's round, and the rounds before a resume
    # an input privatization is released once, in the round the site first trains (or again if its copy is lost)
    kept = kept_private_rows(me.state_dir, plan.input) if plan.input is not None else None
    releases = (
        () if plan.input is None or kept is not None else tuple(e for e in (plan.input_release(),) if e is not None)
    )
    ledger, attempt, charged = _check_and_charge(
        me, plan, context, events=plan.events() + releases, run=run_name(plan, msg), round_=round_
    )
    crash_point("site-charged", round_)
    if plan.secure is not None and plan.secure.level == "patient":
        return _contribute(msg, me, plan, ledger, attempt=attempt, round_=round_, started=started, charged=charged)
    try:
        data = _training_data(me, plan, kept)
        model = fresh_model(plan.data.arch, me.checkpoint, plan.data.trainable, pick_device())
        load_arrays(model, msg.content["arrays"])
        before = flat_trainable(model) if plan.secure is not None else None  # site level: the update is what is summed
        seed = plan.reproducible_seed(round_=round_, site=me.site)
        public = (
            site_public_data(me.manifest, plan.data.arch, me.checkpoint, me.outside_paths, me.cache_dir)
            if str(plan.dp.mode) == "unit"
            else None
        )
        canaries = canaries_from_wire(plan.gradient_canaries, me.site)  # the auditor's, if any
        training = time.time()
        result = train_local(
            model,
            data,
            dp=plan.dp,
            train=plan.train,
            reproducible_seed=seed,
            public=public,
            canaries=canaries,
            progress=f"{me.site} round {round_}",
        )
        train_seconds = time.time() - training
        metrics: dict[str, float] = {"site-weight": me.weight}  # declared before training: public
        release_gen = site_randomness(
            device=pick_device(), reproducible_seed=None if seed is None else seed + 7
        ).sampler
        if plan.release.loss_noise > 0:
            metrics["train-loss"] = noisy_loss(
                model,
                data,
                loss_fn=clip_loss,
                config=plan.release,
                privacy_unit=plan.dp.privacy_unit,
                num_blocks=plan.dp.num_blocks,
                key=plan.dp.hash_key,
                generator=release_gen,
            )
        if plan.release.count_noise > 0:
            metrics["num-units"] = noisy_count(
                data, config=plan.release, privacy_unit=plan.dp.privacy_unit, generator=release_gen
            )
    except Exception as exc:
        _close(ledger, me, round_, attempt=attempt, status=Status.FAILED, note=str(exc)[:500])
        raise
    crash_point("site-trained", round_)
    # on privatized inputs training is post-processing: the plan's event (no steps), not train_local's
    reported = (plan.events()[0] if plan.input is not None else result.event,) + plan.events()[1:] + releases
    _close(ledger, me, round_, attempt=attempt, status=Status.CONFIRMED, reported=reported)
    crash_point("site-settled", round_)
    RunFiles(me.state_dir).append(
        "site_timings", [{"round": round_, "handle_seconds": time.time() - started, "train_seconds": train_seconds}]
    )  # the site's own; never sent
    if plan.secure is not None:  # site-level distributed DP: the clipped update, with a noise share, to the secure sum
        vector = update_contribution(
            before,
            model,
            clip=plan.secure.clip,
            grid=plan.secure.grid(),
            share_variance=plan.secure.share_variance,
            reproducible_seed=None if seed is None else seed + 11,
        )
        report = {**metrics, EVENTS_KEY: json.dumps(events_to_wire(reported)), UNITS_KEY: float(plan.dp.declared_units)}
        return Message(
            RecordDict({VECTOR: ArrayRecord({"vector": Array(vector.numpy())}), REPORT: ConfigRecord(report)}),
            reply_to=msg,
        )
    content = RecordDict(
        {
            "arrays": model_to_arrays(model, trainable_only=True),
            "metrics": MetricRecord(metrics),
            PRIVACY_RECORD: ConfigRecord({"events": events_to_wire(reported)}),
        }
    )
    return Message(content, reply_to=msg)


def _contribute(
    msg: Message, me: SiteIdentity, plan: RoundPlan, ledger, *, attempt: int, round_: int, started: float, charged
):
    """dp-mode distributed: this site's part of one federated DP-SGD step, for the secure sum
    (``strategies.secure_sum``): its clipped sum on the grid plus its noise share, and a clear
    report of public numbers only (the plan's events, as the server charges them, and its declared
    size). Its own ledger was charged first, against the adversary its policy names (``charged``)."""
    try:
        data = _training_data(me, plan)
        model = fresh_model(plan.data.arch, me.checkpoint, plan.data.trainable, pick_device())
        load_arrays(model, msg.content["arrays"])
        vector = contribution(
            model,
            data,
            dp=plan.dp,
            train=plan.train,
            grid=plan.secure.grid(),
            share_variance=plan.secure.share_variance,
            reproducible_seed=plan.reproducible_seed(round_=round_, site=me.site),
        )
    except Exception as exc:
        _close(ledger, me, round_, attempt=attempt, status=Status.FAILED, note=str(exc)[:500])
        raise
    crash_point("site-trained", round_)
    _close(ledger, me, round_, attempt=attempt, status=Status.CONFIRMED, reported=charged)
    reported = plan.events()  # the server's figure (the server alone): what its ledger charges
    crash_point("site-settled", round_)
    RunFiles(me.state_dir).append(
        "site_timings", [{"round": round_, "handle_seconds": time.time() - started, "train_seconds": math.nan}]
    )
    report = {EVENTS_KEY: json.dumps(events_to_wire(reported)), UNITS_KEY: float(plan.dp.declared_units)}
    content = RecordDict({VECTOR: ArrayRecord({"vector": Array(vector.numpy())}), REPORT: ConfigRecord(report)})
    return Message(content, reply_to=msg)


HANDLERS = {"query": query, "train": train}


def handle(msg: Message, context: Context) -> Message:
    """The reply to ``msg``, by its message type (the ClientApp's decorators dispatch the same way).

    The site's boundary: what an exception says reaches the server, so anything but a policy
    refusal or a node-config error is sent as the phase and an error id only, its detail kept in
    the site's own errors.log (``site_errors``)."""
    kind = msg.metadata.message_type.split(".")[0]
    if kind not in HANDLERS:
        raise ValueError(f"message type: {msg.metadata.message_type!r}; a hospital answers {sorted(HANDLERS)}")
    try:
        return HANDLERS[kind](msg, context)
    except Exception as exc:
        if is_public(exc):
            raise
        try:
            me = site_identity(context, msg.content["config"])
            site, state_dir = me.site, me.state_dir
        except Exception:  # noqa: BLE001 - the site cannot even name itself: log in this process
            site, state_dir = "a site", None
        raise redacted(exc, site=site, phase=f"handling a {kind} message", state_dir=state_dir) from None
