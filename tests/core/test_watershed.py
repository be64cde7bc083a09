import dask
import dask.array as da
import numpy as np
import pytest
from scipy import ndimage
from skimage.segmentation import watershed

from voxflow.core._merge import Shell
from voxflow.core.watershed import _matching_pairs, flood, watershed_split

SPACING = (4.0, 1.6, 1.6)  # µm, anisotropic like a lightsheet stack
SHAPE = (20, 56, 60)
RADIUS = 9.0
MIN_DISTANCE = 6.0
SLOTS = [(40.0, 25.0, 25.0), (40.0, 25.0, 70.0), (40.0, 65.0, 25.0), (40.0, 65.0, 70.0)]
# Large enough that every block sees each pair it touches whole, with the background around it.
HALO = (10, 24, 24)


@pytest.fixture(autouse=True)
def _synchronous():
    with dask.config.set(scheduler="synchronous"):
        yield


def _grid():
    return np.meshgrid(
        *(np.arange(n) * s for n, s in zip(SHAPE, SPACING, strict=True)), indexing="ij"
    )


def _voxel(point):
    return tuple(np.round(np.asarray(point) / SPACING).astype(int))


def sphere_pairs(seed):
    """Four pairs of touching spheres (centres 1.4 radii apart) in random orientations."""
    rng = np.random.default_rng(seed)
    grid = _grid()
    mask = np.zeros(SHAPE, bool)
    centres = []
    for slot in SLOTS:
        direction = rng.normal(size=3) * (0.3, 1, 1)
        direction /= np.linalg.norm(direction)
        pair = [np.array(slot) + sign * 0.7 * RADIUS * direction for sign in (-1, 1)]
        for c in pair:
            mask |= sum((g - x) ** 2 for g, x in zip(grid, c, strict=True)) <= RADIUS**2
        centres.append(pair)
    return mask, centres


def blobs(centres, sigma=4.0):
    """An intensity image bright at the centres."""
    grid = _grid()
    image = np.zeros(SHAPE)
    for c in centres:
        image += np.exp(-sum((g - x) ** 2 for g, x in zip(grid, c, strict=True)) / (2 * sigma**2))
    return image


