"""The ``voxflow`` command."""

from __future__ import annotations

import concurrent.futures
import contextlib
import functools
import logging
import os
import re
import sys
import threading
import time
import traceback
import uuid
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from pydantic import ValidationError
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

# The stages import their flows (and with them Prefect, Dask, TensorStore, torch) only when
# they run: `voxflow --help` and `voxflow info` stay quick, and a command loads what it uses.
from voxflow.flows.synth import SYNTH_DEFAULTS
from voxflow.settings import StorageSettings, VoxflowSettings

if TYPE_CHECKING:
    from voxflow.flows.segment import SegmentationConfig
    from voxflow.io import ImageRef

__all__ = ["app", "main"]

app = typer.Typer(
    name="voxflow",
    help="Process very large OME-Zarr microscopy volumes: pyramids, and the stages built on them.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
synth_app = typer.Typer(help="Write synthetic datasets with ground truth.", no_args_is_help=True)
app.add_typer(synth_app, name="synth")

out = Console()
err = Console(stderr=True)


@app.callback()
def _quiet(
    verbose: Annotated[bool, typer.Option("--verbose", help="Show Prefect and Dask logs.")] = False,
) -> None:
    """The command draws its own progress and reports its own errors, in one line each.

    Unless asked for, library logs stay quiet: Prefect's record of a failed task (with its
    traceback) would repeat the error the command prints; warnings print as one line.
    """
    _state["verbose"] = verbose
    if verbose:
        return
    os.environ.setdefault("DASK_LOGGING__DISTRIBUTED", "error")  # worker processes
    logging.getLogger("distributed").setLevel(logging.ERROR)
    logging.getLogger("prefect").setLevel(logging.CRITICAL)
    os.environ.setdefault("PREFECT_LOGGING_LEVEL", "CRITICAL")
    # Prefect's services outside its `prefect` logger (its event sender) log at the root
    # logger of every process, the Dask workers' included.
    os.environ.setdefault("PREFECT_LOGGING_ROOT_LEVEL", "ERROR")
    # Another local cluster (another command) holds the dashboard port: this one takes a free
    # port, which is all the message says.
    warnings.filterwarnings("ignore", message="Port .* is already in use")
    warnings.formatwarning = _warning_line
    # Prefect's embedded API logs a cancelled SQLite rollback as it shuts down; it is harmless.
    logging.getLogger("sqlalchemy.pool").setLevel(logging.CRITICAL)


def _warning_line(message: Warning | str, *args: Any, **kwargs: Any) -> str:
    """A warning as the command prints it: one line, without the file and source line."""
    return f"warning: {message}\n"


_USER_ERRORS = (ValueError, TypeError, OSError)
"""Errors a command reports in one line: bad values, and problems of files and connections.

``OSError`` covers missing or unwritable paths as well as an unreachable scheduler
(``Timed out trying to connect``) or API server.
"""

_INTERRUPTED = "interrupted: the output is left unfinished; run the same command again to finish it"

# `verbose`: set by the `voxflow` callback; `abandoned`: a flow was left running on interrupt.
_state: dict[str, bool] = {"verbose": False, "abandoned": False}


def _one_line(exc: BaseException) -> str:
    if isinstance(exc, ValidationError):
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "value"
        return f"`{where}`: {first['msg']}"
    return str(exc).splitlines()[0] if str(exc) else type(exc).__name__


def _unreachable(exc: BaseException) -> bool:
    """Whether `exc` comes from a server that could not be reached (``httpx``, ``OSError``)."""
    seen: set[int] = set()
    cause: BaseException | None = exc
    while cause is not None and id(cause) not in seen:
        seen.add(id(cause))
        if isinstance(cause, OSError) or type(cause).__module__.startswith(("httpx", "httpcore")):
            return True
        cause = cause.__cause__ or cause.__context__
    return False


def _exit_now(status: int) -> None:
    """End the process at once, once the Prefect API server it started is stopped.

    The threads of a flow left running, and Prefect's exit handlers that would send its
    events, would otherwise keep the process waiting on a cluster that is gone.
    """
    from voxflow.runtime import stop_api

    with contextlib.suppress(Exception):
        stop_api()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)


