"""Experiment tracking, read back with TensorBoard's and MLflow's own readers."""

import pytest
from mlflow.tracking import MlflowClient
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from fedclip.reporting.tracking import Tracker, numeric, parse_backends


def _tracker(tmp_path, *, resume=False, uri=None, backends=("tensorboard", "mlflow")):
    return Tracker(
        backends=backends,
        run_dir=tmp_path / "run",
        experiment="exp",
        run_name="a run",
        mlflow_uri=uri or f"sqlite:///{tmp_path / 'mlflow.db'}",
        resume=resume,
    )


def test_metrics_config_and_plots_reach_both_backends(tmp_path):
    from matplotlib import pyplot as plt

    plot = tmp_path / "utility.png"
    plt.plot([0, 1], [0.2, 0.5])
    plt.savefig(plot)
    plt.close()
    tracker = _tracker(tmp_path)
    tracker.log_config({"lr": 0.005, "trainable": "last-1"})
    for r in range(3):
        tracker.log_metrics(r, {"zero_shot_accuracy": 0.2 + r / 10, "epsilon/hospital_0": float(r), "skip": ""})
    tracker.log_images([plot, tmp_path / "missing.png"], step=2)
    tracker.close()

    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("exp").experiment_id])
    assert run.info.run_name == "a run" and run.info.status == "FINISHED"
    assert run.data.params == {"lr": "0.005", "trainable": "last-1"}
    assert [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, "epsilon/hospital_0")] == [
        (0, 0.0),
        (1, 1.0),
        (2, 2.0),
    ]
    assert "skip" not in run.data.metrics
    assert [a.path for a in client.list_artifacts(run.info.run_id, "plots")] == ["plots/utility.png"]

    events = EventAccumulator(str(tmp_path / "run" / "tensorboard"))
    events.Reload()
    assert [(e.step, round(e.value, 6)) for e in events.Scalars("zero_shot_accuracy")] == [(0, 0.2), (1, 0.3), (2, 0.4)]
    assert events.Tags()["images"] == ["plots/utility"] and "config" in str(events.Tags()["tensors"])


def test_a_resumed_run_continues_its_mlflow_run(tmp_path):
    first = _tracker(tmp_path)
    first.log_config({"lr": 0.005})
    first.log_metrics(1, {"zero_shot_accuracy": 0.3})
    first.close(status="KILLED")
    again = _tracker(tmp_path, resume=True)
    again.log_config({"lr": 0.005})  # logged once: MLflow refuses a second value, the tracker skips it
    again.log_metrics(2, {"zero_shot_accuracy": 0.4})
    again.close()
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("exp").experiment_id])
    assert [m.step for m in client.get_metric_history(run.info.run_id, "zero_shot_accuracy")] == [1, 2]


@pytest.mark.parametrize("raised,status", [(None, "FINISHED"), (ValueError, "FAILED"), (KeyboardInterrupt, "KILLED")])
def test_a_run_that_raises_is_not_left_running(tmp_path, raised, status):
    try:
        with _tracker(tmp_path) as tracker:
            tracker.log_metrics(1, {"zero_shot_accuracy": 0.3})
            if raised is not None:
                raise raised("the run stopped")
    except (ValueError, KeyboardInterrupt):
        pass
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("exp").experiment_id])
    assert run.info.status == status


def test_a_tracker_closed_inside_its_block_keeps_its_status(tmp_path):
    with _tracker(tmp_path) as tracker:
        tracker.close(status="FAILED")  # a site failed: the run reports, closes as failed, then returns
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("exp").experiment_id])
    assert run.info.status == "FAILED"


def test_a_failing_backend_is_reported_once_and_never_stops_the_run(tmp_path, capsys):
    (tmp_path / "blocked").write_text("a file where the store's folder should be")
    tracker = _tracker(tmp_path, uri=f"sqlite:///{tmp_path / 'blocked' / 'mlflow.db'}", backends=("mlflow",))
    tracker.log_metrics(1, {"zero_shot_accuracy": 0.3})
    tracker.close()
    assert capsys.readouterr().err.count("tracking (mlflow) failed") == 1


def test_backends_and_values_are_checked():
    assert parse_backends("tensorboard, mlflow") == ("tensorboard", "mlflow")
    assert parse_backends("none") == () == parse_backends("")
    with pytest.raises(ValueError, match="unknown backend"):
        parse_backends("wandb")
    assert numeric({"a": 1, "b": float("nan"), "c": "", "d": True, "e": 2.5}) == {"a": 1.0, "e": 2.5}


def test_plots_are_stored_beside_the_store_not_where_the_process_started(tmp_path, monkeypatch):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    plot = tmp_path / "utility.png"
    plot.write_bytes(b"\x89PNG not really")  # MLflow stores the file as it is
    tracker = _tracker(tmp_path, backends=("mlflow",))
    tracker.log_images([plot], step=1)
    tracker.close()
    assert not (elsewhere / "mlruns").exists()
    assert list((tmp_path / "mlartifacts").rglob("plots/utility.png"))
