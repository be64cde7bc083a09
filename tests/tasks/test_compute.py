import ctypes.util
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


def test_local_computes_release_free_memory_once_without_waiting_for_it(monkeypatch):
    calls, go = [], threading.Event()

    def trim() -> bool:
        calls.append(1)
        assert go.wait(10)  # the computes below return while this trim is still under way
        return True

    monkeypatch.setattr(compute, "release_free_memory", trim)
    arr = da.arange(100, chunks=10)
    writes = [arr.map_blocks(lambda b: np.array([b.sum()]), chunks=(1,))]
    assert compute.compute_blocks(writes) == 10
    first = compute._trim_thread
    # A compute that ends while a trim runs starts no second one.
    np.testing.assert_array_equal(compute.compute_array(arr * 2), np.arange(100) * 2)
    assert compute._trim_thread is first and first.is_alive()
    go.set()
    first.join(10)
    assert calls == [1]
    np.testing.assert_array_equal(compute.compute_array(arr + 1), np.arange(100) + 1)
    compute._trim_thread.join(10)
    assert compute._trim_thread is not first
    assert calls == [1, 1]


def test_local_computes_pause_the_cyclic_collector_and_restore_it():
    import gc

    def seen(block: np.ndarray) -> np.ndarray:
        return np.array([gc.isenabled()])

    arr = da.zeros(40, chunks=10)
    assert gc.isenabled()
    assert not compute.compute_array(arr.map_blocks(seen, chunks=(1,))).any()
    assert gc.isenabled()
    # Nested and concurrent pauses share one: the collector returns when the last ends.
    with compute.gc_paused():
        with compute.gc_paused():
            assert not gc.isenabled()
        assert not gc.isenabled()
        inner = threading.Thread(target=lambda: compute.compute_array(arr))
        inner.start()
        inner.join()
        assert not gc.isenabled()
    assert gc.isenabled()

    # A collector the caller disabled stays disabled; a failing compute restores it too.
    def fail(block: np.ndarray) -> np.ndarray:
        raise ZeroDivisionError("a block failed")

    gc.disable()
    try:
        with pytest.raises(ZeroDivisionError):
            compute.compute_array(arr.map_blocks(fail, dtype=arr.dtype))
        assert not gc.isenabled()
    finally:
        gc.enable()
    with pytest.raises(ZeroDivisionError):
        compute.compute_array(arr.map_blocks(fail, dtype=arr.dtype))
    assert gc.isenabled()
