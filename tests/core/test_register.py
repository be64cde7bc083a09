import math

import numpy as np
import pytest
import torch
from scipy import ndimage

from voxflow.core import register as register_module
from voxflow.core.register import (
    Level,
    Loss,
    Optimizer,
    PairwiseResult,
    TransformKind,
    make_levels,
    register_pairs,
)
from voxflow.core.synth import em_stack

SHAPE = (128, 128)


def _rms(matrices, truth, shape):
    """RMS over every pixel of the frame of the distance between the two mappings."""
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    points = np.stack([yy.ravel(), xx.ravel(), np.ones(yy.size)])
    diff = (np.asarray(matrices) - np.asarray(truth)) @ points
    return np.sqrt((diff[:, :2] ** 2).sum(1).mean(1))


def _matrix(shape, shift=(0.0, 0.0), theta_deg=0.0, scale=(1.0, 1.0), shear=0.0):
    """A matrix about the frame centre, factorised as in synth: R @ shear @ diag(scale)."""
    t = math.radians(theta_deg)
    rot = np.array([[math.cos(t), -math.sin(t)], [math.sin(t), math.cos(t)]])
    linear = rot @ np.array([[1.0, shear], [0.0, 1.0]]) @ np.diag(scale)
    centre = np.array([(shape[0] - 1) / 2, (shape[1] - 1) / 2])
    out = np.eye(3)
    out[:2, :2] = linear
    out[:2, 2] = centre + np.asarray(shift) - linear @ centre
    return out


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Small images gain nothing from intra-op threads; one keeps the tests quick on a busy CPU."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def slices():
    """Aligned float slices of one synthetic EM volume, 128 x 160."""
    return em_stack((4, 128, 160), seed=7).aligned.astype(np.float64)


def _pairs(slices, matrices, shape=(128, 160)):
    """Fixed slices and moving = fixed resampled by the known matrices (same content)."""
    fixed = slices[: len(matrices), : shape[0], : shape[1]].copy()  # tests may change it
    moving = np.stack(
        [ndimage.affine_transform(f, m, order=3) for f, m in zip(fixed, matrices, strict=True)]
    )
    return fixed, moving


FAMILY_TRUTH = {
    "translation": [{"shift": (3.4, -2.7)}, {"shift": (-5.2, 1.3)}],
    "rigid": [{"shift": (2.1, -3.0), "theta_deg": 3.5}, {"shift": (-1.5, 4.2), "theta_deg": -2.5}],
    "similarity": [
        {"shift": (1.2, 2.5), "theta_deg": 2.0, "scale": (1.03, 1.03)},
        {"shift": (-2.4, -1.1), "theta_deg": -3.0, "scale": (0.97, 0.97)},
    ],
    "affine": [
        {"shift": (2.2, -1.8), "theta_deg": 2.5, "scale": (1.03, 0.98), "shear": 0.02},
        {"shift": (-3.1, 2.6), "theta_deg": -1.5, "scale": (0.97, 1.02), "shear": -0.015},
    ],
}


# --------------------------------------------------------------------------- accuracy


@pytest.mark.parametrize("kind", list(FAMILY_TRUTH))
def test_each_family_recovers_a_transform_of_its_family(slices, kind):
    shape = (128, 160)
    truth = np.stack([_matrix(shape, **p) for p in FAMILY_TRUTH[kind]])
    fixed, moving = _pairs(slices, truth)
    result = register_pairs(fixed, moving, transform=kind)
    assert isinstance(result, PairwiseResult)
    assert result.matrices.shape == (2, 3, 3) and result.matrices.dtype == np.float64
    assert result.params.shape == (2, len(register_module._PARAM_NAMES[TransformKind(kind)]))
    np.testing.assert_array_less(_rms(result.matrices, truth, shape), 0.1)
    assert _rms(np.eye(3)[None], truth, shape).min() > 2
    assert result.converged.all()
    np.testing.assert_allclose(
        result.matrices,
        register_module._matrices(TransformKind(kind), result.params, shape),
        atol=1e-9,
    )


def test_affine_params_are_in_physical_units(slices):
    shape = (128, 160)
    truth = _matrix(shape, shift=(2.0, -1.0), theta_deg=2.0, scale=(1.02, 0.98), shear=0.01)
    fixed, moving = _pairs(slices, truth[None])
    params = register_pairs(fixed, moving, transform="affine").params[0]
    expected = [2.0, -1.0, math.radians(2.0), math.log(1.02), math.log(0.98), 0.01]
    np.testing.assert_array_less(np.abs(params - expected), [0.05, 0.05, 1e-3, 5e-4, 5e-4, 2e-3])


