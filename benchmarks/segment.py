"""Labelling benchmark: voxflow's ``label`` against dask-image and SciPy, and the segment chain.

Run ``python benchmarks/segment.py [--sizes small,large] [--workdir DIR] [--json OUT]``.

On synthetic binary masks (seeded spheres, about 10 % foreground, written chunk by chunk as
zarr v3 uint8), each tool reads the mask, labels it and writes uint32 labels to zarr v3 with the
same chunks: voxflow's ``label`` and dask-image's ``ndmeasure.label`` through Dask (same
scheduler, chunks and connectivity), and ``scipy.ndimage.label`` on the whole array where it
fits. An untimed check compares every label image with voxflow's up to renumbering. Then the
segment → count chain runs on the synthetic lightsheet volume and is scored against its truth.
Every measured step runs in a process of its own (``--_step NAME``), so the peak RSS reported
for it is that step's alone; the results go to ``WORKDIR/results.json``.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import math
import os
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from _measure import (
    MiB,
    StepResult,
    add_common_arguments,
    bounded,
    drop_page_cache,
    ensure_venv,
    format_table,
    machine,
    memory_table,
    peak_rss_mib,
    regions,
    run_step,
    stored_bytes,
    targets_table,
    timed,
    ts_open,
    write_result,
)

SIZES = {"small": (256, 512, 512), "large": (512, 2048, 2048)}  # 64 MiB and 2 GiB of uint8
DIMS = ("z", "y", "x")
CHUNKS = (128, 256, 256)
CONNECTIVITY = 26
RANKS = {6: 1, 18: 2, 26: 3}  # connectivity -> rank of scipy's generate_binary_structure
SEED = 20240615
GENERATOR = 1  # bump when the synthetic masks change, so a cached input is regenerated
IN_FLIGHT = 4  # TensorStore reads pending at once in the check
SCIPY_MAX_VOXELS = 2**28  # SciPy runs on the whole array up to here unless --scipy-large
TIMEOUT = 600.0  # seconds a timed run may take before the step reports a lower bound

# The masks: spheres at seeded random places, one lattice of cells over the whole volume, so a
# block is the same whatever the chunking and whichever process draws it.
PITCH = 12  # lattice cell edge (voxels)
SLOTS = 2  # spheres a lattice cell may hold
OCCUPANCY = 0.15  # probability of each slot holding a sphere (about 10 % foreground)
RADIUS = (3.0, 7.0)  # sphere radii, uniform (voxels)

DEMO_SHAPE = (1, 256, 512, 512)  # (C, Z, Y, X) of the end-to-end chain's synthetic volume

# Targets
DASK_IMAGE_SPEEDUP = 2.0  # voxflow at least this many times faster than dask-image
RSS_GROWTH = 1.5  # voxflow's peak RSS at the largest size, as a multiple of the smallest's

# dask-image's label builds a graph that grows with the square of the number of blocks, and
# labels every block again for each later block, under dask 2025.4.0 and later (16 blocks: 698
# calls of scipy.ndimage.label instead of 16). So it runs twice: in voxflow's environment, and
# in an environment of its own that differs only by dask, pinned to the last release before.
PEER_DASK = "2025.3.0"
PEER_SAME = ("dask-image", "zarr", "scipy", "numpy")  # pinned to voxflow's environment's versions

LABEL_STEPS = ("voxflow", "dask_image", "dask_image_pinned", "scipy")
DASK_IMAGE_STEPS = ("dask_image", "dask_image_pinned")
LABELS = {
    "voxflow": "voxflow label + store",
    "dask_image": "dask-image label + store (voxflow's env)",
    "dask_image_pinned": f"dask-image label + store (dask {PEER_DASK} env)",
    "scipy": "scipy.ndimage.label, whole array",
}
OURS = "voxflow"


# --------------------------------------------------------------------------- layout of a run


@dataclass(frozen=True)
class Case:
    """One mask size, where its arrays live and how it is measured."""

    name: str
    shape: tuple[int, int, int]
    root: Path
    chunks: tuple[int, int, int] = CHUNKS
    connectivity: int = CONNECTIVITY
    repeat: int = 3
    in_flight: int = IN_FLIGHT
    processes: bool = False
    timeout: float = TIMEOUT

    @property
    def mask(self) -> Path:
        """The uint8 0/1 zarr v3 array every step reads."""
        return self.root / "mask.zarr"

    def out(self, step: str) -> Path:
        """Where `step` writes its labels."""
        return self.root / f"{step}.zarr"


def parse_size(text: str) -> tuple[str, tuple[int, int, int]]:
    if text in SIZES:
        return text, SIZES[text]
    try:
        shape = tuple(int(v) for v in text.lower().split("x"))
    except ValueError:
        shape = ()
    if len(shape) != 3 or min(shape) < 1:
        raise argparse.ArgumentTypeError(
            f"a size is one of {', '.join(SIZES)} or ZxYxX (e.g. 256x1024x1024); got {text!r}"
        )
    return text.lower(), shape


def parse_chunks(text: str) -> tuple[int, int, int]:
    try:
        chunks = tuple(int(v) for v in text.replace("x", ",").split(","))
    except ValueError:
        chunks = ()
    if len(chunks) != 3 or min(chunks) < 1:
        raise argparse.ArgumentTypeError(
            f"--chunks needs three positive integers (z,y,x), e.g. 128,256,256; got {text!r}"
        )
    return chunks


# --------------------------------------------------------------------------- synthetic masks

_GOLDEN = 0x9E3779B97F4A7C15
_MIX = (0xBF58476D1CE4E5B9, 0x94D049BB133111EB)


def _mix(h: Any) -> Any:
    """SplitMix64's finaliser on a uint64 array: a hash whose bits look independent."""
    import numpy as np

    h = (h ^ (h >> np.uint64(30))) * np.uint64(_MIX[0])
    h = (h ^ (h >> np.uint64(27))) * np.uint64(_MIX[1])
    return h ^ (h >> np.uint64(31))


