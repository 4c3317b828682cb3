"""Keep freed memory in the process, so a DP step does not fault its buffers back in every time.

A DP step allocates and frees the same large buffers every step: per-sample (per-group)
gradients of the trainable parameters, Opacus' per-sample accumulators, the clipped sums. glibc
gives large freed blocks back to the operating system (blocks above its mmap threshold, and the
top of the heap above its trim threshold), so the next step's allocation of the same size faults
every page in again and the kernel zero-fills it. Measured on the 2-core CPU
(``python -m benchmarks.dp_step --allocators system,retain``, BENCHMARKS.md): this is up to a third
of a DP step with every parameter trainable, and a smaller share of a plain step, which allocates
less.

``retain_freed_memory()`` sets glibc's thresholds once per process: blocks up to 32 MiB (glibc's
upper limit for the mmap threshold) come from the heap, and the heap is not trimmed, so freed
memory is reused instead of returned (the heap's top is trimmed only beyond 2 GiB free). The cost is that a process's resident memory stays at its
peak, which a training loop reaching the same peak every step has anyway. It changes no number a
step computes. Off glibc it does nothing. ``FEDCLIP_MALLOC=system`` leaves the C library's
defaults (for a process that must give memory back between runs).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os

ENV = "FEDCLIP_MALLOC"
CHOICES = ("retain", "system")
# glibc's mallopt parameters (malloc.h) and the values set
M_TRIM_THRESHOLD, M_TOP_PAD, M_MMAP_THRESHOLD = -1, -2, -3
_MMAP_THRESHOLD = 32 * 2**20  # glibc's maximum on 64-bit (larger values are refused)
_TRIM_THRESHOLD = 2**31 - 1  # trim the heap's top only beyond 2 GiB free (the largest int mallopt takes)
_TOP_PAD = 64 * 2**20  # grow the heap in steps of 64 MiB

_applied: bool | None = None


def allocator_choice() -> str:
    """``FEDCLIP_MALLOC`` (default ``retain``), validated."""
    value = os.environ.get(ENV, "retain").strip().lower()
    if value not in CHOICES:
        raise ValueError(f"{ENV}: expected one of {list(CHOICES)}, got {value!r}")
    return value


def retain_freed_memory() -> bool:
    """Apply the setting once per process; True when glibc now keeps freed memory."""
    global _applied
    if _applied is None:
        _applied = allocator_choice() == "retain" and _mallopt_all()
    return _applied


def _mallopt_all() -> bool:
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError, TypeError):  # not glibc (macOS, musl without mallopt): nothing to do
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return all(
        mallopt(param, value) == 1
        for param, value in (
            (M_MMAP_THRESHOLD, _MMAP_THRESHOLD),
            (M_TRIM_THRESHOLD, _TRIM_THRESHOLD),
            (M_TOP_PAD, _TOP_PAD),
        )
    )