def test_rigid_on_a_non_square_frame_stays_orthonormal(slices):
    shape = (96, 160)
    truth = _matrix(shape, shift=(-2.0, 3.0), theta_deg=4.0)
    fixed, moving = _pairs(slices, truth[None], shape)
    result = register_pairs(fixed, moving, transform="rigid")
    linear = result.matrices[0, :2, :2]
    np.testing.assert_allclose(linear.T @ linear, np.eye(2), atol=1e-6)
    assert np.linalg.det(linear) == pytest.approx(1.0, abs=1e-6)
    assert _rms(result.matrices, truth[None], shape)[0] < 0.1


def test_em_stack_pairs_with_noise_and_contrast():
    stack = em_stack((4, 128, 128), seed=5)
    rng = np.random.default_rng(0)
    gain = rng.uniform(0.9, 1.1, size=(4, 1, 1))
    images = stack.image * gain + rng.normal(0, 0.05 * 255, stack.image.shape)
    result = register_pairs(images[:-1], images[1:], transform="affine")
    truth = stack.pairwise[1:]
    error = _rms(result.matrices, truth, SHAPE)
    # Consecutive sections differ, so the optimum is not the truth exactly; identity is px off.
    np.testing.assert_array_less(error, 0.6)
    assert (_rms(np.eye(3)[None], truth, SHAPE) > 2).all()


def test_ncc_ignores_the_padding_of_a_large_shift(slices):
    shape = (128, 160)
    truth = _matrix(shape, shift=(30.0, -38.0), theta_deg=1.0)
    fixed, moving = _pairs(slices, truth[None])
    # A third of the frame is padding in both images; counted, it would pull the optimum.
    held = register_pairs(fixed, moving, transform="rigid", initial=truth[None])
    assert _rms(held.matrices, truth[None], shape)[0] < 0.1
    near = _matrix(shape, shift=(27.0, -35.0))
    found = register_pairs(fixed, moving, transform="rigid", initial=near[None])
    assert _rms(found.matrices, truth[None], shape)[0] < 0.1
    truth = _matrix(shape, shift=(9.0, -11.0), theta_deg=1.0)
    fixed, moving = _pairs(slices, truth[None])
    cold = register_pairs(fixed, moving, transform="rigid")
    assert _rms(cold.matrices, truth[None], shape)[0] < 0.1


def test_lncc_tolerates_a_smooth_contrast_change(slices):
    shape = (128, 160)
    truth = _matrix(shape, shift=(3.0, -4.0), theta_deg=2.0)
    fixed, moving = _pairs(slices, truth[None])
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    # Gain from 0.2 to 2 and a bright offset across the frame: no global intensity relation.
    ramp = xx / (shape[1] - 1)
    moving = moving * (0.2 + 1.8 * ramp**2) + 300 * np.sin(np.pi * yy / shape[0])
    lncc = register_pairs(fixed, moving, transform="rigid", loss="lncc", window=9)
    mse = register_pairs(fixed, moving, transform="rigid", loss="mse")
    lncc_error = _rms(lncc.matrices, truth[None], shape)[0]
    assert lncc_error < 0.1
    assert _rms(mse.matrices, truth[None], shape)[0] > 3 * lncc_error


def test_mse_registers_a_translation(slices):
    shape = (128, 160)
    truth = _matrix(shape, shift=(4.5, -3.5))
    fixed, moving = _pairs(slices, truth[None])
    result = register_pairs(fixed, moving, transform="translation", loss=Loss.MSE)
    assert _rms(result.matrices, truth[None], shape)[0] < 0.1


def test_sgd_registers_with_its_own_learning_rate(slices):
    shape = (128, 160)
    truth = _matrix(shape, shift=(2.5, -1.5), theta_deg=1.5)
    fixed, moving = _pairs(slices, truth[None])
    levels = make_levels((4, 2, 1), epochs=300, lr=(20.0, 10.0, 5.0))
    result = register_pairs(
        fixed, moving, transform="rigid", optimizer=Optimizer.SGD, levels=levels
    )
    assert _rms(result.matrices, truth[None], shape)[0] < 0.1


def test_dtype_and_intensity_scale_do_not_matter(slices):
    shape = (128, 160)
    truth = _matrix(shape, shift=(1.5, 2.5), theta_deg=-2.0)
    fixed, moving = _pairs(slices, truth[None])
    as_uint8 = register_pairs(
        np.clip(np.rint(fixed), 0, 255).astype(np.uint8),
        np.clip(np.rint(moving), 0, 255).astype(np.uint8),
    )
    as_uint16 = register_pairs(
        (np.clip(np.rint(fixed), 0, 255) * 257).astype(np.uint16),
        (np.clip(np.rint(moving), 0, 255) * 257).astype(np.uint16),
    )
    for result in (as_uint8, as_uint16):
        assert _rms(result.matrices, truth[None], shape)[0] < 0.1
    np.testing.assert_allclose(as_uint8.matrices, as_uint16.matrices, atol=1e-3)