def _user_errors(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Turn a user's mistake into one line on stderr and exit status 2, not a traceback.

    Bad values, bad paths and unreachable servers (a scheduler, the Prefect API) are such
    mistakes; ``--verbose`` prints the traceback before the line. An interrupt (Ctrl-C)
    prints one line and exits with status 130.
    """

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except KeyboardInterrupt:
            err.print(f"[bold yellow]{_INTERRUPTED}[/]", highlight=False, soft_wrap=True)
            if _state["abandoned"]:
                _exit_now(130)
            raise typer.Exit(130) from None
        except Exception as exc:
            if not isinstance(exc, _USER_ERRORS) and not _unreachable(exc):
                raise
            if _state["verbose"]:
                traceback.print_exc()
            err.print(f"[bold red]error:[/] {_one_line(exc)}", highlight=False, soft_wrap=True)
            raise typer.Exit(2) from None

    return wrapper


def _ints(text: str | None, name: str) -> tuple[int, ...] | None:
    if text is None:
        return None
    # Every item counts: "4,x" or "2,,2" is a typo, not a shorter list.
    try:
        return tuple(int(v) for v in re.split(r"[,x]", text))
    except ValueError:
        raise ValueError(f"`{name}` needs comma-separated integers, got {text!r}") from None


def _storage(settings: VoxflowSettings, ngff_version: str | None) -> dict[str, Any]:
    """The output storage of a stage: the settings' defaults, the NGFF version if given."""
    store = settings.storage
    return {
        "ngff_version": ngff_version or store.ngff_version, "chunks": store.chunks,
        "shards": store.shards, "compressor": store.compressor, "clevel": store.clevel,
    }  # fmt: skip


def _setting(name: str, fallback: str | None = None) -> str:
    """How a storage option left out is set: its variable, else the setting's default."""
    default = StorageSettings.model_fields[name].default if fallback is None else fallback
    return f"default VOXFLOW_STORAGE__{name.upper()}, else {default}"


NgffVersionOption = Annotated[
    str | None,
    typer.Option(help=f"0.5 (zarr v3, sharded) or 0.4 (zarr v2); {_setting('ngff_version')}."),
]
"""``--ngff-version`` of a command that writes a new OME-Zarr."""


@contextlib.contextmanager
def _progress_bar(description: str) -> Iterator[Callable[[int, int], None]]:
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
               TextColumn("blocks"), TimeElapsedColumn())  # fmt: skip
    with Progress(*columns, console=err, transient=False) as bar:
        task_id = bar.add_task(description, total=None)

        def update(done: int, total: int) -> None:
            bar.update(task_id, completed=done, total=total)

        yield update


def run_with_progress(
    run: Callable[[VoxflowSettings, str], Any], settings: VoxflowSettings, description: str
) -> Any:
    """Run a flow on a cluster this process holds, drawing the progress its tasks post.

    On an interrupt the flow is not waited for: the cluster is closed under it and the
    ``KeyboardInterrupt`` propagates.
    """
    from voxflow.runtime import open_client, start_api

    key = uuid.uuid4().hex
    # Prefect's API (when ephemeral) and the Dask cluster start at the same time.
    early = concurrent.futures.ThreadPoolExecutor(1)
    try:
        api = early.submit(start_api, settings.prefect)
        with open_client(settings) as client:
            api.result()
            return _follow(run, settings, client, key, description)
    finally:
        early.shutdown(wait=False, cancel_futures=True)


def _in_thread(fn: Callable[[], Any]) -> concurrent.futures.Future:
    """Call `fn` on a daemon thread: an interrupted command need not wait for it to end."""
    future: concurrent.futures.Future = concurrent.futures.Future()

    def target() -> None:
        try:
            future.set_result(fn())
        except BaseException as exc:
            future.set_exception(exc)

    threading.Thread(target=target, name="voxflow-flow", daemon=True).start()
    return future


def _follow(run: Callable[[VoxflowSettings, str], Any], settings: VoxflowSettings, client: Any,
            key: str, description: str) -> Any:  # fmt: skip
    """Run the flow against `client`'s cluster, drawing the progress its tasks post."""
    cluster = settings.cluster.model_copy(
        update={"mode": "address", "address": client.scheduler.address}
    )
    attached = settings.model_copy(update={"cluster": cluster})
    with _progress_bar(description) as update:
        future = _in_thread(lambda: run(attached, key))
        try:
            while not future.done():
                posted = client.get_metadata(["voxflow-progress", key], default=None)
                if posted:
                    update(*posted)
                time.sleep(0.25)
        except KeyboardInterrupt:
            _state["abandoned"] = True
            if not _state["verbose"]:
                # The abandoned flow's services (Prefect's event sender) log as they wind down.
                logging.disable(logging.WARNING)
            raise
        result = future.result()
        # Nothing posted: every task was served from the cache.
        update(*(client.get_metadata(["voxflow-progress", key], default=None) or (0, 0)))
        return result


