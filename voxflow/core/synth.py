"""Synthetic lightsheet volumes and serial-section EM stacks with exact ground truth.

Both generators are pure functions of their parameters and a seed: they return frozen
dataclasses holding read-only NumPy arrays and a ``ground_truth()`` method that gives the
known answers (centroids, region counts, bias field, per-slice transforms, valid crop) as a
JSON-serialisable dict. Voxel ``i`` along an axis has its centre at ``i × spacing`` in
micrometres (no translation).
"""

from __future__ import annotations

import math
import operator
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy import ndimage
from scipy.spatial import cKDTree

__all__ = ["EMStack", "LightsheetVolume", "Region", "em_stack", "lightsheet"]

# Lightsheet model constants.
_UM3_PER_CELL = 6000.0  # tissue volume per cell when `n_cells` is None
_RADIUS_JITTER = 0.2  # each cell radius is radius × U(1 − j, 1 + j)
_TOUCH_FACTOR = (1.6, 1.9)  # centre distance of a touching pair, in mean radii
_PAIR_EVERY = 16  # one touching pair per this many cells
_ATTEMPTS_PER_CELL = 40
_MAX_MISSES = 1000  # consecutive rejected placements before giving up
_TISSUE_FRACTION = 0.45  # tissue semi-axis / volume extent
_CORTEX_RHO = 0.72  # normalised tissue radius where the cortex starts
_SUPERFICIAL_RHO = 0.87  # normalised tissue radius of the superficial layers
_TISSUE_LEVEL = 150.0  # nuclear channel level of unstained tissue
_CELL_LEVEL = (900.0, 1800.0)  # peak brightness range of a nucleus
_CELL_FALLOFF = 0.35  # brightness drop from centre to edge of a nucleus
_AUTOFLUORESCENCE = 300.0
_TEXTURE_UM = 12.0  # correlation length of the tissue texture
_BIAS_FALL_X = (0.7, 0.85)  # bias at the last x voxel (first is 1)
_BIAS_FALL_Z = (0.6, 0.75)  # bias at the last z voxel (first is 1)
_BACKGROUND = 100.0
_READ_NOISE = 5.0
_GAIN = 1.0
_CHANNEL_NAMES = ("nuclear", "autofluorescence")

# EM model constants.
_EM_SPACING = (0.05, 0.004, 0.004)  # 50 nm sections, 4 nm pixels, in micrometres
_EM_Z_STRETCH = 2.0
_EM_CELL_PX = 32.0  # typical cell diameter in pixels
_EM_MEMBRANE_PX = 1.3
_EM_VESICLE_EVERY = 1500  # one vesicle per this many voxels
_EM_TRANSFORMS = ("translation", "rigid", "similarity", "affine")  # nested families

_CONVENTION = (
    "transforms[k] is a 3x3 homogeneous matrix on (y, x, 1) pixel coordinates; "
    "observed[k] = scipy.ndimage.affine_transform(aligned[k], transforms[k], order=1, "
    "mode='constant', cval=0); pairwise[k] = inv(transforms[k-1]) @ transforms[k] maps pixel "
    "coordinates of observed slice k into observed slice k-1; valid_box is half-open "
    "((y0, y1), (x0, x1)) in aligned coordinates; with gain or noise, observed[k] = "
    "clip(rint(affine_transform(m[k] + gain[k] * (aligned[k] - m[k]), transforms[k], order=1, "
    "mode='constant', cval=0, output=float64) + N(0, (noise * 255)^2)), 0, 255) with m[k] the "
    "mean of aligned[k]"
)


@dataclass(frozen=True)
class Region:
    """One node of an atlas hierarchy.

    Parameters
    ----------
    id : int
        Label of the region; leaves carry it in the atlas image, parents do not.
    acronym : str
        Short name, e.g. ``"CTX"``.
    name : str
        Full name, e.g. ``"Cerebral cortex"``.
    parent_id : int or None
        Id of the parent region; None for the root.
    """

    id: int
    acronym: str
    name: str
    parent_id: int | None


_REGIONS = (
    Region(997, "root", "root", None),
    Region(8, "grey", "Basic cell groups and regions", 997),
    Region(688, "CTX", "Cerebral cortex", 8),
    Region(1101, "CTX-L", "Cerebral cortex, left", 688),
    Region(1102, "CTX-L-sup", "Cerebral cortex, left, superficial layers", 1101),
    Region(1103, "CTX-L-deep", "Cerebral cortex, left, deep layers", 1101),
    Region(1111, "CTX-R", "Cerebral cortex, right", 688),
    Region(1112, "CTX-R-sup", "Cerebral cortex, right, superficial layers", 1111),
    Region(1113, "CTX-R-deep", "Cerebral cortex, right, deep layers", 1111),
    Region(1089, "HPF", "Hippocampal formation", 8),
    Region(1121, "HIP-L", "Hippocampus, left", 1089),
    Region(1122, "HIP-R", "Hippocampus, right", 1089),
    Region(477, "STR", "Striatum", 8),
    Region(1131, "STR-L", "Striatum, left", 477),
    Region(1132, "STR-R", "Striatum, right", 477),
    Region(549, "TH", "Thalamus", 8),
)

# Deep regions are the nearest-seed cells of these points, in tissue-normalised (z, y, x).
_CORE_SEEDS = {
    1121: (-0.2, -0.35, -0.35),
    1122: (-0.2, -0.35, 0.35),
    1131: (0.15, 0.35, -0.3),
    1132: (0.15, 0.35, 0.3),
    549: (0.1, -0.05, 0.0),
}


def _frozen(array: np.ndarray) -> np.ndarray:
    array = np.ascontiguousarray(array)
    array.setflags(write=False)
    return array


def _descendants(regions: Sequence[Region]) -> dict[int, set[int]]:
    """Each region id mapped to itself and every region below it."""
    children: dict[int, list[int]] = {r.id: [] for r in regions}
    for r in regions:
        if r.parent_id is not None:
            children[r.parent_id].append(r.id)

    def walk(rid: int) -> set[int]:
        out = {rid}
        for child in children[rid]:
            out |= walk(child)
        return out

    return {r.id: walk(r.id) for r in regions}