def _uniforms(keys: Any, n: int) -> list[Any]:
    """`n` uniform [0, 1) draws per key, from a hash chain (no RNG state to share)."""
    import numpy as np

    out, h = [], keys
    for _ in range(n):
        h = _mix(h + np.uint64(_GOLDEN))
        out.append((h >> np.uint64(11)).astype(np.float64) * 2.0**-53)
    return out


def spheres(lo: tuple[int, ...], hi: tuple[int, ...]) -> tuple[Any, Any]:
    """Centres (n, 3) and radii (n,) of every sphere that may reach the box ``[lo, hi)``.

    Sphere ``s`` of lattice cell ``(i, j, k)`` exists with probability `OCCUPANCY`, has its
    centre uniform inside the cell and a radius uniform in `RADIUS`, all drawn from a hash of
    ``(i, j, k, s)`` and `SEED`.
    """
    import numpy as np

    reach = RADIUS[1]
    axes = [
        np.arange(math.floor((a - reach) / PITCH), math.floor((b - 1 + reach) / PITCH) + 1)
        for a, b in zip(lo, hi, strict=True)
    ]
    cells = np.stack([v.ravel() for v in np.meshgrid(*axes, indexing="ij")])
    # Cell indices shifted positive and packed 21 bits an axis.
    packed = [(c + 2**20).astype(np.uint64) for c in cells]
    key = (packed[0] << np.uint64(42)) | (packed[1] << np.uint64(21)) | packed[2]
    centres, radii = [], []
    for slot in range(SLOTS):
        salt = np.uint64(SEED * SLOTS + slot)
        present, *offset, r = _uniforms(_mix(key * np.uint64(SLOTS) + salt), 5)
        keep = present < OCCUPANCY
        centres.append(((cells + np.stack(offset)) * PITCH)[:, keep].T)
        radii.append((RADIUS[0] + (RADIUS[1] - RADIUS[0]) * r)[keep])
    return np.concatenate(centres), np.concatenate(radii)


def mask_block(lo: tuple[int, ...], hi: tuple[int, ...]) -> Any:
    """The mask on the box ``[lo, hi)``: voxels within a sphere's radius of its centre."""
    import numpy as np

    out = np.zeros([b - a for a, b in zip(lo, hi, strict=True)], dtype=bool)
    low, high = np.asarray(lo), np.asarray(hi)
    for centre, r in zip(*spheres(lo, hi), strict=True):
        b0 = np.maximum(np.ceil(centre - r).astype(np.int64), low)
        b1 = np.minimum(np.floor(centre + r).astype(np.int64) + 1, high)
        if np.any(b1 <= b0):
            continue
        d = [(np.arange(b0[k], b1[k]) - centre[k]) ** 2 for k in range(3)]
        inside = d[0][:, None, None] + d[1][None, :, None] + d[2][None, None, :] <= r * r
        out[tuple(slice(a - o, b - o) for a, b, o in zip(b0, b1, lo, strict=True))] |= inside
    return out.view(np.uint8)


def _zarr_meta(case: Case, dtype: str) -> dict[str, Any]:
    """The zarr v3 metadata of a (z, y, x) array of `case` (its chunks, zstd level 3)."""
    return {
        "shape": list(case.shape),
        "data_type": dtype,
        "chunk_grid": {"name": "regular", "configuration": {"chunk_shape": list(case.chunks)}},
        "chunk_key_encoding": {"name": "default"},
        "fill_value": 0,
        "codecs": [{"name": "bytes"}, {"name": "zstd", "configuration": {"level": 3}}],
        "dimension_names": list(DIMS),
    }


def step_input(case: Case) -> dict[str, Any]:
    """Write the mask chunk by chunk, one thread per core (never whole in memory)."""
    from concurrent.futures import ThreadPoolExecutor

    import numpy as np
    import tensorstore as ts

    dst = ts_open(
        case.mask, ts.Context(), metadata=_zarr_meta(case, "uint8"), create=True,
        delete_existing=True,
    )  # fmt: skip

    def make(region: tuple[slice, ...]) -> int:
        block = mask_block(tuple(s.start for s in region), tuple(s.stop for s in region))
        dst[region].write(block).result()
        return int(np.count_nonzero(block))

    with ThreadPoolExecutor(os.cpu_count()) as pool:
        foreground = sum(pool.map(make, regions(case.shape, case.chunks)))
    return {
        "foreground": foreground / math.prod(case.shape),
        "stored_bytes": stored_bytes(case.mask),
    }


# --------------------------------------------------------------------------- measured steps


def _structure(connectivity: int) -> Any:
    from scipy import ndimage

    return ndimage.generate_binary_structure(3, RANKS[connectivity])


def _label_voxflow(mask: Any, connectivity: int) -> tuple[Any, Any]:
    from voxflow.core.label import label

    return label(mask, connectivity)


def _label_dask_image(mask: Any, connectivity: int) -> tuple[Any, Any]:
    from dask_image import ndmeasure

    return ndmeasure.label(mask, structure=_structure(connectivity))


LABELLERS = {
    "voxflow": _label_voxflow,
    "dask_image": _label_dask_image,
    "dask_image_pinned": _label_dask_image,
}