@app.command()
@_user_errors
def pyramid(
    input: Annotated[str, typer.Argument(help="Level-0 OME-Zarr image or plain zarr array.")],
    output: Annotated[
        str | None,
        typer.Option(
            "-o",
            "--output",
            help="New OME-Zarr; default INPUT.pyramid.ome.zarr beside INPUT, and for a label "
            "image IMAGE/labels/NAME, IMAGE.labels.NAME.pyramid.ome.zarr beside IMAGE.",
        ),
    ] = None,
    method: Annotated[
        str | None,
        typer.Option(
            help="mean | mode | min | max | stride | gaussian; default mode for a label image "
            "(image-label metadata), else mean."
        ),
    ] = None,
    levels: Annotated[
        int | None,
        typer.Option(
            help="Number of levels, level 0 included; default: until no axis is larger than "
            "--min-size."
        ),
    ] = None,
    min_size: Annotated[int, typer.Option(help="Stop reducing an axis at this size.")] = 64,
    factors: Annotated[
        str | None,
        typer.Option(
            help="Fixed factor per spatial axis, e.g. 1,2,2; default: anisotropy-aware, the "
            "finer axes first, then all."
        ),
    ] = None,
    ngff_version: Annotated[
        str | None,
        typer.Option(
            help=f"0.5 (zarr v3, sharded) or 0.4 (zarr v2); {_setting('ngff_version')}; in "
            "place, the input's."
        ),
    ] = None,
    chunks: Annotated[
        str | None,
        typer.Option(
            help="Chunk edge per spatial axis; "
            f"{_setting('chunks', '64 for 0.5 and 128 for 0.4, capped to the shape')}."
        ),
    ] = None,
    shards: Annotated[
        str | None,
        typer.Option(
            help="Shard edge per spatial axis (0.5); "
            f"{_setting('shards', '4 chunks per axis, capped to the shape')}."
        ),
    ] = None,
    compressor: Annotated[
        str | None, typer.Option(help=f"zstd | lz4 | gzip | none; {_setting('compressor')}.")
    ] = None,
    clevel: Annotated[
        int | None, typer.Option(help=f"Compression level 0-9; {_setting('clevel')}.")
    ] = None,
    in_place: Annotated[
        bool, typer.Option("--in-place", help="Add levels to INPUT itself (level 0 untouched).")
    ] = False,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace OUTPUT.")] = False,
) -> None:
    """Build a multiscale OME-Zarr pyramid from level 0.

    Storage options left out come from the settings (VOXFLOW_STORAGE__*); in place, the
    input's NGFF version is kept. A label image (IMAGE/labels/NAME, reduced with mode unless
    --method says otherwise) keeps its image-label metadata, its source pointing at IMAGE
    from the output.
    """
    from voxflow.flows.pyramid import PyramidConfig, run_pyramid, validate_pyramid

    settings = VoxflowSettings()
    store = settings.storage
    config = PyramidConfig.model_validate({
        "input": input, "output": output, "in_place": in_place, "overwrite": overwrite,
        "pyramid": {
            "method": method, "levels": levels, "min_size": min_size,
            "factors": _ints(factors, "factors"),
            "ngff_version": ngff_version or (None if in_place else store.ngff_version),
            "chunks": _ints(chunks, "chunks") or store.chunks,
            "shards": _ints(shards, "shards") or store.shards,
            "compressor": compressor or store.compressor,
            "clevel": store.clevel if clevel is None else clevel,
        },
    })  # fmt: skip
    source, plan = validate_pyramid(config)
    before = source if config.in_place else _image_or_none(config.target)
    start = time.perf_counter()
    ref = run_with_progress(
        lambda s, key: run_pyramid(config, s, progress_key=key), settings, "pyramid"
    )
    seconds = time.perf_counter() - start
    done = _reused(ref, before) or f"wrote {len(plan)} levels to [bold]{ref.url}[/]"
    out.print(f"{done} in {seconds:.1f} s")
    _print_levels(ref)


def _print_levels(ref: ImageRef) -> None:
    table = Table(title=f"{ref.url}  ({ref.dtype}, {''.join(ref.dims)})", title_justify="left")
    for column in ("level", "path", "shape", "scale", "translation", "chunks", "shards"):
        table.add_column(column)
    for i, lv in enumerate(ref.levels):
        table.add_row(
            str(i), lv.path or "(array)", " × ".join(map(str, lv.shape)),
            ", ".join(f"{v:g}" for v in lv.scale), ", ".join(f"{v:g}" for v in lv.translation),
            " × ".join(map(str, lv.chunks)),
            " × ".join(map(str, lv.shards)) if lv.shards else "-",
        )  # fmt: skip
    out.print(table)


