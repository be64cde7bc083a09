"""Blockwise prediction of a 3-D volume with a torch model, seam-free for a bounded receptive field.

Each Dask block is extended by a halo (``map_overlap``: its neighbours' voxels, zeros beyond the
array edge), cut into overlapping tiles of one fixed size, run through the model in batches,
and stitched from the tile centres. When the model's receptive field reaches no further than
the halo, every output voxel sees exactly the input the whole zero-padded volume would show it,
so the result does not depend on the chunking nor on the tile size.

The model travels once: a model spec (a TorchScript path or ``"package.module:factory"``) is
loaded at most once per process and device; a module instance is one entry of the Dask graph.
"""

from __future__ import annotations

import copy
import importlib
import itertools
import os
import re
import threading
import uuid
import weakref
from collections.abc import Sequence
from pathlib import Path

import dask
import dask.array as da
import numpy as np
import torch

from voxflow.core._validate import validate_int as _validate_int

__all__ = ["gpu_resource", "load_model", "predict", "resolve_device"]

_FACTORY_SPEC = re.compile(r"[A-Za-z_][\w.]*:[A-Za-z_][\w.]*")
_DEVICE_SPEC = re.compile(r"(auto|cpu|mps|cuda(:\d+)?)")
_PRECISIONS = {"float32": None, "float16": torch.float16, "bfloat16": torch.bfloat16}
_NDIM = 3
# A default tile is the block with its halo, but no larger than this (or 4 halos) per axis.
_MAX_DEFAULT_TILE = 128

_CACHE_LOCK = threading.Lock()
# (spec, device) -> the model loaded from a spec; module -> {device: its copy on that device}.
_SPEC_MODELS: dict[tuple[str, str], torch.nn.Module] = {}
_DEVICE_COPIES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


# --------------------------------------------------------------------------- model and device


def _load_factory(spec: str) -> torch.nn.Module:
    module_name, _, attr = spec.partition(":")
    try:
        factory = importlib.import_module(module_name)
        for part in attr.split("."):
            factory = getattr(factory, part)
    except (ImportError, AttributeError) as err:
        raise ValueError(f"`model` {spec!r}: cannot import the factory ({err})") from err
    if not callable(factory):
        raise ValueError(f"`model` {spec!r} names {type(factory).__name__}, not a factory")
    model = factory()
    if not isinstance(model, torch.nn.Module):
        raise ValueError(
            f"`model` {spec!r}: the factory must return a torch.nn.Module, "
            f"got {type(model).__name__}"
        )
    return model


def _load_torchscript(path: Path, spec: object) -> torch.nn.Module:
    if not path.is_file():
        raise ValueError(f"`model` {str(spec)!r}: no such TorchScript file")
    try:
        return torch.jit.load(str(path), map_location="cpu")
    except Exception as err:  # torch raises RuntimeError, ValueError or pickle errors
        raise ValueError(f"`model` {str(spec)!r} is not a TorchScript file: {err}") from err


def load_model(spec: str | os.PathLike | torch.nn.Module) -> torch.nn.Module:
    """A torch model in evaluation mode, from a file, a factory or as given.

    Parameters
    ----------
    spec : str, os.PathLike or torch.nn.Module
        A path to a TorchScript file (loaded onto the CPU); ``"package.module:factory"``, a
        callable imported and called without arguments that returns a module; or a module,
        returned as is.

    Returns
    -------
    torch.nn.Module
        The model, switched to evaluation mode (a module given is switched in place).

    Raises
    ------
    ValueError
        When the file is missing or not TorchScript, the factory cannot be imported, or it
        returns something other than a module.
    """
    if isinstance(spec, torch.nn.Module):
        model = spec
    elif isinstance(spec, os.PathLike):
        model = _load_torchscript(Path(spec), spec)
    elif isinstance(spec, str):
        path = Path(spec)
        if _FACTORY_SPEC.fullmatch(spec) and not path.exists():
            model = _load_factory(spec)
        else:
            model = _load_torchscript(path, spec)
    else:
        raise TypeError(
            "`model` must be a TorchScript path, a 'package.module:factory' string or a "
            f"torch.nn.Module, got {type(spec).__name__}"
        )
    return model.eval()


