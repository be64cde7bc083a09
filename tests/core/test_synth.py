import json
import math

import numpy as np
import pytest
from scipy import ndimage

from voxflow.core.synth import EMStack, LightsheetVolume, Region, em_stack, lightsheet

SMALL = (1, 24, 72, 72)


@pytest.fixture(scope="module")
def vol() -> LightsheetVolume:
    return lightsheet(seed=0)


@pytest.fixture(scope="module")
def em() -> EMStack:
    return em_stack(seed=0)


def face_adjacent_pairs(labels):
    pairs = set()
    for axis in range(labels.ndim):
        a = np.moveaxis(labels, axis, 0)
        lo, hi = a[:-1], a[1:]
        m = (lo != hi) & (lo > 0) & (hi > 0)
        pairs |= {(int(min(p, q)), int(max(p, q))) for p, q in zip(lo[m], hi[m], strict=True)}
    return pairs


def corr(a, b):
    return float(np.corrcoef(np.asarray(a, float).ravel(), np.asarray(b, float).ravel())[0, 1])


# --------------------------------------------------------------------------- lightsheet


def test_lightsheet_types_shapes_dims(vol):
    zyx = (48, 160, 160)
    assert vol.dims == "czyx"
    assert vol.image.shape == (2, *zyx) and vol.image.dtype == np.uint16
    assert vol.spacing == (4.0, 1.6, 1.6)
    assert vol.bias.shape == zyx and vol.bias.dtype == np.float32
    assert vol.clean.shape == zyx and vol.clean.dtype == np.float32
    assert vol.cell_labels.shape == zyx and vol.cell_labels.dtype == np.int32
    assert vol.atlas.shape == zyx and vol.atlas.dtype == np.int32
    assert vol.tissue.shape == zyx and vol.tissue.dtype == bool
    assert vol.centroids.shape == (vol.n_cells, 3)
    assert vol.radii.shape == (vol.n_cells,)
    assert vol.channel_names == ("nuclear", "autofluorescence")
    assert all(isinstance(r, Region) for r in vol.regions)
    with pytest.raises(ValueError, match="read-only"):
        vol.image[0, 0, 0, 0] = 1


def test_lightsheet_single_channel():
    v = lightsheet(SMALL, seed=3)
    assert v.image.shape == SMALL
    assert v.channel_names == ("nuclear",)


def test_lightsheet_deterministic():
    a, b, c = lightsheet(SMALL, seed=5), lightsheet(SMALL, seed=5), lightsheet(SMALL, seed=6)
    for name in ("image", "cell_labels", "centroids", "radii", "bias", "clean"):
        np.testing.assert_array_equal(getattr(a, name), getattr(b, name))
    assert a.touching == b.touching
    assert not np.array_equal(a.image, c.image)
    assert not np.array_equal(a.centroids[:1], c.centroids[:1])


def test_default_cell_count_follows_tissue_volume(vol):
    tissue_um3 = vol.tissue.sum() * np.prod(vol.spacing)
    assert vol.n_cells == round(tissue_um3 / 6000.0)
    assert len(vol.touching) == vol.n_cells // 16


def test_labels_are_the_cells(vol):
    present = np.unique(vol.cell_labels)
    np.testing.assert_array_equal(present, np.arange(vol.n_cells + 1))
    r = vol.radii
    assert np.all((r >= 0.8 * 4.0) & (r <= 1.2 * 4.0))


def test_centroids_match_labels(vol):
    ids = np.arange(1, vol.n_cells + 1)
    com = np.array(ndimage.center_of_mass(vol.cell_labels > 0, vol.cell_labels, ids))
    in_pair = np.isin(ids, np.array(vol.touching).ravel())
    assert in_pair.sum() == 2 * len(vol.touching)
    err = np.abs(com - vol.centroids)
    assert err[~in_pair].max() < 0.5
    # Split cells lose their far side to the partner, but stay close.
    assert err[in_pair].max() < 1.5
    np.testing.assert_allclose(vol.centroids_um, vol.centroids * np.array(vol.spacing))


