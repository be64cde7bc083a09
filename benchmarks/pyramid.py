"""Multiscale pyramid benchmark: voxflow against the I/O floor, TensorStore and Dask.

Run ``python benchmarks/pyramid.py [--sizes small,large] [--workdir DIR] [--json OUT]``; see
``benchmarks/README.md`` for what each row means. Every measured step runs in a process of
its own (``--_step NAME``), so the peak RSS reported for it is that step's alone.
"""

from __future__ import annotations

import argparse
import importlib
import json
import math
import os
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from _measure import (
    MiB,
    StepResult,
    add_common_arguments,
    bounded,
    codec_label,
    cpu_seconds,
    drop_page_cache,
    format_table,
    machine,
    machine_busy_seconds,
    memory_table,
    peak_rss_mib,
    regions,
    run_step,
    stored_bytes,
    targets_table,
    ts_copy_meta,
    ts_open,
    write_result,
)

SIZES = {"small": (256, 512, 512), "large": (1024, 1024, 1024)}
DIMS = "zyx"
SCALE = (1.0, 1.0, 1.0)  # isotropic: every level halves each axis still above MIN_SIZE
MIN_SIZE = 64
SEED = 20240601
# Bump when the synthetic data or voxflow's default layout change, so a cached input is made
# again (2: blosc zstd level 2).
GENERATOR = 2
IN_FLIGHT = 4  # TensorStore operations pending at once in the floors and the baseline
TIMED_STEPS = ("read", "copy", "voxflow_in_place", "voxflow_new", "tensorstore", "dask")
LABELS = {
    "read": "read floor (decode level 0)",
    "copy": "copy floor (decode + encode level 0)",
    "voxflow_in_place": "voxflow in place (levels >= 1)",
    "voxflow_new": "voxflow new OME-Zarr (all levels)",
    "tensorstore": "TensorStore downsample (levels >= 1)",
    "dask": "Dask coarsen + to_zarr (levels >= 1)",
}
RSS_GROWTH = 1.5  # largest peak RSS allowed for the large case, as a multiple of the small's


# --------------------------------------------------------------------------- layout of a run


@dataclass(frozen=True)
class Case:
    """One volume size, where its arrays live and how it is measured."""

    name: str
    shape: tuple[int, int, int]
    root: Path
    in_flight: int = IN_FLIGHT
    repeat: int = 3

    @property
    def input(self) -> Path:
        """The level-0 OME-Zarr every step reads."""
        return self.root / "input.ome.zarr"

    def out(self, step: str) -> Path:
        """Where `step` writes."""
        return self.root / f"{step}.zarr"

    @property
    def plan_file(self) -> Path:
        """The levels every tool makes (JSON, written by the ``plan`` step)."""
        return self.root / "plan.json"

    def plan(self) -> dict[str, Any]:
        """Shape, factors, chunks and shards of every level, level 0 first."""
        return json.loads(self.plan_file.read_text())


def parse_size(text: str) -> tuple[str, tuple[int, int, int]]:
    if text in SIZES:
        return text, SIZES[text]
    try:
        shape = tuple(int(v) for v in text.lower().split("x"))
    except ValueError:
        shape = ()
    if len(shape) != 3 or min(shape) < 1 or not all(map(_halves_evenly, shape)):
        raise argparse.ArgumentTypeError(
            f"a size is one of {', '.join(SIZES)} or ZxYxX with every axis halving evenly down "
            f"to {MIN_SIZE} or below, so the Dask baseline can coarsen it (e.g. 512x768x1024); "
            f"got {text!r}"
        )
    return text.lower(), shape


def _halves_evenly(n: int) -> bool:
    while n > MIN_SIZE:
        if n % 2:
            return False
        n //= 2
    return True


# --------------------------------------------------------------------------- synthetic input


