import json
import warnings

import numpy as np
import pandas as pd
import pytest
import torch
import zarr
from scipy import ndimage

from tests.conftest import snapshot
from voxflow.io import Location, open_image, read_level, write_image
from voxflow.tasks import ScaledParams, scaled_processing, write_lightsheet
from voxflow.tasks import segment as segment_module
from voxflow.tasks.count import CountParams, count, count_run, read_regions
from voxflow.tasks.report import read_json, segmentation_figures
from voxflow.tasks.segment import InstanceParams, MaskParams, SegmentParams, segment

SPACING = (4.0, 1.6, 1.6)


def _same_up_to_renumbering(a, b):
    pairs = np.unique(np.stack([a.ravel(), b.ravel()]), axis=1)
    return (
        pairs.shape[1] == np.unique(a).size == np.unique(b).size
        and ((pairs[0] == 0) == (pairs[1] == 0)).all()
    )


@pytest.fixture(scope="module")
def lightsheet(tmp_path_factory):
    """The synthetic lightsheet volume, and its bias-corrected nuclear channel."""
    root = tmp_path_factory.mktemp("lightsheet")
    written = write_lightsheet(str(root / "data"))
    source = open_image(written["image"])
    corrected = scaled_processing(
        source, str(root / "corrected.ome.zarr"),
        ScaledParams(plugin="gaussian", factor=4, channels=(0,)),
    )  # fmt: skip
    return {**written, "corrected": corrected.url, "truth": read_json(written["ground truth"])}


@pytest.fixture(scope="module")
def counted(lightsheet, tmp_path_factory):
    """Otsu and watershed on the corrected image, counted per region, in three chunkings."""
    runs = {}
    split = InstanceParams(split="watershed", min_distance_um=5.0)
    for chunks in (None, (16, 40, 40), (7, 33, 50)):
        run = str(tmp_path_factory.mktemp("run") / "run")
        segment(lightsheet["corrected"], run, SegmentParams(chunks=chunks, instances=split))
        count(run, CountParams(atlas=lightsheet["atlas"], regions=lightsheet["regions"]))
        runs[chunks] = run
    return runs


def test_detection_f1_after_bias_correction(lightsheet, tmp_path):
    run = str(tmp_path / "run")
    segment(lightsheet["corrected"], run)  # connected components, no split
    figures = segmentation_figures(run, lightsheet["truth"])
    assert figures["f1"] >= 0.95, figures


def test_watershed_finds_touching_cells_and_counts_regions_within_5_percent(lightsheet, counted):
    figures = segmentation_figures(counted[None], lightsheet["truth"])
    assert figures["f1"] >= 0.95, figures
    assert figures["touching_cells"] >= 50
    assert figures["f1_touching"] >= 0.9, figures
    assert figures["regions_compared"] >= 10
    assert figures["max_region_error"] <= 0.05, figures["region_errors"]


def test_same_counts_for_three_chunkings(counted):
    tables = [pd.read_csv(f"{run}/regions.csv") for run in counted.values()]
    objects = [pd.read_parquet(f"{run}/objects.parquet") for run in counted.values()]
    for table, obj in zip(tables[1:], objects[1:], strict=True):
        assert table["count"].tolist() == tables[0]["count"].tolist()
        # Labels are numbered in block order, so compare objects by position.
        a = obj.sort_values(["z", "y", "x"])[["z", "y", "x", "voxels"]].to_numpy()
        b = objects[0].sort_values(["z", "y", "x"])[["z", "y", "x", "voxels"]].to_numpy()
        np.testing.assert_allclose(a, b)