def test_label_volume_matches_sphere(vol):
    counts = np.bincount(vol.cell_labels.ravel())[1:]
    single = ~np.isin(np.arange(1, vol.n_cells + 1), np.array(vol.touching).ravel())
    expected = 4 / 3 * np.pi * vol.radii**3 / np.prod(vol.spacing)
    ratio = counts[single] / expected[single]
    assert 0.9 < np.median(ratio) < 1.1


@pytest.mark.parametrize(
    ("spacing", "radius", "seed"),
    [((4.0, 1.6, 1.6), 4.0, 1), ((2.0, 2.0, 2.0), 3.0, 2), ((5.0, 1.0, 1.0), 3.5, 3)],
)
def test_touching_pairs_are_exactly_the_adjacent_labels(spacing, radius, seed):
    v = lightsheet((1, 32, 96, 96), spacing=spacing, cell_radius_um=radius, seed=seed)
    assert len(v.touching) > 0
    assert face_adjacent_pairs(v.cell_labels) == set(v.touching)
    # No other contact, even diagonally: 26-connected components are singles or pairs.
    _, n = ndimage.label(v.cell_labels > 0, structure=np.ones((3, 3, 3)))
    assert n == v.n_cells - len(v.touching)


def test_touching_distances_and_gaps(vol):
    c = vol.centroids_um
    r = vol.radii
    d = np.linalg.norm(c[:, None] - c[None], axis=-1)
    pair = np.zeros_like(d, bool)
    for a, b in vol.touching:
        assert a < b
        pair[a - 1, b - 1] = pair[b - 1, a - 1] = True
        mean_r = (r[a - 1] + r[b - 1]) / 2
        assert 1.6 <= d[a - 1, b - 1] / mean_r <= 1.9
    gap = d - (r[:, None] + r[None])
    others = ~pair & ~np.eye(len(r), dtype=bool)
    assert gap[others].min() >= math.hypot(*vol.spacing) - 1e-9


def test_cells_inside_tissue_and_regions(vol):
    assert np.all(vol.tissue[vol.cell_labels > 0])
    idx = tuple(np.rint(vol.centroids).astype(int).T)
    np.testing.assert_array_equal(vol.cell_regions, vol.atlas[idx])
    gt = vol.ground_truth()
    assert gt["cell_region"] == vol.atlas[idx].tolist()
    leaves = {r["id"] for r in gt["regions"] if r["is_leaf"]}
    assert set(gt["cell_region"]) <= leaves


def test_atlas_partitions_tissue_into_leaves(vol):
    parents = {r.parent_id for r in vol.regions}
    leaves = {r.id for r in vol.regions if r.id not in parents}
    assert set(np.unique(vol.atlas[vol.tissue]).tolist()) == leaves
    assert np.all(vol.atlas[~vol.tissue] == 0)
    assert vol.regions[0].id == 997 and vol.regions[0].parent_id is None
    # Each leaf is one connected, compact piece.
    for leaf in leaves:
        _, n = ndimage.label(vol.atlas == leaf)
        assert n == 1


def test_region_counts_and_aggregation(vol):
    table = {r["id"]: r for r in vol.ground_truth()["regions"]}
    children: dict[int, list[int]] = {}
    for r in table.values():
        if r["parent_id"] is not None:
            children.setdefault(r["parent_id"], []).append(r["id"])
    assert table[997]["cell_count"] == vol.n_cells
    leaf_counts = np.bincount(vol.cell_regions)
    voxel_um3 = np.prod(vol.spacing)
    for rid, r in table.items():
        if r["is_leaf"]:
            assert r["cell_count"] == leaf_counts[rid] if rid < leaf_counts.size else 0
            assert r["cell_count"] >= 5
            assert r["volume_voxels"] == int((vol.atlas == rid).sum())
        else:
            kids = children[rid]
            for key in ("cell_count", "volume_voxels"):
                assert r[key] == sum(table[k][key] for k in kids)
        assert r["volume_um3"] == pytest.approx(r["volume_voxels"] * voxel_um3)
        assert r["density_per_mm3"] == pytest.approx(r["cell_count"] / r["volume_um3"] * 1e9)
    assert table[997]["volume_voxels"] == int(vol.tissue.sum())


