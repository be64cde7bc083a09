import pytest


@pytest.fixture
def cli_env(monkeypatch, results_dir, prefect_harness):
    """The command on a small threaded local cluster, results in the session's directory."""
    monkeypatch.setenv("VOXFLOW_CLUSTER__PROCESSES", "false")
    monkeypatch.setenv("VOXFLOW_CLUSTER__N_WORKERS", "1")
    monkeypatch.setenv("VOXFLOW_CLUSTER__THREADS_PER_WORKER", "2")
    monkeypatch.setenv("VOXFLOW_PREFECT__RESULT_STORAGE", str(results_dir))