def test_run_folder_layout_and_formats(lightsheet, counted):
    run = counted[(7, 33, 50)]
    from ome_zarr_models.v05.image import Image

    for name in ("mask", "labels", "counts", "density"):
        Image.from_zarr(zarr.open_group(f"{run}/{name}.ome.zarr", mode="r"))
    labels_group = zarr.open_group(f"{run}/labels.ome.zarr", mode="r")
    assert "image-label" in labels_group.attrs["ome"]
    labels = np.asarray(labels_group["0"])
    mask = np.asarray(zarr.open_group(f"{run}/mask.ome.zarr", mode="r")["0"])
    assert labels.dtype == np.uint32 and set(np.unique(mask)) <= {0, 1}
    assert ((labels > 0) == (mask > 0)).all()
    objects = pd.read_parquet(f"{run}/objects.parquet")
    n = len(np.unique(labels)) - 1
    assert len(objects) == n and objects["label"].tolist() == list(range(1, n + 1))
    for column in ("label", "z", "y", "x", "volume_um3", "mean_intensity", "max_intensity"):
        assert column in objects
    np.testing.assert_allclose(objects["z_um"], objects["z"] * SPACING[0])
    np.testing.assert_allclose(objects["volume_um3"], objects["voxels"] * np.prod(SPACING))
    com = ndimage.center_of_mass(mask, labels, objects["label"])
    np.testing.assert_allclose(objects[["z", "y", "x"]], np.asarray(com), atol=1e-9)
    regions = pd.read_csv(f"{run}/regions.csv")
    for column in ("id", "acronym", "name", "count", "volume_mm3", "density_per_mm3"):
        assert column in regions
    counts = np.asarray(zarr.open_group(f"{run}/counts.ome.zarr", mode="r")["0"])
    assert counts.sum() == len(objects)
    png = open(f"{run}/qc/overview.png", "rb").read()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"


def test_rerun_recomputes_nothing_and_a_changed_split_only_downstream(
    lightsheet, tmp_path, monkeypatch
):
    calls = {"threshold": 0, "label": 0, "watershed": 0, "objects": 0}

    def counting(name, fn):
        def wrapped(*args, **kwargs):
            calls[name] += 1
            return fn(*args, **kwargs)

        return wrapped

    monkeypatch.setattr(segment_module, "apply_threshold",
                        counting("threshold", segment_module.apply_threshold))  # fmt: skip
    monkeypatch.setattr(segment_module, "label", counting("label", segment_module.label))
    monkeypatch.setattr(segment_module, "watershed_split",
                        counting("watershed", segment_module.watershed_split))  # fmt: skip
    monkeypatch.setattr(segment_module, "object_table",
                        counting("objects", segment_module.object_table))  # fmt: skip
    run = str(tmp_path / "run")
    first = segment(lightsheet["corrected"], run)
    assert first.computed == ("mask", "labels", "objects")
    assert calls == {"threshold": 1, "label": 1, "watershed": 0, "objects": 1}
    before = snapshot(tmp_path)
    again = segment(lightsheet["corrected"], run)
    assert again.computed == () and again.step_keys == first.step_keys
    assert calls == {"threshold": 1, "label": 1, "watershed": 0, "objects": 1}
    assert snapshot(tmp_path) == before
    split = SegmentParams(instances=InstanceParams(split="watershed", min_distance_um=5.0))
    segment(lightsheet["corrected"], run, split)
    assert calls == {"threshold": 1, "label": 1, "watershed": 1, "objects": 2}
    closer = SegmentParams(instances=InstanceParams(split="watershed", min_distance_um=4.0))
    result = segment(lightsheet["corrected"], run, closer)
    assert result.computed == ("labels", "objects")
    assert calls == {"threshold": 1, "label": 1, "watershed": 2, "objects": 3}


def test_count_reruns_are_cached(lightsheet, tmp_path):
    run = str(tmp_path / "run")
    segment(lightsheet["corrected"], run)
    params = CountParams(atlas=lightsheet["atlas"], regions=lightsheet["regions"])
    assert count(run, params).computed == ("counts", "regions", "qc")
    assert count(run, params).computed == ()
    assert count(run, params.model_copy(update={"block_um": 50.0})).computed == ("counts",)


def _records_match_the_folder(run):
    """Whether the step records list exactly the outputs the run folder holds."""
    listed = set()
    for record in (run / "steps").glob("*.json"):
        listed |= set(json.loads(record.read_text())["outputs"])
    held = {p.name for p in run.iterdir() if p.name not in ("run.json", "steps", "qc")}
    held |= {f"qc/{p.name}" for p in run.glob("qc/*")}
    return listed == held


