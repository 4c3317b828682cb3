import os
import subprocess
import sys
import time

from benchmarks.many_sites import _cpu_by_name, _rss_mib, _tree_sample


def test_process_tree_memory_counts_children():
    alone, _, _ = _tree_sample(os.getpid())
    child = subprocess.Popen([sys.executable, "-c", "import time; x = bytearray(200 * 2**20); time.sleep(5)"])
    try:
        for _ in range(50):  # until the child has touched its 200 MiB
            total, by_name, _ = _tree_sample(os.getpid())
            if total > alone + 150:
                break
            time.sleep(0.1)
        assert total > alone + 150, (alone, total, by_name)
    finally:
        child.kill()


def test_process_tree_cpu_time_counts_a_busy_child_by_name():
    """A child that spins for a second shows about a second of CPU under its own name, kept after
    it exits (the last sample of every process seen counts)."""
    child = subprocess.Popen(
        [sys.executable, "-c", "import time\nt = time.process_time()\nwhile time.process_time() - t < 1.0: pass"]
    )
    seen: dict = {}
    while child.poll() is None:
        seen.update(_tree_sample(os.getpid())[2])
        time.sleep(0.05)
    cpu = _cpu_by_name({pid: v for pid, v in seen.items() if pid == child.pid})
    assert len(cpu) == 1 and 0.5 <= next(iter(cpu.values())) <= 2.0, cpu


def test_one_process_memory_and_zero_once_it_is_gone():
    child = subprocess.Popen([sys.executable, "-c", "import time; x = bytearray(100 * 2**20); time.sleep(5)"])
    try:
        for _ in range(50):
            if _rss_mib(child.pid) > 90:
                break
            time.sleep(0.1)
        assert _rss_mib(child.pid) > 90
    finally:
        child.kill()
        child.wait()
    assert _rss_mib(child.pid) == 0.0
