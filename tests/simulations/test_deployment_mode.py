"""Deployment mode, piece by piece: declared sites, a server without member rows, no server path
sent to a site, a hospital's own manifest and its on-disk cache, and the site's own spending.
The real processes are in ``tests/deployment``."""

import pandas as pd
import pytest
import torch
from flwr.app import Context, Message, MessageType, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from fedclip.models.arrays import model_to_arrays
from fedclip.models.factory import ModelConfig, create_model
from fedclip.privacy.ledger_store import LedgerStore
from simulations.hospital_clip import client_app, task  # client_app: the ClientApp object
from simulations.hospital_clip.config import SimulationConfig
from simulations.hospital_clip.preflight import preflight
from simulations.hospital_clip.server_app import SERVER_PATHS, train_config_record
from simulations.hospital_clip.site import site_identity


@pytest.fixture(autouse=True)
def task_identity():
    TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 1, 1, 0


@pytest.fixture
def roles(tmp_path, small_manifest_path):
    """The consortium's split of the generated data, written beside its images."""
    frame = pd.read_csv(small_manifest_path, keep_default_na=False)
    out = {"all": small_manifest_path}
    parts = {
        "server": frame[frame["split"].isin(["public", "heldout"])],
        "hospital_0": frame[(frame["split"] == "train") & (frame["site"] == "hospital_0")].assign(site=""),
    }
    for role, rows in parts.items():
        out[role] = small_manifest_path.with_name(f"{role}_{tmp_path.name}.csv")
        rows.to_csv(out[role], index=False)
    return out


def _deployment(roles, **overrides) -> SimulationConfig:
    return SimulationConfig(
        manifest=str(roles["server"]), sites="hospital_0,hospital_1", declared_units=6, target_epsilon=0.0, **overrides
    )


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"sites": "3"}, "sites: expected the sites' names"),
        ({"sites": "a,b,a"}, "sites: a name appears twice"),
        ({"sites": "a,b"}, "manifest: a deployment"),
        ({"site-nodes": "a=1"}, "site-nodes: only meaningful in a deployment"),
        ({"audit-manifest": "/no/such.csv"}, "audit-manifest: file not found"),
    ],
)
def test_bad_deployment_config_names_the_key(values, message):
    with pytest.raises(ValueError, match=message):
        SimulationConfig.from_run_config(values)


def test_site_nodes_must_map_exactly_the_declared_sites(roles):
    with pytest.raises(ValueError, match=r"site-nodes: \['hospital_9'\] not among the declared sites"):
        _deployment(roles, site_nodes="hospital_0=1,hospital_9=2")
    with pytest.raises(ValueError, match=r"site-nodes: no node id for \['hospital_1'\]"):
        _deployment(roles, site_nodes="hospital_0=1")
    with pytest.raises(ValueError, match="site-nodes: one node id is mapped to two sites"):
        _deployment(roles, site_nodes="hospital_0=1,hospital_1=1")
    assert _deployment(roles, site_nodes="hospital_0=11,hospital_1=12").site_node_map() == {
        "hospital_0": 11,
        "hospital_1": 12,
    }


def test_a_deployment_server_with_member_rows_is_refused_naming_the_line(roles):
    shape = preflight(_deployment(roles))
    assert shape.units == {"hospital_0": 6, "hospital_1": 6}
    cfg = SimulationConfig(
        manifest=str(roles["all"]), sites="hospital_0,hospital_1", declared_units=6, target_epsilon=0.0
    )
    first = pd.read_csv(roles["all"], keep_default_na=False)["split"].isin(["train", "query"]).idxmax() + 2
    with pytest.raises(ValueError, match=rf"member rows \(split 'train' or 'query', first on line {first}\)"):
        preflight(cfg)


def test_a_deployed_site_is_sent_no_server_path(roles, tmp_path):
    cfg = _deployment(roles, output_dir=str(tmp_path / "server_run"), cache_dir=str(tmp_path / "server_cache"))
    record = train_config_record(cfg, noise_multiplier=1.0, manifest=str(roles["server"]), checkpoint="/srv/base.pt")
    assert not set(record) & {*SERVER_PATHS, "checkpoint", "site-state-root"}
    values = " ".join(str(v) for v in record.values())
    for secret in (str(tmp_path), str(roles["server"]), "/srv/base.pt"):
        assert secret not in values
    # a simulated site, by contrast, is told where the shared data is
    sim = train_config_record(SimulationConfig(), noise_multiplier=1.0, manifest="/m.csv", checkpoint="/c.pt")
    assert sim["manifest"] == "/m.csv" and sim["checkpoint"] == "/c.pt"