def test_count_without_an_atlas_removes_the_region_table_of_an_earlier_count(
    lightsheet, tmp_path, monkeypatch
):
    run = tmp_path / "run"
    segment(lightsheet["corrected"], str(run))
    params = CountParams(atlas=lightsheet["atlas"], regions=lightsheet["regions"])
    assert count(str(run), params).computed == ("counts", "regions", "qc")
    assert (run / "regions.csv").exists() and (run / "steps/regions.json").exists()
    deleted = []
    delete = Location.delete
    monkeypatch.setattr(Location, "delete",
                        lambda loc, key="": deleted.append(f"{loc.url}/{key}".rstrip("/"))
                        or delete(loc, key))  # fmt: skip
    counted = count(str(run), CountParams())
    assert counted.regions is None and counted.rows == () and counted.notes == ()
    assert counted.computed == ("qc",)  # the same maps; the picture loses its bar chart
    assert not (run / "regions.csv").exists()
    assert not (run / "steps/regions.json").exists()
    where = f"{run}/"
    assert deleted.index(where + "steps/regions.json") < deleted.index(where + "regions.csv")
    assert _records_match_the_folder(run)
    monkeypatch.undo()
    assert count(str(run), params).computed == ("regions", "qc")  # and back with the atlas
    assert _records_match_the_folder(run)


