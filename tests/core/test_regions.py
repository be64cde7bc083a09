import warnings

import dask.array as da
import numpy as np
import pandas as pd
import pytest

from voxflow.core.regions import (
    REGION_COLUMNS,
    assign_regions,
    atlas_midline,
    atlas_volumes,
    check_atlas_overlap,
    quantify_regions,
    side_of,
    validate_region_table,
)
from voxflow.core.synth import lightsheet


@pytest.fixture(scope="module")
def volume():
    return lightsheet((1, 24, 48, 48), spacing=(4.0, 1.6, 1.6), seed=3)


def _table(regions):
    return pd.DataFrame(
        [
            {"id": r.id, "acronym": r.acronym, "name": r.name, "parent_id": r.parent_id}
            for r in regions
        ]
    )


def _below(table):
    """Region id → itself and all its descendants, by a plain walk."""
    children = {i: [] for i in table["id"]}
    for i, p in zip(table["id"], table["parent_id"], strict=True):
        if not pd.isna(p):
            children[int(p)].append(int(i))

    def walk(i):
        return {i}.union(*(walk(c) for c in children[i]))

    return {int(i): walk(int(i)) for i in table["id"]}


# --------------------------------------------------------------------------- region table


def test_validate_region_table_normalises_a_copy():
    table = pd.DataFrame(
        {
            "id": [1.0, 2.0, 3.0],
            "acronym": ["a", "b", "c"],
            "name": ["A", "B", "C"],
            "parent_id": [None, 1, np.nan],
            "extra": [7, 8, 9],
        },
        index=[10, 11, 12],
    )
    got = validate_region_table(table)
    assert got["id"].dtype == np.int64 and got["id"].tolist() == [1, 2, 3]
    assert got["parent_id"].dtype == "Int64"
    assert got["parent_id"].isna().tolist() == [True, False, True]
    assert got.loc[1, "parent_id"] == 1
    assert got["extra"].tolist() == [7, 8, 9] and got.index.tolist() == [0, 1, 2]
    assert table["id"].dtype == np.float64  # the input is left alone


@pytest.mark.parametrize(
    ("change", "error", "match"),
    [
        (lambda t: t.drop(columns="name"), ValueError, r"missing \['name'\]"),
        (lambda t: t.assign(id=[1, 2, 2]), ValueError, r"unique, got repeated \[2\]"),
        (lambda t: t.assign(id=[1, 0, 3]), ValueError, "must be positive, got 0"),
        (lambda t: t.assign(id=[1, 2.5, 3]), ValueError, "'id' must hold integers, got 2.5"),
        (lambda t: t.assign(id=[1, None, 3]), ValueError, "'id' must hold integers"),
        (lambda t: t.assign(parent_id=[None, 1, 9]), ValueError, r"refer to an id.*\[9\]"),
        (lambda t: t.assign(parent_id=[None, "x", 1]), ValueError, "'parent_id' must hold int"),
        (lambda t: t.assign(parent_id=[None, 3, 2]), ValueError, "cycle"),
        (lambda t: t.assign(parent_id=[1, 1, 1]), ValueError, "cycle"),
        (lambda t: t.to_dict(), TypeError, "`table` must be a pandas DataFrame"),
    ],
)
def test_validate_region_table_rejects(change, error, match):
    table = pd.DataFrame(
        {"id": [1, 2, 3], "acronym": list("abc"), "name": list("ABC"), "parent_id": [None, 1, 1]}
    )
    with pytest.raises(error, match=match):
        validate_region_table(change(table))


# --------------------------------------------------------------------------- geometry


def test_check_atlas_overlap_returns_the_covered_fraction():
    # Image box: [-0.5, 9.5) per axis. Atlas: voxels of 2 µm from t = 4.5 → [3.5, 13.5).
    got = check_atlas_overlap((10, 10, 10), (1, 1, 1), (0, 0, 0), (5, 5, 5), (2, 2, 2), (4.5,) * 3)
    assert got == pytest.approx(0.6**3)
    inside = check_atlas_overlap((4, 4, 4), (1, 1, 1), (2, 2, 2), (10, 10, 10), (1, 1, 1), (0,) * 3)
    assert inside == pytest.approx(1.0)


def test_check_atlas_overlap_names_both_boxes_when_apart():
    with pytest.raises(
        ValueError, match=r"atlas box .*\[99.5, 109.5\).* image box .*\[-0.5, 9.5\)"
    ):
        check_atlas_overlap(
            (10, 10, 10), (1, 1, 1), (0, 0, 0), (10, 10, 10), (1, 1, 1), (100, 0, 0)
        )
    with pytest.raises(ValueError, match="`atlas_scale` must hold positive"):
        check_atlas_overlap((1, 1, 1), (1, 1, 1), (0, 0, 0), (1, 1, 1), (0, 1, 1), (0, 0, 0))


