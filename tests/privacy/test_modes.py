"""The mode names every layer shares, defined once below them."""

from fedclip.privacy.modes import DP_MODES, INPUT_MODES, TRAINING_MODES
from fedclip.training.config import Mode


def test_training_modes_are_the_trainers_modes_and_input_modes_follow():
    assert tuple(str(m) for m in Mode) == TRAINING_MODES
    assert DP_MODES == TRAINING_MODES + INPUT_MODES and not set(TRAINING_MODES) & set(INPUT_MODES)
