"""Kill a hospital's site worker at each phase of its first CADP round and restart it: the release
is charged before the images are touched, a site that lost its privatized copy releases (and is
charged) again, and one that kept it never releases twice. Real processes, as in
``test_site_worker_crash``: the worker dies by ``os._exit`` at the phase."""

import sqlite3

import pytest
import torch
from flwr.app import Message
from flwr.supercore.task_identity import TaskIdentity

from fedclip.data.manifest import load_manifest
from fedclip.data.schema import Split
from fedclip.data.tensors import load_images
from fedclip.models.factory import ModelConfig, create_model
from fedclip.privacy.events import Relation
from fedclip.privacy.ledger_store import LedgerStore
from fedclip.privatize.inn import ConditionalInn, InnConfig, save_inn, train_inn
from fedclip.privatize.pixels import to_pixels
from fedclip.privatize.plan import InputPlan
from simulations.hospital_clip.config import SimulationConfig
from simulations.hospital_clip.server_app import train_config_record
from strategies.faults import CRASH_EXIT_CODE
from tests.faults.test_site_worker_crash import _worker, send_train

# the privatized copy is written before training: a crash before it loses the copy, after it keeps it
# (site-settled behaves as site-trained for the copy: covered for spending by test_site_worker_crash)
RELEASES_AFTER_RESTART = {"site-charged": 2, "site-trained": 1}


@pytest.fixture(autouse=True)
def task_identity():
    TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 1, 1, 0


@pytest.fixture(scope="module")
def inn_checkpoint(small_manifest_path, tmp_path_factory):
    frame = load_manifest(small_manifest_path).frame
    public = frame[frame["split"] == str(Split.PUBLIC)]
    inn = ConditionalInn(InnConfig(blocks_per_scale=1, width=16, dense_blocks=1, dense_width=64))
    train_inn(
        inn,
        load_images(public, preprocess=to_pixels(32)),
        inn.config.label_indices(public["condition"]),
        epochs=1,
        generator=torch.Generator().manual_seed(0),
    )
    return save_inn(inn, tmp_path_factory.mktemp("inn") / "inn.pt")


@pytest.mark.parametrize("phase", list(RELEASES_AFTER_RESTART))
def test_a_killed_worker_never_releases_uncharged(
    phase, small_manifest_path, warm_checkpoint, inn_checkpoint, tmp_path_factory
):
    root = tmp_path_factory.mktemp("release", numbered=True)
    sock, state = root / "w.sock", root / "state"
    cfg = SimulationConfig(
        manifest=str(small_manifest_path),
        dp_mode="cadp",
        target_epsilon=8.0,
        budget=8.0,
        input_images_per_unit=6,
        local_steps=2,
        trainable="last-1",
    )
    plan = InputPlan.calibrated(
        "cadp",
        target_epsilon=8.0,
        delta=cfg.delta,
        images_per_unit=6,
        radius=0.0,
        image_size=32,
        inn_checkpoint=str(inn_checkpoint),
    )
    config = train_config_record(cfg, noise_multiplier=0.0, manifest="", checkpoint="", input_plan=plan)
    config["num-sites"] = 3  # the small manifest's sites
    model = create_model(ModelConfig(pretrained=str(warm_checkpoint), trainable="last-1")).model
    node = {
        "site": "hospital_0",
        "manifest": str(small_manifest_path),
        "checkpoint": str(warm_checkpoint),
        "state-dir": str(state),
        "declared-units": 8,
        "site-worker": str(sock),
        "allowed-dp-modes": "cadp",
        "max-epsilon-run": "inf",  # crashes, not caps, are under test: the hospital lifts the default caps
        "max-epsilon-total": "inf",
    }  # a hospital must allow an input mode by name

    def train(round_: int) -> Message:
        return send_train(round_, config=config, model=model, node=node)

    killed = _worker(sock, root / "killed.log", crash=f"{phase}:1")
    with pytest.raises(RuntimeError, match="closed mid-message"):
        train(1)
    assert killed.wait(timeout=60) == CRASH_EXIT_CODE, (root / "killed.log").read_text()
    worker = _worker(sock, root / "restarted.log")
    try:
        retried, nxt = train(1), train(2)
    finally:
        worker.kill()
        worker.wait(timeout=60)
    assert not retried.has_error() and not nxt.has_error()
    store = LedgerStore(state / "ledger.sqlite", delta=cfg.delta, accountant=cfg.accountant, create=False)
    try:
        releases = [
            e for e in store.events("hospital_0") if e.relation == Relation.REPLACE_ONE and e.sample_rate == 1.0
        ]
        assert len(releases) == RELEASES_AFTER_RESTART[phase], releases
        assert all(e == plan.release_event("identity") for e in releases)
    finally:
        store.close()
    with sqlite3.connect(state / "ledger.sqlite") as db:
        rows = [r for (r,) in db.execute("SELECT round FROM charges ORDER BY rowid")]
    # one training event per attempt (two of round 1, the killed one kept) and each release, then round 2
    assert rows == [1] * (2 + RELEASES_AFTER_RESTART[phase]) + [2], rows
    assert (state / "privatized-cadp" / "rows.csv").is_file() and not (state / "privatized-cadp.partial").exists()
