"""Built-in plugins give one result for integer and float copies of the same data."""

import numpy as np
import pytest

from tests.conftest import block_mean_reference
from voxflow.core import apply_scaled_processing
from voxflow.plugins import GaussianBiasFieldCorrection, IntensityNormalization

SHAPE = (24, 41, 37)
FACTORS = (3, 4, 4)


def _biased(low, high, seed):
    """Integer data of a few grey levels under a smooth bias, as float64."""
    rng = np.random.default_rng(seed)
    z, y, x = np.meshgrid(*(np.linspace(0, 1, n) for n in SHAPE), indexing="ij")
    bias = 1.0 - 0.3 * x * y + 0.1 * z
    return np.rint(bias * rng.integers(low, high, SHAPE)).astype(np.float64)


@pytest.mark.parametrize(("dtype", "low", "high"), [(np.uint8, 10, 13), (np.uint16, 900, 1300)])
def test_normalize_takes_its_percentiles_from_exact_block_means(dtype, low, high):
    data = _biased(low, high, seed=1)
    runs = {}
    for kind in (dtype, np.float32):
        plugin = IntensityNormalization(low=1.0, high=99.0, out_max=float(np.iinfo(dtype).max))
        runs[kind] = apply_scaled_processing(data.astype(kind), plugin, FACTORS, dtype="float32")
    means = block_mean_reference(data, FACTORS).astype(np.float32).astype(np.float64)
    want = tuple(np.percentile(means, [1.0, 99.0]))
    for res in runs.values():
        (run,) = res.plugins
        assert (run.lo, run.hi) == want
    got, ref = (runs[k].image.compute() for k in (dtype, np.float32))
    np.testing.assert_array_equal(got, ref)


def test_gaussian_field_of_uint8_data_is_that_of_the_same_data_as_float32():
    data = _biased(40, 200, seed=2)
    fields = [
        apply_scaled_processing(
            data.astype(dtype),
            GaussianBiasFieldCorrection(sigma=3.0, units="voxel", mask="all", offset=0.0),
            FACTORS,
            dtype="float32",
        ).field
        for dtype in (np.uint8, np.float32)
    ]
    np.testing.assert_array_equal(fields[0], fields[1])
