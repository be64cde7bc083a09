"""Scaled-processing benchmark: voxflow's bias-field correction against the copy floor and zarrnii.

Run ``python benchmarks/scaled.py [--sizes small,large] [--workdir DIR] [--json OUT]``; see
``benchmarks/README.md`` for what each row means. Every measured step runs in a process of its
own (``--_step NAME``; zarrnii's in its own virtual environment through ``zarrnii_steps.py``),
so the peak RSS reported for it is that step's alone.
"""

from __future__ import annotations

import argparse
import importlib
import json
import math
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from _measure import (
    MiB,
    StepResult,
    add_common_arguments,
    best_of,
    bounded,
    codec_label,
    drop_page_cache,
    ensure_venv,
    format_table,
    machine,
    memory_table,
    peak_rss_mib,
    pip_install,
    regions,
    run_step,
    stored_bytes,
    targets_table,
    ts_copy_meta,
    ts_open,
    write_result,
)

HERE = Path(__file__).resolve().parent
SIZES = {"small": (256, 512, 512), "large": (1024, 1024, 1024)}
DIMS = "zyx"
SCALE = (1.0, 1.0, 1.0)  # isotropic micrometres: one sigma means the same to both tools
UNIT = "micrometer"
SEED = 20240607
# Bump when the synthetic data or voxflow's default layout change, so a cached input is made
# again (2: blosc zstd level 2).
GENERATOR = 2
IN_FLIGHT = 4  # TensorStore operations pending at once in the floor and the untimed reads
SLAB = 32  # z planes of a block made at a time, so making the input holds little memory

# The phantom: cells on a textured ellipsoid of tissue, times a known bias, plus noise.
TISSUE_FRACTION = 0.45  # tissue semi-axis / volume extent
TISSUE_LEVEL = 150.0
TEXTURE = 0.3  # relative amplitude of the tissue texture
CELL_PITCH = 14  # one cell at most per 14^3 lattice cell, wholly inside it
CELL_RADIUS = (3.0, 4.5)
CELL_LEVEL = (900.0, 1800.0)  # peak brightness of a cell
CELL_FALLOFF = 0.35  # brightness drop from centre to edge of a cell
CELL_DENSITY = 0.6  # fraction of lattice cells inside the tissue that hold a cell
BIAS_FALL = (0.6, 1.0, 0.7)  # bias at the last voxel along z, y, x; 1 at the first
BACKGROUND = 100.0
READ_NOISE = 5.0

# The corrections, with the same meaning for voxflow and zarrnii where they have one.
FACTORS = {"gaussian": 4, "n4": 8}
SIGMA_UM = 32.0
N4_SPLINE_UM = None  # one B-spline mesh element over the whole image (ANTs' default)
N4_CONVERGENCE = {"iters": [50], "tol": 1e-7}  # one fitting level, as suits low resolution
INPUT_PYRAMID_MIN = 16  # --input-pyramid makes 2x levels down to here, so factors 4 and 8 exist
WARM_UP_EDGE = 64  # the small image each voxflow step corrects once before the clock
RESIDUAL_BLOCK = 32  # block edge (voxels) at which the bias left in an output is measured

# Targets
GAUSSIAN_VS_COPY = 1.5
ZARRNII_VS_GAUSSIAN = 5.0
N4_COPY_ALLOWANCE = 1.5  # N4 end to end <= N4 alone + this x the copy floor
N4_MIN_R = 0.99
RSS_GROWTH = 1.5  # largest peak RSS allowed for the largest case, as a multiple of the smallest's

ZARRNII_SPEC = "zarrnii[n4]>=0.21,<0.22"
TORCH_PIN = "torch==2.13.0"  # the CPU build on disk, should zarrnii ever pull torch in

ZARRNII_STEPS = {
    "zarrnii_gaussian_default": ("gaussian", "default"),
    "zarrnii_gaussian_map_blocks": ("gaussian", "map_blocks"),
    "zarrnii_n4_map_blocks": ("n4", "map_blocks"),
}
VOXFLOW_STEPS = {"voxflow_gaussian": "gaussian", "voxflow_n4": "n4"}
TIMED_STEPS = ("copy", *VOXFLOW_STEPS, "n4_alone", *ZARRNII_STEPS)
LABELS = {
    "copy": "copy floor (decode + encode level 0)",
    "voxflow_gaussian": "voxflow gaussian, factor 4, end to end",
    "voxflow_n4": "voxflow n4, factor 8, end to end",
    "n4_alone": "N4 alone (low resolution, in memory)",
    "zarrnii_gaussian_default": "zarrnii gaussian, factor 4, default",
    "zarrnii_gaussian_map_blocks": "zarrnii gaussian, factor 4, map_blocks",
    "zarrnii_n4_map_blocks": "zarrnii n4, factor 8, map_blocks",
}


# --------------------------------------------------------------------------- layout of a run


@dataclass(frozen=True)
class Case:
    """One volume size, where its arrays live and how it is measured."""

    name: str
    shape: tuple[int, int, int]
    root: Path
    repeat: int = 3
    in_flight: int = IN_FLIGHT
    input_pyramid: bool = False
    sigma_um: float = SIGMA_UM

    @property
    def input(self) -> Path:
        """The OME-Zarr every step reads (level 0 only, unless --input-pyramid)."""
        return self.root / "input.ome.zarr"

    def out(self, step: str) -> Path:
        """Where `step` writes."""
        return self.root / f"{step}.ome.zarr"

    def field_file(self, step: str) -> Path:
        """Where a step that keeps no field in its output saves it (NumPy)."""
        return self.root / f"{step}.field.npy"

    @property
    def check_file(self) -> Path:
        """The quality figures (JSON, written by the ``check`` step)."""
        return self.root / "check.json"


def parse_size(text: str) -> tuple[str, tuple[int, int, int]]:
    if text in SIZES:
        return text, SIZES[text]
    try:
        shape = tuple(int(v) for v in text.lower().split("x"))
    except ValueError:
        shape = ()
    largest = max(FACTORS.values())
    if len(shape) != 3 or any(n < 8 * largest or n % largest for n in shape):
        raise argparse.ArgumentTypeError(
            f"a size is one of {', '.join(SIZES)} or ZxYxX with every axis a multiple of "
            f"{largest} (the N4 factor) and at least {8 * largest} (e.g. 64x128x128); "
            f"got {text!r}"
        )
    return text.lower(), shape


