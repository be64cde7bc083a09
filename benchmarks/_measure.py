"""Measurement helpers for the benchmarks: page cache, one subprocess per step, tables.

Every measured step runs in a process of its own, so its peak resident memory is its own (read
from ``wait4``'s resource usage, which covers the whole life of that process) and no step
inherits another's caches, thread pools or heap.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = [
    "MiB",
    "StepResult",
    "best_of",
    "bounded",
    "cpu_seconds",
    "drop_page_cache",
    "ensure_venv",
    "format_table",
    "machine_busy_seconds",
    "peak_rss_mib",
    "pip_install",
    "regions",
    "run_step",
    "stored_bytes",
    "timed",
    "ts_copy_meta",
    "ts_open",
    "write_result",
]

MiB = 2**20
_DROP_CACHES = Path("/proc/sys/vm/drop_caches")


def drop_page_cache() -> bool:
    """Flush dirty pages and drop the OS page cache; False when not allowed (not root).

    Returns
    -------
    bool
        Whether the cache was dropped.
    """
    os.sync()
    try:
        _DROP_CACHES.write_text("3\n")
    except OSError:
        return False
    return True


def cpu_seconds() -> float:
    """User + system CPU time of this process, all its threads."""
    t = os.times()
    return t.user + t.system


def machine_busy_seconds() -> float:
    """CPU time spent by every process of the machine since boot (Linux ``/proc/stat``).

    Its growth over a timed step minus :func:`cpu_seconds`' growth is what other processes
    used meanwhile: a step that shared the cores with them was slowed down.
    """
    try:
        fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]
    except OSError:
        return float("nan")
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(v) for v in fields[:8])
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def peak_rss_mib() -> float:
    """Peak resident memory of this process so far, in MiB (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / MiB


def bounded(start: Callable[[Any], Any], items: Iterable[Any], in_flight: int) -> int:
    """Start an asynchronous operation per item, with at most `in_flight` pending at once.

    Parameters
    ----------
    start : callable
        Takes an item and returns a future with ``.result()`` (a TensorStore read or write).
    items : iterable
        What to start operations on, in order.
    in_flight : int
        Most operations pending at a time; bounds the memory the operations hold.

    Returns
    -------
    int
        Number of operations run.
    """
    pending: list[Any] = []
    done = 0
    for item in items:
        if len(pending) >= in_flight:
            pending.pop(0).result()
            done += 1
        pending.append(start(item))
    for future in pending:
        future.result()
        done += 1
    return done


@dataclass
class StepResult:
    """What one measured step reported, plus the peak memory of its process.

    Parameters
    ----------
    name : str
        Step name.
    seconds : float
        Wall time of the timed part (set-up, imports and untimed preparation excluded).
    peak_rss_mib : float
        Peak resident memory of the step's process over its whole life.
    start_rss_mib : float
        Peak resident memory before the timed part (interpreter, imports, preparation).
    cache_dropped : bool
        Whether the page cache was dropped right before the timed part.
    info : dict
        Anything else the step reported.
    """

    name: str
    seconds: float
    peak_rss_mib: float
    start_rss_mib: float
    cache_dropped: bool
    info: dict[str, Any] = field(default_factory=dict)


def write_result(path: str, seconds: float, start_rss_mib: float, cache_dropped: bool,
                 **info: Any) -> None:  # fmt: skip
    """Write a step's report where the parent process reads it (called in the step process)."""
    doc = {"seconds": seconds, "start_rss_mib": start_rss_mib, "cache_dropped": cache_dropped,
           "info": info}  # fmt: skip
    Path(path).write_text(json.dumps(doc))


def run_step(name: str, argv: Sequence[str], *, python: str | None = None) -> StepResult:
    """Run one step as ``python argv... --_result FILE`` and collect its report and peak RSS.

    Parameters
    ----------
    name : str
        Step name (for the result and error messages).
    argv : sequence of str
        Arguments after the interpreter.
    python : str, optional
        Interpreter to run the step with (a peer's own virtual environment); this one's by
        default.

    Returns
    -------
    StepResult
        The step's report with the peak RSS of its process.

    Raises
    ------
    RuntimeError
        When the step process fails.
    """
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as handle:
        result_path = handle.name
    try:
        proc = subprocess.Popen([python or sys.executable, *argv, "--_result", result_path])
        start = time.perf_counter()
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
        if proc.returncode != 0:
            raise RuntimeError(f"step {name!r} failed with exit status {proc.returncode}")
        doc = json.loads(Path(result_path).read_text())
    finally:
        os.unlink(result_path)
    doc["info"]["process_seconds"] = time.perf_counter() - start
    return StepResult(
        name=name,
        seconds=doc["seconds"],
        peak_rss_mib=usage.ru_maxrss * 1024 / MiB,
        start_rss_mib=doc["start_rss_mib"],
        cache_dropped=doc["cache_dropped"],
        info=doc["info"],
    )


def format_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A plain-text table: first column left-aligned, the others right-aligned."""
    cells = [[str(h) for h in headers]] + [["" if c is None else str(c) for c in r] for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]

    def line(row: Sequence[str]) -> str:
        first = row[0].ljust(widths[0])
        rest = (c.rjust(w) for c, w in zip(row[1:], widths[1:], strict=True))
        return "  ".join([first, *rest]).rstrip()

    rule = "  ".join("-" * w for w in widths)
    return "\n".join([line(cells[0]), rule, *(line(r) for r in cells[1:])])


def timed(run: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """Run `run` once and measure it: wall time, this process's CPU time, other processes' CPU.

    Returns
    -------
    dict
        ``seconds``, ``cpu_seconds``, ``other_cpu_seconds`` and ``info`` (what `run` returned).
    """
    c0, b0, t0 = cpu_seconds(), machine_busy_seconds(), time.perf_counter()
    info = run()
    seconds, cpu = time.perf_counter() - t0, cpu_seconds() - c0
    others = max(machine_busy_seconds() - b0 - cpu, 0.0)
    return {"seconds": seconds, "cpu_seconds": cpu, "other_cpu_seconds": others, "info": info}


def best_of(
    run: Callable[[], dict[str, Any]], prepare: Callable[[], None], repeat: int
) -> tuple[dict[str, Any], bool]:
    """Time `run` `repeat` times, each after `prepare` and from a cold page cache when allowed.

    Parameters
    ----------
    run : callable
        The timed work; returns a dict of figures about it.
    prepare : callable
        Untimed set-up before every run (removing the previous output, say).
    repeat : int
        Number of timed runs.

    Returns
    -------
    best : dict
        The fastest run as :func:`timed` reports it, with ``info["runs"]`` the wall time of
        every run.
    dropped : bool
        Whether the page cache was dropped before the runs.
    """
    runs, dropped = [], False
    for _ in range(repeat):
        prepare()
        dropped = drop_page_cache()
        runs.append(timed(run))
    best = min(runs, key=lambda r: r["seconds"])
    best["info"] = {**best["info"], "runs": [r["seconds"] for r in runs]}
    return best, dropped


def regions(shape: Sequence[int], unit: Sequence[int]) -> Iterable[tuple[slice, ...]]:
    """Every write-unit (shard) region of an array, in C order."""
    starts = [range(0, n, u) for n, u in zip(shape, unit, strict=True)]
    for corner in itertools.product(*starts):
        yield tuple(slice(c, min(c + u, n)) for c, u, n in zip(corner, unit, shape, strict=True))


def stored_bytes(path: Path) -> int:
    """Bytes of every file below `path`."""
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())


def ts_open(path: Path, context: Any = None, **extra: Any) -> Any:
    """Open (or, with ``metadata=..., create=True``, create) a zarr v3 array with TensorStore."""
    import tensorstore as ts

    spec = {"driver": "zarr3", "kvstore": {"driver": "file", "path": f"{path}/"}, **extra}
    return ts.open(spec, context=context or ts.Context()).result()


def ts_copy_meta(like: Path) -> dict[str, Any]:
    """The array metadata of the zarr v3 array at `like` (codecs, chunks, shape), for a copy."""
    meta = json.loads((Path(like) / "zarr.json").read_text())
    return {k: v for k, v in meta.items() if k not in ("attributes", "node_type", "zarr_format")}


def codec_label(array: Path) -> str:
    """``blosc zstd 2 + shuffle``, ``gzip 6``, ...: the compressor of the array at `array`."""
    codecs = ts_copy_meta(array)["codecs"]
    if codecs and codecs[0]["name"] == "sharding_indexed":
        codecs = codecs[0]["configuration"]["codecs"]  # the inner chunks'
    for codec in codecs:
        cfg = codec.get("configuration", {})
        if codec["name"] == "blosc":
            shuffle = "" if cfg.get("shuffle") == "noshuffle" else f" + {cfg.get('shuffle')}"
            return f"blosc {cfg['cname']} {cfg['clevel']}{shuffle}"
        if codec["name"] in ("zstd", "gzip"):
            return f"{codec['name']} {cfg.get('level')}"
    return "uncompressed"


def verdict(ok: bool | None, detail: str) -> str:
    """PASS/FAIL (or n/a when the figure is missing) with the figure that decided it."""
    if ok is None:
        return f"n/a ({detail})" if detail != "n/a" else "n/a (step missing)"
    return f"{'PASS' if ok else 'FAIL'} ({detail})"


def targets_table(
    results: dict[str, dict[str, Any]],
    rules: Sequence[tuple[str, Callable[[dict[str, Any]], tuple[bool | None, str]]]],
) -> tuple[str, list[dict[str, Any]]]:
    """One row per target rule, one column per case: the table and its JSON."""
    rows, doc = [], []
    for label, rule in rules:
        verdicts = {name: rule(res) for name, res in results.items()}
        rows.append([label, *(verdict(*v) for v in verdicts.values())])
        doc.append(
            {
                "target": label,
                **{n: {"pass": ok, "value": detail} for n, (ok, detail) in verdicts.items()},
            }
        )
    return format_table(["target", *results], rows), doc


def memory_table(
    results: dict[str, dict[str, Any]],
    steps: Sequence[str],
    labels: dict[str, str],
    ours: Callable[[str], bool],
    growth_limit: float,
) -> tuple[str, list[dict[str, Any]]]:
    """Peak RSS of the largest case against the smallest one, per step (ours judged)."""
    if len(results) < 2:
        return "   (the memory target needs two sizes)", []
    ordered = sorted(results.items(), key=lambda kv: math.prod(kv[1]["shape"]))
    (small, s_res), (large, l_res) = ordered[0], ordered[-1]
    growth = math.prod(l_res["shape"]) / math.prod(s_res["shape"])
    rows, doc = [], []
    for step in steps:
        if step not in s_res["steps"] or step not in l_res["steps"]:
            continue
        a, b = s_res["steps"][step]["peak_rss_mib"], l_res["steps"][step]["peak_rss_mib"]
        ok = b <= growth_limit * a
        judged = verdict(ok, f"{b / a:.2f}x") if ours(step) else f"({b / a:.2f}x, peer)"
        rows.append([labels[step], f"{a:.0f}", f"{b:.0f}", judged])
        doc.append({"step": step, small: a, large: b, "ratio": b / a, "pass": ok})
    title = (
        f"peak RSS (MiB), {large} has {growth:.0f}x the voxels of {small}; target: voxflow's "
        f"peak at {large} <= {growth_limit}x its peak at {small}"
    )
    return f"{title}\n{format_table(['step', small, large, 'verdict'], rows)}", doc


def add_common_arguments(parser: Any, workdir: str, in_flight: int, in_flight_help: str) -> None:
    """The options every benchmark takes: sizes, work directory, JSON, keep, repeat, in-flight."""
    add = parser.add_argument
    add(
        "--sizes",
        default="small,large",
        help="comma-separated sizes: small (256x512x512), large (1024^3) or ZxYxX",
    )
    add(
        "--workdir",
        default=os.path.join(tempfile.gettempdir(), workdir),
        help="where inputs (kept for the next run) and outputs go",
    )
    add("--json", help="also write every figure here as JSON")
    add("--keep", action="store_true", help="keep the outputs of every step")
    add(
        "--repeat",
        type=int,
        default=3,
        help="timed runs per step, each from a cold cache; the fastest is reported",
    )
    add("--in-flight", type=int, default=in_flight, help=in_flight_help)


def pip_install(python: Path, *args: str) -> None:
    """``pip install --quiet ARGS`` with the interpreter `python`."""
    subprocess.run([str(python), "-m", "pip", "install", "--quiet", *args], check=True)


def ensure_venv(
    venv: Path,
    base_python: str,
    requirements: Sequence[str],
    *,
    name: str,
    prepare: Callable[[Path], None] | None = None,
) -> Path:
    """A peer's own virtual environment, made on first use; return its interpreter.

    The environment is remade when it was made for other `requirements` (a marker file holds
    them). `prepare(python)` runs after the environment is created and before the install.
    """
    python = venv / "bin" / "python"
    marker = venv / ".voxflow-bench"
    spec = " ".join(requirements)
    if python.exists() and marker.exists() and marker.read_text() == spec:
        return python
    print(f"   making {name}'s environment in {venv} ({spec})", flush=True)
    shutil.rmtree(venv, ignore_errors=True)
    subprocess.run([base_python, "-m", "venv", str(venv)], check=True)
    if prepare is not None:
        prepare(python)
    pip_install(python, *requirements)
    marker.write_text(spec)
    return python


def package_versions(packages: Sequence[str]) -> dict[str, str]:
    """The installed version of each of `packages`, "absent" when not installed."""
    from importlib.metadata import PackageNotFoundError, version

    found = {}
    for p in packages:
        try:
            found[p] = version(p)
        except PackageNotFoundError:
            found[p] = "absent"
    return found


def machine(packages: Sequence[str]) -> dict[str, Any]:
    """Cores, memory, Python and the versions of `packages` ("absent" when not installed)."""
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return {
        "cpus": os.cpu_count(),
        "memory_gib": round(memory / 2**30, 1),
        "python": platform.python_version(),
        **package_versions(packages),
    }