def _create_labels(case: Case, step: str) -> Any:
    """A new uint32 zarr v3 array with the mask's chunks and codecs, for `step`'s labels."""
    import zarr
    from zarr.codecs import ZstdCodec

    return zarr.create_array(
        store=str(case.out(step)), shape=case.shape, chunks=case.chunks, dtype="uint32",
        fill_value=0, compressors=ZstdCodec(level=3), dimension_names=DIMS, overwrite=True,
    )  # fmt: skip


def _dask_labelling(case: Case, step: str) -> dict[str, Any]:
    """Read the mask lazily, label it, store the labels: one ``dask.compute`` for all of it."""
    import dask
    import dask.array as da
    import numpy as np
    import zarr

    mask = da.from_zarr(zarr.open_array(str(case.mask), mode="r"))
    labels, n = LABELLERS[step](mask, case.connectivity)
    store = da.store(labels.astype(np.uint32), _create_labels(case, step), lock=False,
                     compute=False)  # fmt: skip
    _, n = dask.compute(store, n)
    return {"objects": int(n), "label_dtype": str(labels.dtype), "dask_chunks": mask.chunksize,
            "dask": dask.__version__}  # fmt: skip


def _scipy_labelling(case: Case) -> dict[str, Any]:
    """Read the whole mask, label it in memory, write the labels whole."""
    import numpy as np
    import zarr
    from scipy import ndimage

    mask = zarr.open_array(str(case.mask), mode="r")[...]
    labels = np.empty(case.shape, np.uint32)
    n = ndimage.label(mask, _structure(case.connectivity), output=labels)
    _create_labels(case, "scipy")[...] = labels
    return {"objects": int(n), "label_dtype": "uint32"}


def _warm_up(step: str, connectivity: int) -> None:
    """Label a tiny mask once, so imports and compiled kernels load before the clock."""
    import dask
    import dask.array as da
    import numpy as np

    tiny = np.zeros((8, 8, 8), np.uint8)
    tiny[2:6, 2:6, 2:6] = 1
    if step in LABELLERS:
        labels, n = LABELLERS[step](da.from_array(tiny, chunks=4), connectivity)
        dask.compute(labels, n)
    else:
        from scipy import ndimage

        ndimage.label(tiny, _structure(connectivity))


@contextlib.contextmanager
def dask_scheduler(processes: bool) -> Iterator[dict[str, Any]]:
    """The scheduler both Dask tools run on: threads, one per core, or a local cluster.

    Yields a dict that, with a cluster, receives the workers' peak RSS when the block ends.
    """
    import dask

    cores = os.cpu_count() or 1
    about: dict[str, Any] = {}
    if not processes:
        with dask.config.set(scheduler="threads", num_workers=cores):
            yield about
        return
    from distributed import Client, LocalCluster

    with (
        LocalCluster(n_workers=cores, threads_per_worker=1, processes=True,
                     dashboard_address=None) as cluster,
        Client(cluster) as client,
    ):  # fmt: skip
        yield about
        peaks = client.run(peak_rss_mib)
        about["workers_peak_rss_mib"] = sorted(peaks.values())


def write_best(path: str, runs: list[dict[str, Any]], start_rss: float, dropped: bool,
               **extra: Any) -> None:  # fmt: skip
    """Report the fastest of `runs` (as :func:`_measure.timed` returns them) with every time."""
    best = min(runs, key=lambda r: r["seconds"])
    info = {**best["info"], **extra, "runs": [r["seconds"] for r in runs]}
    info.update(cpu_seconds=best["cpu_seconds"], other_cpu_seconds=best["other_cpu_seconds"])
    write_result(path, best["seconds"], start_rss, dropped, **info)


def best_within(
    work: Callable[[], dict[str, Any]],
    prepare: Callable[[], None],
    repeat: int,
    timeout: float,
    report: tuple[str, float],
) -> tuple[list[dict[str, Any]], bool]:
    """:func:`_measure.best_of` with a deadline on every run, for peers that may take hours.

    Past `timeout` seconds the step reports what it knows and its process ends: the runs done
    so far, else `timeout` itself as a lower bound (``timed_out`` in its info). `report` is
    the result file and the RSS before the clock.
    """
    runs: list[dict[str, Any]] = []
    dropped = False

    def expire() -> None:
        path, start_rss = report
        if runs:
            write_best(path, runs, start_rss, dropped, stopped_after_runs=len(runs))
        else:
            write_result(path, timeout, start_rss, dropped, timed_out=True, runs=[timeout],
                         cpu_seconds=None, other_cpu_seconds=None)  # fmt: skip
        os._exit(0)

    for _ in range(repeat):
        prepare()
        dropped = drop_page_cache()
        timer = threading.Timer(timeout, expire)
        timer.daemon = True
        timer.start()
        runs.append(timed(work))
        timer.cancel()
    return runs, dropped


def run_label_step(case: Case, step: str, result_path: str) -> None:
    """Time one labeller `case.repeat` times from a cold cache; report the fastest."""
    _warm_up(step, case.connectivity)
    start_rss = peak_rss_mib()
    dask_tool = step in LABELLERS
    scheduler = dask_scheduler(case.processes) if dask_tool else contextlib.nullcontext({})
    with scheduler as about:

        def work() -> dict[str, Any]:
            return _dask_labelling(case, step) if dask_tool else _scipy_labelling(case)

        def prepare() -> None:
            shutil.rmtree(case.out(step), ignore_errors=True)

        runs, dropped = best_within(
            work, prepare, case.repeat, case.timeout, (result_path, start_rss)
        )
    write_best(result_path, runs, start_rss, dropped, **about)


