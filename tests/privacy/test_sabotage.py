"""The sabotage switch of the auditor's self-test: inert unless set, loud when set."""

import pytest

from fedclip.privacy.sabotage import VARIABLE, noise_divisor


def test_inert_unless_set_and_loud_when_set(monkeypatch, capsys):
    monkeypatch.delenv(VARIABLE, raising=False)
    assert noise_divisor() == 1.0 and capsys.readouterr().err == ""
    monkeypatch.setenv(VARIABLE, "10")
    assert noise_divisor() == 10.0
    assert "SABOTAGE" in capsys.readouterr().err
    for bad in ("0.5", "ten"):
        monkeypatch.setenv(VARIABLE, bad)
        with pytest.raises(ValueError, match=VARIABLE):
            noise_divisor()
