import ctypes.util
import os
import subprocess
import sys

import pytest

from voxflow.io import heap_arenas, limit_heap_arenas

glibc = pytest.mark.skipif(
    not sys.platform.startswith("linux") or ctypes.util.find_library("c") is None,
    reason="mallopt is glibc's",
)


# Counts the heaps of a process whose threads all allocate at once, optionally after
# limiting them; run in a fresh interpreter, since glibc fixes the limit early.
_COUNT_HEAPS = """
import ctypes, ctypes.util, re, sys, tempfile, threading
import numpy as np
import voxflow.io
if sys.argv[1] == "limit":
    assert voxflow.io.limit_heap_arenas(2) is True
if sys.argv[1] == "context":
    voxflow.io.tensorstore_context()
libc = ctypes.CDLL(ctypes.util.find_library("c"))
barrier, held = threading.Barrier(12), []
def work():
    barrier.wait()
    held.append(np.ones(200_000, np.uint8))  # below the mmap threshold: the thread's heap
    barrier.wait()
threads = [threading.Thread(target=work) for _ in range(12)]
[t.start() for t in threads]
[t.join() for t in threads]
libc.fopen.restype = ctypes.c_void_p
with tempfile.NamedTemporaryFile(suffix=".xml") as f:
    stream = ctypes.c_void_p(libc.fopen(f.name.encode(), b"w"))
    libc.malloc_info(0, stream)
    libc.fclose(stream)
    print(len(re.findall("<heap nr=", open(f.name).read())))
"""


@glibc
def test_limit_heap_arenas_makes_threads_share_heaps():
    # Without the variable a local cluster's start leaves in this process's environment.
    environ = {k: v for k, v in os.environ.items() if k != "MALLOC_ARENA_MAX"}

    def heaps(mode: str) -> int:
        done = subprocess.run([sys.executable, "-c", _COUNT_HEAPS, mode], capture_output=True,
                              text=True, check=True, env=environ)  # fmt: skip
        return int(done.stdout)

    assert heaps("none") > 4  # glibc's default: a heap per allocating thread
    assert heaps("limit") <= 2
    # TensorStore's context is made before its threads allocate: it limits them too.
    assert heaps("context") <= heap_arenas(2 * (os.cpu_count() or 1))


def test_limit_heap_arenas_leaves_the_environments_limit(monkeypatch):
    monkeypatch.setenv("MALLOC_ARENA_MAX", "8")
    assert limit_heap_arenas.__wrapped__(2) is False


def test_heap_arenas_is_one_per_four_threads_at_least_two():
    assert [heap_arenas(t) for t in (1, 4, 8, 9, 16, 33)] == [2, 2, 2, 2, 4, 8]
