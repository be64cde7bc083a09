"""Batched pairwise 2D registration of image pairs in torch.

Every pair ``(fixed[b], moving[b])`` gets the transform of one family (translation, rigid,
similarity or affine) that best aligns the fixed image onto the moving one. All pairs run as
one batch through a coarse-to-fine pyramid; each pair stops on its own when its loss stops
improving, and a stopped pair costs nothing further.

Conventions. Matrices are 3x3 homogeneous and act on ``(y, x, 1)`` PIXEL coordinates in
SciPy's output → input sense: ``matrices[b]`` maps pixel coordinates of ``moving[b]`` into
``fixed[b]``, so ``scipy.ndimage.affine_transform(fixed[b], matrices[b])`` resamples the fixed
image onto the moving one. The parameters live in full-resolution pixel space about the image
centre ``c = ((Y - 1) / 2, (X - 1) / 2)``: ``P(p) = A (p - c) + c + t`` with

- translation: ``A = I``;
- rigid: ``A = R(theta)``, ``R = [[cos, -sin], [sin, cos]]`` on ``(y, x)``;
- similarity: ``A = exp(log_scale) R(theta)``;
- affine: ``A = R(theta) @ [[1, shear], [0, 1]] @ diag(exp(log_sy), exp(log_sx))``.

so a rigid result is a rotation in pixel space whatever the aspect ratio of the image.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from dataclasses import dataclass
from enum import StrEnum

import numpy as np
import torch
import torch.nn.functional as F

from voxflow.core._validate import validate_choice
from voxflow.core._validate import validate_int as _validate_int
from voxflow.core.predict import resolve_device
from voxflow.core.pyramid import downsample_array

__all__ = [
    "Level",
    "Loss",
    "Optimizer",
    "PairwiseResult",
    "TransformKind",
    "make_levels",
    "register_pairs",
]


class TransformKind(StrEnum):
    """Family of transforms a pair is registered with."""

    TRANSLATION = "translation"
    RIGID = "rigid"
    SIMILARITY = "similarity"
    AFFINE = "affine"


class Loss(StrEnum):
    """Dissimilarity between the moving image and the resampled fixed image."""

    NCC = "ncc"
    MSE = "mse"
    LNCC = "lncc"


class Optimizer(StrEnum):
    """Gradient optimiser of the parameters."""

    ADAM = "adam"
    SGD = "sgd"


# Parameter names per family, in the order of `PairwiseResult.params`.
_PARAM_NAMES = {
    TransformKind.TRANSLATION: ("ty", "tx"),
    TransformKind.RIGID: ("ty", "tx", "theta"),
    TransformKind.SIMILARITY: ("ty", "tx", "theta", "log_scale"),
    TransformKind.AFFINE: ("ty", "tx", "theta", "log_sy", "log_sx", "shear"),
}
_DEFAULT_FACTORS = (8, 4, 2, 1)
_DEFAULT_EPOCHS = 200
# Adam moves each parameter by about `lr` per step; parameters are scaled so one unit is about
# one full-resolution pixel at the image edge, so a level's step is this many of its pixels.
_DEFAULT_LR_PER_FACTOR = 0.1
_MIN_LEVEL_PX = 16  # coarse levels keep at least this many pixels on the short side
_MIN_SIZE = 8
DEFAULT_SAMPLES = 2**15  # pixels per pair the loss reads at a level that has more
MIN_SAMPLES = 64  # the fewest pixels per pair a sampled level may read
_EDGE_RAMP = 1.0  # level pixels over which a pixel's weight rises inside the fixed frame
_MIN_OVERLAP = 0.1  # a pair whose overlap falls below this fraction of the frame is dropped
_STD_TINY = 1e-6  # relative standard deviation below which an image counts as constant
_LNCC_EPS = 1e-3  # variance floor of the local correlation, for flat windows
_SGD_MOMENTUM = 0.9
_GAIN_DECAY = 0.7  # per-pair learning-rate factor applied after each step that did not improve
_GAIN_GROWTH = 1.2  # ... and after each step that did, up to the level's learning rate
# Pixels per forward/backward pass: on a CPU one pass should stay within the cache (batching
# large images only thrashes it); on a GPU as many as memory comfortably holds.
_CPU_CHUNK_PIXELS = 2**18
_GPU_CHUNK_PIXELS = 2**25


# --------------------------------------------------------------------------- levels


def _validate_lr(value: object, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"`{name}` must be a real number, got {value!r} ({type(value).__name__})")
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"`{name}` must be a finite number > 0, got {value}")
    return float(value)


@dataclass(frozen=True)
class Level:
    """One resolution level of the coarse-to-fine optimisation.

    Parameters
    ----------
    factor : int
        Downsampling factor (block mean) of both images, >= 1.
    epochs : int
        Largest number of optimisation steps at this level, >= 1.
    lr : float
        Learning rate, > 0, in the scaled parameter units (about one full-resolution pixel
        of motion at the image edge per unit).
    """

    factor: int
    epochs: int
    lr: float

    def __post_init__(self):
        object.__setattr__(self, "factor", _validate_int(self.factor, "factor", 1))
        object.__setattr__(self, "epochs", _validate_int(self.epochs, "epochs", 1))
        object.__setattr__(self, "lr", _validate_lr(self.lr, "lr"))


def _as_list(value: object, name: str) -> list:
    if isinstance(value, str | bytes):
        raise TypeError(f"`{name}` must be a number or a sequence of numbers, got {value!r}")
    if isinstance(value, Sequence | np.ndarray):
        values = list(value)
        if not values:
            raise ValueError(f"`{name}` must hold at least one value, got an empty sequence")
        return values
    return [value]


def make_levels(
    factors: int | Sequence[int] = _DEFAULT_FACTORS,
    epochs: int | Sequence[int] | None = None,
    lr: float | Sequence[float] | None = None,
) -> tuple[Level, ...]:
    """A coarse-to-fine schedule of levels.

    Each argument is a scalar, broadcast to every level, or a sequence with one entry per
    level; sequences longer than one must agree in length. Any number of levels is allowed.

    Parameters
    ----------
    factors : int or sequence of int, optional
        Downsampling factor per level, coarse first; default ``(8, 4, 2, 1)``.
    epochs : int or sequence of int, optional
        Largest number of steps per level; None gives 200 (early stopping ends most sooner).
    lr : float or sequence of float, optional
        Learning rate per level; None gives ``0.1 * factor``, i.e. a tenth of a level pixel.

    Returns
    -------
    tuple of Level

    Raises
    ------
    TypeError
        When an entry has the wrong type.
    ValueError
        When sequences of length > 1 disagree in length, a sequence is empty, a factor or an
        epoch count is < 1, or a learning rate is not > 0.
    """
    lists = {"factors": _as_list(factors, "factors")}
    if epochs is not None:
        lists["epochs"] = _as_list(epochs, "epochs")
    if lr is not None:
        lists["lr"] = _as_list(lr, "lr")
    lengths = {name: len(v) for name, v in lists.items() if len(v) > 1}
    if len(set(lengths.values())) > 1:
        raise ValueError(
            f"`factors`, `epochs` and `lr` sequences must have one length, got lengths {lengths}"
        )
    n = max(len(v) for v in lists.values())
    f = [_validate_int(v, "factors", 1) for v in lists["factors"]]
    f = f * n if len(f) == 1 else f
    e = lists.get("epochs", [_DEFAULT_EPOCHS])
    e = e * n if len(e) == 1 else e
    r = lists.get("lr", [_DEFAULT_LR_PER_FACTOR * x for x in f])
    r = r * n if len(r) == 1 else r
    return tuple(
        Level(
            _validate_int(fi, "factors", 1), _validate_int(ei, "epochs", 1), _validate_lr(ri, "lr")
        )
        for fi, ei, ri in zip(f, e, r, strict=True)
    )


def _fit_levels(levels: tuple[Level, ...], shape: tuple[int, int]) -> tuple[Level, ...]:
    """Drop levels coarser than the image allows; keep the finest, clipped, if none remains."""
    largest = max(1, min(shape) // _MIN_LEVEL_PX)
    kept = tuple(level for level in levels if level.factor <= largest)
    if kept:
        return kept
    last = levels[-1]
    return (Level(largest, last.epochs, last.lr),)


# --------------------------------------------------------------------------- result


@dataclass(frozen=True)
class PairwiseResult:
    """Transforms found for a batch of pairs.

    Attributes
    ----------
    matrices : ndarray of float64, shape (B, 3, 3)
        Map pixel coordinates ``(y, x, 1)`` of the moving image into the fixed image:
        ``affine_transform(fixed[b], matrices[b])`` approximates ``moving[b]``.
    loss : ndarray of float64, shape (B,)
        Loss at the final parameters on the finest level; NaN for a skipped pair.
    steps : ndarray of int64, shape (B,)
        Optimisation steps taken over all levels; 0 for a skipped pair.
    converged : ndarray of bool, shape (B,)
        True when early stopping ended the last level (rather than its epoch limit) and the
        pair was not skipped.
    params : ndarray of float64, shape (B, n_params)
        Final parameters in physical units: translation ``(ty, tx)`` in pixels, then for
        rigid ``theta`` (radians), similarity ``theta, log_scale``, affine
        ``theta, log_sy, log_sx, shear`` (natural-log scales, shear dimensionless).
    """

    matrices: np.ndarray
    loss: np.ndarray
    steps: np.ndarray
    converged: np.ndarray
    params: np.ndarray


# --------------------------------------------------------------------------- parameters


def _units(kind: TransformKind, shape: tuple[int, int]) -> np.ndarray:
    """Physical size of one scaled parameter unit: 1 px for shifts, 1 / radius otherwise."""
    radius = max(1.0, math.hypot((shape[0] - 1) / 2, (shape[1] - 1) / 2))
    units = np.full(len(_PARAM_NAMES[kind]), 1.0 / radius)
    units[:2] = 1.0
    return units


def _linear(kind: TransformKind, phys: torch.Tensor) -> torch.Tensor:
    """The (B, 2, 2) linear part A of the physical parameters (B, n) on (y, x)."""
    if kind is TransformKind.TRANSLATION:
        return torch.eye(2, dtype=phys.dtype, device=phys.device).expand(len(phys), 2, 2)
    cos, sin = torch.cos(phys[:, 2]), torch.sin(phys[:, 2])
    rot = torch.stack([torch.stack([cos, -sin], -1), torch.stack([sin, cos], -1)], -2)
    if kind is TransformKind.RIGID:
        return rot
    if kind is TransformKind.SIMILARITY:
        return rot * torch.exp(phys[:, 3])[:, None, None]
    sy, sx, shear = torch.exp(phys[:, 3]), torch.exp(phys[:, 4]), phys[:, 5]
    upper = torch.stack(
        [torch.stack([sy, shear * sx], -1), torch.stack([torch.zeros_like(sx), sx], -1)], -2
    )
    return rot @ upper


def _matrices(kind: TransformKind, phys: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """(B, 3, 3) float64 matrices of physical parameters (B, n)."""
    centre = np.array([(shape[0] - 1) / 2, (shape[1] - 1) / 2])
    linear = _linear(kind, torch.from_numpy(np.asarray(phys, np.float64))).numpy()
    out = np.tile(np.eye(3), (len(phys), 1, 1))
    out[:, :2, :2] = linear
    out[:, :2, 2] = centre + phys[:, :2] - linear @ centre
    return out


def _params_of(kind: TransformKind, matrix: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Physical parameters of the family closest to one matrix (least squares over the frame).

    The translation keeps the image of the centre; the linear part is projected on the family:
    rotation of the polar decomposition, mean singular value as scale, and for affine the
    QR factorisation ``A = R(theta) @ upper`` which represents it exactly.
    """
    centre = np.array([(shape[0] - 1) / 2, (shape[1] - 1) / 2])
    linear = matrix[:2, :2]
    shift = linear @ centre + matrix[:2, 2] - centre
    if kind is TransformKind.TRANSLATION:
        return shift
    u, s, vt = np.linalg.svd(linear)
    rot = u @ vt
    if kind is not TransformKind.AFFINE:
        theta = math.atan2(rot[1, 0], rot[0, 0])
        extra = [] if kind is TransformKind.RIGID else [math.log(s.mean())]
        return np.array([*shift, theta, *extra])
    q, r = np.linalg.qr(linear)
    signs = np.sign(np.diag(r))
    q, r = q * signs, r * signs[:, None]
    theta = math.atan2(q[1, 0], q[0, 0])
    return np.array([*shift, theta, math.log(r[0, 0]), math.log(r[1, 1]), r[0, 1] / r[1, 1]])