def test_bias_field(vol):
    b = vol.bias.astype(float)
    assert 0.4 <= b.min() and b.max() <= 1.0
    assert b[0, 0, 0] == pytest.approx(1.0)
    # Smooth: neighbouring voxels differ by ~1 % at most and the slope barely changes.
    for axis in range(3):
        assert np.abs(np.diff(b, axis=axis)).max() < 0.015
        assert np.abs(np.diff(b, n=2, axis=axis)).max() < 5e-4
    p = vol.ground_truth()["bias"]
    z = np.arange(b.shape[0]) * vol.spacing[0]
    x = np.arange(b.shape[2]) * vol.spacing[2]
    model = np.exp(-z / p["length_z_um"])[:, None, None] * np.exp(-x / p["length_x_um"])
    np.testing.assert_allclose(b, np.broadcast_to(model, b.shape), rtol=1e-5)
    assert p["min"] == pytest.approx(b.min()) and p["max"] == pytest.approx(b.max())


def test_image_is_biased_clean_plus_background_and_noise(vol):
    img = vol.image[0].astype(float)
    expected = vol.bias * vol.clean.astype(float)
    cells = vol.cell_labels > 0
    ratio = (img[cells] - vol.background) / expected[cells]
    assert np.median(ratio) == pytest.approx(1.0, abs=0.02)
    # Residuals are Poisson shot noise plus Gaussian read noise.
    z = (img - vol.background - expected) / np.sqrt(expected + vol.read_noise**2)
    assert np.std(z[vol.tissue]) == pytest.approx(1.0, abs=0.05)
    outside = img[~vol.tissue]
    assert np.mean(outside) == pytest.approx(vol.background, abs=0.5)
    assert np.std(outside) == pytest.approx(vol.read_noise, rel=0.05)
    # The clean signal is brighter inside cells than in the bare tissue.
    assert np.median(vol.clean[cells]) > 4 * np.median(vol.clean[vol.tissue & ~cells])


def test_autofluorescence_has_no_cells(vol):
    cells = vol.cell_labels > 0
    shell = ndimage.binary_dilation(cells, iterations=2) & ~cells & vol.tissue
    auto, nuc = vol.image[1].astype(float), vol.image[0].astype(float)
    assert np.median(auto[cells]) / np.median(auto[shell]) == pytest.approx(1.0, abs=0.05)
    assert np.median(nuc[cells]) / np.median(nuc[shell]) > 3
    assert np.median(auto[vol.tissue]) > np.median(auto[~vol.tissue]) + 100


def test_explicit_cell_count():
    v = lightsheet(SMALL, n_cells=20, seed=1)
    assert v.n_cells == 20 and int(v.cell_labels.max()) == 20
    assert len(v.touching) == 1
    empty = lightsheet(SMALL, n_cells=0, seed=1)
    assert empty.n_cells == 0 and not empty.cell_labels.any()
    assert empty.ground_truth()["regions"][0]["cell_count"] == 0


