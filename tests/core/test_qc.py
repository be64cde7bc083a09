import io

import numpy as np
import pandas as pd
import pytest
from matplotlib.figure import Figure
from matplotlib.image import imread
from scipy import ndimage

from voxflow.core.qc import _draw_densities, qc_png


def _decode(png):
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    return imread(io.BytesIO(png), format="png")[..., :3]


def _regions():
    return pd.DataFrame(
        {
            "id": [997, 1, 2, 3, 4, 5, 0],
            "acronym": ["root", "A", "B", "C", "unlisted", "D", "outside"],
            "density_per_mm3": [10.0, 30.0, 0.0, 20.0, 99.0, 50.0, 80.0],
            "count": [7, 3, 0, 2, 1, 2, 4],
        }
    )


def test_png_has_the_documented_size_with_and_without_the_bar_chart():
    rng = np.random.default_rng(0)
    image = rng.integers(0, 1000, (12, 20, 30)).astype(np.uint16)
    centroids = rng.uniform(0, 11, (25, 3))
    plain = _decode(qc_png(image, centroids, scale=(4.0, 1.6, 1.6), title="seed 0"))
    assert plain.shape == (450, 1200, 3)
    assert plain.std() > 0.05  # not a blank canvas
    charted = _decode(qc_png(image, centroids, scale=(4.0, 1.6, 1.6), regions=_regions(), top=3))
    assert charted.shape == (450, 1600, 3)


@pytest.mark.parametrize("centroids", [None, np.zeros((0, 3))])
def test_renders_without_objects_or_regions(centroids):
    image = np.zeros((5, 6, 7), np.float32)
    assert _decode(qc_png(image, centroids)).shape == (450, 1200, 3)


def _panels(picture):
    """Bounding boxes (row0, row1, col0, col1) of the three black projection panels, left first."""
    black = picture.max(axis=2) < 0.05
    labels, n = ndimage.label(black)
    sizes = ndimage.sum(black, labels, np.arange(1, n + 1))
    boxes = []
    for k in np.argsort(sizes)[::-1][:3] + 1:
        # Rows and columns mostly inside the panel: tick marks stuck to its spines do not count.
        panel = labels == k
        rows = np.flatnonzero(panel.mean(axis=1) > 0.5 * panel.mean(axis=1).max())
        cols = np.flatnonzero(panel.mean(axis=0) > 0.5 * panel.mean(axis=0).max())
        boxes.append((rows[0], rows[-1] + 1, cols[0], cols[-1] + 1))
    return sorted(boxes, key=lambda b: b[2])


@pytest.mark.parametrize("centroid", [(1.0, 3.0, 30.0), (6.0, 17.0, 5.0)])
def test_a_marker_lands_where_its_centroid_is(centroid):
    shape, scale = (8, 20, 36), (3.0, 1.0, 1.0)
    image = np.zeros(shape, np.float32)
    blank = _decode(qc_png(image, None, scale=scale))
    marked = _decode(qc_png(image, np.array([centroid]), scale=scale))
    changed = np.abs(marked - blank).sum(axis=2) > 0.2
    assert changed.any()
    # Each panel shows (rows, cols) = (y, x), (z, x), (z, y); its box spans the voxel extent.
    for (r0, r1, c0, c1), (rows, cols) in zip(
        _panels(blank), [(1, 2), (0, 2), (0, 1)], strict=True
    ):
        hit = np.argwhere(changed[r0:r1, c0:c1])
        assert hit.size, "no marker in a panel"
        expected = [
            (centroid[rows] + 0.5) / shape[rows] * (r1 - r0),
            (centroid[cols] + 0.5) / shape[cols] * (c1 - c0),
        ]
        np.testing.assert_allclose(hit.mean(axis=0), expected, atol=4)


def test_panels_keep_the_physical_aspect_ratio():
    shape, scale = (10, 20, 20), (4.0, 1.0, 1.0)  # 40 × 20 × 20 µm
    boxes = _panels(_decode(qc_png(np.zeros(shape), None, scale=scale)))
    aspect = [(r1 - r0) / (c1 - c0) for r0, r1, c0, c1 in boxes]
    np.testing.assert_allclose(aspect, [20 / 20, 40 / 20, 40 / 20], rtol=0.05)


def test_bar_chart_shows_the_densest_regions_that_hold_objects():
    ax = Figure().subplots()
    _draw_densities(ax, _regions(), top=3)
    labels = [t.get_text() for t in ax.get_yticklabels()]
    assert labels == ["D", "A", "C"]  # B has no objects; "unlisted" and "outside" are no regions
    assert [p.get_width() for p in ax.patches] == [50.0, 30.0, 20.0]


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"image": np.zeros((4, 4))}, ValueError, "`image` must be a non-empty 3-D"),
        ({"image": [[[0.0]]]}, TypeError, "`image` must be a NumPy array"),
        ({"centroids": np.zeros((2, 2))}, ValueError, r"`centroids` must have shape \(N, 3\)"),
        ({"scale": (1, 1)}, ValueError, "`scale` needs one number per axis"),
        ({"regions": pd.DataFrame({"acronym": ["a"]})}, ValueError, "`regions` needs the col"),
        ({"regions": [1, 2]}, TypeError, "`regions` must be a pandas DataFrame"),
        ({"top": 0}, ValueError, "`top` must be >= 1"),
        ({"top": 2.5}, TypeError, "`top` must be an integer"),
    ],
)
def test_qc_png_validation(kwargs, error, match):
    args = {"image": np.zeros((3, 4, 5)), **kwargs}
    with pytest.raises(error, match=match):
        qc_png(args.pop("image"), **args)