def _validate_initial(initial: object, batch: int) -> np.ndarray:
    if initial is None:
        return np.tile(np.eye(3), (batch, 1, 1))
    try:
        matrices = np.asarray(initial, dtype=np.float64)
    except (TypeError, ValueError) as err:
        raise TypeError(f"`initial` must be an array of 3x3 matrices, got {initial!r}") from err
    if matrices.shape == (3, 3):
        matrices = matrices[None]
    if matrices.shape != (batch, 3, 3):
        raise ValueError(f"`initial` must have shape ({batch}, 3, 3), got {matrices.shape}")
    if not np.isfinite(matrices).all():
        raise ValueError("`initial` must hold finite values only")
    if not np.allclose(matrices[:, 2], [0.0, 0.0, 1.0]):
        raise ValueError("`initial` matrices must have the last row (0, 0, 1)")
    det = np.linalg.det(matrices[:, :2, :2])
    if (det <= 0).any():
        raise ValueError(
            f"`initial` linear parts must have a positive determinant (no reflection), got "
            f"{det[det <= 0].tolist()}"
        )
    return matrices


# --------------------------------------------------------------------------- images


def _validate_images(fixed: object, moving: object) -> tuple[np.ndarray, np.ndarray]:
    arrays = []
    for name, value in (("fixed", fixed), ("moving", moving)):
        if not isinstance(value, np.ndarray):
            raise TypeError(f"`{name}` must be a numpy array, got {type(value).__name__}")
        if value.dtype == bool or not np.issubdtype(value.dtype, np.number):
            raise TypeError(f"`{name}` must have a real numeric dtype, got {value.dtype}")
        if np.issubdtype(value.dtype, np.complexfloating):
            raise TypeError(f"`{name}` must have a real numeric dtype, got {value.dtype}")
        if value.ndim not in (2, 3):
            raise ValueError(f"`{name}` must be (B, Y, X) or (Y, X), got shape {value.shape}")
        arrays.append(value[None] if value.ndim == 2 else value)
    if arrays[0].shape != arrays[1].shape:
        raise ValueError(
            f"`fixed` and `moving` must have one shape, got {arrays[0].shape} and {arrays[1].shape}"
        )
    if min(arrays[0].shape[1:]) < _MIN_SIZE or arrays[0].shape[0] < 1:
        raise ValueError(
            f"images must be at least {_MIN_SIZE}x{_MIN_SIZE} pixels in a batch of >= 1, got "
            f"shape {arrays[0].shape}"
        )
    return arrays[0], arrays[1]


