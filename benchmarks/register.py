"""Registration benchmark: accuracy per transform family, batched speed, ANTs, warp vs I/O floor.

Run ``python benchmarks/register.py [--quick] [--slices 64] [--size 512] [--workdir DIR]
[--json OUT]``.

On synthetic serial-section EM stacks with known per-slice transforms (``em_stack``, one per
transform family, noise 0.05 and contrast 0.1), voxflow registers the consecutive pairs in
batches, composes them and crops to the common valid box; every figure is measured against
the ground truth. Then: drift control (neighbours up to 3, ``solve_stack``), batched against
one pair at a time, ANTs (``ants.registration``) on the same pairs, the registration flow end
to end on the written OME-Zarr, and the flow's warp + write step against a TensorStore copy of
the stack (the I/O floor). Every measured step runs in a process of its own (``--_step``), so
its peak RSS is its own; the results go to ``WORKDIR/results.json``.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from _measure import (
    MiB,
    best_of,
    bounded,
    drop_page_cache,
    format_table,
    machine,
    peak_rss_mib,
    regions,
    run_step,
    stored_bytes,
    targets_table,
    timed,
    ts_copy_meta,
    ts_open,
    write_result,
)

FAMILIES = ("translation", "rigid", "similarity", "affine")
ANTS_TYPES = {"translation": "Translation", "rigid": "Rigid", "similarity": "Similarity",
              "affine": "Affine"}  # fmt: skip
SEED = 0
NOISE = 0.05  # standard deviation of the additive noise, as a fraction of 255
CONTRAST = 0.1  # half-width of the per-slice gain range around 1
GENERATOR = 1  # bump when the cached stacks must be made again
# Bump when voxflow's default layout changes, so the OME-Zarr datasets are written again (the
# stacks are kept): 2 is blosc zstd level 2.
DATA_LAYOUT = 2
SLICES, SIZE = 64, 512
QUICK = {"slices": 16, "size": 256, "speed_pairs": 8}
BATCH = 16  # pairs per batch, as the registration flow's default
SPEED_PAIRS = 16
SPEED_REPEAT = 3  # alternated timed runs of each mode in the speed step; the fastest counts
ANTS_PAIRS = 1 << 20  # ANTs registers every consecutive pair unless told fewer
NEIGHBOURS = 3  # drift control: pairs (i, i - 1), (i, i - 2), (i, i - 3)
FOCUS = "rigid"  # the flow's default family: drift, speed, flow, warp and GPU run on it
CONTENDED = 0.1  # others' CPU seconds per wall second above which a timing is flagged
IN_FLIGHT = 4  # TensorStore reads/writes pending at once in the copy floor

# Targets
RMS_TARGET = 0.5  # px, residual misalignment of every slice
BOX_TARGET = 2  # px, largest edge difference of the crop box from the truth
SPEEDUP_TARGET = 4.0  # batched against one pair at a time
FLOOR_TARGET = 2.0  # warp + write against the copy floor

STEPS = ("register", "drift", "speed", "ants", "flow", "warp", "gpu")


@dataclass(frozen=True)
class Run:
    """Sizes and settings of one benchmark run, and where its files live."""

    workdir: Path
    slices: int = SLICES
    size: int = SIZE
    batch: int = BATCH
    device: str = "cpu"
    speed_pairs: int = SPEED_PAIRS
    ants_pairs: int = ANTS_PAIRS
    repeat: int = 3
    in_flight: int = IN_FLIGHT

    @property
    def tag(self) -> str:
        """The stacks' parameters, naming every cached file."""
        return f"{self.slices}x{self.size}x{self.size}-s{SEED}-n{NOISE}-c{CONTRAST}-g{GENERATOR}"

    @property
    def frame(self) -> tuple[int, int]:
        """(Y, X) of every slice."""
        return (self.size, self.size)

    def stack(self, family: str) -> Path:
        """The cached stack of `family` (image, truth) as ``.npz``."""
        return self.workdir / "stacks" / f"{family}-{self.tag}.npz"

    def pairs(self, family: str) -> Path:
        """The consecutive pairwise matrices voxflow found for `family` (register step)."""
        return self.workdir / "run" / f"{family}-{self.tag}-{self.device}-pairs.npz"

    def data(self, family: str) -> Path:
        """The OME-Zarr dataset the flow and the warp read (``write_em_stack``)."""
        return self.workdir / "data" / f"{family}-{self.tag}"

    def out(self, name: str) -> Path:
        """Where a step writes its output."""
        return self.workdir / "run" / name


# --------------------------------------------------------------------------- helpers (children)


def _load(run: Run, family: str) -> dict[str, Any]:
    import numpy as np

    with np.load(run.stack(family)) as f:
        return {k: f[k] for k in f.files}


def _levels_note() -> str:
    from voxflow.core.register import make_levels

    return ", ".join(f"f{lv.factor}/{lv.epochs}/{lv.lr:g}" for lv in make_levels())


def _register(fixed: Any, moving: Any, family: str, device: str) -> Any:
    """Pairwise registration by voxflow, with the flow's default settings."""
    from voxflow.core.register import register_pairs

    return register_pairs(fixed, moving, transform=family, device=device)


def _batched(fixed: Any, moving: Any, family: str, device: str, batch: int) -> dict[str, Any]:
    """Register the pairs in batches of `batch`; matrices, diagnostics and per-batch seconds."""
    import numpy as np

    parts, seconds = [], []
    for start in range(0, len(fixed), batch):
        t0 = time.perf_counter()
        parts.append(_register(fixed[start : start + batch], moving[start : start + batch],
                               family, device))  # fmt: skip
        _synchronize(device)
        seconds.append(time.perf_counter() - t0)
    return {
        "matrices": np.concatenate([p.matrices for p in parts]),
        "loss": np.concatenate([p.loss for p in parts]),
        "steps": np.concatenate([p.steps for p in parts]),
        "converged": np.concatenate([p.converged for p in parts]),
        "batch_seconds": seconds,
    }


def _synchronize(device: str) -> None:
    """Wait for queued GPU work, so the clock stops when the work is done."""
    import torch

    if device != "cpu" and torch.cuda.is_available():
        torch.cuda.synchronize()


