"""Preload of voxflow's local Dask worker processes: a Ctrl-C is left to the command.

A terminal's Ctrl-C reaches every process of its foreground process group. A worker process
that died of it mid-task would leave the command waiting on work that never ends; with this
module preloaded (``distributed.worker.preload``) the worker ignores SIGINT, and the command
that started it decides what an interrupt does and closes its cluster, which stops the
workers with SIGTERM.
"""

from __future__ import annotations

import signal
import threading
from typing import Any

__all__ = ["dask_setup"]


def dask_setup(worker: Any) -> None:
    """Ignore SIGINT in this worker process.

    Parameters
    ----------
    worker : distributed.Worker
        The worker being started; unused.
    """
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, signal.SIG_IGN)