# --------------------------------------------------------------------------- the API measured


def voxflow_params(plugin: str, sigma_um: float) -> dict[str, Any]:
    """Parameters of voxflow's `plugin`, in physical units (µm)."""
    if plugin == "gaussian":
        return {"sigma": sigma_um, "units": "um"}
    return {"spline_spacing": N4_SPLINE_UM, "convergence": N4_CONVERGENCE, "shrink_factor": 1}


def zarrnii_params(plugin: str, shape: tuple[int, ...], sigma_um: float) -> dict[str, Any]:
    """Parameters of zarrnii's `plugin` equivalent to :func:`voxflow_params`.

    zarrnii's Gaussian sigma is in voxels of the low-resolution array; its N4 ``spline_param``
    is ANTs' mesh size (B-spline elements per axis over the whole image).
    """
    if plugin == "gaussian":
        return {"sigma": sigma_um / (FACTORS["gaussian"] * SCALE[0])}
    mesh = [1] * len(shape)
    if N4_SPLINE_UM is not None:
        mesh = [max(1, round(n * s / N4_SPLINE_UM)) for n, s in zip(shape, SCALE, strict=True)]
    return {"spline_param": mesh, "convergence": N4_CONVERGENCE, "shrink_factor": 1}


def voxflow_correct(source: str, output: str, plugin: str, params: dict[str, Any]) -> Any:
    """Correct `source` into `output` with voxflow; the one call of its scaled-processing API.

    Writes the corrected image (level 0 and its pyramid) and ``output/fields/<plugin>``, the
    low-resolution field. This is the work of the ``correct_image`` task without Prefect
    around it (whose content cache would make every repeat a cache hit), as the pyramid
    benchmark times ``make_pyramid`` rather than its task.
    """
    from voxflow.io import open_image
    from voxflow.tasks.scaled import ScaledParams, scaled_processing

    settings = ScaledParams(plugin=plugin, params=params, factor=FACTORS[plugin])
    return scaled_processing(open_image(source), output, settings, overwrite=True)


def voxflow_n4_plugin(params: dict[str, Any]) -> Any:
    """The N4 plugin of voxflow, told what it is given: the input reduced by the N4 factor."""
    from voxflow.plugins import N4BiasFieldCorrection

    plugin = N4BiasFieldCorrection(**params)
    from voxflow.core.scaled import ScaleContext

    f = FACTORS["n4"]
    plugin.context = ScaleContext(
        dims=tuple(DIMS),
        spacing=tuple(f * s for s in SCALE),
        fullres_spacing=SCALE,
        factors=(f,) * len(DIMS),
        units=(UNIT,) * len(DIMS),
    )
    return plugin


# --------------------------------------------------------------------------- synthetic input


