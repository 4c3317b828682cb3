"""What a site sends and what it refuses: every reply of the real ClientApp inspected."""

import pandas as pd
import pytest
import torch
from flwr.app import Context, Message, MessageType, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from fedclip.models.arrays import model_to_arrays
from fedclip.models.factory import ModelConfig, create_model
from fedclip.privacy.events import events_from_wire
from fedclip.privacy.ledger_store import LedgerStore
from fedclip.privacy.policy import PolicyRefusal
from simulations.hospital_clip import client_app
from simulations.hospital_clip.config import SimulationConfig
from simulations.hospital_clip.server_app import train_config_record

EVENT_FIELDS = {"noise_multiplier", "sample_rate", "steps", "privacy_unit", "relation", "sensitivity"}


@pytest.fixture(autouse=True)
def task_identity():
    TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 1, 1, 0


def _strings(value):
    if isinstance(value, str):
        yield value
    elif isinstance(value, (list, tuple)):
        for v in value:
            yield from _strings(v)


def _secrets(manifest_path) -> set[str]:
    frame = pd.read_csv(manifest_path, dtype=str, keep_default_na=False)
    words = set(frame["patient_id"]) | set(frame["filepath"]) | set(frame["title"])
    words |= {part for name in frame["name"] for part in name.split()} | set(frame["name"])
    return {w for w in words if w}


def _setup(tmp_path, manifest, checkpoint, **overrides):
    cfg = SimulationConfig(
        num_sites=3,
        local_steps=2,
        target_epsilon=0.0,
        trainable="last-1",
        output_dir=str(tmp_path / "run"),
        **overrides,
    )
    config = train_config_record(
        cfg,
        noise_multiplier=1.0 if cfg.dp_mode != "nonprivate" else 0.0,
        manifest=str(manifest),
        checkpoint=str(checkpoint),
    )
    config["server-round"] = 1
    model = create_model(ModelConfig(pretrained=str(checkpoint), trainable="last-1")).model
    return cfg, config, model


def _context(partition: int) -> Context:
    return Context(
        run_id=1, node_id=partition + 1, node_config={"partition-id": partition}, state=RecordDict(), run_config={}
    )


def _train_message(model, config, partition: int) -> Message:
    return Message(
        RecordDict({"arrays": model_to_arrays(model, trainable_only=True), "config": config}),
        dst_node_id=partition + 1,
        message_type=MessageType.TRAIN,
    )


@pytest.mark.parametrize("dp_mode", ["microbatch", "unit", "nonprivate"])
def test_a_reply_carries_the_update_the_events_and_a_declared_weight_only(
    tmp_path, small_manifest_path, warm_checkpoint, dp_mode
):
    _, config, model = _setup(tmp_path, small_manifest_path, warm_checkpoint, dp_mode=dp_mode)
    secrets = _secrets(small_manifest_path)
    for partition in range(3):
        context = _context(partition)
        query = Message(RecordDict({"config": config}), dst_node_id=partition + 1, message_type=MessageType.QUERY)
        replies = [client_app(query, context), client_app(_train_message(model, config, partition), context)]
        assert not any(r.has_error() for r in replies), [r.error for r in replies if r.has_error()]
        site_reply, train_reply = (r.content for r in replies)
        assert set(site_reply.keys()) == {"site"} and dict(site_reply["site"]) == {"site": f"hospital_{partition}"}
        assert set(train_reply.keys()) == {"arrays", "metrics", "privacy"}
        trainable = {n for n, p in model.named_parameters() if p.requires_grad}
        assert set(train_reply["arrays"].keys()) == trainable
        # no count, no loss: nothing computed from the data outside the accounted update
        assert dict(train_reply["metrics"]) == {"site-weight": 1.0}
        (event,) = events_from_wire(train_reply["privacy"]["events"])
        assert set(event.to_dict()) == EVENT_FIELDS and event.steps == 2
        for record in (site_reply["site"], train_reply["metrics"], train_reply["privacy"]):
            for value in record.values():
                for text in _strings(value):
                    assert text not in secrets and not any(s in text for s in secrets if len(s) > 3), text


def _update(reply: Message) -> torch.Tensor:
    arrays = reply.content["arrays"].to_torch_state_dict()
    return torch.cat([v.reshape(-1) for _, v in sorted(arrays.items())])