def _profile(n0: int, n: int, axis: int) -> Any:
    """Smooth 0..1 profile along one axis: a slow sinusoid modulating a faster one (blobs)."""
    import numpy as np

    x = np.arange(n0, n0 + n, dtype=np.float32)
    slow = 0.6 + 0.4 * np.sin(2 * np.pi * x / (211.0 + 37 * axis) + axis)
    fast = 0.5 + 0.5 * np.sin(2 * np.pi * x / (41.0 + 7 * axis) + 2 * axis)
    return slow * fast**2


def _phantom_block(block_info: dict | None = None) -> Any:
    """Blobs of up to 2000 counts over a background of 200, with shot noise.

    The noise is the Gaussian approximation of Poisson noise (standard deviation
    ``sqrt(lambda)``; three times cheaper to draw), from an RNG seeded by the block index, so
    the volume does not depend on scheduling and is never held in memory whole.
    """
    import numpy as np

    info = block_info[None]
    (z0, _), (y0, _), (x0, _) = info["array-location"]
    nz, ny, nx = info["chunk-shape"]
    pz, py, px = _profile(z0, nz, 0), _profile(y0, ny, 1), _profile(x0, nx, 2)
    lam = 200 + 1800 * (pz[:, None, None] * py[None, :, None]) * px[None, None, :]
    rng = np.random.default_rng([SEED, *info["chunk-location"]])
    noisy = lam + np.sqrt(lam) * rng.standard_normal(lam.shape, dtype=np.float32)
    return np.clip(np.rint(noisy), 0, 65535).astype(np.uint16)


def step_input(case: Case) -> dict[str, Any]:
    """Write level 0 with voxflow's writer and default layout (64^3 chunks, 256^3 shards)."""
    import dask.array as da
    import numpy as np

    from voxflow.io import derive_layout, write_image

    layout = derive_layout(case.shape, DIMS)
    chunks = da.core.normalize_chunks(layout.write_chunks, case.shape)
    meta = np.empty((0, 0, 0), np.uint16)
    data = da.map_blocks(_phantom_block, chunks=chunks, dtype=np.uint16, meta=meta)
    write_image(case.input, data, DIMS, SCALE, name="phantom")
    return {"stored_bytes": stored_bytes(case.input / "0")}


def step_plan(case: Case) -> dict[str, Any]:
    """The levels voxflow plans for the input, which every tool then makes."""
    from voxflow.io import open_image
    from voxflow.tasks.pyramid import PyramidParams, plan_pyramid

    _, plan = plan_pyramid(open_image(case.input), PyramidParams(min_size=MIN_SIZE))
    levels = [
        {
            "path": lv.path,
            "shape": list(lv.shape),
            "factors": list(lv.factors),
            "chunks": list(lv.layout.chunks),
            "shards": list(lv.layout.write_chunks),
        }
        for lv in plan
    ]
    case.plan_file.write_text(json.dumps({"shape": list(case.shape), "levels": levels}, indent=1))
    return {"levels": len(levels)}


# --------------------------------------------------------------------------- TensorStore helpers


def _ts_create(path: Path, like: Path, level: dict[str, Any], context: Any) -> Any:
    """A new zarr v3 array with the codecs of `like` and the shape and layout of `level`."""
    meta = ts_copy_meta(like)
    meta["shape"] = list(level["shape"])
    meta["chunk_grid"]["configuration"]["chunk_shape"] = list(level["shards"])
    meta["codecs"][0]["configuration"]["chunk_shape"] = list(level["chunks"])
    return ts_open(path, context, metadata=meta, create=True, delete_existing=True)


# --------------------------------------------------------------------------- measured steps


def step_read(case: Case) -> dict[str, Any]:
    """Read and decode level 0 shard by shard, discarding the data."""
    import tensorstore as ts

    src = ts_open(case.input / "0", ts.Context())
    unit = tuple(case.plan()["levels"][0]["shards"])
    n = bounded(lambda r: src[r].read(), regions(src.shape, unit), case.in_flight)
    return {"shards": n}