def test_penalty_keeps_scales_near_one(slices):
    shape = (128, 160)
    truth = _matrix(shape, shift=(1.0, 1.0), scale=(1.04, 1.04))
    fixed, moving = _pairs(slices, truth[None])
    free = register_pairs(fixed, moving, transform="similarity")
    held = register_pairs(fixed, moving, transform="similarity", penalty=100.0)
    assert free.params[0, 3] == pytest.approx(math.log(1.04), abs=2e-3)
    assert abs(held.params[0, 3]) < abs(free.params[0, 3]) - 0.01


def test_small_images_skip_coarse_levels(slices):
    shape = (40, 48)
    truth = _matrix(shape, shift=(1.5, -2.0))
    fixed, moving = _pairs(slices, truth[None], shape)
    result = register_pairs(fixed, moving, transform="translation")
    assert _rms(result.matrices, truth[None], shape)[0] < 0.1
    kept = register_module._fit_levels(make_levels(), shape)
    assert [level.factor for level in kept] == [2, 1]
    clipped = register_module._fit_levels(make_levels((16, 8)), shape)
    assert [level.factor for level in clipped] == [2]


# --------------------------------------------------------------------------- batching


def test_batch_equals_single_pairs_and_pairs_stop_on_their_own(slices):
    shape = (128, 160)
    truth = np.stack(
        [
            _matrix(shape, shift=(3.0, -2.0), theta_deg=2.0),
            _matrix(shape, shift=(-6.0, 5.0), theta_deg=-3.5),
            _matrix(shape, shift=(0.5, 0.2), theta_deg=0.3),
        ]
    )
    fixed, moving = _pairs(slices, truth)
    batch = register_pairs(fixed, moving, transform="rigid")
    singles = [register_pairs(f, m, transform="rigid") for f, m in zip(fixed, moving, strict=True)]
    single_matrices = np.concatenate([s.matrices for s in singles])
    np.testing.assert_array_less(_rms(batch.matrices, single_matrices, shape), 0.01)
    np.testing.assert_allclose(batch.loss, [s.loss[0] for s in singles], atol=1e-4)
    assert len(set(batch.steps.tolist())) > 1


@pytest.mark.parametrize("optimizer", ["adam", "sgd"])
def test_stopped_rows_do_not_move(optimizer):
    param = torch.nn.Parameter(torch.zeros(4, 3))
    opt = register_module._make_optimizer(Optimizer(optimizer), param, 0.1)
    active = torch.tensor([True, True, True, True])
    for step in range(6):
        opt.zero_grad()
        (param * torch.arange(1.0, 5.0)[:, None]).sum().backward()
        if step == 2:
            active[[1, 3]] = False
            frozen = param.detach().clone()
        register_module._step_rows(opt, param, active)
    # Momentum alone would have kept rows 1 and 3 moving.
    assert torch.equal(param.detach()[[1, 3]], frozen[[1, 3]])
    assert not torch.equal(param.detach()[[0, 2]], frozen[[0, 2]])


def test_a_blank_pair_is_skipped_without_disturbing_the_others(slices):
    shape = (128, 160)
    truth = np.stack([_matrix(shape, shift=(2.0, 1.0), theta_deg=1.0)] * 3)
    fixed, moving = _pairs(slices, truth)
    fixed[1] = 17.0
    start = np.stack([np.eye(3), _matrix(shape, shift=(1.0, 1.0)), np.eye(3)])
    batch = register_pairs(fixed, moving, initial=start)
    assert np.isfinite(batch.matrices).all()
    np.testing.assert_array_equal(batch.matrices[1], start[1])
    assert math.isnan(batch.loss[1]) and batch.steps[1] == 0 and not batch.converged[1]
    np.testing.assert_allclose(batch.params[1], [1.0, 1.0, 0.0], atol=1e-12)
    np.testing.assert_array_less(_rms(batch.matrices[[0, 2]], truth[[0, 2]], shape), 0.1)
    alone = register_pairs(fixed[0], moving[0])
    assert _rms(batch.matrices[:1], alone.matrices, shape)[0] < 0.01
    blank = register_pairs(np.zeros((32, 32)), np.zeros((32, 32)))
    np.testing.assert_array_equal(blank.matrices[0], np.eye(3))


def test_a_pair_without_overlap_is_skipped(slices):
    fixed, moving = slices[0, :64, :64], slices[1, :64, :64]
    # Starting 60 px off leaves almost no overlap in a 64-pixel frame.
    start = _matrix((64, 64), shift=(60.0, 60.0))
    result = register_pairs(fixed, moving, transform="translation", initial=start)
    np.testing.assert_array_equal(result.matrices[0], start)
    assert math.isnan(result.loss[0]) and result.steps[0] == 0 and not result.converged[0]


def test_runs_are_deterministic(slices):
    shape = (128, 160)
    truth = np.stack([_matrix(shape, shift=(2.0, 1.0), theta_deg=1.0, scale=(1.01, 0.99))] * 2)
    fixed, moving = _pairs(slices, truth)
    first = register_pairs(fixed, moving, transform="affine", seed=3)
    second = register_pairs(fixed, moving, transform="affine", seed=3)
    for name in ("matrices", "loss", "steps", "converged", "params"):
        np.testing.assert_array_equal(getattr(first, name), getattr(second, name))