def _footprint(radius):
    reach = [int(radius // s) for s in SPACING]
    axes = [np.arange(-r, r + 1) * s for r, s in zip(reach, SPACING, strict=True)]
    return sum(g**2 for g in np.meshgrid(*axes, indexing="ij")) <= radius**2


def skimage_reference(mask, image=None, sigma=None):
    """The whole-array split with SciPy and scikit-image."""
    if image is None:
        surface = ndimage.distance_transform_edt(mask, sampling=SPACING)
    else:
        voxels = None if sigma is None else [sigma / s for s in SPACING]
        surface = image if sigma is None else ndimage.gaussian_filter(image, voxels, mode="nearest")
    peak = ndimage.maximum_filter(surface, footprint=_footprint(MIN_DISTANCE), mode="nearest")
    markers, _ = ndimage.label((surface == peak) & mask, np.ones((3, 3, 3)))
    return watershed(-surface, markers, mask=mask, connectivity=3)


def assert_same_up_to_renumbering(ours, n, ref):
    assert ours.dtype == np.uint32
    assert np.array_equal(ours == 0, ref == 0)
    fg = ref > 0
    pairs = np.unique(np.stack([ours[fg], ref[fg]]), axis=1)
    assert pairs.shape[1] == n == len(np.unique(ref[fg]))
    assert len(np.unique(pairs[0])) == len(np.unique(pairs[1])) == n
    assert np.array_equal(np.unique(ours[fg]), np.arange(1, n + 1))


def assert_close_to(ours, ref, min_iou=0.9):
    """Same objects; voxel for voxel up to ties the two floodings break differently."""
    assert np.array_equal(ours == 0, ref == 0)
    ids = np.unique(ref[ref > 0])
    assert len(np.unique(ours[ours > 0])) == len(ids)
    for i in ids:
        match = np.bincount(ours[ref == i]).argmax()
        union = np.count_nonzero((ours == match) | (ref == i))
        assert np.count_nonzero((ours == match) & (ref == i)) / union >= min_iou


def _split(mask, chunks, **kwargs):
    darr = da.from_array(mask, chunks=chunks)
    labels, n = watershed_split(darr, spacing=SPACING, min_distance=MIN_DISTANCE, **kwargs)
    assert labels.chunks == darr.chunks
    return labels.compute(), n


# --------------------------------------------------------------------------- distance markers


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_each_pair_splits_in_two_like_skimage(seed):
    mask, centres = sphere_pairs(seed)
    ours, n = _split(mask, SHAPE)
    assert n == 2 * len(SLOTS)
    for a, b in centres:
        assert 0 != ours[_voxel(a)] != ours[_voxel(b)] != 0
    assert_close_to(ours, skimage_reference(mask))


@pytest.mark.parametrize("chunks", [(7, 16, 17), (9, 13, 29), (20, 56, 1)])
def test_any_chunking_equals_one_chunk(chunks):
    mask, _ = sphere_pairs(3)
    whole, n_whole = _split(mask, SHAPE)
    ours, n = _split(mask, chunks, halo=HALO)
    assert n == n_whole
    assert_same_up_to_renumbering(ours, n, whole)


def test_borders_in_the_background_with_default_halo():
    mask, _ = sphere_pairs(4)
    whole, _ = _split(mask, SHAPE)
    ours, n = _split(mask, (20, 28, 30))
    assert_same_up_to_renumbering(ours, n, whole)


def test_small_object_next_to_a_large_one_is_kept():
    grid = _grid()
    big = sum((g - c) ** 2 for g, c in zip(grid, (40, 40, 40), strict=True)) <= 12**2
    small = sum((g - c) ** 2 for g, c in zip(grid, (40, 40, 56.8), strict=True)) <= 2.5**2
    assert not ndimage.binary_dilation(big, np.ones((3, 3, 3))).__and__(small).any()
    ours, n = _split(big | small, (7, 16, 17), halo=HALO)
    assert n == 2
    assert len(np.unique(ours[small])) == 1
    assert ours[small][0] not in np.unique(ours[big])


# --------------------------------------------------------------------------- image markers


@pytest.mark.parametrize("sigma", [None, 2.0])
def test_image_markers_like_skimage_and_chunk_invariant(sigma):
    mask, centres = sphere_pairs(5)
    image = blobs([c for pair in centres for c in pair]).astype(np.float32)
    whole, n_whole = _split(mask, SHAPE, image=image, sigma=sigma)
    assert n_whole == 2 * len(SLOTS)
    assert_close_to(whole, skimage_reference(mask, image.astype(np.float64), sigma))
    halo = tuple(h + 4 for h in HALO)
    ours, n = _split(
        mask, (7, 16, 17), image=da.from_array(image, chunks=5), sigma=sigma, halo=halo
    )
    assert n == n_whole
    assert_same_up_to_renumbering(ours, n, whole)


# --------------------------------------------------------------------------- sizes, edges


@pytest.mark.parametrize(("min_size", "max_size"), [(275, None), (None, 270), (260, 280)])
def test_size_filter_on_whole_objects(min_size, max_size):
    mask, _ = sphere_pairs(6)
    whole, _ = _split(mask, SHAPE)
    sizes = np.bincount(whole.ravel())
    keep = np.ones(len(sizes), bool)
    keep[0] = False
    keep &= sizes >= (min_size or 0)
    keep &= sizes <= (max_size or sizes.max())
    renumber = np.zeros(len(sizes), np.int64)
    renumber[keep] = np.arange(1, keep.sum() + 1)
    ours, n = _split(mask, (7, 16, 17), halo=HALO, min_size=min_size, max_size=max_size)
    assert 0 < n == keep.sum() < 2 * len(SLOTS)
    assert_same_up_to_renumbering(ours, n, renumber[whole])


def test_empty_mask_and_numpy_input():
    labels, n = watershed_split(np.zeros((4, 5, 6), bool))
    assert n == 0
    assert labels.numblocks == (1, 1, 1)
    assert not labels.compute().any()


def test_zero_size_chunks():
    mask, _ = sphere_pairs(7)
    whole, _ = _split(mask, SHAPE)
    ours, n = _split(mask, ((10, 0, 10), 56, (30, 0, 30)), halo=HALO)
    assert_same_up_to_renumbering(ours, n, whole)


def test_border_matching_keeps_mutual_best_pairs_only():
    # Blocks A = z [0, 4) and B = z [4, 8) of a (8, 3, 3) array; the planes z = 3 and 4 each
    # block labelled, one as its own and one in its halo. A sees one object there; B splits it
    # into 1 (12 voxels) and 2 (6 voxels). Joining every overlap would chain B's 1 and 2.
    seen_by_a = np.ones((2, 3, 3), np.int32)
    seen_by_b = np.ones((2, 3, 3), np.int32)
    seen_by_b[:, 2, :] = 2
    shell_a = Shell((((3, 0, 0), seen_by_a),))
    shell_b = Shell((((3, 0, 0), seen_by_b),))
    box_a = np.array([[3, 0, 0], [4, 3, 3]])
    box_b = np.array([[4, 0, 0], [5, 3, 3]])
    pairs = _matching_pairs(shell_a, shell_b, box_a, box_b, np.array([1, 0, 0]))
    assert pairs.tolist() == [[1, 1]]
    seen_by_a[:, 2, :] = 2  # now A splits the same way: both pairs are mutual best matches
    shell_a = Shell((((3, 0, 0), seen_by_a),))
    pairs = _matching_pairs(shell_a, shell_b, box_a, box_b, np.array([1, 0, 0]))
    assert pairs.tolist() == [[1, 1], [2, 2]]


# --------------------------------------------------------------------------- flooding


def test_flood_equals_skimage_without_ties():
    rng = np.random.default_rng(8)
    cost = rng.random((12, 30, 30))  # distinct values: no ties to break
    mask = ndimage.binary_opening(rng.random(cost.shape) < 0.8)
    markers = np.zeros(cost.shape, np.int32)
    seeds = np.s_[2::5, 3::7, 3::7]
    markers[seeds] = np.arange(1, markers[seeds].size + 1).reshape(markers[seeds].shape)
    markers[~mask] = 0
    for rank in (1, 3):
        structure = ndimage.generate_binary_structure(3, rank)
        expected = watershed(cost, markers, mask=mask, connectivity=rank)
        assert np.array_equal(flood(cost, markers, mask, structure), expected)


def test_flood_of_a_component_ignores_the_rest_of_the_array():
    rng = np.random.default_rng(9)
    cost = np.round(rng.random((10, 24, 24)) * 3)  # many ties
    mask = np.zeros(cost.shape, bool)
    mask[1:9, 2:11, 2:20] = True
    mask[1:9, 13:22, 2:20] = True  # a second component
    markers = np.zeros(cost.shape, np.int32)
    markers[4, 5, 4], markers[4, 7, 16], markers[5, 17, 9] = 1, 2, 3
    structure = ndimage.generate_binary_structure(3, 3)
    whole = flood(cost, markers, mask, structure)
    alone = flood(cost[:, :12], markers[:, :12], mask[:, :12], structure)
    assert np.array_equal(whole[:, :12], alone)


# --------------------------------------------------------------------------- validation


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"spacing": (1.0, 1.0)}, ValueError, r"`spacing` needs one number per axis \(3\)"),
        ({"spacing": "1,1,1"}, TypeError, "`spacing` must be a sequence"),
        ({"spacing": (1.0, 0.0, 1.0)}, ValueError, "`spacing` must be positive"),
        ({"min_distance": -2.0}, ValueError, "`min_distance` must be positive and finite"),
        ({"min_distance": "4"}, TypeError, "`min_distance` must be a real number"),
        ({"halo": 0}, ValueError, "`halo` must be >= 1, got 0"),
        ({"halo": (2, 2)}, ValueError, r"`halo` needs one integer per axis \(3\)"),
        ({"halo": 2.5}, TypeError, "`halo` must be an integer or a sequence"),
        ({"sigma": 1.0}, ValueError, "`sigma` smooths `image`; it needs `image`"),
        ({"image": np.zeros((3, 3, 3))}, ValueError, r"`image` must have the shape of `mask`"),
        ({"image": np.zeros(SHAPE, bool)}, TypeError, "`image` must hold integers or floats"),
        ({"image": [1, 2]}, TypeError, "`image` must be a NumPy or Dask array"),
        ({"connectivity": 8}, ValueError, r"\[6, 18, 26\], got 8"),
        ({"min_size": 3, "max_size": 2}, ValueError, "must not exceed `max_size`"),
    ],
)
def test_validation(kwargs, error, match):
    with pytest.raises(error, match=match):
        watershed_split(np.zeros(SHAPE, bool), **kwargs)


def test_validation_of_mask():
    with pytest.raises(ValueError, match="`mask` must have 3 dimensions, got 2"):
        watershed_split(np.zeros((4, 4), bool))
    with pytest.raises(TypeError, match="bool or integers"):
        watershed_split(np.zeros((4, 4, 4), np.float64))
