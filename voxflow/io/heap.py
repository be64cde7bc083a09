"""How many C heaps the threads of a voxflow process share (glibc's malloc arenas).

glibc gives every thread that allocates a heap of its own, up to eight per core. A block's
buffers (MiBs, below glibc's adaptive mmap threshold) are freed into the heap of the thread
that finished with them, where another thread's next block cannot reuse them, so a process
that moves blocks through many threads (TensorStore's and Dask's) holds several blocks' worth
of free memory per thread, and its peak grows with the length of the run. Sharing a few heaps
keeps the peak that of the blocks in flight; allocation of MiB buffers is too rare for the
shared locks to cost time.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import os

__all__ = ["heap_arenas", "limit_heap_arenas"]

# glibc's mallopt parameter for the largest number of heaps; MALLOC_ARENA_MAX in the
# environment sets the same when a process starts.
_M_ARENA_MAX = -8


def heap_arenas(threads: int) -> int:
    """The C heaps a process with `threads` compute threads should keep: one per four, >= 2.

    Dask's worker processes get the same count in their environment (``MALLOC_ARENA_MAX``,
    set by ``voxflow.runtime``).
    """
    return max(2, threads // 4)


@functools.cache
def limit_heap_arenas(count: int) -> bool:
    """Let this process's threads share at most `count` C heaps (glibc's ``M_ARENA_MAX``).

    glibc keeps the heaps it has made and fixes its limit when the ninth is made, so this
    acts fully only before the threads of a process start allocating: voxflow calls it when
    it makes its TensorStore context, which every read and write of an image goes through
    before any block is computed. The first call wins; later calls return its result. A
    ``MALLOC_ARENA_MAX`` in the environment, which glibc read when the process started,
    stays in force.

    Returns
    -------
    bool
        Whether the limit was set (glibc only; other C libraries return False, as does a
        process whose environment sets the limit).
    """
    if "MALLOC_ARENA_MAX" in os.environ:
        return False
    try:
        mallopt = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").mallopt
    except (OSError, AttributeError):  # not glibc
        return False
    return mallopt(_M_ARENA_MAX, int(count)) == 1
