import numpy as np
import pytest
import torch
from scipy import ndimage

from voxflow.core import synth
from voxflow.core.warp import (
    Interpolation,
    _cubic,
    _sample_linear,
    _sample_linear_numba,
    source_rows,
    warp_rows,
    warp_slices,
)


def random_transforms(rng, z, shape, rotation=10.0, shift=6.0, scale=0.05, shear=0.05):
    transforms, *_ = synth._draw_affines(rng, (z + 1, *shape), (rotation, shift, scale, shear))
    return transforms[1:]  # slice 0 of synth is the identity


def preimages(composed, box):
    """Source coordinates (py, px), (B, Yo, Xo), of the box's reference pixels."""
    (y0, y1), (x0, x1) = box
    yy, xx = np.meshgrid(np.arange(y0, y1), np.arange(x0, x1), indexing="ij")
    inverse = np.linalg.inv(composed)
    py = inverse[:, 0, 0, None, None] * yy + inverse[:, 0, 1, None, None] * xx
    px = inverse[:, 1, 0, None, None] * yy + inverse[:, 1, 1, None, None] * xx
    return py + inverse[:, 0, 2, None, None], px + inverse[:, 1, 2, None, None]


def inside(composed, box, shape):
    py, px = preimages(composed, box)
    return (py >= 0) & (py <= shape[0] - 1) & (px >= 0) & (px <= shape[1] - 1)


def scipy_linear(image, transform, box, fill):
    (y0, y1), (x0, x1) = box
    offset = np.array([[1.0, 0.0, y0], [0.0, 1.0, x0], [0.0, 0.0, 1.0]])
    return ndimage.affine_transform(
        image.astype(np.float64),
        np.linalg.inv(transform) @ offset,
        output_shape=(y1 - y0, x1 - x0),
        order=1,
        mode="constant",
        cval=fill,
    )


def random_slices(rng, shape, dtype):
    if np.issubdtype(dtype, np.integer):
        info = np.iinfo(dtype)
        return rng.integers(info.min, info.max, size=shape, endpoint=True).astype(dtype)
    return (rng.standard_normal(shape) * 100).astype(dtype)


# --------------------------------------------------------------------------- linear


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16, np.float32, np.float64])
@pytest.mark.parametrize(
    ("shape", "box", "filled"),
    [
        ((37, 53), None, True),
        ((37, 53), ((5, 30), (9, 50)), False),
        ((48, 31), ((-3, 40), (4, 35)), True),
    ],
)
def test_linear_matches_scipy(dtype, shape, box, filled):
    rng = np.random.default_rng(0)
    slices = random_slices(rng, (4, *shape), dtype)
    composed = random_transforms(rng, 4, shape)
    fill = 3
    got = warp_slices(slices, composed, box=box, fill=fill, device="cpu")
    full = box or ((0, shape[0]), (0, shape[1]))
    assert got.dtype == dtype
    assert got.shape == (4, full[0][1] - full[0][0], full[1][1] - full[1][0])
    valid = inside(composed, full, shape)
    py, px = preimages(composed, full)
    far = (py < -1e-6) | (py > shape[0] - 1 + 1e-6) | (px < -1e-6) | (px > shape[1] - 1 + 1e-6)
    span = float(slices.max()) - float(slices.min())
    tol = 1.0 if np.issubdtype(dtype, np.integer) else 1e-4 * span
    for k in range(4):
        want = scipy_linear(slices[k], composed[k], full, fill)
        np.testing.assert_allclose(got[k][valid[k]], want[valid[k]], atol=tol, rtol=0)
        # Preimages clearly outside the frame get the fill value.
        assert (got[k][far[k]] == fill).all()
    assert far.any() or not filled


