"""The C allocator's tuning for a process that moves payloads in megabyte buffers.

A chunk of a payload is about 1 MiB (4 MiB in the object store), and an upload or a restore makes a few such buffers
for each chunk (the bytes received, their ciphertext, the rows the database driver encodes or decodes). glibc's
malloc gives an allocation of 128 KiB or more a mapping of its own, returned to the system when it is freed, but it
raises that threshold to the size of each mapped buffer it frees (up to 32 MiB), and the heap's trim threshold to
twice that. From then on the buffers come from the heap, whose freed space the process keeps and fragments.

Over bench/upload.py's sequence (1, 10 and 100 MiB uploads and restores, two each), the worker's peak RSS grew by
12.0, 15.7 and 14.3 MiB as glibc allocates by default; 11.7, 12.3 and 11.8 MiB with both thresholds fixed by
`mallopt` when the worker starts its app; 9.3, 10.9 and 9.4 MiB with `MALLOC_MMAP_THRESHOLD_=131072` in the
environment, which holds from the interpreter's first allocation (the image sets it, see the Dockerfile). `mallopt`
covers a worker however it was started; a C library without it (musl, macOS) is left as it is.
"""

from __future__ import annotations

import ctypes
import logging

__all__ = ("MMAP_THRESHOLD", "map_large_buffers")

logger = logging.getLogger("zkeb.memory")

#: glibc's `mallopt` parameters (malloc.h).
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
#: glibc's own default for both: allocations from this size get a mapping of their own, freed back to the system,
#: and free space past this much at the top of the heap is given back too.
MMAP_THRESHOLD = 128 * 1024


def map_large_buffers() -> bool:
    """Fix glibc's mmap and trim thresholds at `MMAP_THRESHOLD` (see the module); False where the C library cannot."""
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    mallopt.restype = ctypes.c_int
    if mallopt(_M_TRIM_THRESHOLD, MMAP_THRESHOLD) != 1 or mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD) != 1:
        logger.debug("the C library refused a malloc threshold; large buffers stay as it allocates them")
        return False
    return True
