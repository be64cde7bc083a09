import dask
import dask.array as da
import numpy as np
import pytest
from scipy import ndimage

from voxflow.core._merge import global_lookup, label_dtype, neighbour_offsets
from voxflow.core.label import label

SHAPE = (30, 31, 29)
RANKS = {6: 1, 18: 2, 26: 3}
CHUNKINGS = [
    (7, 9, 11),  # does not divide the shape; 1- and 2-voxel edge chunks
    (1, 31, 29),  # chunks of 1 along an axis
    SHAPE,  # one chunk
    (4, 5, 6),  # chunks smaller than the objects
    (29, 30, 28),  # 1-voxel edge chunks on every axis
]


@pytest.fixture(autouse=True)
def _synchronous():
    with dask.config.set(scheduler="synchronous"):
        yield


def _structure(connectivity, ndim=3):
    return ndimage.generate_binary_structure(ndim, RANKS.get(connectivity, connectivity // 4))


def assert_same_up_to_renumbering(ours, n, ref, n_ref):
    """`ours` is `ref` with labels renamed one to one, labelled 1..n."""
    assert n == n_ref
    assert ours.dtype == np.uint32
    assert np.array_equal(ours == 0, ref == 0)
    fg = ref > 0
    pairs = np.unique(np.stack([ours[fg], ref[fg]]), axis=1)
    assert pairs.shape[1] == n  # n distinct (ours, ref) pairs ...
    assert len(np.unique(pairs[0])) == n  # ... each of ours once ...
    assert len(np.unique(pairs[1])) == n  # ... and each of the reference once
    assert np.array_equal(np.unique(ours[fg]), np.arange(1, n + 1))


def _check(mask, chunks, connectivity, **kwargs):
    ref, n_ref = ndimage.label(np.asarray(mask), _structure(connectivity, np.ndim(mask)))
    darr = da.from_array(mask, chunks=chunks)
    labels, n = label(darr, connectivity, **kwargs)
    assert isinstance(labels, da.Array)
    assert labels.chunks == darr.chunks
    assert_same_up_to_renumbering(labels.compute(), n, ref, n_ref)


def _random_mask(density, seed, dtype=bool):
    return (np.random.default_rng(seed).random(SHAPE) < density).astype(dtype)


# --------------------------------------------------------------------------- random masks


@pytest.mark.parametrize("connectivity", [6, 18, 26])
@pytest.mark.parametrize("chunks", CHUNKINGS)
@pytest.mark.parametrize("density", [0.2, 0.5])
def test_random_masks_equal_scipy(connectivity, chunks, density):
    _check(_random_mask(density, seed=int(density * 10) + connectivity), chunks, connectivity)


@pytest.mark.parametrize("connectivity", [6, 26])
@pytest.mark.parametrize("chunks", [(7, 9, 11), (4, 5, 6)])
def test_uint8_masks_equal_scipy(connectivity, chunks):
    _check(_random_mask(0.3, seed=3, dtype=np.uint8), chunks, connectivity)


def test_integer_mask_nonzero_is_foreground():
    mask = _random_mask(0.3, seed=4, dtype=np.int16) * np.int16(-7)
    _check(mask, (7, 9, 11), 26)


@pytest.mark.parametrize("chunks", [(8, 8, 8), (5, 6, 7), (1, 8, 29)])
def test_smoothed_blobs_equal_scipy(chunks):
    noise = np.random.default_rng(5).random(SHAPE)
    mask = ndimage.gaussian_filter(noise, 1.5) > 0.52
    _check(mask, chunks, 26)


@pytest.mark.parametrize("connectivity", [4, 8])
@pytest.mark.parametrize("chunks", [(5, 7), (1, 40), (40, 40)])
def test_2d_masks_equal_scipy(connectivity, chunks):
    mask = np.random.default_rng(6).random((40, 37)) < 0.45
    _check(mask, chunks, connectivity)


# --------------------------------------------------------------------------- designed cases


@pytest.mark.parametrize("connectivity", [6, 18, 26])
@pytest.mark.parametrize("direction", [(1, 1, 1), (1, -1, 1), (1, 1, 0), (0, 1, -1)])
def test_diagonal_chains_cross_block_corners(connectivity, direction):
    mask = np.zeros((20, 20, 20), bool)
    for i in range(20):
        mask[tuple(i if d > 0 else (19 - i if d < 0 else 7) for d in direction)] = True
    # Blocks of 5: the chain steps across block edges and corners.
    _check(mask, (5, 5, 5), connectivity)
    expected = 1 if connectivity >= (26 if 0 not in direction else 18) else 20
    assert label(da.from_array(mask, chunks=5), connectivity)[1] == expected


def test_helix_spanning_many_chunks_is_one_object():
    mask = np.zeros((40, 40, 40), bool)
    t = np.linspace(0, 6 * np.pi, 2000)
    z = np.round(t / t[-1] * 39).astype(int)
    y = np.round(20 + 15 * np.sin(t)).astype(int)
    x = np.round(20 + 15 * np.cos(t)).astype(int)
    mask[z, y, x] = True
    mask = ndimage.binary_dilation(mask)
    _check(mask, (5, 6, 7), 6)
    assert label(da.from_array(mask, chunks=(5, 6, 7)), 6)[1] == 1


def test_long_bars_through_every_chunk():
    mask = np.zeros(SHAPE, bool)
    mask[3, 4, :] = True
    mask[:, 10, 10] = True
    mask[20, :, 25] = True
    mask[25, 25, :] = True
    mask[25, 25, 0] = False  # a gap on the edge chunk: still one bar
    _check(mask, (4, 5, 4), 6)


def test_all_zero_mask():
    labels, n = label(da.zeros(SHAPE, dtype=bool, chunks=(7, 9, 11)))
    out = labels.compute()
    assert n == 0
    assert out.dtype == np.uint32
    assert not out.any()


@pytest.mark.parametrize("chunks", [(7, 9, 11), (1, 31, 29)])
def test_all_one_mask(chunks):
    labels, n = label(da.ones(SHAPE, dtype=np.uint8, chunks=chunks), 6)
    assert n == 1
    assert np.all(labels.compute() == 1)


def test_numpy_input_is_one_chunk():
    mask = _random_mask(0.3, seed=7)
    labels, n = label(mask)
    assert labels.numblocks == (1, 1, 1)
    ref, n_ref = ndimage.label(mask, _structure(26))
    assert_same_up_to_renumbering(labels.compute(), n, ref, n_ref)


def test_zero_size_chunks():
    mask = da.from_array(_random_mask(0.3, seed=8), chunks=((10, 0, 20), (9, 0, 22), 11))
    assert 0 in mask.chunks[0]
    ref, n_ref = ndimage.label(mask.compute(), _structure(26))
    labels, n = label(mask)
    assert labels.chunks == mask.chunks
    assert_same_up_to_renumbering(labels.compute(), n, ref, n_ref)


def test_empty_array():
    labels, n = label(np.zeros((0, 4, 4), bool))
    assert n == 0
    assert labels.shape == (0, 4, 4)
    assert labels.dtype == np.uint32


def test_repeated_compute_is_identical():
    labels, _ = label(da.from_array(_random_mask(0.3, seed=9), chunks=(7, 9, 11)))
    assert np.array_equal(labels.compute(), labels.compute())


# --------------------------------------------------------------------------- size filter


def _size_filter_reference(mask, structure, min_size, max_size):
    ref, _ = ndimage.label(mask, structure)
    sizes = np.bincount(ref.ravel())
    keep = np.ones(len(sizes), bool)
    keep[0] = False
    if min_size is not None:
        keep &= sizes >= min_size
    if max_size is not None:
        keep &= sizes <= max_size
    renumber = np.zeros(len(sizes), np.int64)
    renumber[keep] = np.arange(1, keep.sum() + 1)
    return renumber[ref], int(keep.sum())


@pytest.mark.parametrize(
    ("min_size", "max_size"), [(3, None), (None, 5), (2, 6), (12, 12), (0, 0), (10**9, None)]
)
@pytest.mark.parametrize("chunks", [(7, 9, 11), (4, 5, 6)])
def test_size_filter_equals_reference(min_size, max_size, chunks):
    mask = _random_mask(0.12, seed=10)
    ref, n_ref = _size_filter_reference(mask, _structure(18), min_size, max_size)
    labels, n = label(da.from_array(mask, chunks=chunks), 18, min_size=min_size, max_size=max_size)
    assert n == n_ref
    assert_same_up_to_renumbering(labels.compute(), n, ref, n_ref)


def test_size_filter_counts_objects_across_chunks():
    mask = np.zeros(SHAPE, bool)
    mask[5, 5, 2:20] = True  # 18 voxels over several chunks, each part smaller than 10
    mask[20, 20, 20:23] = True  # 3 voxels
    labels, n = label(da.from_array(mask, chunks=(4, 6, 6)), min_size=10)
    out = labels.compute()
    assert n == 1
    expected = mask.copy()
    expected[20, 20, 20:23] = False
    assert np.array_equal(out == 1, expected)


# --------------------------------------------------------------------------- helpers


def test_label_dtype_promotes_past_uint32():
    assert label_dtype(0) == np.uint32
    assert label_dtype(2**32 - 1) == np.uint32
    assert label_dtype(2**32) == np.uint64


def test_global_lookup_unions_and_renumbers():
    sizes = np.array([0, 2, 1, 4, 1, 3])
    edges = (np.array([1, 4]), np.array([3, 5]))
    lookup, n = global_lookup(sizes, edges, min_size=2)
    # Objects {1, 3} (6 voxels), {2} (1 voxel, removed), {4, 5} (4 voxels).
    assert n == 2
    assert lookup.dtype == np.uint32
    assert lookup[0] == 0 and lookup[2] == 0
    assert lookup[1] == lookup[3] != lookup[4] == lookup[5]
    assert sorted({int(lookup[1]), int(lookup[4])}) == [1, 2]


@pytest.mark.parametrize(("connectivity", "count"), [(6, 3), (18, 9), (26, 13)])
def test_neighbour_offsets_forward_half(connectivity, count):
    offsets = neighbour_offsets(_structure(connectivity))
    assert len(offsets) == count
    assert not set(offsets) & {tuple(-d for d in o) for o in offsets}


# --------------------------------------------------------------------------- validation


@pytest.mark.parametrize(
    ("mask", "kwargs", "error", "match"),
    [
        ("not an array", {}, TypeError, "`mask` must be a NumPy or Dask array"),
        (np.zeros(5, bool), {}, ValueError, "`mask` must have 2 or 3 dimensions, got 1"),
        (np.zeros((3, 3, 3), np.float32), {}, TypeError, "bool or integers.*float32"),
        (np.zeros((3, 3, 3), bool), {"connectivity": 8}, ValueError, r"\[6, 18, 26\], got 8"),
        (np.zeros((3, 3), bool), {}, ValueError, r"2-D mask must be one of \[4, 8\], got 26"),
        (np.zeros((3, 3, 3), bool), {"connectivity": 6.0}, TypeError, "`connectivity` must be"),
        (np.zeros((3, 3, 3), bool), {"min_size": -1}, ValueError, "`min_size` must be >= 0"),
        (np.zeros((3, 3, 3), bool), {"max_size": 2.5}, TypeError, "`max_size` must be an int"),
        (
            np.zeros((3, 3, 3), bool),
            {"min_size": 5, "max_size": 4},
            ValueError,
            r"`min_size` \(5\) must not exceed `max_size` \(4\)",
        ),
    ],
)
def test_validation(mask, kwargs, error, match):
    with pytest.raises(error, match=match):
        label(mask, **kwargs)