def test_lightsheet_ground_truth_json_round_trip(vol):
    gt = vol.ground_truth()
    back = json.loads(json.dumps(gt))
    assert back == gt
    assert back["kind"] == "lightsheet" and back["dims"] == "czyx"
    assert back["shape"] == [2, 48, 160, 160]
    assert back["spacing_um"] == [4.0, 1.6, 1.6]
    np.testing.assert_array_equal(np.array(back["centroids_voxel"]), vol.centroids)
    np.testing.assert_array_equal(np.array(back["radii_um"]), vol.radii)
    assert [tuple(p) for p in back["touching"]] == list(vol.touching)
    assert back["labels"] == list(range(1, vol.n_cells + 1))
    assert back["background"] == 100.0 and back["noise"]["read_sigma"] == 5.0


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"shape": 48}, TypeError, "`shape` must be a sequence"),
        ({"shape": (48, 160, 160)}, ValueError, r"`shape` needs one size per axis \(czyx"),
        ({"shape": (1, 48.0, 160, 160)}, TypeError, "`shape` must hold integers"),
        ({"shape": (1, 0, 160, 160)}, ValueError, "`shape` sizes must be positive"),
        ({"shape": (1, 8, 160, 160)}, ValueError, "`shape` is too small"),
        ({"shape": (3, 48, 160, 160)}, ValueError, "channel count must be 1 or 2"),
        ({"spacing": 4.0}, TypeError, "`spacing` must be a sequence"),
        ({"spacing": (1.0, 1.0)}, ValueError, "`spacing` needs one size per axis"),
        ({"spacing": (1.0, "a", 1.0)}, TypeError, "`spacing` must be a real number"),
        ({"spacing": (1.0, 0.0, 1.0)}, ValueError, "`spacing` must be positive"),
        ({"spacing": (1.0, np.nan, 1.0)}, ValueError, "`spacing` must be finite"),
        ({"n_cells": 2.5}, TypeError, "`n_cells` must be an integer or None"),
        ({"n_cells": -1}, ValueError, "`n_cells` must be non-negative"),
        ({"n_cells": 5000}, ValueError, "`n_cells`=5000 cells .* do not fit"),
        ({"cell_radius_um": True}, TypeError, "`cell_radius_um` must be a real number"),
        ({"cell_radius_um": 0.0}, ValueError, r"`cell_radius_um` must lie in \(0.0"),
        ({"cell_radius_um": 2.0}, ValueError, "`cell_radius_um` must be at least 2.87 µm"),
        ({"cell_radius_um": 12.0}, ValueError, "`shape` is too small for cells of 12.0"),
        ({"seed": 1.5}, TypeError, "`seed` must be an integer"),
        ({"seed": -1}, ValueError, "`seed` must be non-negative"),
    ],
)
def test_lightsheet_validation(kwargs, error, match):
    kwargs = {"shape": SMALL, **kwargs}
    with pytest.raises(error, match=match):
        lightsheet(**kwargs)


# --------------------------------------------------------------------------- EM stack


def test_em_types_shapes_dims(em):
    assert em.dims == "zyx"
    assert em.image.shape == em.aligned.shape == (12, 192, 192)
    assert em.image.dtype == em.aligned.dtype == np.uint8
    assert em.transforms.shape == em.pairwise.shape == (12, 3, 3)
    assert em.transforms.dtype == np.float64
    assert em.valid_mask.shape == (12, 192, 192) and em.valid_mask.dtype == bool
    assert em.spacing == (0.05, 0.004, 0.004)
    assert em.aligned.std() > 20


def test_em_deterministic():
    a, b, c = em_stack((3, 64, 64), seed=4), em_stack((3, 64, 64), seed=4), em_stack((3, 64, 64))
    for name in ("image", "aligned", "transforms", "valid_mask"):
        np.testing.assert_array_equal(getattr(a, name), getattr(b, name))
    assert a.valid_box == b.valid_box
    assert not np.array_equal(a.aligned, c.aligned)
    assert not np.array_equal(a.transforms, c.transforms)


def test_em_slice_zero_is_identity(em):
    np.testing.assert_array_equal(em.transforms[0], np.eye(3))
    np.testing.assert_array_equal(em.pairwise[0], np.eye(3))
    np.testing.assert_array_equal(em.image[0], em.aligned[0])
    assert em.valid_mask[0].all()
    for k in range(1, 12):
        assert not np.allclose(em.transforms[k], np.eye(3))
        np.testing.assert_array_equal(em.transforms[k, 2], [0, 0, 1])


def test_em_observed_follows_the_documented_convention(em):
    for k in (1, 7):
        expected = ndimage.affine_transform(
            em.aligned[k], em.transforms[k], order=1, mode="constant", cval=0
        )
        np.testing.assert_array_equal(em.image[k], expected)


