import io

import pytest
from rich.console import Console

from voxflow.flows.demo import run_demo

pytestmark = pytest.mark.usefixtures("prefect_harness")


def test_demo_runs_every_stage_and_meets_the_ground_truth(tmp_path, settings):
    text = io.StringIO()
    figures = run_demo(tmp_path / "demo", console=Console(file=text, width=120),
                       settings=settings)  # fmt: skip
    shown = text.getvalue()
    assert figures["regions_kept"] == figures["regions"]
    assert figures["mean_drift"] < 0.01
    # bias correction against the synthetic truth
    assert figures["field_r"] >= 0.95
    assert figures["cell_cv_after"] <= figures["cell_cv_before"] / 2
    assert figures["background_cv_after"] <= figures["background_cv_before"] / 2
    assert "bias correction (gaussian" in shown and "r = " in shown
    assert (
        tmp_path / "demo" / "lightsheet" / "corrected.ome.zarr" / "fields" / "gaussian"
    ).is_dir()
    # segmentation, counting and regions against the synthetic truth
    assert figures["f1"] >= 0.95 and figures["f1_touching"] >= 0.9
    assert figures["max_region_error"] <= 0.05
    assert "segmentation (otsu, watershed)" in shown and "F1" in shown
    run = tmp_path / "demo" / "lightsheet" / "segmentation"
    for name in ("mask.ome.zarr", "labels.ome.zarr", "objects.parquet", "regions.csv",
                 "qc/overview.png"):  # fmt: skip
        assert (run / name).exists(), name