@pytest.mark.parametrize(
    "dtype", [np.uint8, np.int8, np.uint16, np.int16, np.int32, np.float32, np.float64]
)
@pytest.mark.parametrize("box", [((0, 37), (0, 53)), ((-4, 41), (6, 47)), ((30, 60), (-20, 5))])
def test_compiled_cpu_linear_equals_torch_grid_sample(dtype, box):
    # On a CPU the bilinear warp runs a compiled kernel; on other devices torch's
    # grid_sample. Both sample the same points and fill the same pixels. The kernel packs
    # the neighbours of unsigned 8- and 16-bit slices into one word; signed ones, with
    # negative values, must not go that way.
    rng = np.random.default_rng(11)
    slices = random_slices(rng, (5, 2, 37, 53), dtype)
    composed = random_transforms(rng, 5, (37, 53), rotation=20.0, shift=10.0)
    inverse = np.linalg.inv(composed)
    compiled = _sample_linear_numba(slices, inverse, box, 7)
    grid = _sample_linear(slices, inverse, box, 7, torch.device("cpu"))
    assert compiled.dtype == grid.dtype == dtype
    assert compiled.shape == grid.shape == (5, 2, box[0][1] - box[0][0], box[1][1] - box[1][0])
    filled = np.broadcast_to(inside(composed, box, (37, 53))[:, None], compiled.shape)
    assert (compiled[~filled] == 7).all() and (grid[~filled] == 7).all()
    diff = np.abs(compiled.astype(np.float64) - grid.astype(np.float64))
    # grid_sample's float32 coordinates move a sample by ~1e-5 px; the kernel's are float64.
    integer, peak = np.issubdtype(dtype, np.integer), float(np.abs(slices).max())
    assert diff.max() <= (1 if integer else 1e-3 * peak)
    for k in range(5):
        for c in range(2):
            want = scipy_linear(slices[k, c], composed[k], box, 7)
            valid = filled[k, c]
            if integer:  # the exact sample, rounded
                np.testing.assert_array_equal(compiled[k, c][valid], np.rint(want[valid]))
            else:
                np.testing.assert_allclose(compiled[k, c][valid], want[valid], atol=1e-6 * peak)
    assert filled.any() and (~filled).any()  # both kinds of pixel are checked


def test_identity_and_whole_pixel_shifts_are_exact():
    rng = np.random.default_rng(1)
    for dtype in (np.uint8, np.uint16, np.float32, np.float64, np.int32):
        slices = random_slices(rng, (3, 2, 21, 34), dtype)
        eye = np.tile(np.eye(3), (3, 1, 1))
        for order in Interpolation:
            np.testing.assert_array_equal(warp_slices(slices, eye, order=order), slices)
            np.testing.assert_array_equal(warp_slices(slices[:, 0], eye, order=order), slices[:, 0])
    slices = random_slices(rng, (2, 21, 34), np.float32)
    shifted = np.tile(np.eye(3), (2, 1, 1))
    shifted[:, :2, 2] = [[2.0, -3.0], [0.0, 5.0]]
    got = warp_slices(slices, shifted, box=((1, 25), (-2, 30)), fill=-7)
    want = np.full((2, 24, 32), -7, np.float32)
    for k, (ty, tx) in enumerate(shifted[:, :2, 2].astype(int)):
        for i in range(24):
            for j in range(32):
                y, x = i + 1 - ty, j - 2 - tx
                if 0 <= y < 21 and 0 <= x < 34:
                    want[k, i, j] = slices[k, y, x]
    np.testing.assert_array_equal(got, want)


def test_mixed_batch_equals_single_slices():
    rng = np.random.default_rng(2)
    slices = random_slices(rng, (3, 30, 40), np.float32)
    composed = random_transforms(rng, 3, (30, 40))
    composed[1] = np.eye(3)
    box = ((2, 27), (3, 36))
    for order in Interpolation:
        together = warp_slices(slices, composed, box=box, order=order)
        for k in range(3):
            alone = warp_slices(slices[k : k + 1], composed[k : k + 1], box=box, order=order)
            np.testing.assert_allclose(together[k], alone[0], rtol=0, atol=1e-5)


@pytest.mark.parametrize("order", list(Interpolation))
def test_channels_share_the_transform(order):
    rng = np.random.default_rng(3)
    slices = random_slices(rng, (2, 3, 26, 33), np.uint16)
    composed = random_transforms(rng, 2, (26, 33))
    got = warp_slices(slices, composed, order=order, box=((1, 24), (2, 30)))
    assert got.shape == (2, 3, 23, 28)
    for c in range(3):
        one = warp_slices(slices[:, c], composed, order=order, box=((1, 24), (2, 30)))
        np.testing.assert_array_equal(got[:, c], one)


# --------------------------------------------------------------------------- cubic