@app.command()
@_user_errors
def info(path: Annotated[str, typer.Argument(help="OME-Zarr image or zarr array.")]) -> None:
    """Show levels, shapes, dtypes, scales, translations, chunks, shards and provenance."""
    from voxflow.io import open_image

    ref = open_image(path)
    version = f"OME-NGFF {ref.ngff_version}" if ref.ngff_version else "plain zarr array"
    units = ", ".join(f"{d}: {u or '-'}" for d, u in zip(ref.dims, ref.units, strict=True))
    out.print(f"{version} (zarr v{ref.zarr_format}); axes {units}")
    out.print(f"method: {ref.method or '-'}; fingerprint {ref.fingerprint}")
    _print_levels(ref)
    if ref.omero and ref.omero.get("channels"):
        names = [c.get("label", "?") for c in ref.omero["channels"]]
        out.print(f"channels: {', '.join(names)}")
    if ref.provenance:
        p = ref.provenance
        src = (p.get("input") or {}).get("url", "-")
        out.print(
            f"made by voxflow {p.get('version')} ({p.get('stage')}, {p.get('method')}) "
            f"from {src} on {p.get('created')}"
        )
        out.print(f"parameters: {p.get('parameters')}")


def _synth(kind: str, output: str, shape: str | None, seed: int, overwrite: bool,
           **options: Any) -> None:  # fmt: skip
    from voxflow.flows.synth import synthesize

    start = time.perf_counter()
    written = synthesize(kind, output, shape=_ints(shape, "shape"), seed=seed, overwrite=overwrite,
                         **options)  # fmt: skip
    out.print(f"wrote synthetic {kind} to [bold]{output}[/] in {time.perf_counter() - start:.1f} s")
    for name, url in written.items():
        out.print(f"  {name}: {url}")


@synth_app.command("lightsheet")
@_user_errors
def synth_lightsheet(
    output: Annotated[str, typer.Argument(help="Directory for the dataset and ground truth.")],
    shape: Annotated[
        str | None,
        typer.Option(help=f"c,z,y,x (default {','.join(map(str, SYNTH_DEFAULTS['lightsheet']))})."),
    ] = None,
    seed: Annotated[int, typer.Option(help="Random seed.")] = 0,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace OUTPUT.")] = False,
) -> None:
    """Lightsheet-like czyx uint16 volume with cells, bias field and an atlas."""
    _synth("lightsheet", output, shape, seed, overwrite)


@synth_app.command("em-stack")
@_user_errors
def synth_em_stack(
    output: Annotated[str, typer.Argument(help="Directory for the dataset and ground truth.")],
    shape: Annotated[
        str | None,
        typer.Option(help=f"z,y,x (default {','.join(map(str, SYNTH_DEFAULTS['em-stack']))})."),
    ] = None,
    seed: Annotated[int, typer.Option(help="Random seed.")] = 0,
    transform: Annotated[
        str,
        typer.Option(
            help="Family of the per-slice transforms: translation, rigid, similarity or affine."
        ),
    ] = "affine",
    noise: Annotated[
        float, typer.Option(help="Gaussian noise σ as a fraction of 255, in [0, 1].")
    ] = 0.0,
    contrast: Annotated[
        float, typer.Option(help="Per-slice gain range 1 ± CONTRAST, in [0, 0.5].")
    ] = 0.0,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace OUTPUT.")] = False,
) -> None:
    """Serial-section EM-like slice stack with known per-slice transforms."""
    _synth("em-stack", output, shape, seed, overwrite, transform=transform, noise=noise,
           contrast=contrast)  # fmt: skip


@app.command()
@_user_errors
def correct(
    input: Annotated[str, typer.Argument(help="OME-Zarr image (or plain zarr array).")],
    output: Annotated[str, typer.Option("-o", "--output", help="New OME-Zarr for the result.")],
    plugin: Annotated[
        str, typer.Option(help="Registered plugin name (see `voxflow plugins`).")
    ] = "gaussian",
    param: Annotated[
        list[str] | None,
        typer.Option("--param", help="Plugin parameter KEY=VALUE (VALUE as JSON when it parses)."),
    ] = None,
    factor: Annotated[
        str, typer.Option(help="Downsampling factor: N for every spatial axis, or Z,Y,X.")
    ] = "4",
    channel: Annotated[
        list[int] | None,
        typer.Option("--channel", help="Channel to process (repeatable); default: all."),
    ] = None,
    dtype: Annotated[str, typer.Option(help="keep (input dtype, rounded) | float32.")] = "keep",
    no_field: Annotated[
        bool, typer.Option("--no-field", help="Do not keep the low-resolution field.")
    ] = False,
    ngff_version: NgffVersionOption = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace OUTPUT.")] = False,
) -> None:
    """Estimate a smooth field at low resolution and apply it at full resolution.

    The corrected image gets a pyramid; the low-resolution field lands at
    OUTPUT/fields/<plugin> unless --no-field.
    """
    from voxflow.flows.scaled import ScaledConfig, field_path, run_scaled, validate_scaled
    from voxflow.plugins import parse_params

    settings = VoxflowSettings()
    factors = _ints(factor, "factor")
    config = ScaledConfig.model_validate({
        "input": input, "output": output, "overwrite": overwrite,
        "processing": {
            "plugin": plugin, "params": parse_params(param or []),
            "factor": factors[0] if len(factors) == 1 else factors,
            "channels": tuple(channel) if channel else None, "dtype": dtype,
            "keep_field": not no_field,
            "max_lowres_mib": settings.processing.max_lowres_mib,
            "pyramid": _storage(settings, ngff_version),
        },
    })  # fmt: skip
    validate_scaled(config)
    before = _image_or_none(config.output)
    start = time.perf_counter()
    ref = run_with_progress(
        lambda s, key: run_scaled(config, s, progress_key=key), settings, f"correct ({plugin})"
    )
    seconds = time.perf_counter() - start
    out.print(f"{_reused(ref, before) or f'wrote [bold]{ref.url}[/]'} in {seconds:.1f} s")
    _print_levels(ref)
    if not no_field:
        name = (ref.provenance or {}).get("method") or plugin
        out.print(f"field: {ref.url.rstrip('/')}/{field_path(name)}")


