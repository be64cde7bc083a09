import math

import numpy as np
import pytest

from voxflow.core.levels import plan_levels

ZYX = (True, True, True)


def _shapes(shape, plan):
    """Shape of every level, level 0 first."""
    shapes = [tuple(shape)]
    for step in plan:
        shapes.append(tuple(math.ceil(n / f) for n, f in zip(shapes[-1], step, strict=True)))
    return shapes


def test_anisotropic_4_to_1_halves_xy_twice_then_everything():
    plan = plan_levels((512, 4096, 4096), (4.0, 1.0, 1.0), ZYX)
    assert plan[:4] == [(1, 2, 2), (1, 2, 2), (2, 2, 2), (2, 2, 2)]
    assert plan == [(1, 2, 2), (1, 2, 2)] + [(2, 2, 2)] * 3 + [(1, 2, 2)]
    assert _shapes((512, 4096, 4096), plan)[-1] == (64, 64, 64)


def test_anisotropic_3_to_1_halves_xy_once_then_everything():
    plan = plan_levels((1024, 2048, 2048), (3.0, 1.0, 1.0), ZYX)
    assert plan[:3] == [(1, 2, 2), (2, 2, 2), (2, 2, 2)]


def test_isotropic_halves_every_axis_until_min_size():
    plan = plan_levels((512, 512, 512), (0.5, 0.5, 0.5), ZYX)
    assert plan == [(2, 2, 2)] * 3
    assert _shapes((512, 512, 512), plan)[-1] == (64, 64, 64)


def test_coarse_y_axis_waits_for_the_others():
    # y is twice as coarse as z and x: z and x are halved first, then all three.
    plan = plan_levels((1024, 1024, 1024), (1.0, 2.0, 1.0), ZYX)
    assert plan[:3] == [(2, 1, 2), (2, 2, 2), (2, 2, 2)]


def test_spacings_equal_up_to_rounding_count_as_equal():
    # 2 * y is 0.30000000000000004 here, which the 1e-6 tolerance treats as z's 0.3.
    plan = plan_levels((256, 256, 256), (0.3, 0.15000000000000002, 0.15), ZYX)
    assert plan[0] == (1, 2, 2)


def test_channel_and_time_axes_are_never_reduced():
    plan = plan_levels((3, 2, 256, 256, 256), (1, 1, 1, 1, 1), (False, False, *ZYX))
    assert plan == [(1, 1, 2, 2, 2)] * 2
    czyx = plan_levels((2, 300, 300, 300), (1, 2, 1, 1), (False, True, True, True))
    assert all(step[0] == 1 for step in czyx)
    assert czyx[0] == (1, 1, 2, 2)


def test_numpy_inputs_are_accepted():
    plan = plan_levels(
        np.array([3, 256, 256]), np.array([1.0, 2.0, 2.0]), np.array([0, 1, 1], bool)
    )
    assert plan == [(1, 2, 2)] * 2
    assert all(type(f) is int for step in plan for f in step)


def test_2d_image():
    plan = plan_levels((1000, 300), (1.0, 1.0), (True, True))
    # x stops once at 38 (not above 64); y goes on alone from 125 to 63.
    assert plan == [(2, 2), (2, 2), (2, 2), (2, 1)]
    assert _shapes((1000, 300), plan)[-1] == (63, 38)


def test_thin_axis_stops_at_min_size_while_the_others_go_on():
    plan = plan_levels((100, 1024, 1024), (1, 1, 1), ZYX, min_size=64)
    assert plan == [(2, 2, 2)] + [(1, 2, 2)] * 3
    assert _shapes((100, 1024, 1024), plan)[-1] == (50, 64, 64)


def test_the_coarsest_spacing_is_taken_over_reducible_axes_only():
    # z (size 16) is below min_size and frozen; y and x are made isotropic between themselves.
    plan = plan_levels((16, 1024, 1024), (10.0, 1.0, 2.0), ZYX)
    assert plan[:3] == [(1, 2, 1), (1, 2, 2), (1, 2, 2)]


def test_an_array_at_or_below_min_size_gets_no_levels():
    assert plan_levels((64, 64, 64), (1, 1, 1), ZYX) == []
    assert plan_levels((65, 64, 64), (1, 1, 1), ZYX) == [(2, 1, 1)]
    assert plan_levels((8, 8), (1, 1), (True, True), min_size=4) == [(2, 2)]


