import numpy as np
import pytest

from voxflow.core import quality
from voxflow.core.quality import block_cv, cell_cv, field_correlation, sample_at


def test_field_correlation_ignores_scale_and_respects_the_mask():
    rng = np.random.default_rng(0)
    truth = rng.random((4, 5, 6))
    assert field_correlation(3 * truth + 1, truth) == pytest.approx(1.0)
    noisy = truth.copy()
    mask = np.ones(truth.shape, bool)
    mask[0] = False
    noisy[0] = rng.random((5, 6))  # wrong only outside the mask
    assert field_correlation(noisy, truth, mask) == pytest.approx(1.0)
    assert field_correlation(noisy, truth) < 0.99
    with pytest.raises(ValueError, match="differ in shape"):
        field_correlation(truth[:2], truth)


def test_cell_cv_is_zero_for_a_uniform_gain_and_follows_a_bias():
    labels = np.zeros((4, 8, 8), int)
    labels[:, :4, :4], labels[:, 4:, 4:] = 1, 2
    clean = np.where(labels == 1, 900.0, 1800.0)
    assert cell_cv(2 * clean + 100, clean, labels, offset=100) == pytest.approx(0.0, abs=1e-12)
    biased = clean * np.where(labels == 2, 0.5, 1.0)
    # ratios 1 and 0.5: std 0.25, mean 0.75
    assert cell_cv(biased, clean, labels) == pytest.approx(0.25 / 0.75)


def test_block_cv_uses_only_blocks_mostly_inside_the_mask():
    clean = np.full((4, 8, 8), 10.0)
    image = clean.copy()
    image[:, :, 4:] *= 3
    mask = np.ones(clean.shape, bool)
    assert block_cv(image, clean, mask, (4, 8, 4)) == pytest.approx(0.5)  # ratios 1, 3
    mask[:, :, 4:] = False
    assert block_cv(image, clean, mask, (4, 8, 4)) == pytest.approx(0.0)


def test_sample_at_rounds_and_clamps():
    image = np.arange(12).reshape(3, 4)
    got = sample_at(image, [np.array([-1.0, 0.6, 7.0]), np.array([2.4, 3.6])])
    np.testing.assert_array_equal(got, [[2, 3], [6, 7], [10, 11]])


def test_match_points_one_to_one_within_radius():
    truth = np.array([[0.0, 0, 0], [0, 0, 10], [0, 0, 20]])
    detected = np.array([[0.0, 0, 1], [0, 0, 1.5], [0, 0, 10.2], [0, 0, 40]])
    d, t = quality.match_points(detected, truth, np.array([2.0, 2.0, 2.0]))
    assert dict(zip(d.tolist(), t.tolist(), strict=True)) == {0: 0, 2: 1}


def test_match_points_respects_each_radius():
    truth = np.array([[0.0, 0, 0], [0, 0, 10]])
    detected = np.array([[0.0, 0, 3], [0, 0, 13]])
    d, t = quality.match_points(detected, truth, np.array([4.0, 2.0]))
    assert d.tolist() == [0] and t.tolist() == [0]


def test_detection_scores_against_hand_count():
    truth = np.array([[0.0, 0, 0], [0, 0, 10], [0, 0, 20], [0, 0, 30]])
    detected = np.array([[0.0, 0, 0.5], [0, 0, 10.5], [0, 0, 50]])
    s = quality.detection_scores(detected, truth, 1.0)
    assert (s["tp"], s["fp"], s["fn"]) == (2, 1, 2)
    assert s["f1"] == pytest.approx(2 * (2 / 3) * 0.5 / (2 / 3 + 0.5))
    sub = quality.detection_scores(detected, truth, 1.0, subset=np.array([1, 1, 0, 0], bool))
    assert (sub["tp"], sub["fp"], sub["fn"]) == (2, 0, 0)


def test_detection_scores_empty():
    s = quality.detection_scores(np.empty((0, 3)), np.array([[0.0, 0, 0]]), 1.0)
    assert (s["tp"], s["fn"], s["f1"]) == (0, 1, 0.0)