def _warm_up(device: str) -> None:
    """Register one tiny pair, so torch's kernels and thread pools load before the clock."""
    import numpy as np

    from voxflow.core.register import make_levels, register_pairs

    image = np.random.default_rng(SEED).random((2, 32, 32), dtype=np.float32)
    register_pairs(image[:1], image[1:], levels=make_levels((2, 1), 3), device=device)
    _synchronize(device)


def _chain(pairwise: Any) -> Any:
    """Composed transforms from consecutive pairwise ones (slice 0 the identity)."""
    import numpy as np

    from voxflow.core.stack import compose

    return compose(np.concatenate([np.eye(3)[None], pairwise]))


def _errors(estimate: Any, truth: Any, frame: tuple[int, int]) -> dict[str, float]:
    """Max, mean and last of the per-slice pixel RMS of `estimate` against `truth`."""
    from voxflow.core.stack import pixel_rms

    rms = pixel_rms(estimate, truth, frame)
    return {"max": float(rms.max()), "mean": float(rms.mean()), "end": float(rms[-1])}


def _box_figures(composed: Any, truth_box: Any, frame: tuple[int, int]) -> dict[str, Any]:
    """The recovered crop box against the truth's: both boxes and the largest edge difference."""
    import numpy as np

    from voxflow.core.stack import valid_box

    box = np.asarray(valid_box(composed, frame))
    truth = np.asarray(truth_box)
    return {"box": box.tolist(), "truth_box": truth.tolist(),
            "box_diff": int(np.abs(box - truth).max())}  # fmt: skip


def _stack_figures(composed: Any, data: dict[str, Any], frame: tuple[int, int]) -> dict[str, Any]:
    return {"composed": _errors(composed, data["transforms"], frame),
            **_box_figures(composed, data["valid_box"], frame)}  # fmt: skip


# --------------------------------------------------------------------------- measured steps


def step_input(run: Run, family: str) -> tuple[float, dict[str, Any]]:
    """Generate the stack of `family` and cache it (image and truth) in the work directory."""
    import numpy as np

    from voxflow.core.synth import em_stack

    t0 = time.perf_counter()
    stack = em_stack((run.slices, *run.frame), seed=SEED, transform=family, noise=NOISE,
                     contrast=CONTRAST)  # fmt: skip
    seconds = time.perf_counter() - t0
    path = run.stack(family)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(".partial.npz")
    np.savez(partial, image=stack.image, transforms=stack.transforms, pairwise=stack.pairwise,
             valid_box=np.asarray(stack.valid_box))  # fmt: skip
    partial.replace(path)
    return seconds, {"valid_box": [list(b) for b in stack.valid_box]}


def step_register(run: Run, family: str) -> tuple[float, dict[str, Any]]:
    """Register every consecutive pair in batches, compose, crop; figures against the truth."""
    import numpy as np

    from voxflow.core.stack import pixel_rms

    data = _load(run, family)
    image = data["image"]
    _warm_up(run.device)
    found: dict[str, Any] = {}

    def work() -> dict[str, Any]:
        found.update(_batched(image[:-1], image[1:], family, run.device, run.batch))
        return {}

    measured = timed(work)
    path = run.pairs(family)
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, matrices=found["matrices"])
    pair_rms = pixel_rms(found["matrices"], data["pairwise"][1:], run.frame)
    composed = _chain(found["matrices"])
    return measured["seconds"], {
        "pairs": len(image) - 1,
        "batch": run.batch,
        "batch_seconds": found["batch_seconds"],
        "pairwise": {"max": float(pair_rms.max()), "mean": float(pair_rms.mean())},
        **_stack_figures(composed, data, run.frame),
        "steps_mean": float(found["steps"].mean()),
        "converged": int(found["converged"].sum()),
        "cpu_seconds": measured["cpu_seconds"],
        "other_cpu_seconds": measured["other_cpu_seconds"],
    }


def step_drift(run: Run, family: str) -> tuple[float, dict[str, Any]]:
    """Register the pairs (i, i - 2) and (i, i - 3) too, and solve the stack over all of them."""
    import numpy as np

    from voxflow.core.stack import pixel_rms, solve_stack

    data = _load(run, family)
    image, n = data["image"], len(data["image"])
    with np.load(run.pairs(family)) as f:
        chain = f["matrices"]
    extra = np.array([(i, i - d) for d in range(2, NEIGHBOURS + 1) for i in range(d, n)])
    _warm_up(run.device)
    found: dict[str, Any] = {}

    def work() -> dict[str, Any]:
        t0 = time.perf_counter()
        found.update(_batched(image[extra[:, 1]], image[extra[:, 0]], family, run.device,
                              run.batch))  # fmt: skip
        t1 = time.perf_counter()
        pairs = np.concatenate([np.stack([np.arange(1, n), np.arange(n - 1)], 1), extra])
        mats = np.concatenate([chain, found["matrices"]])
        found["composed"] = solve_stack(n, pairs, mats, run.frame)
        return {"register_seconds": t1 - t0, "solve_seconds": time.perf_counter() - t1}

    measured = timed(work)
    truth = np.linalg.inv(data["transforms"][extra[:, 1]]) @ data["transforms"][extra[:, 0]]
    rms = pixel_rms(found["matrices"], truth, run.frame)
    by_distance = {
        int(d): {"max": float(rms[extra[:, 0] - extra[:, 1] == d].max()),
                 "mean": float(rms[extra[:, 0] - extra[:, 1] == d].mean())}
        for d in range(2, NEIGHBOURS + 1)
    }  # fmt: skip
    return measured["seconds"], {
        **measured["info"],
        "extra_pairwise": by_distance,
        "extra_over_1px": int((rms > 1).sum()),
        "extra_pairs": len(extra),
        "neighbours": NEIGHBOURS,
        "chain": _stack_figures(_chain(chain), data, run.frame),
        "solved": _stack_figures(found["composed"], data, run.frame),
        "converged": int(found["converged"].sum()),
        "cpu_seconds": measured["cpu_seconds"],
        "other_cpu_seconds": measured["other_cpu_seconds"],
    }


