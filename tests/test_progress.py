import sys

import pytest

from fedclip import progress
from fedclip.progress import ENV, decide_progress, progress_bar, say


def test_no_bar_in_a_pipe_unless_asked(monkeypatch, capsys):
    monkeypatch.delenv(ENV, raising=False)
    monkeypatch.setattr(sys.stderr, "isatty", lambda: False, raising=False)
    bar = progress_bar(total=3, desc="hospital_a round 1")
    bar.update(3)
    bar.close()
    assert bar.n == 3 and capsys.readouterr().err == ""
    assert decide_progress() is False
    import os

    assert os.environ[ENV] == "0"  # children (Ray's actors) follow the decision


def test_a_bar_when_asked(monkeypatch, capsys):
    monkeypatch.setenv(ENV, "1")
    bar = progress_bar(total=4, desc="hospital_a round 1", leave=True)
    for _ in range(4):
        bar.update(1)
    bar.close()
    err = capsys.readouterr().err
    assert "hospital_a round 1" in err and "4/4" in err
    say("round 1/2 | zero-shot 0.5")
    assert "round 1/2 | zero-shot 0.5" in capsys.readouterr().out


def test_off_even_on_a_terminal_and_bad_values_named(monkeypatch):
    monkeypatch.setattr(progress.sys.stderr, "isatty", lambda: True, raising=False)
    monkeypatch.setenv(ENV, "0")
    assert decide_progress() is False
    monkeypatch.setenv(ENV, "")
    assert decide_progress() is True
    monkeypatch.setenv(ENV, "yes")
    with pytest.raises(ValueError, match="FEDCLIP_PROGRESS: expected 0, 1 or unset, got 'yes'"):
        decide_progress()