def test_side_of_and_the_default_midline():
    assert atlas_midline((4, 6, 8), (1.0, 2.0, 0.5), (0.0, 10.0, -1.0), 1) == 15.0
    assert atlas_midline((4, 6, 8), (1.0, 2.0, 0.5), (0.0, 10.0, -1.0), 2) == 0.75
    points = np.array([[0, 0, 0.7], [0, 0, 0.75], [0, 0, 0.8]])
    assert side_of(points, 2, 0.75).tolist() == [True, False, False]
    with pytest.raises(ValueError, match="`axis` must be 0, 1 or 2"):
        side_of(points, 3, 0.75)
    with pytest.raises(TypeError, match="`midline_um` must be a number"):
        side_of(points, 2, "mid")


# --------------------------------------------------------------------------- assign


def test_assign_regions_finds_the_voxel_of_each_true_centroid(volume):
    got = assign_regions(volume.centroids_um, volume.atlas, scale=volume.spacing)
    assert got.dtype == np.int64
    np.testing.assert_array_equal(got, volume.cell_regions)


def test_assign_regions_rounds_half_up_and_gives_0_off_the_grid():
    atlas = np.arange(1, 2 * 3 * 4 + 1, dtype=np.int32).reshape(2, 3, 4)
    scale, translation = (2.0, 1.0, 0.5), (10.0, 0.0, -1.0)
    points = np.array(
        [
            [10.0, 0.0, -1.0],  # voxel (0, 0, 0)
            [11.0, 1.5, -0.75],  # halves round up: (1, 2, 1)
            [10.9, 1.49, 0.24],  # (0, 1, 2)
            [8.9, 0.0, 0.0],  # z index -1: off the grid
            [10.0, 2.5, 0.0],  # y index 3: off the grid
        ]
    )
    got = assign_regions(points, atlas, scale=scale, translation=translation)
    assert got.tolist() == [atlas[0, 0, 0], atlas[1, 2, 1], atlas[0, 1, 2], 0, 0]


@pytest.mark.parametrize("chunks", [(1, 5, 7), (7, 48, 13), 48])
def test_dask_and_numpy_atlases_agree(volume, chunks):
    rng = np.random.default_rng(4)
    spacing = np.asarray(volume.spacing)
    extent = np.asarray(volume.atlas.shape) * spacing
    points = rng.uniform(-0.1 * extent, 1.1 * extent, (400, 3))
    off_grid = np.any((points < -0.5 * spacing) | (points >= extent - 0.5 * spacing), axis=1)
    lazy = da.from_array(volume.atlas, chunks=chunks)
    from_numpy = assign_regions(points, volume.atlas, scale=volume.spacing)
    from_dask = assign_regions(points, lazy, scale=volume.spacing)
    assert off_grid.sum() > 20 and (from_numpy != 0).sum() > 50
    assert (from_numpy[off_grid] == 0).all()
    np.testing.assert_array_equal(from_dask, from_numpy)


def test_a_downsampled_atlas_with_its_ngff_translation_maps_points_alike():
    rng = np.random.default_rng(5)
    coarse = rng.integers(1, 50, (5, 6, 7)).astype(np.int32)
    fine = coarse.repeat(2, 0).repeat(2, 1).repeat(2, 2)
    fine_scale = np.array([3.0, 1.0, 0.5])
    factor = 2
    # NGFF: a level downsampled by f has scale f × s and translation (f − 1) / 2 × s.
    coarse_translation = (factor - 1) / 2 * fine_scale
    points = rng.uniform(-0.5 * fine_scale, (np.array(fine.shape) - 0.5) * fine_scale, (500, 3))
    on_fine = assign_regions(points, fine, scale=fine_scale)
    on_coarse = assign_regions(
        points,
        da.from_array(coarse, chunks=3),
        scale=factor * fine_scale,
        translation=coarse_translation,
    )
    np.testing.assert_array_equal(on_coarse, on_fine)
    assert (on_fine > 0).all()