def _speed(run: Run, family: str, device: str, count: int) -> dict[str, Any]:
    """The first `count` consecutive pairs batched (one batch), then one pair at a time."""
    from voxflow.core.stack import pixel_rms

    data = _load(run, family)
    image, truth = data["image"], data["pairwise"][1 : count + 1]
    fixed, moving = image[:count], image[1 : count + 1]
    _warm_up(device)
    runs: dict[str, list[dict[str, Any]]] = {"batched": [], "single": []}
    # Alternated, fastest of each: a burst of load from other processes hits both modes alike.
    for _ in range(SPEED_REPEAT):
        for name, batch in (("batched", count), ("single", 1)):
            runs[name].append(timed(lambda b=batch: _batched(fixed, moving, family, device, b)))
    batched, singles = (min(runs[k], key=lambda r: r["seconds"]) for k in ("batched", "single"))
    out: dict[str, Any] = {
        "pairs": count, "batch": count, "repeat": SPEED_REPEAT,
        "runs": {k: [r["seconds"] for r in v] for k, v in runs.items()},
    }  # fmt: skip
    for name, measured in (("batched", batched), ("single", singles)):
        rms = pixel_rms(measured["info"]["matrices"], truth, run.frame)
        out[name] = {
            "seconds": measured["seconds"],
            "pairs_per_second": count / measured["seconds"],
            "pairwise": {"max": float(rms.max()), "mean": float(rms.mean())},
            "steps_mean": float(measured["info"]["steps"].mean()),
            "cpu_seconds": measured["cpu_seconds"],
            "other_cpu_seconds": measured["other_cpu_seconds"],
        }
    between = pixel_rms(batched["info"]["matrices"], singles["info"]["matrices"], run.frame)
    out["batched_vs_single_rms_max"] = float(between.max())
    out["speedup"] = singles["seconds"] / batched["seconds"]
    return out


def step_speed(run: Run, family: str) -> tuple[float, dict[str, Any]]:
    """Batched against one pair at a time, same pairs and settings, on ``--device``."""
    count = min(run.speed_pairs, run.slices - 1)
    info = _speed(run, family, run.device, count)
    return info["batched"]["seconds"], {**info, "device": run.device}


def _ants_matrix(result: dict[str, Any]) -> Any:
    """ANTs' forward transform as a 3x3 pixel matrix mapping fixed points to moving points.

    ANTs writes every linear stage collapsed into one ITK ``AffineTransform``: a matrix ``A``
    (row-major), a translation ``t`` and a centre ``c`` (its fixed parameters), mapping ``x``
    to ``A (x - c) + c + t``. Images made by ``ants.from_numpy`` have spacing 1, origin 0 and
    identity direction, so physical points are (row, column) pixel indices, voxflow's (y, x).
    """
    import ants
    import numpy as np

    transform = ants.read_transform(result["fwdtransforms"][0])
    if transform.transform_type != "AffineTransform":
        raise ValueError(f"expected an ITK AffineTransform, got {transform.transform_type}")
    params = np.asarray(transform.parameters, float)
    centre = np.asarray(transform.fixed_parameters, float)
    linear, shift = params[:4].reshape(2, 2), params[4:6]
    matrix = np.eye(3)
    matrix[:2, :2] = linear
    matrix[:2, 2] = centre + shift - linear @ centre
    return matrix


def _ants_pairs(data: dict[str, Any], family: str, count: int) -> dict[str, Any]:
    """ANTs on the first `count` consecutive pairs: fixed slice k, moving slice k - 1."""
    import ants
    import numpy as np

    matrices, seconds = [], []
    image = data["image"].astype(np.float32)
    # ANTs writes its transforms to files, by default loose in the temporary directory.
    with tempfile.TemporaryDirectory(prefix="voxflow-bench-ants-") as scratch:
        for k in range(1, count + 1):
            fixed, moving = ants.from_numpy(image[k]), ants.from_numpy(image[k - 1])
            t0 = time.perf_counter()
            result = ants.registration(fixed, moving, type_of_transform=ANTS_TYPES[family],
                                       outprefix=os.path.join(scratch, f"{k}_"))  # fmt: skip
            seconds.append(time.perf_counter() - t0)
            matrices.append(_ants_matrix(result))
    return {"matrices": np.stack(matrices), "seconds": seconds}


def step_ants(run: Run, family: str) -> tuple[float, dict[str, Any]]:
    """ANTs and voxflow on the same pairs: pairwise and end-of-chain errors, ANTs' time."""
    import numpy as np
    from ants.config import set_ants_deterministic

    from voxflow.core.stack import pixel_rms

    # Seeds ANTs' random metric sampling; leaves its threads (ITK's default) alone.
    set_ants_deterministic(False, SEED)
    data = _load(run, family)
    count = min(run.ants_pairs, run.slices - 1)
    truth = data["pairwise"][1 : count + 1]
    measured = timed(lambda: _ants_pairs(data, family, count))
    ants_m = measured["info"]["matrices"]
    with np.load(run.pairs(family)) as f:
        ours = f["matrices"][:count]
    check = {
        "as_stated": float(pixel_rms(ants_m[:1], truth[:1], run.frame)[0]),
        "inverted": float(pixel_rms(np.linalg.inv(ants_m[:1]), truth[:1], run.frame)[0]),
        "identity": float(pixel_rms(np.eye(3)[None], truth[:1], run.frame)[0]),
    }
    out: dict[str, Any] = {"pairs": count, "conversion_check_pair_1": check,
                           "ants_transform": ANTS_TYPES[family],
                           "itk_threads": os.environ.get("ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS",
                                                         "ITK default (all cores)"),
                           "ants_seconds_per_pair": measured["seconds"] / count,
                           "ants_pair_seconds": measured["info"]["seconds"],
                           "other_cpu_seconds": measured["other_cpu_seconds"]}  # fmt: skip
    end = data["transforms"][: count + 1]
    for name, mats in (("ants", ants_m), ("voxflow", ours)):
        rms = pixel_rms(mats, truth, run.frame)
        out[name] = {
            "pairwise": {"max": float(rms.max()), "mean": float(rms.mean()),
                         "median": float(np.median(rms)), "over_1px": int((rms > 1).sum()),
                         "each": rms.tolist()},
            "composed": _errors(_chain(mats), end, run.frame),
        }  # fmt: skip
    return measured["seconds"], out