def step_copy(case: Case) -> dict[str, Any]:
    """Read level 0 and write one copy with the same codec and layout, shard by shard."""
    import tensorstore as ts

    ctx = ts.Context()
    level0 = case.plan()["levels"][0]
    src = ts_open(case.input / "0", ctx)
    dst = _ts_create(case.out("copy") / "0", case.input / "0", level0, ctx)
    shards = regions(src.shape, tuple(level0["shards"]))
    n = bounded(lambda r: dst[r].write(src[r]), shards, case.in_flight)
    return {"shards": n, "stored_bytes": stored_bytes(case.out("copy"))}


def step_encode(case: Case) -> dict[str, Any]:
    """Encode and write voxflow's own levels >= 1, held in memory, with level 0's codec.

    The pyramid floor prices the new levels at level 0's encode cost per byte; this measures
    what encoding these very levels costs (wall and CPU, best of `repeat`). With the read
    floor's CPU it gives the CPU lower bound of any in-place pyramid on this machine.
    """
    import tensorstore as ts

    ctx = ts.Context()
    levels = case.plan()["levels"][1:]
    source = case.out("voxflow_new")
    data = [ts_open(source / lv["path"], ctx).read().result() for lv in levels]
    runs = []
    for _ in range(case.repeat):
        shutil.rmtree(case.out("encode"), ignore_errors=True)
        arrays = [_ts_create(case.out("encode") / lv["path"], case.input / "0", lv, ctx)
                  for lv in levels]  # fmt: skip
        c0, t0 = cpu_seconds(), time.perf_counter()
        work = [
            (dst, region, arr)
            for dst, arr, lv in zip(arrays, data, levels, strict=True)
            for region in regions(arr.shape, tuple(lv["shards"]))
        ]
        bounded(lambda w: w[0][w[1]].write(w[2][w[1]]), work, case.in_flight)
        runs.append((time.perf_counter() - t0, cpu_seconds() - c0))
    shutil.rmtree(case.out("encode"), ignore_errors=True)
    seconds, cpu = min(runs)
    mib = sum(a.nbytes for a in data) / MiB
    return {"encode_seconds": seconds, "encode_cpu_seconds": cpu, "mib": mib,
            "encode_runs": [r[0] for r in runs]}  # fmt: skip


def _voxflow_warm_up() -> None:
    """Load the compiled kernels (numba's on-disk cache) before the clock starts."""
    import numpy as np

    from voxflow.core.pyramid import downsample_array

    downsample_array(np.zeros((4, 4, 4), np.uint16), (2, 2, 2), "mean")


def _voxflow_pyramid(case: Case, *, in_place: bool) -> dict[str, Any]:
    """Open the input and make its pyramid, as the pyramid task does."""
    from voxflow.io import open_image
    from voxflow.tasks.pyramid import PyramidParams, make_pyramid

    target = case.out("voxflow_in_place" if in_place else "voxflow_new")
    t0 = time.perf_counter()
    source = open_image(target if in_place else case.input)
    opened = time.perf_counter() - t0
    output = None if in_place else str(target)
    params = PyramidParams(min_size=MIN_SIZE)
    ref = make_pyramid(source, output, params, in_place=in_place, overwrite=True)
    return {"open_seconds": opened, "levels": len(ref.levels)}


def step_voxflow_in_place(case: Case) -> dict[str, Any]:
    """Add levels >= 1 to a fresh copy of the input (level 0 is not re-encoded)."""
    return _voxflow_pyramid(case, in_place=True)


def step_voxflow_new(case: Case) -> dict[str, Any]:
    """Write every level, level 0 re-encoded, into a new OME-Zarr."""
    return _voxflow_pyramid(case, in_place=False)


def step_tensorstore(case: Case) -> dict[str, Any]:
    """TensorStore's downsample driver, each level from the previous written one, per shard."""
    import tensorstore as ts

    ctx = ts.Context()
    levels = case.plan()["levels"]
    prev = case.input / "0"
    for level in levels[1:]:
        down = ts.downsample(ts_open(prev, ctx), downsample_factors=level["factors"], method="mean")
        prev = case.out("tensorstore") / level["path"]
        dst = _ts_create(prev, case.input / "0", level, ctx)
        shards = regions(dst.shape, tuple(level["shards"]))
        bounded(lambda r, d=dst, s=down: d[r].write(s[r]), shards, case.in_flight)
    return {"levels": len(levels)}