def test_a_simulated_node_in_a_deployment_run_is_told_to_declare_its_site(roles):
    record = train_config_record(_deployment(roles), noise_multiplier=1.0, manifest="", checkpoint="")
    node = Context(run_id=1, node_id=1, node_config={"partition-id": 0}, state=RecordDict(), run_config={})
    with pytest.raises(ValueError, match="this run is a deployment .* server sends no data paths"):
        site_identity(node, record)


def test_a_hospital_trains_from_its_own_manifest_and_caches_it_on_disk(roles, warm_checkpoint, tmp_path, monkeypatch):
    """Its manifest has no site column (a hospital's export); the second fresh process reads the cache."""
    cfg = _deployment(roles, local_steps=2, trainable="last-1")
    config = train_config_record(cfg, noise_multiplier=1.0, manifest="", checkpoint="")
    config["server-round"] = 1
    state = tmp_path / "state"
    node = {
        "site": "hospital_0",
        "manifest": str(roles["hospital_0"]),
        "checkpoint": str(warm_checkpoint),
        "state-dir": str(state),
        "declared-units": 6,
    }
    model = create_model(ModelConfig(pretrained=str(warm_checkpoint), trainable="last-1")).model

    def train_once():
        msg = Message(
            RecordDict({"arrays": model_to_arrays(model, trainable_only=True), "config": config}),
            dst_node_id=1,
            message_type=MessageType.TRAIN,
        )
        context = Context(run_id=1, node_id=1, node_config=node, state=RecordDict(), run_config={})
        return client_app(msg, context)

    reply = train_once()
    assert not reply.has_error(), reply.error.reason if reply.has_error() else ""
    cached = list((state / "cache").glob("pairs-*.pt"))
    assert len(cached) == 1
    saved = torch.load(cached[0], weights_only=True)
    own = pd.read_csv(roles["hospital_0"], keep_default_na=False)
    assert len(saved["images"]) == len(own) and set(saved["patient_ids"]) == set(own["patient_id"])

    def no_decoding(*args, **kwargs):
        raise AssertionError("images decoded again although the cache holds them")

    monkeypatch.setattr("fedclip.data.pair_cache.load_pairs", no_decoding)
    config["server-round"] = 2
    assert not (reply := train_once()).has_error(), reply.error.reason if reply.has_error() else ""
    # the site's own account of its spending, from its own ledger
    spending = pd.read_csv(state / "spending.csv")
    assert list(spending["round"]) == [1, 2] and spending["epsilon_total"].is_monotonic_increasing
    store = LedgerStore(state / "ledger.sqlite", delta=cfg.delta, accountant=cfg.accountant, create=False)
    assert spending["epsilon_total"].iloc[-1] == pytest.approx(store.ledger("hospital_0").epsilon())
    store.close()
    assert "epsilon so far" in (state / "spending.md").read_text()


def test_a_changed_image_is_not_read_from_the_cache(roles, warm_checkpoint, tmp_path):
    kwargs = dict(arch="fedclip-tiny", checkpoint=str(warm_checkpoint), cache_dir=tmp_path / "cache")
    first = task.own_training_data(str(roles["hospital_0"]), "hospital_0", **kwargs)
    own = pd.read_csv(roles["hospital_0"], keep_default_na=False)
    image = roles["hospital_0"].parent / own["filepath"].iloc[0]
    original = image.read_bytes()
    try:
        from PIL import Image

        Image.new("RGB", (32, 32), (255, 0, 0)).save(image)
        second = task.own_training_data(str(roles["hospital_0"]), "hospital_0", **kwargs)
    finally:
        image.write_bytes(original)
    assert len(list((tmp_path / "cache").glob("pairs-*.pt"))) == 2
    assert not torch.equal(first.images[0], second.images[0]) and torch.equal(first.images[1:], second.images[1:])


def test_a_hospital_manifest_without_its_site_is_refused(roles, warm_checkpoint, tmp_path):
    with pytest.raises(ValueError, match=r"site: .* has no 'train' rows for site 'hospital_7'"):
        task.own_training_data(
            str(roles["all"]), "hospital_7", arch="fedclip-tiny", checkpoint=str(warm_checkpoint), cache_dir=tmp_path
        )