def test_em_parameters_within_limits(em):
    assert np.abs(em.rotation_deg).max() <= 3.0
    assert np.abs(em.shift_px).max() <= 6.0
    assert np.abs(em.scale).max() <= 0.03
    assert np.abs(em.shear).max() <= 0.02
    centre = np.array([95.5, 95.5, 1.0])
    for k in range(12):
        # Rotation, shear and scale act about the slice centre, so it only moves by the shift.
        np.testing.assert_allclose((em.transforms[k] @ centre)[:2], centre[:2] + em.shift_px[k])
        det = np.linalg.det(em.transforms[k, :2, :2])
        np.testing.assert_allclose(det, np.prod(1 + em.scale[k]))


def test_em_inverse_warp_recovers_aligned(em):
    for k in range(1, 12):
        back = ndimage.affine_transform(em.image[k].astype(float), np.linalg.inv(em.transforms[k]))
        valid = ndimage.binary_erosion(em.valid_mask[k], iterations=2, border_value=0)
        assert valid.mean() > 0.8
        a = em.aligned[k].astype(float)
        assert corr(back[valid], a[valid]) > 0.98
        assert np.abs(back[valid] - a[valid]).mean() < 4.0
        # Outside the valid region the observed slice has no data.
        outside = ~ndimage.binary_dilation(em.valid_mask[k], iterations=2)
        assert np.all(back[outside] == 0)


def test_em_consecutive_slices_similar_not_identical(em):
    a = em.aligned
    near = [corr(a[k], a[k + 1]) for k in range(11)]
    assert min(near) > 0.6
    assert max(near) < 0.99
    # The cell walls cross every section; the texture and vesicles change between them.
    assert corr(a[0], a[-1]) < min(near)


def test_em_pairwise_consistency(em):
    t, p = em.transforms, em.pairwise
    for k in range(1, 12):
        np.testing.assert_allclose(t[k - 1] @ p[k], t[k], atol=1e-12)
    prefix = np.eye(3)
    for k in range(1, 12):
        prefix = prefix @ p[k]
        np.testing.assert_allclose(prefix, t[k], atol=1e-10)
    # Resampling observed k-1 with pairwise[k] puts aligned k-1 in the frame of observed k.
    for k in (1, 6, 11):
        moved = ndimage.affine_transform(em.image[k - 1].astype(float), p[k])
        direct = ndimage.affine_transform(em.aligned[k - 1].astype(float), t[k])
        both = ndimage.binary_erosion((moved > 0) & (direct > 0), iterations=3)
        assert both.mean() > 0.7
        assert corr(moved[both], direct[both]) > 0.97


def test_em_valid_mask_is_coverage(em):
    for k in (3, 9):
        covered = ndimage.affine_transform(
            np.ones((192, 192)), np.linalg.inv(em.transforms[k]), order=1, cval=0.0
        )
        agree = (covered > 0.5) == em.valid_mask[k]
        assert agree.mean() > 0.99


def test_em_valid_box(em):
    (y0, y1), (x0, x1) = em.valid_box
    assert 0 <= y0 < y1 <= 192 and 0 <= x0 < x1 <= 192
    assert em.valid_mask[:, y0:y1, x0:x1].all()
    common = em.valid_mask.all(axis=0)
    # No side can grow by one pixel.
    for grown in (
        (y0 - 1, y1, x0, x1),
        (y0, y1 + 1, x0, x1),
        (y0, y1, x0 - 1, x1),
        (y0, y1, x0, x1 + 1),
    ):
        a, b, c, d = grown
        if a < 0 or c < 0 or b > 192 or d > 192:
            continue
        assert not common[a:b, c:d].all()
    assert (y1 - y0) * (x1 - x0) > 0.6 * 192 * 192


def test_em_no_motion_gives_identity():
    s = em_stack((3, 48, 48), max_rotation_deg=0, max_shift_px=0, max_scale=0, max_shear=0, seed=2)
    np.testing.assert_allclose(s.transforms, np.tile(np.eye(3), (3, 1, 1)))
    np.testing.assert_array_equal(s.image, s.aligned)
    assert s.valid_box == ((0, 48), (0, 48))