def _validate_device_name(device: object) -> str:
    """A device string of a known kind; None means 'auto'."""
    if device is None:
        return "auto"
    if isinstance(device, torch.device):
        device = str(device)
    if not isinstance(device, str):
        raise TypeError(f"`device` must be a string or None, got {type(device).__name__}")
    if not _DEVICE_SPEC.fullmatch(device):
        raise ValueError(
            f"`device` must be 'auto', 'cpu', 'cuda', 'cuda:<index>' or 'mps', got {device!r}"
        )
    return device


def _mps_available() -> bool:
    mps = getattr(torch.backends, "mps", None)
    return bool(mps is not None and mps.is_available())


def resolve_device(device: str | None = None) -> torch.device:
    """The torch device to run on, checked to be available here.

    Parameters
    ----------
    device : {None, 'auto', 'cpu', 'cuda', 'cuda:<index>', 'mps'}, optional
        None or 'auto': CUDA when available, then MPS, then the CPU.

    Returns
    -------
    torch.device

    Raises
    ------
    ValueError
        For an unknown device, or one this machine does not have.
    """
    name = _validate_device_name(device)
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        return torch.device("mps" if _mps_available() else "cpu")
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ValueError(f"`device` {name!r}: CUDA is not available on this machine")
        index = int(name.partition(":")[2] or 0)
        if index >= torch.cuda.device_count():
            raise ValueError(
                f"`device` {name!r}: this machine has {torch.cuda.device_count()} CUDA devices"
            )
    if name == "mps" and not _mps_available():
        raise ValueError("`device` 'mps': MPS is not available on this machine")
    return torch.device(name)


def gpu_resource(device: str | None = None) -> dict[str, int]:
    """Dask worker resources a prediction on `device` needs.

    Parameters
    ----------
    device : str, optional
        As for :func:`resolve_device`.

    Returns
    -------
    dict
        ``{"GPU": 1}`` when `device` resolves to CUDA, else ``{}``; for
        ``dask.annotate(resources=...)``.
    """
    return {"GPU": 1} if resolve_device(device).type == "cuda" else {}


def _spec_model(spec: str, device: torch.device) -> torch.nn.Module:
    """The model of `spec` on `device`, loaded once per process."""
    key = (spec, str(device))
    with _CACHE_LOCK:
        if key not in _SPEC_MODELS:
            _SPEC_MODELS[key] = load_model(spec).to(device)
        return _SPEC_MODELS[key]


def _on_device(tensor: torch.Tensor, device: torch.device) -> bool:
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return tensor.device == device