def test_an_interrupted_rerun_leaves_no_later_step_done(lightsheet, tmp_path, monkeypatch):
    """A rerun that redoes the labels and stops half-way must not leave the old objects and
    counts looking done: counting them would report the old parameters' objects."""
    import voxflow.tasks.segment as seg

    run = tmp_path / "run"
    segment(lightsheet["corrected"], str(run))
    count(str(run), CountParams())
    assert {"mask", "labels", "objects", "counts", "qc"} <= {
        p.stem for p in (run / "steps").iterdir()
    }

    def stop(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(seg, "_make_labels", stop)
    other = SegmentParams.model_validate({"instances": {"connectivity": 6}})
    with pytest.raises(KeyboardInterrupt):
        segment(lightsheet["corrected"], str(run), other)
    assert {p.stem for p in (run / "steps").iterdir()} == {"mask"}
    for made_later in ("objects.parquet", "counts.ome.zarr", "density.ome.zarr", "qc"):
        assert not (run / made_later).exists(), made_later
    with pytest.raises(FileNotFoundError, match="no finished segmentation"):
        count(str(run), CountParams())
    monkeypatch.undo()
    done = segment(lightsheet["corrected"], str(run), other)
    assert done.computed == ("labels", "objects")
    assert count(str(run), CountParams()).computed == ("counts", "qc")


def test_discard_removes_a_step_record_first_then_its_outputs(lightsheet, tmp_path, monkeypatch):
    from voxflow.tasks._run import RunFolder

    run = tmp_path / "run"
    segment(lightsheet["corrected"], str(run))
    segmented = snapshot(run)
    count(str(run), CountParams(atlas=lightsheet["atlas"], regions=lightsheet["regions"]))
    folder = RunFolder(str(run))
    deleted = []
    delete = Location.delete

    def record(loc, key=""):
        deleted.append((loc.url, key))
        return delete(loc, key)

    monkeypatch.setattr(Location, "delete", record)
    folder.discard("counts")
    keys = [key or url.rsplit("/", 1)[-1] for url, key in deleted]
    assert keys.index("steps/counts.json") < keys.index("counts.ome.zarr")
    assert keys.index("zarr.json") < keys.index("counts.ome.zarr"), "group metadata first"
    monkeypatch.undo()
    folder.discard_all_but(["mask", "labels", "objects"])
    assert snapshot(run) == segmented and _records_match_the_folder(run)
    assert not (run / "qc").exists(), "a folder the removal empties goes too"
    folder.discard("qc")  # nothing left to remove
    assert snapshot(run) == segmented


def test_an_atlas_without_a_region_table_counts_per_atlas_id_and_warns_once(lightsheet, tmp_path):
    run = str(tmp_path / "run")
    segment(lightsheet["corrected"], run)
    params = CountParams(atlas=lightsheet["atlas"])
    with pytest.warns(UserWarning) as record:
        counted = count(run, params)
    assert counted.notes == (
        "no region table (--regions): regions.csv has one row per atlas id, labelled by the id, "
        "without region names or parents",
    )
    assert [str(w.message) for w in record if "region" in str(w.message)] == list(counted.notes)
    assert counted.unlisted == ()
    rows = pd.read_csv(tmp_path / "run/regions.csv", dtype={"acronym": str})
    atlas = np.asarray(read_level(open_image(lightsheet["atlas"])))
    ids = [int(i) for i in np.unique(atlas) if i != 0]
    assert rows["id"].tolist() == [*ids, 0]
    assert rows["acronym"].tolist() == [*map(str, ids), "outside"]
    assert rows["parent_id"].isna().all()
    assert rows["count"].sum() == counted.objects
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the task returns the note; its flow warns it
        assert count_run.fn(run, params).notes == counted.notes


def test_a_region_table_without_rows_is_refused_before_anything_is_written(lightsheet, tmp_path):
    run = tmp_path / "run"
    segment(lightsheet["corrected"], str(run))
    segmented = snapshot(run)
    empty = tmp_path / "empty.csv"
    empty.write_text("id,acronym,name,parent_id\n")
    message = "region table .* needs one row per region, got none in .*empty.csv"
    with pytest.raises(ValueError, match=message):
        read_regions(str(empty))
    with pytest.raises(ValueError, match=message):
        count(str(run), CountParams(atlas=lightsheet["atlas"], regions=str(empty)))
    assert snapshot(run) == segmented


def test_binary_input_is_used_as_the_mask(tmp_path):
    rng = np.random.default_rng(1)
    mask = (ndimage.gaussian_filter(rng.random((20, 30, 40)), 2) > 0.52).astype(np.uint8)
    write_image(str(tmp_path / "mask.ome.zarr"), mask, "zyx", (2.0, 1.0, 1.0))
    result = segment(str(tmp_path / "mask.ome.zarr"), str(tmp_path / "run"),
                     SegmentParams(instances=InstanceParams(connectivity=6)))  # fmt: skip
    assert result.threshold is None
    labels = np.asarray(read_level(open_image(str(tmp_path / "run/labels.ome.zarr"))))
    ref, n = ndimage.label(mask)
    assert result.objects == n and _same_up_to_renumbering(labels, ref)


def test_a_mask_that_is_not_binary_is_refused_before_anything_is_written(lightsheet, tmp_path):
    with pytest.raises(ValueError, match="not a binary"):
        segment(lightsheet["corrected"], str(tmp_path / "run"),
                SegmentParams(mask=MaskParams(is_mask=True)))  # fmt: skip
    assert not (tmp_path / "run").exists()


def test_empty_volume_gives_zero_objects(tmp_path):
    write_image(str(tmp_path / "empty.ome.zarr"), np.full((8, 16, 16), 7, np.uint16), "zyx",
                (1.0, 1.0, 1.0))  # fmt: skip
    result = segment(str(tmp_path / "empty.ome.zarr"), str(tmp_path / "run"))
    assert result.objects == 0
    objects = pd.read_parquet(tmp_path / "run/objects.parquet")
    assert len(objects) == 0 and "label" in objects
    counted = count(str(tmp_path / "run"))
    assert counted.objects == 0


def test_size_filter_in_physical_units(lightsheet, tmp_path):
    voxel = float(np.prod(SPACING))
    params = SegmentParams(instances=InstanceParams(min_volume_um3=40 * voxel))
    segment(lightsheet["corrected"], str(tmp_path / "run"), params)
    objects = pd.read_parquet(tmp_path / "run/objects.parquet")
    assert len(objects) and objects["voxels"].min() >= 40


def test_atlas_in_another_space_is_refused(lightsheet, tmp_path):
    run = str(tmp_path / "run")
    segment(lightsheet["corrected"], run)
    atlas = np.ones((4, 4, 4), np.uint32)
    far = str(tmp_path / "far.ome.zarr")
    write_image(far, atlas, "zyx", (10.0, 10.0, 10.0), translation=(1e5, 1e5, 1e5))
    with pytest.raises(ValueError, match="overlap"):
        count(run, CountParams(atlas=far))
    assert not (tmp_path / "run/regions.csv").exists()
    assert not (tmp_path / "run/counts.ome.zarr").exists()


def test_region_table_missing_ids_warns_and_reports_unlisted(lightsheet, tmp_path):
    run = str(tmp_path / "run")
    segment(lightsheet["corrected"], run)
    table = pd.read_csv(lightsheet["regions"])
    leaf = int(table.loc[table["is_leaf"], "id"].iloc[-1])
    table[table["id"] != leaf].to_csv(tmp_path / "partial.csv", index=False)
    with pytest.warns(UserWarning, match=str(leaf)):
        counted = count(run, CountParams(atlas=lightsheet["atlas"],
                                         regions=str(tmp_path / "partial.csv")))  # fmt: skip
    assert counted.unlisted == (leaf,)
    rows = pd.read_csv(tmp_path / "run/regions.csv")
    assert rows.loc[rows["id"] == leaf, "acronym"].item() == "unlisted"


class Brightness(torch.nn.Module):
    """A tiny 'model': a fixed 3×3×3 mean filter, then a steep sigmoid around a level."""

    def __init__(self, level: float):
        super().__init__()
        self.conv = torch.nn.Conv3d(1, 1, 3, padding=1, bias=False)
        torch.nn.init.constant_(self.conv.weight, 1 / 27)
        self.level = level

    def forward(self, x):
        return torch.sigmoid((self.conv(x) - self.level) * 0.5)


def test_model_prediction_segments_like_its_threshold(lightsheet, tmp_path):
    level = float(segment(lightsheet["corrected"], str(tmp_path / "otsu")).threshold)
    path = tmp_path / "model.pt"
    torch.jit.script(Brightness(level)).save(str(path))
    params = SegmentParams(mask=MaskParams(model=str(path), halo=2, tile=32))
    run = str(tmp_path / "model-run")
    segment(lightsheet["corrected"], run, params)
    mask = np.asarray(read_level(open_image(f"{run}/mask.ome.zarr")))
    image = np.asarray(read_level(open_image(lightsheet["corrected"])))[0].astype(np.float32)
    ref = ndimage.uniform_filter(image, 3, mode="constant") > level
    assert (mask.astype(bool) != ref).mean() < 1e-3
    provenance = json.loads(open(f"{run}/steps/mask.json").read())
    assert provenance["method"] == "model"


def test_a_model_that_does_not_load_is_refused_before_anything_is_written(lightsheet, tmp_path):
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a model")
    with pytest.raises(ValueError, match=r"bad\.pt"):
        segment(lightsheet["corrected"], str(tmp_path / "run"),
                SegmentParams(mask=MaskParams(model=str(bad))))  # fmt: skip
    assert not (tmp_path / "run").exists()


def test_a_model_with_the_wrong_output_shape_is_refused(lightsheet, tmp_path):
    path = tmp_path / "pool.pt"
    torch.jit.script(torch.nn.MaxPool3d(2)).save(str(path))
    with pytest.raises(ValueError, match="shape"):
        segment(lightsheet["corrected"], str(tmp_path / "run"),
                SegmentParams(mask=MaskParams(model=str(path))))  # fmt: skip
    assert not (tmp_path / "run").exists()


def test_a_folder_holding_something_else_needs_overwrite(lightsheet, tmp_path):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="overwrite"):
        segment(lightsheet["corrected"], str(tmp_path / "run"))
    assert (tmp_path / "run" / "notes.txt").read_text() == "mine"