@dataclass(frozen=True, eq=False)
class LightsheetVolume:
    """A synthetic lightsheet volume and its ground truth.

    Cell ``i`` (row ``i`` of `centroids`) carries label ``i + 1`` in `cell_labels`.

    Attributes
    ----------
    image : ndarray of uint16, shape (C, Z, Y, X)
        Observed channels: nuclear stain, then autofluorescence when C is 2.
    dims : str
        ``"czyx"``.
    spacing : tuple of float
        Voxel size (z, y, x) in micrometres.
    bias : ndarray of float32, shape (Z, Y, X)
        Multiplicative illumination field applied to every channel.
    clean : ndarray of float32, shape (Z, Y, X)
        Nuclear channel before bias, background and noise.
    cell_labels : ndarray of int32, shape (Z, Y, X)
        Instance labels, 0 outside cells.
    atlas : ndarray of int32, shape (Z, Y, X)
        Leaf region ids, 0 outside the tissue.
    tissue : ndarray of bool, shape (Z, Y, X)
        Tissue mask (an ellipsoid).
    regions : tuple of Region
        The atlas hierarchy, root first.
    centroids : ndarray of float64, shape (N, 3)
        Cell centres in voxel coordinates (z, y, x).
    radii : ndarray of float64, shape (N,)
        Cell radii in micrometres.
    intensities : ndarray of float64, shape (N,)
        Peak clean brightness of each cell above the tissue level.
    touching : tuple of tuple of int
        Label pairs ``(a, b)``, ``a < b``, of cells placed in contact.
    channel_names : tuple of str
        One name per channel.
    bias_lengths_um : tuple of float
        Decay lengths (z, x) of the bias field, see `ground_truth`.
    background : float
        Camera offset added to every voxel.
    read_noise : float
        Standard deviation of the Gaussian read noise.
    seed : int
        Seed the volume was generated from.
    """

    image: np.ndarray
    dims: str
    spacing: tuple[float, float, float]
    bias: np.ndarray
    clean: np.ndarray
    cell_labels: np.ndarray
    atlas: np.ndarray
    tissue: np.ndarray
    regions: tuple[Region, ...]
    centroids: np.ndarray
    radii: np.ndarray
    intensities: np.ndarray
    touching: tuple[tuple[int, int], ...]
    channel_names: tuple[str, ...]
    bias_lengths_um: tuple[float, float]
    background: float
    read_noise: float
    seed: int

    @property
    def n_cells(self) -> int:
        """Number of cells."""
        return int(self.centroids.shape[0])

    @property
    def centroids_um(self) -> np.ndarray:
        """Cell centres (z, y, x) in micrometres, shape (N, 3)."""
        return self.centroids * np.asarray(self.spacing)

    @property
    def cell_regions(self) -> np.ndarray:
        """Atlas id at the voxel nearest each centroid, shape (N,), int64."""
        index = np.rint(self.centroids).astype(np.intp)
        return self.atlas[tuple(index.T)].astype(np.int64)

    def region_table(self) -> list[dict]:
        """Per-region cell counts, volumes and densities.

        Returns
        -------
        list of dict
            One dict per region, in `regions` order, with ``id``, ``acronym``, ``name``,
            ``parent_id``, ``is_leaf``, ``cell_count``, ``volume_voxels``, ``volume_um3``
            and ``density_per_mm3``; parents aggregate their descendants.
        """
        voxel_um3 = float(np.prod(self.spacing))
        volumes = np.bincount(self.atlas.ravel(), minlength=max(r.id for r in self.regions) + 1)
        counts = np.bincount(self.cell_regions, minlength=volumes.size)
        below = _descendants(self.regions)
        parents = {r.parent_id for r in self.regions}
        table = []
        for r in self.regions:
            ids = sorted(below[r.id])
            n = int(counts[ids].sum())
            vox = int(volumes[ids].sum())
            um3 = vox * voxel_um3
            table.append(
                {
                    "id": r.id,
                    "acronym": r.acronym,
                    "name": r.name,
                    "parent_id": r.parent_id,
                    "is_leaf": r.id not in parents,
                    "cell_count": n,
                    "volume_voxels": vox,
                    "volume_um3": um3,
                    "density_per_mm3": n / (um3 * 1e-9) if vox else 0.0,
                }
            )
        return table

    def ground_truth(self) -> dict:
        """Everything known about the volume, as plain JSON types.

        Returns
        -------
        dict
            Keys: ``kind``, ``dims``, ``shape``, ``spacing_um``, ``seed``, ``channel_names``,
            ``n_cells``, ``labels``, ``centroids_voxel`` and ``centroids_um`` (N × [z, y, x]),
            ``radii_um``, ``intensities``, ``touching`` (label pairs), ``cell_region``,
            ``regions`` (see `region_table`), ``tissue_volume_um3``, ``bias`` (model
            ``exp(-x_um / length_x_um) * exp(-z_um / length_z_um)`` with
            ``x_um = x × spacing_x``), ``background`` and ``noise``.
        """
        length_z, length_x = self.bias_lengths_um
        return {
            "kind": "lightsheet",
            "dims": self.dims,
            "shape": [int(s) for s in self.image.shape],
            "spacing_um": [float(s) for s in self.spacing],
            "seed": self.seed,
            "channel_names": list(self.channel_names),
            "n_cells": self.n_cells,
            "labels": list(range(1, self.n_cells + 1)),
            "centroids_voxel": self.centroids.tolist(),
            "centroids_um": self.centroids_um.tolist(),
            "radii_um": self.radii.tolist(),
            "intensities": self.intensities.tolist(),
            "touching": [list(p) for p in self.touching],
            "cell_region": self.cell_regions.tolist(),
            "regions": self.region_table(),
            "tissue_volume_um3": float(self.tissue.sum() * np.prod(self.spacing)),
            "bias": {
                "model": "exp(-x_um / length_x_um) * exp(-z_um / length_z_um)",
                "length_x_um": length_x,
                "length_z_um": length_z,
                "min": float(self.bias.min()),
                "max": float(self.bias.max()),
            },
            "background": self.background,
            "noise": {"read_sigma": self.read_noise, "shot": "poisson", "gain": _GAIN},
        }


