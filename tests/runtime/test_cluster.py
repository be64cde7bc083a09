import os

import dask
import dask.array as da
import distributed
import numpy as np
import psutil
import pytest
from prefect_dask import DaskTaskRunner
from pydantic import ValidationError

import voxflow.runtime.cluster as cluster_module
from voxflow.runtime import (
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
from voxflow.settings import ClusterSettings, KubernetesSettings, VoxflowSettings

GIB = 2**30


@pytest.fixture
def machine(monkeypatch):
    """A fake machine: 16 usable cores, 64 GiB usable memory."""
    monkeypatch.setattr(cluster_module, "_available_cores", lambda: 16)
    monkeypatch.setattr(cluster_module, "_total_memory", lambda: 64 * GIB)


def test_local_defaults_one_process_with_a_thread_per_core(machine):
    assert local_cluster_kwargs(ClusterSettings()) == {
        "n_workers": 1,
        "threads_per_worker": 16,
        "memory_limit": int(64 * GIB * 0.8),
        "processes": True,
        "dashboard_address": None,
    }


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        ({"n_workers": 4}, {"n_workers": 4, "threads_per_worker": 4}),
        ({"threads_per_worker": 2}, {"n_workers": 8, "threads_per_worker": 2}),
        ({"threads_per_worker": 32}, {"n_workers": 1, "threads_per_worker": 32}),
        ({"n_workers": 32}, {"n_workers": 32, "threads_per_worker": 1}),
        ({"n_workers": 3, "threads_per_worker": 5}, {"n_workers": 3, "threads_per_worker": 5}),
        ({"memory_limit": "8GiB"}, {"memory_limit": "8GiB"}),
        ({"memory_limit": "auto"}, {"memory_limit": "auto"}),
        ({"processes": False}, {"processes": False}),
        ({"dashboard": True}, {"dashboard_address": ":8787"}),
    ],
)
def test_local_overrides(machine, overrides, expected):
    kwargs = local_cluster_kwargs(ClusterSettings(**overrides))
    for key, value in expected.items():
        assert kwargs[key] == value, key
    if "memory_limit" not in expected:
        # 80% of the memory, shared by the workers.
        assert kwargs["memory_limit"] == int(64 * GIB * 0.8 / kwargs["n_workers"])


def test_local_one_core(monkeypatch):
    monkeypatch.setattr(cluster_module, "_available_cores", lambda: 1)
    monkeypatch.setattr(cluster_module, "_total_memory", lambda: 10 * GIB)
    kwargs = local_cluster_kwargs(ClusterSettings(n_workers=2))
    assert kwargs["threads_per_worker"] == 1
    assert kwargs["memory_limit"] == 4 * GIB


def test_machine_probes_are_within_the_machine():
    cores = cluster_module._available_cores()
    assert 1 <= cores <= (os.cpu_count() or 1)
    if hasattr(os, "sched_getaffinity"):
        assert cores <= len(os.sched_getaffinity(0))
    memory = cluster_module._total_memory()
    assert 0 < memory <= psutil.virtual_memory().total


def test_local_kwargs_rejects_other_types():
    with pytest.raises(TypeError, match="`settings` needs a ClusterSettings, got VoxflowSettings"):
        local_cluster_kwargs(VoxflowSettings())


def test_address_mode_requires_an_address():
    with pytest.raises(ValidationError, match="`address` is required when `mode` is 'address'"):
        ClusterSettings(mode="address")


KUBE = KubernetesSettings(
    name="brains",
    namespace="imaging",
    image="registry.example/voxflow:1.2",
    worker_cpu=8,
    worker_memory="32Gi",
    scheduler_cpu=2,
    scheduler_memory="8Gi",
    min_workers=2,
    max_workers=40,
    gpu_workers=3,
    gpus_per_worker=2,
    scheduler_service_type="LoadBalancer",
)


def _container(pod_spec):
    (container,) = pod_spec["spec"]["containers"]
    return container


def test_kubernetes_cluster_spec():
    spec = kubernetes_cluster_spec(KUBE)
    assert spec["apiVersion"] == "kubernetes.dask.org/v1"
    assert spec["kind"] == "DaskCluster"
    assert spec["metadata"]["name"] == "brains"
    worker = spec["spec"]["worker"]
    assert worker["replicas"] == 2
    container = _container(worker)
    assert container["image"] == "registry.example/voxflow:1.2"
    assert container["resources"] == {
        "requests": {"cpu": "8", "memory": "32Gi"},
        "limits": {"memory": "32Gi"},
    }
    assert container["env"] == [{"name": "MALLOC_ARENA_MAX", "value": "2"}]
    assert container["args"][:3] == ["dask-worker", "--nthreads", "8"]
    assert "--resources" not in container["args"]
    scheduler = spec["spec"]["scheduler"]
    assert _container(scheduler)["image"] == "registry.example/voxflow:1.2"
    assert _container(scheduler)["resources"] == {
        "requests": {"cpu": "2", "memory": "8Gi"},
        "limits": {"memory": "8Gi"},
    }
    assert scheduler["service"]["type"] == "LoadBalancer"
    assert scheduler["service"]["selector"]["dask.org/cluster-name"] == "brains"