def _threshold_options(threshold: str | None, model: str | None, is_mask: bool) -> dict:
    chosen = [n for n, v in (("--threshold", threshold), ("--model", model), ("--mask", is_mask))
              if v]  # fmt: skip
    if len(chosen) > 1:
        raise ValueError(f"choose one of --threshold, --model and --mask, got {chosen}")
    return {"threshold": threshold or "otsu", "model": model, "is_mask": is_mask}


@app.command()
@_user_errors
def segment(
    input: Annotated[str, typer.Argument(help="Intensity image (OME-Zarr or zarr array).")],
    run: Annotated[str, typer.Option("-o", "--output", help="Run folder for every result.")],
    channel: Annotated[int | None, typer.Option(help="Channel to segment (default 0).")] = None,
    threshold: Annotated[
        str | None, typer.Option(help="otsu | li | triangle | local | VALUE (default otsu).")
    ] = None,
    threshold_level: Annotated[
        int, typer.Option(help="Pyramid level whose histogram sets otsu/li/triangle.")
    ] = 0,
    block_size: Annotated[int, typer.Option(help="Window of --threshold local (odd).")] = 31,
    offset: Annotated[float, typer.Option(help="Offset of --threshold local.")] = 0.0,
    model: Annotated[
        str | None, typer.Option(help="TorchScript file or package.module:factory.")
    ] = None,
    probability: Annotated[float, typer.Option(help="Model output above this is fg.")] = 0.5,
    halo: Annotated[int, typer.Option(help="Model context around each tile (voxels).")] = 16,
    batch_size: Annotated[int, typer.Option(help="Model tiles per batch.")] = 4,
    device: Annotated[str | None, typer.Option(help="cpu | cuda | cuda:N | mps (auto).")] = None,
    is_mask: Annotated[
        bool, typer.Option("--mask", help="INPUT is a binary (0/1) mask: use it as it is.")
    ] = False,
    split: Annotated[str, typer.Option(help="none | watershed (split touching objects).")] = "none",
    min_distance: Annotated[
        float, typer.Option(help="Watershed: least distance between object centres (µm).")
    ] = 4.0,
    markers: Annotated[str, typer.Option(help="Watershed seeds: distance | intensity.")] = (
        "distance"
    ),
    split_halo: Annotated[
        int | None, typer.Option(help="Watershed context (voxels); default from min-distance.")
    ] = None,
    connectivity: Annotated[int, typer.Option(help="6 | 18 | 26.")] = 26,
    min_size: Annotated[int | None, typer.Option(help="Drop objects of fewer voxels.")] = None,
    max_size: Annotated[int | None, typer.Option(help="Drop objects of more voxels.")] = None,
    min_volume: Annotated[float | None, typer.Option(help="Drop objects under this µm³.")] = None,
    max_volume: Annotated[float | None, typer.Option(help="Drop objects over this µm³.")] = None,
    chunks: Annotated[
        str | None, typer.Option(help="Processing block Z,Y,X in voxels (default: input's).")
    ] = None,
    csv: Annotated[bool, typer.Option("--csv", help="Also write objects.csv.")] = False,
    atlas: Annotated[
        str | None, typer.Option(help="Also count per region of this atlas label image.")
    ] = None,
    regions: Annotated[
        str | None, typer.Option(help="Region table CSV for --atlas; without it: atlas ids.")
    ] = None,
    ngff_version: NgffVersionOption = None,
    overwrite: Annotated[
        bool, typer.Option("--overwrite", help="Replace a folder that is not a run of INPUT.")
    ] = False,
) -> None:
    """Segment an image: mask, instance labels and object table in the run folder.

    A rerun with the same parameters reuses every step; a changed parameter recomputes its
    step and the ones after it. Counting (voxflow count) runs too, with --atlas per region.
    Lengths and volumes (µm, µm³) are converted from the units of the image's axes.
    """
    from voxflow.flows.segment import SegmentationConfig

    edge = _ints(chunks, "chunks")
    version = ngff_version or VoxflowSettings().storage.ngff_version
    config = SegmentationConfig.model_validate({
        "input": input, "run": run, "overwrite": overwrite,
        "segment": {
            "channel": channel, "objects_csv": csv, "chunks": edge, "ngff_version": version,
            "mask": {**_threshold_options(threshold, model, is_mask),
                     "threshold_level": threshold_level, "block_size": block_size,
                     "offset": offset, "probability": probability, "halo": halo,
                     "batch_size": batch_size, "device": device},
            "instances": {"split": split, "connectivity": connectivity,
                          "min_distance_um": min_distance, "halo": split_halo,
                          "markers": markers, "min_size": min_size, "max_size": max_size,
                          "min_volume_um3": min_volume, "max_volume_um3": max_volume},
        },
        "count": {"atlas": atlas, "regions": regions},
    })  # fmt: skip
    _run_segmentation(config, "segment")


