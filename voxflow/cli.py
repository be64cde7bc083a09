"""The ``voxflow`` command."""

from __future__ import annotations

import concurrent.futures
import contextlib
import functools
import logging
import os
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Annotated, Any

import typer
from pydantic import ValidationError
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from voxflow.flows import (
    PyramidConfig,
    ScaledConfig,
    field_path,
    run_pyramid,
    run_scaled,
    validate_pyramid,
    validate_scaled,
)
from voxflow.flows.demo import run_demo
from voxflow.flows.synth import SYNTH_DEFAULTS, synthesize
from voxflow.io import ImageRef, open_image
from voxflow.plugins import describe_plugins, parse_params
from voxflow.runtime import open_client
from voxflow.settings import VoxflowSettings

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
    """The command draws its own progress; library logs stay below warnings unless asked for."""
    if verbose:
        return
    os.environ.setdefault("DASK_LOGGING__DISTRIBUTED", "warning")  # worker processes
    for name in ("distributed", "prefect"):
        logging.getLogger(name).setLevel(logging.WARNING)
    os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
    # Prefect's embedded API logs a cancelled SQLite rollback as it shuts down; it is harmless.
    logging.getLogger("sqlalchemy.pool").setLevel(logging.CRITICAL)


_USER_ERRORS = (FileNotFoundError, FileExistsError, NotADirectoryError, ValueError, TypeError)


def _one_line(exc: BaseException) -> str:
    if isinstance(exc, ValidationError):
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "value"
        return f"`{where}`: {first['msg']}"
    return str(exc).splitlines()[0] if str(exc) else type(exc).__name__