def test_assign_regions_validation():
    atlas = np.zeros((2, 2, 2), np.int32)
    with pytest.raises(ValueError, match=r"`points_um` must have shape \(N, 3\)"):
        assign_regions(np.zeros((3, 2)), atlas, scale=(1, 1, 1))
    with pytest.raises(ValueError, match="`atlas` must be a 3-D integer array"):
        assign_regions(np.zeros((1, 3)), atlas.astype(float), scale=(1, 1, 1))
    with pytest.raises(TypeError, match="`atlas` must be a NumPy or Dask array"):
        assign_regions(np.zeros((1, 3)), atlas.tolist(), scale=(1, 1, 1))
    assert assign_regions(np.zeros((0, 3)), atlas, scale=(1, 1, 1)).shape == (0,)


# --------------------------------------------------------------------------- volumes


@pytest.mark.parametrize("chunks", [None, (5, 7, 9), (24, 1, 48)])
def test_atlas_volumes_equal_np_unique_and_split_at_the_midline(volume, chunks):
    atlas = volume.atlas if chunks is None else da.from_array(volume.atlas, chunks=chunks)
    got = atlas_volumes(atlas, scale=volume.spacing, split_axis=2)
    ids, counts = np.unique(volume.atlas, return_counts=True)
    voxel_mm3 = np.prod(volume.spacing) * 1e-9
    np.testing.assert_array_equal(got["id"], ids)
    np.testing.assert_array_equal(got["voxels"], counts)
    np.testing.assert_allclose(got["volume_mm3"], counts * voxel_mm3, rtol=1e-12)
    # 48 voxels along x, midline at 23.5 voxels: the first 24 columns are left.
    left = np.unique(volume.atlas[:, :, :24], return_counts=True)
    right = np.unique(volume.atlas[:, :, 24:], return_counts=True)
    np.testing.assert_array_equal(got.set_index("id").loc[left[0], "voxels_left"], left[1])
    np.testing.assert_array_equal(got.set_index("id").loc[right[0], "voxels_right"], right[1])
    np.testing.assert_array_equal(got["voxels_left"] + got["voxels_right"], got["voxels"])
    np.testing.assert_allclose(
        got["volume_left_mm3"] + got["volume_right_mm3"], got["volume_mm3"], rtol=1e-12
    )


def test_atlas_volumes_midline_rule_on_an_odd_axis_and_a_given_midline():
    atlas = np.broadcast_to(np.arange(1, 6, dtype=np.int32), (2, 3, 5))
    scale, translation = (1.0, 1.0, 2.0), (0.0, 0.0, 10.0)  # x centres 10, 12, 14, 16, 18
    got = atlas_volumes(atlas, scale=scale, translation=translation, split_axis=2).set_index("id")
    # Default midline 14: column 3 (centre 14) is on the right, not the left.
    assert got["voxels_left"].tolist() == [6, 6, 0, 0, 0]
    assert got["voxels_right"].tolist() == [0, 0, 6, 6, 6]
    given = atlas_volumes(
        atlas, scale=scale, translation=translation, split_axis=2, midline_um=16.5
    )
    assert given["voxels_left"].tolist() == [6, 6, 6, 6, 0]
    plain = atlas_volumes(atlas, scale=scale)
    assert list(plain.columns) == ["id", "voxels", "volume_mm3"]


def test_atlas_volumes_handle_huge_ids():
    atlas = np.zeros((4, 5, 6), np.int64)
    atlas[:2] = 600_000_000
    atlas[2, :2] = 2**40
    got = atlas_volumes(da.from_array(atlas, chunks=(3, 2, 4)), scale=(1, 1, 1), split_axis=0)
    assert got["id"].tolist() == [0, 600_000_000, 2**40]
    assert got["voxels"].tolist() == [48, 60, 12]
    assert got["voxels_left"].tolist() == [0, 60, 0]  # z centres 0, 1 < midline 1.5


def test_atlas_volumes_validation():
    with pytest.raises(ValueError, match="`split_axis` must be 0, 1 or 2"):
        atlas_volumes(np.zeros((2, 2, 2), np.int32), scale=(1, 1, 1), split_axis=-1)
    with pytest.raises(TypeError, match="`split_axis` must be an integer"):
        atlas_volumes(np.zeros((2, 2, 2), np.int32), scale=(1, 1, 1), split_axis="x")
    with pytest.raises(ValueError, match="`midline_um` must be finite"):
        atlas_volumes(
            np.zeros((2, 2, 2), np.int32), scale=(1, 1, 1), split_axis=0, midline_um=np.inf
        )


# --------------------------------------------------------------------------- quantify