def _run_segmentation(config: SegmentationConfig, description: str) -> None:
    from voxflow.flows.segment import run_segmentation, validate_segmentation

    validate_segmentation(config)
    start = time.perf_counter()
    result = run_with_progress(
        lambda s, key: run_segmentation(config, s, progress_key=key), VoxflowSettings(),
        description,
    )  # fmt: skip
    seconds = time.perf_counter() - start
    seg, counted = result.segment, result.count
    reused = [s for s in seg.step_keys if s not in seg.computed]
    out.print(f"{seg.objects} objects in [bold]{seg.run}[/] ({seconds:.1f} s)"
              + (f"; threshold {seg.threshold:g}" if seg.threshold is not None else "")
              + (f"; reused: {', '.join(reused)}" if reused else ""))  # fmt: skip
    if counted is not None:
        _print_regions(counted)


def _print_regions(counted: Any) -> None:
    if counted.regions:
        out.print(f"region counts: {counted.regions}", soft_wrap=True)
        if counted.unlisted:
            out.print(f"[yellow]atlas ids missing from the region table:[/] "
                      f"{', '.join(map(str, counted.unlisted))} (rows 'unlisted')")  # fmt: skip
        rows = sorted((r for r in counted.rows if r["count"] and r["id"]),
                      key=lambda r: -r["density_per_mm3"])[:10]  # fmt: skip
        table = Table(title="densest regions", title_justify="left")
        for column in ("id", "acronym", "count", "volume (mm³)", "cells / mm³"):
            table.add_column(column)
        for r in rows:
            table.add_row(str(r["id"]), str(r["acronym"]), str(r["count"]),
                          f"{r['volume_mm3']:.4g}", f"{r['density_per_mm3']:.4g}")  # fmt: skip
        out.print(table)
    out.print(f"QC picture: {counted.run.rstrip('/')}/qc/overview.png", soft_wrap=True)


@app.command()
@_user_errors
def count(
    run: Annotated[str, typer.Argument(help="Run folder made by voxflow segment.")],
    atlas: Annotated[
        str | None, typer.Option(help="Atlas label image in the image's physical space.")
    ] = None,
    regions: Annotated[
        str | None,
        typer.Option(help="Region table CSV: id, acronym, name, parent_id; without it: atlas ids."),
    ] = None,
    block: Annotated[float, typer.Option(help="Cell edge of the count/density maps (µm).")] = 100.0,
    split_axis: Annotated[
        str | None, typer.Option(help="Split counts left/right along z, y or x.")
    ] = None,
    midline: Annotated[
        float | None, typer.Option(help="Split position (µm); default: the atlas centre.")
    ] = None,
) -> None:
    """Count a run's objects per block and per atlas region; draw the QC picture.

    Lengths (µm) are converted from the units of the image's and the atlas's axes; the maps
    are written in the OME-NGFF version of the run's images.
    """
    from voxflow.flows.segment import CountingConfig, run_counting

    config = CountingConfig.model_validate({
        "run": run,
        "count": {"atlas": atlas, "regions": regions, "block_um": block,
                  "split_axis": split_axis, "midline_um": midline},
    })  # fmt: skip
    start = time.perf_counter()
    counted = run_with_progress(
        lambda s, key: run_counting(config, s, progress_key=key), VoxflowSettings(), "count"
    )
    out.print(f"{counted.objects} objects in [bold]{counted.run}[/] "
              f"({time.perf_counter() - start:.1f} s)")  # fmt: skip
    _print_regions(counted)