def test_input_is_never_written(lightsheet, tmp_path):
    before = snapshot(lightsheet["corrected"])
    segment(lightsheet["corrected"], str(tmp_path / "run"))
    assert snapshot(lightsheet["corrected"]) == before


def test_global_threshold_from_a_pyramid_level_is_recorded(lightsheet, tmp_path):
    from voxflow.core.threshold import global_threshold

    ref = open_image(lightsheet["corrected"])
    assert len(ref.levels) > 1
    run = str(tmp_path / "run")
    params = SegmentParams(mask=MaskParams(threshold="li", threshold_level=1))
    result = segment(lightsheet["corrected"], run, params)
    level1 = np.asarray(read_level(ref, 1))[0]
    assert result.threshold == pytest.approx(global_threshold(level1, "li"))
    record = json.loads(open(f"{run}/steps/mask.json").read())
    assert record["histogram_level"] == 1 and record["method"] == "li"
    group = json.loads(open(f"{run}/mask.ome.zarr/zarr.json").read())
    assert group["attributes"]["voxflow"]["parameters"]["histogram_level"] == 1


def test_local_threshold_equals_scikit_image_on_the_whole_volume(lightsheet, tmp_path):
    from skimage.filters import threshold_local

    run = str(tmp_path / "run")
    params = SegmentParams(mask=MaskParams(threshold="local", block_size=15, offset=-20),
                           chunks=(9, 40, 33))  # fmt: skip
    segment(lightsheet["corrected"], run, params)
    image = np.asarray(read_level(open_image(lightsheet["corrected"])))[0]
    want = image > threshold_local(image, 15, offset=-20)
    got = np.asarray(read_level(open_image(f"{run}/mask.ome.zarr"))).astype(bool)
    assert (got == want).all()