def test_quantify_regions_reproduces_the_synthetic_ground_truth(volume):
    table = _table(volume.regions)
    ids = assign_regions(volume.centroids_um, volume.atlas, scale=volume.spacing)
    volumes = atlas_volumes(da.from_array(volume.atlas, chunks=(7, 9, 11)), scale=volume.spacing)
    got, unlisted = quantify_regions(ids, volumes, table)
    truth = pd.DataFrame(volume.region_table())
    assert unlisted == []
    assert got["id"].tolist() == [*truth["id"], 0]
    regions = got.iloc[:-1].reset_index(drop=True)
    np.testing.assert_array_equal(regions["count"], truth["cell_count"])
    np.testing.assert_allclose(regions["volume_mm3"], truth["volume_um3"] * 1e-9, rtol=1e-12)
    np.testing.assert_allclose(regions["density_per_mm3"], truth["density_per_mm3"], rtol=1e-12)
    assert regions["count"].iloc[0] == volume.n_cells > 20  # the root holds every cell
    outside = got.iloc[-1]
    assert (outside["acronym"], outside["name"]) == ("outside", "outside the atlas regions")
    assert outside["count"] == 0
    assert outside["volume_mm3"] == pytest.approx(
        (volume.atlas == 0).sum() * np.prod(volume.spacing) * 1e-9
    )
    assert list(got.columns) == [*REGION_COLUMNS, "count", "volume_mm3", "density_per_mm3"]
    assert got["count"].dtype == np.int64 and got["parent_id"].dtype == "Int64"


def test_quantify_regions_split_left_plus_right_is_the_total(volume):
    table = _table(volume.regions)
    points = volume.centroids_um
    ids = assign_regions(points, volume.atlas, scale=volume.spacing)
    volumes = atlas_volumes(volume.atlas, scale=volume.spacing, split_axis=2)
    sides = side_of(points, 2, atlas_midline(volume.atlas.shape, volume.spacing, (0, 0, 0), 2))
    got, _ = quantify_regions(ids, volumes, table, sides=sides)
    assert list(got.columns)[7:] == [
        "count_left",
        "count_right",
        "volume_left_mm3",
        "volume_right_mm3",
        "density_left_per_mm3",
        "density_right_per_mm3",
    ]
    np.testing.assert_array_equal(got["count_left"] + got["count_right"], got["count"])
    np.testing.assert_allclose(got["volume_left_mm3"] + got["volume_right_mm3"], got["volume_mm3"])
    below = _below(table)
    for row in got.iloc[:-1].itertuples():
        inside = np.isin(ids, list(below[row.id]))
        assert row.count_left == (inside & sides).sum(), row.acronym
        assert row.count_right == (inside & ~sides).sum(), row.acronym
        if row.volume_left_mm3 > 0:
            assert row.density_left_per_mm3 == pytest.approx(row.count_left / row.volume_left_mm3)
        else:
            assert row.density_left_per_mm3 == 0
    assert 0 < got["count_left"].iloc[0] < volume.n_cells


def test_unlisted_ids_get_rows_and_one_warning(volume):
    table = _table(volume.regions)
    table = table[table["acronym"] != "TH"]  # 549 is in the atlas, no longer in the table
    ids = assign_regions(volume.centroids_um, volume.atlas, scale=volume.spacing)
    ids = np.r_[ids, 77, 77, 0]  # 77: objects in no atlas voxel and no table row; 0: outside
    volumes = atlas_volumes(volume.atlas, scale=volume.spacing)
    with pytest.warns(UserWarning, match=r"2 atlas id\(s\).*: 77, 549") as record:
        got, unlisted = quantify_regions(ids, volumes, table)
    assert len(record) == 1
    assert unlisted == [77, 549]
    tail = got.iloc[-3:]
    assert tail["id"].tolist() == [77, 549, 0]
    assert tail["acronym"].tolist() == ["unlisted", "unlisted", "outside"]
    assert tail["name"].tolist()[:2] == ["unlisted region 77", "unlisted region 549"]
    assert tail["parent_id"].isna().all()
    assert tail["count"].tolist() == [2, (ids == 549).sum(), 1]
    assert tail["volume_mm3"].iloc[0] == 0 and tail["density_per_mm3"].iloc[0] == 0
    th_voxels = (volume.atlas == 549).sum()
    assert tail["volume_mm3"].iloc[1] == pytest.approx(th_voxels * np.prod(volume.spacing) * 1e-9)
    root = got.iloc[0]
    assert root["count"] == volume.n_cells - (ids == 549).sum()  # TH no longer rolls up