@dataclass(frozen=True, eq=False)
class EMStack:
    """A synthetic serial-section EM stack, its aligned original and the transforms between.

    Conventions: ``transforms[k]`` is a 3 × 3 homogeneous matrix acting on ``(y, x, 1)``
    pixel coordinates, and ``observed[k] = scipy.ndimage.affine_transform(aligned[k],
    transforms[k], order=1, mode="constant", cval=0)``: output pixel ``p`` of the observed
    slice samples the aligned slice at ``transforms[k] @ p``. ``pairwise[k]`` maps pixel
    coordinates of observed slice ``k`` into observed slice ``k − 1``.

    Attributes
    ----------
    image : ndarray of uint8, shape (Z, Y, X)
        The observed (misaligned) slices.
    aligned : ndarray of uint8, shape (Z, Y, X)
        The slices in the reference frame.
    transforms : ndarray of float64, shape (Z, 3, 3)
        Observed → aligned pixel maps; ``transforms[0]`` is the identity.
    pairwise : ndarray of float64, shape (Z, 3, 3)
        ``inv(transforms[k-1]) @ transforms[k]``; ``pairwise[0]`` is the identity.
    valid_mask : ndarray of bool, shape (Z, Y, X)
        Pixels of the reference frame that observed slice ``k`` covers once aligned.
    valid_box : tuple of tuple of int
        ``((y0, y1), (x0, x1))``, half-open: the largest axis-aligned box inside every
        valid mask.
    spacing : tuple of float
        Voxel size (z, y, x) in micrometres.
    dims : str
        ``"zyx"``.
    rotation_deg, shift_px, scale, shear : ndarray
        Parameters of each slice's affine, shapes (Z,), (Z, 2), (Z, 2), (Z,); zero where the
        transform family excludes them.
    seed : int
        Seed the stack was generated from.
    transform : str
        Family of the per-slice transforms: ``"translation"``, ``"rigid"``, ``"similarity"``
        or ``"affine"``.
    noise : float
        Standard deviation of the additive Gaussian noise as a fraction of 255.
    contrast : float
        Half-width of the range of the per-slice gains around 1.
    gain : ndarray of float64, shape (Z,)
        Contrast gain of each slice about the mean grey level of its aligned slice;
        ``gain[0]`` is 1.
    """

    image: np.ndarray
    aligned: np.ndarray
    transforms: np.ndarray
    pairwise: np.ndarray
    valid_mask: np.ndarray
    valid_box: tuple[tuple[int, int], tuple[int, int]]
    spacing: tuple[float, float, float]
    dims: str
    rotation_deg: np.ndarray
    shift_px: np.ndarray
    scale: np.ndarray
    shear: np.ndarray
    seed: int
    transform: str
    noise: float
    contrast: float
    gain: np.ndarray

    @property
    def transforms_um(self) -> np.ndarray:
        """`transforms` acting on (y, x, 1) coordinates in micrometres, shape (Z, 3, 3)."""
        to_um = np.diag([self.spacing[1], self.spacing[2], 1.0])
        return to_um @ self.transforms @ np.linalg.inv(to_um)

    def ground_truth(self) -> dict:
        """Everything known about the stack, as plain JSON types.

        Returns
        -------
        dict
            Keys: ``kind``, ``dims``, ``shape``, ``spacing_um``, ``seed``, ``convention``,
            ``transforms``, ``transforms_um``, ``pairwise`` (Z × 3 × 3 nested lists),
            ``valid_box`` ``[[y0, y1], [x0, x1]]`` (half-open, pixels), ``valid_box_um``,
            ``rotation_deg``, ``shift_px``, ``scale``, ``shear``, ``transform`` (the family),
            ``noise`` (σ / 255), ``noise_sigma`` (σ in grey levels), ``contrast`` and ``gain``
            (one per slice).
        """
        (y0, y1), (x0, x1) = self.valid_box
        sy, sx = self.spacing[1], self.spacing[2]
        return {
            "kind": "em_stack",
            "dims": self.dims,
            "shape": [int(s) for s in self.image.shape],
            "spacing_um": [float(s) for s in self.spacing],
            "seed": self.seed,
            "convention": _CONVENTION,
            "transforms": self.transforms.tolist(),
            "transforms_um": self.transforms_um.tolist(),
            "pairwise": self.pairwise.tolist(),
            "valid_box": [[y0, y1], [x0, x1]],
            "valid_box_um": [[y0 * sy, y1 * sy], [x0 * sx, x1 * sx]],
            "rotation_deg": self.rotation_deg.tolist(),
            "shift_px": self.shift_px.tolist(),
            "scale": self.scale.tolist(),
            "shear": self.shear.tolist(),
            "transform": self.transform,
            "noise": self.noise,
            "noise_sigma": self.noise * 255.0,
            "contrast": self.contrast,
            "gain": self.gain.tolist(),
        }


# --------------------------------------------------------------------------- validation


def _validate_shape(shape, *, axes: str, minimum: Sequence[int]) -> tuple[int, ...]:
    if isinstance(shape, np.ndarray):
        shape = shape.tolist()
    if isinstance(shape, str | bytes) or not isinstance(shape, Sequence):
        raise TypeError(
            f"`shape` must be a sequence of {len(axes)} integers ({axes}), "
            f"got {type(shape).__name__}"
        )
    if len(shape) != len(axes):
        raise ValueError(
            f"`shape` needs one size per axis ({axes}, {len(axes)}), got {tuple(shape)}"
        )
    try:
        sizes = tuple(operator.index(s) for s in shape)
    except TypeError:
        raise TypeError(f"`shape` must hold integers, got {tuple(shape)!r}") from None
    if any(s <= 0 for s in sizes):
        raise ValueError(f"`shape` sizes must be positive, got {sizes}")
    if any(s < m for s, m in zip(sizes, minimum, strict=True)):
        raise ValueError(
            f"`shape` is too small: ({axes}) needs at least {tuple(minimum)}, got {sizes}"
        )
    return sizes


def _validate_real(value, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float | np.integer | np.floating):
        raise TypeError(f"`{name}` must be a real number, got {type(value).__name__}")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"`{name}` must be finite, got {value}")
    return value


def _validate_range(value, name: str, low: float, high: float, *, open_low=False) -> float:
    value = _validate_real(value, name)
    too_low = value <= low if open_low else value < low
    if too_low or value > high:
        bracket = "(" if open_low else "["
        raise ValueError(f"`{name}` must lie in {bracket}{low}, {high}], got {value}")
    return value


def _validate_seed(seed) -> int:
    try:
        seed = operator.index(seed)
    except TypeError:
        raise TypeError(f"`seed` must be an integer, got {type(seed).__name__}") from None
    if seed < 0:
        raise ValueError(f"`seed` must be non-negative, got {seed}")
    return seed


def _validate_spacing(spacing) -> tuple[float, float, float]:
    if isinstance(spacing, str | bytes) or not isinstance(spacing, Sequence | np.ndarray):
        raise TypeError(f"`spacing` must be a sequence of 3 numbers, got {type(spacing).__name__}")
    if len(spacing) != 3:
        raise ValueError(f"`spacing` needs one size per axis (zyx, 3), got {tuple(spacing)}")
    values = tuple(_validate_real(s, "spacing") for s in spacing)
    if any(s <= 0 for s in values):
        raise ValueError(f"`spacing` must be positive, got {values}")
    return values