def test_gpu_worker_group_spec():
    spec = gpu_worker_group_spec(KUBE)
    assert spec["replicas"] == 3
    container = _container(spec)
    assert container["image"] == "registry.example/voxflow:1.2"
    assert container["resources"] == {
        "requests": {"cpu": "8", "memory": "32Gi"},
        "limits": {"memory": "32Gi", "nvidia.com/gpu": "2"},
    }
    assert container["env"] == [{"name": "MALLOC_ARENA_MAX", "value": "2"}]
    args = container["args"]
    assert args[args.index("--resources") + 1] == "GPU=2"
    assert spec["spec"]["tolerations"] == [
        {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}
    ]
    # The CPU spec is left alone.
    assert "nvidia.com/gpu" not in str(kubernetes_cluster_spec(KUBE))


def test_gpu_worker_group_other_vendor():
    settings = KUBE.model_copy(update={"gpu_resource": "amd.com/gpu", "gpus_per_worker": 1})
    container = _container(gpu_worker_group_spec(settings))
    assert container["resources"]["limits"]["amd.com/gpu"] == "1"
    assert "nvidia.com/gpu" not in container["resources"]["limits"]


def test_kubernetes_adapt_kwargs():
    assert kubernetes_adapt_kwargs(KUBE) == {"minimum": 2, "maximum": 40}


def test_task_runner_local(machine):
    settings = VoxflowSettings(cluster={"n_workers": 2})
    runner = make_task_runner(settings)
    assert isinstance(runner, DaskTaskRunner)
    assert runner.cluster_class == "voxflow.runtime.cluster.start_local_cluster"
    assert runner.resolved_cluster_class is start_local_cluster
    assert runner.cluster_kwargs == local_cluster_kwargs(settings.cluster)
    assert runner.cluster_kwargs["n_workers"] == 2
    assert runner.address is None
    assert runner.adapt_kwargs == {}


def test_task_runner_address():
    settings = ClusterSettings(mode="address", address="tcp://scheduler:8786")
    runner = make_task_runner(settings)
    assert runner.address == "tcp://scheduler:8786"
    assert runner.cluster_class is None
    assert runner.cluster_kwargs == {}


def test_task_runner_kubernetes_without_gpus():
    kube = KUBE.model_copy(update={"gpu_workers": 0})
    runner = make_task_runner(ClusterSettings(mode="kubernetes", kubernetes=kube))
    assert runner.cluster_class == "voxflow.runtime.cluster.start_kube_cluster"
    assert runner.resolved_cluster_class is start_kube_cluster
    assert runner.cluster_kwargs == {
        "custom_cluster_spec": kubernetes_cluster_spec(kube),
        "namespace": "imaging",
    }
    assert runner.adapt_kwargs == {"minimum": 2, "maximum": 40}


def test_task_runner_kubernetes_with_gpus():
    runner = make_task_runner(ClusterSettings(mode="kubernetes", kubernetes=KUBE))
    assert runner.cluster_class == "voxflow.runtime.cluster.start_kube_cluster"
    assert runner.resolved_cluster_class is start_kube_cluster
    assert runner.cluster_kwargs == {
        "custom_cluster_spec": kubernetes_cluster_spec(KUBE),
        "namespace": "imaging",
        "gpu_worker_group": gpu_worker_group_spec(KUBE),
    }
    assert runner.adapt_kwargs == {"minimum": 2, "maximum": 40}


class FakeKubeCluster:
    """Records what KubeCluster would be asked, contacting nothing."""

    instances: list["FakeKubeCluster"] = []  # noqa: RUF012
    fail_worker_group = False
    fail_start: Exception | None = None

    def __init__(self, **kwargs):
        if self.fail_start is not None:
            raise self.fail_start
        self.kwargs = kwargs
        self.worker_groups = []
        self.closed = False
        FakeKubeCluster.instances.append(self)

    def add_worker_group(self, name, **kwargs):
        if self.fail_worker_group:
            raise RuntimeError("quota exceeded")
        self.worker_groups.append((name, kwargs))

    def close(self):
        self.closed = True


@pytest.fixture
def fake_kube(monkeypatch):
    import dask_kubernetes.operator

    monkeypatch.setattr(FakeKubeCluster, "instances", [])
    monkeypatch.setattr(dask_kubernetes.operator, "KubeCluster", FakeKubeCluster)
    return FakeKubeCluster


def test_start_kube_cluster_adds_the_gpu_group(fake_kube):
    runner = make_task_runner(ClusterSettings(mode="kubernetes", kubernetes=KUBE))
    cluster = start_kube_cluster(**runner.cluster_kwargs)
    assert cluster.kwargs == {
        "custom_cluster_spec": kubernetes_cluster_spec(KUBE),
        "namespace": "imaging",
    }
    assert cluster.worker_groups == [
        (GPU_WORKER_GROUP, {"custom_spec": gpu_worker_group_spec(KUBE)})
    ]
    assert not cluster.closed