def test_initial_is_honoured(slices):
    shape = (128, 160)
    truth = _matrix(shape, shift=(-4.0, 3.0), theta_deg=3.0, scale=(1.02, 0.99), shear=0.01)
    fixed, moving = _pairs(slices, truth[None])
    cold = register_pairs(fixed, moving, transform="affine")
    warm = register_pairs(fixed, moving, transform="affine", initial=truth[None])
    assert _rms(warm.matrices, truth[None], shape)[0] < 0.1
    assert warm.steps[0] < cold.steps[0]
    # A family that cannot express the start begins from its projection: rigid keeps the
    # rotation and the centre's displacement.
    rigid = register_pairs(
        fixed, moving, transform="rigid", initial=truth, levels=[Level(1, 1, 1e-9)]
    )
    assert rigid.params[0, 2] == pytest.approx(math.radians(3.0), abs=0.01)
    assert rigid.params[0, :2] == pytest.approx([-4.0, 3.0], abs=1e-6)


# --------------------------------------------------------------------------- levels


def test_make_levels_defaults():
    levels = make_levels()
    assert [level.factor for level in levels] == [8, 4, 2, 1]
    assert all(level.epochs >= 1 for level in levels)
    assert [level.lr for level in levels] == pytest.approx([0.8, 0.4, 0.2, 0.1])


@pytest.mark.parametrize(
    ("factors", "epochs", "lr", "expected"),
    [
        (2, 50, 0.5, [(2, 50, 0.5)]),
        ([4], [30], [0.3], [(4, 30, 0.3)]),
        ([4, 1], 30, 0.3, [(4, 30, 0.3), (1, 30, 0.3)]),
        (1, [10, 20, 30], 0.1, [(1, 10, 0.1), (1, 20, 0.1), (1, 30, 0.1)]),
        (
            (16, 8, 4, 2, 1),
            40,
            [5, 4, 3, 2, 1],
            [(16, 40, 5), (8, 40, 4), (4, 40, 3), (2, 40, 2), (1, 40, 1)],
        ),
        ([3, 1], [7], None, [(3, 7, 0.30000000000000004), (1, 7, 0.1)]),
    ],
)
def test_make_levels_broadcasts(factors, epochs, lr, expected):
    levels = make_levels(factors, epochs, lr)
    assert [(v.factor, v.epochs, v.lr) for v in levels] == [
        (f, e, pytest.approx(r)) for f, e, r in expected
    ]


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"factors": [4, 2], "epochs": [1, 2, 3]}, ValueError, "one length"),
        ({"factors": []}, ValueError, "at least one value"),
        ({"factors": 0}, ValueError, "`factors` must be >= 1"),
        ({"factors": 2.0}, TypeError, "`factors` must be an integer"),
        ({"factors": "8"}, TypeError, "`factors` must be a number or a sequence"),
        ({"epochs": 0}, ValueError, "`epochs` must be >= 1"),
        ({"lr": 0.0}, ValueError, r"`lr` must be a finite number > 0"),
        ({"lr": -1.0}, ValueError, r"`lr` must be a finite number > 0"),
        ({"lr": float("nan")}, ValueError, r"`lr` must be a finite number > 0"),
        ({"lr": "fast"}, TypeError, "`lr` must be a number or a sequence"),
        ({"lr": [None]}, TypeError, "`lr` must be a real number"),
    ],
)
def test_make_levels_validates(kwargs, error, match):
    with pytest.raises(error, match=match):
        make_levels(**kwargs)


def test_level_validates_itself():
    with pytest.raises(ValueError, match="`factor` must be >= 1"):
        Level(0, 1, 0.1)
    with pytest.raises(TypeError, match="`lr` must be a real number"):
        Level(1, 1, "x")


# --------------------------------------------------------------------------- validation

GOOD = np.zeros((2, 16, 16), np.float32)


