"""The in-process average of the leak benchmark (the runs themselves are measurements, not tests)."""

import torch

from benchmarks.idia_leak import average


def test_rows_are_averaged_over_the_models_that_trained_them_and_the_rest_as_fedavg():
    base = {"emb": torch.zeros(4, 2), "w": torch.zeros(3), "step": torch.tensor(7)}
    a = {"emb": torch.tensor([[4.0, 4], [2, 2], [0, 0], [0, 0]]), "w": torch.full((3,), 2.0), "step": torch.tensor(9)}
    b = {"emb": torch.tensor([[0.0, 0], [6, 6], [0, 0], [8, 8]]), "w": torch.full((3,), 4.0), "step": torch.tensor(9)}
    rows = {"emb": [torch.tensor([True, True, False, False]), torch.tensor([False, True, False, True])]}
    out = average(base, [a, b], rows=rows)
    assert torch.equal(out["emb"], torch.tensor([[4.0, 4], [4, 4], [0, 0], [8, 8]])), (
        "one site: its full update; both: the mean; none: base"
    )
    assert torch.equal(out["w"], torch.full((3,), 3.0)) and torch.equal(out["step"], torch.tensor(7))
    assert torch.equal(average(base, [a, b])["emb"], (a["emb"] + b["emb"]) / 2), "without rows: FedAvg"


def test_the_server_view_and_rows_by_site_need_several_sites(capsys):
    import pytest

    from benchmarks.idia_leak import main

    for flag in ("--replies", "--rows-by-site"):
        with pytest.raises(SystemExit) as stop:
            main(["--sites", "1", flag])
        assert stop.value.code == 2 and "--replies need --sites > 1" in capsys.readouterr().err
