"""Prefect settings for voxflow flows: where results persist, how, and which API records runs.

Prefect reads its settings from a settings context; :func:`prefect_context` enters one that
differs from the current one only in what :class:`~voxflow.settings.PrefectSettings` decides,
and restores the previous settings on exit. Task runs on Dask workers receive the context
with the task, so the settings hold there as well.
"""

from __future__ import annotations

import atexit
import os
import signal
import subprocess
import threading
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from typing import Any

from prefect.filesystems import LocalFileSystem
from prefect.settings import Settings, get_current_settings, temporary_settings

from voxflow.settings import PrefectSettings

__all__ = [
    "prefect_context",
    "prefect_setting_updates",
    "result_storage_block",
    "shared_api",
    "start_api",
    "stop_api",
]


def _validate_settings(settings: PrefectSettings) -> PrefectSettings:
    if not isinstance(settings, PrefectSettings):
        raise TypeError(f"`settings` needs a PrefectSettings, got {type(settings).__name__}")
    return settings


def prefect_setting_updates(settings: PrefectSettings) -> dict[str, Any]:
    """The Prefect settings that voxflow's settings decide, against the current ones.

    Parameters
    ----------
    settings : PrefectSettings
        Result storage, persistence, serializer and API URL.

    Returns
    -------
    dict
        Prefect setting accessors and values:

        - ``results.local_storage_path``: ``result_storage``, where persisted results go
          unless a default storage block is configured in Prefect;
        - ``results.persist_by_default`` and ``tasks.default_persist_result``:
          ``persist_results``, for flows and tasks alike;
        - ``results.default_serializer``: ``result_serializer``;
        - ``server.analytics_enabled``: off;
        - ``api.url``: ``api_url`` when it is set. Otherwise the current API URL
          (``PREFECT_API_URL``) is kept, and when there is none,
          ``server.ephemeral.enabled`` is set so that Prefect starts its ephemeral API.

    Raises
    ------
    TypeError
        If `settings` is not a ``PrefectSettings``.
    """
    settings = _validate_settings(settings)
    updates: dict[str, Any] = {
        "results.local_storage_path": settings.result_storage,
        "results.persist_by_default": settings.persist_results,
        "tasks.default_persist_result": settings.persist_results,
        "results.default_serializer": settings.result_serializer,
        # Clusters and laptops alike may have no way out; telemetry would only log failures.
        "server.analytics_enabled": False,
    }
    if settings.api_url is not None:
        updates["api.url"] = settings.api_url
    elif get_current_settings().api.url is None:
        updates["server.ephemeral.enabled"] = True
    return updates


def prefect_context(settings: PrefectSettings) -> AbstractContextManager[Settings]:
    """Apply voxflow's Prefect settings for the duration of a ``with`` block.

    Parameters
    ----------
    settings : PrefectSettings
        The settings to apply; see :func:`prefect_setting_updates` for what changes.

    Returns
    -------
    contextlib.AbstractContextManager of prefect.settings.Settings
        Entering it applies the settings, read against the settings current at entry, and
        yields Prefect's resulting settings; leaving it restores the previous ones.

    Raises
    ------
    TypeError
        If `settings` is not a ``PrefectSettings``.

    Examples
    --------
    >>> from voxflow.settings import PrefectSettings
    >>> with prefect_context(PrefectSettings(result_storage="/tmp/results")) as current:
    ...     str(current.results.local_storage_path)
    '/tmp/results'
    """
    return _prefect_context(_validate_settings(settings))


@contextmanager
def _prefect_context(settings: PrefectSettings) -> Iterator[Settings]:
    with temporary_settings(updates=prefect_setting_updates(settings)) as current:
        yield current


@contextmanager
def _interrupts_blocked() -> Iterator[None]:
    """Block SIGINT in the calling thread, and so in the processes it starts meanwhile.

    A terminal's Ctrl-C reaches every process of the foreground process group; a server
    process started inside this block inherits the blocked signal and is stopped by the
    process that started it. The thread's mask is restored on exit, so an interrupt that
    arrived meanwhile is delivered then. Without signal masks (Windows) nothing changes.
    """
    if not hasattr(signal, "pthread_sigmask"):
        yield
        return
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def _ephemeral_server() -> Any:
    """Prefect's ephemeral API server of this process, started; None when none is needed.

    None when the current settings name an API or disable the ephemeral one.
    """
    current = get_current_settings()
    if current.api.url is not None or not current.server.ephemeral.enabled:
        return None
    from prefect.server.api.server import SubprocessASGIServer

    server = SubprocessASGIServer()  # the instance Prefect's own clients use in this process
    _guard_spawns(server)
    with _interrupts_blocked():  # the server process leaves a Ctrl-C to this one
        server.start()  # once: later calls find it running
    _guard(server.server_process)  # a server started before this call; else already guarded
    return server