def test_threshold_level_that_does_not_exist(lightsheet, tmp_path):
    with pytest.raises(ValueError, match="threshold_level"):
        segment(lightsheet["corrected"], str(tmp_path / "run"),
                SegmentParams(mask=MaskParams(threshold_level=20)))  # fmt: skip
    assert not (tmp_path / "run").exists()


# --------------------------------------------------------------------------- physical units

# Micrometres per unit, for the references of these tests only.
_UM = {None: 1.0, "micrometer": 1.0, "nanometer": 1e-3, "millimeter": 1e3}
_IMAGE_UM = {"scale": (0.2, 0.05, 0.05), "translation": (0.3, -1.0, 2.0)}
_ATLAS_UM = {"scale": (0.4, 0.2, 0.2)}
_TINY_SHAPE = (10, 32, 28)


def _tiny_image():
    """Irregular bright blobs of many sizes on a dim background, and their 26-labels."""
    rng = np.random.default_rng(7)
    blobs = ndimage.gaussian_filter(rng.standard_normal(_TINY_SHAPE), 1.2) > 0.22
    image = np.where(blobs, 300, 20).astype(np.uint16)
    labels, n = ndimage.label(blobs, np.ones((3, 3, 3)))
    return image, labels, n


def _tiny_atlas():
    """Four region ids (and some 0) on a grid of twice the image's voxel in z, four in y, x."""
    z, _, x = np.indices((5, 8, 7))
    atlas = (1 + (x >= 3) + 2 * (z >= 2)).astype(np.uint16)
    atlas[:, :1] = 0
    return atlas


def _in_unit(values_um, unit):
    return tuple(v / _UM[unit] for v in values_um)


def _write_tiny(path, unit, atlas_unit):
    """The tiny image and atlas written with their geometry in `unit` and `atlas_unit`."""
    image, _, _ = _tiny_image()
    scale, trans = _IMAGE_UM["scale"], _IMAGE_UM["translation"]
    write_image(str(path / "image.ome.zarr"), image, "zyx", _in_unit(scale, unit),
                translation=_in_unit(trans, unit), units=(unit,) * 3,
                chunks=(4, 12, 10), shards=(8, 24, 20))  # fmt: skip
    # Atlas voxel boundaries on image voxel boundaries.
    a_scale = _ATLAS_UM["scale"]
    a_trans = tuple(t + 0.5 * (a - s) for t, a, s in zip(trans, a_scale, scale, strict=True))
    write_image(str(path / "atlas.ome.zarr"), _tiny_atlas(), "zyx",
                _in_unit(a_scale, atlas_unit), translation=_in_unit(a_trans, atlas_unit),
                units=(atlas_unit,) * 3)  # fmt: skip
    for name in ("image", "atlas") if unit is None else ():
        # An axis without a unit: remove the unit the writer fills in.
        meta = path / f"{name}.ome.zarr" / "zarr.json"
        doc = json.loads(meta.read_text())
        for axis in doc["attributes"]["ome"]["multiscales"][0]["axes"]:
            axis.pop("unit", None)
        meta.write_text(json.dumps(doc))
    return str(path / "image.ome.zarr"), str(path / "atlas.ome.zarr")