def step_dask(case: Case) -> dict[str, Any]:
    """Plain Dask: coarsen with np.mean level by level, written with zarr-python (sharded)."""
    import dask.array as da
    import numpy as np
    import zarr

    levels = case.plan()["levels"]
    z = zarr.open_array(str(case.input / "0"), mode="r")
    codec = z.compressors  # level 0's, as every other tool writes
    prev = da.from_zarr(z, chunks=z.shards)
    for level in levels[1:]:
        axes = dict(enumerate(level["factors"]))
        low = da.coarsen(np.mean, prev, axes, trim_excess=False)
        low = da.round(low).astype(np.uint16).rechunk(tuple(level["shards"]))
        out = zarr.create_array(
            store=str(case.out("dask") / level["path"]),
            shape=tuple(level["shape"]),
            dtype="uint16",
            chunks=tuple(level["chunks"]),
            shards=tuple(level["shards"]),
            compressors=codec,
            fill_value=0,
            dimension_names=list(DIMS),
        )
        low.to_zarr(out)
        prev = da.from_zarr(out, chunks=out.shards)
    return {"levels": len(levels)}


# --------------------------------------------------------------------------- correctness guard


def _max_diff(a: Any, b: Any, unit: list[int]) -> int:
    """Largest absolute difference of two equally shaped TensorStore arrays, shard by shard."""
    import numpy as np

    if tuple(a.shape) != tuple(b.shape):
        raise ValueError(f"shapes differ: {tuple(a.shape)} and {tuple(b.shape)}")
    worst = 0
    for r in regions(tuple(a.shape), tuple(unit)):
        x, y = a[r].read().result(), b[r].read().result()
        worst = max(worst, int(np.abs(x.astype(np.int32) - y.astype(np.int32)).max()))
    return worst


