"""glibc keeps freed memory after ``retain_freed_memory`` (page faults counted, not timed)."""

import os
import subprocess
import sys

import pytest

from fedclip.training import allocator

# Allocates and frees step-sized buffers (1-24 MiB) and prints the page faults one cycle costs
# once warm (in the quietest of five windows); run in a fresh process so the C library starts from its defaults.
_PROBE = """
import resource, sys
import torch
from fedclip.training.allocator import retain_freed_memory
print(retain_freed_memory())
def cycle():
    buffers = [torch.zeros(n) for n in (2**18, 2**21, 2**22, 6 * 2**20, 2**20)]
    del buffers
for _ in range(3):
    cycle()
windows = []
for _ in range(5):  # the kernel may reclaim idle pages at any time (a fault then): the quietest window
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(10):
        cycle()
    windows.append((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 10)
print(min(windows))
"""


def _probe(choice: str) -> tuple[str, float]:
    done = subprocess.run(
        [sys.executable, "-c", _PROBE],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, allocator.ENV: choice},
    )
    assert done.returncode == 0, done.stderr[-2000:]
    applied, faults = done.stdout.split()
    return applied, float(faults)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="mallopt is glibc's (Linux)")
def test_retained_memory_is_reused_without_faulting_pages_in():
    applied, faults = _probe("retain")
    assert applied == "True"
    assert faults < 2, f"{faults} page faults per cycle after retain_freed_memory"
    applied, _ = _probe("system")
    assert applied == "False"  # the opt-out leaves the C library alone


def test_unknown_choice_is_refused_naming_the_variable(monkeypatch):
    monkeypatch.setenv(allocator.ENV, "jemalloc")
    with pytest.raises(ValueError, match="FEDCLIP_MALLOC: expected one of"):
        allocator.allocator_choice()