def _normalised(images: np.ndarray, device: torch.device) -> tuple[torch.Tensor, np.ndarray]:
    """Zero-mean unit-variance float32 images and a flag per image that it is constant."""
    from voxflow.core._register_kernels import normalise_images

    out, flat = normalise_images(images, _STD_TINY)
    return torch.from_numpy(out).to(device), flat


@dataclass(frozen=True)
class _LevelData:
    """Both images of every pair at one level, and where their pixels sit at full resolution."""

    fixed: torch.Tensor  # (B, 1, H, W)
    moving: torch.Tensor  # (B, H, W), or (B, 1, N) at the N sampled pixels
    xs: torch.Tensor  # (W,) centred full-resolution x of the level columns, or (N,) of the samples
    ys: torch.Tensor  # (H,) centred full-resolution y of the level rows, or (N,) of the samples
    scale: torch.Tensor  # (2,) full-resolution (x, y) -> normalised grid, per axis
    offset: torch.Tensor  # (2,) added after `scale`
    # Weight gained per unit of the normalised grid inside the fixed frame's edge, (x, y).
    ramp: tuple[float, float, float]  # per axis scale (x, y), then the dead band, in ramps
    sampled: bool = False  # `moving`, `xs` and `ys` hold a fixed random subset of the pixels

    @property
    def pixels(self) -> int:
        """Pixels of the moving image that the loss reads, per pair."""
        return len(self.xs) if self.sampled else len(self.xs) * len(self.ys)


