"""Where flows run: the Dask cluster factory and the Prefect settings of voxflow."""

from voxflow.runtime.cluster import (
    GPU_WORKER_GROUP,
    gpu_worker_group_spec,
    kubernetes_adapt_kwargs,
    kubernetes_cluster_spec,
    local_cluster_kwargs,
    make_task_runner,
    open_client,
    start_kube_cluster,
    start_local_cluster,
    worker_environ,
)
from voxflow.runtime.prefect import (
    prefect_context,
    prefect_setting_updates,
    result_storage_block,
    shared_api,
    start_api,
    stop_api,
)

__all__ = [
    "GPU_WORKER_GROUP",
    "gpu_worker_group_spec",
    "kubernetes_adapt_kwargs",
    "kubernetes_cluster_spec",
    "local_cluster_kwargs",
    "make_task_runner",
    "open_client",
    "prefect_context",
    "prefect_setting_updates",
    "result_storage_block",
    "shared_api",
    "start_api",
    "start_kube_cluster",
    "start_local_cluster",
    "stop_api",
    "worker_environ",
]