def _mix(h: Any) -> Any:
    """splitmix64's finaliser: neighbouring lattice keys give unrelated numbers."""
    import numpy as np

    h = (h ^ (h >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    h = (h ^ (h >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return h ^ (h >> np.uint64(31))


def _uniforms(keys: Any, n: int) -> list[Any]:
    """`n` uniform numbers in [0, 1) per key, a pure function of the key."""
    import numpy as np

    out, h = [], keys
    for _ in range(n):
        h = _mix(h + np.uint64(0x9E3779B97F4A7C15))
        out.append((h >> np.uint64(11)).astype(np.float64) / 2.0**53)
    return out


def bias_profile(n: int, axis: int) -> Any:
    """The true bias along one axis: ``exp(-i / L)``, 1 at voxel 0, ``BIAS_FALL`` at the last."""
    import numpy as np

    return np.exp(math.log(BIAS_FALL[axis]) * np.arange(n) / max(n - 1, 1))


def _ellipsoid_terms(shape: tuple[int, ...], coords: list[Any]) -> list[Any]:
    """Squared normalised distance from the tissue centre per axis, at `coords` (voxels)."""
    return [
        ((c - (n - 1) / 2) / (TISSUE_FRACTION * n)) ** 2 for c, n in zip(coords, shape, strict=True)
    ]


def _texture(x: Any, axis: int) -> Any:
    """A sinusoid of period 23 to 37 voxels along one axis.

    The texture is the product of three, so it averages out over a few periods: no variation
    at the scale of the bias, which no estimator could tell from the bias.
    """
    import numpy as np

    return np.sin(2 * np.pi * x / (23.0 + 7 * axis) + 2 * axis)


def _cells(shape: tuple[int, ...], lo: tuple[int, ...], hi: tuple[int, ...]) -> Any:
    """Cells of the region ``lo:hi``: at most one per lattice cell, each wholly inside it.

    Position, radius, brightness and presence of a cell are a hash of its lattice index, so
    every block draws the same cells wherever it starts.
    """
    import numpy as np

    p = CELL_PITCH
    span = [(a // p, (b - 1) // p + 1) for a, b in zip(lo, hi, strict=True)]
    grid = np.meshgrid(*(np.arange(a, b, dtype=np.uint64) for a, b in span), indexing="ij")
    keys = (grid[0] << np.uint64(42)) ^ (grid[1] << np.uint64(21)) ^ grid[2] ^ np.uint64(SEED)
    u = _uniforms(keys, 6)
    jitter = p / 2 - CELL_RADIUS[1] - 0.5
    centre = [(g + 0.5) * p - 0.5 + (2 * v - 1) * jitter for g, v in zip(grid, u, strict=False)]
    radius2 = (CELL_RADIUS[0] + (CELL_RADIUS[1] - CELL_RADIUS[0]) * u[3]) ** 2
    level = CELL_LEVEL[0] + (CELL_LEVEL[1] - CELL_LEVEL[0]) * u[4]
    inside = sum(_ellipsoid_terms(shape, centre)) <= 1
    level = np.where((u[5] < CELL_DENSITY) & inside, level, 0.0)
    # Each voxel looks up the one lattice cell it lies in.
    idx = [np.arange(a, b) // p - s[0] for a, b, s in zip(lo, hi, span, strict=True)]
    n = [b - a for a, b in span]
    flat = (idx[0][:, None, None] * n[1] + idx[1][None, :, None]) * n[2] + idx[2][None, None, :]

    def take(values: Any) -> Any:
        return np.take(values.astype(np.float32).ravel(), flat)

    axes = [np.arange(a, b, dtype=np.float32) for a, b in zip(lo, hi, strict=True)]
    r2 = (axes[0][:, None, None] - take(centre[0])) ** 2
    r2 += (axes[1][None, :, None] - take(centre[1])) ** 2
    r2 += (axes[2][None, None, :] - take(centre[2])) ** 2
    rr = take(radius2)
    return np.where(r2 < rr, take(level) * (1 - CELL_FALLOFF * r2 / rr), 0).astype(np.float32)


def phantom_region(
    shape: tuple[int, ...], lo: tuple[int, ...], hi: tuple[int, ...], key: Any
) -> Any:
    """Voxels of the region ``lo:hi`` of the phantom (uint16); `key` seeds its noise."""
    import numpy as np

    axes = [np.arange(a, b, dtype=np.float32) for a, b in zip(lo, hi, strict=True)]
    e = _ellipsoid_terms(shape, axes)
    tissue = e[0][:, None, None] + e[1][None, :, None] + e[2][None, None, :] <= 1
    t = [_texture(x, axis) for axis, x in enumerate(axes)]
    texture = (t[0][:, None, None] * t[1][None, :, None]) * t[2][None, None, :]
    clean = np.where(tissue, TISSUE_LEVEL * (1 + TEXTURE * texture), 0)
    clean = clean.astype(np.float32) + _cells(shape, lo, hi)
    b = [
        bias_profile(n, axis)[a:z].astype(np.float32)
        for axis, (n, a, z) in enumerate(zip(shape, lo, hi, strict=True))
    ]
    signal = clean * ((b[0][:, None, None] * b[1][None, :, None]) * b[2][None, None, :])
    rng = np.random.default_rng([SEED, *key])
    # Shot noise (Gaussian approximation of Poisson) and read noise in one draw.
    sd = np.sqrt(signal + READ_NOISE**2)
    noisy = signal + BACKGROUND + sd * rng.standard_normal(signal.shape, dtype=np.float32)
    return np.clip(np.rint(noisy), 0, 65535).astype(np.uint16)


def _phantom_block(block_info: dict | None = None) -> Any:
    """One write block of the phantom, made a slab of `SLAB` planes at a time."""
    import numpy as np

    info = block_info[None]
    shape = tuple(info["shape"])
    (z0, z1), (y0, y1), (x0, x1) = info["array-location"]
    out = np.empty((z1 - z0, y1 - y0, x1 - x0), np.uint16)
    for s in range(z0, z1, SLAB):
        e = min(s + SLAB, z1)
        key = (*info["chunk-location"], s)
        out[s - z0 : e - z0] = phantom_region(shape, (s, y0, x0), (e, y1, x1), key)
    return out


def step_input(case: Case) -> dict[str, Any]:
    """Write the phantom with voxflow's writer and default layout; optionally its pyramid."""
    import dask.array as da
    import numpy as np

    from voxflow.io import derive_layout, open_image, write_image

    layout = derive_layout(case.shape, DIMS)
    chunks = da.core.normalize_chunks(layout.write_chunks, case.shape)
    meta = np.empty((0, 0, 0), np.uint16)
    data = da.map_blocks(_phantom_block, chunks=chunks, dtype=np.uint16, meta=meta)
    write_image(case.input, data, DIMS, SCALE, units=[UNIT] * 3, name="lightsheet phantom")
    if case.input_pyramid:
        from voxflow.tasks.pyramid import PyramidParams, make_pyramid

        params = PyramidParams(min_size=INPUT_PYRAMID_MIN)
        make_pyramid(open_image(case.input), None, params, in_place=True, overwrite=True)
    for factor in sorted(set(FACTORS.values())):
        centres = _grid_centres(case.shape, factor)
        np.save(case.root / f"true_bias_f{factor}.npy", true_bias(case.shape, centres, factor))
    levels = [
        {
            "path": d["path"],
            "factors": [round(v / s) for v, s in zip(d["scale"], SCALE, strict=True)],
        }
        for d in ngff_levels(case.input)
    ]
    return {"stored_bytes": stored_bytes(case.input / "0"), "levels": levels,
            "codec": codec_label(case.input / "0")}  # fmt: skip


# --------------------------------------------------------------------------- ground truth


def _block_mean_1d(values: Any, centres: Any, factor: int) -> Any:
    """Mean of `values` over the `factor` voxels centred at each of `centres` (clamped)."""
    import numpy as np

    start = np.rint(np.asarray(centres) - (factor - 1) / 2).astype(np.int64)
    idx = np.clip(start[:, None] + np.arange(factor), 0, len(values) - 1)
    return values[idx].mean(axis=1)


def true_bias(shape: tuple[int, ...], centres: list[Any], factor: int) -> Any:
    """The true bias at low resolution: its mean over each low-resolution voxel's block.

    Parameters
    ----------
    shape : tuple of int
        Full-resolution shape.
    centres : list of numpy.ndarray
        Per axis, the full-resolution voxel coordinate of each low-resolution voxel's centre.
    factor : int
        Full-resolution voxels per low-resolution voxel along each axis.
    """
    import numpy as np

    b = [
        _block_mean_1d(bias_profile(n, axis), c, factor)
        for axis, (n, c) in enumerate(zip(shape, centres, strict=True))
    ]
    return ((b[0][:, None, None] * b[1][None, :, None]) * b[2][None, None, :]).astype(np.float32)


def foreground(shape: tuple[int, ...], centres: list[Any], factor: int) -> Any:
    """Low-resolution voxels whose whole block lies in the tissue (the ellipsoid is convex)."""
    half = (factor - 1) / 2
    near = _ellipsoid_terms(shape, [c - half for c in centres])
    far = _ellipsoid_terms(shape, [c + half for c in centres])
    worst = [a.clip(min=b) for a, b in zip(near, far, strict=True)]
    return worst[0][:, None, None] + worst[1][None, :, None] + worst[2][None, None, :] <= 1


# --------------------------------------------------------------------------- reading OME-Zarr


def ngff_levels(path: Path) -> list[dict[str, Any]]:
    """Path, scale and translation of every level of an OME-Zarr image (NGFF 0.5 or 0.4)."""
    if (path / "zarr.json").exists():
        attrs = json.loads((path / "zarr.json").read_text())["attributes"]["ome"]
    else:
        attrs = json.loads((path / ".zattrs").read_text())
    levels = []
    for d in attrs["multiscales"][0]["datasets"]:
        transforms = {t["type"]: t for t in d["coordinateTransformations"]}
        scale = transforms["scale"]["scale"]
        shift = transforms.get("translation", {"translation": [0.0] * len(scale)})
        levels.append({"path": d["path"], "scale": scale, "translation": shift["translation"]})
    return levels


def _open_array(path: Path) -> Any:
    """A zarr array (v3 or v2) through TensorStore."""
    if (path / "zarr.json").exists():
        return ts_open(path)
    return ts_open(path, driver="zarr")


def block_mean(array: Any, factor: int, in_flight: int = IN_FLIGHT) -> Any:
    """Block mean of a TensorStore array by `factor` on every axis, read region by region."""
    import numpy as np

    shape = tuple(n // factor for n in array.shape)
    out = np.empty(shape, np.float32)
    unit = tuple(max(factor, 256 // factor * factor) for _ in shape)
    full = tuple(n * factor for n in shape)

    def start(region: tuple[slice, ...]) -> Any:
        return region, array[region].read()

    def reduce(item: tuple[tuple[slice, ...], Any]) -> None:
        region, future = item
        block = future.result().astype(np.float32)
        n = block.shape
        split = block.reshape(n[0] // factor, factor, n[1] // factor, factor, -1, factor)
        out[tuple(slice(r.start // factor, r.stop // factor) for r in region)] = split.mean(
            axis=(1, 3, 5)
        )

    pending: list[Any] = []
    for region in regions(full, unit):
        if len(pending) >= in_flight:
            reduce(pending.pop(0))
        pending.append(start(region))
    for item in pending:
        reduce(item)
    return out


def lowres_of(image: Path, factor: int) -> Any:
    """An OME-Zarr image reduced by `factor`: its level at that factor if any, else a block mean."""
    import numpy as np

    levels = ngff_levels(image)
    base = levels[0]["scale"]
    for level in levels:
        ratio = [s / b for s, b in zip(level["scale"], base, strict=True)]
        if all(abs(r - factor) < 1e-6 for r in ratio):
            return _open_array(image / level["path"]).read().result().astype(np.float32)
    return block_mean(_open_array(image / levels[0]["path"]), factor)


# --------------------------------------------------------------------------- measured steps


def step_read(case: Case) -> dict[str, Any]:
    """Read and decode level 0 shard by shard, discarding the data (an untimed cache warm-up)."""
    src = ts_open(case.input / "0")
    unit = tuple(src.chunk_layout.write_chunk.shape)
    return {"shards": bounded(lambda r: src[r].read(), regions(src.shape, unit), case.in_flight)}


def prepare_copy(case: Case) -> tuple[Callable[[], dict], Callable[[], dict]]:
    """Read level 0 and write one copy with the same codec and layout, shard by shard."""
    import tensorstore as ts

    def work() -> dict[str, Any]:
        ctx = ts.Context()
        src = ts_open(case.input / "0", ctx)
        meta = ts_copy_meta(case.input / "0")
        dst = ts_open(case.out("copy") / "0", ctx, metadata=meta, create=True, delete_existing=True)
        unit = tuple(meta["chunk_grid"]["configuration"]["chunk_shape"])
        shards = bounded(lambda r: dst[r].write(src[r]), regions(src.shape, unit), case.in_flight)
        return {"shards": shards}

    return work, lambda: {"stored_bytes": stored_bytes(case.out("copy"))}


def _voxflow_warm_up(case: Case, plugin: str, params: dict[str, Any]) -> None:
    """Correct a small phantom once, so imports, kernels and thread pools load before the clock."""
    from voxflow.io import write_image

    root = case.root / f"warm-up-{plugin}"
    shutil.rmtree(root, ignore_errors=True)
    edge = (WARM_UP_EDGE,) * 3
    image = phantom_region(edge, (0, 0, 0), edge, (0,))
    write_image(root / "in.ome.zarr", image, DIMS, SCALE, units=[UNIT] * 3)
    try:
        voxflow_correct(str(root / "in.ome.zarr"), str(root / "out.ome.zarr"), plugin, params)
    finally:
        shutil.rmtree(root, ignore_errors=True)


def _prepare_voxflow(case: Case, step: str) -> tuple[Callable[[], dict], Callable[[], dict]]:
    """Open the input, correct it and write the corrected OME-Zarr, as the correct task does."""
    plugin = VOXFLOW_STEPS[step]
    params = voxflow_params(plugin, case.sigma_um)
    _voxflow_warm_up(case, plugin, params)

    def work() -> dict[str, Any]:
        ref = voxflow_correct(str(case.input), str(case.out(step)), plugin, params)
        return {"levels": len(ref.levels), "dtype": ref.dtype}

    def finish() -> dict[str, Any]:
        return {"params": params, "stored_bytes": stored_bytes(case.out(step))}

    return work, finish


def prepare_n4_alone(case: Case) -> tuple[Callable[[], dict], Callable[[], dict]]:
    """The N4 plugin of voxflow on the input's block mean at the N4 factor, in memory."""
    import numpy as np

    params = voxflow_params("n4", case.sigma_um)
    plugin = voxflow_n4_plugin(params)
    f, edge = FACTORS["n4"], (WARM_UP_EDGE,) * 3
    small = phantom_region(edge, (0, 0, 0), edge, (0,)).astype(np.float32)
    n = WARM_UP_EDGE // f
    plugin.lowres_func(small.reshape(n, f, n, f, n, f).mean(axis=(1, 3, 5)))  # loads ANTs
    lowres = block_mean(ts_open(case.input / "0"), FACTORS["n4"], case.in_flight)
    kept: dict[str, Any] = {}

    def work() -> dict[str, Any]:
        kept["field"] = plugin.lowres_func(lowres)
        return {"lowres_shape": list(lowres.shape)}

    def finish() -> dict[str, Any]:
        np.save(case.field_file("n4_alone"), np.asarray(kept["field"], np.float32))
        return {"params": params}

    return work, finish


# --------------------------------------------------------------------------- quality figures


def _pearson(a: Any, b: Any) -> float:
    import numpy as np

    return float(np.corrcoef(a.ravel(), b.ravel())[0, 1])


def field_figures(shape: tuple[int, ...], field: Any, centres: list[Any], factor: int) -> dict:
    """How well a low-resolution field matches the true bias over the tissue.

    ``r`` is Pearson's correlation. Pearson's r ignores a wrong amplitude, so with both
    scaled to mean 1 over the tissue, ``slope`` is the field's least-squares slope against the
    truth (1: the right amplitude; 0.5: the field varies half as much as the bias, so the
    correction removes only half of it) and ``rms`` their root mean square difference.
    """
    import numpy as np

    truth = true_bias(shape, centres, factor)
    mask = foreground(shape, centres, factor)
    if field.shape != truth.shape:
        raise ValueError(f"field shape {field.shape} is not the grid's {truth.shape}")
    f, t = field[mask].astype(np.float64), truth[mask].astype(np.float64)
    f, t = f / f.mean(), t / t.mean()
    return {
        "r": _pearson(f, t),
        "slope": float(np.polyfit(t, f, 1)[0]),
        "rms": float(np.sqrt(np.mean((f - t) ** 2))),
        "foreground_voxels": int(mask.sum()),
    }


def _grid_centres(shape: tuple[int, ...], factor: int) -> list[Any]:
    """Full-resolution centre of every whole block of `factor` voxels, per axis."""
    import numpy as np

    return [np.arange(n // factor) * factor + (factor - 1) / 2 for n in shape]


def _voxflow_field(case: Case, step: str) -> tuple[Any, list[Any]] | None:
    """The field voxflow stored, and its voxel centres in full-resolution voxels."""
    import numpy as np

    path = case.out(step) / "fields" / VOXFLOW_STEPS[step]
    if not path.exists():
        return None
    level = ngff_levels(path)[0]
    field = _open_array(path / level["path"]).read().result().astype(np.float32)
    centres = [
        (t + np.arange(n) * s) / s0
        for n, s, t, s0 in zip(
            field.shape, level["scale"], level["translation"], SCALE, strict=True
        )
    ]
    return field, centres


def residual_r(shape: tuple[int, ...], image: Any, factor: int) -> float:
    """Pearson's r of an image reduced by `factor` with the true bias, over coarse blocks.

    The blocks (`RESIDUAL_BLOCK` voxels a side, or the N4 factor for a small volume) hold
    dozens of cells each, so what correlates with the bias is the bias left in the image
    rather than the cells.
    """
    import numpy as np

    big = RESIDUAL_BLOCK if min(shape) >= 8 * RESIDUAL_BLOCK else max(FACTORS.values())
    k = big // factor
    n = [s // k for s in image.shape]
    trimmed = image[: n[0] * k, : n[1] * k, : n[2] * k]
    coarse = trimmed.reshape(n[0], k, n[1], k, n[2], k).mean(axis=(1, 3, 5))
    centres = _grid_centres(shape, big)
    mask = foreground(shape, centres, big)
    return _pearson(coarse[mask].astype(np.float64), true_bias(shape, centres, big)[mask])


def _output_figures(case: Case, step: str, factor: int, field: Any, centres: list[Any]) -> dict:
    """The corrected output at low resolution: residual bias and agreement with the field."""
    import numpy as np

    mask = foreground(case.shape, centres, factor)
    corrected = lowres_of(case.out(step), factor)
    out: dict[str, Any] = {"residual_r": residual_r(case.shape, corrected, factor)}
    source = lowres_of(case.input, factor)
    if corrected.shape == source.shape == field.shape:
        # A correction by `field` over a dark level o, with the field scaled by b, gives
        # input = o + b field (output - o): linear in (o, b, -o b) on (1, field output, field).
        f, i, o = field[mask], source[mask], corrected[mask]
        terms = np.stack([np.ones_like(f), f * o, f], axis=1).astype(np.float64)
        coef = np.linalg.lstsq(terms, i, rcond=None)[0]
        out["output_vs_field"] = float(np.median(np.abs(terms @ coef / i - 1)))
    return out


def step_check(case: Case) -> dict[str, Any]:
    """Quality figures of every field and output present, against the known bias."""
    import numpy as np

    factor = max(FACTORS.values())
    report: dict[str, Any] = {
        "input": {"residual_r": residual_r(case.shape, lowres_of(case.input, factor), factor)}
    }
    for step in VOXFLOW_STEPS:
        found = _voxflow_field(case, step)
        if found is not None:
            factor = FACTORS[VOXFLOW_STEPS[step]]
            figures = field_figures(case.shape, found[0], found[1], factor)
            figures.update(_output_figures(case, step, factor, *found))
            report[step] = figures
    others = {"n4_alone": "n4"} | {s: p for s, (p, _) in ZARRNII_STEPS.items()}
    for step, plugin in others.items():
        if case.field_file(step).exists():
            factor = FACTORS[plugin]
            field = np.load(case.field_file(step))
            centres = _grid_centres(case.shape, factor)
            report[step] = field_figures(case.shape, field, centres, factor)
            if case.out(step).exists():
                report[step].update(_output_figures(case, step, factor, field, centres))
    case.check_file.write_text(json.dumps(report, indent=1))
    return report


# --------------------------------------------------------------------------- step process

PREPARE: dict[str, Callable[[Case], tuple[Callable[[], dict], Callable[[], dict]]]] = {
    "copy": prepare_copy,
    "voxflow_gaussian": lambda case: _prepare_voxflow(case, "voxflow_gaussian"),
    "voxflow_n4": lambda case: _prepare_voxflow(case, "voxflow_n4"),
    "n4_alone": prepare_n4_alone,
}
UNTIMED = {"input": step_input, "read": step_read, "check": step_check}
_VOXFLOW_IMPORTS = ("distributed", "voxflow.io", "voxflow.plugins", "voxflow.tasks.scaled")
IMPORTS = {
    "copy": ("numpy", "tensorstore"),
    "voxflow_gaussian": _VOXFLOW_IMPORTS,
    "voxflow_n4": (*_VOXFLOW_IMPORTS, "ants"),
    "n4_alone": ("numpy", "tensorstore", "ants", "voxflow.plugins", "voxflow.core.scaled"),
}


def _case_from(args: argparse.Namespace) -> Case:
    name, _, spec = args._size.partition("=")
    shape = parse_size(spec)[1]
    return Case(
        name,
        shape,
        Path(args.workdir) / name,
        args.repeat,
        args.in_flight,
        args.input_pyramid,
        args.sigma_um,
    )


def run_child(args: argparse.Namespace) -> None:
    case, step = _case_from(args), args._step
    if step in UNTIMED:
        info = UNTIMED[step](case)
        write_result(args._result, 0.0, peak_rss_mib(), False, **info)
        return
    # Imports, compiled kernels and the warm-up run load before the clock starts.
    for module in IMPORTS.get(step, ()):
        importlib.import_module(module)
    work, finish = PREPARE[step](case)
    start_rss = peak_rss_mib()

    def clean() -> None:
        shutil.rmtree(case.out(step), ignore_errors=True)

    best, dropped = best_of(work, clean, case.repeat)
    info = {**best["info"], **finish()}
    info.update(cpu_seconds=best["cpu_seconds"], other_cpu_seconds=best["other_cpu_seconds"])
    write_result(args._result, best["seconds"], start_rss, dropped, **info)


# --------------------------------------------------------------------------- zarrnii's venv


def _torch_first(python: Path) -> None:
    """Should zarrnii's requirements include torch, install the CPU build on disk first."""
    plan = python.parent.parent / "pip-plan.json"
    pip_install(python, "--dry-run", "--report", str(plan), ZARRNII_SPEC)
    names = {item["metadata"]["name"].lower() for item in json.loads(plan.read_text())["install"]}
    if "torch" in names or any(n.startswith("nvidia-") for n in names):
        pip_install(python, TORCH_PIN)
    plan.unlink()


def ensure_zarrnii(venv: Path, base_python: str) -> Path:
    """Make zarrnii's own virtual environment on first use; return its interpreter.

    zarrnii never enters voxflow's environment. Should its requirements ever include torch,
    the CPU build on disk is installed first, so pip does not fetch the CUDA build.
    """
    return ensure_venv(venv, base_python, [ZARRNII_SPEC], name="zarrnii", prepare=_torch_first)


def _zarrnii_argv(case: Case, step: str, lowres_level: int | None) -> list[str]:
    plugin, method = ZARRNII_STEPS[step]
    factor = FACTORS[plugin]
    argv = [
        str(HERE / "zarrnii_steps.py"),
        *("--input", str(case.input), "--output", str(case.out(step))),
        *("--plugin", plugin, "--method", method, "--factor", str(factor)),
        *("--params", json.dumps(zarrnii_params(plugin, case.shape, case.sigma_um))),
        *("--repeat", str(case.repeat), "--field", str(case.field_file(step))),
    ]
    if lowres_level is not None:
        argv += ["--lowres-level", str(lowres_level)]
    return argv


# --------------------------------------------------------------------------- orchestration


@dataclass(frozen=True)
class Options:
    """What the whole run does, beyond each case."""

    workdir: Path
    steps: tuple[str, ...]
    keep: bool
    dropped: bool
    zarrnii_python: Path | None


def _child_argv(case: Case, step: str, workdir: Path) -> list[str]:
    size = f"{case.name}={'x'.join(map(str, case.shape))}"
    argv = [
        os.path.abspath(__file__),
        *("--_step", step, "--_size", size, "--workdir", str(workdir)),
        *("--in-flight", str(case.in_flight), "--repeat", str(case.repeat)),
        *("--sigma-um", str(case.sigma_um)),
    ]
    return argv + (["--input-pyramid"] if case.input_pyramid else [])


def _ensure_input(case: Case, workdir: Path) -> dict[str, Any]:
    """Write the input unless an identical one is there from an earlier run."""
    marker = case.root / "input.json"
    want = {
        "shape": list(case.shape),
        "seed": SEED,
        "generator": GENERATOR,
        "input_pyramid": case.input_pyramid,
    }
    if marker.exists() and (case.input / "zarr.json").exists():
        have = json.loads(marker.read_text())
        if have.get("key") == want:
            return {**have, "reused": True}
    shutil.rmtree(case.root, ignore_errors=True)
    case.root.mkdir(parents=True)
    print("   writing the input", flush=True)
    result = run_step("input", _child_argv(case, "input", workdir))
    doc = {"key": want, "seconds": result.info["process_seconds"], **result.info}
    marker.write_text(json.dumps(doc))
    return {**doc, "reused": False}


def _clean_outputs(case: Case) -> None:
    for step in TIMED_STEPS:
        shutil.rmtree(case.out(step), ignore_errors=True)
        case.field_file(step).unlink(missing_ok=True)
    case.check_file.unlink(missing_ok=True)


def _run_one(case: Case, step: str, opts: Options, made: dict[str, Any]) -> StepResult:
    if step in ZARRNII_STEPS:
        factor = FACTORS[ZARRNII_STEPS[step][0]]
        level = next(
            (i for i, lv in enumerate(made["levels"]) if set(lv["factors"]) == {factor}), None
        )
        argv = _zarrnii_argv(case, step, level)
        return run_step(step, argv, python=str(opts.zarrnii_python))
    return run_step(step, _child_argv(case, step, opts.workdir))


def run_case(case: Case, opts: Options) -> dict[str, Any]:
    print(f"\n== {case.name}: {'x'.join(map(str, case.shape))} uint16", flush=True)
    made = _ensure_input(case, opts.workdir)
    _clean_outputs(case)
    if not opts.dropped:
        run_step("warm-up", _child_argv(case, "read", opts.workdir))
    steps: dict[str, StepResult] = {}
    failed: dict[str, str] = {}
    for step in opts.steps:
        print(f"   {step:<28}", end=" ", flush=True)
        try:
            steps[step] = _run_one(case, step, opts, made)
        except RuntimeError as err:
            failed[step] = str(err)
            print(f"FAILED ({err}; its output is above)", flush=True)
            continue
        runs = ", ".join(f"{t:.2f}" for t in steps[step].info["runs"])
        print(f"best {steps[step].seconds:.2f} s of {runs}", flush=True)
    try:
        check = run_step("check", _child_argv(case, "check", opts.workdir)).info
    except RuntimeError as err:
        check, failed["check"] = {}, str(err)
    if not opts.keep:
        _clean_outputs(case)
    return {
        "shape": list(case.shape),
        "repeat": case.repeat,
        "input": made,
        "steps": {k: asdict(v) for k, v in steps.items()},
        "failed": failed,
        "check": check,
        "derived": _derive(case, steps, check),
    }


def _derive(case: Case, steps: dict[str, StepResult], check: dict[str, Any]) -> dict[str, Any]:
    """The ratios the targets are about; None where a step they need is missing."""
    t = {k: v.seconds for k, v in steps.items()}

    def ratio(a: str | float | None, b: str | float | None) -> float | None:
        x = t.get(a) if isinstance(a, str) else a
        y = t.get(b) if isinstance(b, str) else b
        return None if x is None or y is None else x / y

    zarrnii = [t[s] for s in ("zarrnii_gaussian_default", "zarrnii_gaussian_map_blocks") if s in t]
    n4_budget = None
    if "n4_alone" in t and "copy" in t:
        n4_budget = t["n4_alone"] + N4_COPY_ALLOWANCE * t["copy"]
    r = {
        step: check.get(step, {}).get("r") for step in (*VOXFLOW_STEPS, "n4_alone", *ZARRNII_STEPS)
    }
    zarrnii_r = [v for k, v in r.items() if k.startswith("zarrnii_gaussian") and v is not None]
    return {
        "level0_bytes": math.prod(case.shape) * 2,
        "gaussian_vs_copy": ratio("voxflow_gaussian", "copy"),
        "n4_vs_copy": ratio("voxflow_n4", "copy"),
        "zarrnii_best_gaussian": min(zarrnii) if zarrnii else None,
        "zarrnii_vs_gaussian": ratio(min(zarrnii) if zarrnii else None, "voxflow_gaussian"),
        "n4_budget": n4_budget,
        "n4_vs_budget": ratio("voxflow_n4", n4_budget),
        **{f"{k}_vs_copy": ratio(k, "copy") for k in (*ZARRNII_STEPS, "n4_alone")},
        "r": r,
        "zarrnii_gaussian_r": max(zarrnii_r) if zarrnii_r else None,
    }


# --------------------------------------------------------------------------- report


def _fmt(value: float | None, spec: str = ".2f", suffix: str = "") -> str:
    return "n/a" if value is None else f"{value:{spec}}{suffix}"


def _case_table(res: dict[str, Any]) -> str:
    d, steps = res["derived"], res["steps"]
    gib = d["level0_bytes"] / 2**30
    copy = steps.get("copy", {}).get("seconds")
    rows = []
    for step in TIMED_STEPS:
        if step in res["failed"]:
            rows.append([LABELS[step], "failed", "", "", "", "", "", ""])
            continue
        if step not in steps:
            continue
        s, info = steps[step], steps[step]["info"]
        versus = "" if step == "copy" or copy is None else f"{s['seconds'] / copy:.2f}x"
        rows.append(
            [
                LABELS[step],
                f"{s['seconds']:.2f}",
                versus,
                f"{gib / s['seconds']:.2f}" if step != "n4_alone" else "",
                f"{info['cpu_seconds']:.2f}",
                f"{info['other_cpu_seconds']:.2f}",
                f"{s['start_rss_mib']:.0f}",
                f"{s['peak_rss_mib']:.0f}",
            ]
        )
    headers = [
        "step",
        "seconds",
        "x copy floor",
        "GiB/s of level 0",
        "CPU s",
        "others' CPU s",
        "RSS start MiB",
        "peak RSS MiB",
    ]
    return format_table(headers, rows)


def _quality_table(res: dict[str, Any]) -> str:
    c = res["check"]
    rows = []
    for step in (*VOXFLOW_STEPS, "n4_alone", *ZARRNII_STEPS):
        if step not in c:
            continue
        q = c[step]
        rows.append(
            [
                LABELS[step],
                _fmt(q.get("r"), ".4f"),
                _fmt(q.get("slope"), ".3f"),
                _fmt(q.get("rms"), ".4f"),
                _fmt(q.get("residual_r"), ".3f"),
                _fmt(q.get("output_vs_field"), ".4f"),
            ]
        )
    q = c.get("input", {})
    rows.append(["input (uncorrected)", "", "", "", _fmt(q.get("residual_r"), ".3f"), ""])
    headers = [
        "field / output",
        "field r",
        "field slope",
        "field rms",
        "output r (bias left, 32 µm blocks)",
        "input/output vs field, median |dev|",
    ]
    return format_table(headers, rows)


def _case_header(name: str, res: dict[str, Any]) -> str:
    made = res["input"]
    how = "reused" if made["reused"] else f"written in {made['seconds']:.1f} s"
    levels = ", ".join(
        f"{lv['path']} (x{','.join(map(str, lv['factors']))})" for lv in made["levels"]
    )
    shape = "x".join(map(str, res["shape"]))
    return (
        f"\n[{name}] {shape} uint16, {res['derived']['level0_bytes'] / MiB:.0f} MiB, stored "
        f"{made['stored_bytes'] / MiB:.0f} MiB ({made.get('codec', '?')}, 64^3 chunks in 256^3 "
        f"shards); input levels {levels}; input {how}; best of {res['repeat']} cold runs per step"
    )


def _value(res: dict[str, Any], key: str) -> float | None:
    return res["derived"].get(key)


def _rule_at_most(key: str, limit: float) -> Callable[[dict[str, Any]], tuple[bool | None, str]]:
    def rule(res: dict[str, Any]) -> tuple[bool | None, str]:
        v = _value(res, key)
        return (None, "n/a") if v is None else (v <= limit, f"{v:.2f}x")

    return rule


def _rule_zarrnii(res: dict[str, Any]) -> tuple[bool | None, str]:
    v = _value(res, "zarrnii_vs_gaussian")
    return (None, "n/a") if v is None else (v >= ZARRNII_VS_GAUSSIAN, f"{v:.2f}x")


def _rule_gaussian_r(res: dict[str, Any]) -> tuple[bool | None, str]:
    ours, theirs = res["derived"]["r"]["voxflow_gaussian"], _value(res, "zarrnii_gaussian_r")
    if ours is None or theirs is None:
        return None, f"voxflow {_fmt(ours, '.4f')}, zarrnii {_fmt(theirs, '.4f')}"
    return ours >= theirs, f"voxflow {ours:.4f}, zarrnii {theirs:.4f}"


def _rule_n4_r(res: dict[str, Any]) -> tuple[bool | None, str]:
    r = res["derived"]["r"]["voxflow_n4"]
    return (None, "n/a") if r is None else (r >= N4_MIN_R, f"r {r:.4f}")


def _rule_n4_budget(res: dict[str, Any]) -> tuple[bool | None, str]:
    d = res["derived"]
    v, budget = d["n4_vs_budget"], d["n4_budget"]
    if v is None:
        return None, "n/a"
    return v <= 1.0, f"{v * budget:.2f} s vs {budget:.2f} s"


TARGET_RULES: list[tuple[str, Callable[[dict[str, Any]], tuple[bool | None, str]]]] = [
    (
        f"gaussian <= {GAUSSIAN_VS_COPY}x copy floor",
        _rule_at_most("gaussian_vs_copy", GAUSSIAN_VS_COPY),
    ),
    (f"zarrnii's faster gaussian >= {ZARRNII_VS_GAUSSIAN:g}x voxflow's", _rule_zarrnii),
    ("gaussian field r >= zarrnii's", _rule_gaussian_r),
    (f"n4 <= N4 alone + {N4_COPY_ALLOWANCE}x copy floor", _rule_n4_budget),
    (f"n4 field r >= {N4_MIN_R}", _rule_n4_r),
]


def _machine() -> dict[str, Any]:
    return machine(("voxflow", "tensorstore", "dask", "numpy", "scipy", "antspyx"))


def _zarrnii_lines(results: dict[str, dict[str, Any]]) -> list[str]:
    for res in results.values():
        for step in ZARRNII_STEPS:
            info = res["steps"].get(step, {}).get("info")
            if info:
                out = info["output"]
                versions = ", ".join(f"{k} {v}" for k, v in info["versions"].items())
                return [
                    f"zarrnii environment: {versions}",
                    f"zarrnii writes {out['dtype']}, chunks {out['chunks']}, codecs "
                    f"{out['codecs']}, levels {out['levels']} (its defaults)",
                ]
    return []


def report(results: dict[str, dict[str, Any]], machine: dict[str, Any], dropped: bool) -> dict:
    print("\n" + "=" * 100)
    print("machine: " + ", ".join(f"{k} {v}" for k, v in machine.items()))
    print("\n".join(_zarrnii_lines(results)))
    if dropped:
        print("page cache: dropped before every timed run, so every run reads from disk")
    else:
        print("page cache: could not be dropped (needs root); runs read from a warm cache")
    print(f"peak RSS of the orchestrating process: {peak_rss_mib():.0f} MiB")
    for name, res in results.items():
        print(_case_header(name, res))
        print(_case_table(res))
        print("\nfields and outputs against the true bias (tissue voxels at low resolution)")
        print(_quality_table(res))
        for step, err in res["failed"].items():
            print(f"   FAILED {step}: {err}")
    table, doc = targets_table(results, TARGET_RULES)
    print("\ntargets\n" + table)
    mem_table, mem = memory_table(
        results, TIMED_STEPS, LABELS, lambda step: step in VOXFLOW_STEPS, RSS_GROWTH
    )
    print("\n" + mem_table)
    return {"targets": doc, "memory": mem}


# --------------------------------------------------------------------------- entry point


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_common_arguments(
        parser,
        "voxflow-bench-scaled",
        IN_FLIGHT,
        "TensorStore operations pending at once in the copy floor",
    )
    add = parser.add_argument
    add(
        "--input-pyramid",
        action="store_true",
        help="also give the input a pyramid, so the correction can reuse a level",
    )
    add("--sigma-um", type=float, default=SIGMA_UM, help="Gaussian sigma in micrometres")
    add(
        "--steps",
        default=",".join(TIMED_STEPS),
        help=f"comma-separated steps to run, of: {', '.join(TIMED_STEPS)}",
    )
    add(
        "--zarrnii-venv",
        default=str(HERE / ".zarrnii-venv"),
        help="zarrnii's own virtual environment (made on first use)",
    )
    add(
        "--zarrnii-python",
        default=shutil.which("python3.11") or sys._base_executable,
        help="the interpreter zarrnii's environment is made from",
    )
    add("--_step", help=argparse.SUPPRESS)
    add("--_size", help=argparse.SUPPRESS)
    add("--_result", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def _options(args: argparse.Namespace, dropped: bool) -> Options:
    steps = tuple(s.strip() for s in args.steps.split(",") if s.strip())
    unknown = sorted(set(steps) - set(TIMED_STEPS))
    if unknown:
        raise ValueError(f"--steps: unknown {unknown}; the steps are {', '.join(TIMED_STEPS)}")
    ordered = tuple(s for s in TIMED_STEPS if s in steps)
    python = None
    if any(s in ZARRNII_STEPS for s in ordered):
        python = ensure_zarrnii(Path(args.zarrnii_venv).resolve(), args.zarrnii_python)
    workdir = Path(args.workdir).resolve()
    return Options(workdir, ordered, args.keep, dropped, python)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args._step:
        run_child(args)
        return 0
    try:
        cases = [parse_size(s.strip()) for s in args.sizes.split(",") if s.strip()]
        opts = _options(args, drop_page_cache())
    except (argparse.ArgumentTypeError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except subprocess.CalledProcessError as err:
        print(f"error: could not make zarrnii's environment ({err}); leave its steps out "
              "with --steps", file=sys.stderr)  # fmt: skip
        return 2
    opts.workdir.mkdir(parents=True, exist_ok=True)
    need = sum(12 * math.prod(s) for _, s in cases)
    if shutil.disk_usage(opts.workdir).free < need:
        print(f"warning: about {need / 2**30:.1f} GiB needed in {opts.workdir}", file=sys.stderr)
    results = {}
    for name, shape in cases:
        case = Case(
            name,
            shape,
            opts.workdir / name,
            args.repeat,
            args.in_flight,
            args.input_pyramid,
            args.sigma_um,
        )
        results[name] = run_case(case, opts)
    machine = _machine()
    summary = report(results, machine, opts.dropped)
    if args.json:
        doc = {
            "machine": machine,
            "page_cache_dropped": opts.dropped,
            "sizes": results,
            "settings": _settings(args),
            **summary,
        }
        Path(args.json).write_text(json.dumps(doc, indent=1, default=str))
    return 1 if any(res["failed"] for res in results.values()) else 0


def _settings(args: argparse.Namespace) -> dict[str, Any]:
    return {
        "factors": FACTORS,
        "voxflow_params": {p: voxflow_params(p, args.sigma_um) for p in FACTORS},
        "input_pyramid": args.input_pyramid,
        "in_flight": args.in_flight,
        "repeat": args.repeat,
        "zarrnii": ZARRNII_SPEC,
    }


if __name__ == "__main__":
    sys.exit(main())