def _gaussian(images: torch.Tensor, sigma: float) -> torch.Tensor:
    """(B, H, W) images smoothed by a separable Gaussian of `sigma` pixels, edges replicated."""
    radius = min(math.ceil(3 * sigma), max(images.shape[-2:]) - 1)
    if sigma <= 0 or radius < 1:
        return images
    taps = torch.arange(-radius, radius + 1, dtype=torch.float64)
    kernel = torch.exp(-0.5 * (taps / sigma) ** 2)
    kernel = kernel / kernel.sum()
    if images.device.type == "cpu":
        from voxflow.core._register_kernels import smooth_replicate

        return torch.from_numpy(smooth_replicate(images.numpy(), kernel.numpy()))
    # A weighted sum of shifted views per axis: torch's conv2d on one channel is many times
    # slower, the more so the larger the batch.
    kernel = kernel.tolist()
    for axis in (-1, -2):
        n = images.shape[axis]
        edges = (radius, radius, 0, 0) if axis == -1 else (0, 0, radius, radius)
        padded = F.pad(images[:, None], edges, mode="replicate")[:, 0]
        out = padded.narrow(axis, 0, n) * kernel[0]
        for k in range(1, len(kernel)):
            out.add_(padded.narrow(axis, k, n), alpha=kernel[k])
        images = out
    return images


def _block_mean(images: torch.Tensor, factor: int) -> torch.Tensor:
    """(B, H, W) images reduced by `factor` per axis, a partial edge block over its pixels."""
    if images.device.type == "cpu":  # compiled, summed in float64
        return torch.from_numpy(downsample_array(images.numpy(), (1, factor, factor)))
    return F.avg_pool2d(images[:, None], factor, ceil_mode=True)[:, 0]


