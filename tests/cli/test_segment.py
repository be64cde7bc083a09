import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from tests.conftest import snapshot
from tests.flows.test_segment_flow import _spheres
from voxflow.cli import app

runner = CliRunner()


@pytest.fixture
def data(tmp_path):
    centres, _ = _spheres(tmp_path)
    return tmp_path, centres


def test_segment_and_count_commands(cli_env, data):
    path, centres = data
    run = str(path / "run")
    result = runner.invoke(app, ["segment", str(path / "image.ome.zarr"), "-o", run, "--csv",
                                 "--split", "watershed", "--min-distance", "6"])  # fmt: skip
    assert result.exit_code == 0, result.output
    assert f"{len(centres)} objects" in result.output and "threshold" in result.output
    assert len(pd.read_csv(path / "run/objects.csv")) == len(centres)
    result = runner.invoke(
        app,
        [
            "count",
            run,
            "--atlas",
            str(path / "atlas.ome.zarr"),
            "--regions",
            str(path / "regions.csv"),
            "--split-axis",
            "y",
        ],
    )
    assert result.exit_code == 0, result.output
    text = result.output.replace("\n", "")
    assert "densest regions" in text and "qc/overview.png" in text
    rows = pd.read_csv(path / "run/regions.csv").set_index("acronym")
    assert rows.loc["root", "count"] == len(centres)
    assert rows.loc["root", "count_left"] + rows.loc["root", "count_right"] == len(centres)
    again = runner.invoke(app, ["segment", str(path / "image.ome.zarr"), "-o", run, "--csv",
                                "--split", "watershed", "--min-distance", "6"])  # fmt: skip
    assert again.exit_code == 0 and "reused: mask, labels, objects" in again.output


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--threshold", "median"], "threshold"),
        (["--mask"], "not a binary"),
        (["--model", "missing.pt"], "missing.pt"),
        (["--threshold", "li", "--model", "m.pt"], "choose one"),
        (["--connectivity", "5"], "connectivity"),
        (["--channel", "3"], "channel"),
        (["--min-size", "10", "--max-size", "5"], "exclude every object"),
        (["--regions", "x.csv"], "needs an atlas"),
        (["--ngff-version", "0.3"], "ngff_version"),
    ],
)
def test_segment_bad_input_is_one_line_and_writes_nothing(cli_env, data, args, message):
    path, _ = data
    result = runner.invoke(app, ["segment", str(path / "image.ome.zarr"), "-o",
                                 str(path / "run"), *args])  # fmt: skip
    assert result.exit_code == 2, result.output
    assert message in result.output and "Traceback" not in result.output
    assert not (path / "run").exists()


def test_count_bad_input(cli_env, data, tmp_path):
    path, _ = data
    result = runner.invoke(app, ["count", str(tmp_path / "nothing")])
    assert result.exit_code == 2 and "not a voxflow run" in result.output
    run = str(path / "run")
    assert runner.invoke(app, ["segment", str(path / "image.ome.zarr"), "-o", run]).exit_code == 0
    from voxflow.io import write_image

    write_image(str(path / "far.ome.zarr"), np.ones((2, 2, 2), np.uint8), "zyx", (1.0, 1.0, 1.0),
                translation=(1e6, 0.0, 0.0))  # fmt: skip
    result = runner.invoke(app, ["count", run, "--atlas", str(path / "far.ome.zarr")])
    assert result.exit_code == 2 and "overlap" in result.output
    result = runner.invoke(app, ["count", run, "--split-axis", "q",
                                 "--atlas", str(path / "atlas.ome.zarr")])  # fmt: skip
    assert result.exit_code == 2 and "split_axis" in result.output