# --------------------------------------------------------------------------- correctness guard


def _pairs(a: Any, b: Any) -> Any:
    """Distinct (label in a, label in b) pairs over the foreground, packed into uint64."""
    import numpy as np

    fg = a != 0
    return np.unique((a[fg].astype(np.uint64) << np.uint64(32)) | b[fg].astype(np.uint64))


class _Tally:
    """Blockwise accumulation of what the check reports for one labelled array."""

    def __init__(self) -> None:
        self.same_foreground = True
        self.labels: list[Any] = []

    def add(self, labels: Any, mask: Any) -> None:
        import numpy as np

        self.same_foreground &= bool(np.array_equal(labels != 0, mask != 0))
        self.labels.append(np.unique(labels[labels != 0]))

    def distinct(self) -> int:
        import numpy as np

        return len(np.unique(np.concatenate(self.labels))) if self.labels else 0


def _bijective(pairs: list[Any]) -> dict[str, Any]:
    """Whether the label pairs are one to one (equal up to renumbering, given equal masks)."""
    import numpy as np

    both = np.unique(np.concatenate(pairs)) if pairs else np.zeros(0, np.uint64)
    left = len(np.unique(both >> np.uint64(32)))
    right = len(np.unique(both & np.uint64(0xFFFFFFFF)))
    return {"pairs": len(both), "left": left, "right": right,
            "bijection": len(both) == left == right}  # fmt: skip


def step_check(case: Case) -> dict[str, Any]:
    """Compare every written label image with voxflow's, and each with the mask, blockwise."""
    import tensorstore as ts

    ctx = ts.Context()
    tools = [s for s in LABEL_STEPS if (case.out(s) / "zarr.json").exists()]
    arrays = {s: ts_open(case.out(s), ctx) for s in tools}
    arrays["mask"] = ts_open(case.mask, ctx)
    tally = {s: _Tally() for s in tools}
    others = [s for s in tools if s != OURS] if OURS in tools else []
    pairs: dict[str, list[Any]] = {s: [] for s in others}

    def start(region: tuple[slice, ...]) -> Any:
        futures = {k: a[region].read() for k, a in arrays.items()}
        return _Pending(lambda: _check_block({k: f.result() for k, f in futures.items()}))

    def _check_block(block: dict[str, Any]) -> None:
        for s in tools:
            tally[s].add(block[s], block["mask"])
        for s in others:
            pairs[s].append(_pairs(block[OURS], block[s]))

    bounded(start, regions(case.shape, case.chunks), case.in_flight)
    report: dict[str, Any] = {
        s: {"same_foreground_as_mask": t.same_foreground, "distinct_labels": t.distinct()}
        for s, t in tally.items()
    }
    for s in others:
        report[s]["vs_voxflow"] = _bijective(pairs[s])
    return report


class _Pending:
    """A future-like wrapper: ``result()`` runs `finish` once (after the reads it waits on)."""

    def __init__(self, finish: Callable[[], None]) -> None:
        self._finish = finish

    def result(self) -> None:
        self._finish()


# --------------------------------------------------------------------------- end-to-end chain


def step_demo(root: Path) -> dict[str, Any]:
    """Write the synthetic lightsheet volume the chain segments (untimed)."""
    from voxflow.flows.synth import synthesize

    made = synthesize("lightsheet", str(root / "data"), shape=DEMO_SHAPE, seed=0, overwrite=True)
    (root / "data.json").write_text(json.dumps(made))
    return made


def run_chain_step(root: Path, repeat: int, timeout: float, result_path: str) -> None:
    """Time segment → count (with the atlas and region table) on the demo volume; then F1."""
    import dask

    from voxflow.tasks.count import CountParams, count
    from voxflow.tasks.report import read_json, segmentation_figures
    from voxflow.tasks.segment import SegmentParams, segment

    made = json.loads((root / "data.json").read_text())
    run = root / "run"
    start_rss = peak_rss_mib()

    def work() -> dict[str, Any]:
        t0 = time.perf_counter()
        seg = segment(made["image"], str(run), SegmentParams())
        t1 = time.perf_counter()
        counted = count(str(run), CountParams(atlas=made["atlas"], regions=made["regions"]))
        t2 = time.perf_counter()
        return {"segment_seconds": t1 - t0, "count_seconds": t2 - t1, "objects": seg.objects,
                "threshold": seg.threshold, "regions_counted": len(counted.rows)}  # fmt: skip

    def prepare() -> None:
        shutil.rmtree(run, ignore_errors=True)

    with dask.config.set(scheduler="threads", num_workers=os.cpu_count()):
        runs, dropped = best_within(work, prepare, repeat, timeout, (result_path, start_rss))
    figures = segmentation_figures(str(run), read_json(made["ground truth"]))
    figures.pop("region_errors", None)
    write_best(result_path, runs, start_rss, dropped, figures=figures)


# --------------------------------------------------------------------------- step process

IMPORTS = {
    "voxflow": ("dask.array", "numpy", "zarr", "scipy.ndimage", "voxflow.core.label"),
    "dask_image": ("dask.array", "numpy", "zarr", "scipy.ndimage", "dask_image.ndmeasure"),
    "dask_image_pinned": ("dask.array", "numpy", "zarr", "scipy.ndimage", "dask_image.ndmeasure"),
    "scipy": ("numpy", "zarr", "scipy.ndimage"),
    "chain": ("dask.array", "voxflow.tasks.segment", "voxflow.tasks.count"),
}