def test_the_same_train_message_twice_gives_different_updates(tmp_path, small_manifest_path, warm_checkpoint):
    """The noise and sampling are not a function of anything the server sends."""
    _, config, model = _setup(tmp_path, small_manifest_path, warm_checkpoint)
    context = _context(0)
    first = client_app(_train_message(model, config, 0), context)
    second = client_app(_train_message(model, config, 0), context)
    assert not torch.equal(_update(first), _update(second))
    # reproducible-noise (experiments only) repeats bit for bit
    _, seeded, _ = _setup(tmp_path / "r", small_manifest_path, warm_checkpoint, reproducible_noise=True)
    again = [_update(client_app(_train_message(model, seeded, 0), _context(0))) for _ in range(2)]
    assert torch.equal(again[0], again[1])


def test_released_loss_and_count_are_noised_and_charged(tmp_path, small_manifest_path, warm_checkpoint):
    cfg, config, model = _setup(
        tmp_path, small_manifest_path, warm_checkpoint, release_loss_noise=2.0, release_count_noise=3.0
    )
    reply = client_app(_train_message(model, config, 1), _context(1)).content
    assert set(reply["metrics"].keys()) == {"site-weight", "train-loss", "num-units"}
    train_event, loss_event, count_event = events_from_wire(reply["privacy"]["events"])
    assert (loss_event.noise_multiplier, count_event.noise_multiplier) == (2.0, 3.0)
    assert loss_event.sample_rate == 1.0 and loss_event.steps == 1
    ledger = LedgerStore(tmp_path / "run" / "sites" / "hospital_1" / "ledger.sqlite", delta=cfg.delta)
    assert ledger.events("hospital_1") == (train_event, loss_event, count_event)


def _policy_file(tmp_path, text: str):
    path = tmp_path / "policies.toml"
    path.write_text(text)
    return str(path)


@pytest.mark.parametrize(
    ("dp_mode", "policy", "rule"),
    [
        ("nonprivate", '[hospital_0]\nallowed-dp-modes = ["microbatch"]\n', "allowed-dp-modes"),
        ("microbatch", "[default]\nmin-noise-multiplier = 2.0\n", "min-noise-multiplier"),
        ("microbatch", "[hospital_0]\nmax-epsilon-total = 0.01\n", "max-epsilon-total"),
    ],
)
def test_a_site_refuses_a_round_its_policy_forbids_and_spends_nothing(
    tmp_path, small_manifest_path, warm_checkpoint, dp_mode, policy, rule
):
    _, config, model = _setup(
        tmp_path, small_manifest_path, warm_checkpoint, dp_mode=dp_mode, site_policy_file=_policy_file(tmp_path, policy)
    )
    with pytest.raises(PolicyRefusal, match=f"site policy refuses the round at hospital_0: {rule}"):
        client_app(_train_message(model, config, 0), _context(0))
    ledger = tmp_path / "run" / "sites" / "hospital_0" / "ledger.sqlite"
    assert not ledger.exists() or LedgerStore(ledger, delta=1e-5).events("hospital_0") == ()


def test_a_site_enforces_its_total_budget_across_rounds(tmp_path, small_manifest_path, warm_checkpoint):
    policy = _policy_file(tmp_path, "[default]\nmax-epsilon-total = 1e9\n[hospital_2]\nmax-epsilon-total = 2.0\n")
    _, config, model = _setup(
        tmp_path, small_manifest_path, warm_checkpoint, site_policy_file=policy, noise_multiplier=1.0
    )
    # about 1.35 for one round, 2.0 for two: the third is refused (6 micro-batches sampled at q = 0.5)
    config.update({"noise-multiplier": 4.0, "sample-rate": 0.5, "microbatch-size": 5})
    trained = 0
    with pytest.raises(PolicyRefusal, match="max-epsilon-total"):
        for round_ in range(1, 50):
            config["server-round"] = round_
            client_app(_train_message(model, config, 2), _context(2))
            trained += 1
    ledger = LedgerStore(tmp_path / "run" / "sites" / "hospital_2" / "ledger.sqlite", delta=1e-5)
    assert trained == 2 and len(ledger.events("hospital_2")) == trained
    assert ledger.ledger("hospital_2").epsilon() <= 2.0
    spending = (tmp_path / "run" / "sites" / "hospital_2" / "spending.md").read_text()
    assert "policy refused (1; nothing charged)" in spending and "| 3 | max-epsilon-total |" in spending