def _validate_lightsheet(shape, spacing, n_cells, cell_radius_um, seed):
    shape = _validate_shape(shape, axes="czyx", minimum=(1, 16, 16, 16))
    if shape[0] > len(_CHANNEL_NAMES):
        raise ValueError(f"`shape` channel count must be 1 or 2, got {shape[0]}")
    spacing = _validate_spacing(spacing)
    if n_cells is not None:
        try:
            n_cells = operator.index(n_cells)
        except TypeError:
            raise TypeError(
                f"`n_cells` must be an integer or None, got {type(n_cells).__name__}"
            ) from None
        if n_cells < 0:
            raise ValueError(f"`n_cells` must be non-negative, got {n_cells}")
    radius = _validate_range(cell_radius_um, "cell_radius_um", 0.0, math.inf, open_low=True)
    # The smallest cell must contain the voxel nearest its centre, or it may vanish.
    smallest = 0.5 * math.hypot(*spacing) / (1 - _RADIUS_JITTER)
    if radius < smallest:
        raise ValueError(
            f"`cell_radius_um` must be at least {smallest:.3g} µm at spacing {spacing} so that "
            f"every cell covers a voxel, got {radius}"
        )
    semi_axis = _TISSUE_FRACTION * min(n * s for n, s in zip(shape[1:], spacing, strict=True))
    if radius * (1 + _RADIUS_JITTER) > semi_axis / 4:
        raise ValueError(
            f"`shape` is too small for cells of {radius} µm: the tissue's smallest semi-axis "
            f"({semi_axis:.3g} µm) must be at least 4 × the largest cell radius "
            f"({radius * (1 + _RADIUS_JITTER):.3g} µm)"
        )
    return shape, spacing, n_cells, radius, _validate_seed(seed)


def _validate_em(shape, seed, max_rotation_deg, max_shift_px, max_scale, max_shear):
    shape = _validate_shape(shape, axes="zyx", minimum=(2, 32, 32))
    limits = (
        _validate_range(max_rotation_deg, "max_rotation_deg", 0.0, 45.0),
        _validate_range(max_shift_px, "max_shift_px", 0.0, min(shape[1:]) / 2),
        _validate_range(max_scale, "max_scale", 0.0, 0.25),
        _validate_range(max_shear, "max_shear", 0.0, 0.25),
    )
    return shape, _validate_seed(seed), limits


def _validate_em_appearance(transform, noise, contrast) -> tuple[str, float, float]:
    if not isinstance(transform, str):
        raise TypeError(
            f"`transform` must be a string, one of {_EM_TRANSFORMS}, got {type(transform).__name__}"
        )
    if transform not in _EM_TRANSFORMS:
        raise ValueError(f"`transform` must be one of {_EM_TRANSFORMS}, got {transform!r}")
    return (
        transform,
        _validate_range(noise, "noise", 0.0, 1.0),
        _validate_range(contrast, "contrast", 0.0, 0.5),
    )


# --------------------------------------------------------------------------- lightsheet


@dataclass(frozen=True)
class _Tissue:
    """An ellipsoid of tissue on a voxel grid, in micrometres."""

    shape: tuple[int, int, int]
    spacing: tuple[float, float, float]

    @property
    def centre(self) -> np.ndarray:
        return (np.asarray(self.shape) - 1) / 2 * np.asarray(self.spacing)

    @property
    def semi_axes(self) -> np.ndarray:
        return _TISSUE_FRACTION * np.asarray(self.shape) * np.asarray(self.spacing)

    def normalised(self) -> list[np.ndarray]:
        """Broadcastable (z, y, x) coordinates scaled so the tissue is the unit ball."""
        out = []
        for axis, (n, s, c, a) in enumerate(
            zip(self.shape, self.spacing, self.centre, self.semi_axes, strict=True)
        ):
            view = [1, 1, 1]
            view[axis] = n
            out.append(((np.arange(n) * s - c) / a).reshape(view))
        return out

    def rho(self, points_um: np.ndarray) -> np.ndarray:
        """Normalised ellipsoid radius of points (…, 3) in micrometres."""
        return np.linalg.norm((points_um - self.centre) / self.semi_axes, axis=-1)


def _atlas(tissue: _Tissue) -> tuple[np.ndarray, np.ndarray]:
    """Tissue mask and leaf-label atlas: cortical shells outside, nearest-seed nuclei inside."""
    uz, uy, ux = tissue.normalised()
    rho2 = uz**2 + uy**2 + ux**2
    mask = rho2 <= 1.0
    left = np.broadcast_to(ux < 0, rho2.shape)
    atlas = np.where(rho2 >= _SUPERFICIAL_RHO**2, np.where(left, 1102, 1112), 0)
    deep = (rho2 >= _CORTEX_RHO**2) & (rho2 < _SUPERFICIAL_RHO**2)
    atlas = np.where(deep, np.where(left, 1103, 1113), atlas)
    ids = np.array(list(_CORE_SEEDS))
    dist = np.stack(
        [(uz - sz) ** 2 + (uy - sy) ** 2 + (ux - sx) ** 2 for sz, sy, sx in _CORE_SEEDS.values()]
    )
    core = ids[np.argmin(dist, axis=0)]
    atlas = np.where(rho2 < _CORTEX_RHO**2, core, atlas)
    return mask, np.where(mask, atlas, 0).astype(np.int32)


class _Placer:
    """Random sequential placement of spheres with a gap, except for touching pairs."""

    def __init__(self, rng, tissue: _Tissue, capacity: int, gap: float):
        self.rng = rng
        self.tissue = tissue
        self.gap = gap
        self.centres = np.empty((capacity, 3))
        self.radii = np.empty(capacity)
        self.count = 0
        self.pairs: list[tuple[int, int]] = []

    def _fits(self, centre: np.ndarray, radius: float) -> bool:
        # A ball of radius r around a point at normalised radius rho lies in the ellipsoid
        # when rho <= 1 - r / (smallest semi-axis).
        if self.tissue.rho(centre) > 1 - radius / self.tissue.semi_axes.min():
            return False
        d = np.linalg.norm(self.centres[: self.count] - centre, axis=1)
        return bool(np.all(d >= self.radii[: self.count] + radius + self.gap))

    def _draw_centre(self) -> np.ndarray:
        a = self.tissue.semi_axes
        return self.tissue.centre + self.rng.uniform(-a, a)

    def _accept(self, centre: np.ndarray, radius: float) -> int:
        self.centres[self.count], self.radii[self.count] = centre, radius
        self.count += 1
        return self.count - 1

    def try_single(self, radius: float) -> bool:
        centre = self._draw_centre()
        if not self._fits(centre, radius):
            return False
        self._accept(centre, radius)
        return True

    def try_pair(self, r_a: float, r_b: float) -> bool:
        a = self._draw_centre()
        u = self.rng.standard_normal(3)
        u /= np.linalg.norm(u)
        b = a + u * self.rng.uniform(*_TOUCH_FACTOR) * (r_a + r_b) / 2
        if not (self._fits(a, r_a) and self._fits(b, r_b)):
            return False
        # Coarse voxels can slip between two overlapping spheres; keep only pairs whose
        # labels really share a face.
        if not _faces_touch(self.tissue, a, b, r_a, r_b):
            return False
        self.pairs.append((self._accept(a, r_a), self._accept(b, r_b)))
        return True