def _case_from(args: argparse.Namespace) -> Case:
    name, _, spec = args._size.partition("=")
    return Case(
        name, parse_size(spec)[1], Path(args.workdir) / name, parse_chunks(args.chunks),
        args.connectivity, args.repeat, args.in_flight, args.processes, args.timeout,
    )  # fmt: skip


def run_child(args: argparse.Namespace) -> None:
    step = args._step
    for module in IMPORTS.get(step, ()):
        importlib.import_module(module)
    if step == "chain":
        run_chain_step(Path(args.workdir) / "demo", args.repeat, args.timeout, args._result)
        return
    if step == "demo":
        made = step_demo(Path(args.workdir) / "demo")
        write_result(args._result, 0.0, peak_rss_mib(), False, **made)
        return
    case = _case_from(args)
    if step in LABEL_STEPS:
        run_label_step(case, step, args._result)
        return
    t0 = time.perf_counter()
    info = {"input": step_input, "check": step_check}[step](case)
    write_result(args._result, time.perf_counter() - t0, peak_rss_mib(), False, **info)


# --------------------------------------------------------------------------- dask-image's venv


def peer_requirements() -> list[str]:
    """What dask-image's environment holds: dask before the regression, the rest as voxflow's."""
    from importlib.metadata import version

    extra = ["distributed"]  # for --processes
    return [f"dask[array]=={PEER_DASK}", *(f"{p}=={PEER_DASK}" for p in extra),
            *(f"{p}=={version(p)}" for p in PEER_SAME)]  # fmt: skip


def ensure_peer_venv(venv: Path, base_python: str) -> Path:
    """Make dask-image's own virtual environment on first use; return its interpreter."""
    return ensure_venv(venv, base_python, peer_requirements(), name="dask-image")


# --------------------------------------------------------------------------- orchestration


@dataclass(frozen=True)
class Options:
    """What the whole run does, beyond each case."""

    workdir: Path
    steps: tuple[str, ...]
    keep: bool
    scipy_large: bool
    timeout: float
    peer_python: Path | None


def _child_argv(
    case: Case | None, step: str, workdir: Path, repeat: int, timeout: float = TIMEOUT
) -> list[str]:
    argv = [os.path.abspath(__file__), "--_step", step, "--workdir", str(workdir),
            "--repeat", str(repeat), "--timeout", str(timeout)]  # fmt: skip
    if case is None:
        return argv
    argv[-1] = str(case.timeout)
    argv += [
        *("--_size", f"{case.name}={'x'.join(map(str, case.shape))}"),
        *("--chunks", ",".join(map(str, case.chunks))),
        *("--connectivity", str(case.connectivity), "--in-flight", str(case.in_flight)),
    ]
    return argv + (["--processes"] if case.processes else [])


def _ensure_input(case: Case, workdir: Path) -> dict[str, Any]:
    """Write the mask unless an identical one is there from an earlier run."""
    marker = case.root / "input.json"
    want = {"shape": list(case.shape), "chunks": list(case.chunks), "seed": SEED,
            "generator": GENERATOR}  # fmt: skip
    if marker.exists() and (case.mask / "zarr.json").exists():
        have = json.loads(marker.read_text())
        if have.get("key") == want:
            return {**have, "reused": True}
    shutil.rmtree(case.root, ignore_errors=True)
    case.root.mkdir(parents=True)
    print("   writing the mask", flush=True)
    result = run_step("input", _child_argv(case, "input", workdir, 1))
    doc = {"key": want, "seconds": result.seconds, **result.info}
    marker.write_text(json.dumps(doc))
    return {**doc, "reused": False}


def _clean_outputs(case: Case) -> None:
    for step in LABEL_STEPS:
        shutil.rmtree(case.out(step), ignore_errors=True)


def _case_steps(case: Case, opts: Options) -> list[str]:
    scipy_fits = math.prod(case.shape) <= SCIPY_MAX_VOXELS or opts.scipy_large
    return [s for s in opts.steps if s in LABEL_STEPS and (s != "scipy" or scipy_fits)]


def run_case(case: Case, opts: Options) -> dict[str, Any]:
    print(f"\n== {case.name}: {'x'.join(map(str, case.shape))} uint8 mask", flush=True)
    made = _ensure_input(case, opts.workdir)
    _clean_outputs(case)
    steps: dict[str, StepResult] = {}
    failed: dict[str, str] = {}
    for step in _case_steps(case, opts):
        print(f"   {step:<11}", end=" ", flush=True)
        try:
            argv = _child_argv(case, step, opts.workdir, case.repeat)
            python = str(opts.peer_python) if step == "dask_image_pinned" else None
            steps[step] = run_step(step, argv, python=python)
        except RuntimeError as err:
            failed[step] = str(err)
            shutil.rmtree(case.out(step), ignore_errors=True)  # incomplete: not for the check
            print(f"FAILED ({err}; its output is above)", flush=True)
            continue
        print(_progress(steps[step]), flush=True)
        if {"timed_out", "stopped_after_runs"} & steps[step].info.keys():
            shutil.rmtree(case.out(step), ignore_errors=True)  # incomplete: not for the check
    try:
        info = run_step("check", _child_argv(case, "check", opts.workdir, 1)).info
        check = {s: v for s, v in info.items() if s in LABEL_STEPS}
    except RuntimeError as err:
        check, failed["check"] = {}, str(err)
    if not opts.keep:
        _clean_outputs(case)
    return {
        "shape": list(case.shape),
        "chunks": list(case.chunks),
        "connectivity": case.connectivity,
        "repeat": case.repeat,
        "input": made,
        "steps": {k: asdict(v) for k, v in steps.items()},
        "failed": failed,
        "check": check,
        "derived": _derive(steps),
    }


