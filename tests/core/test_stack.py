import numpy as np
import pytest

from voxflow.core import synth
from voxflow.core.stack import (
    compose,
    pixel_rms,
    solve_stack,
    to_physical,
    to_pixels,
    valid_box,
)


def random_transforms(rng, z, shape, rotation=3.0, shift=6.0, scale=0.03, shear=0.02):
    transforms, *_ = synth._draw_affines(rng, (z, *shape), (rotation, shift, scale, shear))
    return transforms


def pairwise_of(transforms):
    pairwise = np.tile(np.eye(3), (len(transforms), 1, 1))
    pairwise[1:] = np.linalg.inv(transforms[:-1]) @ transforms[1:]
    return pairwise


def chain(n):
    return np.array([(k, k - 1) for k in range(1, n)])


def mask_box(transforms, shape):
    masks = synth._valid_masks(transforms, (len(transforms), *shape))
    return masks.all(axis=0), synth._largest_box(masks.all(axis=0))


def area(box):
    (y0, y1), (x0, x1) = box
    return (y1 - y0) * (x1 - x0)


# --------------------------------------------------------------------------- compose


@pytest.mark.parametrize("seed", [0, 1])
def test_compose_recovers_synthetic_transforms(seed):
    em = synth.em_stack((6, 40, 48), seed=seed, max_rotation_deg=5.0)
    got = compose(em.pairwise)
    np.testing.assert_allclose(got, em.transforms, atol=1e-9)
    np.testing.assert_array_equal(got[:, 2], np.tile([0.0, 0.0, 1.0], (6, 1)))


@pytest.mark.parametrize("reference", [0, 2, 5])
def test_compose_reference(reference):
    truth = random_transforms(np.random.default_rng(3), 6, (50, 70), rotation=8.0)
    got = compose(pairwise_of(truth), reference=reference)
    np.testing.assert_allclose(got[reference], np.eye(3), atol=1e-12)
    np.testing.assert_allclose(got, np.linalg.inv(truth[reference]) @ truth, atol=1e-9)
    np.testing.assert_allclose(got[:-1] @ pairwise_of(truth)[1:], got[1:], atol=1e-9)


def test_compose_ignores_first_matrix_and_single_slice():
    pairwise = pairwise_of(random_transforms(np.random.default_rng(4), 4, (40, 40)))
    pairwise[0] = np.nan
    assert np.isfinite(compose(pairwise)).all()
    np.testing.assert_array_equal(compose(np.full((1, 3, 3), np.nan)), np.eye(3)[None])


def test_compose_validation():
    good = np.tile(np.eye(3), (3, 1, 1))
    with pytest.raises(ValueError, match=r"`pairwise` must have shape \(Z, 3, 3\)"):
        compose(np.eye(3))
    with pytest.raises(ValueError, match="Z >= 1"):
        compose(np.zeros((0, 3, 3)))
    bad = good.copy()
    bad[1, 2, 0] = 0.5
    with pytest.raises(ValueError, match="must be affine"):
        compose(bad)
    bad = good.copy()
    bad[2, 0, 0] = np.inf
    with pytest.raises(ValueError, match="finite"):
        compose(bad)
    bad = good.copy()
    bad[1, :2, :2] = [[1.0, 2.0], [2.0, 4.0]]
    with pytest.raises(ValueError, match="invertible; matrix 0"):
        compose(bad)
    with pytest.raises(TypeError, match="real numbers"):
        compose(good.astype(complex))
    with pytest.raises(ValueError, match=r"`reference` must be a slice index in \[0, 2\]"):
        compose(good, reference=3)
    with pytest.raises(TypeError, match="`reference` must be an integer"):
        compose(good, reference=1.0)


# --------------------------------------------------------------------------- solve_stack


@pytest.mark.parametrize("reference", [0, 3])
def test_solve_chain_only_equals_compose(reference):
    shape = (61, 47)
    truth = random_transforms(np.random.default_rng(5), 9, shape, rotation=10.0)
    pairwise = pairwise_of(truth)
    got = solve_stack(9, chain(9), pairwise[1:], shape, reference=reference)
    want = compose(pairwise, reference=reference)
    np.testing.assert_allclose(got, want, atol=1e-9)
    assert pixel_rms(got, want, shape).max() < 1e-9
    np.testing.assert_array_equal(got[:, 2], np.tile([0.0, 0.0, 1.0], (9, 1)))


