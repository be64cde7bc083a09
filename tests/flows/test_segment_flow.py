import json

import numpy as np
import pandas as pd
import pytest
from scipy import ndimage

from tests.conftest import snapshot
from voxflow.flows.segment import (
    CountingConfig,
    SegmentationConfig,
    run_counting,
    run_segmentation,
)
from voxflow.flows.view import run_layers
from voxflow.io import write_image
from voxflow.tasks.count import CountParams

pytestmark = pytest.mark.usefixtures("prefect_harness")


def _spheres(path, shape=(24, 48, 40), seed=0):
    """Bright spheres on a dim background, and an atlas splitting the volume in two."""
    rng = np.random.default_rng(seed)
    image = rng.normal(100, 5, shape)
    z, y, x = np.indices(shape)
    centres = [(6, 10, 10), (12, 30, 20), (18, 12, 30), (8, 38, 32), (17, 40, 8)]
    for cz, cy, cx in centres:
        image[(z - cz) ** 2 + ((y - cy) / 2) ** 2 + ((x - cx) / 2) ** 2 <= 4] += 400
    write_image(str(path / "image.ome.zarr"), image.astype(np.uint16), "zyx", (4.0, 2.0, 2.0),
                chunks=(8, 16, 16), shards=(16, 32, 32))  # fmt: skip
    atlas = np.where(x < shape[2] // 2, 1, 2).astype(np.uint16)
    write_image(str(path / "atlas.ome.zarr"), atlas, "zyx", (4.0, 2.0, 2.0))
    pd.DataFrame({"id": [3, 1, 2], "acronym": ["root", "L", "R"], "name": ["all", "a", "b"],
                  "parent_id": [None, 3, 3]}).to_csv(path / "regions.csv", index=False)  # fmt: skip
    return centres, image


def test_flow_segments_counts_and_reruns_from_the_run_folder(tmp_path, settings):
    centres, _image = _spheres(tmp_path)
    config = SegmentationConfig.model_validate({
        "input": str(tmp_path / "image.ome.zarr"), "run": str(tmp_path / "run"),
        "segment": {"chunks": (5, 20, 13)},
        "count": {"atlas": str(tmp_path / "atlas.ome.zarr"),
                  "regions": str(tmp_path / "regions.csv"), "block_um": 40.0},
    })  # fmt: skip
    result = run_segmentation(config, settings)
    assert result.segment.objects == len(centres)
    assert result.segment.computed == ("mask", "labels", "objects")
    objects = pd.read_parquet(tmp_path / "run/objects.parquet")
    found = objects[["z", "y", "x"]].to_numpy()
    for c in centres:
        assert np.linalg.norm(found - np.asarray(c), axis=1).min() < 0.5
    rows = pd.read_csv(tmp_path / "run/regions.csv").set_index("acronym")
    left = sum(1 for c in centres if c[2] < 20)
    assert rows.loc["L", "count"] == left and rows.loc["R", "count"] == len(centres) - left
    assert rows.loc["root", "count"] == len(centres)
    assert result.count.regions.endswith("regions.csv")
    # The region table is also a Prefect table artifact.
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        # The filter body in full: this server version refuses nulls for its optional fields.
        found = client.request("POST", "/artifacts/latest/filter", json={
            "artifacts": {"key": {"any_": ["voxflow-regions"]}}, "limit": 1, "offset": 0,
            "sort": "UPDATED_DESC",
        }).json()  # fmt: skip
    assert found and found[0]["type"] == "table"
    assert "root" in str(found[0]["data"])
    files = snapshot(tmp_path / "run")
    again = run_segmentation(config, settings)
    assert again.segment.computed == () and again.count.computed == ()
    assert snapshot(tmp_path / "run") == files, "a rerun must not write anything"
    # Counting again at another map resolution touches only the maps.
    recount = run_counting(
        CountingConfig(run=str(tmp_path / "run"), count=CountParams(block_um=20.0)), settings
    )
    assert recount.computed == ("counts", "qc") and recount.regions is None


def test_flow_with_a_torchscript_model_file(tmp_path, settings):
    """A loaded TorchScript module cannot be pickled: the model travels as its path."""
    import torch

    class Above(torch.nn.Module):
        def forward(self, x):
            return (x > 300.0).float()

    centres, image = _spheres(tmp_path)
    model = tmp_path / "above.pt"
    torch.jit.script(Above()).save(str(model))
    config = SegmentationConfig.model_validate({
        "input": str(tmp_path / "image.ome.zarr"), "run": str(tmp_path / "run"),
        "segment": {"chunks": (8, 24, 20), "mask": {"model": str(model), "halo": 0}},
    })  # fmt: skip
    result = run_segmentation(config, settings)
    assert result.segment.objects == len(centres)
    from voxflow.io import open_image, read_level

    mask = read_level(open_image(str(tmp_path / "run/mask.ome.zarr"))).compute()
    np.testing.assert_array_equal(mask.astype(bool), image.astype(np.uint16) > 300)


@pytest.mark.parametrize(("unit", "per_um"), [("micrometer", 1.0), ("nanometer", 1000.0)])
def test_view_layers_of_a_run(tmp_path, settings, unit, per_um):
    """Every layer sits in micrometres, the centroids' unit, whatever the image's unit."""
    centres, image = _spheres(tmp_path)
    src = str(tmp_path / f"image-{unit}.ome.zarr")
    write_image(src, image.astype(np.uint16), "zyx", tuple(v * per_um for v in (4.0, 2.0, 2.0)),
                units=(unit,) * 3)  # fmt: skip
    config = SegmentationConfig(input=src, run=str(tmp_path / "run"))
    run_segmentation(config, settings)
    layers = {layer.name: layer for layer in run_layers(str(tmp_path / "run"))}
    assert list(layers) == ["image", "mask", "labels", "counts", "density", "centroids"]
    assert layers["labels"].kind == "labels" and layers["centroids"].kind == "points"
    for name in ("image", "mask", "labels"):
        assert layers[name].scale == pytest.approx((4.0, 2.0, 2.0)), name
    labels = layers["labels"].data
    labels = np.asarray(labels[0] if isinstance(labels, list) else labels)
    _ref, n = ndimage.label(labels > 0, np.ones((3, 3, 3)))
    assert n == len(centres) == len(np.unique(labels)) - 1
    # The points sit on their objects, in physical coordinates.
    for z, y, x in layers["centroids"].data:
        index = tuple(round(v / s) for v, s in zip((z, y, x), (4.0, 2.0, 2.0), strict=True))
        assert labels[index] > 0
    assert layers["counts"].scale[0] > layers["image"].scale[0]


def test_view_of_a_folder_that_is_not_a_run(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a voxflow run"):
        run_layers(str(tmp_path))


def test_flow_on_multiprocess_cluster_with_watershed(tmp_path, results_dir):
    """Two single-threaded worker processes: the labelling graphs and plugins travel pickled."""
    from voxflow.settings import VoxflowSettings

    procs = VoxflowSettings(
        cluster={"mode": "local", "n_workers": 2, "threads_per_worker": 1, "processes": True},
        prefect={"result_storage": str(results_dir)},
    )
    centres, _ = _spheres(tmp_path)
    config = SegmentationConfig.model_validate({
        "input": str(tmp_path / "image.ome.zarr"), "run": str(tmp_path / "run"),
        "segment": {"chunks": (8, 16, 16),
                    "instances": {"split": "watershed", "min_distance_um": 6.0}},
        "count": {"atlas": str(tmp_path / "atlas.ome.zarr")},
    })  # fmt: skip
    result = run_segmentation(config, procs)
    assert result.segment.objects == len(centres)
    assert result.count.objects == len(centres)
    rows = pd.read_csv(tmp_path / "run/regions.csv", dtype={"acronym": str}).set_index("id")
    assert rows.loc[1, "count"] + rows.loc[2, "count"] == len(centres)
    assert rows.loc[1, "acronym"] == "1"  # no region table: each atlas id is a region


def _on_record(run):
    """The outputs the step records list, and the outputs the folder holds besides its records."""
    listed = set()
    for record in (run / "steps").glob("*.json"):
        listed |= set(json.loads(record.read_text())["outputs"])
    held = {p.relative_to(run).as_posix() for p in run.glob("*") if p.name not in
            ("run.json", "steps", "qc")} | {f"qc/{p.name}" for p in run.glob("qc/*")}  # fmt: skip
    return listed, held


def test_count_without_an_atlas_removes_the_earlier_region_table(tmp_path, settings):
    _spheres(tmp_path)
    run = tmp_path / "run"
    atlas = CountParams(atlas=str(tmp_path / "atlas.ome.zarr"),
                        regions=str(tmp_path / "regions.csv"))  # fmt: skip
    config = SegmentationConfig(input=str(tmp_path / "image.ome.zarr"), run=str(run), count=atlas)
    run_segmentation(config, settings)
    assert (run / "regions.csv").exists() and (run / "steps/regions.json").exists()
    recount = run_counting(CountingConfig(run=str(run)), settings)
    assert recount.regions is None and recount.rows == () and "qc" in recount.computed
    assert not (run / "regions.csv").exists()
    assert not (run / "steps/regions.json").exists()
    listed, held = _on_record(run)
    assert listed == held and "regions.csv" not in listed
    # The same through the segmentation flow, and the region table comes back with the atlas.
    again = run_counting(CountingConfig(run=str(run), count=atlas), settings)
    assert "regions" in again.computed and (run / "regions.csv").exists()
    plain = SegmentationConfig(input=str(tmp_path / "image.ome.zarr"), run=str(run))
    result = run_segmentation(plain, settings)
    assert result.segment.computed == () and result.count.regions is None
    assert not (run / "regions.csv").exists()
    assert not (run / "steps/regions.json").exists()
    assert _on_record(run)[0] == _on_record(run)[1]


def test_no_counting_keeps_the_counts_of_the_same_objects_and_removes_older_ones(
    tmp_path, settings
):
    _spheres(tmp_path)
    run = tmp_path / "run"
    config = SegmentationConfig.model_validate({
        "input": str(tmp_path / "image.ome.zarr"), "run": str(run),
        "count": {"atlas": str(tmp_path / "atlas.ome.zarr"),
                  "regions": str(tmp_path / "regions.csv")},
    })  # fmt: skip
    run_segmentation(config, settings)
    files = snapshot(run)
    skipped = run_segmentation(config.model_copy(update={"count": None}), settings)
    assert skipped.count is None and snapshot(run) == files  # the counts still describe them
    other = SegmentationConfig.model_validate({
        "input": config.input, "run": str(run), "count": None,
        "segment": {"instances": {"min_size": 5}},
    })  # fmt: skip
    result = run_segmentation(other, settings)
    assert "objects" in result.segment.computed
    held = sorted(p.name for p in run.iterdir())
    assert held == ["labels.ome.zarr", "mask.ome.zarr", "objects.parquet", "run.json", "steps"]
    assert sorted(p.name for p in (run / "steps").iterdir()) == [
        "labels.json", "mask.json", "objects.json"
    ]  # fmt: skip


def test_atlas_without_a_region_table_counts_per_atlas_id(tmp_path, settings):
    centres, _ = _spheres(tmp_path)
    run = str(tmp_path / "run")
    run_segmentation(SegmentationConfig(input=str(tmp_path / "image.ome.zarr"), run=run), settings)
    params = CountParams(atlas=str(tmp_path / "atlas.ome.zarr"), split_axis="x")
    with pytest.warns(UserWarning) as record:
        counted = run_counting(CountingConfig(run=run, count=params), settings)
    messages = [str(w.message) for w in record if "region" in str(w.message)]
    assert messages == [
        "no region table (--regions): regions.csv has one row per atlas id, labelled by the id, "
        "without region names or parents"
    ]
    assert counted.unlisted == () and counted.regions.endswith("regions.csv")
    rows = pd.read_csv(tmp_path / "run/regions.csv", dtype={"acronym": str})
    assert rows["id"].tolist() == [1, 2, 0]
    assert rows["acronym"].tolist() == ["1", "2", "outside"]
    assert rows["name"].tolist()[:2] == ["atlas region 1", "atlas region 2"]
    left = sum(1 for c in centres if c[2] < 20)  # atlas: 1 where x < 20, 2 elsewhere
    assert rows["count"].tolist() == [left, len(centres) - left, 0]
    assert rows["count_left"].tolist() == [left, 0, 0]
    assert [r["acronym"] for r in counted.rows] == ["1", "2", "outside"]


def test_flow_on_an_image_in_nanometres_writes_micrometres_in_the_runs_ngff_version(
    tmp_path, settings
):
    """Image in nm, atlas in µm, the run in NGFF 0.4: one physical space, one format."""
    import zarr
    from ome_zarr_models.v04.image import Image

    from voxflow.io import open_image

    centres, image = _spheres(tmp_path)
    write_image(str(tmp_path / "image-nm.ome.zarr"), image.astype(np.uint16), "zyx",
                (4000.0, 2000.0, 2000.0), units=("nanometer",) * 3)  # fmt: skip
    run = tmp_path / "run"
    config = SegmentationConfig.model_validate({
        "input": str(tmp_path / "image-nm.ome.zarr"), "run": str(run),
        "segment": {"ngff_version": "0.4", "instances": {"min_volume_um3": 100.0}},
        "count": {"atlas": str(tmp_path / "atlas.ome.zarr"),
                  "regions": str(tmp_path / "regions.csv"), "block_um": 8.0},
    })  # fmt: skip
    result = run_segmentation(config, settings)
    assert result.segment.objects == len(centres)
    objects = pd.read_parquet(run / "objects.parquet")
    for c in centres:
        want = np.asarray(c) * (4.0, 2.0, 2.0)
        assert np.linalg.norm(objects[["z_um", "y_um", "x_um"]] - want, axis=1).min() < 1.0
    np.testing.assert_allclose(objects["volume_um3"], objects["voxels"] * 16.0)
    rows = pd.read_csv(run / "regions.csv").set_index("acronym")
    left = sum(1 for c in centres if c[2] < 20)
    assert rows.loc["L", "count"] == left and rows.loc["R", "count"] == len(centres) - left
    volume_mm3 = 24 * 48 * 20 * 16.0 / 1e9  # each half of the atlas
    assert rows.loc["L", "volume_mm3"] == pytest.approx(volume_mm3, rel=1e-12)
    counts = np.asarray(zarr.open_array(str(run / "counts.ome.zarr/0"), mode="r"))
    assert counts.shape == (12, 12, 10) and counts.sum() == len(centres)
    for name in ("mask", "labels", "counts", "density"):
        group = zarr.open_group(str(run / f"{name}.ome.zarr"), mode="r")
        Image.from_zarr(group)
        ref = open_image(str(run / f"{name}.ome.zarr"))
        assert (ref.ngff_version, ref.units) == ("0.4", ("nanometer",) * 3), name