def _level_data(
    fixed: torch.Tensor,
    moving: torch.Tensor,
    factor: int,
    smoothing: float = 0.0,
    samples: int | None = None,
    generator: torch.Generator | None = None,
) -> _LevelData:
    """Block means (edge blocks over the pixels they have) and the level's pixel geometry.

    Level pixel ``j`` sits at full-resolution coordinate ``j * factor + (factor - 1) / 2``,
    so parameters in full-resolution pixels carry over between levels unchanged. Both images
    are then smoothed by a Gaussian of `smoothing` level pixels. A level of more than
    `samples` pixels keeps that many of the moving image's, drawn once by `generator`
    without replacement (the same for every pair), in raster order.
    """
    full = fixed.shape[-2:]
    if factor > 1:
        fixed, moving = _block_mean(fixed, factor), _block_mean(moving, factor)
    fixed, moving = _gaussian(fixed, smoothing), _gaussian(moving, smoothing)
    h, w = fixed.shape[-2:]
    half = (factor - 1) / 2
    kw = {"dtype": torch.float32, "device": fixed.device}
    ys = torch.arange(h, **kw) * factor + half - (full[0] - 1) / 2
    xs = torch.arange(w, **kw) * factor + half - (full[1] - 1) / 2
    scale = torch.tensor([2 / (factor * max(w - 1, 1)), 2 / (factor * max(h - 1, 1))], **kw)
    offset = torch.tensor([(full[1] - 1) / 2 - half, (full[0] - 1) / 2 - half], **kw) * scale - 1
    # Pixels within the smoothing's reach of the frame edge mix in the padding: they do not
    # count, and the weight ramps up after them.
    reach = math.ceil(3 * smoothing) if smoothing > 0 else 0
    ramp = ((w - 1) / 2 / _EDGE_RAMP, (h - 1) / 2 / _EDGE_RAMP, reach / _EDGE_RAMP)
    sampled = samples is not None and h * w > samples
    if sampled:
        drawn = torch.randperm(h * w, generator=generator)[:samples].sort().values
        drawn = drawn.to(fixed.device)
        moving = moving.flatten(1)[:, None, drawn]
        xs, ys = xs[drawn % w], ys[drawn // w]
    return _LevelData(fixed[:, None].contiguous(), moving.contiguous(), xs.contiguous(),
                      ys.contiguous(), scale, offset, ramp, sampled)  # fmt: skip


# --------------------------------------------------------------------------- losses


class _WeightedMoments(torch.autograd.Function):
    """Weighted moments of image pairs, differentiable in the warped image only.

    ``forward(weight, moving, warped)`` takes (n, N) rows and returns (n, 6): Σw, Σwm, Σwm²,
    Σws, Σwms, Σws² (s: the warped image). The rows w, wm and ws go into one (n, 3, N) block,
    so the forward reads it in two batched products and the backward,
    dL/ds = w (∂L/∂Σws + m ∂L/∂Σwms + 2 s ∂L/∂Σws²), is a single one; autograd through
    separate products would read and write every image several times more.
    """

    @staticmethod
    def forward(ctx, weight, moving, warped):
        """The (n, 6) sums of (n, N) rows; the (n, 3, N) block is kept for the backward."""
        known = torch.empty(
            (*warped.shape[:1], 3, warped.shape[1]), dtype=warped.dtype, device=warped.device
        )
        known[:, 0] = weight
        torch.mul(weight, moving, out=known[:, 1])
        torch.mul(weight, warped, out=known[:, 2])
        by_s = (known @ warped[:, :, None])[:, :, 0]  # Σws, Σwms, Σws²
        by_m = (known[:, :2] @ moving[:, :, None])[:, :, 0]  # Σwm, Σwm²
        ctx.save_for_backward(known)
        return torch.cat([weight.sum(1, keepdim=True), by_m, by_s], 1)

    @staticmethod
    def backward(ctx, grad):
        """Gradient with respect to `warped` only."""
        (known,) = ctx.saved_tensors
        coef = grad[:, 3:] * grad.new_tensor([1.0, 1.0, 2.0])
        return None, None, (coef[:, None, :] @ known)[:, 0]


def _moments(moving: torch.Tensor, warped: torch.Tensor, weight: torch.Tensor):
    """Weighted sums Σw, Σwm, Σwm², Σws, Σwms, Σws² per pair (s: the warped fixed image)."""
    return _WeightedMoments.apply(weight.flatten(1), moving.flatten(1), warped.flatten(1))


def _ncc_of(sums: torch.Tensor) -> torch.Tensor:
    n, s_m, s_mm, s_s, s_ms, s_ss = sums.unbind(1)
    n = n.clamp_min(1)
    cov = s_ms - s_m * s_s / n
    var_m = (s_mm - s_m * s_m / n).clamp_min(0)
    var_s = (s_ss - s_s * s_s / n).clamp_min(0)
    return 1 - cov / torch.sqrt(var_m * var_s + 1e-12)


def _mse_of(sums: torch.Tensor) -> torch.Tensor:
    n, _, s_mm, _, s_ms, s_ss = sums.unbind(1)
    return (s_mm - 2 * s_ms + s_ss).clamp_min(0) / n.clamp_min(1)


def _ncc(moving: torch.Tensor, warped: torch.Tensor, weight: torch.Tensor, window: int):
    return _ncc_of(_moments(moving, warped, weight))


def _mse(moving: torch.Tensor, warped: torch.Tensor, weight: torch.Tensor, window: int):
    return _mse_of(_moments(moving, warped, weight))


def _lncc(moving: torch.Tensor, warped: torch.Tensor, weight: torch.Tensor, window: int):
    wm, ww = weight * moving, weight * warped
    stack = torch.stack([weight, wm, ww, wm * moving, ww * warped, wm * warped], 1)
    # Ratios of box sums cancel the divisor, so zero padding at the frame edge is harmless.
    box = F.avg_pool2d(stack, window, stride=1, padding=window // 2)
    support = box[:, 0].clamp_min(1e-6)
    mean_m, mean_w = box[:, 1] / support, box[:, 2] / support
    var_m = (box[:, 3] / support - mean_m**2).clamp_min(0)
    var_w = (box[:, 4] / support - mean_w**2).clamp_min(0)
    cov = box[:, 5] / support - mean_m * mean_w
    local = cov / torch.sqrt(var_m * var_w + _LNCC_EPS)
    return 1 - (weight * local).sum((1, 2)) / weight.sum((1, 2)).clamp_min(1e-6)


_LOSSES = {Loss.NCC: _ncc, Loss.MSE: _mse, Loss.LNCC: _lncc}
_MOMENT_LOSSES = {Loss.NCC: _ncc_of, Loss.MSE: _mse_of}


class _KernelMoments(torch.autograd.Function):
    """The moments of :class:`_WeightedMoments` straight from the affine maps, on a CPU.

    ``forward(lin, off, data, rows)``: (n, 2, 2) and (n, 2) maps from centred (x, y) to
    grid_sample's normalised grid, for the pairs `rows` (None: all) of `data`; returns the
    (n, 6) moments. The compiled kernel samples, weighs and sums in one pass per pixel, the
    moments' derivatives by the maps included (kept for the backward pass, which only
    combines them), where the torch graph writes and reads the grid, the warped image and
    the weights for every pair.
    """

    @staticmethod
    def forward(ctx, lin, off, data, rows):
        """The (n, 6) moments."""
        from voxflow.core._register_kernels import moments_and_jacobian

        picked = np.arange(len(data.fixed)) if rows is None else rows.numpy()
        args = (data.fixed[:, 0].numpy(), data.moving.flatten(1).numpy(), picked,
                data.xs.numpy(), data.ys.numpy(), not data.sampled)  # fmt: skip
        maps = (lin.detach().double().numpy(), off.detach().double().numpy())
        ramp = tuple(float(v) for v in data.ramp)
        moments, ctx.jacobian = moments_and_jacobian(*args, *maps, ramp)
        return torch.from_numpy(moments).to(lin.dtype)

    @staticmethod
    def backward(ctx, grad):
        """Gradients with respect to `lin` and `off`."""
        from voxflow.core._register_kernels import gradient_of

        g_lin, g_off = gradient_of(ctx.jacobian, grad[:, 3:].double().numpy())
        dtype = grad.dtype
        return torch.from_numpy(g_lin).to(dtype), torch.from_numpy(g_off).to(dtype), None, None


@dataclass(frozen=True)
class _Problem:
    """What stays fixed while the parameters move."""

    kind: TransformKind
    loss: Loss
    units: torch.Tensor  # (n,) physical size of one scaled unit
    penalty: float
    window: int


class _OuterSum(torch.autograd.Function):
    """``grid[n, i, j] = columns[n, j] + rows[n, i]``: (n, W, 2) and (n, H, 2) to (n, H, W, 2).

    The same as a broadcast sum, but the forward fills each channel as one contiguous outer
    sum: broadcasting over the trailing pair of channels vectorises poorly.
    """

    @staticmethod
    def forward(ctx, columns, rows):
        """The (n, H, W, 2) grid."""
        grid = columns.new_empty((len(columns), rows.shape[1], columns.shape[1], 2))
        for k in range(2):
            torch.add(columns[:, None, :, k], rows[:, :, None, k], out=grid[..., k])
        return grid

    @staticmethod
    def backward(ctx, grad):
        """Gradients with respect to `columns` and `rows`."""
        return grad.sum(1), grad.sum(2)


def _edge_weight(grid: torch.Tensor, ramp: tuple[float, float, float]) -> torch.Tensor:
    """Weight (n, H, W): 0 up to `ramp[2]` ramps inside the fixed frame, then rising to 1."""
    # Per axis, with scalars: ops on the interleaved (x, y) pairs vectorise poorly.
    inside_x = grid[..., 0].abs().mul_(-ramp[0]).add_(ramp[0] - ramp[2])
    inside_y = grid[..., 1].abs().mul_(-ramp[1]).add_(ramp[1] - ramp[2])
    return torch.minimum(inside_x, inside_y, out=inside_x).clamp_(0, 1)


def _evaluate(problem: _Problem, data: _LevelData, u: torch.Tensor, rows: torch.Tensor | None):
    """Loss (n,) and overlap fraction (n,) of scaled parameters `u` for the pairs `rows`."""
    phys = u * problem.units
    linear = _linear(problem.kind, phys)
    # Rows and columns in (x, y) order: grid_sample wants the last grid axis as (x, y).
    lin_xy = linear.flip(1).flip(2) * data.scale[None, :, None]
    off_xy = phys[:, :2].flip(1) * data.scale + data.offset
    if _compiled(problem, data):
        sums = _KernelMoments.apply(lin_xy, off_xy, data, rows)
        loss, overlap = _MOMENT_LOSSES[problem.loss](sums), sums[:, 0].detach() / data.pixels
    else:
        loss, overlap = _torch_loss(problem, data, lin_xy, off_xy, rows)
    if problem.penalty and problem.kind in (TransformKind.SIMILARITY, TransformKind.AFFINE):
        loss = loss + problem.penalty * (phys[:, 3:] ** 2).sum(1)
    return loss, overlap


def _torch_loss(problem, data, lin_xy, off_xy, rows) -> tuple[torch.Tensor, torch.Tensor]:
    """Loss and overlap through torch's ``grid_sample`` (GPUs, and the windowed loss)."""
    # The grid is affine in the pixel position: a column term plus a row term.
    columns = lin_xy[:, None, :, 0] * data.xs[None, :, None] + off_xy[:, None]
    if data.sampled:  # (n, 1, N, 2) at the sampled pixels
        grid = (columns + lin_xy[:, None, :, 1] * data.ys[None, :, None])[:, None]
    else:
        grid = _OuterSum.apply(columns, lin_xy[:, None, :, 1] * data.ys[None, :, None])
    fixed = data.fixed if rows is None else data.fixed[rows]
    moving = data.moving if rows is None else data.moving[rows]
    warped = F.grid_sample(fixed, grid, "bilinear", "zeros", align_corners=True)[:, 0]
    with torch.no_grad():
        # Only points that interpolate inside the fixed frame count, so padding has no say;
        # the weight ramps up over one level pixel inside the edge, so the loss does not jump
        # as pixels cross it.
        weight = _edge_weight(grid.detach(), data.ramp)
    loss = _LOSSES[problem.loss](moving, warped, weight, problem.window)
    return loss, weight.sum((1, 2)) / weight[0].numel()


# --------------------------------------------------------------------------- optimisation


@dataclass
class _State:
    """Per-pair progress over the levels."""

    u: torch.Tensor  # (B, n) scaled parameters
    alive: torch.Tensor  # (B,) bool, False once a pair is skipped as degenerate
    steps: torch.Tensor  # (B,) int64
    loss: torch.Tensor  # (B,) float64, best loss at the latest level
    early: torch.Tensor  # (B,) bool, early stopping ended the latest level


def _make_optimizer(kind: Optimizer, param: torch.Tensor, lr: float) -> torch.optim.Optimizer:
    if kind is Optimizer.SGD:
        return torch.optim.SGD([param], lr=lr, momentum=_SGD_MOMENTUM)
    return torch.optim.Adam([param], lr=lr)


def _step_rows(
    optimizer: torch.optim.Optimizer,
    param: torch.Tensor,
    active: torch.Tensor,
    gain: torch.Tensor | None = None,
):
    """One optimiser step that leaves the rows of stopped pairs exactly where they are.

    Momentum would otherwise keep moving a row whose gradient is no longer computed. `gain`
    (B,) scales each row's update: a per-pair learning rate, since neither Adam's nor SGD's
    state depends on the learning rate.
    """
    before = param.detach().clone()
    optimizer.step()
    with torch.no_grad():
        if gain is not None:
            param.copy_(before + gain[:, None] * (param - before))
        param[~active] = before[~active]


def _compiled(problem: _Problem, data: _LevelData) -> bool:
    """Whether the loss runs the compiled kernels (a CPU, and a loss of moments)."""
    return problem.loss in _MOMENT_LOSSES and data.fixed.device.type == "cpu"


def _chunk_size(problem: _Problem, data: _LevelData) -> int:
    """Pairs per forward/backward pass: the whole batch on a GPU, cache-sized on a CPU.

    The compiled kernels keep nothing per pixel, so they take the whole batch too.
    """
    if _compiled(problem, data):
        return len(data.fixed)
    pixels = _CPU_CHUNK_PIXELS if data.fixed.device.type == "cpu" else _GPU_CHUNK_PIXELS
    return max(1, pixels // data.pixels)


def _loss_and_gradient(problem, data, param, rows) -> tuple[torch.Tensor, torch.Tensor]:
    """Loss (float64) and degenerate flag of the pairs `rows`; their gradients land in `param`.

    The rows go in chunks so that on a CPU the images of one pass stay in cache; the loss of a
    pair depends on its own row only, so chunking changes nothing but speed.
    """
    values, bads = [], []
    for part in rows.split(_chunk_size(problem, data)):
        if len(part) == len(param):
            loss, overlap = _evaluate(problem, data, param, None)
        else:
            loss, overlap = _evaluate(problem, data, param[part], part)
        bad = ~torch.isfinite(loss.detach()) | (overlap < _MIN_OVERLAP)
        loss[~bad].sum().backward()
        values.append(loss.detach().double())
        bads.append(bad)
    return torch.cat(values), torch.cat(bads)


def _run_level(problem, data, level, state, patience, min_delta, optimizer, growth) -> None:
    """Optimise every live pair at one level; each takes its best parameters at the end."""
    param = torch.nn.Parameter(state.u.clone())
    opt = _make_optimizer(optimizer, param, level.lr)
    active = state.alive.clone()
    best = torch.full_like(state.loss, math.inf)
    best_u = state.u.clone()
    reference = best.clone()
    wait = torch.zeros_like(state.steps)
    gain = torch.ones_like(best, dtype=param.dtype)
    state.early[:] = False
    for _ in range(level.epochs):
        rows = active.nonzero()[:, 0]
        if not len(rows):
            break
        opt.zero_grad(set_to_none=False)
        value, bad = _loss_and_gradient(problem, data, param, rows)
        state.alive[rows[bad]] = False
        active[rows[bad]] = False
        better = ~bad & (value < best[rows])
        # A step that fails to improve means the pair oscillates about its optimum: slow it.
        # One that improves lets it speed up again, so a pair slowed down in a narrow valley
        # does not crawl along it for the rest of the level.
        gain[rows[~better]] *= _GAIN_DECAY
        gain[rows[better]] = (gain[rows[better]] * growth).clamp_(max=1.0)
        best[rows[better]] = value[better]
        best_u[rows[better]] = param.detach()[rows[better]]
        progress = ~bad & (value < reference[rows] - min_delta)
        reference[rows[progress]] = value[progress]
        wait[rows] = torch.where(progress, 0, wait[rows] + 1)
        state.steps[rows] += 1
        done = rows[~bad & (wait[rows] >= patience)]
        state.early[done] = True
        active[done] = False
        _step_rows(opt, param, active, gain)
    state.u = torch.where(state.alive[:, None], best_u, state.u)
    state.loss = best


# --------------------------------------------------------------------------- entry point


def _validate_options(transform, loss, optimizer, levels, patience, min_delta, penalty, window):
    kind = validate_choice(transform, TransformKind, "transform")
    loss = validate_choice(loss, Loss, "loss")
    optimizer = validate_choice(optimizer, Optimizer, "optimizer")
    if levels is None:
        levels = make_levels()
    if isinstance(levels, Level):
        levels = (levels,)
    if not isinstance(levels, Sequence) or not all(isinstance(v, Level) for v in levels):
        raise TypeError(f"`levels` must be a sequence of Level (see make_levels), got {levels!r}")
    if not levels:
        raise ValueError("`levels` must hold at least one Level, got an empty sequence")
    patience = _validate_int(patience, "patience", 1)
    window = _validate_int(window, "window", 3)
    if window % 2 == 0:
        raise ValueError(f"`window` must be odd, got {window}")
    for name, value in (("min_delta", min_delta), ("penalty", penalty)):
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            raise TypeError(f"`{name}` must be a real number, got {type(value).__name__}")
        if not math.isfinite(value) or value < 0:
            raise ValueError(f"`{name}` must be a finite number >= 0, got {value}")
    return kind, loss, optimizer, tuple(levels), patience, float(min_delta), float(penalty), window


def _validate_samples(samples: object) -> int | None:
    if samples is None:
        return None
    try:
        return _validate_int(samples, "samples", MIN_SAMPLES)
    except ValueError:
        raise ValueError(
            f"`samples` must be >= {MIN_SAMPLES}, or None to read every pixel; got {samples}"
        ) from None


def register_pairs(
    fixed: np.ndarray,
    moving: np.ndarray,
    *,
    transform: TransformKind | str = "rigid",
    loss: Loss | str = "ncc",
    levels: Sequence[Level] | None = None,
    patience: int = 10,
    min_delta: float = 1e-4,
    penalty: float = 0.0,
    optimizer: Optimizer | str = "adam",
    window: int = 9,
    smoothing: float = 1.0,
    samples: int | None = DEFAULT_SAMPLES,
    seed: int = 0,
    device: str | torch.device | None = None,
    initial: np.ndarray | None = None,
) -> PairwiseResult:
    """Register a batch of 2D image pairs, each with its own transform.

    For every pair the transform ``P`` minimises the loss between ``moving[b]`` and
    ``fixed[b]`` sampled at ``P(p)`` for every pixel ``p`` of the moving image, counting only
    pixels whose ``P(p)`` falls inside the fixed frame. Images are normalised to zero mean and
    unit variance first, so learning rates do not depend on dtype or intensity scale. A pixel's
    weight rises linearly from 0 at the fixed frame's edge to 1 one level pixel inside it, so
    the loss stays continuous as pixels cross the edge.

    The optimisation runs coarse to fine, all pairs as one batch. At each level a pair stops
    when its loss has not improved by `min_delta` for `patience` steps (its parameters are then
    frozen and it is no longer computed), and every pair takes its best parameters of the
    level. Each step that does not improve a pair's best loss multiplies that pair's learning
    rate by 0.7, so an optimiser oscillating about the optimum settles into it; each step that
    does multiplies it by 1.2, up to the level's rate, so a pair slowed down in a narrow valley
    does not then crawl along it.

    Parameters
    ----------
    fixed, moving : ndarray, shape (B, Y, X) or (Y, X)
        Pairs of images of any real dtype, one shape, Y and X >= 8; a 2-D pair means B = 1.
    transform : {'translation', 'rigid', 'similarity', 'affine'}, optional
        Family of the transform, see the module docstring for the parameterisation.
    loss : {'ncc', 'mse', 'lncc'}, optional
        ``'ncc'``: 1 − Pearson correlation over the overlap; ``'mse'``: mean squared
        difference of the normalised images; ``'lncc'``: 1 − mean correlation over
        `window`-pixel boxes, which tolerates smooth contrast changes.
    levels : sequence of Level, optional
        Coarse-to-fine schedule; None gives :func:`make_levels` ``()``. A level whose factor
        would leave fewer than 16 pixels on the short side is skipped; if every level is, the
        last runs at the largest factor allowed.
    patience : int, optional
        Steps without an improvement of `min_delta` after which a pair stops at a level.
    min_delta : float, optional
        Smallest loss decrease that counts as an improvement.
    penalty : float, optional
        Weight of the sum of squared log-scales and shear added to the loss (similarity and
        affine only).
    optimizer : {'adam', 'sgd'}, optional
        Adam, or SGD with momentum 0.9 (whose learning rates need choosing by the caller).
    window : int, optional
        Odd box size in level pixels of the local correlation (``'lncc'`` only), >= 3.
    smoothing : float, optional
        Sigma, in level pixels, of a Gaussian applied to both images at the last (finest)
        level (0: none); pixels within three sigma of the fixed frame's edge do not count.
        Interpolating an image with detail at the pixel scale biases the estimate towards
        whole-pixel shifts (by up to about 0.2 px on sharp EM-like slices); one pixel of
        smoothing removes that bias.
    samples : int or None, optional
        Pixels (>= 64) of the moving image the loss reads per pair at a level that has more: a
        random subset drawn once per level from `seed`, the same for every pair of the batch,
        so a pair gives the same result alone or batched. Fine levels cost in proportion to
        their pixels while 32768 samples already fix a transform to a few hundredths of a
        pixel; None reads every pixel. ``'lncc'`` always reads every pixel (its windows need
        the whole image).
    seed : int, optional
        Seed of the pixel samples (the only random draw), so equal inputs and seed give
        equal outputs (bit for bit on the CPU).
    device : str or torch.device, optional
        As for :func:`voxflow.core.predict.resolve_device`; None picks CUDA when available.
    initial : ndarray, shape (B, 3, 3), optional
        Starting matrices in the convention of the result; default identity. A matrix the
        family cannot express starts from its projection on the family (translation of the
        centre kept, rotation of the polar decomposition, mean singular value as scale).

    Returns
    -------
    PairwiseResult
        Matrices, final losses, step counts, convergence flags and parameters. A pair where
        either image is constant, or whose overlap falls below 10 % of the frame, is skipped:
        its matrix is its starting matrix, its loss NaN, steps 0 and converged False.

    Raises
    ------
    TypeError
        When an argument has the wrong type.
    ValueError
        When an argument has a bad value: mismatched or too small images, non-finite pixels,
        an unknown option, a bad `initial` (wrong shape, reflection) or an unknown device.
    """
    fixed, moving = _validate_images(fixed, moving)
    kind, loss, optimizer, levels, patience, min_delta, penalty, window = _validate_options(
        transform, loss, optimizer, levels, patience, min_delta, penalty, window
    )
    _validate_int(seed, "seed", 0)
    samples = _validate_samples(samples)
    if loss is Loss.LNCC:
        samples = None
    if isinstance(smoothing, bool) or not isinstance(smoothing, numbers.Real):
        raise TypeError(f"`smoothing` must be a real number, got {type(smoothing).__name__}")
    if not math.isfinite(smoothing) or smoothing < 0:
        raise ValueError(f"`smoothing` must be a finite number >= 0, got {smoothing}")
    start = _validate_initial(initial, len(fixed))
    dev = resolve_device(None if isinstance(device, str) and device == "auto" else device)
    shape = fixed.shape[1:]
    units = _units(kind, shape)
    problem = _Problem(
        kind, loss, torch.tensor(units, dtype=torch.float32, device=dev), penalty, window
    )
    with torch.no_grad():
        fixed_t, flat_f = _normalised(fixed, dev)
        moving_t, flat_m = _normalised(moving, dev)
    start_u = np.stack([_params_of(kind, m, shape) for m in start]) / units
    batch = len(fixed)
    state = _State(
        u=torch.tensor(start_u, dtype=torch.float32, device=dev),
        alive=torch.from_numpy(~(flat_f | flat_m)).to(dev),
        steps=torch.zeros(batch, dtype=torch.int64, device=dev),
        loss=torch.full((batch,), math.nan, dtype=torch.float64, device=dev),
        early=torch.zeros(batch, dtype=torch.bool, device=dev),
    )
    fitted = _fit_levels(levels, shape)
    generator = torch.Generator().manual_seed(seed)
    for i, level in enumerate(fitted):
        # Coarse levels are block means already; the bias matters where the result is made.
        sigma = float(smoothing) if i == len(fitted) - 1 else 0.0
        with torch.no_grad():
            data = _level_data(fixed_t, moving_t, level.factor, sigma, samples, generator)
        growth = _GAIN_GROWTH if i < len(fitted) - 1 else 1.0
        _run_level(problem, data, level, state, patience, min_delta, optimizer, growth)
    return _result(kind, shape, start, units, state)


def _result(kind, shape, start, units, state: _State) -> PairwiseResult:
    alive = state.alive.cpu().numpy()
    params = state.u.double().cpu().numpy() * units
    matrices = _matrices(kind, params, shape)
    matrices[~alive] = start[~alive]
    params[~alive] = [_params_of(kind, m, shape) for m in start[~alive]] or params[~alive]
    loss = np.where(alive, state.loss.cpu().numpy(), math.nan)
    steps = np.where(alive, state.steps.cpu().numpy(), 0).astype(np.int64)
    converged = alive & state.early.cpu().numpy()
    return PairwiseResult(matrices, loss, steps, converged, params)