def test_levels_sets_the_count_and_ignores_min_size():
    assert plan_levels((512, 512, 512), (1, 1, 1), ZYX, levels=1) == []
    assert plan_levels((512, 512, 512), (1, 1, 1), ZYX, levels=2) == [(2, 2, 2)]
    plan = plan_levels((32, 32, 32), (1, 1, 1), ZYX, levels=4)  # below the default min_size
    assert plan == [(2, 2, 2)] * 3


def test_levels_stops_when_every_axis_is_a_single_voxel():
    plan = plan_levels((4, 4, 3), (1, 1, 1), ZYX, levels=10)
    assert plan == [(2, 2, 2), (2, 2, 2)]
    assert _shapes((4, 4, 3), plan)[-1] == (1, 1, 1)


def test_an_axis_of_size_one_is_never_reduced():
    plan = plan_levels((1, 8, 8), (1, 1, 1), ZYX, levels=4)
    assert plan == [(1, 2, 2)] * 3
    # z is coarsest but cannot be reduced, so y and x go on by the same rule among themselves.
    plan = plan_levels((1, 4, 4), (5, 1, 1), ZYX, levels=3)
    assert plan == [(1, 2, 2)] * 2


def test_fixed_factors_replace_the_anisotropy_rule():
    plan = plan_levels((512, 512, 512), (4, 1, 1), ZYX, factors=(2, 2, 2))
    assert plan == [(2, 2, 2)] * 3
    plan = plan_levels((2, 512, 512, 512), (1, 1, 1, 1), (False, *ZYX), factors=(1, 2, 3))
    assert plan == [(1, 1, 2, 3), (1, 1, 2, 3), (1, 1, 2, 1)]


def test_fixed_factors_give_1_to_axes_that_are_done():
    plan = plan_levels((2, 16, 16), (1, 1, 1), ZYX, levels=4, factors=(2, 2, 2))
    assert plan == [(2, 2, 2), (1, 2, 2), (1, 2, 2)]
    assert plan_levels((512, 512), (1, 1), (True, True), factors=(1, 1)) == []


@pytest.mark.parametrize(
    ("args", "kwargs", "error", "match"),
    [
        (((8, 8), (1, 1, 1), (True, True)), {}, ValueError, r"`scale` needs one number per axis"),
        (((8, 8), (1, 0), (True, True)), {}, ValueError, "`scale` must hold positive, finite"),
        (((8, 8), (1, -2), (True, True)), {}, ValueError, "`scale` must hold positive, finite"),
        (((8, 8), (1, "1"), (True, True)), {}, TypeError, "`scale` must hold real numbers"),
        (((8, 8), (1, 1), (True,)), {}, ValueError, r"`spatial` needs one bool per axis \(2\)"),
        (((8, 8), (1, 1), (1, 1)), {}, TypeError, "`spatial` must hold bools"),
        (((8, 8), (1, 1), "yx"), {}, TypeError, "`spatial` must be a sequence of bools"),
        (((8, 0), (1, 1), (True, True)), {}, ValueError, "`shape` must be >= 1, got 0"),
        (((8, 8.0), (1, 1), (True, True)), {}, TypeError, "`shape` must be an integer"),
        ((8, (1,), (True,)), {}, TypeError, "`shape` must be a sequence of integers, got int"),
        (((8, 8), (1, 1), (True, True)), {"levels": 0}, ValueError, "`levels` must be >= 1"),
        (((8, 8), (1, 1), (True, True)), {"levels": 2.0}, TypeError, "`levels` must be an int"),
        (((8, 8), (1, 1), (True, True)), {"min_size": 0}, ValueError, "`min_size` must be >= 1"),
        (((8, 8), (1, 1), (True, True)), {"min_size": "4"}, TypeError, "`min_size` must be an"),
        (
            ((2, 8, 8), (1, 1, 1), (False, True, True)),
            {"factors": (1, 2, 2)},
            ValueError,
            r"`factors` needs one integer per spatial axis \(2\), got \(1, 2, 2\)",
        ),
        (((8, 8), (1, 1), (True, True)), {"factors": (2, 0)}, ValueError, "`factors` must be >="),
        (((8, 8), (1, 1), (True, True)), {"factors": (2, 1.5)}, TypeError, "`factors` must be an"),
    ],
)
def test_validation(args, kwargs, error, match):
    with pytest.raises(error, match=match):
        plan_levels(*args, **kwargs)