def test_a_region_table_without_rows_is_one_line_and_writes_nothing(cli_env, data):
    path, _ = data
    image, run = str(path / "image.ome.zarr"), path / "run"
    (path / "empty.csv").write_text("id,acronym,name,parent_id\n")
    tables = ["--atlas", str(path / "atlas.ome.zarr"), "--regions", str(path / "empty.csv")]
    result = runner.invoke(app, ["segment", image, "-o", str(run), *tables])
    assert result.exit_code == 2, result.output
    assert "needs one row per region, got none" in result.output
    assert "Traceback" not in result.output and not run.exists()
    assert runner.invoke(app, ["segment", image, "-o", str(run)]).exit_code == 0
    files = snapshot(run)
    result = runner.invoke(app, ["count", str(run), *tables])
    assert result.exit_code == 2 and "needs one row per region, got none" in result.output
    assert snapshot(run) == files


def test_a_rerun_without_atlas_leaves_no_region_table(cli_env, data):
    path, _ = data
    run = str(path / "run")
    image = str(path / "image.ome.zarr")
    atlas = ["--atlas", str(path / "atlas.ome.zarr"), "--regions", str(path / "regions.csv")]
    for first, rerun in ((["segment", image, "-o", run, *atlas], ["segment", image, "-o", run]),
                         (["count", run, *atlas], ["count", run])):  # fmt: skip
        result = runner.invoke(app, first)
        assert result.exit_code == 0, result.output
        assert "regions.csv" in result.output and (path / "run/regions.csv").exists()
        result = runner.invoke(app, rerun)
        assert result.exit_code == 0, result.output
        assert "regions.csv" not in result.output and "densest regions" not in result.output
        assert not (path / "run/regions.csv").exists(), rerun[0]
        assert not (path / "run/steps/regions.json").exists(), rerun[0]


