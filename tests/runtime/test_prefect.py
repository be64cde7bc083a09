import json
import os
from pathlib import Path

import pytest
from prefect import flow, task
from prefect.filesystems import LocalFileSystem
from prefect.settings import get_current_settings, temporary_settings

from voxflow.runtime import (
    make_task_runner,
    prefect_context,
    prefect_setting_updates,
    result_storage_block,
    shared_api,
    start_api,
)
from voxflow.settings import ClusterSettings, PrefectSettings

SERVER = "http://prefect.example:4200/api"


def _snapshot():
    current = get_current_settings()
    return (
        current.results.local_storage_path,
        current.results.persist_by_default,
        current.tasks.default_persist_result,
        current.results.default_serializer,
        current.api.url,
        current.server.ephemeral.enabled,
    )


def test_updates_with_api_url(tmp_path):
    settings = PrefectSettings(result_storage=tmp_path, api_url=SERVER)
    assert prefect_setting_updates(settings) == {
        "results.local_storage_path": tmp_path,
        "results.persist_by_default": True,
        "tasks.default_persist_result": True,
        "results.default_serializer": "json",
        "server.analytics_enabled": False,
        "api.url": SERVER,
    }


@pytest.mark.parametrize("persist", [True, False])
@pytest.mark.parametrize("serializer", ["json", "pickle"])
def test_context_sets_and_restores(tmp_path, persist, serializer):
    before = _snapshot()
    settings = PrefectSettings(
        result_storage=tmp_path / "results",
        persist_results=persist,
        result_serializer=serializer,
        api_url=SERVER,
    )
    with prefect_context(settings) as yielded:
        current = get_current_settings()
        assert yielded is current
        assert current.results.local_storage_path == tmp_path / "results"
        assert current.results.persist_by_default is persist
        assert current.tasks.default_persist_result is persist
        assert current.results.default_serializer == serializer
        assert current.api.url == SERVER
    assert _snapshot() == before


def test_context_restores_after_an_error(tmp_path):
    before = _snapshot()
    with pytest.raises(RuntimeError, match="stage failed"):
        with prefect_context(PrefectSettings(result_storage=tmp_path, api_url=SERVER)):
            raise RuntimeError("stage failed")
    assert _snapshot() == before


def test_context_keeps_the_users_api_url(tmp_path):
    with temporary_settings(updates={"api.url": SERVER, "server.ephemeral.enabled": False}):
        settings = PrefectSettings(result_storage=tmp_path)
        assert "api.url" not in prefect_setting_updates(settings)
        with prefect_context(settings):
            assert get_current_settings().api.url == SERVER
            assert get_current_settings().server.ephemeral.enabled is False
            assert get_current_settings().results.local_storage_path == tmp_path
        assert get_current_settings().results.local_storage_path != tmp_path


def test_context_enables_the_ephemeral_api_without_a_url(tmp_path):
    with temporary_settings(
        updates={"server.ephemeral.enabled": False}, restore_defaults={"api.url"}
    ):
        assert get_current_settings().api.url is None
        with prefect_context(PrefectSettings(result_storage=tmp_path)):
            assert get_current_settings().api.url is None
            assert get_current_settings().server.ephemeral.enabled is True
        assert get_current_settings().server.ephemeral.enabled is False


def test_result_storage_block(tmp_path):
    block = result_storage_block(PrefectSettings(result_storage=tmp_path / "r"))
    assert isinstance(block, LocalFileSystem)
    assert Path(block.basepath) == tmp_path / "r"


@pytest.mark.parametrize(
    "function", [prefect_context, prefect_setting_updates, result_storage_block]
)
def test_settings_type_is_checked(function):
    with pytest.raises(TypeError, match="`settings` needs a PrefectSettings, got dict"):
        function({"result_storage": "/tmp"})


@task
def _measure(n: int) -> dict:
    return {"n": n, "square": n * n}


@flow(task_runner=make_task_runner(ClusterSettings(n_workers=1, processes=False)))
def _measure_flow(n: int) -> dict:
    return _measure.submit(n).result()


def test_flow_persists_json_results_where_the_settings_say(tmp_path):
    # Imported here: it imports the Prefect server, which the other tests do not need.
    from prefect.testing.utilities import prefect_test_harness

    storage = tmp_path / "results"
    with prefect_test_harness(), prefect_context(PrefectSettings(result_storage=storage)):
        assert _measure_flow(7) == {"n": 7, "square": 49}
    # The task's result and the flow's, each as JSON; a record wraps the payload and
    # names the serializer.
    payloads = [json.loads(path.read_text()) for path in storage.iterdir()]
    records = [payload for payload in payloads if "metadata" in payload]
    assert {record["metadata"]["serializer"]["type"] for record in records} == {"json"}
    values = [json.loads(p["result"]) if "metadata" in p else p for p in payloads]
    assert values == [{"n": 7, "square": 49}] * 2