def step_data(run: Run, family: str) -> tuple[float, dict[str, Any]]:
    """Write the stack of `family` as an OME-Zarr dataset with voxflow's synth task (untimed)."""
    from voxflow.tasks.synth import write_em_stack

    t0 = time.perf_counter()
    made = write_em_stack(
        str(run.data(family)), shape=(run.slices, *run.frame), seed=SEED, transform=family,
        noise=NOISE, contrast=CONTRAST, overwrite=True,
    )  # fmt: skip
    return time.perf_counter() - t0, {"made": made}


def _flow_settings(root: Path) -> Any:
    from voxflow.settings import VoxflowSettings

    cores = os.cpu_count() or 1
    return VoxflowSettings(
        cluster={"mode": "local", "n_workers": 1, "threads_per_worker": cores,
                 "processes": False},
        prefect={"result_storage": str(root / "results")},
    )  # fmt: skip


def step_flow(run: Run, family: str) -> tuple[float, dict[str, Any]]:
    """``run_registration`` on the written OME-Zarr; its transforms.json against the truth."""
    import numpy as np

    from voxflow.core.stack import pixel_rms
    from voxflow.flows.register import RegistrationConfig, run_registration
    from voxflow.tasks.register import RegistrationParams

    root = run.out(f"flow-{family}")
    shutil.rmtree(root, ignore_errors=True)  # no cached batch from an earlier run
    root.mkdir(parents=True)
    data = _load(run, family)
    params = RegistrationParams(transform=family, device=run.device, batch_size=run.batch)
    config = RegistrationConfig(
        input=str(run.data(family) / "image.ome.zarr"),
        output=str(root / "aligned.ome.zarr"),
        registration=params,
    )
    measured = timed(lambda: {"ref": run_registration(config, _flow_settings(root))})
    doc = json.loads((root / "aligned.ome.zarr" / "transforms.json").read_text())
    composed = np.asarray(doc["composed"], float)
    info: dict[str, Any] = {
        "pairs": len(doc["pairs"]),
        "composed": _errors(composed, data["transforms"], run.frame),
        "box": doc["crop"]["box"],
        "truth_box": data["valid_box"].tolist(),
        "box_diff": int(np.abs(np.asarray(doc["crop"]["box"]) - data["valid_box"]).max()),
        "output_shape": list(measured["info"]["ref"].shape),
        "converged": sum(bool(p["converged"]) for p in doc["pairs"]),
        "cpu_seconds": measured["cpu_seconds"],
        "other_cpu_seconds": measured["other_cpu_seconds"],
    }
    if run.pairs(family).exists():
        with np.load(run.pairs(family)) as f:
            core = _chain(f["matrices"])
        info["vs_core_rms_max"] = float(pixel_rms(composed, core, run.frame).max())
    shutil.rmtree(root / "results", ignore_errors=True)
    return measured["seconds"], info


def _level0(run: Run, family: str) -> Path:
    """The zarr v3 array of level 0 of the dataset's image."""
    image = run.data(family) / "image.ome.zarr"
    paths = json.loads((image / "zarr.json").read_text())["attributes"]["ome"]["multiscales"]
    return image / paths[0]["datasets"][0]["path"]


def step_floor(run: Run, family: str) -> tuple[float, dict[str, Any]]:
    """The I/O floor: read level 0 once, write it once with the same codecs and layout."""
    import tensorstore as ts

    src_path = _level0(run, family)
    meta = ts_copy_meta(src_path)
    shard = meta["chunk_grid"]["configuration"]["chunk_shape"]
    dst_path = run.out("floor.zarr")

    def work() -> dict[str, Any]:
        ctx = ts.Context()
        src = ts_open(src_path, ctx)
        dst = ts_open(dst_path, ctx, metadata=meta, create=True, delete_existing=True)
        n = bounded(lambda r: dst[r].write(src[r]), regions(src.shape, shard), run.in_flight)
        return {"shards": n}

    best, dropped = best_of(work, lambda: shutil.rmtree(dst_path, ignore_errors=True), run.repeat)
    info = {**best["info"], "cache_dropped": dropped, "codecs": meta["codecs"],
            "shard_shape": shard, "stored_bytes": stored_bytes(dst_path),
            "cpu_seconds": best["cpu_seconds"],
            "other_cpu_seconds": best["other_cpu_seconds"]}  # fmt: skip
    shutil.rmtree(dst_path, ignore_errors=True)
    return best["seconds"], info


def _warp(run: Run, family: str, levels: int | None) -> tuple[float, dict[str, Any]]:
    """``warp_stack`` with the true transforms and box, best of ``--repeat``; then a guard."""
    import numpy as np

    from voxflow.core.warp import warp_slices
    from voxflow.io import open_image, read_level
    from voxflow.tasks.pyramid import PyramidParams
    from voxflow.tasks.register import (
        RegistrationParams,
        stack_geometry,
        transforms_document,
        warp_stack,
    )

    data = _load(run, family)
    source = open_image(str(run.data(family) / "image.ome.zarr"))
    composed = data["transforms"]
    box = tuple(tuple(int(v) for v in b) for b in data["valid_box"])
    params = RegistrationParams(transform=family, device=run.device,
                                pyramid=PyramidParams(levels=levels))  # fmt: skip
    document = transforms_document(source, stack_geometry(source), params, [], composed, box)
    output = run.out(f"warp-{levels or 'pyramid'}.ome.zarr")
    warp_slices(data["image"][:2, :64, :64], composed[:2], device=run.device)  # warm-up

    def work() -> dict[str, Any]:
        ref = warp_stack(source, document, composed, box, str(output), params, overwrite=True)
        return {"levels": len(ref.levels), "shape": list(ref.shape)}

    best, dropped = best_of(work, lambda: shutil.rmtree(output, ignore_errors=True), run.repeat)
    written = read_level(open_image(str(output)), 0).compute()
    expected = warp_slices(data["image"], composed, box=box, device=run.device)
    diff = int(np.abs(written.astype(np.int16) - expected.astype(np.int16)).max())
    info = {**best["info"], "cache_dropped": dropped, "max_abs_diff_vs_warp_slices": diff,
            "stored_bytes": stored_bytes(output), "cpu_seconds": best["cpu_seconds"],
            "other_cpu_seconds": best["other_cpu_seconds"]}  # fmt: skip
    shutil.rmtree(output, ignore_errors=True)
    return best["seconds"], info