def run_chain(workdir: Path, repeat: int, timeout: float) -> dict[str, Any]:
    """The segment → count chain on the demo volume; a failure is reported, not raised."""
    print(f"\n== chain: segment -> count on the {'x'.join(map(str, DEMO_SHAPE))} demo volume")
    root = workdir / "demo"
    root.mkdir(parents=True, exist_ok=True)
    try:
        if not (root / "data.json").exists():
            print("   writing the demo volume", flush=True)
            run_step("demo", _child_argv(None, "demo", workdir, 1))
        print("   chain      ", end=" ", flush=True)
        result = run_step("chain", _child_argv(None, "chain", workdir, repeat, timeout))
    except RuntimeError as err:
        print(f"FAILED ({err}; its output is above)", flush=True)
        return {"failed": str(err)}
    print(_progress(result), flush=True)
    return {"failed": None, "result": asdict(result)}


def _progress(result: StepResult) -> str:
    if result.info.get("timed_out"):
        return f"stopped after {result.seconds:.0f} s (--timeout): its time is a lower bound"
    return f"best {result.seconds:.2f} s of {', '.join(f'{t:.2f}' for t in result.info['runs'])}"


def _derive(steps: dict[str, StepResult]) -> dict[str, Any]:
    """Time ratios; a peer stopped by the timeout gives a lower bound, voxflow stopped none."""
    t = {k: v.seconds for k, v in steps.items()}
    stopped = {k for k, v in steps.items() if v.info.get("timed_out")}

    def ratio(a: str, b: str) -> float | None:
        return t[a] / t[b] if a in t and b in t and b not in stopped else None

    peers = [s for s in DASK_IMAGE_STEPS if s in t]
    best = min(peers, key=t.__getitem__) if peers else None
    return {
        # The faster dask-image is the one to beat; a stopped one's time is a lower bound.
        "best_dask_image_vs_voxflow": ratio(best, "voxflow") if best else None,
        "dask_image_best": best,
        **{f"{s}_vs_voxflow": ratio(s, "voxflow") for s in peers},
        "voxflow_vs_scipy": ratio("voxflow", "scipy"),
        "stopped": sorted(stopped),
    }


# --------------------------------------------------------------------------- report


def _fmt(value: float | None, spec: str = ".2f", suffix: str = "") -> str:
    return "n/a" if value is None else f"{value:{spec}}{suffix}"


def _case_table(res: dict[str, Any]) -> str:
    voxels = math.prod(res["shape"])
    ours = res["steps"].get(OURS, {}).get("seconds")
    rows = []
    for step in LABEL_STEPS:
        if step in res["failed"]:
            rows.append([LABELS[step], "failed", *[""] * 8])
            continue
        if step not in res["steps"]:
            continue
        s, info = res["steps"][step], res["steps"][step]["info"]
        more, less = (">", "<") if info.get("timed_out") else ("", "")
        rows.append(
            [
                LABELS[step],
                f"{more}{s['seconds']:.2f}",
                more + _fmt(s["seconds"] / ours if ours else None, suffix="x"),
                f"{less}{voxels / s['seconds'] / 1e6:.0f}",
                _fmt(info["cpu_seconds"]),
                _fmt(info["other_cpu_seconds"]),
                f"{s['start_rss_mib']:.0f}",
                f"{more}{s['peak_rss_mib']:.0f}",
                f"{more}{s['peak_rss_mib'] - s['start_rss_mib']:.0f}",
                str(info.get("objects", "n/a")),
            ]
        )
    headers = ["step", "seconds", "x voxflow", "Mvoxel/s", "CPU s", "others' CPU s",
               "RSS start MiB", "peak RSS MiB", "peak - start", "objects"]  # fmt: skip
    return format_table(headers, rows)


def _check_lines(res: dict[str, Any]) -> list[str]:
    lines = []
    for step, c in res["check"].items():
        line = (
            f"   check {step}: foreground equals the mask: {c['same_foreground_as_mask']}; "
            f"distinct labels {c['distinct_labels']}"
        )
        if "vs_voxflow" in c:
            v = c["vs_voxflow"]
            line += (
                f"; vs voxflow: {v['pairs']} label pairs, {v['left']} voxflow labels, "
                f"{v['right']} {step} labels -> equal up to renumbering: {v['bijection']}"
            )
        lines.append(line)
    return lines


def _case_header(name: str, res: dict[str, Any]) -> str:
    made = res["input"]
    how = "reused" if made["reused"] else f"written in {made['seconds']:.1f} s"
    shape = "x".join(map(str, res["shape"]))
    chunks = "x".join(map(str, res["chunks"]))
    return (
        f"\n[{name}] {shape} uint8 mask, {math.prod(res['shape']) / MiB:.0f} MiB, stored "
        f"{made['stored_bytes'] / MiB:.0f} MiB (zstd 3), {made['foreground']:.1%} foreground; "
        f"chunks {chunks} for every tool, connectivity {res['connectivity']}; mask {how}; best "
        f"of {res['repeat']} cold runs per step"
    )


def _rule_speedup(res: dict[str, Any]) -> tuple[bool | None, str]:
    value = res["derived"]["best_dask_image_vs_voxflow"]
    if value is None:
        return None, "n/a"
    best = res["derived"]["dask_image_best"]
    env = "voxflow's env" if best == "dask_image" else f"dask {PEER_DASK} env"
    if best in res["derived"]["stopped"]:
        # A lower bound decides only when it already clears the target.
        ok = True if value >= DASK_IMAGE_SPEEDUP else None
        return ok, f"> {value:.2f}x, {env} stopped by --timeout"
    return value >= DASK_IMAGE_SPEEDUP, f"{value:.2f}x, {env}"