@pytest.mark.parametrize(
    ("args", "kwargs", "error", "match"),
    [
        ((GOOD.tolist(), GOOD), {}, TypeError, "`fixed` must be a numpy array"),
        ((GOOD, GOOD.astype(complex)), {}, TypeError, "`moving` must have a real numeric"),
        ((GOOD, GOOD.astype(bool)), {}, TypeError, "`moving` must have a real numeric"),
        ((GOOD[0, 0], GOOD[0, 0]), {}, ValueError, r"must be \(B, Y, X\) or \(Y, X\)"),
        ((GOOD, GOOD[:1]), {}, ValueError, "must have one shape"),
        ((GOOD[:, :7], GOOD[:, :7]), {}, ValueError, "at least 8x8"),
        ((GOOD, np.full_like(GOOD, np.nan)), {}, ValueError, "NaN or infinite"),
        ((GOOD, GOOD), {"transform": "projective"}, ValueError, "`transform` must be one of"),
        ((GOOD, GOOD), {"loss": "mi"}, ValueError, "`loss` must be one of"),
        ((GOOD, GOOD), {"optimizer": "lbfgs"}, ValueError, "`optimizer` must be one of"),
        ((GOOD, GOOD), {"levels": [(1, 2, 0.1)]}, TypeError, "`levels` must be a sequence"),
        ((GOOD, GOOD), {"levels": []}, ValueError, "`levels` must hold at least one"),
        ((GOOD, GOOD), {"patience": 0}, ValueError, "`patience` must be >= 1"),
        ((GOOD, GOOD), {"window": 8}, ValueError, "`window` must be odd"),
        ((GOOD, GOOD), {"window": 1}, ValueError, "`window` must be >= 3"),
        ((GOOD, GOOD), {"min_delta": -1.0}, ValueError, "`min_delta` must be a finite"),
        ((GOOD, GOOD), {"penalty": "big"}, TypeError, "`penalty` must be a real number"),
        ((GOOD, GOOD), {"seed": -1}, ValueError, "`seed` must be >= 0"),
        ((GOOD, GOOD), {"device": "tpu"}, ValueError, "`device` must be"),
        ((GOOD, GOOD), {"initial": np.eye(3)[None]}, ValueError, r"shape \(2, 3, 3\)"),
        ((GOOD, GOOD), {"initial": np.zeros((2, 3, 3))}, ValueError, "last row"),
        (
            (GOOD, GOOD),
            {"initial": np.stack([np.diag([1.0, -1.0, 1.0])] * 2)},
            ValueError,
            "positive determinant",
        ),
        ((GOOD, GOOD), {"initial": "identity"}, TypeError, "`initial` must be an array"),
    ],
)
def test_register_pairs_validates(args, kwargs, error, match):
    with pytest.raises(error, match=match):
        register_pairs(*args, **kwargs)


def test_a_single_2d_pair_and_device_auto(slices):
    shape = (64, 64)
    truth = _matrix(shape, shift=(1.0, -1.0))
    fixed, moving = _pairs(slices, truth[None], shape)
    result = register_pairs(fixed[0], moving[0], transform="translation", device="auto")
    assert result.matrices.shape == (1, 3, 3)
    assert result.steps.dtype == np.int64 and result.converged.dtype == bool
    assert _rms(result.matrices, truth[None], shape)[0] < 0.1


def test_weighted_moments_match_direct_sums_and_their_gradient():
    rng = np.random.default_rng(7)
    weight = torch.from_numpy(rng.uniform(0, 1, (3, 50)))
    moving = torch.from_numpy(rng.normal(size=(3, 50)))
    warped = torch.from_numpy(rng.normal(size=(3, 50))).requires_grad_(True)
    sums = register_module._WeightedMoments.apply(weight, moving, warped)
    w, m, s = weight.numpy(), moving.numpy(), warped.detach().numpy()
    expected = [w, w * m, w * m * m, w * s, w * m * s, w * s * s]
    np.testing.assert_allclose(sums.detach().numpy(), np.stack([e.sum(1) for e in expected], 1))
    # Any loss of the sums: the gradient with respect to the warped image is autograd's.
    coef = torch.from_numpy(rng.normal(size=(3, 6)))
    (grad,) = torch.autograd.grad((coef * sums).sum(), warped)
    terms = [1, moving, moving**2, warped, moving * warped, warped**2]
    direct = torch.stack([(weight * term).sum(1) for term in terms], 1)
    (expected_grad,) = torch.autograd.grad((coef * direct).sum(), warped)
    np.testing.assert_allclose(grad.numpy(), expected_grad.numpy(), rtol=1e-12, atol=1e-12)
    assert torch.autograd.gradcheck(
        register_module._WeightedMoments.apply, (weight, moving, warped), eps=1e-6
    )


def test_outer_sum_matches_broadcast_sum_and_its_gradient():
    rng = np.random.default_rng(8)
    columns = torch.from_numpy(rng.normal(size=(2, 5, 2))).requires_grad_(True)
    rows = torch.from_numpy(rng.normal(size=(2, 3, 2))).requires_grad_(True)
    grid = register_module._OuterSum.apply(columns, rows)
    expected = columns[:, None] + rows[:, :, None]
    np.testing.assert_array_equal(grid.detach().numpy(), expected.detach().numpy())
    coef = torch.from_numpy(rng.normal(size=(2, 3, 5, 2)))
    got = torch.autograd.grad((coef * grid).sum(), (columns, rows))
    want = torch.autograd.grad((coef * expected).sum(), (columns, rows))
    for g, w in zip(got, want, strict=True):
        np.testing.assert_allclose(g.numpy(), w.numpy(), rtol=1e-12, atol=1e-12)
    assert torch.autograd.gradcheck(register_module._OuterSum.apply, (columns, rows), eps=1e-6)


