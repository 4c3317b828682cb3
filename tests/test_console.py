"""The console: known third-party noise silenced by its exact text, every line once, a table at the end."""

import logging
import subprocess
import sys
import warnings

from fedclip.console import quiet_known_noise

SMALL = "simulations/hospital_clip/small.toml"
NOISE = ("There is a performance drop", "DEPRECATED FEATURE", "Optimal order is the largest alpha",
         "Tip: In future versions of Ray", "No pretrained weights loaded", "fraction_evaluate is set to 0.0")


def test_only_the_known_warnings_are_silenced(caplog):
    quiet_known_noise()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("default")
        quiet_known_noise()  # re-installs the filters inside this context
        warnings.warn("There is a performance drop because we have not yet implemented the batching rule for x")
        warnings.warn("a new warning from the same library")
    assert [str(w.message) for w in caught] == ["a new warning from the same library"]
    with caplog.at_level(logging.WARNING):
        logging.getLogger("flwr").warning("fraction_evaluate is set to 0.0. Federated evaluation will be skipped.")
        logging.getLogger("flwr").warning("a real Flower warning")
    assert [r.getMessage() for r in caplog.records] == ["a real Flower warning"]


def test_a_run_prints_each_line_once_without_known_noise_and_ends_with_a_table(tmp_path):
    done = subprocess.run([sys.executable, "-m", "simulations.cli", "--app", "simulations.hospital_clip", "--output",
                           str(tmp_path / "run"), "--run-config", f"{SMALL} cache-dir='{tmp_path / 'cache'}' num-rounds=1",
                           "--backend-config", '{"client_resources": {"num_cpus": 1, "num_gpus": 0.0}}'],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    for text in NOISE:
        assert text not in done.stdout + done.stderr, text
    lines = [line for line in done.stdout.splitlines() if line.strip()]
    assert len(lines) == len(set(lines)), [line for line in lines if lines.count(line) > 1]
    header = next(line for line in lines if "zero-shot" in line and "recall@1" in line and "max eps" in line)
    assert "idia AUC" in header and "lira-record AUC" in header
    assert lines.index(header) < lines.index(next(line for line in lines if line.startswith("done:")))
