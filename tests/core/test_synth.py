import json

import numpy as np
import pytest
from scipy import ndimage

from voxflow.core import synth


@pytest.fixture(scope="module")
def volume():
    return synth.lightsheet((2, 32, 112, 112), seed=3)


@pytest.fixture(scope="module")
def stack():
    return synth.em_stack((5, 96, 96), seed=4)


def test_lightsheet_is_deterministic_per_seed(volume):
    again = synth.lightsheet((2, 32, 112, 112), seed=3)
    other = synth.lightsheet((2, 32, 112, 112), seed=4)
    np.testing.assert_array_equal(volume.image, again.image)
    np.testing.assert_array_equal(volume.centroids, again.centroids)
    assert not np.array_equal(volume.image, other.image)


def test_lightsheet_arrays(volume):
    assert volume.image.dtype == np.uint16 and volume.image.shape == (2, 32, 112, 112)
    assert volume.dims == "czyx"
    for name in ("bias", "clean"):
        assert getattr(volume, name).shape == (32, 112, 112)
    assert volume.cell_labels.dtype == np.int32 and volume.atlas.dtype == np.int32
    assert volume.n_cells > 10
    assert set(np.unique(volume.cell_labels)) == set(range(volume.n_cells + 1))


def test_cell_labels_sit_at_the_recorded_centroids(volume):
    touching = {c for pair in volume.touching for c in pair}
    labels = np.arange(1, volume.n_cells + 1)
    found = np.array(ndimage.center_of_mass(np.ones_like(volume.cell_labels), volume.cell_labels,
                                            labels))  # fmt: skip
    alone = np.array([lab not in touching for lab in labels])
    # the voxel grid quantises a sphere, so its centre of mass lies within half a voxel
    edge = np.all((volume.centroids > 2) & (volume.centroids < np.array([29, 109, 109])), axis=1)
    err = np.abs(found - volume.centroids)[alone & edge]
    assert err.size and err.max() < 0.5


def test_touching_pairs_touch(volume):
    assert volume.touching
    grown = {}
    for a, b in volume.touching:
        if a not in grown:
            grown[a] = ndimage.binary_dilation(volume.cell_labels == a)
        assert np.any(grown[a] & (volume.cell_labels == b)), (a, b)


def test_cells_lie_in_tissue_and_regions_count_them(volume):
    idx = tuple(np.rint(volume.centroids).astype(int).T)
    assert volume.tissue[idx].all()
    assert np.array_equal(volume.cell_regions, volume.atlas[idx])
    table = {r["id"]: r for r in volume.region_table()}
    leaves = [r for r in table.values() if r["is_leaf"]]
    assert sum(r["cell_count"] for r in leaves) == volume.n_cells
    assert table[997]["cell_count"] == volume.n_cells
    for region in volume.regions:
        children = [r for r in volume.regions if r.parent_id == region.id]
        if children:
            assert table[region.id]["cell_count"] == sum(
                table[c.id]["cell_count"] for c in children
            )
    counts = np.bincount(volume.cell_regions, minlength=max(table) + 1)
    for r in leaves:
        assert r["cell_count"] == counts[r["id"]]
        voxels = int((volume.atlas == r["id"]).sum())
        assert r["volume_voxels"] == voxels
        assert r["volume_um3"] == pytest.approx(voxels * np.prod(volume.spacing))


def test_image_is_bias_times_signal_plus_background(volume):
    inside = volume.cell_labels > 0
    observed = volume.image[0].astype(float)[inside] - volume.background
    model = (volume.bias * volume.clean)[inside]
    assert np.median(observed / model) == pytest.approx(1.0, abs=0.05)
    assert 0.3 < volume.bias.min() < volume.bias.max() <= 1.0 + 1e-6
    # smooth: neighbouring voxels of the field differ by well under 1 %
    assert np.abs(np.diff(volume.bias, axis=2)).max() < 0.01 * volume.bias.max()


def test_lightsheet_ground_truth_is_json(volume):
    truth = json.loads(json.dumps(volume.ground_truth()))
    assert truth["n_cells"] == volume.n_cells
    np.testing.assert_allclose(truth["centroids_voxel"], volume.centroids)
    np.testing.assert_allclose(truth["centroids_um"], volume.centroids * np.asarray(volume.spacing))


def test_em_transforms_and_alignment(stack):
    assert stack.image.dtype == np.uint8 and stack.image.shape == (5, 96, 96)
    np.testing.assert_allclose(stack.transforms[0], np.eye(3))
    for k in range(1, 5):
        np.testing.assert_allclose(
            stack.pairwise[k], np.linalg.inv(stack.transforms[k - 1]) @ stack.transforms[k],
            atol=1e-12,
        )  # fmt: skip
        # observed[k] samples aligned[k] at transforms[k] @ p: the inverse map recovers it
        back = ndimage.affine_transform(
            stack.image[k].astype(float), np.linalg.inv(stack.transforms[k]), order=1
        )
        (y0, y1), (x0, x1) = stack.valid_box
        box = (slice(y0 + 2, y1 - 2), slice(x0 + 2, x1 - 2))
        corr = np.corrcoef(back[box].ravel(), stack.aligned[k][box].astype(float).ravel())[0, 1]
        assert corr > 0.9, (k, corr)
    for k in range(5):
        (y0, y1), (x0, x1) = stack.valid_box
        assert stack.valid_mask[k, y0:y1, x0:x1].all()


def test_em_consecutive_slices_are_alike(stack):
    a, b = stack.aligned[1].astype(float), stack.aligned[2].astype(float)
    assert np.corrcoef(a.ravel(), b.ravel())[0, 1] > 0.5


def test_em_ground_truth_is_json(stack):
    truth = json.loads(json.dumps(stack.ground_truth()))
    np.testing.assert_allclose(truth["transforms"], stack.transforms)
    assert truth["valid_box"] == [list(stack.valid_box[0]), list(stack.valid_box[1])]


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"shape": (2, 32, 32)}, ValueError, "one size per axis"),
        ({"shape": (3, 32, 64, 64)}, ValueError, "channel count"),
        ({"shape": (2, 8, 64, 64)}, ValueError, "too small"),
        ({"shape": "big"}, TypeError, "sequence"),
        ({"seed": -1}, ValueError, "non-negative"),
        ({"spacing": (1.0, 1.0)}, ValueError, "one size per axis"),
        ({"spacing": (1.0, -1.0, 1.0)}, ValueError, "positive"),
        ({"n_cells": -2}, ValueError, "non-negative"),
        ({"cell_radius_um": 0.1}, ValueError, "at least"),
    ],
)
def test_lightsheet_validation(kwargs, error, match):
    with pytest.raises(error, match=match):
        synth.lightsheet(**kwargs)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [({"shape": (1, 64, 64)}, "too small"), ({"shape": (4, 64)}, "one size per axis")],
)
def test_em_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        synth.em_stack(**kwargs)