def _place_cells(rng, tissue: _Tissue, n_target: int, radius: float, strict: bool):
    """Centres (µm), radii and touching index pairs of up to `n_target` cells."""
    radii = radius * rng.uniform(1 - _RADIUS_JITTER, 1 + _RADIUS_JITTER, size=n_target)
    n_pairs = n_target // _PAIR_EVERY
    placer = _Placer(rng, tissue, n_target, gap=math.hypot(*tissue.spacing))
    misses = 0
    for _ in range(_ATTEMPTS_PER_CELL * n_target + 100):
        k = placer.count
        # A long run of rejections means the tissue is as full as random placement gets.
        if k == n_target or misses > _MAX_MISSES:
            break
        if len(placer.pairs) < n_pairs:
            placed = placer.try_pair(radii[k], radii[k + 1])
        else:
            placed = placer.try_single(radii[k])
        misses = 0 if placed else misses + 1
    if strict and placer.count < n_target:
        raise ValueError(
            f"`n_cells`={n_target} cells of radius {radius} µm do not fit in the tissue without "
            f"overlapping; about {placer.count} could be placed"
        )
    k = placer.count
    # Shuffle so that labels carry no trace of the placement order.
    order = rng.permutation(k)
    rank = np.argsort(order)
    pairs = tuple(
        sorted(tuple(sorted((int(rank[a]) + 1, int(rank[b]) + 1))) for a, b in placer.pairs)
    )
    return placer.centres[:k][order], placer.radii[:k][order], pairs


def _sphere_box(centre, radius, spacing, shape, reach=None):
    """Voxel box around a sphere and squared distances (µm²) of its voxels to `centre`.

    The box covers the sphere of radius `reach` (default `radius`), clipped to the grid.
    """
    s = np.asarray(spacing)
    reach = radius if reach is None else reach
    lo = np.maximum(np.floor((centre - reach) / s).astype(int), 0)
    hi = np.minimum(np.ceil((centre + reach) / s).astype(int) + 1, shape)
    box = tuple(slice(a, b) for a, b in zip(lo, hi, strict=True))
    return box, _squared_distances(box, centre, s)


def _squared_distances(box, centre, spacing) -> np.ndarray:
    axes = [(np.arange(b.start, b.stop) * spacing[d] - centre[d]) ** 2 for d, b in enumerate(box)]
    return axes[0][:, None, None] + axes[1][None, :, None] + axes[2][None, None, :]


def _draw_cells(shape, spacing, centres_um, radii, intensities):
    """Instance labels and clean cell signal; overlaps go to the nearer centre."""
    labels = np.zeros(shape, np.int32)
    signal = np.zeros(shape, np.float32)
    best = np.full(shape, np.inf)
    for i, (c, r, level) in enumerate(zip(centres_um, radii, intensities, strict=True)):
        box, d2 = _sphere_box(c, r, spacing, shape)
        take = (d2 < r * r) & (d2 < best[box])
        best[box][take] = d2[take]
        labels[box][take] = i + 1
        signal[box][take] = level * (1 - _CELL_FALLOFF * d2[take] / (r * r))
    return labels, signal


def _faces_touch(tissue: _Tissue, a, b, r_a: float, r_b: float) -> bool:
    """Whether two overlapping spheres, split by nearest centre, share a voxel face."""
    mid = (a + b) / 2
    box, _ = _sphere_box(mid, 0.0, tissue.spacing, tissue.shape, reach=r_a + r_b)
    s = np.asarray(tissue.spacing)
    d2a, d2b = _squared_distances(box, a, s), _squared_distances(box, b, s)
    in_a, in_b = d2a < r_a * r_a, d2b < r_b * r_b
    owner_a = in_a & ~(in_b & (d2b < d2a))
    owner_b = in_b & ~owner_a
    for axis in range(3):
        lo = [slice(None)] * 3
        hi = [slice(None)] * 3
        lo[axis], hi[axis] = slice(None, -1), slice(1, None)
        lo, hi = tuple(lo), tuple(hi)
        if np.any(owner_a[lo] & owner_b[hi]) or np.any(owner_b[lo] & owner_a[hi]):
            return True
    return False


def _smooth_noise(rng, shape, spacing) -> np.ndarray:
    """Zero-mean, unit-variance Gaussian random field with a `_TEXTURE_UM` correlation length."""
    sigma = [_TEXTURE_UM / s for s in spacing]
    field = ndimage.gaussian_filter(rng.standard_normal(shape, dtype=np.float32), sigma)
    field -= field.mean()
    return field / max(float(field.std()), 1e-12)


def _bias(rng, shape, spacing) -> tuple[np.ndarray, float, float]:
    """Light-sheet fall-off along x times attenuation with depth z, 1 at the origin."""
    fall_x = rng.uniform(*_BIAS_FALL_X)
    fall_z = rng.uniform(*_BIAS_FALL_Z)
    length_x = (shape[2] - 1) * spacing[2] / -math.log(fall_x)
    length_z = (shape[0] - 1) * spacing[0] / -math.log(fall_z)
    bx = np.exp(-np.arange(shape[2]) * spacing[2] / length_x)
    bz = np.exp(-np.arange(shape[0]) * spacing[0] / length_z)
    bias = (bz[:, None, None] * bx[None, None, :]).astype(np.float32)
    return np.broadcast_to(bias, shape).copy(), length_z, length_x


def _observe(rng, clean: np.ndarray, bias: np.ndarray) -> np.ndarray:
    """Apply bias, shot noise, offset and read noise; round into uint16."""
    photons = rng.poisson(np.maximum(bias * clean, 0) / _GAIN) * _GAIN
    counts = photons + _BACKGROUND + rng.normal(0.0, _READ_NOISE, clean.shape)
    return np.clip(np.rint(counts), 0, np.iinfo(np.uint16).max).astype(np.uint16)