def _rule_objects(res: dict[str, Any]) -> tuple[bool | None, str]:
    counts = {s: v["info"]["objects"] for s, v in res["steps"].items() if "objects" in v["info"]}
    if len(counts) < 2:
        return None, "n/a"
    return len(set(counts.values())) == 1, " / ".join(f"{s} {n}" for s, n in counts.items())


def _rule_renumbering(res: dict[str, Any]) -> tuple[bool | None, str]:
    compared = {s: c["vs_voxflow"]["bijection"] for s, c in res["check"].items()
                if "vs_voxflow" in c}  # fmt: skip
    fg = all(c["same_foreground_as_mask"] for c in res["check"].values())
    if not compared:
        return None, "n/a"
    ok = fg and all(compared.values())
    return ok, ", ".join(f"{s} {'=' if v else '!='}" for s, v in compared.items())


TARGET_RULES: list[tuple[str, Callable[[dict[str, Any]], tuple[bool | None, str]]]] = [
    (f"voxflow >= {DASK_IMAGE_SPEEDUP:g}x faster than the faster dask-image", _rule_speedup),
    ("object counts equal (guard)", _rule_objects),
    ("labels equal voxflow's up to renumbering (guard)", _rule_renumbering),
]


def _chain_lines(chain: dict[str, Any] | None) -> list[str]:
    if chain is None:
        return []
    head = f"\nend-to-end chain on the {'x'.join(map(str, DEMO_SHAPE))} synthetic lightsheet volume"
    if chain["failed"]:
        return [head, f"   FAILED: {chain['failed']} (its traceback is above)"]
    r = chain["result"]
    if r["info"].get("timed_out"):
        return [head, f"   stopped after {r['seconds']:.0f} s (--timeout)"]
    info, fig = r["info"], r["info"]["figures"]
    rows = [[
        "segment -> count", f"{info['segment_seconds']:.2f}", f"{info['count_seconds']:.2f}",
        f"{r['seconds']:.2f}", f"{info['cpu_seconds']:.2f}", f"{info['other_cpu_seconds']:.2f}",
        f"{r['peak_rss_mib']:.0f}", str(info["objects"]), f"{fig['f1']:.3f}",
    ]]  # fmt: skip
    headers = ["chain", "segment s", "count s", "total s", "CPU s", "others' CPU s",
               "peak RSS MiB", "objects", "F1"]  # fmt: skip
    extra = ", ".join(
        f"{k} {v:.0f}" if float(v).is_integer() else f"{k} {v:.4g}"
        for k, v in fig.items()
        if isinstance(v, (int, float))
    )
    runs = ", ".join(f"{t:.2f}" for t in info["runs"])
    return [
        head,
        format_table(headers, rows),
        f"   figures: {extra}",
        f"   best of {len(info['runs'])} runs: {runs}",
    ]


def _machine() -> dict[str, Any]:
    return machine(("voxflow", "dask", "dask-image", "scipy", "numpy", "zarr", "tensorstore"))


def _scheduler_line(processes: bool) -> str:
    cores = os.cpu_count()
    if processes:
        return (
            f"scheduler: a local distributed cluster of {cores} single-threaded worker "
            "processes, for voxflow and dask-image alike (a step's peak RSS is the largest of "
            "its process and its workers, whose own peaks are in the JSON; its CPU s counts "
            "its own process only, the workers' shows under others' CPU s)"
        )
    return (
        f"scheduler: Dask's threaded scheduler with num_workers={cores} (the machine's cores), "
        "for voxflow and dask-image alike (in both environments); every Dask tool reads the mask "
        "with dask.array.from_zarr in its stored chunks and stores uint32 labels with da.store "
        "into a zarr v3 array of the same chunks and codec"
    )


def report(results: dict[str, dict[str, Any]], chain: dict[str, Any] | None,
           machine: dict[str, Any], opts: dict[str, Any]) -> dict:  # fmt: skip
    print("\n" + "=" * 100)
    print("machine: " + ", ".join(f"{k} {v}" for k, v in machine.items()))
    print(_scheduler_line(opts["processes"]))
    if opts["dropped"]:
        print("page cache: dropped before every timed run, so every run reads from disk")
    else:
        print("page cache: could not be dropped (needs root); runs read from a warm cache")
    print(f"peak RSS of the orchestrating process: {peak_rss_mib():.0f} MiB")
    for name, res in results.items():
        print(_case_header(name, res))
        print(_case_table(res))
        d = res["derived"]
        peers = ", ".join(f"{LABELS[s].split('(')[1][:-1]} {'>' if s in d['stopped'] else ''}"
                          f"{_fmt(d.get(f'{s}_vs_voxflow'), suffix='x')}"
                          for s in DASK_IMAGE_STEPS)  # fmt: skip
        print(f"   dask-image / voxflow: {peers}; voxflow / scipy: "
              f"{_fmt(d['voxflow_vs_scipy'], suffix='x')}")  # fmt: skip
        print("\n".join(_check_lines(res)))
        for step, err in res["failed"].items():
            print(f"   FAILED {step}: {err}")
    print("\n".join(_chain_lines(chain)))
    doc: dict[str, Any] = {}
    if results:
        table, doc["targets"] = targets_table(results, TARGET_RULES)
        print("\ntargets\n" + table)
        mem_table, doc["memory"] = memory_table(
            results, LABEL_STEPS, LABELS, lambda step: step == OURS, RSS_GROWTH
        )
        print("\n" + mem_table)
        for name, res in results.items():
            for step in res["derived"]["stopped"]:
                print(f"   {LABELS[step]} at {name} was stopped by --timeout: its time and peak "
                      "RSS are lower bounds")  # fmt: skip
    return doc


