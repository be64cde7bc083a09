import pytest


def assert_rerun_reuses(invoke, args, out, first_says):
    """Run `args` twice (the second with ``--overwrite``): the first writes and says
    `first_says`; the second is a cache hit that says it reused `out` and writes nothing."""
    from tests.conftest import snapshot

    first = invoke(args)
    assert first.exit_code == 0, first.output
    assert first_says in first.output and "reused" not in first.output
    files = snapshot(out)
    again = invoke([*args, "--overwrite"])
    assert again.exit_code == 0, again.output
    words = " ".join(again.output.split())
    assert f"reused {out} (already up to date, nothing recomputed)" in words, again.output
    assert "wrote" not in words
    assert snapshot(out) == files, "a cache hit writes nothing"


@pytest.fixture
def cli_env(monkeypatch, results_dir, prefect_harness):
    """The command on a small threaded local cluster, results in the session's directory."""
    monkeypatch.setenv("VOXFLOW_CLUSTER__PROCESSES", "false")
    monkeypatch.setenv("VOXFLOW_CLUSTER__N_WORKERS", "1")
    monkeypatch.setenv("VOXFLOW_CLUSTER__THREADS_PER_WORKER", "2")
    monkeypatch.setenv("VOXFLOW_PREFECT__RESULT_STORAGE", str(results_dir))