@pytest.mark.parametrize(("dtype", "tol"), [(np.float64, 1e-9), (np.float32, 1e-4)])
def test_cubic_exact_on_linear_ramp(dtype, tol):
    rng = np.random.default_rng(4)
    shape = (35, 47)
    composed = random_transforms(rng, 3, shape)
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    ramp = np.broadcast_to(2.0 * yy - 3.0 * xx + 200.0, (3, *shape)).astype(dtype)
    got = warp_slices(ramp, composed, order="cubic", fill=np.nan)
    full = ((0, shape[0]), (0, shape[1]))
    py, px = preimages(composed, full)
    valid = inside(composed, full, shape)
    assert valid.mean() > 0.7
    # Including the one-pixel band next to the frame edge, where taps leave the frame.
    np.testing.assert_allclose(got[valid], (2.0 * py - 3.0 * px + 200.0)[valid], atol=tol * 400)
    assert np.isnan(got[~valid]).all()


@pytest.mark.parametrize("dtype", [np.uint8, np.float32])
def test_cubic_does_not_overshoot_steps(dtype):
    rng = np.random.default_rng(5)
    shape = (40, 40)
    step = np.zeros((3, *shape), dtype)
    step[:, :, 20:] = 200
    step[:, 25:, :] = 50
    composed = random_transforms(rng, 3, shape)
    valid = inside(composed, ((0, 40), (0, 40)), shape)
    cubic = warp_slices(step, composed, order="cubic")
    assert cubic[valid].min() == 0 and cubic[valid].max() == 200
    # The kernel itself rings at the step: the clamp is what keeps the range.
    py, px = (torch.from_numpy(c) for c in preimages(composed, ((0, 40), (0, 40))))
    raw = _cubic(torch.from_numpy(step.astype(np.float32))[:, None], py, px)[:, 0].numpy()
    assert raw[valid].min() < -1 and raw[valid].max() > 201


def test_cubic_close_to_smooth_function():
    rng = np.random.default_rng(6)
    shape = (48, 56)

    def smooth(y, x):
        return np.sin(y / 5.0) * np.cos(x / 7.0) + 0.01 * x

    yy, xx = np.mgrid[: shape[0], : shape[1]]
    image = np.broadcast_to(smooth(yy, xx), (3, *shape)).astype(np.float64)
    composed = random_transforms(rng, 3, shape)
    box = ((4, 44), (4, 52))  # away from the edge, where the linear extension differs
    py, px = preimages(composed, box)
    valid = inside(composed, box, shape)
    truth = smooth(py, px)
    cubic = warp_slices(image, composed, box=box, order="cubic")
    linear = warp_slices(image, composed, box=box, order="linear")
    cubic_err, linear_err = np.abs(cubic - truth)[valid], np.abs(linear - truth)[valid]
    assert cubic_err.mean() < 1e-4 and cubic_err.mean() < 0.1 * linear_err.mean()
    # The largest errors sit at the peaks, clamped to the largest pixel value.
    assert cubic_err.max() < 5e-3


# --------------------------------------------------------------------------- validation


def test_interpolation_enum():
    assert [m.value for m in Interpolation] == ["linear", "cubic"]
    assert Interpolation("cubic") is Interpolation.CUBIC


def test_validation():
    slices = np.zeros((2, 10, 12), np.uint8)
    eye = np.tile(np.eye(3), (2, 1, 1))
    with pytest.raises(TypeError, match="integer or float dtype, got bool"):
        warp_slices(slices.astype(bool), eye)
    with pytest.raises(TypeError, match="got complex128"):
        warp_slices(slices.astype(complex), eye)
    with pytest.raises(ValueError, match=r"\(B, Y, X\) or \(B, C, Y, X\)"):
        warp_slices(slices[0], eye)
    with pytest.raises(ValueError, match=r"one transform per slice \(2\), got 1"):
        warp_slices(slices, eye[:1])
    with pytest.raises(ValueError, match="invertible"):
        warp_slices(slices, np.tile(np.diag([1.0, 0.0, 1.0]), (2, 1, 1)))
    with pytest.raises(ValueError, match="`box` must be non-empty"):
        warp_slices(slices, eye, box=((3, 3), (0, 4)))
    with pytest.raises(TypeError, match="`box` must be"):
        warp_slices(slices, eye, box=(3, 4))
    with pytest.raises(TypeError, match="`box` must hold integers"):
        warp_slices(slices, eye, box=((0.0, 3), (0, 4)))
    with pytest.raises(ValueError, match="`order` must be one of 'linear', 'cubic'"):
        warp_slices(slices, eye, order="nearest")
    with pytest.raises(TypeError, match="`order` must be a str"):
        warp_slices(slices, eye, order=1)
    with pytest.raises(ValueError, match=r"`fill` must be an integer in \[0, 255\]"):
        warp_slices(slices, eye, fill=-1)
    with pytest.raises(ValueError, match="`fill` must be an integer"):
        warp_slices(slices, eye, fill=0.5)
    with pytest.raises(TypeError, match="`fill` must be a real number"):
        warp_slices(slices, eye, fill="0")
    with pytest.raises(ValueError, match="`device`"):
        warp_slices(slices, eye, device="tpu")
    for bad in (0, -1):
        with pytest.raises(ValueError, match="`threads` must be >= 1"):
            warp_slices(slices, eye, threads=bad)
    for bad in (1.5, True):
        with pytest.raises(TypeError, match="`threads` must be an integer"):
            warp_slices(slices, eye, threads=bad)