def _module_on(model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """`model` itself when it already lives on `device`, else one cached copy there."""
    tensors = itertools.chain(model.parameters(), model.buffers())
    if all(_on_device(t, device) for t in tensors):
        return model
    with _CACHE_LOCK:
        copies = _DEVICE_COPIES.setdefault(model, {})
        if str(device) not in copies:
            copies[str(device)] = copy.deepcopy(model).to(device).eval()
        return copies[str(device)]


# --------------------------------------------------------------------------- tiles


def _tile_origins(extended: tuple[int, ...], tile: tuple[int, ...], halo: int) -> list[tuple]:
    """Tile starts (in the extended block) whose centres cover the block's core."""
    axes = [range(0, n - 2 * halo, t - 2 * halo) for n, t in zip(extended, tile, strict=True)]
    return list(itertools.product(*axes))


def _cut_tile(block: np.ndarray, origin: tuple[int, ...], tile: tuple[int, ...]) -> np.ndarray:
    """The tile at `origin`, zero-padded where it runs past the extended block."""
    piece = block[tuple(slice(o, o + t) for o, t in zip(origin, tile, strict=True))]
    pad = [(0, t - n) for n, t in zip(piece.shape, tile, strict=True)]
    return np.pad(piece, pad) if any(p for _, p in pad) else piece


def _run_batch(
    net: torch.nn.Module, tiles: list[np.ndarray], device: torch.device, precision
) -> np.ndarray:
    """Model output for a batch of tiles, shape ``(N, Z, Y, X)`` float32."""
    batch = torch.from_numpy(np.stack(tiles)[:, None]).to(device)
    with torch.inference_mode():
        if precision is None:
            out = net(batch)
        else:
            with torch.autocast(device_type=device.type, dtype=precision):
                out = net(batch)
    expected = (len(tiles), *tiles[0].shape)
    shape = tuple(getattr(out, "shape", ()))
    if shape not in (expected, (expected[0], 1, *expected[1:])):
        raise ValueError(
            f"model returned shape {shape}, expected {(expected[0], 1, *expected[1:])} "
            f"or {expected}"
        )
    return out.reshape(expected).float().cpu().numpy()


def _predict_tiles(
    block: np.ndarray,
    net: torch.nn.Module,
    device: torch.device,
    tile: tuple[int, ...],
    halo: int,
    batch_size: int,
    precision: str,
) -> np.ndarray:
    """Prediction for the core of a float32 block extended by `halo` on every side."""
    core = tuple(n - 2 * halo for n in block.shape)
    out = np.empty(core, np.float32)
    origins = _tile_origins(block.shape, tile, halo)
    for start in range(0, len(origins), batch_size):
        batch = origins[start : start + batch_size]
        tiles = [_cut_tile(block, o, tile) for o in batch]
        pred = _run_batch(net, tiles, device, _PRECISIONS[precision])
        for origin, p in zip(batch, pred, strict=True):
            # The centre of the tile, clipped to the core.
            dst = tuple(
                slice(o, min(o + t - 2 * halo, c))
                for o, t, c in zip(origin, tile, core, strict=True)
            )
            out[dst] = p[tuple(slice(halo, halo + s.stop - s.start) for s in dst)]
    return out


def _predict_block(
    block: np.ndarray,
    model: torch.nn.Module | None,
    *,
    spec: str | None,
    device: str,
    tile: tuple[int, ...],
    halo: int,
    block_depth: tuple[int, ...],
    batch_size: int,
    precision: str,
) -> np.ndarray:
    """Prediction for one block extended by `block_depth`; the margins are zeros, for trimming."""
    where = resolve_device(device)
    net = _spec_model(spec, where) if model is None else _module_on(model, where)
    # An axis shorter than the halo gets a smaller depth; past the array everything is zero.
    extended = np.pad(block.astype(np.float32), [(halo - d, halo - d) for d in block_depth])
    core = _predict_tiles(extended, net, where, tile, halo, batch_size, precision)
    return np.pad(core, [(d, d) for d in block_depth])


# --------------------------------------------------------------------------- public API


def _validate_volume(image: object) -> da.Array:
    if not isinstance(image, np.ndarray | da.Array):
        raise TypeError(f"`image` must be a NumPy or Dask array, got {type(image).__name__}")
    if image.dtype.kind not in "iuf":
        raise TypeError(f"`image` must hold integers or floats, got dtype {image.dtype}")
    if image.ndim != _NDIM:
        raise ValueError(f"`image` must be 3-D (z, y, x), got shape {image.shape}")
    return image if isinstance(image, da.Array) else da.asarray(image)


def _validate_tile(tile: object, halo: int, chunks: tuple[tuple[int, ...], ...]) -> tuple:
    """One tile size per axis, each larger than two halos; None derives it from the chunks."""
    if tile is None:
        cap = max(_MAX_DEFAULT_TILE, 4 * halo)
        return tuple(min(max(c) + 2 * halo, cap) for c in chunks)
    if isinstance(tile, Sequence) and not isinstance(tile, str | bytes):
        if len(tile) != _NDIM:
            raise ValueError(f"`tile` needs one size per axis ({_NDIM}), got {tuple(tile)}")
        sizes = tuple(tile)
    else:
        sizes = (tile,) * _NDIM
    sizes = tuple(_validate_int(t, "tile", 1) for t in sizes)
    if min(sizes) <= 2 * halo:
        raise ValueError(f"`tile` must exceed 2 * halo ({2 * halo}) on every axis, got {tile!r}")
    return sizes


def _validate_precision(dtype: object) -> str:
    """The name of the precision the model computes in."""
    if isinstance(dtype, torch.dtype):
        dtype = str(dtype).removeprefix("torch.")
    elif isinstance(dtype, type | np.dtype):
        dtype = np.dtype(dtype).name
    if not isinstance(dtype, str):
        raise TypeError(f"`dtype` must be a string, got {type(dtype).__name__}")
    if dtype not in _PRECISIONS:
        choices = ", ".join(map(repr, _PRECISIONS))
        raise ValueError(f"`dtype` must be one of {choices}, got {dtype!r}")
    return dtype


def _model_in_graph(model: object) -> tuple[object, str | None]:
    """A module as one graph entry, or a spec for the workers to load."""
    if isinstance(model, str | os.PathLike):
        spec = os.fspath(model)
        if not (_FACTORY_SPEC.fullmatch(spec) and not Path(spec).exists()):
            # Workers may run elsewhere in the file system.
            spec = str(Path(spec).absolute())
        # Fails here rather than on every worker; the CPU copy serves the threaded scheduler.
        _spec_model(spec, torch.device("cpu"))
        return None, spec
    module = load_model(model)
    return dask.delayed(module, name=f"torch-model-{uuid.uuid4().hex}"), None


def predict(
    image,
    model,
    *,
    halo: int = 16,
    tile: int | Sequence[int] | None = None,
    batch_size: int = 4,
    device: str | None = None,
    dtype: str = "float32",
) -> da.Array:
    """Model output for a 3-D volume, blockwise and in overlapping tiles.

    Parameters
    ----------
    image : numpy.ndarray or dask.array.Array, shape (Z, Y, X)
        Integers or floats; the model sees them as float32.
    model : str, os.PathLike or torch.nn.Module
        Anything :func:`load_model` accepts. It maps ``(N, 1, Z, Y, X)`` float32 to
        ``(N, 1, Z, Y, X)`` or ``(N, Z, Y, X)``. A spec is loaded once per worker process and
        device; a module is sent once, as one entry of the Dask graph.
    halo : int, optional
        Context voxels each side of a block (from its neighbours, zeros beyond the array) and
        of a tile. When the model's receptive field reaches no further than `halo` voxels, the
        result equals the model on the whole zero-padded volume, for any chunking and tile.
    tile : int or sequence of 3 int, optional
        Size of the tiles the model sees, halo included; larger than ``2 * halo`` per axis.
        Tiles overlap by ``2 * halo``; those running past a block are zero-padded, so every
        tile has this size. None: the largest chunk plus two halos, at most
        ``max(128, 4 * halo)`` per axis.
    batch_size : int, optional
        Tiles per model call.
    device : {None, 'auto', 'cpu', 'cuda', 'cuda:<index>', 'mps'}, optional
        Where the model runs, resolved on each worker (see :func:`resolve_device`); pair a
        CUDA device with ``dask.annotate(resources=gpu_resource(device))``.
    dtype : {'float32', 'float16', 'bfloat16'}, optional
        Precision the model computes in: 'float32' plainly, the others under
        :func:`torch.autocast`. The result is float32 in any case.

    Returns
    -------
    dask.array.Array of float32
        Same shape and chunks as `image` (a NumPy image gives Dask's automatic chunks).

    Raises
    ------
    ValueError
        At compute time, when the model returns another shape.
    """
    volume = _validate_volume(image)
    halo = _validate_int(halo, "halo", 0)
    tile = _validate_tile(tile, halo, volume.chunks)
    batch_size = _validate_int(batch_size, "batch_size", 1)
    device = _validate_device_name(device)
    precision = _validate_precision(dtype)
    module, spec = _model_in_graph(model)
    # map_overlap reads no further than the array is long.
    depth = tuple(min(halo, n) for n in volume.shape)
    out = volume.map_overlap(
        _predict_block,
        depth=depth,
        boundary=0,
        dtype=np.float32,
        model=module,
        spec=spec,
        device=device,
        tile=tile,
        halo=halo,
        block_depth=depth,
        batch_size=batch_size,
        precision=precision,
    )
    # map_overlap merges chunks thinner than the halo; the result keeps the image's chunks.
    return out if out.chunks == volume.chunks else out.rechunk(volume.chunks)