def test_solve_single_slice_and_reference_first_pair():
    np.testing.assert_array_equal(
        solve_stack(1, np.zeros((0, 2), int), np.zeros((0, 3, 3)), (8, 8)), np.eye(3)[None]
    )
    step = np.array([[1.0, 0.0, 2.5], [0.0, 1.0, -1.0], [0.0, 0.0, 1.0]])
    got = solve_stack(2, [[1, 0]], [step], (8, 8), reference=1)
    np.testing.assert_allclose(got[0], np.linalg.inv(step), atol=1e-12)


def perturbed(rng, matrices, shape, sigma):
    """Each matrix followed by a small random affine about the frame centre."""
    centre = (np.asarray(shape) - 1) / 2
    out = matrices.copy()
    for m in range(len(out)):
        linear = np.eye(2) + rng.normal(0, sigma / max(shape), (2, 2))
        error = np.eye(3)
        error[:2, :2] = linear
        error[:2, 2] = centre + rng.normal(0, sigma, 2) - linear @ centre
        out[m] = out[m] @ error
    return out


def test_solve_with_neighbours_reduces_drift():
    shape, n = (64, 80), 40
    chain_err, solved_err = [], []
    for seed in range(5):
        rng = np.random.default_rng(seed)
        truth = random_transforms(rng, n, shape)
        pairs = np.array([(i, i - d) for i in range(1, n) for d in (1, 2, 3) if i - d >= 0])
        exact = np.linalg.inv(truth[pairs[:, 1]]) @ truth[pairs[:, 0]]
        noisy = perturbed(rng, exact, shape, sigma=0.5)
        neighbours = pairs[:, 0] - pairs[:, 1] == 1
        pairwise = np.tile(np.eye(3), (n, 1, 1))
        pairwise[pairs[neighbours, 0]] = noisy[neighbours]
        chain_err.append(pixel_rms(compose(pairwise), truth, shape)[-1])
        solved_err.append(pixel_rms(solve_stack(n, pairs, noisy, shape), truth, shape)[-1])
        # The chain-only solve of the same noisy data is the plain chain.
        only = solve_stack(n, pairs[neighbours], noisy[neighbours], shape)
        np.testing.assert_allclose(only, compose(pairwise), atol=1e-8)
    assert np.mean(solved_err) < 0.8 * np.mean(chain_err)


def test_solve_weights_zero_drop_a_measurement():
    shape, n = (40, 50), 6
    rng = np.random.default_rng(7)
    truth = random_transforms(rng, n, shape)
    pairs = np.array([(i, i - d) for i in range(1, n) for d in (1, 2) if i - d >= 0])
    noisy = perturbed(rng, np.linalg.inv(truth[pairs[:, 1]]) @ truth[pairs[:, 0]], shape, 0.3)
    wrong = np.array([[1.0, 0.0, 20.0], [0.0, 1.0, -15.0], [0.0, 0.0, 1.0]])
    with_wrong = solve_stack(
        n,
        np.vstack([pairs, [[4, 1]]]),
        np.concatenate([noisy, wrong[None]]),
        shape,
        weights=np.r_[np.ones(len(pairs)), 0.0],
    )
    np.testing.assert_allclose(with_wrong, solve_stack(n, pairs, noisy, shape), atol=1e-9)
    # With a positive weight the wrong measurement does move the solution.
    moved = solve_stack(
        n, np.vstack([pairs, [[4, 1]]]), np.concatenate([noisy, wrong[None]]), shape
    )
    assert pixel_rms(moved, with_wrong, shape)[4] > 1.0


def test_solve_disconnected_names_slices():
    eye = np.tile(np.eye(3), (3, 1, 1))
    with pytest.raises(ValueError, match=r"slices 3, 4 are not connected to the reference"):
        solve_stack(5, [[1, 0], [2, 1], [4, 3]], eye, (10, 10))
    with pytest.raises(ValueError, match=r"slices 2 are not connected"):
        solve_stack(3, [[1, 0], [2, 1]], eye[:2], (10, 10), weights=[1.0, 0.0])
    # The reference may sit in the upper part: then the lower slices are the lost ones.
    with pytest.raises(ValueError, match=r"slices 0, 1, 2 are not connected .* slice 3"):
        solve_stack(5, [[1, 0], [2, 1], [4, 3]], eye, (10, 10), reference=3)


