"""glibc's mmap threshold stays fixed once the worker tunes it, so freed chunk buffers go back to the system."""

from __future__ import annotations

import platform
import subprocess
import sys

import pytest

pytestmark = pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt and mallinfo2 are glibc's")

# Run in a process of its own: the allocator's state is process-wide. Frees a mapped 8 MiB buffer (by default this
# raises glibc's threshold to 8 MiB), then prints how many mapped blocks the next 8 MiB buffer added: 1 when it got a
# mapping of its own (freed back to the system), 0 when it came from the heap. 8 MiB, not a chunk's 1 MiB: the heap
# left by importing zkeb may hold a free 1 MiB block, which malloc reuses before it maps anything.
_PROBE = """
import ctypes, sys
from zkeb.core.memory import map_large_buffers

class MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in (
        "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]

libc = ctypes.CDLL(None)
libc.mallinfo2.restype = MallInfo2
if sys.argv[1] == "tuned":
    assert map_large_buffers()
first = bytearray(8 << 20)
del first
mapped = libc.mallinfo2().hblks
second = bytearray(8 << 20)
print(libc.mallinfo2().hblks - mapped)
"""


def _mapped_blocks_added(mode: str) -> int:
    result = subprocess.run([sys.executable, "-c", _PROBE, mode], capture_output=True, text=True, check=True)
    return int(result.stdout)


def test_a_chunk_buffer_keeps_its_own_mapping_after_another_was_freed() -> None:
    assert _mapped_blocks_added("default") == 0  # glibc's own behaviour: what the tuning is for
    assert _mapped_blocks_added("tuned") == 1
