import ctypes.util
import os
import subprocess
import sys
import threading

import dask.array as da
import numpy as np
import pytest

import voxflow.tasks._compute as compute


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096


glibc = pytest.mark.skipif(
    not sys.platform.startswith("linux") or ctypes.util.find_library("c") is None,
    reason="malloc_trim is glibc's",
)


@glibc
def test_release_free_memory_returns_a_threads_freed_heap_to_the_system():
    held: list = []

    def fill() -> None:
        # 100 kB arrays come from the thread's heap, not from mmap; the last one stays
        # allocated, so the free space below it is not trimmed on its own.
        arrays = [np.ones(100_000, np.uint8) for _ in range(2000)]
        held.append(arrays.pop())
        del arrays

    worker = threading.Thread(target=fill)
    worker.start()
    worker.join()
    before = _rss_bytes()
    assert compute.release_free_memory() is True
    after = _rss_bytes()
    assert before - after > 100e6, (before, after)
    assert held[0].sum() == 100_000


def test_local_computes_release_free_memory_once(monkeypatch):
    calls = []
    monkeypatch.setattr(compute, "release_free_memory", lambda: calls.append(1) or True)
    arr = da.arange(100, chunks=10)
    writes = [arr.map_blocks(lambda b: np.array([b.sum()]), chunks=(1,))]
    assert compute.compute_blocks(writes) == 10
    assert calls == [1]
    np.testing.assert_array_equal(compute.compute_array(arr * 2), np.arange(100) * 2)
    assert calls == [1, 1]


# Counts the heaps of a process whose threads all allocate at once, optionally after
# limiting them; run in a fresh interpreter, since glibc fixes the limit early.
_COUNT_HEAPS = """
import ctypes, ctypes.util, re, sys, tempfile, threading
import numpy as np
import voxflow.tasks._compute as compute
if sys.argv[1] == "limit":
    assert compute.limit_heap_arenas(2) is True
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


def test_limit_heap_arenas_leaves_the_environments_limit(monkeypatch):
    monkeypatch.setenv("MALLOC_ARENA_MAX", "8")
    assert compute.limit_heap_arenas.__wrapped__(2) is False


def test_heap_arenas_is_one_per_four_threads_at_least_two():
    assert [compute.heap_arenas(t) for t in (1, 4, 8, 9, 16, 33)] == [2, 2, 2, 2, 4, 8]


def test_local_computes_limit_the_heaps_first(monkeypatch):
    limits = []
    monkeypatch.setattr(compute, "limit_heap_arenas", lambda n: limits.append(n) or True)
    arr = da.arange(10, chunks=5)
    assert compute.compute_blocks([arr]) == 2
    with compute.on_cluster() as client:
        assert client is None
    expected = compute.heap_arenas(compute._local_threads())
    assert limits == [expected, expected]