def test_solve_validation():
    eye = np.tile(np.eye(3), (2, 1, 1))
    with pytest.raises(ValueError, match=r"j < i"):
        solve_stack(3, [[1, 0], [1, 2]], eye, (10, 10))
    with pytest.raises(ValueError, match=r"slice indices in \[0, 2\]"):
        solve_stack(3, [[1, 0], [3, 2]], eye, (10, 10))
    with pytest.raises(TypeError, match="`pairs` must hold integer"):
        solve_stack(3, [[1.0, 0.0], [2.0, 1.0]], eye, (10, 10))
    with pytest.raises(ValueError, match=r"`pairs` must have shape \(M, 2\)"):
        solve_stack(3, [1, 0], eye, (10, 10))
    with pytest.raises(ValueError, match=r"one matrix per pair \(2\), got 1"):
        solve_stack(3, [[1, 0], [2, 1]], eye[:1], (10, 10))
    with pytest.raises(ValueError, match=">= 0"):
        solve_stack(3, [[1, 0], [2, 1]], eye, (10, 10), weights=[1.0, -1.0])
    with pytest.raises(ValueError, match=r"`weights` must have shape \(2,\)"):
        solve_stack(3, [[1, 0], [2, 1]], eye, (10, 10), weights=[1.0])
    with pytest.raises(ValueError, match="`shape` needs one size per axis"):
        solve_stack(3, [[1, 0], [2, 1]], eye, (10, 10, 3))
    with pytest.raises(TypeError, match="`n` must be an integer"):
        solve_stack(3.0, [[1, 0], [2, 1]], eye, (10, 10))
    with pytest.raises(ValueError, match="`reference` must be a slice index"):
        solve_stack(3, [[1, 0], [2, 1]], eye, (10, 10), reference=5)


# --------------------------------------------------------------------------- valid_box


def test_valid_box_matches_pixel_mask_method():
    rng = np.random.default_rng(11)
    for trial in range(60):
        shape = (int(rng.integers(33, 80)), int(rng.integers(33, 80)))
        z = int(rng.integers(2, 6))
        rotation = 10.0 if trial % 3 == 0 else float(rng.uniform(0, 5))
        truth = random_transforms(rng, z, shape, rotation, 8.0, 0.06, 0.05)
        if trial % 4 == 1:  # a reference other than the first slice
            truth = np.linalg.inv(truth[z - 1]) @ truth
        mask, want = mask_box(truth, shape)
        got = valid_box(truth, shape)
        assert area(got) == area(want) > 0, (trial, got, want)
        (y0, y1), (x0, x1) = got
        assert 0 <= y0 < y1 <= shape[0] and 0 <= x0 < x1 <= shape[1]
        assert mask[y0:y1, x0:x1].all(), trial


def test_valid_box_integer_translations_and_tie_rule():
    shifts = np.tile(np.eye(3), (3, 1, 1))
    shifts[1, :2, 2] = [2.0, -3.0]
    shifts[2, :2, 2] = [-1.0, 1.0]
    # inv(T) q = q - t must stay in the frame: y in [2, Y - 2], x in [1, X - 4].
    assert valid_box(shifts, (20, 31)) == ((2, 19), (1, 28))
    assert valid_box(np.eye(3)[None], (7, 5)) == ((0, 7), (0, 5))


def all_largest_boxes(mask):
    """Every largest all-True box of a small mask, by brute force over prefix sums."""
    ny, nx = mask.shape
    sums = np.zeros((ny + 1, nx + 1), int)
    sums[1:, 1:] = mask.cumsum(0).cumsum(1)
    found, best = [], 0
    for y0 in range(ny):
        for y1 in range(y0 + 1, ny + 1):
            for x0 in range(nx):
                x1 = np.arange(x0 + 1, nx + 1)
                full = sums[y1, x1] - sums[y0, x1] - sums[y1, x0] + sums[y0, x0]
                ok = x1[full == (y1 - y0) * (x1 - x0)]
                for end in ok:
                    a = (y1 - y0) * (end - x0)
                    if a > best:
                        found, best = [], a
                    if a == best:
                        found.append(((y0, y1), (x0, int(end))))
    return found


@pytest.mark.parametrize("degrees", [45.0, 30.0, 0.0])
def test_valid_box_tie_rule(degrees):
    # A square turned about the centre of an odd frame: the valid set is symmetric, so
    # several boxes share the largest area; the smallest (y0, y1) wins.
    turn = np.eye(3)
    c, s = np.cos(np.radians(degrees)), np.sin(np.radians(degrees))
    turn[:2, :2] = [[c, -s], [s, c]]
    turn[:2, 2] = [7.0, 8.0] - turn[:2, :2] @ [7.0, 8.0]
    shift = np.eye(3)
    shift[:2, 2] = [1.0, 2.0]
    transforms = np.stack([np.eye(3), turn, shift])
    mask, _ = mask_box(transforms, (15, 17))
    boxes = all_largest_boxes(mask)
    assert valid_box(transforms, (15, 17)) == min(boxes)
    if degrees == 45.0:  # the case that does tie
        assert len(boxes) > 1