def test_em_ground_truth_json_round_trip(em):
    gt = em.ground_truth()
    back = json.loads(json.dumps(gt))
    assert back == gt
    assert back["kind"] == "em_stack" and back["dims"] == "zyx"
    np.testing.assert_array_equal(np.array(back["transforms"]), em.transforms)
    np.testing.assert_array_equal(np.array(back["pairwise"]), em.pairwise)
    assert back["valid_box"] == [list(em.valid_box[0]), list(em.valid_box[1])]
    assert back["spacing_um"] == [0.05, 0.004, 0.004]
    assert "affine_transform(aligned[k], transforms[k]" in back["convention"]
    t_um = np.array(back["transforms_um"])
    np.testing.assert_allclose(t_um[:, :2, :2], em.transforms[:, :2, :2])
    np.testing.assert_allclose(t_um[:, :2, 2], em.transforms[:, :2, 2] * 0.004)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"shape": "zyx"}, TypeError, "`shape` must be a sequence"),
        ({"shape": (64, 64)}, ValueError, r"`shape` needs one size per axis \(zyx"),
        ({"shape": (3, -64, 64)}, ValueError, "`shape` sizes must be positive"),
        ({"shape": (1, 64, 64)}, ValueError, "`shape` is too small"),
        ({"shape": (3, 16, 64)}, ValueError, "`shape` is too small"),
        ({"seed": "0"}, TypeError, "`seed` must be an integer"),
        ({"max_rotation_deg": -1.0}, ValueError, r"`max_rotation_deg` must lie in \[0.0, 45.0\]"),
        ({"max_rotation_deg": 90.0}, ValueError, "`max_rotation_deg` must lie in"),
        ({"max_shift_px": -0.5}, ValueError, r"`max_shift_px` must lie in \[0.0, 32.0\]"),
        ({"max_shift_px": 40.0}, ValueError, "`max_shift_px` must lie in"),
        ({"max_scale": -0.01}, ValueError, r"`max_scale` must lie in \[0.0, 0.25\]"),
        ({"max_shear": -0.01}, ValueError, r"`max_shear` must lie in \[0.0, 0.25\]"),
        ({"max_shear": None}, TypeError, "`max_shear` must be a real number"),
        ({"max_scale": math.inf}, ValueError, "`max_scale` must be finite"),
        (
            {
                "shape": (12, 32, 32),
                "max_rotation_deg": 45,
                "max_shift_px": 16,
                "max_scale": 0.25,
                "max_shear": 0.25,
            },
            ValueError,
            "no common valid region",
        ),
    ],
)
def test_em_validation(kwargs, error, match):
    kwargs = {"shape": (3, 64, 64), **kwargs}
    with pytest.raises(error, match=match):
        em_stack(**kwargs)


# --------------------------------------------------------------------------- EM families, noise


def sha256(array):
    import hashlib

    return hashlib.sha256(np.ascontiguousarray(array).tobytes()).hexdigest()


# Digests of the transforms (and crop boxes) of stacks made before `transform`, `noise` and
# `contrast` existed: the defaults keep drawing the same transforms.
EM_DIGESTS = {
    ((12, 192, 192), 0): (
        "99c8ca9c1bfcb1f98494198e41af3b7f58d062d016e41dd8112074909cc277d1",
        ((12, 183), (11, 184)),
    ),
    ((3, 64, 64), 4): (
        "2f672f954bfea09164317099f8e8a8f1d15fe42643846b31731dca6e2337d798",
        ((0, 56), (6, 64)),
    ),
    ((5, 80, 96), 7): (
        "8fca3ce38e7513a9f0a9baff68663b0b5218d4a38d2e978a83ea75680b18a8ed",
        ((8, 75), (5, 89)),
    ),
}