def _tiny_reference(min_voxels, block):
    """Objects, count and density maps and region rows of the tiny image, by hand."""
    _, labels, n = _tiny_image()
    index = np.arange(1, n + 1)
    voxels = ndimage.sum(np.ones(labels.shape), labels, index)
    keep = index[voxels >= min_voxels]
    centroids = np.array(ndimage.center_of_mass(np.ones(labels.shape), labels, keep))
    scale, trans = np.asarray(_IMAGE_UM["scale"]), np.asarray(_IMAGE_UM["translation"])
    points = trans + centroids * scale
    kept = voxels[voxels >= min_voxels]
    objects = {"points": points, "voxels": kept, "volume": kept * np.prod(scale),
               "centroids": centroids}  # fmt: skip
    cells = tuple(-(-s // b) for s, b in zip(_TINY_SHAPE, block, strict=True))
    counts, density = np.zeros(cells), np.zeros(cells)
    for c in centroids:
        counts[tuple(int(np.floor(v + 0.5)) // b for v, b in zip(c, block, strict=True))] += 1
    for cell in np.ndindex(*cells):
        size = [min(b, s - i * b) for i, b, s in zip(cell, block, _TINY_SHAPE, strict=True)]
        density[cell] = counts[cell] / (np.prod(size) * np.prod(scale) / 1e9)
    atlas = _tiny_atlas()
    a_scale = np.asarray(_ATLAS_UM["scale"])
    a_trans = trans + 0.5 * (a_scale - scale)
    ids = []
    for p in points:
        i = np.floor((p - a_trans) / a_scale + 0.5).astype(int)
        inside = all(0 <= v < s for v, s in zip(i, atlas.shape, strict=True))
        ids.append(int(atlas[tuple(i)]) if inside else 0)
    midline = a_trans[2] + (atlas.shape[2] - 1) / 2 * a_scale[2]
    left = points[:, 2] < midline
    rows = {}
    for rid in sorted({*np.unique(atlas).tolist(), *ids}):
        volume = np.count_nonzero(atlas == rid) * np.prod(a_scale) / 1e9
        count_ = sum(1 for i in ids if i == rid)
        rows[rid] = {"count": count_, "volume_mm3": volume,
                     "density_per_mm3": count_ / volume if volume else 0.0,
                     "count_left": int(sum(1 for i, s in zip(ids, left, strict=True)
                                           if i == rid and s))}  # fmt: skip
    return objects, counts, density, rows


def _segment_and_count_tiny(path, unit, atlas_unit, *, split="none"):
    image, atlas = _write_tiny(path, unit, atlas_unit)
    voxel_um3 = float(np.prod(_IMAGE_UM["scale"]))
    instances = InstanceParams(split=split, min_volume_um3=10.5 * voxel_um3,
                               min_distance_um=0.3)  # fmt: skip
    run = str(path / "run")
    segment(image, run, SegmentParams(mask=MaskParams(threshold="100"), instances=instances))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # no region table: one row per atlas id
        count(run, CountParams(block_um=0.4, atlas=atlas, split_axis="x"))
    return run


def _physical(run, name):
    """Scale and translation (z, y, x) of a run's image converted to micrometres."""
    ref = open_image(f"{run}/{name}.ome.zarr")
    factor = np.asarray([_UM[u] for u in ref.units])
    return ref.levels[0].scale * factor, ref.levels[0].translation * factor, ref.units


@pytest.mark.parametrize(("unit", "atlas_unit"), [("micrometer", "micrometer"),
                                                  ("nanometer", "millimeter"),
                                                  (None, None)])  # fmt: skip
def test_objects_counts_and_regions_are_in_micrometres_whatever_the_axis_unit(
    tmp_path, unit, atlas_unit
):
    run = _segment_and_count_tiny(tmp_path, unit, atlas_unit)
    block = (2, 8, 8)  # 0.4 µm over voxels of 0.2, 0.05, 0.05 µm
    ref_objects, ref_counts, ref_density, ref_rows = _tiny_reference(11, block)
    objects = pd.read_parquet(f"{run}/objects.parquet").sort_values(["z", "y", "x"])
    order = np.lexsort(ref_objects["centroids"].T[::-1])
    assert len(objects) == len(order) > 5
    np.testing.assert_allclose(objects[["z", "y", "x"]], ref_objects["centroids"][order])
    np.testing.assert_allclose(objects[["z_um", "y_um", "x_um"]], ref_objects["points"][order],
                               rtol=1e-12, atol=1e-12)  # fmt: skip
    np.testing.assert_array_equal(objects["voxels"], ref_objects["voxels"][order])
    np.testing.assert_allclose(objects["volume_um3"], ref_objects["volume"][order], rtol=1e-12)
    counts = np.asarray(read_level(open_image(f"{run}/counts.ome.zarr")))
    density = np.asarray(read_level(open_image(f"{run}/density.ome.zarr")))
    np.testing.assert_array_equal(counts, ref_counts)
    np.testing.assert_allclose(density, ref_density, rtol=1e-6)
    rows = pd.read_csv(f"{run}/regions.csv").set_index("id")
    assert sorted(rows.index) == sorted(ref_rows)
    for rid, want in ref_rows.items():
        for column, value in want.items():
            assert rows.loc[rid, column] == pytest.approx(value, rel=1e-9), (rid, column)
    # The outputs keep the input's unit, and their geometry is right in micrometres.
    for name in ("mask", "labels"):
        scale, trans, units = _physical(run, name)
        np.testing.assert_allclose(scale, _IMAGE_UM["scale"], rtol=1e-12)
        np.testing.assert_allclose(trans, _IMAGE_UM["translation"], rtol=1e-12)
        assert units == (unit or "micrometer",) * 3
    first = np.asarray(_IMAGE_UM["translation"])
    for name in ("counts", "density"):
        scale, trans, units = _physical(run, name)
        np.testing.assert_allclose(scale, (0.4, 0.4, 0.4), rtol=1e-12)
        np.testing.assert_allclose(trans, first + (np.asarray(block) - 1) / 2
                                   * np.asarray(_IMAGE_UM["scale"]), rtol=1e-12)  # fmt: skip
        assert units == (unit or "micrometer",) * 3


def test_the_watershed_distance_is_in_micrometres_whatever_the_axis_unit(tmp_path):
    runs = [_segment_and_count_tiny(tmp_path / u, u, u, split="watershed")
            for u in ("micrometer", "nanometer")]  # fmt: skip
    um, nm = (pd.read_parquet(f"{run}/objects.parquet") for run in runs)
    labels = [np.asarray(read_level(open_image(f"{run}/labels.ome.zarr"))) for run in runs]
    assert _same_up_to_renumbering(*labels)
    pd.testing.assert_frame_equal(um, nm, rtol=1e-12)


@pytest.mark.parametrize(
    ("units", "where"),
    [(("second", "micrometer", "micrometer"), "z"), (("micrometer", "furlong", "micrometer"), "y")],
)
def test_an_axis_whose_unit_is_not_a_length_is_refused_before_anything_is_written(
    tmp_path, units, where
):
    image, _, _ = _tiny_image()
    path = str(tmp_path / "image.ome.zarr")
    write_image(path, image, "zyx", (0.2, 0.05, 0.05), units=units)
    bad = next(u for u in units if u != "micrometer")
    with pytest.raises(ValueError, match=rf"axis {where} .* unit '{bad}'.* not a length"):
        segment(path, str(tmp_path / "run"))
    assert not (tmp_path / "run").exists()
    good = str(tmp_path / "good.ome.zarr")
    write_image(good, image, "zyx", (0.2, 0.05, 0.05))
    run = tmp_path / "good-run"
    segment(good, str(run), SegmentParams(mask=MaskParams(threshold="100")))
    before = snapshot(run)
    with pytest.raises(ValueError, match=rf"axis {where} .* unit '{bad}'.* not a length"):
        count(str(run), CountParams(atlas=path))
    assert snapshot(run) == before


@pytest.mark.parametrize("version", ["0.4", "0.5"])
def test_counting_writes_the_ngff_version_of_the_run(tmp_path, version):
    from ome_zarr_models.v04.image import Image as Image04
    from ome_zarr_models.v05.image import Image as Image05

    image, _ = _write_tiny(tmp_path, "micrometer", "micrometer")
    run = tmp_path / "run"
    params = SegmentParams(mask=MaskParams(threshold="100"), ngff_version=version)
    segment(image, str(run), params)
    count(str(run), CountParams(block_um=0.4))
    model = Image04 if version == "0.4" else Image05
    for name in ("mask", "labels", "counts", "density"):
        ref = open_image(str(run / f"{name}.ome.zarr"))
        assert ref.ngff_version == version, name
        assert ref.zarr_format == (2 if version == "0.4" else 3), name
        model.from_zarr(zarr.open_group(str(run / f"{name}.ome.zarr"), mode="r"))
        np.asarray(zarr.open_array(str(run / f"{name}.ome.zarr/0"), mode="r"))
    # Another version for the same data: every image of the run is replaced, none mixed.
    other = "0.5" if version == "0.4" else "0.4"
    segment(image, str(run), params.model_copy(update={"ngff_version": other}))
    assert count(str(run), CountParams(block_um=0.4)).computed == ("counts", "qc")
    for name in ("mask", "labels", "counts", "density"):
        ref = open_image(str(run / f"{name}.ome.zarr"))
        assert ref.ngff_version == other, name
        stale = ".zattrs" if other == "0.5" else "zarr.json"
        assert not (run / f"{name}.ome.zarr" / stale).exists(), name
