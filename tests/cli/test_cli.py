import contextlib
import json
import os
import re

import numpy as np
import pytest
import zarr
from typer.testing import CliRunner

from tests.cli.conftest import assert_rerun_reuses
from tests.conftest import snapshot
from voxflow.cli import app
from voxflow.io import open_image, read_level, write_image

runner = CliRunner()


@pytest.fixture
def image(tmp_path):
    data = np.random.default_rng(0).integers(0, 1000, (18, 33, 40), dtype=np.uint16)
    path = str(tmp_path / "in.ome.zarr")
    write_image(path, data, "zyx", (2.0, 1.0, 1.0), chunks=8, shards=16)
    return path, data


def test_pyramid_command_writes_a_valid_image(cli_env, image, tmp_path):
    path, data = image
    out = str(tmp_path / "out.ome.zarr")
    result = runner.invoke(
        app, ["pyramid", path, "-o", out, "--levels", "3", "--ngff-version", "0.4",
              "--chunks", "8,8,8"],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert re.search(r"(\d+)/\1 blocks", result.output), result.output  # a finished bar
    assert "wrote 3 levels" in result.output
    ref = open_image(out)
    assert ref.ngff_version == "0.4" and len(ref.levels) == 3
    assert ref.levels[1].chunks == (8, 8, 8)
    from ome_zarr_models.v04.image import Image

    Image.from_zarr(zarr.open_group(out, mode="r"))
    np.testing.assert_array_equal(read_level(ref, 0).compute(), data)
    # scale (2, 1, 1): level 1 halves y and x only
    assert ref.levels[1].shape == (18, 17, 20)
    assert ref.levels[1].scale == (2.0, 2.0, 2.0)

    shown = runner.invoke(app, ["info", out])
    assert shown.exit_code == 0, shown.output
    assert "OME-NGFF 0.4" in shown.output
    assert "18 × 17 × 20" in shown.output
    assert "pyramid" in shown.output and path in shown.output


def test_info_of_a_plain_array(tmp_path):
    path = str(tmp_path / "plain.zarr")
    zarr.create_array(path, shape=(4, 6), chunks=(2, 3), dtype="uint8")
    result = runner.invoke(app, ["info", path])
    assert result.exit_code == 0, result.output
    assert "plain zarr array" in result.output


def test_synth_em_stack_writes_images_and_ground_truth(tmp_path):
    out = tmp_path / "em"
    result = runner.invoke(app, ["synth", "em-stack", str(out), "--shape", "4,64,64"])
    assert result.exit_code == 0, result.output
    truth = json.loads((out / "ground_truth.json").read_text())
    assert np.allclose(truth["transforms"][0], np.eye(3))
    assert open_image(str(out / "image.ome.zarr")).shape == (4, 64, 64)
    again = runner.invoke(app, ["synth", "em-stack", str(out), "--shape", "4,64,64"])
    assert again.exit_code == 2 and "--overwrite" in again.output


def _bad_inputs(tmp_path, image_path):
    not_zarr = tmp_path / "notes"
    not_zarr.mkdir()
    (not_zarr / "readme.txt").write_text("hello")
    six_d = str(tmp_path / "six.zarr")
    zarr.create_array(six_d, shape=(1, 1, 2, 2, 2, 2), chunks=(1, 1, 2, 2, 2, 2), dtype="uint8")
    cplx = str(tmp_path / "complex.zarr")
    zarr.create_array(cplx, shape=(4, 4, 4), chunks=(2, 2, 2), dtype="complex64")
    existing = tmp_path / "existing.ome.zarr"
    existing.mkdir()
    (existing / "keep.txt").write_text("mine")
    out = str(tmp_path / "new.ome.zarr")
    return [
        (["pyramid", str(tmp_path / "missing.zarr"), "-o", out], "no such image"),
        (["pyramid", str(not_zarr), "-o", out], "not a zarr"),
        (["pyramid", six_d, "-o", out], "2 to 5 dimensions"),
        (["pyramid", cplx, "-o", out], "dtype complex64"),
        (["pyramid", image_path, "-o", out, "--factors", "2,2"], "one integer per spatial axis"),
        (["pyramid", image_path, "-o", out, "--factors", "0,2,2"], "greater than 0"),
        (["pyramid", image_path, "-o", out, "--method", "median"], "method"),
        (["pyramid", image_path, "-o", out, "--levels", "0"], "levels"),
        (["pyramid", image_path, "-o", image_path + "/inner"], "lies inside the input"),
        (["pyramid", image_path, "-o", image_path], "is the input"),
        (["pyramid", image_path, "-o", str(existing)], "already exists"),
        (["pyramid", image_path, "-o", out, "--ngff-version", "0.4", "--shards", "16"], "shards"),
        (["pyramid", image_path, "-o", out, "--chunks", "a,b"], "comma-separated integers"),
        # A typo in a list is refused, not dropped.
        (["pyramid", image_path, "-o", out, "--factors", "2,x,2"], "got '2,x,2'"),
        (["pyramid", image_path, "-o", out, "--in-place"], "give no output (-o)"),
        (["pyramid", image_path, "-o", out, "--chunks", "16,,16"], "got '16,,16'"),
    ]


def test_bad_input_gives_one_line_error_and_writes_nothing(cli_env, image, tmp_path):
    path, _ = image
    cases = _bad_inputs(tmp_path, path)
    before = snapshot(tmp_path)
    for args, message in cases:
        result = runner.invoke(app, args)
        assert result.exit_code == 2, (args, result.output)
        lines = [line for line in result.output.strip().splitlines() if line.strip()]
        assert lines and lines[0].startswith("error:"), (args, result.output)
        assert message in " ".join(lines), (args, result.output)
        assert snapshot(tmp_path) == before, f"{args} changed files"
    assert not os.path.exists(tmp_path / "new.ome.zarr")


def test_in_place_on_a_plain_array_is_refused(cli_env, tmp_path):
    plain = str(tmp_path / "plain.zarr")
    zarr.create_array(plain, shape=(8, 8, 8), chunks=(4, 4, 4), dtype="uint8")
    before = snapshot(tmp_path)
    result = runner.invoke(app, ["pyramid", plain, "--in-place"])
    assert result.exit_code == 2 and "plain zarr array cannot hold levels" in result.output
    assert snapshot(tmp_path) == before


def test_synth_em_stack_options_reach_ground_truth(tmp_path):
    out = tmp_path / "em"
    result = runner.invoke(
        app, ["synth", "em-stack", str(out), "--shape", "3,64,64", "--seed", "3",
              "--transform", "similarity", "--noise", "0.05", "--contrast", "0.2"],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    truth = json.loads((out / "ground_truth.json").read_text())
    assert truth["transform"] == "similarity"
    assert truth["noise"] == 0.05 and truth["contrast"] == 0.2
    gain = np.array(truth["gain"])
    assert gain[0] == 1.0 and np.all(np.abs(gain - 1) <= 0.2) and np.ptp(gain) > 0
    linear = np.array(truth["transforms"])[:, :2, :2]
    np.testing.assert_allclose(linear[:, 0, 0], linear[:, 1, 1], atol=1e-12)
    assert truth["shear"] == [0.0, 0.0, 0.0]
    bad = runner.invoke(app, ["synth", "em-stack", str(tmp_path / "x"), "--transform", "warp"])
    assert bad.exit_code == 2 and "`transform` must be one of" in bad.output
    bad = runner.invoke(app, ["synth", "em-stack", str(tmp_path / "x"), "--noise", "2"])
    assert bad.exit_code == 2 and "`noise` must lie in" in bad.output
    assert not (tmp_path / "x").exists()


def _commands():
    import typer

    root = typer.main.get_command(app)
    for name, command in root.commands.items():
        subcommands = getattr(command, "commands", {})
        yield from (
            ((f"{name} {n}", c) for n, c in subcommands.items())
            if subcommands
            else [(name, command)]
        )


@pytest.mark.parametrize(("name", "command"), list(_commands()), ids=[n for n, _ in _commands()])
def test_every_option_of_every_command_states_its_default(name, command):
    """An option left out does something: the help says what (typer's default, or the text)."""
    import click

    for param in command.params:
        if isinstance(param, click.Option) and not (param.is_flag or param.required):
            shown = param.default is not None and param.show_default is not False
            assert shown or "default" in (param.help or ""), f"{name} {param.name}: no default"


def test_pyramid_help_and_readme_state_every_default():
    result = runner.invoke(app, ["pyramid", "--help"], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    text = " ".join(re.sub(r"[│╭╮╰╯─]", " ", result.output).split())
    assert "default VOXFLOW_STORAGE__NGFF_VERSION, else 0.5; in place, the input's." in text
    assert "default VOXFLOW_STORAGE__CLEVEL, else 2." in text
    assert "IMAGE.labels.NAME.pyramid.ome.zarr beside IMAGE" in text
    # The defaults the help states are the settings' own.
    from voxflow.settings import StorageSettings

    assert (StorageSettings().ngff_version, StorageSettings().clevel) == ("0.5", 2)
    readme = open(os.path.join(os.path.dirname(__file__), "../../README.md")).read()
    section = readme.split("### `voxflow pyramid")[1].split("\n### ")[0]
    cells = [re.split(r"(?<!\\)\|", line) for line in section.splitlines() if "| `-" in line]
    rows = {row[1].strip(): row[2] for row in cells}
    for option in ("`--ngff-version 0.5\\|0.4`", "`-o OUTPUT`", "`--levels N`", "`--min-size N`"):
        assert "default" in rows[option], option


def test_label_image_pyramid_lands_beside_its_image_with_its_metadata(cli_env, tmp_path):
    from voxflow.io import write_group

    image = str(tmp_path / "brain.ome.zarr")
    labels = np.random.default_rng(2).integers(0, 3, (6, 20, 18), dtype=np.uint16)
    write_image(image, labels * 100, "zyx", (2.0, 1.0, 1.0))
    label = {
        "colors": [{"label-value": 1, "rgba": [255, 0, 0, 255]}],
        "source": {"image": "../../"},
    }
    write_image(f"{image}/labels/cells", labels, "zyx", (2.0, 1.0, 1.0), image_label=label)
    write_group(f"{image}/labels", "0.5", {"labels": ["cells"]})
    before = snapshot(image)
    result = runner.invoke(app, ["pyramid", f"{image}/labels/cells", "--method", "mode",
                                 "--levels", "2"])  # fmt: skip
    assert result.exit_code == 0, result.output
    out = str(tmp_path / "brain.labels.cells.pyramid.ome.zarr")
    assert out in result.output.replace("\n", "")
    assert snapshot(image) == before
    attrs = zarr.open_group(out, mode="r").attrs["ome"]
    assert attrs["image-label"] == {**label, "source": {"image": "../brain.ome.zarr"}}
    from ome_zarr_models.v05.image_label import ImageLabel

    ImageLabel.from_zarr(zarr.open_group(out, mode="r"))


def test_plain_array_warning_is_printed_once(cli_env, tmp_path, recwarn):
    from voxflow.io import PlainArrayWarning

    plain = str(tmp_path / "plain.zarr")
    zarr.create_array(plain, shape=(8, 16, 16), chunks=(4, 8, 8), dtype="uint8")[...] = 3
    result = runner.invoke(app, ["pyramid", plain, "--levels", "2"])
    assert result.exit_code == 0, result.output
    plain_warnings = [w for w in recwarn if w.category is PlainArrayWarning]
    assert len(plain_warnings) == 1, [str(w.message) for w in plain_warnings]


def test_pyramid_rerun_served_by_the_cache_says_it_reused_the_output(cli_env, image, tmp_path):
    path, _ = image
    out = str(tmp_path / "out.ome.zarr")
    args = ["pyramid", path, "-o", out, "--levels", "2"]
    assert_rerun_reuses(lambda a: runner.invoke(app, a), args, out, "wrote 2 levels")
    changed = runner.invoke(app, ["pyramid", path, "-o", out, "--levels", "3", "--overwrite"])
    assert changed.exit_code == 0, changed.output
    assert "wrote 3 levels" in changed.output and "reused" not in changed.output


def _voxflow(*args, env=None):
    import subprocess
    import sys
    from pathlib import Path

    command = Path(sys.executable).with_name("voxflow")
    # The environment of a user's shell: without the test session's log levels.
    environ = {k: v for k, v in os.environ.items() if "LOGGING" not in k}
    return subprocess.Popen(
        [str(command), *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={**environ, **(env or {})}, start_new_session=True,
    )  # fmt: skip


def test_ctrl_c_while_writing_stops_at_once_with_one_line(tmp_path):
    import signal
    import subprocess
    import time

    import psutil

    data = np.random.default_rng(0).integers(0, 1000, (128, 512, 512), dtype=np.uint16)
    path = str(tmp_path / "big.ome.zarr")
    write_image(path, data, "zyx", (2.0, 1.0, 1.0), chunks=32, shards=64)
    out = tmp_path / "out.ome.zarr"
    env = {"VOXFLOW_CLUSTER__N_WORKERS": "2", "VOXFLOW_CLUSTER__THREADS_PER_WORKER": "1",
           "VOXFLOW_PREFECT__RESULT_STORAGE": str(tmp_path / "results")}  # fmt: skip
    proc = _voxflow("pyramid", path, "-o", str(out), "--levels", "4", env=env)
    try:
        deadline = time.monotonic() + 60
        while not out.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert proc.poll() is None, "the command ended before it was interrupted"
        children = psutil.Process(proc.pid).children(recursive=True)
        os.killpg(proc.pid, signal.SIGINT)  # what a terminal's Ctrl-C does
        _, stderr = proc.communicate(timeout=20)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        raise
    assert proc.returncode == 130, stderr
    lines = [line for line in stderr.splitlines() if line.strip() and "blocks" not in line]
    # The command's last word is the one line; no process prints a traceback on the way out.
    assert lines[-1:] == [
        "interrupted: the output is left unfinished; run the same command again to finish it"
    ], stderr
    assert "Traceback" not in stderr, stderr
    time.sleep(0.5)
    alive = [c.pid for c in children if c.is_running() and c.status() != psutil.STATUS_ZOMBIE]
    assert alive == [], "worker or server processes outlived the command"


def test_killed_command_leaves_no_server_or_worker_running(image, tmp_path):
    # SIGKILL runs no handler: the Prefect server (started by the command) must stop by itself.
    import signal
    import time

    import psutil

    path, _ = image
    env = {"VOXFLOW_CLUSTER__N_WORKERS": "1", "VOXFLOW_CLUSTER__THREADS_PER_WORKER": "1",
           "VOXFLOW_PREFECT__RESULT_STORAGE": str(tmp_path / "results")}  # fmt: skip
    proc = _voxflow("pyramid", path, "-o", str(tmp_path / "out.ome.zarr"), env=env)
    children = []
    try:
        deadline = time.monotonic() + 60
        server = None
        while server is None and proc.poll() is None and time.monotonic() < deadline:
            children = psutil.Process(proc.pid).children(recursive=True)
            for child in children:
                with contextlib.suppress(psutil.Error):
                    if "uvicorn" in child.cmdline():
                        server = child
            time.sleep(0.05)
        assert server is not None, "the command started no Prefect server"
        children = psutil.Process(proc.pid).children(recursive=True)
        os.kill(proc.pid, signal.SIGKILL)  # the command only, not its process group
        proc.wait(timeout=20)
        _, alive = psutil.wait_procs(children, timeout=15)
        assert [c.cmdline()[:3] for c in alive] == [], "processes outlived the killed command"
    finally:
        proc.kill()
        for child in children:  # first: a survivor holds the command's pipes open
            with contextlib.suppress(psutil.Error):
                child.kill()
        proc.communicate(timeout=20)


def test_unreachable_scheduler_gives_one_line_error(image, tmp_path):
    path, _ = image
    env = {"VOXFLOW_CLUSTER__MODE": "address", "VOXFLOW_CLUSTER__ADDRESS": "tcp://127.0.0.1:1",
           "DASK_DISTRIBUTED__COMM__TIMEOUTS__CONNECT": "1s",
           "VOXFLOW_PREFECT__RESULT_STORAGE": str(tmp_path / "results")}  # fmt: skip
    proc = _voxflow("pyramid", path, "-o", str(tmp_path / "out.ome.zarr"), env=env)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 2, stderr
    assert stderr.strip().splitlines() == [
        "error: Timed out trying to connect to tcp://127.0.0.1:1 after 1 s"
    ], stderr


@pytest.mark.parametrize(
    ("env", "line"),
    [
        (
            {"VOXFLOW_CLUSTR__MODE": "address"},
            "error: environment variable VOXFLOW_CLUSTR__MODE names no voxflow setting; "
            "did you mean VOXFLOW_CLUSTER?",
        ),
        (
            {
                "VOXFLOW_CLUSTER__MODE": "kubernetes",
                "KUBECONFIG": "/nonexistent/kubeconfig",
                "KUBERNETES_SERVICE_HOST": "",
            },
            "error: cannot start the Kubernetes Dask cluster 'voxflow' (cluster.mode is "
            "'kubernetes'; credentials come from KUBECONFIG or the pod's service account): "
            "Unable to find valid credentials",
        ),
    ],
    ids=["mistyped-setting", "kubernetes-without-credentials"],
)
def test_settings_and_cluster_mistakes_give_one_line_and_write_nothing(image, tmp_path, env, line):
    path, _ = image
    before = snapshot(path)
    out = tmp_path / "out.ome.zarr"
    env = {**env, "VOXFLOW_PREFECT__RESULT_STORAGE": str(tmp_path / "results")}
    proc = _voxflow("pyramid", path, "-o", str(out), env=env)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 2, stderr
    assert stderr.strip().splitlines() == [line], stderr
    assert not out.exists()
    assert snapshot(path) == before


def test_os_errors_give_one_line_and_a_traceback_when_verbose(capsys):
    from voxflow import cli

    @cli._user_errors
    def write():
        raise OSError(30, "Read-only file system", "/data/out.ome.zarr")

    for verbose in (False, True):
        cli._state["verbose"] = verbose
        try:
            with pytest.raises(cli.typer.Exit) as exit_:
                write()
        finally:
            cli._state["verbose"] = False
        assert exit_.value.exit_code == 2
        stderr = capsys.readouterr().err
        line = "error: [Errno 30] Read-only file system: '/data/out.ome.zarr'"
        assert stderr.strip().splitlines()[-1] == line
        assert ("Traceback" in stderr) is verbose