def step_warp(run: Run, family: str) -> tuple[float, dict[str, Any]]:
    """The flow's warp + write of level 0 alone (the floor's output), known transforms."""
    return _warp(run, family, 1)


def step_warp_pyramid(run: Run, family: str) -> tuple[float, dict[str, Any]]:
    """The same with the output's default pyramid, as the flow writes it."""
    return _warp(run, family, None)


def step_gpu(run: Run, family: str) -> tuple[float, dict[str, Any]]:
    """Batched (all consecutive pairs in batches, and one batch) and single pairs on CUDA."""
    import torch

    if not torch.cuda.is_available():
        return 0.0, {"available": False}
    count = min(run.speed_pairs, run.slices - 1)
    info: dict[str, Any] = {"available": True, "name": torch.cuda.get_device_name(0)}
    info["speed"] = _speed(run, family, "cuda", count)
    data = _load(run, family)
    image = data["image"]
    for name, batch in (("all_batched", run.batch), ("all_one_batch", len(image) - 1)):
        measured = timed(lambda b=batch: _batched(image[:-1], image[1:], family, "cuda", b))
        composed = _chain(measured["info"]["matrices"])
        info[name] = {"batch": batch, "seconds": measured["seconds"],
                      "pairs_per_second": (len(image) - 1) / measured["seconds"],
                      "composed": _errors(composed, data["transforms"], run.frame)}  # fmt: skip
    return info["all_batched"]["seconds"], info


STEP_FUNCS: dict[str, Callable[[Run, str], tuple[float, dict[str, Any]]]] = {
    "input": step_input,
    "register": step_register,
    "drift": step_drift,
    "speed": step_speed,
    "ants": step_ants,
    "data": step_data,
    "flow": step_flow,
    "floor": step_floor,
    "warp": step_warp,
    "warp_pyramid": step_warp_pyramid,
    "gpu": step_gpu,
}
IMPORTS = {
    "input": ("numpy", "voxflow.core.synth"),
    "register": ("numpy", "torch", "voxflow.core.register", "voxflow.core.stack"),
    "drift": ("numpy", "torch", "voxflow.core.register", "voxflow.core.stack"),
    "speed": ("numpy", "torch", "voxflow.core.register", "voxflow.core.stack"),
    "ants": ("numpy", "ants", "voxflow.core.stack"),
    "flow": ("numpy", "voxflow.flows.register"),
    "floor": ("tensorstore",),
    "warp": ("numpy", "tensorstore", "voxflow.tasks.register", "voxflow.core.warp"),
    "warp_pyramid": ("numpy", "tensorstore", "voxflow.tasks.register", "voxflow.core.warp"),
    "gpu": ("numpy", "torch", "voxflow.core.register", "voxflow.core.stack"),
}


def run_child(args: argparse.Namespace) -> None:
    for module in IMPORTS.get(args._step, ()):
        importlib.import_module(module)
    run = _run_of(args)
    start_rss = peak_rss_mib()
    seconds, info = STEP_FUNCS[args._step](run, args._family)
    dropped = bool(info.pop("cache_dropped", False))
    write_result(args._result, seconds, start_rss, dropped, **_plain(info))