@pytest.mark.parametrize("table", ["omitted", None, "empty"])
def test_quantify_regions_without_a_table_has_one_row_per_atlas_id(volume, table):
    points = volume.centroids_um
    ids = np.r_[assign_regions(points, volume.atlas, scale=volume.spacing), 77]
    midline = atlas_midline(volume.atlas.shape, volume.spacing, (0, 0, 0), 2)
    sides = np.r_[side_of(points, 2, midline), True]  # 77: an id with objects, no voxels
    volumes = atlas_volumes(volume.atlas, scale=volume.spacing, split_axis=2, midline_um=midline)
    args = {"omitted": (), None: (None,), "empty": (pd.DataFrame(columns=REGION_COLUMNS),)}
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing is missing from a table that is not there
        got, unlisted = quantify_regions(ids, volumes, *args[table], sides=sides)
    assert unlisted == []
    present = sorted((set(np.unique(volume.atlas).tolist()) | {77}) - {0})
    assert got["id"].tolist() == [*present, 0]
    assert got["acronym"].tolist() == [*map(str, present), "outside"]
    assert got["name"].tolist() == [*(f"atlas region {i}" for i in present),
                                     "outside the atlas regions"]  # fmt: skip
    assert got["parent_id"].isna().all() and got["parent_id"].dtype == "Int64"
    with pytest.warns(UserWarning, match="77"):  # a table that does not list 77
        named, _ = quantify_regions(ids, volumes, _table(volume.regions), sides=sides)
    assert list(got.columns) == list(named.columns)
    voxel_mm3 = np.prod(volume.spacing) * 1e-9
    for row in got.itertuples():  # no roll-up: each row holds its own id only
        mine = ids == row.id
        assert (row.count, row.count_left) == (mine.sum(), (mine & sides).sum())
        assert row.volume_mm3 == pytest.approx((volume.atlas == row.id).sum() * voxel_mm3)
    assert got["count"].sum() == ids.size


def test_quantify_regions_with_huge_ids_and_atlas_ids_on_parents():
    # Voxels may carry a parent's id too (coarse atlases do): it counts for that parent.
    atlas = np.zeros((2, 4, 4), np.int64)
    atlas[:, :2] = 600_000_000
    atlas[:, 2:, :2] = 600_000_001
    atlas[:, 2:, 2:] = 5
    table = pd.DataFrame(
        {
            "id": [5, 600_000_000, 600_000_001],
            "acronym": ["P", "A", "B"],
            "name": ["parent", "a", "b"],
            "parent_id": [None, 5, 5],
        }
    )
    points = np.array([[0, 0, 0], [1, 1, 3], [0, 3, 0], [1, 3, 3], [5, 5, 5]], float)
    ids = assign_regions(points, atlas, scale=(1, 1, 1))
    assert ids.tolist() == [600_000_000, 600_000_000, 600_000_001, 5, 0]
    got, unlisted = quantify_regions(ids, atlas_volumes(atlas, scale=(1, 1, 1)), table)
    assert unlisted == []
    assert got["id"].tolist() == [5, 600_000_000, 600_000_001, 0]
    assert got["count"].tolist() == [4, 2, 1, 1]
    np.testing.assert_allclose(got["volume_mm3"], np.array([32, 16, 8, 0]) * 1e-9)
    assert got["density_per_mm3"].tolist()[-1] == 0


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        (
            {"sides": np.ones(2, bool)},
            ValueError,
            r"`sides` must be a boolean array of shape \(3,\)",
        ),
        ({"sides": np.ones(3, int)}, ValueError, "`sides` must be a boolean array"),
        ({"region_ids": np.ones((3, 1), int)}, ValueError, "`region_ids` must be a 1-D integer"),
        ({"region_ids": "abc"}, TypeError, "`region_ids` must be an array"),
        ({"volumes": {}}, TypeError, "`volumes` must be a pandas DataFrame"),
        (
            {"sides": np.ones(3, bool), "volumes": pd.DataFrame({"id": [1], "volume_mm3": [1.0]})},
            ValueError,
            "split_axis",
        ),
        (
            {"volumes": pd.DataFrame({"id": [1, 1], "volume_mm3": [1.0, 2.0]})},
            ValueError,
            "`volumes` ids must be unique",
        ),
    ],
)
def test_quantify_regions_validation(kwargs, error, match):
    table = pd.DataFrame({"id": [1], "acronym": ["a"], "name": ["A"], "parent_id": [None]})
    args = {
        "region_ids": np.array([1, 1, 0]),
        "volumes": pd.DataFrame({"id": [0, 1], "volume_mm3": [1.0, 2.0]}),
        **kwargs,
    }
    with pytest.raises(error, match=match):
        quantify_regions(args.pop("region_ids"), args.pop("volumes"), table, **args)