@pytest.mark.parametrize(("shape", "seed"), list(EM_DIGESTS))
def test_em_defaults_keep_the_transforms_and_equal_explicit_defaults(shape, seed):
    implicit = em_stack(shape, seed=seed)
    explicit = em_stack(shape, seed=seed, transform="affine", noise=0.0, contrast=0.0)
    transforms, box = EM_DIGESTS[(shape, seed)]
    for s in (implicit, explicit):
        # The affine draws come from their own random stream: the content may change
        # without moving the transforms.
        assert sha256(s.transforms) == transforms
        assert s.valid_box == box
        assert s.transform == "affine" and s.noise == 0.0 and s.contrast == 0.0
        np.testing.assert_array_equal(s.gain, np.ones(shape[0]))
    np.testing.assert_array_equal(implicit.image, explicit.image)
    np.testing.assert_array_equal(implicit.aligned, explicit.aligned)


@pytest.fixture(scope="module")
def families() -> dict[str, EMStack]:
    limits = {"max_rotation_deg": 5.0, "max_scale": 0.05, "max_shear": 0.05}
    names = ("translation", "rigid", "similarity", "affine")
    return {f: em_stack((5, 64, 64), seed=3, transform=f, **limits) for f in names}


@pytest.mark.parametrize("family", ["translation", "rigid", "similarity", "affine"])
def test_em_family_structure(families, family):
    s = families[family]
    a = s.transforms[:, :2, :2]
    gram = np.swapaxes(a, 1, 2) @ a
    det = np.linalg.det(a)
    eye = np.tile(np.eye(2), (5, 1, 1))
    if family == "translation":
        np.testing.assert_array_equal(a, eye)
        assert not s.rotation_deg.any() and not s.scale.any() and not s.shear.any()
    elif family == "rigid":
        np.testing.assert_allclose(gram, eye, atol=1e-12)
        np.testing.assert_allclose(det, 1.0, atol=1e-12)
        assert not s.scale.any() and not s.shear.any()
        assert np.abs(s.rotation_deg[1:]).min() > 0
    elif family == "similarity":
        s2 = (1 + s.scale[:, 0]) ** 2
        np.testing.assert_array_equal(s.scale[:, 0], s.scale[:, 1])
        np.testing.assert_allclose(gram, s2[:, None, None] * eye, atol=1e-12)
        np.testing.assert_allclose(det, s2, atol=1e-12)
        assert not s.shear.any() and np.abs(s.scale[1:, 0]).min() > 0
    else:
        # A general affine: A^T A is not a multiple of the identity for any moving slice.
        off = np.abs(gram[1:, 0, 1]) + np.abs(gram[1:, 0, 0] - gram[1:, 1, 1])
        assert off.min() > 1e-4
        assert np.abs(s.shear[1:]).min() > 0 and not np.array_equal(s.scale[:, 0], s.scale[:, 1])
    np.testing.assert_array_equal(s.transforms[0], np.eye(3))
    np.testing.assert_array_equal(s.aligned, families["affine"].aligned)
    # The families share their draws: the same shifts for one seed.
    np.testing.assert_array_equal(s.shift_px, families["affine"].shift_px)
    centre = np.array([31.5, 31.5, 1.0])
    for k in range(5):
        np.testing.assert_allclose((s.transforms[k] @ centre)[:2], centre[:2] + s.shift_px[k])
        expected = ndimage.affine_transform(
            s.aligned[k], s.transforms[k], order=1, mode="constant", cval=0
        )
        np.testing.assert_array_equal(s.image[k], expected)
    gt = s.ground_truth()
    assert gt["transform"] == family
    np.testing.assert_array_equal(np.array(gt["transforms"]), s.transforms)