def test_kernel_threads_split_rows_without_seams():
    # Rows of a large batch go to several threads; any split gives the same output.
    rng = np.random.default_rng(8)
    slices = random_slices(rng, (4, 2, 200, 210), np.uint16)
    composed = random_transforms(rng, 4, (200, 210), rotation=15.0)
    box = ((-5, 250), (3, 260))  # 8 x 65 k output pixels: up to 8 threads
    one = warp_slices(slices, composed, box=box, device="cpu", threads=1)
    for threads in (2, 3, 7):
        np.testing.assert_array_equal(
            warp_slices(slices, composed, box=box, device="cpu", threads=threads), one
        )


@pytest.mark.parametrize("order", list(Interpolation))
def test_recovers_synthetic_aligned_stack(order):
    em = synth.em_stack((4, 48, 56), seed=2)
    (y0, y1), (x0, x1) = box = em.valid_box
    got = warp_slices(em.image, em.transforms, box=box, order=order)
    want = em.aligned[:, y0:y1, x0:x1]
    np.testing.assert_array_equal(got[0], want[0])  # the reference slice is copied
    # Observed slices were resampled once already: two interpolations blur a little.
    error = np.abs(got[1:].astype(float) - want[1:])
    assert error.mean() < 3.5 and np.corrcoef(got[1:].ravel(), want[1:].ravel())[0, 1] > 0.995


@pytest.mark.parametrize("shape", [(1, 23), (19, 1)])
def test_linear_on_a_frame_one_pixel_thin(shape):
    rng = np.random.default_rng(5)
    slices = random_slices(rng, (2, *shape), np.float32)
    composed = np.tile(np.eye(3), (2, 1, 1))
    composed[:, :2, 2] = [[0.0, 0.4], [0.3, 0.0]] if shape[0] == 1 else [[0.4, 0.0], [0.0, 0.3]]
    box = ((0, shape[0]), (0, shape[1]))
    got = warp_slices(slices, composed, box=box, fill=-5)
    for k in range(2):
        want = scipy_linear(slices[k], composed[k], box, -5.0)
        keep = inside(composed[k : k + 1], box, shape)[0]
        np.testing.assert_allclose(got[k][keep], want[keep], atol=1e-3)
        assert np.all(got[k][~keep] == -5)
    # Along the long axis some preimages stay in the frame; across the thin one none does.
    assert inside(composed[:1], box, shape).sum() == max(shape) - 1
    assert not inside(composed[1:], box, shape).any()


def test_compiled_linear_on_strong_transforms_and_pure_shifts():
    # Rotations up to a half turn, scales, shears and pure fractional shifts (rows whose
    # preimage runs along one axis only): every row has columns whose preimage leaves the
    # frame through either side, and columns well inside it. The compiled kernel samples
    # each as SciPy does, in float64, and fills the rest.
    rng = np.random.default_rng(11)
    shape, n = (41, 57), 12
    composed = np.tile(np.eye(3), (n, 1, 1))
    for k in range(n):
        if k % 3 == 0:  # a pure shift
            composed[k, :2, 2] = rng.uniform(-9.5, 9.5, 2)
            continue
        angle = rng.uniform(0, np.pi)
        c, s = np.cos(angle), np.sin(angle)
        linear = np.array([[c, -s], [s, c]]) @ np.array(
            [[rng.uniform(0.6, 1.7), rng.uniform(-0.3, 0.3)], [0.0, rng.uniform(0.6, 1.7)]]
        )
        composed[k, :2, :2] = linear
        # The slice's centre lands near the box's, so each slice covers part of the box.
        centre = (np.array(shape) - 1) / 2
        composed[k, :2, 2] = [28.0, 34.0] - linear @ centre + rng.uniform(-15, 15, 2)
    slices = rng.standard_normal((n, *shape)) * 50
    box = ((-13, 70), (-9, 77))
    got = _sample_linear_numba(slices[:, None], np.linalg.inv(composed), box, -7.0)[:, 0]
    valid = inside(composed, box, shape)
    assert valid.any(axis=(1, 2)).all() and (~valid).any(axis=(1, 2)).all()
    py, px = preimages(composed, box)
    far = (py < -1e-6) | (py > shape[0] - 1 + 1e-6) | (px < -1e-6) | (px > shape[1] - 1 + 1e-6)
    for k in range(n):
        want = scipy_linear(slices[k], composed[k], box, -7.0)
        np.testing.assert_allclose(got[k][valid[k]], want[valid[k]], atol=1e-9, rtol=0)
        assert (got[k][far[k]] == -7.0).all()


