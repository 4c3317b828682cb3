import os
import subprocess
import sys
import time

from benchmarks.many_sites import _tree_rss_mib


def test_process_tree_memory_counts_children():
    alone, _ = _tree_rss_mib(os.getpid())
    child = subprocess.Popen([sys.executable, "-c", "import time; x = bytearray(200 * 2**20); time.sleep(5)"])
    try:
        for _ in range(50):  # until the child has touched its 200 MiB
            total, by_name = _tree_rss_mib(os.getpid())
            if total > alone + 150:
                break
            time.sleep(0.1)
        assert total > alone + 150, (alone, total, by_name)
    finally:
        child.kill()
