"""The C allocator's tuning for a process that moves payloads in megabyte buffers.

A chunk of a payload is about 1 MiB (4 MiB in the object store), and an upload or a restore makes a few such buffers
for each chunk (the bytes received, their ciphertext, the rows the database driver encodes or decodes). glibc's
malloc gives an allocation of 128 KiB or more a mapping of its own, returned to the system when it is freed, but it
raises that threshold to the size of each mapped buffer it frees (up to 32 MiB). After the first chunk, the buffers
come from the heap instead, whose freed space the process keeps and fragments: the worker's peak RSS grew by 12.0,
14.3 and 15.7 MiB over a series of 100 MiB uploads and restores, against 9.3 and 10.9 MiB with the threshold fixed
(`MALLOC_MMAP_THRESHOLD_=131072`, bench/upload.py's runs). `mallopt` fixes it in the running worker, whatever started
it; a process whose C library has no `mallopt` (musl, macOS) is left as it is.
"""

from __future__ import annotations

import ctypes
import logging

__all__ = ("MMAP_THRESHOLD", "map_large_buffers")

logger = logging.getLogger("zkeb.memory")

#: glibc's `M_MMAP_THRESHOLD` parameter of `mallopt` (malloc.h).
_M_MMAP_THRESHOLD = -3
#: glibc's own default: allocations from this size get a mapping of their own, freed back to the system.
MMAP_THRESHOLD = 128 * 1024


def map_large_buffers() -> bool:
    """Fix glibc's mmap threshold at `MMAP_THRESHOLD` (see the module); False where the C library cannot."""
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    mallopt.restype = ctypes.c_int
    if mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD) != 1:
        logger.debug("the C library refused M_MMAP_THRESHOLD; large buffers stay as it allocates them")
        return False
    return True
