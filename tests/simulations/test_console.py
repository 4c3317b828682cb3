"""The console: every Flower log line once, and other libraries' warnings still shown."""

import subprocess
import sys

SCRIPT = """
import logging
import simulations.hospital_clip  # the app package, as Flower loads it
logging.warning("a library's own warning")  # through the root logger (implicit basicConfig)
from logging import INFO
from flwr.common.logger import log
log(INFO, "a flower line")
"""


def test_a_flower_log_line_is_printed_once_and_root_warnings_still_show():
    done = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    text = done.stdout + done.stderr
    assert text.count("a flower line") == 1, text
    assert text.count("a library's own warning") == 1, text
