import numpy as np
import pytest

from voxflow.core import downsample_array
from voxflow.core.scaled import ScaleContext
from voxflow.core.synth import lightsheet

# One synthetic lightsheet volume serves every quality test: 128 × 256 × 256 voxels of
# (2, 1.6, 1.6) µm, i.e. 256 × 410 × 410 µm, with a known multiplicative bias.
QUALITY_SHAPE = (1, 128, 256, 256)
QUALITY_SPACING = (2.0, 1.6, 1.6)


@pytest.fixture(scope="session")
def volume():
    return lightsheet(QUALITY_SHAPE, spacing=QUALITY_SPACING, seed=0)


def context_for(spacing, factors, units="micrometer"):
    """The context the framework gives a plugin for a low-res copy made with `factors`."""
    return ScaleContext(
        dims=("z", "y", "x")[-len(spacing) :],
        spacing=tuple(s * f for s, f in zip(spacing, factors, strict=True)),
        fullres_spacing=tuple(float(s) for s in spacing),
        factors=tuple(factors),
        units=(units,) * len(spacing),
    )


def upsample_repeat(field, factors, shape):
    """Each low-res voxel repeated over its block (the test's own simple upsampling)."""
    out = field
    for axis, f in enumerate(factors):
        out = np.repeat(out, f, axis=axis)
    return out[tuple(slice(0, n) for n in shape)]


class Quality:
    """Ground-truth figures for a correction of the quality volume at one factor.

    Definitions (the synthetic image is ``bias × clean + 100`` plus noise):

    - ``r``: Pearson correlation, over the tissue (block-mean tissue mask > 0.5), between the
      low-resolution field and the true bias reduced by the same block mean.
    - cell CV: coefficient of variation across cells of the cell gain, ``(mean of the image
      over the cell − 100) / mean of the clean signal over the cell``: the cell's recorded
      brightness relative to its true brightness. Before correction it varies with the bias;
      after a perfect correction it is constant up to noise.
    - background CV: the same gain for the tissue outside cells, over blocks of
      4 × 16 × 16 voxels (8 × 26 × 26 µm) that are mostly such tissue: block mean of
      (image − 100) / block mean of the clean signal.
    """

    BLOCK = (4, 16, 16)

    def __init__(self, volume, factor):
        self.volume = volume
        self.factors = (factor,) * 3
        self.image = volume.image[0]
        self.low = downsample_array(self.image, self.factors, "mean").astype(np.float32)
        self.bias = downsample_array(volume.bias, self.factors, "mean")
        tissue = downsample_array(volume.tissue.astype(np.float32), self.factors, "mean")
        self.tissue = tissue > 0.5
        self.context = context_for(volume.spacing, self.factors)
        labels = volume.cell_labels.ravel()
        self._labels = labels
        self._n = int(labels.max()) + 1
        self._count = np.bincount(labels, minlength=self._n)[1:]
        self._clean_cell = np.bincount(labels, weights=volume.clean.ravel(), minlength=self._n)[1:]
        self._between = volume.tissue & (volume.cell_labels == 0)
        cover = downsample_array(self._between.astype(np.float64), self.BLOCK, "mean")
        self._blocks = cover > 0.5
        clean = np.where(self._between, volume.clean, 0.0)
        self._clean_blocks = downsample_array(clean, self.BLOCK, "mean")[self._blocks]

    def r(self, field):
        return float(np.corrcoef(field[self.tissue], self.bias[self.tissue])[0, 1])

    def cell_cv(self, image):
        sums = np.bincount(self._labels, weights=image.ravel(), minlength=self._n)[1:]
        keep = self._count > 0
        gain = (sums[keep] / self._count[keep] - self.volume.background) / (
            self._clean_cell[keep] / self._count[keep]
        )
        return float(gain.std() / gain.mean())

    def background_cv(self, image):
        signal = np.where(self._between, image - self.volume.background, 0.0)
        gain = downsample_array(signal, self.BLOCK, "mean")[self._blocks] / self._clean_blocks
        return float(gain.std() / gain.mean())

    def corrected(self, field, offset):
        """The full-resolution image corrected with `field` upsampled by repetition."""
        up = upsample_repeat(field.astype(np.float64), self.factors, self.image.shape)
        return offset + (self.image.astype(np.float64) - offset) / up


@pytest.fixture(scope="session")
def quality4(volume):
    return Quality(volume, 4)


@pytest.fixture(scope="session")
def quality8(volume):
    return Quality(volume, 8)
