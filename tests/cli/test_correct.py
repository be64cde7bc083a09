import os

import numpy as np
import pytest
import zarr
from typer.testing import CliRunner

from tests.conftest import snapshot
from voxflow.cli import app
from voxflow.io import open_image, read_level, write_image

runner = CliRunner()


@pytest.fixture
def image(tmp_path):
    rng = np.random.default_rng(0)
    data = rng.integers(400, 1000, (2, 16, 33, 40)).astype(np.uint16)
    path = str(tmp_path / "in.ome.zarr")
    write_image(path, data, "czyx", (1.0, 2.0, 1.0, 1.0), chunks=8, shards=16)
    return path, data


def test_correct_command_writes_image_field_and_pyramid(cli_env, image, tmp_path):
    path, data = image
    out = str(tmp_path / "out.ome.zarr")
    result = runner.invoke(
        app, ["correct", path, "-o", out, "--plugin", "gaussian", "--param", "sigma=20",
              "--factor", "2,4,4", "--channel", "1", "--dtype", "float32"],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "blocks" in result.output
    assert f"{out}/fields/gaussian" in result.output.replace("\n", "")
    ref = open_image(out)
    assert ref.shape == (1, 16, 33, 40) and ref.dtype == "float32" and len(ref.levels) >= 1
    assert ref.provenance["parameters"]["plugin"]["params"]["sigma"] == 20
    field = open_image(f"{out}/fields/gaussian")
    assert field.shape == (1, 8, 9, 10)
    from ome_zarr_models.v05.image import Image

    Image.from_zarr(zarr.open_group(out, mode="r"))
    got = read_level(ref, 0).compute()
    assert np.isfinite(got).all() and abs(got.mean() / data[1].mean() - 1) < 0.1


def test_no_field_option(cli_env, image, tmp_path):
    path, _ = image
    out = str(tmp_path / "out.ome.zarr")
    result = runner.invoke(app, ["correct", path, "-o", out, "--no-field", "--factor", "4"])
    assert result.exit_code == 0, result.output
    assert not os.path.exists(os.path.join(out, "fields"))


def test_plugins_command_lists_the_built_ins(cli_env):
    result = runner.invoke(app, ["plugins"])
    assert result.exit_code == 0, result.output
    for name in ("gaussian", "n4", "background", "normalize"):
        assert name in result.output


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--factor", "64"], "fewer than 2 voxels"),
        (["--factor", "0"], "factor"),
        (["--factor", "-2"], "factor"),
        (["--factor", "2,2"], "one per spatial axis"),
        (["--factor", "4,x"], "got '4,x'"),
        (["--plugin", "no-such"], "no-such"),
        (["--param", "sigma"], "KEY=VALUE"),
        (["--channel", "5"], "channels"),
        (["--dtype", "int8"], "dtype"),
    ],
)
def test_bad_input_gives_one_line_error_and_writes_nothing(cli_env, image, tmp_path, args,
                                                          message):  # fmt: skip
    path, _ = image
    out = str(tmp_path / "out.ome.zarr")
    before = snapshot(tmp_path)
    result = runner.invoke(app, ["correct", path, "-o", out, *args])
    assert result.exit_code == 2, (args, result.output)
    lines = [line for line in result.output.strip().splitlines() if line.strip()]
    assert lines and lines[0].startswith("error:"), (args, result.output)
    assert message in " ".join(lines), (args, result.output)
    assert snapshot(tmp_path) == before


def test_output_inside_the_input_and_nan_input_are_refused(cli_env, image, tmp_path):
    path, data = image
    nan_path = str(tmp_path / "nan.ome.zarr")
    bad = data.astype(np.float32)
    bad[0, 1, 2, 3] = np.nan
    write_image(nan_path, bad, "czyx", (1.0, 2.0, 1.0, 1.0), chunks=8, shards=16)
    before = snapshot(tmp_path)
    for args, message in [
        (["correct", path, "-o", path + "/inner"], "inside the input"),
        (["correct", nan_path, "-o", str(tmp_path / "o.ome.zarr")], "NaN"),
    ]:
        result = runner.invoke(app, args)
        assert result.exit_code == 2, result.output
        assert message in result.output
        assert snapshot(tmp_path) == before


def test_an_installed_plugin_package_runs_through_the_command(
    cli_env, image, tmp_path, example_plugin_installed
):
    path, data = image
    listed = runner.invoke(app, ["plugins"])
    assert listed.exit_code == 0 and "example-scale" in listed.output, listed.output
    out = str(tmp_path / "scaled.ome.zarr")
    result = runner.invoke(
        app, ["correct", path, "-o", out, "--plugin", "example-scale", "--param", "factor=3",
              "--channel", "0"],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    ref = open_image(out)
    np.testing.assert_array_equal(read_level(ref, 0).compute()[0], data[0] * 3)
    assert ref.provenance["parameters"]["plugin"]["class"].startswith("voxflow_example_plugin")


def test_the_voxflow_command_discovers_the_installed_package(example_plugin_installed):
    import subprocess
    import sys

    env = {**os.environ, "PYTHONPATH": str(example_plugin_installed)}
    done = subprocess.run(
        [sys.executable, "-m", "voxflow.cli", "plugins"], capture_output=True, text=True,
        env=env, check=False, timeout=120,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "example-scale" in done.stdout and "example-offset" in done.stdout


def test_normalize_to_float32_gets_display_windows_of_the_floats(cli_env, tmp_path):
    rng = np.random.default_rng(4)
    data = rng.integers(400, 3000, (2, 16, 33, 40)).astype(np.uint16)
    omero = {
        "channels": [{"label": name, "color": "00FF00", "active": True,
                      "window": {"min": 0.0, "max": 65535.0, "start": 450.0, "end": 2900.0}}
                     for name in ("a", "b")],
        "rdefs": {"model": "color"},
    }  # fmt: skip
    path = str(tmp_path / "in.ome.zarr")
    write_image(path, data, "czyx", (1.0, 2.0, 1.0, 1.0), omero=omero, chunks=8, shards=16)
    out = str(tmp_path / "out.ome.zarr")
    result = runner.invoke(
        app, ["correct", path, "-o", out, "--plugin", "normalize", "--param", "out_max=1",
              "--dtype", "float32", "--factor", "2", "--no-field"],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    ref = open_image(out)
    assert ref.dtype == "float32"
    coarsest = read_level(ref, len(ref.levels) - 1).compute()
    for c, channel in enumerate(ref.omero["channels"]):
        start, end = np.percentile(coarsest[c], (0.5, 99.8))
        low, high = coarsest[c].min(), coarsest[c].max()
        assert channel["window"] == pytest.approx(
            {"min": low, "max": high, "start": start, "end": end}
        )
        assert 0.0 <= low <= start < end <= high <= 1.0
        assert channel["label"] == "ab"[c]
    from ome_zarr_models.v05.image import Image

    Image.from_zarr(zarr.open_group(out, mode="r"))


def test_correct_help_states_the_ngff_version_default():
    result = runner.invoke(app, ["correct", "--help"], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    text = " ".join(result.output.replace("│", " ").split())
    assert "0.4 (zarr v2); default VOXFLOW_STORAGE__NGFF_VERSION, else 0.5." in text


def test_correct_rerun_served_by_the_cache_says_it_reused_the_output(cli_env, image, tmp_path):
    from tests.cli.conftest import assert_rerun_reuses

    path, _ = image
    out = str(tmp_path / "out.ome.zarr")
    args = ["correct", path, "-o", out, "--factor", "4", "--no-field"]
    assert_rerun_reuses(lambda a: runner.invoke(app, a), args, out, "wrote")
