"""The Dask cluster a flow runs on: a local cluster, an existing scheduler, or Kubernetes.

One :class:`~voxflow.settings.ClusterSettings` chooses the cluster; :func:`make_task_runner`
turns it into the Prefect task runner of a flow and :func:`open_client` into a Dask client for
code that runs outside Prefect. The Kubernetes functions only build the ``DaskCluster`` and
``DaskWorkerGroup`` resources of the dask-kubernetes operator; nothing here contacts a cluster
until :func:`start_kube_cluster` is called.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

import dask.config
import dask.system
import distributed
import distributed.system
from prefect_dask import DaskTaskRunner

from voxflow.settings import ClusterSettings, KubernetesSettings, VoxflowSettings

if TYPE_CHECKING:
    from dask_kubernetes.operator import KubeCluster

__all__ = [
    "GPU_WORKER_GROUP",
    "gpu_worker_group_spec",
    "kubernetes_adapt_kwargs",
    "kubernetes_cluster_spec",
    "local_cluster_kwargs",
    "make_task_runner",
    "open_client",
    "start_kube_cluster",
    "start_local_cluster",
    "worker_environ",
]

GPU_WORKER_GROUP = "gpu"
"""Name of the GPU worker group; its workers carry the Dask resource ``GPU``."""

_MEMORY_FRACTION = 0.8
_KUBE_CLUSTER = "voxflow.runtime.cluster.start_kube_cluster"
_LOCAL_CLUSTER = "voxflow.runtime.cluster.start_local_cluster"
_WORKER_PRELOAD = "voxflow.runtime.worker_signals"


def _available_cores() -> int:
    # dask's count is the least of the machine's cores, the CPU affinity
    # (os.sched_getaffinity, psutil) and a cgroup quota, so containers are sized right.
    return dask.system.cpu_count()


def _total_memory() -> int:
    # The least of physical memory (psutil), a cgroup limit and RLIMIT_RSS.
    return distributed.system.memory_limit()


def local_cluster_kwargs(settings: ClusterSettings) -> dict[str, Any]:
    """Keyword arguments of a ``distributed.LocalCluster`` sized to this machine.

    By default one worker process runs one thread per usable core: the numba kernels and
    TensorStore release the GIL, so threads share the cores without contention and chunks
    never travel between processes, which worker processes would need. Explicit settings
    override the derived values.

    Parameters
    ----------
    settings : ClusterSettings
        ``n_workers``, ``threads_per_worker``, ``memory_limit``, ``processes`` and
        ``dashboard`` are used; None values are derived from the machine:

        - ``n_workers``: 1, or ``cores // threads_per_worker`` when only that is set;
        - ``threads_per_worker``: ``cores // n_workers`` (at least 1);
        - ``memory_limit``: 80% of the usable memory divided by ``n_workers``, in bytes.

        Usable cores respect CPU affinity and cgroup quotas; usable memory respects cgroup
        and rlimit limits.

    Returns
    -------
    dict
        ``n_workers``, ``threads_per_worker``, ``memory_limit`` (bytes or the given
        string), ``processes`` and ``dashboard_address`` (None turns the dashboard off).

    Raises
    ------
    TypeError
        If `settings` is not a ``ClusterSettings``.
    """
    if not isinstance(settings, ClusterSettings):
        raise TypeError(f"`settings` needs a ClusterSettings, got {type(settings).__name__}")
    cores = _available_cores()
    n_workers = settings.n_workers
    if n_workers is None:
        threads = settings.threads_per_worker
        n_workers = 1 if threads is None else max(1, cores // threads)
    threads_per_worker = settings.threads_per_worker or max(1, cores // n_workers)
    memory_limit: int | str | None = settings.memory_limit
    if memory_limit is None:
        memory_limit = int(_total_memory() * _MEMORY_FRACTION / n_workers)
    return {
        "n_workers": n_workers,
        "threads_per_worker": threads_per_worker,
        "memory_limit": memory_limit,
        "processes": settings.processes,
        "dashboard_address": ":8787" if settings.dashboard else None,
    }


def worker_environ(threads: int) -> dict[str, str]:
    """Environment a Dask worker process with `threads` threads starts with.

    ``MALLOC_ARENA_MAX``: one C heap (glibc arena) per four threads, at least two, as
    ``voxflow.io.heap_arenas`` gives a process that computes on local threads. glibc
    otherwise gives every thread a heap, and blocks freed into one thread's heap are not
    reused by the others, so a worker's memory would grow over a long run.

    Parameters
    ----------
    threads : int
        Threads of the worker, >= 1.

    Returns
    -------
    dict of str to str
        Variable names and values.
    """
    return {"MALLOC_ARENA_MAX": str(max(2, threads // 4))}


def start_local_cluster(**kwargs: Any) -> distributed.LocalCluster:
    """A ``distributed.LocalCluster`` whose worker processes start with :func:`worker_environ`.

    The variables are read by the C library when a process starts, so they are set through
    ``distributed.nanny.pre-spawn-environ`` while the workers are spawned, not afterwards.
    The worker processes preload :mod:`voxflow.runtime.worker_signals` and ignore SIGINT: a
    Ctrl-C is for the command alone, while worker processes killed by it mid-task would
    print tracebacks and leave the command waiting on them.

    Parameters
    ----------
    **kwargs
        Keyword arguments of ``distributed.LocalCluster``, e.g. from
        :func:`local_cluster_kwargs`.

    Returns
    -------
    distributed.LocalCluster
        The started cluster.
    """
    threads = kwargs.get("threads_per_worker") or _available_cores()
    environ = {f"distributed.nanny.pre-spawn-environ.{key}": value
               for key, value in worker_environ(threads).items()}  # fmt: skip
    preload = [*dask.config.get("distributed.worker.preload", []), _WORKER_PRELOAD]
    with dask.config.set({**environ, "distributed.worker.preload": preload}):
        return distributed.LocalCluster(**kwargs)


def _worker_resources(settings: KubernetesSettings) -> dict[str, dict[str, str]]:
    # No CPU limit: CFS throttling stalls multi-threaded kernels at each period's end.
    return {
        "requests": {"cpu": str(settings.worker_cpu), "memory": settings.worker_memory},
        "limits": {"memory": settings.worker_memory},
    }


def _worker_command(settings: KubernetesSettings, *, gpus: int = 0) -> str:
    # Without a CPU limit, dask-worker would count the node's cores, not the request.
    command = f"dask-worker --nthreads {settings.worker_cpu}"
    if gpus:
        command += f" --resources GPU={gpus}"
    return command


def kubernetes_cluster_spec(settings: KubernetesSettings) -> dict[str, Any]:
    """The ``DaskCluster`` resource of the dask-kubernetes operator.

    Built with ``dask_kubernetes.operator.make_cluster_spec``; the default worker group
    starts with ``min_workers`` CPU workers, each requesting ``worker_cpu`` cores (also its
    thread count) and ``worker_memory`` (also its memory limit). The scheduler requests
    ``scheduler_cpu`` and ``scheduler_memory``.

    Parameters
    ----------
    settings : KubernetesSettings
        The cluster's name, image, worker and scheduler resources and service type.

    Returns
    -------
    dict
        The resource (``apiVersion``, ``kind``, ``metadata``, ``spec``), ready for
        ``KubeCluster(custom_cluster_spec=...)``.
    """
    from dask_kubernetes.operator import make_cluster_spec

    spec = make_cluster_spec(
        name=settings.name,
        image=settings.image,
        n_workers=settings.min_workers,
        resources=_worker_resources(settings),
        env=worker_environ(settings.worker_cpu),
        worker_command=_worker_command(settings),
        scheduler_service_type=settings.scheduler_service_type,
    )
    scheduler = spec["spec"]["scheduler"]["spec"]["containers"][0]
    scheduler["resources"] = {
        "requests": {"cpu": str(settings.scheduler_cpu), "memory": settings.scheduler_memory},
        "limits": {"memory": settings.scheduler_memory},
    }
    return spec


def gpu_worker_group_spec(settings: KubernetesSettings) -> dict[str, Any]:
    """The worker spec of the GPU worker group.

    Built with ``dask_kubernetes.operator.make_worker_spec``: ``gpu_workers`` workers, each
    with the CPU workers' cores and memory plus ``gpus_per_worker`` of ``gpu_resource`` as a
    limit, a toleration for the taint that GPU node pools commonly carry, and the Dask worker
    resource ``GPU`` so that work annotated with ``resources={"GPU": 1}`` runs there.

    Parameters
    ----------
    settings : KubernetesSettings
        Image, worker resources, ``gpu_workers``, ``gpu_resource`` and ``gpus_per_worker``.

    Returns
    -------
    dict
        The worker spec (``replicas``, ``spec``), ready for
        ``KubeCluster.add_worker_group(GPU_WORKER_GROUP, custom_spec=...)``.
    """
    from dask_kubernetes.operator import make_worker_spec

    resources = _worker_resources(settings)
    resources["limits"][settings.gpu_resource] = str(settings.gpus_per_worker)
    spec = make_worker_spec(
        image=settings.image,
        n_workers=settings.gpu_workers,
        resources=resources,
        env=worker_environ(settings.worker_cpu),
        worker_command=_worker_command(settings, gpus=settings.gpus_per_worker),
    )
    spec["spec"]["tolerations"] = [
        {"key": settings.gpu_resource, "operator": "Exists", "effect": "NoSchedule"}
    ]
    return spec


def kubernetes_adapt_kwargs(settings: KubernetesSettings) -> dict[str, int]:
    """Bounds of the operator's autoscaler for the default (CPU) worker group.

    Parameters
    ----------
    settings : KubernetesSettings
        ``min_workers`` and ``max_workers``.

    Returns
    -------
    dict
        ``minimum`` and ``maximum``, for ``KubeCluster.adapt``.
    """
    return {"minimum": settings.min_workers, "maximum": settings.max_workers}


def _kubernetes_cluster_kwargs(settings: KubernetesSettings) -> tuple[str, dict[str, Any]]:
    kwargs: dict[str, Any] = {
        "custom_cluster_spec": kubernetes_cluster_spec(settings),
        "namespace": settings.namespace,
    }
    # KubeCluster takes no extra worker groups, so the factory adds the GPU group after start.
    if settings.gpu_workers:
        kwargs["gpu_worker_group"] = gpu_worker_group_spec(settings)
    return _KUBE_CLUSTER, kwargs


def start_kube_cluster(
    *,
    custom_cluster_spec: dict[str, Any],
    namespace: str | None = None,
    gpu_worker_group: dict[str, Any] | None = None,
    **kwargs: Any,
) -> KubeCluster:
    """Create (or connect to) a Kubernetes Dask cluster, with an optional GPU worker group.

    Parameters
    ----------
    custom_cluster_spec : dict
        The ``DaskCluster`` resource, from :func:`kubernetes_cluster_spec`.
    namespace : str, optional
        Kubernetes namespace; None uses the current kube context's.
    gpu_worker_group : dict, optional
        Worker spec from :func:`gpu_worker_group_spec`, added as the group
        :data:`GPU_WORKER_GROUP`.
    **kwargs
        Further keyword arguments of ``dask_kubernetes.operator.KubeCluster``.

    Returns
    -------
    dask_kubernetes.operator.KubeCluster
        The running cluster; closing it deletes the resources it created.

    Raises
    ------
    ConnectionError
        If the cluster cannot be created: no Kubernetes credentials, an API server out of
        reach, no dask-kubernetes operator, a refused resource. The message names the
        cluster and keeps the cause's.
    """
    from dask_kubernetes.operator import KubeCluster

    try:
        cluster = KubeCluster(
            custom_cluster_spec=custom_cluster_spec, namespace=namespace, **kwargs
        )
    except Exception as err:
        name = custom_cluster_spec.get("metadata", {}).get("name", "?")
        raise ConnectionError(
            f"cannot start the Kubernetes Dask cluster {name!r} (cluster.mode is "
            f"'kubernetes'; credentials come from KUBECONFIG or the pod's service account): "
            f"{str(err) or type(err).__name__}"
        ) from err
    if gpu_worker_group is not None:
        try:
            cluster.add_worker_group(GPU_WORKER_GROUP, custom_spec=gpu_worker_group)
        except BaseException:
            cluster.close()
            raise
    return cluster


def _validate_settings(settings: VoxflowSettings | ClusterSettings) -> ClusterSettings:
    if isinstance(settings, VoxflowSettings):
        return settings.cluster
    if isinstance(settings, ClusterSettings):
        return settings
    raise TypeError(
        f"`settings` needs a VoxflowSettings or ClusterSettings, got {type(settings).__name__}"
    )


def make_task_runner(settings: VoxflowSettings | ClusterSettings) -> DaskTaskRunner:
    """The Prefect task runner of a flow, on the cluster the settings choose.

    Parameters
    ----------
    settings : VoxflowSettings or ClusterSettings
        ``cluster.mode`` chooses: ``local`` starts a ``distributed.LocalCluster`` sized by
        :func:`local_cluster_kwargs`; ``address`` connects to the scheduler at
        ``cluster.address``; ``kubernetes`` starts a ``KubeCluster`` from
        :func:`kubernetes_cluster_spec` that adapts within :func:`kubernetes_adapt_kwargs`,
        through :func:`start_kube_cluster` when a GPU worker group is asked for.

    Returns
    -------
    prefect_dask.DaskTaskRunner
        The runner; it starts or connects to the cluster only when the flow starts.

    Raises
    ------
    TypeError
        If `settings` is neither a ``VoxflowSettings`` nor a ``ClusterSettings``.
    """
    cluster = _validate_settings(settings)
    if cluster.mode == "address":
        return DaskTaskRunner(address=cluster.address)
    if cluster.mode == "kubernetes":
        cluster_class, cluster_kwargs = _kubernetes_cluster_kwargs(cluster.kubernetes)
        return DaskTaskRunner(
            cluster_class=cluster_class,
            cluster_kwargs=cluster_kwargs,
            adapt_kwargs=kubernetes_adapt_kwargs(cluster.kubernetes),
        )
    return DaskTaskRunner(
        cluster_class=_LOCAL_CLUSTER, cluster_kwargs=local_cluster_kwargs(cluster)
    )


@contextmanager
def open_client(settings: VoxflowSettings | ClusterSettings) -> Iterator[distributed.Client]:
    """A Dask client on the cluster the settings choose, for code outside Prefect flows.

    The cluster is the one :func:`make_task_runner` would use: a local cluster or a
    Kubernetes cluster is started on entry and closed on exit; a scheduler at an address is
    connected to and left running.

    Parameters
    ----------
    settings : VoxflowSettings or ClusterSettings
        The cluster settings.

    Yields
    ------
    distributed.Client
        A client connected to the cluster; it is closed on exit.

    Raises
    ------
    TypeError
        If `settings` is neither a ``VoxflowSettings`` nor a ``ClusterSettings``.
    """
    cluster = _validate_settings(settings)
    if cluster.mode == "address":
        with distributed.Client(cluster.address) as client:
            yield client
        return
    if cluster.mode == "kubernetes":
        _, kwargs = _kubernetes_cluster_kwargs(cluster.kubernetes)
        with start_kube_cluster(**kwargs) as kube:
            kube.adapt(**kubernetes_adapt_kwargs(cluster.kubernetes))
            with distributed.Client(kube) as client:
                yield client
        return
    with (
        start_local_cluster(**local_cluster_kwargs(cluster)) as local,
        distributed.Client(local) as client,
    ):
        yield client