def lightsheet(
    shape: Sequence[int] = (2, 48, 160, 160),
    *,
    spacing: Sequence[float] = (4.0, 1.6, 1.6),
    n_cells: int | None = None,
    cell_radius_um: float = 4.0,
    seed: int = 0,
) -> LightsheetVolume:
    """Generate a lightsheet-like volume of nuclei in a tissue ellipsoid, with ground truth.

    The tissue is an ellipsoid with semi-axes 0.45 × the volume's extent, partitioned into an
    atlas of leaf regions (left/right superficial and deep cortex as shells, hippocampus,
    striatum and thalamus as nearest-seed cells of the core). Nuclei are spheres in
    micrometres (ellipsoids in voxels), radius jittered by ±20 %, placed at random inside
    the tissue with surfaces at least one voxel diagonal apart, except for touching pairs
    (one per 16 cells) whose centres are 1.6–1.9 mean radii apart; a voxel in both spheres
    of a pair goes to the nearer centre, and a pair is kept only when its two labels share
    a voxel face. Labels are in random order. The clean nuclear signal (tissue texture
    plus nuclei) and the autofluorescence channel (tissue texture, no nuclei) are
    multiplied by a bias field
    ``exp(-x_um / length_x) * exp(-z_um / length_z)`` (1 at the first voxel, 0.42–0.64 at the
    last), then get Poisson shot noise, a background of 100 and Gaussian read noise
    (σ = 5), and are rounded into uint16.

    Parameters
    ----------
    shape : sequence of int, optional
        (C, Z, Y, X); C is 1 (nuclear) or 2 (nuclear, autofluorescence), Z, Y, X >= 16.
    spacing : sequence of float, optional
        Voxel size (z, y, x) in micrometres.
    n_cells : int or None, optional
        Number of nuclei. None derives it from the tissue volume (one per 6000 µm³), capped
        at what random placement fits without overlaps beyond the touching pairs.
    cell_radius_um : float, optional
        Mean nucleus radius in micrometres; at least 0.625 × the voxel diagonal, and the
        largest radius (1.2 × this) at most a quarter of the tissue's smallest semi-axis.
    seed : int, optional
        Seed of the random generator; equal seeds give identical volumes.

    Returns
    -------
    LightsheetVolume
        Image (C, Z, Y, X) uint16 and its ground truth; see `LightsheetVolume`.

    Raises
    ------
    TypeError
        When `shape`, `spacing`, `n_cells`, `cell_radius_um` or `seed` has the wrong type.
    ValueError
        When `shape` does not have 4 positive sizes, has more than 2 channels or is too
        small for the cells, `spacing` is not positive, `n_cells` or `seed` is negative,
        `cell_radius_um` is too small for the spacing, or `n_cells` cells do not fit.
    """
    shape, spacing, n_cells, radius, seed = _validate_lightsheet(
        shape, spacing, n_cells, cell_radius_um, seed
    )
    rng_cells, rng_texture, rng_bias, rng_noise = (
        np.random.default_rng(s) for s in np.random.SeedSequence(seed).spawn(4)
    )
    grid = shape[1:]
    tissue = _Tissue(grid, spacing)
    mask, atlas = _atlas(tissue)
    target = (
        n_cells if n_cells is not None else round(mask.sum() * np.prod(spacing) / _UM3_PER_CELL)
    )
    centres_um, radii, touching = _place_cells(
        rng_cells, tissue, target, radius, n_cells is not None
    )
    intensities = rng_cells.uniform(*_CELL_LEVEL, size=len(radii))
    labels, cells = _draw_cells(grid, spacing, centres_um, radii, intensities)
    texture = [_smooth_noise(rng_texture, grid, spacing) for _ in range(shape[0])]
    clean = np.where(mask, _TISSUE_LEVEL * np.maximum(1 + 0.25 * texture[0], 0), 0) + cells
    clean = clean.astype(np.float32)
    bias, length_z, length_x = _bias(rng_bias, grid, spacing)
    channels = [clean]
    if shape[0] == 2:
        channels.append(np.where(mask, _AUTOFLUORESCENCE * np.maximum(1 + 0.3 * texture[1], 0), 0))
    image = np.stack([_observe(rng_noise, c, bias) for c in channels])
    return LightsheetVolume(
        image=_frozen(image),
        dims="czyx",
        spacing=spacing,
        bias=_frozen(bias),
        clean=_frozen(clean),
        cell_labels=_frozen(labels),
        atlas=_frozen(atlas),
        tissue=_frozen(mask),
        regions=_REGIONS,
        centroids=_frozen(centres_um / np.asarray(spacing)),
        radii=_frozen(radii),
        intensities=_frozen(intensities),
        touching=touching,
        channel_names=_CHANNEL_NAMES[: shape[0]],
        bias_lengths_um=(length_z, length_x),
        background=_BACKGROUND,
        read_noise=_READ_NOISE,
        seed=seed,
    )


# --------------------------------------------------------------------------- EM stack


def _membranes(rng, shape) -> tuple[np.ndarray, np.ndarray]:
    """Membrane darkness in [0, 1] and a per-cell grey level from a Voronoi of seeds.

    The cell walls run perpendicular to the sections (a 2D Voronoi, the same in every
    slice): oblique walls would move from one section to the next, an apparent motion that
    no registration could tell from the known transforms. Slices still differ by their
    texture and vesicles.
    """
    _, y, x = shape
    pad = _EM_CELL_PX
    lo = np.array([-pad, -pad])
    hi = np.array([y - 1 + pad, x - 1 + pad])
    n_seeds = max(4, math.ceil(np.prod(hi - lo) / _EM_CELL_PX**2))
    seeds = rng.uniform(lo, hi, size=(n_seeds, 2))
    grey = rng.uniform(150.0, 205.0, size=n_seeds)
    points = np.stack(np.meshgrid(np.arange(y), np.arange(x), indexing="ij"), -1).reshape(-1, 2)
    # Each point's query is independent, so threads change the speed, not the result.
    dist, index = cKDTree(seeds).query(points, k=2, workers=-1)
    apart = np.linalg.norm(seeds[index[:, 0]] - seeds[index[:, 1]], axis=1)
    # Distance to the bisecting line of the two nearest seeds: the cell wall.
    wall = (dist[:, 1] ** 2 - dist[:, 0] ** 2) / (2 * apart)
    membrane = np.exp(-0.5 * (wall / _EM_MEMBRANE_PX) ** 2).reshape(y, x)
    cells = grey[index[:, 0]].reshape(y, x)
    return np.broadcast_to(membrane, shape), np.broadcast_to(cells, shape)