def test_a_deployed_site_refuses_reproducible_noise_and_needs_its_own_paths(
    tmp_path, small_manifest_path, warm_checkpoint
):
    _, config, model = _setup(tmp_path, small_manifest_path, warm_checkpoint, reproducible_noise=True)
    node = {
        "site": "hospital_0",
        "manifest": str(small_manifest_path),
        "checkpoint": str(warm_checkpoint),
        "state-dir": str(tmp_path / "node0"),
    }
    deployed = Context(run_id=1, node_id=1, node_config=node, state=RecordDict(), run_config={})
    with pytest.raises(PolicyRefusal, match="reproducible-noise"):
        client_app(_train_message(model, config, 0), deployed)
    bare = Context(run_id=1, node_id=1, node_config={}, state=RecordDict(), run_config={})
    with pytest.raises(ValueError, match="neither 'site'.*nor 'partition-id'"):
        client_app(_train_message(model, config, 0), bare)  # no silent fallback to partition 0
    partial = Context(run_id=1, node_id=1, node_config={"site": "hospital_0"}, state=RecordDict(), run_config={})
    with pytest.raises(ValueError, match=r"missing \['manifest', 'checkpoint', 'state-dir'\]"):
        client_app(_train_message(model, config, 0), partial)


def test_each_site_divides_by_its_own_declared_size(tmp_path, small_manifest_path, warm_checkpoint):
    from simulations.hospital_clip.plan import RoundPlan
    from simulations.hospital_clip.site import site_identity

    _, config, _ = _setup(tmp_path, small_manifest_path, warm_checkpoint)
    config["declared-units-map"] = "hospital_0=17,hospital_1=9,hospital_2=8"
    me = site_identity(_context(0), config)
    assert me.declared_units == 17
    assert RoundPlan.from_record(config, hash_key="k", declared_units=me.declared_units).dp.declared_units == 17
    node = {
        "site": "hospital_0",
        "manifest": str(small_manifest_path),
        "checkpoint": str(warm_checkpoint),
        "state-dir": str(tmp_path / "n"),
        "declared-units": 40,
    }
    deployed = site_identity(Context(run_id=1, node_id=1, node_config=node, state=RecordDict(), run_config={}), config)
    assert deployed.declared_units == 40  # a deployed site declares its own size; the server's map does not apply


def test_a_site_that_spent_at_record_level_refuses_an_identity_level_round(
    tmp_path, small_manifest_path, warm_checkpoint
):
    """The identity-level cap would otherwise start at zero for patients already spent on."""
    policy = _policy_file(tmp_path, "[default]\nmax-epsilon-total = 1e9\n")
    _, config, model = _setup(
        tmp_path, small_manifest_path, warm_checkpoint, site_policy_file=policy, privacy_unit="record"
    )
    reply = client_app(_train_message(model, config, 0), _context(0))
    assert not reply.has_error()
    config["privacy-unit"], config["server-round"] = "identity", 2
    with pytest.raises(PolicyRefusal, match="hospital_0: privacy-unit: the ledger holds record-level spending"):
        client_app(_train_message(model, config, 0), _context(0))
    ledger = LedgerStore(tmp_path / "run" / "sites" / "hospital_0" / "ledger.sqlite", delta=1e-5)
    assert {str(e.privacy_unit) for e in ledger.events("hospital_0")} == {"record"}


def test_max_epsilon_run_holds_across_a_resume_that_gets_a_new_flower_run_id(
    tmp_path, small_manifest_path, warm_checkpoint
):
    policy = _policy_file(tmp_path, "[hospital_1]\nmax-epsilon-run = 1.5\n")
    _, config, model = _setup(tmp_path, small_manifest_path, warm_checkpoint, site_policy_file=policy)
    config.update({"noise-multiplier": 4.0, "sample-rate": 0.5, "microbatch-size": 5, "run-name": "study-1"})
    message = _train_message(model, config, 1)
    assert not client_app(message, _context(1)).has_error()  # about 1.35
    config["server-round"] = 2
    TaskIdentity.run_id = 99  # a resumed run: Flower's new run id, the server's same run name
    resumed = _train_message(model, config, 1)
    assert resumed.metadata.run_id == 99
    with pytest.raises(PolicyRefusal, match="max-epsilon-run"):
        client_app(resumed, _context(1))
    ledger = LedgerStore(tmp_path / "run" / "sites" / "hospital_1" / "ledger.sqlite", delta=1e-5)
    assert [r["run"] for r in ledger.rows()] == ["study-1"]


def _numbers(text: str) -> set[str]:
    import re

    return set(re.findall(r"\d+(?:\.\d+)?", text))


