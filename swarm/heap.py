"""Keep freed memory in the process, so that the buffers of every step do not fault their pages in anew."""

from __future__ import annotations

import ctypes
import logging

logger = logging.getLogger(__name__)

_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters (malloc.h)
MMAP_THRESHOLD = 32 * 2**20  # buffers up to a 512-token chunk of 4096-wide float32 rows (8 MiB), with room
TRIM_THRESHOLD = 128 * 2**20  # freed memory at the heap's top kept for the next buffers


def keep_freed_memory() -> None:
    """Serve the buffers of frames and tensors (up to MMAP_THRESHOLD) from the heap, and keep freed heap memory.

    By default glibc maps buffers over 128 KiB fresh from the kernel and returns them when freed, or trims the
    heap once 2x that threshold lies free at its top, so the megabyte-sized frames of a 64-session step fault
    their pages in again each time. In the Firecracker VMs seen here (the H200 host too) a fault costs ~3.3 µs
    a page: packing a 96-row push frame took 3-4 ms at times instead of 0.2-1.3 ms (on the H200 host's CPU,
    under load; .scratch microbenchmark). No-op where the C library has no mallopt."""
    mallopt = getattr(ctypes.CDLL(None), "mallopt", None)
    if mallopt is None:
        return
    if not (mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD) and mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD)):
        logger.debug("mallopt refused the heap thresholds")