def test_atlas_without_regions_counts_per_atlas_id_with_one_warning_line(cli_env, data):
    """What the command prints, on its real stdout and stderr (the warnings included)."""
    import os
    import subprocess
    import sys

    path, centres = data
    run = str(path / "run")
    assert runner.invoke(app, ["segment", str(path / "image.ome.zarr"), "-o", run]).exit_code == 0
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    done = subprocess.run(
        [sys.executable, "-c", "from voxflow.cli import app; app()", "count", run,
         "--atlas", str(path / "atlas.ome.zarr")],
        capture_output=True, text=True, env=env, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    warned = [line for line in done.stderr.splitlines() if "warning" in line.lower()]
    assert warned == [
        "warning: no region table (--regions): regions.csv has one row per atlas id, labelled "
        "by the id, without region names or parents"
    ], done.stderr
    assert "unlisted" not in done.stdout and "missing" not in done.stdout, done.stdout
    assert f"region counts: {run}/regions.csv" in done.stdout.splitlines()
    rows = pd.read_csv(path / "run/regions.csv", dtype={"acronym": str})
    assert rows["acronym"].tolist() == ["1", "2", "outside"]
    assert rows["count"].sum() == len(centres)


def test_view_names_the_extra_without_napari(cli_env, data, monkeypatch):
    path, _ = data
    run = str(path / "run")
    assert runner.invoke(app, ["segment", str(path / "image.ome.zarr"), "-o", run]).exit_code == 0
    import sys

    monkeypatch.setitem(sys.modules, "napari", None)
    result = runner.invoke(app, ["view", run])
    # One line, no traceback.
    assert result.exit_code == 2, result.output
    assert "error: the viewer needs napari: pip install 'voxflow[viewers]'" in result.output
    assert "Traceback" not in result.output


def test_view_opens_napari_headless(cli_env, data, monkeypatch):
    napari = pytest.importorskip("napari")  # the optional `viewers` extra
    path, _ = data
    run = str(path / "run")
    assert runner.invoke(app, ["segment", str(path / "image.ome.zarr"), "-o", run]).exit_code == 0
    from voxflow.flows.view import run_layers, show_layers

    viewer = napari.Viewer(show=False)
    try:
        show_layers(run_layers(run), viewer=viewer)
        assert [layer.name for layer in viewer.layers][:3] == ["image", "mask", "labels"]
    finally:
        viewer.close()


def test_an_error_found_inside_a_task_is_one_line(cli_env, data):
    """Prefect logs a failed task with its traceback; the command shows the error once.

    Run as a process of its own: the logs go to the real stderr, which the in-process
    runner does not see.
    """
    import os
    import subprocess
    import sys

    path, _ = data
    run = path / "run-limits"
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    done = subprocess.run(
        [sys.executable, "-c", "from voxflow.cli import app; app()", "segment",
         str(path / "image.ome.zarr"), "-o", str(run), "--min-size", "100", "--max-size", "10"],
        capture_output=True, text=True, env=env, timeout=300,
    )  # fmt: skip
    assert done.returncode == 2, done.stderr
    errors = [line for line in done.stderr.splitlines() if "error" in line.lower()]
    assert errors == ["error: the size limits exclude every object: min 100 > max 10 voxels"]
    assert "Traceback" not in done.stderr, done.stderr
    assert not run.exists()


def _versions(run):
    from voxflow.io import open_image

    return {name: open_image(f"{run}/{name}.ome.zarr").ngff_version
            for name in ("mask", "labels", "counts", "density")}  # fmt: skip


def test_segment_writes_the_ngff_version_setting_and_count_keeps_the_runs(
    cli_env, data, monkeypatch
):
    path, _ = data
    image, run = str(path / "image.ome.zarr"), path / "run"
    monkeypatch.setenv("VOXFLOW_STORAGE__NGFF_VERSION", "0.4")
    result = runner.invoke(app, ["segment", image, "-o", str(run)])
    assert result.exit_code == 0, result.output
    assert set(_versions(run).values()) == {"0.4"}
    assert (run / "counts.ome.zarr/.zattrs").exists()
    assert not (run / "counts.ome.zarr/zarr.json").exists()
    result = runner.invoke(app, ["segment", image, "-o", str(run), "--ngff-version", "0.5"])
    assert result.exit_code == 0, result.output
    assert set(_versions(run).values()) == {"0.5"}
    # Counting writes the run's version, whatever the setting says.
    result = runner.invoke(app, ["count", str(run), "--block", "20"])
    assert result.exit_code == 0, result.output
    assert set(_versions(run).values()) == {"0.5"}


def test_segment_help_states_the_ngff_version_default():
    result = runner.invoke(app, ["segment", "--help"], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    text = " ".join(result.output.replace("│", " ").split())
    assert "0.4 (zarr v2); default VOXFLOW_STORAGE__NGFF_VERSION, else 0.5." in text


def test_count_blocks_are_micrometres_for_an_image_in_nanometres(cli_env, data):
    """The repro of the audit: --block 1 on an image in nm is 1 µm, not 1 nm."""
    from voxflow.io import open_image, read_level, write_image

    path, centres = data
    um = open_image(str(path / "image.ome.zarr"))
    nm = str(path / "image-nm.ome.zarr")
    write_image(nm, read_level(um).compute(), "zyx", (4000.0, 2000.0, 2000.0),
                units=("nanometer",) * 3, chunks=(8, 16, 16), shards=(16, 32, 32))  # fmt: skip
    tables = {}
    for name, source in (("um", um.url), ("nm", nm)):
        run = str(path / f"run-{name}")
        result = runner.invoke(app, ["segment", source, "-o", run, "--min-volume", "100"])
        assert result.exit_code == 0, result.output
        result = runner.invoke(app, ["count", run, "--block", "8"])
        assert result.exit_code == 0, result.output
        tables[name] = (pd.read_parquet(f"{run}/objects.parquet"),
                        np.asarray(read_level(open_image(f"{run}/counts.ome.zarr"))),
                        np.asarray(read_level(open_image(f"{run}/density.ome.zarr"))))  # fmt: skip
    objects, counts, density = tables["nm"]
    assert len(objects) == len(centres)
    pd.testing.assert_frame_equal(objects, tables["um"][0])
    # Cells of 8 µm: 2 voxels in z, 4 in y and x, of 4 × 2 × 2 µm.
    assert counts.shape == (12, 12, 10) and counts.sum() == len(centres)
    np.testing.assert_array_equal(counts, tables["um"][1])
    np.testing.assert_allclose(density.max(), 1 / (8.0 * 8 * 8 * 1e-9), rtol=1e-6)
    np.testing.assert_allclose(density, tables["um"][2])