def _plain(value: Any) -> Any:
    """`value` with numpy scalars and arrays turned into JSON types."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    if hasattr(value, "tolist"):
        return value.tolist()
    return value


# --------------------------------------------------------------------------- orchestration


def _child_argv(run: Run, step: str, family: str) -> list[str]:
    return [
        os.path.abspath(__file__), "--_step", step, "--_family", family,
        "--workdir", str(run.workdir), "--slices", str(run.slices), "--size", str(run.size),
        "--batch", str(run.batch), "--device", run.device,
        "--speed-pairs", str(run.speed_pairs), "--ants-pairs", str(run.ants_pairs),
        "--repeat", str(run.repeat), "--in-flight", str(run.in_flight),
    ]  # fmt: skip


def _step(run: Run, step: str, family: str, failed: dict[str, str]) -> dict[str, Any] | None:
    """Run one step in its own process; its figures, or None (and `failed` noted) on failure."""
    print(f"   {step:<12} {family:<11}", end=" ", flush=True)
    try:
        result = run_step(f"{step} {family}", _child_argv(run, step, family))
    except RuntimeError as err:
        failed[f"{step} {family}"] = str(err)
        print(f"FAILED ({err}; its traceback is above)", flush=True)
        return None
    print(f"{result.seconds:8.2f} s   peak RSS {result.peak_rss_mib:6.0f} MiB", flush=True)
    return {"seconds": result.seconds, "peak_rss_mib": result.peak_rss_mib,
            "start_rss_mib": result.start_rss_mib, "cache_dropped": result.cache_dropped,
            **result.info}  # fmt: skip


def _ensure_stack(run: Run, family: str, failed: dict[str, str]) -> dict[str, Any]:
    """Generate the stack of `family` unless an identical one is cached."""
    if run.stack(family).exists():
        return {"reused": True}
    made = _step(run, "input", family, failed)
    return {"reused": False, **(made or {})}


def _ensure_data(run: Run, family: str, failed: dict[str, str]) -> dict[str, Any]:
    """Write the OME-Zarr dataset of `family` unless an identical one is there."""
    marker = run.data(family) / "bench.json"
    want = {"tag": run.tag, "layout": DATA_LAYOUT}
    if marker.exists() and json.loads(marker.read_text()) == want:
        return {"reused": True}
    made = _step(run, "data", family, failed)
    if made is not None:
        marker.write_text(json.dumps(want))
    return {"reused": False, **(made or {})}


@dataclass(frozen=True)
class Plan:
    """Which steps run on which families."""

    steps: tuple[str, ...]
    families: tuple[str, ...]
    drift: tuple[str, ...]
    ants: tuple[str, ...]
    focus: str


def run_family(run: Run, plan: Plan, family: str, failed: dict[str, str]) -> dict[str, Any]:
    print(f"\n== {family}: {run.slices} slices of {run.size}x{run.size}", flush=True)
    res: dict[str, Any] = {"input": _ensure_stack(run, family, failed)}
    if f"input {family}" in failed:
        return res
    wanted = [
        ("register", True),
        ("drift", family in plan.drift),
        ("ants", family in plan.ants),
        ("speed", family == plan.focus),
    ]
    for step, applies in wanted:
        needs_pairs = step in ("drift", "ants") and not run.pairs(family).exists()
        if step in plan.steps and applies and not needs_pairs:
            res[step] = _step(run, step, family, failed)
    if family == plan.focus and {"flow", "warp"} & set(plan.steps):
        res["data"] = _ensure_data(run, family, failed)
        if "flow" in plan.steps:
            res["flow"] = _step(run, "flow", family, failed)
        if "warp" in plan.steps:
            for step in ("floor", "warp", "warp_pyramid"):
                res[step] = _step(run, step, family, failed)
    if family == plan.focus and "gpu" in plan.steps:
        res["gpu"] = _step(run, "gpu", family, failed)
    return {k: v for k, v in res.items() if v is not None}


# --------------------------------------------------------------------------- report


def _f(value: float | None, spec: str = ".3f") -> str:
    return "n/a" if value is None else f"{value:{spec}}"


def _box(box: list[list[int]]) -> str:
    (y0, y1), (x0, x1) = box
    return f"{y0}:{y1},{x0}:{x1}"


def _accuracy_table(results: dict[str, dict[str, Any]]) -> str:
    rows = []
    for family, res in results.items():
        r = res.get("register")
        if r is None:
            continue
        rows.append([
            family, r["pairs"], f"{r['seconds']:.1f}", f"{r['pairs'] / r['seconds']:.2f}",
            _f(r["pairwise"]["max"]), _f(r["pairwise"]["mean"]), _f(r["composed"]["max"]),
            _f(r["composed"]["mean"]), _f(r["composed"]["end"]), _box(r["box"]),
            _box(r["truth_box"]), r["box_diff"], f"{r['steps_mean']:.0f}",
            f"{r['converged']}/{r['pairs']}", _f(r["other_cpu_seconds"], ".1f"),
        ])  # fmt: skip
    headers = ["family", "pairs", "seconds", "pairs/s", "pair max", "pair mean", "slice max",
               "slice mean", "last slice", "crop box", "true box", "box diff", "steps",
               "converged", "others' CPU s"]  # fmt: skip
    return format_table(headers, rows)


def _drift_table(results: dict[str, dict[str, Any]]) -> str:
    rows = []
    for family, res in results.items():
        d = res.get("drift")
        if d is None:
            continue
        c, s = d["chain"], d["solved"]
        rows.append([
            family, d["extra_pairs"], f"{d['register_seconds']:.1f}", f"{d['solve_seconds']:.3f}",
            _f(c["composed"]["end"]), _f(s["composed"]["end"]), _f(c["composed"]["max"]),
            _f(s["composed"]["max"]), _f(c["composed"]["mean"]), _f(s["composed"]["mean"]),
            c["box_diff"], s["box_diff"],
            " / ".join(f"{v['max']:.2f}" for v in d["extra_pairwise"].values()),
            d["extra_over_1px"],
        ])  # fmt: skip
    headers = ["family", "extra pairs", "register s", "solve s", "chain last", "solved last",
               "chain max", "solved max", "chain mean", "solved mean", "chain box diff",
               "solved box diff", "extra pair max (i-2 / i-3)", "extra > 1 px"]  # fmt: skip
    return format_table(headers, rows)


def _speed_lines(family: str, s: dict[str, Any], device: str) -> list[str]:
    rows = []
    for mode in ("batched", "single"):
        m = s[mode]
        label = f"one batch of {s['batch']}" if mode == "batched" else "one pair at a time (B=1)"
        rows.append([label, s["pairs"], f"{m['seconds']:.2f}", f"{m['pairs_per_second']:.3f}",
                     _f(m["pairwise"]["max"]), _f(m["pairwise"]["mean"]),
                     f"{m['steps_mean']:.0f}", _f(m["cpu_seconds"], ".1f"),
                     _f(m["other_cpu_seconds"], ".1f")])  # fmt: skip
    headers = ["mode", "pairs", "seconds", "pairs/s", "pair max", "pair mean", "steps",
               "CPU s", "others' CPU s"]  # fmt: skip
    lines = [
        f"\nspeed on {device}, {family}: the first {s['pairs']} consecutive pairs, the same "
        f"settings (flow defaults), fastest of {s['repeat']} alternated runs of each mode; pixel "
        "RMS against the true pairwise transforms",
        format_table(headers, rows),
        f"   batched / single speed-up {s['speedup']:.2f}x; the two results differ by at most "
        f"{s['batched_vs_single_rms_max']:.3f} px RMS; every run (s): "
        + "; ".join(f"{k} " + ", ".join(f"{t:.1f}" for t in v) for k, v in s["runs"].items()),
    ]
    if any(s[m]["other_cpu_seconds"] > CONTENDED * s[m]["seconds"] for m in ("batched", "single")):
        lines.append(
            "   WARNING: other processes used the cores during the fastest run; torch's thread "
            "pool slows down many times when a core is taken: rerun when quiet"
        )
    return lines


def _ants_table(results: dict[str, dict[str, Any]]) -> str:
    rows = []
    for family, res in results.items():
        a, r = res.get("ants"), res.get("register")
        if a is None:
            continue
        ours = r["seconds"] / r["pairs"] if r else None
        chk = a["conversion_check_pair_1"]
        rows.append([
            f"{family} ({a['ants_transform']})", a["pairs"], f"{a['ants_seconds_per_pair']:.2f}",
            _f(ours, ".2f"), _f(a["ants"]["pairwise"]["max"]), _f(a["voxflow"]["pairwise"]["max"]),
            _f(a["ants"]["pairwise"]["median"]), _f(a["voxflow"]["pairwise"]["median"]),
            a["ants"]["pairwise"]["over_1px"], a["voxflow"]["pairwise"]["over_1px"],
            _f(a["ants"]["composed"]["end"]), _f(a["voxflow"]["composed"]["end"]),
            f"{chk['as_stated']:.3f} / {chk['inverted']:.2f}",
        ])  # fmt: skip
    headers = ["family (ANTs type)", "pairs", "ANTs s/pair", "voxflow s/pair", "ANTs pair max",
               "voxflow pair max", "ANTs pair median", "voxflow pair median", "ANTs > 1 px",
               "voxflow > 1 px", "ANTs last",
               "voxflow last", "check: as stated / inverted"]  # fmt: skip
    return format_table(headers, rows)


def _flow_lines(family: str, f: dict[str, Any]) -> list[str]:
    rows = [[family, f["pairs"], f"{f['seconds']:.1f}", _f(f["composed"]["max"]),
             _f(f["composed"]["mean"]), _f(f["composed"]["end"]), _box(f["box"]),
             _box(f["truth_box"]), f["box_diff"], _f(f.get("vs_core_rms_max"), ".2e"),
             f"{f['converged']}/{f['pairs']}", f"{f['peak_rss_mib']:.0f}"]]  # fmt: skip
    headers = ["family", "pairs", "seconds", "slice max", "slice mean", "last slice",
               "crop box", "true box", "box diff", "vs core", "converged",
               "peak RSS MiB"]  # fmt: skip
    return [
        "\nthe registration flow end to end (run_registration on the written OME-Zarr, a "
        "threaded local cluster, Prefect's ephemeral API, fresh result storage): "
        "transforms.json against the truth, and its composed transforms against the core run's",
        format_table(headers, rows),
    ]


def _warp_lines(res: dict[str, Any], run: Run) -> list[str]:
    floor = res.get("floor")
    nbytes = run.slices * run.size * run.size
    labels = {"floor": "copy floor (TensorStore read + write level 0)",
              "warp": "voxflow warp_stack, level 0 only",
              "warp_pyramid": "voxflow warp_stack, with its pyramid"}  # fmt: skip
    rows = []
    for step, label in labels.items():
        s = res.get(step)
        if s is None:
            continue
        ratio = s["seconds"] / floor["seconds"] if floor else None
        guard = s.get("max_abs_diff_vs_warp_slices", "")
        rows.append([label, f"{s['seconds']:.3f}", f"{nbytes / s['seconds'] / 1e6:.0f}",
                     _f(ratio, ".2f"), _f(s["cpu_seconds"], ".2f"),
                     _f(s["other_cpu_seconds"], ".2f"), f"{s['peak_rss_mib']:.0f}",
                     guard])  # fmt: skip
    headers = ["step", "seconds", "MB/s", "x floor", "CPU s", "others' CPU s", "peak RSS MiB",
               "max |diff| vs warp_slices"]  # fmt: skip
    return [
        f"\nwarp + write against the I/O floor: {run.slices}x{run.size}x{run.size} uint8 "
        f"({nbytes / MiB:.0f} MiB), true transforms and box; best of {run.repeat}; MB/s of "
        "input",
        format_table(headers, rows),
    ]


def _gpu_lines(g: dict[str, Any]) -> list[str]:
    if not g.get("available"):
        return ["\nGPU: torch.cuda.is_available() is False here; no GPU figures"]
    s = g["speed"]
    return [
        f"\nGPU ({g['name']}): all pairs in batches of {g['all_batched']['batch']}: "
        f"{g['all_batched']['pairs_per_second']:.2f} pairs/s (slice max "
        f"{g['all_batched']['composed']['max']:.3f} px); in one batch: "
        f"{g['all_one_batch']['pairs_per_second']:.2f} pairs/s; first {s['pairs']} pairs "
        f"batched {s['batched']['pairs_per_second']:.2f} pairs/s vs single "
        f"{s['single']['pairs_per_second']:.2f} pairs/s ({s['speedup']:.2f}x)",
    ]


def _rule(path: tuple[str, ...], limit: float, unit: str) -> Callable[[dict], tuple]:
    def rule(res: dict[str, Any]) -> tuple[bool | None, str]:
        value: Any = res
        for key in path:
            if not isinstance(value, dict) or key not in value:
                return None, "n/a"
            value = value[key]
        return value <= limit, f"{value:.3f}{unit}" if unit else f"{value}"

    return rule


def _rule_speedup(res: dict[str, Any]) -> tuple[bool | None, str]:
    s = res.get("speed")
    if s is None:
        return None, "n/a"
    return s["speedup"] >= SPEEDUP_TARGET, f"{s['speedup']:.2f}x"


def _rule_floor(res: dict[str, Any]) -> tuple[bool | None, str]:
    if "warp" not in res or "floor" not in res:
        return None, "n/a"
    ratio = res["warp"]["seconds"] / res["floor"]["seconds"]
    return ratio <= FLOOR_TARGET, f"{ratio:.2f}x"


TARGET_RULES = [
    (f"chain: every slice <= {RMS_TARGET} px RMS",
     _rule(("register", "composed", "max"), RMS_TARGET, " px")),
    (f"crop box within {BOX_TARGET} px of the truth",
     _rule(("register", "box_diff"), BOX_TARGET, "")),
    (f"drift control (k={NEIGHBOURS}): every slice <= {RMS_TARGET} px",
     _rule(("drift", "solved", "composed", "max"), RMS_TARGET, " px")),
    (f"flow transforms.json: every slice <= {RMS_TARGET} px",
     _rule(("flow", "composed", "max"), RMS_TARGET, " px")),
    (f"batched >= {SPEEDUP_TARGET:g}x one pair at a time", _rule_speedup),
    (f"warp + write <= {FLOOR_TARGET:g}x the copy floor", _rule_floor),
]  # fmt: skip


def _machine() -> dict[str, Any]:
    return machine(("voxflow", "torch", "antspyx", "numpy", "scipy", "tensorstore", "prefect"))


def report(results: dict[str, dict[str, Any]], run: Run, plan: Plan) -> dict[str, Any]:
    print("\n" + "=" * 100)
    print("machine: " + ", ".join(f"{k} {v}" for k, v in _machine().items()))
    print(f"stacks: em_stack({run.slices}x{run.size}x{run.size}, seed={SEED}, noise={NOISE}, "
          f"contrast={CONTRAST}), one per family; registration on {run.device} with the flow's "
          f"defaults (ncc, levels 8/4/2/1, patience 10), batches of {run.batch}")  # fmt: skip
    print("figures: pixel RMS (px) of each slice's composed transform against the truth over "
          "the whole frame; 'pair' the same for the pairwise transforms")  # fmt: skip
    print("\naccuracy per family (consecutive pairs, composed; crop box ((y0:y1), (x0:x1)))")
    print(_accuracy_table(results))
    if any("drift" in r for r in results.values()):
        print("\ndrift control: pairs (i, i-2) and (i, i-3) added to the chain, solve_stack "
              "over all; error of the last slice (end of stack), largest and mean")  # fmt: skip
        print(_drift_table(results))
    focus = results.get(plan.focus, {})
    if "speed" in focus:
        print("\n".join(_speed_lines(plan.focus, focus["speed"], run.device)))
    if any("ants" in r for r in results.values()):
        print("\nANTs (ants.registration, its defaults, fixed = slice k, moving = slice k-1) and "
              "voxflow on the same first pairs; 'last' is the composed error of the last of "
              "those slices; check: ANTs pair 1 converted as stated / inverted (px)")  # fmt: skip
        print(_ants_table(results))
    if "flow" in focus:
        print("\n".join(_flow_lines(plan.focus, focus["flow"])))
    if "floor" in focus or "warp" in focus:
        print("\n".join(_warp_lines(focus, run)))
    if "gpu" in focus:
        print("\n".join(_gpu_lines(focus["gpu"])))
    table, targets = targets_table(results, TARGET_RULES)
    print("\ntargets\n" + table)
    return {"targets": targets}


# --------------------------------------------------------------------------- entry point


def _names(text: str, allowed: tuple[str, ...], option: str) -> tuple[str, ...]:
    names = tuple(s.strip() for s in text.split(",") if s.strip())
    unknown = sorted(set(names) - set(allowed))
    if unknown:
        raise ValueError(f"{option}: unknown {unknown}; choose from {', '.join(allowed)}")
    return tuple(s for s in allowed if s in names)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add = parser.add_argument
    add("--quick", action="store_true",
        help=f"small stacks: {QUICK['slices']} slices of {QUICK['size']}^2, "
             f"{QUICK['speed_pairs']} speed pairs")  # fmt: skip
    add("--slices", type=int, help=f"slices per stack (default {SLICES})")
    add("--size", type=int, help=f"slice edge in pixels (default {SIZE})")
    add("--families", default=",".join(FAMILIES), help="transform families to measure")
    add("--steps", default=",".join(STEPS), help=f"steps to run, of: {', '.join(STEPS)}")
    add("--focus", default=FOCUS, choices=FAMILIES,
        help="family of the speed, flow, warp and GPU steps")  # fmt: skip
    add("--drift-families", default=",".join(FAMILIES), help="families of the drift step")
    add("--ants-families", default=",".join(FAMILIES), help="families ANTs registers")
    add("--batch", type=int, default=BATCH, help="pairs per batch (the flow's default)")
    add("--device", default="cpu", help="torch device of voxflow's steps: cpu, cuda, auto")
    add("--speed-pairs", type=int, help=f"pairs of the speed step (default {SPEED_PAIRS})")
    add("--ants-pairs", type=int, help="pairs ANTs registers per family (default: all)")
    add("--repeat", type=int, default=5, help="timed runs of the warp and floor (fastest counts)")
    add("--in-flight", type=int, default=IN_FLIGHT, help="TensorStore I/O pending in the floor")
    add("--workdir", default=os.path.join(os.environ.get("TMPDIR", "/tmp"),
                                          "voxflow-bench-register"),
        help="cached stacks, datasets and outputs")  # fmt: skip
    add("--json", help="also write every figure here as JSON")
    add("--_step", help=argparse.SUPPRESS)
    add("--_family", help=argparse.SUPPRESS)
    add("--_result", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def _run_of(args: argparse.Namespace) -> Run:
    quick = QUICK if args.quick else {}

    def pick(name: str, default: int) -> int:
        value = getattr(args, name)
        return value if value is not None else quick.get(name, default)

    run = Run(
        workdir=Path(args.workdir).resolve(), slices=pick("slices", SLICES),
        size=pick("size", SIZE), batch=args.batch, device=args.device,
        speed_pairs=pick("speed_pairs", SPEED_PAIRS), ants_pairs=pick("ants_pairs", ANTS_PAIRS),
        repeat=args.repeat, in_flight=args.in_flight,
    )  # fmt: skip
    if run.slices < NEIGHBOURS + 1 or run.size < 64:
        raise ValueError(f"--slices must be >= {NEIGHBOURS + 1} and --size >= 64, got "
                         f"{run.slices} and {run.size}")  # fmt: skip
    for name in ("batch", "speed_pairs", "ants_pairs", "repeat", "in_flight"):
        if getattr(run, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(run, name)}")
    return run


def _plan_of(args: argparse.Namespace) -> Plan:
    return Plan(
        steps=_names(args.steps, STEPS, "--steps"),
        families=_names(args.families, FAMILIES, "--families"),
        drift=_names(args.drift_families, FAMILIES, "--drift-families"),
        ants=_names(args.ants_families, FAMILIES, "--ants-families"),
        focus=args.focus,
    )


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args._step:
        run_child(args)
        return 0
    try:
        run, plan = _run_of(args), _plan_of(args)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    run.workdir.mkdir(parents=True, exist_ok=True)
    dropped = drop_page_cache()
    failed: dict[str, str] = {}
    t0 = time.perf_counter()
    families = [f for f in FAMILIES if f in {*plan.families, *plan.drift, *plan.ants, plan.focus}]
    results = {f: run_family(run, plan, f, failed) for f in families}
    total = time.perf_counter() - t0
    summary = report(results, run, plan)
    print(f"\nwhole run {total:.0f} s (stack generation and caching included)")
    for step, err in failed.items():
        print(f"   FAILED {step}: {err}")
    doc = {"machine": _machine(), "page_cache_dropped": dropped, "run": _plain(asdict(run)),
           "plan": asdict(plan), "families": results, "failed": failed,
           "total_seconds": total, **summary}  # fmt: skip
    for path in {run.workdir / "results.json", *([Path(args.json)] if args.json else [])}:
        path.write_text(json.dumps(doc, indent=1, default=str))
    print(f"\nresults: {run.workdir / 'results.json'}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