def test_an_input_refusal_names_the_rule_not_the_largest_patient(tmp_path, small_manifest_path, warm_checkpoint):
    """Each small-preset patient has 6 training images; the plan states its epsilon for 2."""
    from fedclip.privatize.plan import InputPlan

    cfg = SimulationConfig(
        num_sites=3, local_steps=1, dp_mode="maskdp", target_epsilon=4.0, output_dir=str(tmp_path / "run")
    )
    plan = InputPlan.calibrated("maskdp", target_epsilon=4.0, delta=1e-5, images_per_unit=2, radius=0.0, image_size=32)
    config = train_config_record(
        cfg, noise_multiplier=0.0, manifest=str(small_manifest_path), checkpoint=str(warm_checkpoint), input_plan=plan
    )
    config["server-round"] = 1
    model = create_model(ModelConfig(pretrained=str(warm_checkpoint), trainable="last-1")).model
    with pytest.raises(
        PolicyRefusal, match="hospital_0: input-images-per-unit: a patient at this site has more"
    ) as info:
        client_app(_train_message(model, config, 0), _context(0))
    sent = str(info.value)
    assert "6" not in _numbers(sent), sent  # the count is data
    assert _numbers(sent) <= _numbers(" ".join(str(v) for v in config.values()) + " 0"), sent  # plan values only
    kept = (tmp_path / "run" / "sites" / "hospital_0" / "errors.log").read_text()
    assert "the largest patient here has 6 training images" in kept


def test_any_other_failure_at_a_site_sends_the_phase_and_an_id_only(tmp_path, small_manifest_path, warm_checkpoint):
    """A broken image: the exception names its file and row; the server is told the row (the
    manifest line and column, to fix it) and not the file."""
    import re
    import shutil

    data = tmp_path / "data"
    shutil.copytree(small_manifest_path.parent, data)
    frame = pd.read_csv(data / small_manifest_path.name, dtype=str, keep_default_na=False)
    rows = frame[(frame["site"] == "hospital_1") & (frame["split"] == "train")]
    broken, line = rows["filepath"].iloc[3], int(rows.index[3]) + 2  # the header is line 1
    (data / broken).write_bytes(b"not an image")
    _, config, model = _setup(tmp_path, small_manifest_path, warm_checkpoint)
    node = {
        "site": "hospital_1",
        "manifest": str(data / small_manifest_path.name),
        "checkpoint": str(warm_checkpoint),
        "state-dir": str(tmp_path / "run" / "sites" / "hospital_1"),
    }  # a hospital reads its own files
    hospital = Context(run_id=1, node_id=2, node_config=node, state=RecordDict(), run_config={})
    with pytest.raises(Exception) as info:
        client_app(_train_message(model, config, 1), hospital)
    sent = str(info.value)
    assert re.fullmatch(
        r"hospital_1 failed while handling a train message \(ManifestError, error ([0-9a-f]{8})\) at "
        rf"manifest line {line}, column 'filepath': unreadable image; "
        r"the detail is in its state folder's errors\.log at the site, never sent",
        sent,
    ), sent
    assert not any(secret in sent for secret in _secrets(data / small_manifest_path.name) if len(secret) > 3)
    error_id = re.search(r"error ([0-9a-f]{8})", sent).group(1)
    kept = (tmp_path / "run" / "sites" / "hospital_1" / "errors.log").read_text()
    assert f"error {error_id}" in kept and broken in kept
    ledger = LedgerStore(tmp_path / "run" / "sites" / "hospital_1" / "ledger.sqlite", delta=1e-5)
    assert [r["status"] for r in ledger.rows()] == ["failed"]  # charged before the data was read, kept


def test_a_misspelt_policy_key_in_a_hospitals_node_config_is_refused_by_name(
    tmp_path, small_manifest_path, warm_checkpoint
):
    """``max-epsilon=8.0 min-noise=2.0`` would otherwise give no cap and no floor, silently."""
    from simulations.hospital_clip.site import NODE_KEYS
    from simulations.hospital_clip.site_errors import SiteConfigError
    from simulations.hospital_clip.site_worker import WORKER_KEY

    assert WORKER_KEY in NODE_KEYS
    _, config, model = _setup(tmp_path, small_manifest_path, warm_checkpoint)
    node = {
        "site": "hospital_0",
        "manifest": str(small_manifest_path),
        "checkpoint": str(warm_checkpoint),
        "state-dir": str(tmp_path / "node0"),
        "max-epsilon": 8.0,
        "min-noise": 2.0,
    }
    hospital = Context(run_id=1, node_id=1, node_config=node, state=RecordDict(), run_config={})
    query = Message(RecordDict({"config": config}), dst_node_id=1, message_type=MessageType.QUERY)
    for message in (query, _train_message(model, config, 0)):
        with pytest.raises(
            SiteConfigError,
            match=r"unknown key\(s\) 'max-epsilon' \(did you mean 'max-epsilon-r"
            r"un'\?\), 'min-noise' \(did you mean 'min-noise-multiplier'\?\)",
        ):
            client_app(message, hospital)
    assert not (tmp_path / "node0" / "ledger.sqlite").exists()  # refused before anything was charged