def _guard_spawns(server: Any) -> None:
    """Guard every server process `server` spawns from the moment it exists (:func:`_guard`).

    The server takes seconds to come up; guarding it only once ``start`` returns would leave
    those seconds unguarded. The spawn is wrapped once per server object, so a server
    stopped and started again keeps one wrapper. Without Prefect's spawn method (another
    Prefect version), the guard starts after ``start`` instead.
    """
    spawn = getattr(server, "_run_uvicorn_command", None)
    if spawn is None or "_run_uvicorn_command" in vars(server):
        return

    def spawn_guarded() -> subprocess.Popen[Any]:
        process = spawn()
        _guard(process)
        return process

    server._run_uvicorn_command = spawn_guarded


# The guard of each server process this process started, by server pid: the server process,
# the guard process and the write end of the pipe the guard waits on.
_guards: dict[int, tuple[subprocess.Popen[Any], subprocess.Popen[bytes], int]] = {}
_guards_lock = threading.Lock()


def _guard(process: subprocess.Popen[Any] | None) -> None:
    """Make sure the server `process` stops when this process dies, even by SIGKILL.

    Prefect stops its server at exit, which a killed process never reaches; the server would
    then run on, orphaned. A guard (``sh``, a few hundred KiB) waits on a pipe whose only
    write end this process holds; the kernel closes it when this process dies, however it
    dies, and the guard then sends the server SIGTERM. An orderly stop dismisses the guard
    first (:func:`_dismiss_guards`), so it never signals a pid that may have been reused.
    POSIX only; elsewhere nothing changes.
    """
    if process is None or os.name != "posix":
        return
    with _guards_lock:
        if process.pid in _guards:
            return
        for pid, (server, guard, write) in list(_guards.items()):
            if server.poll() is not None:  # a server that exited (Prefect retries a busy port)
                del _guards[pid]
                _end_guard(guard, write)
        read, write = os.pipe()  # not inheritable: no other child holds the write end
        try:
            guard = subprocess.Popen(
                ["/bin/sh", "-c", f"read _; kill -TERM {process.pid}"],
                stdin=read, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            )  # fmt: skip
        except OSError:
            os.close(write)
            return
        finally:
            os.close(read)
        if not _guards:
            atexit.register(_dismiss_guards)  # runs before Prefect's own stop of the server
        _guards[process.pid] = (process, guard, write)


def _end_guard(guard: subprocess.Popen[bytes], write: int) -> None:
    guard.kill()  # before the pipe closes, which would make it signal
    guard.wait()
    os.close(write)


def _dismiss_guards() -> None:
    """End every guard of :func:`_guard`, leaving the servers to the orderly stop."""
    with _guards_lock:
        while _guards:
            _, (_, guard, write) = _guards.popitem()
            _end_guard(guard, write)


def start_api(settings: PrefectSettings) -> str | None:
    """Start the API server that flows under `settings` will use, if it is ephemeral.

    Prefect's ephemeral server takes seconds to come up; calling this on a thread of its own
    lets it start while the caller does other work (a command starting its Dask cluster).
    Call it before any flow of the process runs, and wait for it: the server is started
    once per process, not from two threads at a time.

    Returns
    -------
    str or None
        The API URL flows under `settings` will use; None when Prefect has none.
    """
    with prefect_context(settings) as current:
        server = _ephemeral_server()
        return server.api_url if server is not None else current.api.url


def stop_api() -> None:
    """Stop this process's ephemeral Prefect API server, if one runs.

    Prefect stops it when the interpreter exits; a command that ends at once (on an
    interrupt) stops it with this first, so that no server process outlives it.
    """
    from prefect.server.api.server import SubprocessASGIServer

    _dismiss_guards()
    for server in list(SubprocessASGIServer._instances.values()):
        server.stop()


@contextmanager
def shared_api() -> Iterator[str | None]:
    """Give this process's ephemeral Prefect API a URL that task runs elsewhere use too.

    Without an API URL, Prefect starts an ephemeral API server in the first process that
    needs one, and every Dask worker process would start one more of its own (several
    seconds each, on every run). Inside this block the ephemeral server of this process is
    started once and named in the settings, which travel with every task, so task runs on
    the workers report to it. With an API URL already set, or the ephemeral API disabled,
    nothing changes.

    Yields
    ------
    str or None
        The API URL the block runs against, None when Prefect has none.
    """
    server = _ephemeral_server()
    if server is None:
        yield get_current_settings().api.url
        return
    with temporary_settings(updates={"api.url": server.api_url}):
        yield server.api_url


def result_storage_block(settings: PrefectSettings) -> LocalFileSystem:
    """The result storage of ``settings`` as a block for ``result_storage=`` of flows and tasks.

    ``result_storage=`` takes a block, a block slug (a ``str``) or a ``pathlib.Path``; the
    block states the location explicitly, whatever the settings context.

    Parameters
    ----------
    settings : PrefectSettings
        ``result_storage`` is used.

    Returns
    -------
    prefect.filesystems.LocalFileSystem
        A file system block rooted at ``result_storage``; not saved to the API.

    Raises
    ------
    TypeError
        If `settings` is not a ``PrefectSettings``.
    """
    settings = _validate_settings(settings)
    return LocalFileSystem(basepath=str(settings.result_storage))
