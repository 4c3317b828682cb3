"""The console's filters: known third-party noise silenced by its exact text, nothing else (a real
run's console is checked in ``tests/simulations/test_end_to_end.py``)."""

import logging
import warnings

from fedclip.console import quiet_known_noise


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