@app.command()
@_user_errors
def view(run: Annotated[str, typer.Argument(help="Run folder made by voxflow segment.")]) -> None:
    """Open a run's image and every intermediate in napari (needs the viewers extra)."""
    from voxflow.flows.view import run_layers, show_layers

    layers = run_layers(run)
    for layer in layers:
        out.print(f"{layer.kind:7} {layer.name}")
    try:
        import napari
    except ImportError:
        err.print("[bold red]error:[/] the viewer needs napari: pip install 'voxflow\\[viewers]'",
                  highlight=False, soft_wrap=True)  # fmt: skip
        raise typer.Exit(2) from None
    viewer = show_layers(layers)
    napari.run()
    viewer.close()


def _floats(text: str | None, name: str) -> tuple[float, ...] | None:
    if text is None:
        return None
    try:
        return tuple(float(v) for v in text.split(","))
    except ValueError:
        raise ValueError(f"`{name}` needs comma-separated numbers, got {text!r}") from None


def _one_or_many(values: tuple | None) -> Any:
    return values[0] if values and len(values) == 1 else values


def _print_alignment(ref: ImageRef, seconds: float, before: ImageRef | None) -> None:
    from voxflow.flows.register import TRANSFORMS_FILE

    doc = (ref.provenance or {}).get("transforms") or {}
    pairs = doc.get("pairs", [])
    failed = [p for p in pairs if not p["converged"]]
    (y0, y1), (x0, x1) = doc.get("crop", {}).get("box", [[0, 0], [0, 0]])
    done = _reused(ref, before) or f"wrote [bold]{ref.url}[/]"
    out.print(f"{done} in {seconds:.1f} s: {len(pairs)} pairs, crop box y {y0}:{y1}, "
              f"x {x0}:{x1}")  # fmt: skip
    if failed:
        listed = ", ".join(f"{p['moving']}→{p['fixed']}" for p in failed[:10])
        out.print(f"[yellow]{len(failed)} pair(s) did not converge[/] ({listed}); those slices "
                  "carry their neighbour's transform")  # fmt: skip
    out.print(f"transforms: {ref.url.rstrip('/')}/{TRANSFORMS_FILE}")
    _print_levels(ref)


def _samples(samples: int) -> int | None:
    """`--samples` as the registration takes it: 0 stands for None (every pixel)."""
    from voxflow.flows.register import MIN_SAMPLES

    if samples == 0:
        return None
    if samples < MIN_SAMPLES:
        raise ValueError(
            f"`--samples` must be >= {MIN_SAMPLES}, or 0 to read every pixel; got {samples}"
        )
    return samples


def _reused(ref: ImageRef, before: ImageRef | None) -> str | None:
    """What to say of an output that a run left exactly as it found it (a cache hit)."""
    if before is None or ref != before:
        return None
    return f"reused [bold]{ref.url}[/] (already up to date, nothing recomputed)"


def _image_or_none(url: str) -> ImageRef | None:
    """The complete image at `url`, or None when there is none (yet)."""
    from voxflow.io import open_image

    try:
        return open_image(url)
    except (FileNotFoundError, ValueError):
        return None