# -- bands of rows ---------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16, np.int16, np.float32])
def test_a_band_of_rows_warps_exactly_like_whole_slices(dtype):
    rng = np.random.default_rng(11)
    for trial in range(40):
        b, c = int(rng.integers(1, 4)), int(rng.integers(1, 3))
        h, w = int(rng.integers(1, 50)), int(rng.integers(1, 50))
        slices = (rng.random((b, c, h, w)) * 200).astype(dtype)
        composed = random_transforms(rng, b, (h, w), rotation=15.0, shift=8.0, scale=0.2)
        composed[0, :2, :2], composed[0, :2, 2] = np.eye(2), rng.integers(-4, 5, 2)  # copied
        y0, x0 = int(rng.integers(-4, h)), int(rng.integers(-4, w))
        box = ((y0, int(rng.integers(y0 + 1, h + 5))), (x0, int(rng.integers(x0 + 1, w + 5))))
        want = warp_slices(slices, composed, box=box, fill=3, device="cpu")
        rows = source_rows(composed, box, (h, w))
        used = rows[:, 1] > rows[:, 0]
        first, stop = (rows[used, 0].min(), rows[used, 1].max()) if used.any() else (0, 1)
        # Rows outside those reported hold garbage: the warp must not read them.
        spoiled = slices.copy()
        spoiled[:, :, :first] = spoiled[:, :, stop:] = 111
        got = warp_rows(spoiled[:, :, first:stop], composed, first_row=int(first), height=h,
                        box=box, fill=3)  # fmt: skip
        np.testing.assert_array_equal(got, want, err_msg=f"trial {trial}")
        for k in np.flatnonzero(used):
            # Each slice from exactly its own rows.
            one = warp_rows(spoiled[k : k + 1, :, rows[k, 0] : rows[k, 1]], composed[k : k + 1],
                            first_row=int(rows[k, 0]), height=h, box=box, fill=3)  # fmt: skip
            np.testing.assert_array_equal(one, want[k : k + 1])


def test_source_rows_of_a_known_map_and_of_a_slice_that_misses_the_box():
    composed = np.tile(np.eye(3), (2, 1, 1))
    composed[0, 0, 2] = 2.5  # reference row y shows slice row y − 2.5
    composed[1, 0, 2] = 100.0  # the box sees none of slice 1
    rows = source_rows(composed, ((10, 20), (0, 8)), (40, 8))
    # Output rows 10 … 19 show slice rows 7.5 … 16.5: their neighbours are rows 7 … 17.
    assert rows.tolist() == [[7, 18], [0, 0]]
    # Output rows 39 … 41 show 36.5 … 38.5 (the rest is outside): rows 36 … 39.
    assert source_rows(composed[:1], ((39, 42), (0, 8)), (40, 8)).tolist() == [[36, 40]]


def test_a_window_that_lacks_a_row_is_refused():
    rng = np.random.default_rng(2)
    slices = rng.integers(0, 255, (2, 30, 20), dtype=np.uint8)
    composed = random_transforms(rng, 2, (30, 20))
    box = ((5, 15), (0, 20))
    first, stop = source_rows(composed, box, (30, 20))[:, 0].min(), 30
    with pytest.raises(ValueError, match="reads rows"):
        warp_rows(slices[:, first + 1 : stop], composed, first_row=int(first) + 1, height=30,
                  box=box)  # fmt: skip
    with pytest.raises(ValueError, match="height"):
        warp_rows(slices[:, first:], composed, first_row=int(first), height=29, box=box)