def _vesicles(rng, shape) -> np.ndarray:
    """Darkness in [0, 1] of small round vesicles spanning one or two sections."""
    dark = np.zeros(shape)
    n = max(1, int(np.prod(shape)) // _EM_VESICLE_EVERY)
    centres = rng.uniform(0, 1, size=(n, 3)) * (np.asarray(shape) - 1)
    radii = rng.uniform(1.8, 3.5, size=n)
    stretch = np.array([_EM_Z_STRETCH, 1.0, 1.0])
    for c, r in zip(centres, radii, strict=True):
        half = np.ceil(r / stretch).astype(int) + 1
        lo = np.maximum(np.floor(c).astype(int) - half, 0)
        hi = np.minimum(np.floor(c).astype(int) + half + 1, shape)
        axes = [((np.arange(lo[d], hi[d]) - c[d]) * stretch[d]) ** 2 for d in range(3)]
        d2 = axes[0][:, None, None] + axes[1][None, :, None] + axes[2][None, None, :]
        box = tuple(slice(a, b) for a, b in zip(lo, hi, strict=True))
        dark[box] = np.maximum(dark[box], np.exp(-((d2 / (r * r)) ** 2)))
    return dark


def _em_content(rng, shape) -> np.ndarray:
    """Aligned uint8 slices cut from one smooth 3D volume."""
    membrane, grey = _membranes(rng, shape)
    fine = ndimage.gaussian_filter(rng.standard_normal(shape), (1.5, 1.5, 1.5))
    coarse = ndimage.gaussian_filter(rng.standard_normal(shape), (1.5, 6.0, 6.0))
    fine /= max(float(fine.std()), 1e-12)
    coarse /= max(float(coarse.std()), 1e-12)
    image = grey + 12 * fine + 12 * coarse - 120 * membrane - 80 * _vesicles(rng, shape)
    # A little in-plane blur stands in for the microscope's point spread.
    image = ndimage.gaussian_filter(image, (0, 0.6, 0.6))
    return np.clip(np.rint(image), 0, 255).astype(np.uint8)


def _draw_affines(rng, shape, limits, family: str = "affine"):
    """Per-slice parameters and matrices of `family`, about the slice centre; slice 0 is identity.

    Every family makes the same draws, so one seed gives the same shifts (and, where kept, the
    same rotations and scales) whatever the family.
    """
    z, y, x = shape
    max_rot, max_shift, max_scale, max_shear = limits
    rotation = rng.uniform(-max_rot, max_rot, size=z)
    shift = rng.uniform(-max_shift, max_shift, size=(z, 2))
    scale = rng.uniform(-max_scale, max_scale, size=(z, 2))
    shear = rng.uniform(-max_shear, max_shear, size=z)
    rotation[0], shift[0], scale[0], shear[0] = 0.0, 0.0, 0.0, 0.0
    if family == "translation":
        rotation[:] = 0.0
    if family in ("translation", "rigid"):
        scale[:] = 0.0
    if family == "similarity":
        scale[:, 1] = scale[:, 0]
    if family != "affine":
        shear[:] = 0.0
    centre = np.array([(y - 1) / 2, (x - 1) / 2])
    transforms = np.tile(np.eye(3), (z, 1, 1))
    for k in range(z):
        t = math.radians(rotation[k])
        rot = np.array([[math.cos(t), -math.sin(t)], [math.sin(t), math.cos(t)]])
        linear = rot @ np.array([[1.0, shear[k]], [0.0, 1.0]]) @ np.diag(1 + scale[k])
        transforms[k, :2, :2] = linear
        transforms[k, :2, 2] = centre + shift[k] - linear @ centre
    transforms[0] = np.eye(3)
    return transforms, rotation, shift, scale, shear


def _observe_em(rng, aligned, transforms, gain, noise: float) -> np.ndarray:
    """Warp each aligned slice by its transform; apply its gain and the noise, if any."""
    if noise == 0 and np.all(gain == 1):
        # SciPy's own rounding into uint8: the stacks made before gain and noise existed.
        return np.stack(
            [
                ndimage.affine_transform(a, t, order=1, mode="constant", cval=0)
                for a, t in zip(aligned, transforms, strict=True)
            ]
        )
    observed = np.empty(aligned.shape, np.uint8)
    for k, (a, t, g) in enumerate(zip(aligned, transforms, gain, strict=True)):
        # The gain acts on the content, so the empty border the warp brings in stays 0.
        mean = a.mean()
        warped = ndimage.affine_transform(
            mean + g * (a - mean), t, order=1, mode="constant", cval=0, output=np.float64
        )
        if noise > 0:
            warped += rng.normal(0.0, noise * 255.0, warped.shape)
        observed[k] = np.clip(np.rint(warped), 0, 255)
    return observed


def _valid_masks(transforms: np.ndarray, shape) -> np.ndarray:
    """Reference pixels q whose preimage inv(T) q lies in the observed frame."""
    z, y, x = shape
    q = np.stack(np.meshgrid(np.arange(y), np.arange(x), indexing="ij"), 0).reshape(2, -1)
    q = np.vstack([q, np.ones(q.shape[1])])
    eps = 1e-9
    masks = np.empty(shape, bool)
    for k in range(z):
        p = np.linalg.solve(transforms[k], q)
        inside = (p[0] >= -eps) & (p[0] <= y - 1 + eps) & (p[1] >= -eps) & (p[1] <= x - 1 + eps)
        masks[k] = inside.reshape(y, x)
    return masks


def _largest_box(mask: np.ndarray) -> tuple[tuple[int, int], tuple[int, int]]:
    """Largest-area all-True axis-aligned box ((y0, y1), (x0, x1)), half-open."""
    best = (0, ((0, 0), (0, 0)))
    heights = [0] * (mask.shape[1] + 1)
    for row, values in enumerate(mask.tolist()):
        for col, v in enumerate(values):
            heights[col] = heights[col] + 1 if v else 0
        stack: list[int] = []
        for col, h in enumerate(heights):
            while stack and heights[stack[-1]] >= h:
                top = heights[stack.pop()]
                left = stack[-1] + 1 if stack else 0
                if top * (col - left) > best[0]:
                    best = (top * (col - left), ((row - top + 1, row + 1), (left, col)))
            stack.append(col)
    return best[1]


def em_stack(
    shape: Sequence[int] = (12, 192, 192),
    *,
    seed: int = 0,
    max_rotation_deg: float = 3.0,
    max_shift_px: float = 6.0,
    max_scale: float = 0.03,
    max_shear: float = 0.02,
    transform: str = "affine",
    noise: float = 0.0,
    contrast: float = 0.0,
) -> EMStack:
    """Generate a misaligned serial-section EM-like stack with known per-slice affines.

    The aligned slices are sections of one smooth 3D volume: cell walls of a random Voronoi
    partition (dark membranes) that cross the sections at right angles, per-cell grey levels,
    filtered-noise texture and dark vesicles, so consecutive slices are similar but not
    identical, and hold no apparent motion of their own (the known transforms are the true
    alignment). Each slice ``k >= 1`` is
    then warped by a random affine about the slice centre: rotation within
    ±`max_rotation_deg`, shift within ±`max_shift_px` per axis, scale ``1 ± max_scale`` per
    axis and shear within ±`max_shear`. A narrower `transform` family zeroes what it excludes:
    ``"translation"`` keeps only the shift, ``"rigid"`` adds the rotation, ``"similarity"``
    adds one isotropic scale (the y draw on both axes) and ``"affine"`` keeps everything. The
    draws do not depend on the family, so for one seed the families share their shifts.

    Optionally each slice ``k >= 1`` gets a contrast gain ``g[k]`` drawn from
    ``U(1 − contrast, 1 + contrast)``, applied about the mean grey level ``m[k]`` of the
    aligned slice before the warp (``m + g (x − m)``, so the empty border stays 0), and every
    observed slice gets additive Gaussian noise of σ = ``noise × 255`` after the warp; the
    result is then rounded and clipped into uint8. With both 0 (the default) the observed
    slices are exactly the warps below, and the stack is the same as without these options.

    Conventions. ``transforms`` is (Z, 3, 3) homogeneous matrices acting on ``(y, x, 1)``
    pixel coordinates, and
    ``observed[k] = scipy.ndimage.affine_transform(aligned[k], transforms[k], order=1,
    mode="constant", cval=0)``, i.e. output pixel ``p`` of the observed slice samples the
    aligned slice at ``transforms[k] @ p`` (SciPy's output → input convention);
    ``transforms[0]`` is the identity. Pixel ``p`` of observed slice ``k`` shows reference
    point ``q = transforms[k] @ p``; the same point lies at ``p' = inv(transforms[k-1]) @ q``
    in observed slice ``k − 1``, hence ``pairwise[k] = inv(transforms[k-1]) @ transforms[k]``
    maps pixel coordinates of observed slice ``k`` into observed slice ``k − 1``, and
    ``affine_transform(observed[k-1], pairwise[k])`` resamples slice ``k − 1`` onto slice
    ``k``. Prefix products recover the global transforms,
    ``transforms[k] = pairwise[1] @ … @ pairwise[k]``, and
    ``affine_transform(observed[k], inv(transforms[k]))`` recovers ``aligned[k]`` where
    ``valid_mask[k]`` holds, i.e. where ``inv(transforms[k]) @ q`` falls inside the observed
    frame ``[0, Y − 1] × [0, X − 1]``. ``valid_box = ((y0, y1), (x0, x1))`` is the
    largest-area half-open box with ``valid_mask[:, y0:y1, x0:x1]`` all True.

    Parameters
    ----------
    shape : sequence of int, optional
        (Z, Y, X) with Z >= 2 and Y, X >= 32.
    seed : int, optional
        Seed of the random generator; equal seeds give identical stacks.
    max_rotation_deg : float, optional
        Largest rotation in degrees, in [0, 45].
    max_shift_px : float, optional
        Largest shift per axis in pixels, in [0, min(Y, X) / 2].
    max_scale : float, optional
        Largest relative scale change per axis, in [0, 0.25].
    max_shear : float, optional
        Largest shear, in [0, 0.25].
    transform : {"affine", "similarity", "rigid", "translation"}, optional
        Family of the per-slice transforms.
    noise : float, optional
        Standard deviation of the additive Gaussian noise as a fraction of 255, in [0, 1].
    contrast : float, optional
        Half-width of the per-slice gain range around 1, in [0, 0.5].

    Returns
    -------
    EMStack
        Observed stack (Z, Y, X) uint8, aligned stack, transforms and valid region; spacing
        (0.05, 0.004, 0.004) µm (50 nm sections, 4 nm pixels).

    Raises
    ------
    TypeError
        When `shape`, `seed`, a limit, `transform`, `noise` or `contrast` has the wrong type.
    ValueError
        When `shape` does not have 3 positive sizes or is too small, `seed` is negative, a
        limit, `noise` or `contrast` is outside its range, `transform` is not a known family,
        or the transforms leave no common valid region.
    """
    shape, seed, limits = _validate_em(
        shape, seed, max_rotation_deg, max_shift_px, max_scale, max_shear
    )
    transform, noise, contrast = _validate_em_appearance(transform, noise, contrast)
    # Spawned children are keyed by index: children 0 and 1 are those of the stacks made
    # before gain and noise existed, so those stacks are unchanged.
    rng_content, rng_affine, rng_appearance = (
        np.random.default_rng(s) for s in np.random.SeedSequence(seed).spawn(3)
    )
    aligned = _em_content(rng_content, shape)
    transforms, rotation, shift, scale, shear = _draw_affines(rng_affine, shape, limits, transform)
    gain = rng_appearance.uniform(1 - contrast, 1 + contrast, size=shape[0])
    gain[0] = 1.0
    observed = _observe_em(rng_appearance, aligned, transforms, gain, noise)
    pairwise = np.tile(np.eye(3), (shape[0], 1, 1))
    pairwise[1:] = np.linalg.inv(transforms[:-1]) @ transforms[1:]
    masks = _valid_masks(transforms, shape)
    box = _largest_box(masks.all(axis=0))
    if box[0][1] - box[0][0] < 2 or box[1][1] - box[1][0] < 2:
        raise ValueError(
            f"the affine limits leave no common valid region in a {shape[1:]} slice; "
            "lower `max_rotation_deg`, `max_shift_px`, `max_scale` or `max_shear`"
        )
    return EMStack(
        image=_frozen(observed),
        aligned=_frozen(aligned),
        transforms=_frozen(transforms),
        pairwise=_frozen(pairwise),
        valid_mask=_frozen(masks),
        valid_box=box,
        spacing=_EM_SPACING,
        dims="zyx",
        rotation_deg=_frozen(rotation),
        shift_px=_frozen(shift),
        scale=_frozen(scale),
        shear=_frozen(shear),
        seed=seed,
        transform=transform,
        noise=noise,
        contrast=contrast,
        gain=_frozen(gain),
    )