def test_start_kube_cluster_without_gpu_group(fake_kube):
    cluster = start_kube_cluster(custom_cluster_spec={"metadata": {"name": "x"}}, quiet=True)
    assert cluster.kwargs == {
        "custom_cluster_spec": {"metadata": {"name": "x"}},
        "namespace": None,
        "quiet": True,
    }
    assert cluster.worker_groups == []


def test_start_kube_cluster_closes_when_the_gpu_group_fails(fake_kube, monkeypatch):
    monkeypatch.setattr(FakeKubeCluster, "fail_worker_group", True)
    with pytest.raises(RuntimeError, match="quota exceeded"):
        start_kube_cluster(custom_cluster_spec={}, gpu_worker_group={"replicas": 1})
    (cluster,) = fake_kube.instances
    assert cluster.closed


@pytest.mark.parametrize("cause", [ValueError("Unable to find valid credentials"), RuntimeError()])
def test_start_kube_cluster_failure_names_kubernetes(fake_kube, monkeypatch, cause):
    # A user's mistake of set-up (no credentials, no operator), reported as one CLI line
    # that says which cluster could not start, and keeps the cause.
    monkeypatch.setattr(FakeKubeCluster, "fail_start", cause)
    spec = kubernetes_cluster_spec(KUBE)
    with pytest.raises(ConnectionError) as info:
        start_kube_cluster(custom_cluster_spec=spec, namespace="imaging")
    message = str(info.value)
    assert message.startswith(f"cannot start the Kubernetes Dask cluster {KUBE.name!r}")
    assert message.endswith(str(cause) or type(cause).__name__)
    assert info.value.__cause__ is cause
    assert fake_kube.instances == []


@pytest.mark.parametrize("bad", [None, {"mode": "local"}, KUBE])
def test_settings_type_is_checked(bad):
    with pytest.raises(TypeError, match="`settings` needs a VoxflowSettings or ClusterSettings"):
        make_task_runner(bad)
    with pytest.raises(TypeError, match="`settings` needs a VoxflowSettings or ClusterSettings"):
        with open_client(bad):
            pass


def _check_computation(client):
    rng = np.random.default_rng(7)
    image = rng.random((40, 30, 20))
    array = da.from_array(image, chunks=(15, 11, 20))
    result = client.compute((array * 2 + 1).sum(axis=0)).result()
    np.testing.assert_allclose(result, (image * 2 + 1).sum(axis=0))


def test_open_client_local_process_cluster(monkeypatch):
    monkeypatch.delenv("MALLOC_ARENA_MAX", raising=False)
    settings = VoxflowSettings(
        cluster={"n_workers": 2, "threads_per_worker": 1, "processes": True, "dashboard": False}
    )
    with open_client(settings) as client:
        workers = client.scheduler_info(n_workers=-1)["workers"]
        assert len(workers) == 2
        assert all(worker["nthreads"] == 1 for worker in workers.values())
        # Processes: each worker has its own pid, none of them ours.
        pids = set(client.run(os.getpid).values())
        assert len(pids) == 2
        assert os.getpid() not in pids
        # Started with their heaps limited, which the C library reads only at start.
        arenas = client.run(os.environ.get, "MALLOC_ARENA_MAX")
        assert set(arenas.values()) == {worker_environ(1)["MALLOC_ARENA_MAX"]}
        _check_computation(client)
        cluster = client.cluster
    assert client.status == "closed"
    assert cluster.status.name == "closed"


def test_open_client_address_leaves_the_cluster_running():
    with distributed.LocalCluster(
        n_workers=1, threads_per_worker=2, processes=False, dashboard_address=None
    ) as cluster:
        settings = ClusterSettings(mode="address", address=cluster.scheduler_address)
        with open_client(settings) as client:
            assert client.scheduler.address == cluster.scheduler_address
            _check_computation(client)
        assert client.status == "closed"
        assert cluster.status.name == "running"


def test_worker_environ_limits_heaps_as_local_threads_do():
    from voxflow.io import heap_arenas

    for threads in (1, 2, 4, 8, 16, 33, 64):
        assert worker_environ(threads) == {"MALLOC_ARENA_MAX": str(heap_arenas(threads))}


def test_start_local_cluster_sets_the_environment_of_its_workers(monkeypatch):
    # A value in this process's environment would win (Dask's rule), and starting a cluster
    # leaves one there.
    monkeypatch.delenv("MALLOC_ARENA_MAX", raising=False)
    kwargs = {"n_workers": 1, "threads_per_worker": 16, "processes": True,
              "dashboard_address": None}  # fmt: skip
    with start_local_cluster(**kwargs) as cluster, distributed.Client(cluster) as client:
        (value,) = client.run(os.environ.get, "MALLOC_ARENA_MAX").values()
        assert value == "4"
    assert "MALLOC_ARENA_MAX" not in dask.config.get("distributed.nanny.pre-spawn-environ")