# --------------------------------------------------------------------------- entry point

ALL_STEPS = (*LABEL_STEPS, "chain")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], conflict_handler="resolve"
    )
    add_common_arguments(
        parser, "voxflow-bench-segment", IN_FLIGHT, "TensorStore reads pending at once in the check"
    )
    add = parser.add_argument
    add(
        "--sizes",
        default="small,large",
        help="comma-separated sizes: small (256x512x512), large (512x2048x2048, 2 GiB) or ZxYxX",
    )
    add("--chunks", default=",".join(map(str, CHUNKS)), help="chunks (z,y,x) for every tool")
    add(
        "--connectivity",
        type=int,
        choices=sorted(RANKS),
        default=CONNECTIVITY,
        help="voxel neighbourhood of an object, the same for every tool",
    )
    add(
        "--steps",
        default=",".join(ALL_STEPS),
        help=f"comma-separated steps to run, of: {', '.join(ALL_STEPS)}",
    )
    add(
        "--scipy-large",
        action="store_true",
        help=f"also run SciPy on masks of more than {SCIPY_MAX_VOXELS} voxels (5 bytes a voxel)",
    )
    add(
        "--processes",
        action="store_true",
        help="run both Dask tools on a local distributed cluster instead of threads",
    )
    add(
        "--timeout",
        type=float,
        default=TIMEOUT,
        help="seconds a timed run may take; a step past it reports the time as a lower bound",
    )
    add(
        "--dask-image-venv",
        help=f"dask-image's own environment, with dask {PEER_DASK} (made on first use; default: "
        "WORKDIR/dask-image-venv)",
    )
    add(
        "--dask-image-python",
        default=shutil.which("python3.11") or sys._base_executable,
        help="the interpreter that environment is made from",
    )
    add("--_step", help=argparse.SUPPRESS)
    add("--_size", help=argparse.SUPPRESS)
    add("--_result", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def _options(args: argparse.Namespace) -> Options:
    steps = tuple(s.strip() for s in args.steps.split(",") if s.strip())
    unknown = sorted(set(steps) - set(ALL_STEPS))
    if unknown:
        raise ValueError(f"--steps: unknown {unknown}; the steps are {', '.join(ALL_STEPS)}")
    ordered = tuple(s for s in ALL_STEPS if s in steps)
    if not args.timeout > 0:
        raise ValueError(f"--timeout must be a positive number of seconds, got {args.timeout}")
    workdir = Path(args.workdir).resolve()
    peer = None
    if "dask_image_pinned" in ordered:
        venv = Path(args.dask_image_venv or workdir / "dask-image-venv").resolve()
        peer = ensure_peer_venv(venv, args.dask_image_python)
    return Options(workdir, ordered, args.keep, args.scipy_large, args.timeout, peer)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args._step:
        run_child(args)
        return 0
    try:
        cases = [parse_size(s.strip()) for s in args.sizes.split(",") if s.strip()]
        chunks = parse_chunks(args.chunks)
        opts = _options(args)
    except (argparse.ArgumentTypeError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except subprocess.CalledProcessError as err:
        print(f"error: could not make dask-image's environment ({err}); leave its step out "
              "with --steps", file=sys.stderr)  # fmt: skip
        return 2
    opts.workdir.mkdir(parents=True, exist_ok=True)
    need = sum(10 * math.prod(s) for _, s in cases)
    if shutil.disk_usage(opts.workdir).free < need:
        print(f"warning: about {need / 2**30:.1f} GiB needed in {opts.workdir}", file=sys.stderr)
    dropped = drop_page_cache()
    results = {}
    for name, shape in cases:
        case = Case(name, shape, opts.workdir / name, chunks, args.connectivity, args.repeat,
                    args.in_flight, args.processes, opts.timeout)  # fmt: skip
        if any(s in LABEL_STEPS for s in opts.steps):
            results[name] = run_case(case, opts)
    chain = run_chain(opts.workdir, args.repeat, opts.timeout) if "chain" in opts.steps else None
    machine = _machine()
    settings = {"processes": args.processes, "dropped": dropped}
    summary = report(results, chain, machine, settings)
    doc = {"machine": machine, "page_cache_dropped": dropped, "sizes": results, "chain": chain,
           "settings": _settings(args), **summary}  # fmt: skip
    for path in {opts.workdir / "results.json", *([Path(args.json)] if args.json else [])}:
        path.write_text(json.dumps(doc, indent=1, default=str))
    print(f"\nresults: {opts.workdir / 'results.json'}")
    failed = any(res["failed"] for res in results.values()) or bool(chain and chain["failed"])
    return 1 if failed else 0


def _settings(args: argparse.Namespace) -> dict[str, Any]:
    return {
        "chunks": args.chunks,
        "connectivity": args.connectivity,
        "repeat": args.repeat,
        "processes": args.processes,
        "scipy_large": args.scipy_large,
        "timeout": args.timeout,
        "scheduler": "distributed LocalCluster" if args.processes else "threads",
        "num_workers": os.cpu_count(),
        "mask": {
            "pitch": PITCH,
            "slots": SLOTS,
            "occupancy": OCCUPANCY,
            "radius": RADIUS,
            "seed": SEED,
        },
        "demo_shape": DEMO_SHAPE,
    }


if __name__ == "__main__":
    sys.exit(main())