def _user_errors(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Turn a user's mistake into one line on stderr and exit status 2, not a traceback."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except (ValidationError, *_USER_ERRORS) as exc:
            err.print(f"[bold red]error:[/] {_one_line(exc)}", highlight=False, soft_wrap=True)
            raise typer.Exit(2) from None

    return wrapper


def _ints(text: str | None, name: str) -> tuple[int, ...] | None:
    if text is None:
        return None
    try:
        values = tuple(int(v) for v in text.replace("x", ",").split(",") if v.strip())
    except ValueError:
        raise ValueError(f"`{name}` needs comma-separated integers, got {text!r}") from None
    if not values:
        raise ValueError(f"`{name}` needs at least one integer, got {text!r}")
    return values


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
    """Run a flow on a cluster this process holds, drawing the progress its tasks post."""
    key = uuid.uuid4().hex
    with open_client(settings) as client:
        cluster = settings.cluster.model_copy(
            update={"mode": "address", "address": client.scheduler.address}
        )
        attached = settings.model_copy(update={"cluster": cluster})
        with (
            _progress_bar(description) as update,
            concurrent.futures.ThreadPoolExecutor(1) as pool,
        ):
            future = pool.submit(run, attached, key)
            while not future.done():
                posted = client.get_metadata(["voxflow-progress", key], default=None)
                if posted:
                    update(*posted)
                time.sleep(0.25)
            result = future.result()
            # Nothing posted: every task was served from the cache.
            update(*(client.get_metadata(["voxflow-progress", key], default=None) or (0, 0)))
            return result


@app.command()
@_user_errors
def pyramid(
    input: Annotated[str, typer.Argument(help="Level-0 OME-Zarr image or plain zarr array.")],
    output: Annotated[
        str | None, typer.Option("-o", "--output", help="New OME-Zarr (default: beside input).")
    ] = None,
    method: Annotated[
        str, typer.Option(help="mean | mode (labels) | min | max | stride | gaussian.")
    ] = "mean",
    levels: Annotated[int | None, typer.Option(help="Number of levels, level 0 included.")] = None,
    min_size: Annotated[int, typer.Option(help="Stop reducing an axis at this size.")] = 64,
    factors: Annotated[
        str | None, typer.Option(help="Fixed factor per spatial axis, e.g. 1,2,2.")
    ] = None,
    ngff_version: Annotated[
        str | None, typer.Option(help="0.5 (zarr v3, sharded) or 0.4 (zarr v2).")
    ] = None,
    chunks: Annotated[str | None, typer.Option(help="Chunk edge per spatial axis.")] = None,
    shards: Annotated[str | None, typer.Option(help="Shard edge per spatial axis (0.5).")] = None,
    compressor: Annotated[
        str | None, typer.Option(help="zstd | lz4 | gzip | none (default: settings).")
    ] = None,
    clevel: Annotated[int | None, typer.Option(help="Compression level 0-9.")] = None,
    in_place: Annotated[
        bool, typer.Option("--in-place", help="Add levels to INPUT itself (level 0 untouched).")
    ] = False,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace OUTPUT.")] = False,
) -> None:
    """Build a multiscale OME-Zarr pyramid from level 0.

    Storage options left out come from the settings (VOXFLOW_STORAGE__*); in place, the
    input's NGFF version is kept.
    """
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
    _, plan = validate_pyramid(config)
    start = time.perf_counter()
    ref = run_with_progress(
        lambda s, key: run_pyramid(config, s, progress_key=key), settings, "pyramid"
    )
    seconds = time.perf_counter() - start
    out.print(f"wrote {len(plan)} levels to [bold]{ref.url}[/] in {seconds:.1f} s")
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


def _synth(kind: str, output: str, shape: str | None, seed: int, overwrite: bool) -> None:
    start = time.perf_counter()
    written = synthesize(kind, output, shape=_ints(shape, "shape"), seed=seed, overwrite=overwrite)
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
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace OUTPUT.")] = False,
) -> None:
    """Serial-section EM-like slice stack with known per-slice affine transforms."""
    _synth("em-stack", output, shape, seed, overwrite)


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
        list[int] | None, typer.Option("--channel", help="Channel to process (repeatable).")
    ] = None,
    dtype: Annotated[str, typer.Option(help="keep (input dtype, rounded) | float32.")] = "keep",
    no_field: Annotated[
        bool, typer.Option("--no-field", help="Do not keep the low-resolution field.")
    ] = False,
    ngff_version: Annotated[
        str | None, typer.Option(help="0.5 (zarr v3, sharded) or 0.4 (zarr v2).")
    ] = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace OUTPUT.")] = False,
) -> None:
    """Estimate a smooth field at low resolution and apply it at full resolution.

    The corrected image gets a pyramid; the low-resolution field lands at
    OUTPUT/fields/<plugin> unless --no-field.
    """
    settings = VoxflowSettings()
    store = settings.storage
    factors = _ints(factor, "factor")
    config = ScaledConfig.model_validate({
        "input": input, "output": output, "overwrite": overwrite,
        "processing": {
            "plugin": plugin, "params": parse_params(param or []),
            "factor": factors[0] if len(factors) == 1 else factors,
            "channels": tuple(channel) if channel else None, "dtype": dtype,
            "keep_field": not no_field,
            "max_lowres_mib": settings.processing.max_lowres_mib,
            "pyramid": {
                "ngff_version": ngff_version or store.ngff_version, "chunks": store.chunks,
                "shards": store.shards, "compressor": store.compressor, "clevel": store.clevel,
            },
        },
    })  # fmt: skip
    validate_scaled(config)
    start = time.perf_counter()
    ref = run_with_progress(
        lambda s, key: run_scaled(config, s, progress_key=key), settings, f"correct ({plugin})"
    )
    seconds = time.perf_counter() - start
    out.print(f"wrote [bold]{ref.url}[/] in {seconds:.1f} s")
    _print_levels(ref)
    if not no_field:
        name = (ref.provenance or {}).get("method") or plugin
        out.print(f"field: {ref.url.rstrip('/')}/{field_path(name)}")


@app.command("plugins")
@_user_errors
def plugins_() -> None:
    """List the scaled-processing plugins: built-in and installed ones."""
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
    run_demo(workdir, overwrite=overwrite, console=out, runner=run_with_progress)


def main() -> None:
    """Entry point of the ``voxflow`` command."""
    app()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