@app.command()
@_user_errors
def register(
    input: Annotated[str, typer.Argument(help="Slice stack: OME-Zarr (or zarr array), (c)zyx.")],
    output: Annotated[str, typer.Option("-o", "--output", help="New OME-Zarr, aligned.")],
    transform: Annotated[
        str, typer.Option(help="translation | rigid | similarity | affine.")
    ] = "rigid",
    loss: Annotated[str, typer.Option(help="ncc | mse | lncc (local NCC).")] = "ncc",
    levels: Annotated[str, typer.Option(help="Factor per level, coarse to fine.")] = "8,4,2,1",
    epochs: Annotated[
        str | None, typer.Option(help="Most steps per level (N or N,N,…); default 200.")
    ] = None,
    lr: Annotated[
        str | None,
        typer.Option(help="Learning rate per level (x or x,x,…); default 0.1 × its factor."),
    ] = None,
    patience: Annotated[int, typer.Option(help="Early stop: steps without gain.")] = 10,
    min_delta: Annotated[float, typer.Option(help="Early stop: smallest gain.")] = 1e-4,
    penalty: Annotated[float, typer.Option(help="L2 penalty on scale and shear.")] = 0.0,
    window: Annotated[int, typer.Option(help="Window of --loss lncc, pixels.")] = 9,
    smoothing: Annotated[
        float, typer.Option(help="Gaussian sigma at the finest level, pixels (0: none).")
    ] = 1.0,
    samples: Annotated[
        int, typer.Option(help="Pixels per pair the loss reads at finer levels, >= 64 (0: all).")
    ] = 32768,
    batch_size: Annotated[int, typer.Option(help="Pairs optimised as one batch.")] = 16,
    device: Annotated[str, typer.Option(help="auto | cpu | cuda | mps.")] = "auto",
    neighbours: Annotated[
        int, typer.Option(help="Register to i-1 … i-k; k > 1 solves for drift.")
    ] = 1,
    channel: Annotated[int, typer.Option(help="Channel to register on.")] = 0,
    reference: Annotated[int, typer.Option(help="Slice that stays fixed.")] = 0,
    interpolation: Annotated[str, typer.Option(help="linear | cubic.")] = "linear",
    no_crop: Annotated[
        bool, typer.Option("--no-crop", help="Keep the input's frame and shape.")
    ] = False,
    margin: Annotated[int, typer.Option(help="Extra pixels cropped on each side.")] = 0,
    seed: Annotated[int, typer.Option(help="Seed of the optimisation.")] = 0,
    ngff_version: NgffVersionOption = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace OUTPUT.")] = False,
) -> None:
    """Align a stack of slices: batched pairwise registration, composed, warped and cropped.

    The transforms (pixels and physical units, per-pair loss, steps and convergence, crop box)
    land in OUTPUT/transforms.json; voxflow warp re-applies them. A rerun with the same input
    and options reuses the output that is already there.
    """
    from voxflow.flows.register import RegistrationConfig, run_registration, validate_registration

    settings = VoxflowSettings()
    config = RegistrationConfig.model_validate({
        "input": input, "output": output, "overwrite": overwrite,
        "registration": {
            "transform": transform, "loss": loss, "levels": _ints(levels, "levels"),
            "epochs": _one_or_many(_ints(epochs, "epochs")),
            "lr": _one_or_many(_floats(lr, "lr")), "patience": patience,
            "min_delta": min_delta, "penalty": penalty, "window": window, "smoothing": smoothing,
            "samples": _samples(samples), "batch_size": batch_size, "device": device,
            "neighbours": neighbours, "channel": channel, "reference": reference,
            "interpolation": interpolation, "crop": not no_crop, "margin": margin, "seed": seed,
            "pyramid": _storage(settings, ngff_version),
        },
    })  # fmt: skip
    validate_registration(config, settings)
    before = _image_or_none(output)
    start = time.perf_counter()
    ref = run_with_progress(
        lambda s, key: run_registration(config, s, progress_key=key), settings,
        f"register ({transform})",
    )  # fmt: skip
    _print_alignment(ref, time.perf_counter() - start, before)


@app.command()
@_user_errors
def warp(
    input: Annotated[str, typer.Argument(help="Slice stack to warp, (c)zyx.")],
    transforms: Annotated[
        str, typer.Option(help="transforms.json, or the aligned image holding one.")
    ],
    output: Annotated[str, typer.Option("-o", "--output", help="New OME-Zarr, warped.")],
    interpolation: Annotated[str, typer.Option(help="linear | cubic.")] = "linear",
    device: Annotated[str, typer.Option(help="auto | cpu | cuda | mps.")] = "auto",
    ngff_version: NgffVersionOption = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace OUTPUT.")] = False,
) -> None:
    """Re-apply the transforms of an earlier registration to another copy of the stack.

    Another channel, or a full-resolution copy of a stack registered at a coarser level: the
    physical transforms are converted to this stack's pixels.
    """
    from voxflow.flows.register import WarpConfig, run_warp, validate_warp

    settings = VoxflowSettings()
    config = WarpConfig.model_validate({
        "input": input, "transforms": transforms, "output": output, "overwrite": overwrite,
        "registration": {"interpolation": interpolation, "device": device,
                         "pyramid": _storage(settings, ngff_version)},
    })  # fmt: skip
    validate_warp(config, settings)
    before = _image_or_none(output)
    start = time.perf_counter()
    ref = run_with_progress(lambda s, key: run_warp(config, s, progress_key=key), settings, "warp")
    _print_alignment(ref, time.perf_counter() - start, before)


@app.command("plugins")
@_user_errors
def plugins_() -> None:
    """List the scaled-processing plugins: built-in and installed ones."""
    from voxflow.plugins import describe_plugins

    table = Table(title="scaled-processing plugins", title_justify="left")
    table.add_column("name")
    table.add_column("description")
    for name, description in describe_plugins():
        table.add_row(name, description)
    out.print(table)


@app.command()
@_user_errors
def demo(
    workdir: Annotated[Path, typer.Option(help="Where the demo writes its data.")] = Path(
        "voxflow-demo"
    ),
    overwrite: Annotated[bool, typer.Option(help="Replace an earlier demo's data.")] = True,
) -> None:
    """Synthesize a small dataset and run every stage as a Prefect flow, with a summary."""
    from voxflow.flows.demo import run_demo

    run_demo(workdir, overwrite=overwrite, console=out, runner=run_with_progress)


def main() -> None:
    """Entry point of the ``voxflow`` command."""
    app()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