def test_smoothing_removes_the_interpolation_bias_of_sharp_slices():
    # Sub-pixel shifts of sharp slices: without smoothing, interpolating the fixed slice
    # pulls every estimate towards whole-pixel shifts.
    from voxflow.core.stack import pixel_rms

    em = em_stack((5, 256, 256), seed=4, transform="translation", noise=0.05, contrast=0.1)
    frame = em.image.shape[1:]
    errors = {}
    for sigma in (0.0, 1.0):
        result = register_pairs(em.image[:-1], em.image[1:], transform="translation",
                                smoothing=sigma)  # fmt: skip
        errors[sigma] = pixel_rms(result.matrices, em.pairwise[1:], frame)
    assert errors[0.0].mean() > 0.12
    assert errors[1.0].max() < 0.08 and errors[1.0].mean() < errors[0.0].mean() / 3


@pytest.mark.parametrize(
    ("smoothing", "error", "match"),
    [(-1.0, ValueError, "`smoothing` must be a finite number >= 0"),
     (float("nan"), ValueError, "`smoothing`"), ("1", TypeError, "`smoothing` must be a real")],
)  # fmt: skip
def test_smoothing_is_validated(slices, smoothing, error, match):
    with pytest.raises(error, match=match):
        register_pairs(slices[0], slices[1], smoothing=smoothing)


# --------------------------------------------------------------------------- compiled loss, samples


def _level(rng, batch, shape, factor, samples=None, smoothing=0.0):
    fixed = torch.from_numpy(rng.normal(size=(batch, *shape)).astype(np.float32))
    moving = torch.from_numpy(rng.normal(size=(batch, *shape)).astype(np.float32))
    fixed, moving = register_module._gaussian(fixed, 1.5), register_module._gaussian(moving, 1.5)
    generator = torch.Generator().manual_seed(3)
    return register_module._level_data(fixed, moving, factor, smoothing, samples, generator)