def test_em_noise_is_gaussian_of_the_requested_sigma():
    base = em_stack((3, 96, 96), seed=5)
    noisy = em_stack((3, 96, 96), seed=5, noise=0.05)
    again = em_stack((3, 96, 96), seed=5, noise=0.05)
    np.testing.assert_array_equal(noisy.image, again.image)
    np.testing.assert_array_equal(noisy.aligned, base.aligned)
    np.testing.assert_array_equal(noisy.transforms, base.transforms)
    assert noisy.valid_box == base.valid_box
    np.testing.assert_array_equal(noisy.gain, np.ones(3))
    sigma = 0.05 * 255
    clean = np.stack(
        [
            ndimage.affine_transform(a.astype(float), t, order=1, mode="constant", cval=0)
            for a, t in zip(base.aligned, base.transforms, strict=True)
        ]
    )
    # Far enough from 0 and 255 that clipping never bites.
    away = (clean > 5 * sigma) & (clean < 255 - 5 * sigma)
    assert away.mean() > 0.5
    residual = noisy.image.astype(float) - clean
    # About 22 000 samples: the std estimate is good to ~0.5 %.
    assert abs(residual[away].std() / sigma - 1) < 0.015
    for k in range(3):
        r = residual[k][away[k]]
        assert abs(r.std() / sigma - 1) < 0.04
        assert abs(r.mean()) < 0.3
        assert abs(corr(r, clean[k][away[k]])) < 0.05
    assert abs(corr(residual[1][away[1]], residual[2][away[1]])) < 0.05
    gt = noisy.ground_truth()
    assert gt["noise"] == 0.05 and gt["noise_sigma"] == pytest.approx(sigma)


def test_em_contrast_gains():
    base = em_stack((8, 64, 64), seed=6)
    s = em_stack((8, 64, 64), seed=6, contrast=0.3)
    np.testing.assert_array_equal(s.aligned, base.aligned)
    np.testing.assert_array_equal(s.transforms, base.transforms)
    assert s.gain[0] == 1.0
    assert np.all((s.gain >= 0.7) & (s.gain <= 1.3))
    assert np.ptp(s.gain[1:]) > 0.1
    np.testing.assert_array_equal(s.image[0], s.aligned[0])
    ones = np.ones((64, 64))
    for k in range(1, 8):
        a, t = s.aligned[k].astype(float), s.transforms[k]
        warped = ndimage.affine_transform(a, t, order=1, mode="constant", cval=0)
        coverage = ndimage.affine_transform(ones, t, order=1, mode="constant", cval=0)
        covered = coverage > 1 - 1e-9
        y = s.image[k].astype(float)
        inside = covered & (y > 0) & (y < 255)
        # observed − m = g (warp − m) up to rounding, m the aligned slice's mean.
        x, m = warped[inside] - a.mean(), a.mean()
        slope = float(x @ (y[inside] - m) / (x @ x))
        assert slope == pytest.approx(s.gain[k], abs=0.01)
        assert np.abs(y[inside] - m - s.gain[k] * x).max() <= 0.5 + 1e-9
        # The border the warp brings in stays empty.
        assert (coverage == 0).any()
        assert np.all(s.image[k][coverage == 0] == 0)
    gt = json.loads(json.dumps(s.ground_truth()))
    assert gt["contrast"] == 0.3 and gt["gain"] == s.gain.tolist()


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"transform": 3}, TypeError, "`transform` must be a string"),
        ({"transform": "projective"}, ValueError, "`transform` must be one of"),
        ({"transform": "Affine"}, ValueError, "got 'Affine'"),
        ({"noise": -0.1}, ValueError, r"`noise` must lie in \[0.0, 1.0\]"),
        ({"noise": 1.5}, ValueError, r"`noise` must lie in \[0.0, 1.0\], got 1.5"),
        ({"noise": "0.1"}, TypeError, "`noise` must be a real number"),
        ({"noise": math.nan}, ValueError, "`noise` must be finite"),
        ({"contrast": 0.6}, ValueError, r"`contrast` must lie in \[0.0, 0.5\], got 0.6"),
        ({"contrast": -0.01}, ValueError, "`contrast` must lie in"),
        ({"contrast": None}, TypeError, "`contrast` must be a real number"),
    ],
)
def test_em_appearance_validation(kwargs, error, match):
    with pytest.raises(error, match=match):
        em_stack((3, 64, 64), **kwargs)