def _exact_first_shard(level0: Any, level1: Any, level: dict[str, Any]) -> int:
    """Max difference of level 1 from the exact mean rounded half up, on its first shard.

    Only whole blocks are compared (a partial block at the far edge is left out).
    """
    import numpy as np

    f, full = (
        level["factors"],
        [n // k for n, k in zip(level0.shape, level["factors"], strict=True)],
    )
    out = tuple(slice(0, min(s, n)) for s, n in zip(level["shards"], full, strict=True))
    src = tuple(slice(0, o.stop * k) for o, k in zip(out, f, strict=True))
    block = level0[src].read().result().astype(np.int64)
    n = block.shape
    sums = block.reshape(n[0] // f[0], f[0], n[1] // f[1], f[1], n[2] // f[2], f[2])
    count = math.prod(f)
    exact = (2 * sums.sum(axis=(1, 3, 5)) + count) // (2 * count)
    return int(np.abs(exact - level1[out].read().result().astype(np.int64)).max())


def step_check(case: Case) -> dict[str, Any]:
    """Compare every tool's levels with voxflow's new OME-Zarr (and level 0 with the input)."""
    import tensorstore as ts

    ctx = ts.Context()
    levels = case.plan()["levels"]
    ref = {lv["path"]: ts_open(case.out("voxflow_new") / lv["path"], ctx) for lv in levels}
    source = ts_open(case.input / "0", ctx)
    report: dict[str, Any] = {
        "levels": len(levels),
        "level0_new_vs_input": _max_diff(source, ref["0"], levels[0]["shards"]),
        "level1_vs_exact_mean": _exact_first_shard(ref["0"], ref["1"], levels[1]),
    }
    for tool in ("voxflow_in_place", "tensorstore", "dask"):
        report[tool] = [
            _max_diff(ref[lv["path"]], ts_open(case.out(tool) / lv["path"], ctx), lv["shards"])
            for lv in levels[1:]
        ]
    return report


# --------------------------------------------------------------------------- step process

STEPS: dict[str, Callable[[Case], dict[str, Any]]] = {
    "input": step_input,
    "plan": step_plan,
    "read": step_read,
    "copy": step_copy,
    "voxflow_in_place": step_voxflow_in_place,
    "voxflow_new": step_voxflow_new,
    "tensorstore": step_tensorstore,
    "dask": step_dask,
    "encode": step_encode,
    "check": step_check,
}
_VOXFLOW_IMPORTS = ("distributed", "voxflow.io", "voxflow.tasks.pyramid")
IMPORTS = {
    "read": ("numpy", "tensorstore"),
    "copy": ("numpy", "tensorstore"),
    "tensorstore": ("numpy", "tensorstore"),
    "dask": ("dask.array", "numpy", "zarr", "zarr.codecs"),
    "voxflow_in_place": _VOXFLOW_IMPORTS,
    "voxflow_new": _VOXFLOW_IMPORTS,
}


def _prepare(case: Case, step: str) -> None:
    """Untimed set-up of one run: a clean output; in place, a fresh copy of the input."""
    shutil.rmtree(case.out(step), ignore_errors=True)
    if step == "voxflow_in_place":
        shutil.copytree(case.input, case.out(step))


def _timed_run(case: Case, step: str) -> dict[str, float | dict]:
    c0, b0, t0 = cpu_seconds(), machine_busy_seconds(), time.perf_counter()
    info = STEPS[step](case)
    seconds, cpu = time.perf_counter() - t0, cpu_seconds() - c0
    others = max(machine_busy_seconds() - b0 - cpu, 0.0)
    return {"seconds": seconds, "cpu_seconds": cpu, "other_cpu_seconds": others, "info": info}


def run_child(args: argparse.Namespace) -> None:
    name, _, spec = args._size.partition("=")
    case = Case(name, parse_size(spec)[1], Path(args.workdir) / name, args.in_flight, args.repeat)
    step = args._step
    # Imports and compiled kernels load before the clock starts.
    for module in IMPORTS.get(step, ()):
        importlib.import_module(module)
    if step.startswith("voxflow"):
        _voxflow_warm_up()
    start_rss = peak_rss_mib()
    timed = step in TIMED_STEPS
    runs, dropped = [], False
    for _ in range(case.repeat if timed else 1):
        if timed:
            _prepare(case, step)
            dropped = drop_page_cache()
        runs.append(_timed_run(case, step))
    best = min(runs, key=lambda r: r["seconds"])
    info = {**best["info"], "runs": [r["seconds"] for r in runs]}
    info.update(cpu_seconds=best["cpu_seconds"], other_cpu_seconds=best["other_cpu_seconds"])
    write_result(args._result, best["seconds"], start_rss, dropped, **info)


# --------------------------------------------------------------------------- orchestration


def _child_argv(case: Case, step: str, workdir: Path) -> list[str]:
    size = f"{case.name}={'x'.join(map(str, case.shape))}"
    return [
        os.path.abspath(__file__),
        *("--_step", step, "--_size", size, "--workdir", str(workdir)),
        *("--in-flight", str(case.in_flight), "--repeat", str(case.repeat)),
    ]


def _ensure_input(case: Case, workdir: Path) -> dict[str, Any]:
    """Write the input unless an identical one is there from an earlier run."""
    marker = case.root / "input.json"
    want = {"shape": list(case.shape), "seed": SEED, "generator": GENERATOR}
    if marker.exists() and (case.input / "zarr.json").exists():
        have = json.loads(marker.read_text())
        if have.get("key") == want:
            return {**have, "reused": True}
    shutil.rmtree(case.root, ignore_errors=True)
    case.root.mkdir(parents=True)
    result = run_step("input", _child_argv(case, "input", workdir))
    doc = {"key": want, "seconds": result.seconds, "stored_bytes": result.info["stored_bytes"],
           "codec": codec_label(case.input / "0")}  # fmt: skip
    marker.write_text(json.dumps(doc))
    return {**doc, "reused": False}


def _clean_outputs(case: Case) -> None:
    for step in TIMED_STEPS:
        shutil.rmtree(case.out(step), ignore_errors=True)


def run_case(case: Case, workdir: Path, *, keep: bool, dropped: bool) -> dict[str, Any]:
    print(f"\n== {case.name}: {'x'.join(map(str, case.shape))} uint16", flush=True)
    made = _ensure_input(case, workdir)
    run_step("plan", _child_argv(case, "plan", workdir))
    plan = case.plan()
    _clean_outputs(case)
    if not dropped:
        run_step("warm-up", _child_argv(case, "read", workdir))
    steps: dict[str, StepResult] = {}
    for step in TIMED_STEPS:
        print(f"   {step:<17}", end=" ", flush=True)
        steps[step] = run_step(step, _child_argv(case, step, workdir))
        runs = ", ".join(f"{t:.2f}" for t in steps[step].info["runs"])
        print(f"best {steps[step].seconds:.2f} s of {runs}", flush=True)
    encode = run_step("encode", _child_argv(case, "encode", workdir)).info
    check = run_step("check", _child_argv(case, "check", workdir)).info
    if not keep:
        _clean_outputs(case)
    return {
        "shape": list(case.shape),
        "input": made,
        "plan": plan,
        "steps": {k: asdict(v) for k, v in steps.items()},
        "check": check,
        "encode": encode,
        "derived": {**_derive(plan, steps), **_bound(steps, encode)},
    }


def _bound(steps: dict[str, StepResult], encode: dict[str, Any]) -> dict[str, float]:
    """The in-place floor from the measured encode cost of the new levels, and a CPU bound.

    ``cpu_bound``: the read floor's CPU plus the new levels' encode CPU, spread over every
    core with no overhead at all: no in-place pyramid on this machine can finish sooner.
    """
    read = steps["read"]
    cores = os.cpu_count() or 1
    measured = read.seconds + encode["encode_seconds"]
    cpu_bound = (read.info["cpu_seconds"] + encode["encode_cpu_seconds"]) / cores
    return {
        "encode_floor": measured,
        "cpu_bound": cpu_bound,
        "in_place_vs_encode_floor": steps["voxflow_in_place"].seconds / measured,
        "in_place_vs_cpu_bound": steps["voxflow_in_place"].seconds / cpu_bound,
    }


def _derive(plan: dict[str, Any], steps: dict[str, StepResult]) -> dict[str, float]:
    voxels = [math.prod(lv["shape"]) for lv in plan["levels"]]
    fraction = sum(voxels[1:]) / voxels[0]
    t = {k: v.seconds for k, v in steps.items()}
    floor = t["read"] + (t["copy"] - t["read"]) * fraction
    return {
        "level0_bytes": voxels[0] * 2,
        "new_level_fraction": fraction,
        "pyramid_floor": floor,
        "in_place_vs_floor": t["voxflow_in_place"] / floor,
        "in_place_vs_tensorstore": t["voxflow_in_place"] / t["tensorstore"],
        "new_vs_copy": t["voxflow_new"] / t["copy"],
        "dask_vs_in_place": t["dask"] / t["voxflow_in_place"],
        "dask_vs_new": t["dask"] / t["voxflow_new"],
        "tensorstore_vs_floor": t["tensorstore"] / floor,
        "dask_vs_floor": t["dask"] / floor,
    }


# --------------------------------------------------------------------------- report


def _case_table(res: dict[str, Any]) -> str:
    d, steps = res["derived"], res["steps"]
    gib = d["level0_bytes"] / 2**30
    versus = {
        "voxflow_in_place": ("pyramid floor", d["pyramid_floor"]),
        "voxflow_new": ("copy floor", steps["copy"]["seconds"]),
        "tensorstore": ("pyramid floor", d["pyramid_floor"]),
        "dask": ("pyramid floor", d["pyramid_floor"]),
    }
    rows = []
    for step in TIMED_STEPS:
        s, info = steps[step], steps[step]["info"]
        name, ref = versus.get(step, ("", None))
        rows.append(
            [
                LABELS[step],
                f"{s['seconds']:.2f}",
                f"{s['seconds'] / ref:.2f}x {name}" if ref else "",
                f"{gib / s['seconds']:.2f}",
                f"{info['cpu_seconds']:.2f}",
                f"{info['other_cpu_seconds']:.2f}",
                f"{s['start_rss_mib']:.0f}",
                f"{s['peak_rss_mib']:.0f}",
            ]
        )
        if step == "copy":
            label = f"pyramid floor (read + {d['new_level_fraction']:.3f} x (copy - read))"
            floor = d["pyramid_floor"]
            rows.append([label, f"{floor:.2f}", "", f"{gib / floor:.2f}", "", "", "", ""])
            enc = res["encode"]
            for label, value, cpu in (
                ("encode floor (read + encode of voxflow's levels)", d["encode_floor"],
                 steps["read"]["info"]["cpu_seconds"] + enc["encode_cpu_seconds"]),
                (f"CPU bound ((read + encode CPU s) / {os.cpu_count()} cores)", d["cpu_bound"],
                 None),
            ):  # fmt: skip
                cells = [label, f"{value:.2f}", "", f"{gib / value:.2f}"]
                rows.append([*cells, f"{cpu:.2f}" if cpu else "", "", "", ""])
    headers = [
        "step",
        "seconds",
        "ratio",
        "GiB/s of level 0",
        "CPU s",
        "others' CPU s",
        "RSS start MiB",
        "peak RSS MiB",
    ]
    return format_table(headers, rows)


def _check_lines(res: dict[str, Any]) -> list[str]:
    c = res["check"]
    shapes = " -> ".join("x".join(map(str, lv["shape"])) for lv in res["plan"]["levels"])
    lines = [
        f"   levels: {c['levels']} ({shapes})",
        "   check: level 0 of the new OME-Zarr vs the input, max |diff| "
        f"{c['level0_new_vs_input']}",
        "   check: voxflow level 1 vs the exact mean rounded half up (first shard), max |diff| "
        f"{c['level1_vs_exact_mean']}",
    ]
    for tool in ("voxflow_in_place", "tensorstore", "dask"):
        lines.append(f"   check: {tool} vs voxflow new, max |diff| at levels 1..: {c[tool]}")
    enc, d = res["encode"], res["derived"]
    copy, read = res["steps"]["copy"]["info"], res["steps"]["read"]["info"]
    per_mib_0 = (copy["cpu_seconds"] - read["cpu_seconds"]) / (d["level0_bytes"] / MiB)
    lines.append(
        f"   encode: levels >= 1 ({enc['mib']:.0f} MiB) take {enc['encode_cpu_seconds']:.2f} CPU s "
        f"({1000 * enc['encode_cpu_seconds'] / enc['mib']:.1f} ms/MiB) against level 0's "
        f"{1000 * per_mib_0:.1f} ms/MiB in the copy floor; in place is "
        f"{d['in_place_vs_encode_floor']:.2f}x the encode floor, {d['in_place_vs_cpu_bound']:.2f}x "
        "the CPU bound"
    )
    return lines


def _judge(value: float, limit: float, *, at_least: bool = False) -> tuple[bool, str]:
    return (value >= limit if at_least else value <= limit), f"{value:.2f}x"


TARGET_RULES: list[tuple[str, Callable[[dict[str, Any]], tuple[bool, str]]]] = [
    (
        "in place faster than TensorStore downsample",
        lambda r: _judge(r["derived"]["in_place_vs_tensorstore"], 1.0),
    ),
    ("in place <= 1.25x pyramid floor", lambda r: _judge(r["derived"]["in_place_vs_floor"], 1.25)),
    ("new OME-Zarr <= 1.2x copy floor", lambda r: _judge(r["derived"]["new_vs_copy"], 1.2)),
    (
        ">= 3x faster than Dask (in place; both write levels >= 1)",
        lambda r: _judge(r["derived"]["dask_vs_in_place"], 3.0, at_least=True),
    ),
    (
        ">= 3x faster than Dask (new OME-Zarr; writes level 0 too)",
        lambda r: _judge(r["derived"]["dask_vs_new"], 3.0, at_least=True),
    ),
    (
        "level 1 equals TensorStore's within 1 (guard)",
        lambda r: (r["check"]["tensorstore"][0] <= 1, f"max |diff| {r['check']['tensorstore'][0]}"),
    ),
    (
        "level 1 equals the exact rounded mean (guard)",
        lambda r: (
            r["check"]["level1_vs_exact_mean"] == 0,
            f"max |diff| {r['check']['level1_vs_exact_mean']}",
        ),
    ),
]


def _machine() -> dict[str, Any]:
    return machine(("voxflow", "tensorstore", "dask", "zarr", "numba", "numpy"))


def _case_header(name: str, res: dict[str, Any]) -> str:
    made = res["input"]
    how = "reused" if made["reused"] else f"written in {made['seconds']:.1f} s"
    shape = "x".join(map(str, res["shape"]))
    return (
        f"\n[{name}] {shape} uint16, {res['derived']['level0_bytes'] / MiB:.0f} MiB, stored "
        f"{made['stored_bytes'] / MiB:.0f} MiB ({made.get('codec', '?')}, 64^3 chunks in 256^3 "
        f"shards); input {how}; best of {res['repeat']} cold runs per step"
    )


def report(results: dict[str, dict[str, Any]], machine: dict[str, Any], dropped: bool) -> dict:
    print("\n" + "=" * 100)
    print("machine: " + ", ".join(f"{k} {v}" for k, v in machine.items()))
    if dropped:
        print(
            "page cache: dropped (sync; echo 3 > /proc/sys/vm/drop_caches) before every timed "
            "run, so every run reads level 0 from disk"
        )
    else:
        print(
            "page cache: could not be dropped (needs root); one untimed warm-up read per size, "
            "so every run reads level 0 from a warm cache"
        )
    print(
        f"peak RSS of the orchestrating process: {peak_rss_mib():.0f} MiB (a step's peak RSS "
        "starts from its parent's, so the parent imports nothing heavy)"
    )
    for name, res in results.items():
        print(_case_header(name, res))
        print(_case_table(res))
        print("\n".join(_check_lines(res)))
    table, doc = targets_table(results, TARGET_RULES)
    print("\ntargets\n" + table)
    mem_table, mem = memory_table(
        results, TIMED_STEPS, LABELS, lambda step: step.startswith("voxflow"), RSS_GROWTH
    )
    print("\n" + mem_table)
    return {"targets": doc, "memory": mem}


# --------------------------------------------------------------------------- entry point


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_common_arguments(
        parser,
        "voxflow-bench",
        IN_FLIGHT,
        "TensorStore operations pending at once in the floors and the TensorStore baseline",
    )
    add = parser.add_argument
    add("--_step", help=argparse.SUPPRESS)
    add("--_size", help=argparse.SUPPRESS)
    add("--_result", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args._step:
        run_child(args)
        return 0
    try:
        cases = [parse_size(s.strip()) for s in args.sizes.split(",") if s.strip()]
    except argparse.ArgumentTypeError as err:
        print(f"error: --sizes: {err}", file=sys.stderr)
        return 2
    workdir = Path(args.workdir).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    free, need = shutil.disk_usage(workdir).free, sum(8 * math.prod(s) for _, s in cases)
    if free < need:
        print(
            f"warning: {free / 2**30:.1f} GiB free in {workdir}, about {need / 2**30:.1f} GiB "
            "needed",
            file=sys.stderr,
        )
    dropped = drop_page_cache()
    results = {}
    for name, shape in cases:
        case = Case(name, shape, workdir / name, args.in_flight, args.repeat)
        results[name] = {
            **run_case(case, workdir, keep=args.keep, dropped=dropped),
            "repeat": args.repeat,
        }
    machine = _machine()
    summary = report(results, machine, dropped)
    if args.json:
        doc = {
            "machine": machine,
            "page_cache_dropped": dropped,
            "in_flight": args.in_flight,
            "sizes": results,
            **summary,
        }
        Path(args.json).write_text(json.dumps(doc, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
