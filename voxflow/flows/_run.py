"""What every flow does the same way: run a cached stage task, run a flow with settings."""

from __future__ import annotations

from typing import Any

from voxflow.runtime import make_task_runner, prefect_context, shared_api
from voxflow.settings import VoxflowSettings
from voxflow.tasks import ImageRef, is_complete


def submit_stage(stage_task: Any, *args: Any) -> ImageRef:
    """Run a content-cached stage task; make it again when its cached output is gone."""
    ref = stage_task.submit(*args).result()
    if not is_complete(ref):
        # A cached result whose output was since removed or changed: make it again.
        ref = stage_task.with_options(refresh_cache=True).submit(*args).result()
    return ref


def run_flow(flow_fn: Any, settings: VoxflowSettings | None, *args: Any) -> Any:
    """Call `flow_fn` on the cluster and with the Prefect settings of `settings`."""
    settings = settings or VoxflowSettings()
    with prefect_context(settings.prefect), shared_api():
        return flow_fn.with_options(task_runner=make_task_runner(settings))(*args)