def test_shared_api_keeps_a_set_url_and_a_disabled_ephemeral_api():
    with temporary_settings(updates={"api.url": SERVER}), shared_api() as url:
        assert url == SERVER
        assert get_current_settings().api.url == SERVER
    off = {"server.ephemeral.enabled": False}
    with temporary_settings(updates=off, restore_defaults={"api.url"}), shared_api() as url:
        assert url is None
        assert get_current_settings().api.url is None


@task
def _where() -> dict:
    return {"api": get_current_settings().api.url, "pid": os.getpid()}


@flow(task_runner=make_task_runner(ClusterSettings(n_workers=1, threads_per_worker=1,
                                                   processes=True, dashboard=False)))  # fmt: skip
def _where_flow() -> dict:
    return _where.submit().result()


@pytest.mark.usefixtures("prefect_harness")
def test_shared_api_sends_task_runs_on_worker_processes_to_this_process_api():
    # Without an API URL each worker process would start an ephemeral API of its own.
    with temporary_settings(
        updates={"server.ephemeral.enabled": True}, restore_defaults={"api.url"}
    ):
        assert get_current_settings().api.url is None
        with shared_api() as url:
            assert url is not None
            assert get_current_settings().api.url == url
            seen = _where_flow()
        assert get_current_settings().api.url is None
    assert seen["pid"] != os.getpid()  # the task ran in the worker process
    assert seen["api"] == url


def test_start_api_names_a_configured_api_and_starts_nothing(tmp_path):
    before = _snapshot()
    assert start_api(PrefectSettings(result_storage=tmp_path, api_url=SERVER)) == SERVER
    assert _snapshot() == before


@pytest.mark.usefixtures("prefect_harness")
def test_start_api_starts_the_ephemeral_server_shared_api_then_names(tmp_path):
    # voxflow's settings turn the ephemeral API on when no URL is set (see prefect_context);
    # under the harness, its server is the process's ephemeral one.
    with temporary_settings(
        updates={"server.ephemeral.enabled": True}, restore_defaults={"api.url"}
    ):
        url = start_api(PrefectSettings(result_storage=tmp_path))
        assert url is not None
        assert get_current_settings().api.url is None  # nothing changed outside
        with shared_api() as shared:
            assert shared == url


def _sleeper():
    import subprocess
    import sys

    return subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])


@pytest.mark.skipif(os.name != "posix", reason="the guard is a POSIX shell and pipe")
def test_server_guard_stops_the_server_when_its_pipe_closes():
    # The kernel closes the pipe when this process dies, however it dies; closing the write
    # end here is what the guard then sees.
    from voxflow.runtime import prefect as module

    server = _sleeper()
    try:
        before = set(module._guards)  # an ephemeral server of an earlier test may have one
        module._guard(server)
        guarded = dict(module._guards)
        module._guard(server)  # once per server
        assert module._guards == guarded
        assert set(guarded) - before == {server.pid}
        _, guard, write = module._guards.pop(server.pid)
        os.close(write)
        assert server.wait(timeout=10) == -15  # SIGTERM, which Prefect's server stops on
        assert guard.wait(timeout=10) == 0
    finally:
        server.kill()
        server.wait()


@pytest.mark.skipif(os.name != "posix", reason="the guard is a POSIX shell and pipe")
def test_dismissed_guard_leaves_the_server_to_the_orderly_stop():
    import subprocess

    from voxflow.runtime import prefect as module

    server = _sleeper()
    try:
        module._guard(server)
        _, guard, _ = module._guards[server.pid]
        module._dismiss_guards()
        assert module._guards == {}
        assert guard.poll() is not None
        with pytest.raises(subprocess.TimeoutExpired):
            server.wait(timeout=0.5)
    finally:
        server.kill()
        server.wait()


@pytest.mark.skipif(os.name != "posix", reason="the guard is a POSIX shell and pipe")
def test_guard_of_an_exited_server_is_ended_before_it_could_signal_a_reused_pid():
    from voxflow.runtime import prefect as module

    first, second = _sleeper(), _sleeper()
    try:
        module._guard(first)
        _, old_guard, _ = module._guards[first.pid]
        first.kill()
        first.wait()
        module._guard(second)  # as when Prefect retries its server on another port
        assert first.pid not in module._guards
        assert second.pid in module._guards
        assert old_guard.poll() is not None
    finally:
        module._dismiss_guards()
        for p in (first, second):
            p.kill()
            p.wait()


@pytest.mark.skipif(os.name != "posix", reason="the guard is a POSIX shell and pipe")
def test_spawns_are_guarded_from_the_start_and_wrapped_once():
    from voxflow.runtime import prefect as module

    class Server:  # Prefect's spawn method, as SubprocessASGIServer has it
        def _run_uvicorn_command(self):
            return _sleeper()

    server = Server()
    module._guard_spawns(server)
    wrapper = server._run_uvicorn_command
    module._guard_spawns(server)  # as when a stopped server is started again
    assert server._run_uvicorn_command is wrapper
    process = server._run_uvicorn_command()
    try:
        assert process.pid in module._guards
    finally:
        module._dismiss_guards()
        process.kill()
        process.wait()