@pytest.mark.parametrize("loss", ["ncc", "mse"])
@pytest.mark.parametrize(
    ("kind", "factor", "samples", "smoothing"),
    [("rigid", 1, None, 1.0), ("affine", 2, None, 0.0), ("affine", 1, 700, 1.0),
     ("similarity", 2, 300, 0.0)],
)  # fmt: skip
def test_compiled_loss_matches_the_torch_graph(monkeypatch, loss, kind, factor, samples, smoothing):
    # On a CPU the moment losses run compiled kernels; the torch graph (grid_sample, edge
    # weights, weighted moments) is what runs elsewhere. Same loss, overlap and gradient.
    rng = np.random.default_rng(5)
    shape = (46, 58)
    data = _level(rng, 4, shape, factor, samples, smoothing)
    assert data.sampled == (samples is not None)
    assert data.pixels == (samples or len(data.xs) * len(data.ys))
    kind = TransformKind(kind)
    units = torch.tensor(register_module._units(kind, shape), dtype=torch.float32)
    problem = register_module._Problem(kind, Loss(loss), units, 0.5, 9)
    n = len(register_module._PARAM_NAMES[kind])
    start = torch.from_numpy(rng.normal(scale=0.8, size=(4, n)).astype(np.float32))
    start[2, :2] = 30.0  # a pair shifted far: most of its pixels leave the fixed frame
    results = {}
    for compiled in (True, False):
        monkeypatch.setattr(register_module, "_compiled", lambda p, d, c=compiled: c)
        for rows in (None, torch.tensor([3, 1])):
            u = (start if rows is None else start[rows]).clone().requires_grad_(True)
            loss_value, overlap = register_module._evaluate(problem, data, u, rows)
            (grad,) = torch.autograd.grad(loss_value.sum(), u)
            results[compiled, rows is None] = (loss_value.detach(), overlap, grad)
    for whole in (True, False):
        got, want = results[True, whole], results[False, whole]
        np.testing.assert_allclose(got[0].numpy(), want[0].numpy(), rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(got[1].numpy(), want[1].numpy(), rtol=1e-5, atol=1e-6)
        scale = float(want[2].abs().max())
        assert scale > 0
        np.testing.assert_allclose(got[2].numpy(), want[2].numpy(), rtol=0, atol=3e-3 * scale)
    # Rows pick pairs: the same pairs' values whichever way they are asked for.
    np.testing.assert_allclose(results[True, False][0].numpy(),
                               results[True, True][0].numpy()[[3, 1]], rtol=1e-6)  # fmt: skip
    assert float(results[True, True][1][2]) < 0.5 < float(results[True, True][1][0])


def test_samples_draw_a_fixed_subset_per_level():
    rng = np.random.default_rng(6)
    full = _level(rng, 2, (40, 50), 1)
    rng = np.random.default_rng(6)
    sampled = _level(rng, 2, (40, 50), 1, samples=300)
    assert not full.sampled and sampled.pixels == 300 and sampled.moving.shape == (2, 1, 300)
    # Every sample is a pixel of the raster, each at most once, with its own coordinates.
    flat_x = full.xs[None, :].expand(40, 50).reshape(-1)
    flat_y = full.ys[:, None].expand(40, 50).reshape(-1)
    index = ((sampled.ys - full.ys[0]) * 50 + (sampled.xs - full.xs[0])).round().long()
    assert len(set(index.tolist())) == 300 and (index.diff() > 0).all()
    np.testing.assert_array_equal(flat_x[index].numpy(), sampled.xs.numpy())
    np.testing.assert_array_equal(flat_y[index].numpy(), sampled.ys.numpy())
    np.testing.assert_array_equal(full.moving.reshape(2, -1)[:, index].numpy(),
                                  sampled.moving[:, 0].numpy())  # fmt: skip
    # A level with no more pixels than samples keeps them all.
    rng = np.random.default_rng(6)
    assert not _level(rng, 2, (40, 50), 1, samples=2000).sampled


def test_sampled_registration_is_accurate_seeded_and_batch_independent(slices):
    shape = (128, 160)
    truth = np.stack(
        [_matrix(shape, shift=(3.0, -2.0), theta_deg=2.0),
         _matrix(shape, shift=(-4.0, 3.5), theta_deg=-2.5)]
    )  # fmt: skip
    fixed, moving = _pairs(slices, truth)
    opts = {"transform": "rigid", "samples": 2000}
    batch = register_pairs(fixed, moving, **opts)
    np.testing.assert_array_less(_rms(batch.matrices, truth, shape), 0.1)
    # Every pair sees the same samples: alone it gives its batch result, bit for bit.
    for k in range(2):
        alone = register_pairs(fixed[k], moving[k], **opts)
        np.testing.assert_array_equal(alone.matrices[0], batch.matrices[k])
    again = register_pairs(fixed, moving, **opts)
    np.testing.assert_array_equal(again.matrices, batch.matrices)
    # Another seed draws other samples (another result, as accurate); every pixel, a third.
    other = register_pairs(fixed, moving, seed=1, **opts)
    every = register_pairs(fixed, moving, transform="rigid", samples=None)
    for result in (other, every):
        assert not np.array_equal(result.matrices, batch.matrices)
        np.testing.assert_array_less(_rms(result.matrices, truth, shape), 0.1)


def test_lncc_reads_every_pixel_whatever_the_samples(slices):
    shape = (64, 80)
    truth = _matrix(shape, shift=(1.5, -2.0))[None]
    fixed, moving = _pairs(slices, truth, shape)
    opts = {"transform": "translation", "loss": "lncc", "levels": make_levels((2, 1))}
    few = register_pairs(fixed, moving, samples=100, **opts)
    every = register_pairs(fixed, moving, samples=None, **opts)
    np.testing.assert_array_equal(few.matrices, every.matrices)


@pytest.mark.parametrize(
    ("samples", "error", "match"),
    [(63, ValueError, "`samples` must be >= 64, or None to read every pixel; got 63"),
     (0, ValueError, "`samples` must be >= 64, or None to read every pixel; got 0"),
     (-1, ValueError, "`samples` must be >= 64, or None"),
     (True, TypeError, "`samples` must be an int"), (1e4, TypeError, "`samples` must be an int")],
)  # fmt: skip
def test_samples_are_validated(slices, samples, error, match):
    with pytest.raises(error, match=match):
        register_pairs(slices[0, :32, :32], slices[1, :32, :32], samples=samples)


def test_gaussian_smoothing_equals_scipy_with_replicated_edges():
    rng = np.random.default_rng(9)
    images = rng.normal(size=(2, 30, 41)).astype(np.float32)
    for sigma in (1.0, 2.0):  # radius ceil(3 sigma) = scipy's int(3 sigma + 0.5)
        got = register_module._gaussian(torch.from_numpy(images), sigma).numpy()
        want = [ndimage.gaussian_filter(im.astype(np.float64), sigma, mode="nearest",
                                        truncate=3.0) for im in images]  # fmt: skip
        np.testing.assert_allclose(got, np.stack(want), atol=2e-6)
    unsmoothed = torch.from_numpy(images)
    assert register_module._gaussian(unsmoothed, 0.0) is unsmoothed  # sigma 0: untouched


def test_level_images_are_normalised_as_numpy_does_and_constant_ones_only_centred():
    from voxflow.core import _register_kernels as kernels

    rng = np.random.default_rng(13)
    images = rng.normal(100.0, 7.0, size=(4, 23, 31))
    images[1] = 42.0  # constant: std 0
    images[2] = 1e9 + rng.normal(size=(23, 31)) * 1e-7  # std far below 1e-6 of its size
    for dtype in (np.float64, np.float32, np.int32):
        values = np.clip(images, -(2**31), 2**31 - 1).astype(dtype)
        got, constant = kernels.normalise_images(values, register_module._STD_TINY)
        np.testing.assert_array_equal(constant, [False, True, True, False])
        for b, image in enumerate(values.astype(np.float64)):
            scale = 1.0 if constant[b] else image.std()
            want = ((image - image.mean()) / scale).astype(np.float32)
            np.testing.assert_allclose(got[b], want, rtol=1e-6, atol=1e-6 * abs(want).max())
    images[3, 5, 7] = np.inf
    with pytest.raises(ValueError, match="image 3 holds NaN or infinite values"):
        kernels.normalise_images(images, register_module._STD_TINY)


def test_compiled_loss_is_the_same_serial_and_from_many_threads(monkeypatch):
    from concurrent.futures import ThreadPoolExecutor

    from voxflow.core import _register_kernels as kernels

    rng = np.random.default_rng(12)
    fixed = rng.normal(size=(3, 40, 52)).astype(np.float32)
    xs = (np.arange(52) - 25.5).astype(np.float32)
    ys = (np.arange(40) - 19.5).astype(np.float32)
    lin = np.tile(np.diag([2 / 51, 2 / 39]), (3, 1, 1)) * rng.uniform(0.95, 1.05, (3, 1, 1))
    off = rng.normal(scale=0.05, size=(3, 2))
    ramp = (25.5, 19.5, 0.0)
    cases = [(rng.normal(size=(3, 40 * 52)).astype(np.float32), xs, ys, True)]
    drawn = np.sort(rng.choice(40 * 52, 700, replace=False))
    cases.append((cases[0][0][:, drawn].copy(), xs[drawn % 52], ys[drawn // 52], False))
    rows = np.array([2, 0])
    for moving, px, py, grid in cases:
        args = (fixed, moving, rows, px, py, grid, lin[:2], off[:2], ramp)
        moments, jacobian = kernels.moments_and_jacobian(*args)
        # Threads of a Dask worker call the kernel at once.
        with ThreadPoolExecutor(4) as pool:
            many = list(pool.map(lambda a: kernels.moments_and_jacobian(*a), [args] * 8))
        for got in many:
            np.testing.assert_array_equal(got[0], moments)
            np.testing.assert_array_equal(got[1], jacobian)
        # Without a thread-safe layer the same loop runs on the calling thread.
        monkeypatch.setattr(kernels, "_threadsafe", [False])
        serial = kernels.moments_and_jacobian(*args)
        np.testing.assert_array_equal(serial[0], moments)
        np.testing.assert_array_equal(serial[1], jacobian)
        monkeypatch.undo()
        assert moments[:, 0].min() > 0.5 * (moving.shape[1])  # most points count


def _level_after_failures(monkeypatch, growth, failures=8, epochs=60):
    """One level on a 1-D bowl whose first `failures` steps fail to improve, as when a pair
    oscillates about a coarse optimum; returns the parameter at the end (optimum 40)."""
    calls = []

    def bowl(problem, data, param, rows):
        loss = 0.01 * (param[rows][:, 0] - 40.0) ** 2
        loss.sum().backward()
        calls.append(None)
        value = loss.detach().double() + (100.0 if 1 < len(calls) <= 1 + failures else 0.0)
        return value, torch.zeros(len(rows), dtype=torch.bool)

    monkeypatch.setattr(register_module, "_loss_and_gradient", bowl)
    state = register_module._State(
        u=torch.zeros(1, 1), alive=torch.ones(1, dtype=torch.bool),
        steps=torch.zeros(1, dtype=torch.int64),
        loss=torch.full((1,), math.nan, dtype=torch.float64),
        early=torch.zeros(1, dtype=torch.bool),
    )  # fmt: skip
    register_module._run_level(
        None, None, Level(1, epochs, 1.0), state, 100, 1e-4, Optimizer.ADAM, growth
    )
    assert state.steps.item() == epochs
    return state.u.item()


def test_learning_rate_grows_back_after_the_steps_that_slowed_it(monkeypatch):
    # Eight failed steps leave 0.7 ** 8 (6 %) of the rate: without growing back, the pair
    # crawls the rest of the level; growing by 1.2 per improving step, it nears the optimum.
    crawled = _level_after_failures(monkeypatch, 1.0)
    grown = _level_after_failures(monkeypatch, register_module._GAIN_GROWTH)
    assert crawled < 10.0
    assert grown > 30.0


def test_only_coarse_levels_grow_the_learning_rate_back(monkeypatch, slices):
    seen = []
    run_level = register_module._run_level

    def spy(*args):
        seen.append(args[-1])
        return run_level(*args)

    monkeypatch.setattr(register_module, "_run_level", spy)
    fixed, moving = _pairs(slices, [_matrix((128, 160), shift=(1.5, -2.0))])
    register_pairs(fixed, moving, transform="translation", levels=make_levels((4, 2, 1), 30))
    assert seen == [register_module._GAIN_GROWTH, register_module._GAIN_GROWTH, 1.0]
