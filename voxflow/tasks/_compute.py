"""Run chunk-level Dask work from inside a task, on the flow's cluster when there is one."""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import functools
import gc
import os
import threading
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import dask
import dask.array as da
import numpy as np
from dask.delayed import Delayed

ProgressFn = Callable[[int, int], None]


@functools.cache
def _malloc_trim() -> Callable[[int], int] | None:
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
    except (OSError, AttributeError):  # not glibc
        return None


def _local_threads() -> int:
    # Twice the cores: a thread waiting on TensorStore's disk I/O leaves its core idle.
    return max(4, 2 * (os.cpu_count() or 1))


def _compute_locally(*collections: Any) -> tuple:
    """``dask.compute`` on local threads, then the freed memory back to the system.

    The cyclic garbage collector waits while the blocks run (:func:`gc_paused`).
    """
    try:
        with gc_paused():
            return dask.compute(*collections, num_workers=_local_threads())
    finally:
        _release_in_background()


_GC_LOCK = threading.Lock()
_gc_depth = 0
_gc_was_enabled = False


@contextlib.contextmanager
def gc_paused() -> Iterator[None]:
    """Hold off Python's cyclic garbage collector inside the block (on every thread).

    A full collection walks every object of the process (about 130 ms once torch and
    Prefect are loaded), holding the interpreter lock: while local threads compute blocks,
    that stalls the scheduler and every task that needs the lock, so both cores can idle.
    The blocks' memory is freed by reference counting as before; the collector only finds
    reference cycles, which a compute makes few of. Without collections during the compute,
    its short-lived objects are not promoted to the oldest generation either, so fewer full
    collections happen afterwards. Nested and concurrent uses share one pause: the collector
    comes back when the last ends, unless it was disabled before the first began.
    """
    global _gc_depth, _gc_was_enabled
    with _GC_LOCK:
        if _gc_depth == 0:
            _gc_was_enabled = gc.isenabled()
            gc.disable()
        _gc_depth += 1
    try:
        yield
    finally:
        with _GC_LOCK:
            _gc_depth -= 1
            if _gc_depth == 0 and _gc_was_enabled:
                gc.enable()


_TRIM_LOCK = threading.Lock()
_trim_thread: threading.Thread | None = None


def _release_in_background() -> None:
    """:func:`release_free_memory` on a thread of its own, unless one is under way.

    The trim takes milliseconds (it walks every heap), which the caller need not wait for:
    the C call runs without the interpreter lock, beside what the caller does next.
    """
    global _trim_thread
    if not _TRIM_LOCK.acquire(blocking=False):
        return  # the trim under way hands back what is free when it reaches each heap

    def trim() -> None:
        try:
            release_free_memory()
        finally:
            _TRIM_LOCK.release()

    _trim_thread = threading.Thread(target=trim, name="voxflow-malloc-trim", daemon=True)
    _trim_thread.start()


def release_free_memory() -> bool:
    """Hand the C heap's free pages back to the operating system (glibc's ``malloc_trim``).

    Blocks computed on many threads leave freed memory in per-thread heaps, where later
    large allocations cannot reuse it; a long-lived process would otherwise grow with every
    stage it runs. Dask's worker processes get the same effect from their environment
    (``MALLOC_TRIM_THRESHOLD_``); this covers work run on local threads.

    Returns
    -------
    bool
        Whether the C library offers the call (glibc does; others return False).
    """
    trim = _malloc_trim()
    if trim is None:
        return False
    trim(0)
    return True


@contextlib.contextmanager
def flow_client() -> Iterator[Any]:
    """The flow's Dask client inside a task on a Dask worker, else None (local threads)."""
    try:
        from distributed import get_worker

        get_worker()
    except (ImportError, ValueError):
        yield None
        return
    from distributed import worker_client

    # worker_client secedes the task's thread from the worker while it waits on the blocks it
    # submitted, so a worker with a single thread can still run them (a plain client would
    # hold that thread and deadlock the worker).
    with worker_client() as client:
        yield client


@contextlib.contextmanager
def on_cluster() -> Iterator[Any]:
    """Make ``dask.compute`` inside the block run on the flow's cluster, else on local threads.

    Core functions that compute (a histogram, the first pass of labelling) call
    ``dask.compute`` themselves; this routes them without passing a client around.
    """
    with flow_client() as client:
        if client is not None:
            with dask.config.set(scheduler=client):
                yield client
            return
        with dask.config.set(scheduler="threads", num_workers=_local_threads()):
            yield None


def cluster_client() -> Any:
    """The Dask client of the cluster this code runs for, or None when there is none.

    Inside a task on a Dask worker that is the worker's client. In a flow's own body it is
    the client of the flow's Dask task runner, which prefect-dask does not make the default
    client, so ``distributed.get_client`` alone finds nothing there.
    """
    try:
        from distributed import get_client

        return get_client()
    except (ImportError, ValueError):
        pass
    from prefect.context import FlowRunContext

    runner = getattr(FlowRunContext.get(), "task_runner", None)
    try:
        from prefect_dask import DaskTaskRunner
    except ImportError:  # pragma: no cover - a dependency
        return None
    return runner.client if isinstance(runner, DaskTaskRunner) else None


def publish_progress(key: str | None) -> ProgressFn | None:
    """A progress callback that posts ``(done, total)`` to the scheduler under `key`.

    The ``voxflow`` command polls the same key to draw its progress bar; outside a Dask
    cluster there is nobody to tell and None is returned.
    """
    if key is None:
        return None
    client = cluster_client()
    if client is None:
        return None

    def post(done: int, total: int) -> None:
        client.set_metadata(["voxflow-progress", key], [done, total])

    return post


def compute_blocks(
    arrays: Sequence[da.Array],
    progress: ProgressFn | None = None,
    extra: Sequence[Delayed] = (),
) -> int:
    """Compute every block of `arrays` (block writes) and the `extra` tasks; return the count.

    Blocks are submitted one future each so progress is reported per block; on the flow's
    cluster they run there, otherwise on local threads.
    """
    # Unoptimised, so work shared between arrays (level 0 read once for every level) keeps
    # one key; fusing each array's graph on its own would repeat the shared reads.
    blocks = [d for arr in arrays for d in arr.to_delayed(optimize_graph=False).ravel()]
    blocks += list(extra)
    total = len(blocks)
    with flow_client() as client:
        if client is None:
            _compute_locally(*blocks)
            if progress:
                progress(total, total)
            return total
        from distributed import as_completed

        futures = client.compute(blocks)
        for done, future in enumerate(as_completed(futures), start=1):
            future.result()
            if progress and (done == total or done % max(1, total // 100) == 0):
                progress(done, total)
    return total


def compute_array(arr: da.Array) -> np.ndarray:
    """Compute a (small) Dask array into memory, on the flow's cluster when there is one."""
    with flow_client() as client:
        if client is None:
            return np.asarray(_compute_locally(arr)[0])
        return np.asarray(client.compute(arr).result())


def gpu_request(device: str | None) -> dict[str, int]:
    """Dask resources that torch work on `device` (registration, warps, prediction) asks for.

    ``{"GPU": 1}`` when the device may be a GPU and the cluster this process talks to has
    workers that offer one; otherwise nothing, so CPU-only clusters run the work anywhere.
    """
    if device == "cpu":
        return {}
    client = cluster_client()
    if client is None:
        return {}
    workers = client.scheduler_info().get("workers", {}).values()
    return {"GPU": 1} if any(w.get("resources", {}).get("GPU") for w in workers) else {}