def test_valid_box_margin():
    truth = random_transforms(np.random.default_rng(2), 4, (60, 45))
    (y0, y1), (x0, x1) = valid_box(truth, (60, 45))
    assert valid_box(truth, (60, 45), margin=3) == ((y0 + 3, y1 - 3), (x0 + 3, x1 - 3))
    half = min(y1 - y0, x1 - x0) // 2
    with pytest.raises(ValueError, match=f"after a margin of {half} pixels"):
        valid_box(truth, (60, 45), margin=half)
    with pytest.raises(ValueError, match="`margin` must be >= 0"):
        valid_box(truth, (60, 45), margin=-1)


def test_valid_box_empty_region_raises():
    apart = np.tile(np.eye(3), (2, 1, 1))
    apart[1, :2, 2] = [0.0, 40.0]
    with pytest.raises(ValueError, match=r"no common region.*--no-crop"):
        valid_box(apart, (30, 40))
    apart[1, :2, 2] = [0.0, 39.0]  # one column left in common
    assert valid_box(apart, (30, 40)) == ((0, 30), (39, 40))


def test_valid_box_validation():
    with pytest.raises(ValueError, match="at least one transform"):
        valid_box(np.zeros((0, 3, 3)), (10, 10))
    with pytest.raises(ValueError, match=r"`composed` must have shape \(Z, 3, 3\)"):
        valid_box(np.eye(3), (10, 10))
    with pytest.raises(TypeError, match="`shape` must be a"):
        valid_box(np.eye(3)[None], 10)
    with pytest.raises(ValueError, match="`shape` must be >= 1"):
        valid_box(np.eye(3)[None], (0, 10))


# --------------------------------------------------------------------------- units and errors


def test_physical_round_trip_and_consistency():
    rng = np.random.default_rng(8)
    pixel = random_transforms(rng, 5, (50, 60), rotation=10.0)
    spacing, origin = (0.05, 0.004), (1.5, -2.0)
    physical = to_physical(pixel, spacing, origin)
    np.testing.assert_allclose(to_pixels(physical, spacing, origin), pixel, atol=1e-9)
    np.testing.assert_allclose(to_physical(pixel[0], spacing), pixel[0], atol=0)  # identity
    points = np.vstack([rng.uniform(0, 50, 20), rng.uniform(0, 60, 20), np.ones(20)])
    frame = np.array([[0.05, 0.0, 1.5], [0.0, 0.004, -2.0], [0.0, 0.0, 1.0]])
    for k in range(5):
        np.testing.assert_allclose(
            physical[k] @ (frame @ points), frame @ (pixel[k] @ points), atol=1e-9
        )
    # A pure pixel shift becomes a shift scaled by the spacing.
    shift = np.eye(3)
    shift[:2, 2] = [10.0, -5.0]
    np.testing.assert_allclose(to_physical(shift, spacing, origin)[:2, 2], [0.5, -0.02])


def test_physical_validation():
    with pytest.raises(ValueError, match="`spacing` must hold positive"):
        to_physical(np.eye(3), (0.0, 1.0))
    with pytest.raises(ValueError, match="`spacing` needs one number per axis"):
        to_pixels(np.eye(3), (1.0, 1.0, 1.0))
    with pytest.raises(ValueError, match="`origin` must hold finite"):
        to_physical(np.eye(3), (1.0, 1.0), (np.nan, 0.0))
    with pytest.raises(ValueError, match=r"`matrices` must have shape \(\.\.\., 3, 3\)"):
        to_physical(np.eye(2), (1.0, 1.0))


def test_pixel_rms_equals_full_grid():
    rng = np.random.default_rng(9)
    shape = (23, 31)
    a = random_transforms(rng, 4, shape, rotation=10.0)
    b = random_transforms(rng, 4, shape, rotation=10.0)
    grid = np.stack(np.meshgrid(np.arange(23), np.arange(31), indexing="ij"), 0).reshape(2, -1)
    grid = np.vstack([grid, np.ones(grid.shape[1])])
    want = np.sqrt(((a @ grid - b @ grid)[:, :2] ** 2).sum(axis=1).mean(axis=1))
    np.testing.assert_allclose(pixel_rms(a, b, shape), want, rtol=1e-10)
    np.testing.assert_array_equal(pixel_rms(a, a, shape), np.zeros(4))
    with pytest.raises(ValueError, match="equal shapes"):
        pixel_rms(a, b[:3], shape)
