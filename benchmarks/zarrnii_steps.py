"""zarrnii's scaled processing, timed inside zarrnii's own environment.

Run by ``scaled.py`` with the interpreter of the virtual environment it made for zarrnii (never
voxflow's), one process per step::

    .zarrnii-venv/bin/python zarrnii_steps.py --input IN.ome.zarr --output OUT.ome.zarr
        --plugin gaussian --method map_blocks --factor 4 --params '{"sigma": 8.0}'

What is timed is what a zarrnii user runs: ``ZarrNii.from_ome_zarr(input)``, then
``apply_scaled_processing(plugin, downsample_factor=factor, method=method)``, then
``to_ome_zarr(output)`` with zarrnii's defaults (its writer, pyramid, codec and dtype). Imports
happen before the clock; the page cache is dropped before every run when the process may. The
low-resolution field zarrnii computed (the same in every run) is saved with ``--field`` (it is what
the plugin's ``lowres_func`` returned; zarrnii does not keep it). The report is JSON: printed,
or written to ``--_result`` for ``scaled.py``.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
from pathlib import Path
from typing import Any

from _measure import best_of, package_versions, peak_rss_mib, stored_bytes, write_result

WARM_UP = 64  # edge of the corner of the input corrected once before the clock
PACKAGES = ("zarrnii", "dask", "zarr", "ngff-zarr", "ome-zarr", "numpy", "scipy", "antspyx")


class RecordingPlugin:
    """A zarrnii plugin that delegates to another and keeps the field its ``lowres_func`` made.

    zarrnii calls ``lowres_func`` once per run and discards the result after upsampling; this
    keeps a reference to it (no copy, no extra work) so the field can be compared with the
    truth after the clock stops.

    Parameters
    ----------
    plugin : object
        A zarrnii scaled-processing plugin instance.
    """

    def __init__(self, plugin: Any) -> None:
        self.plugin = plugin
        self.field: Any = None

    def lowres_func(self, lowres_array: Any) -> Any:
        """Estimate the field with the wrapped plugin and keep it."""
        self.field = self.plugin.lowres_func(lowres_array)
        return self.field

    def highres_func(self, fullres_array: Any, upsampled_output: Any) -> Any:
        """Apply the field with the wrapped plugin."""
        return self.plugin.highres_func(fullres_array, upsampled_output)

    def __repr__(self) -> str:
        return repr(self.plugin)


def make_plugin(name: str, params: dict[str, Any]) -> RecordingPlugin:
    """Make zarrnii's built-in plugin `name` (``gaussian`` or ``n4``) with `params`, recording."""
    from zarrnii.plugins.scaled_processing import (
        GaussianBiasFieldCorrection,
        N4BiasFieldCorrection,
    )

    cls = {"gaussian": GaussianBiasFieldCorrection, "n4": N4BiasFieldCorrection}[name]
    return RecordingPlugin(cls(**params))


def correct(
    args: argparse.Namespace, plugin: RecordingPlugin, source: Path, output: Path, scratch: Path
) -> dict[str, Any]:
    """The timed work: open, correct and save as OME-Zarr, all with zarrnii's defaults."""
    from zarrnii import ZarrNii

    image = ZarrNii.from_ome_zarr(str(source))
    options: dict[str, Any] = {"downsample_factor": args.factor, "method": args.method}
    if args.method == "default":
        # zarrnii writes the upsampled field there (a full-resolution float array); by default
        # it goes to a new temporary directory that is never removed.
        options["upsampled_ome_zarr_path"] = str(scratch)
    elif args.lowres_level is not None and source == args.input:
        options["lowres_znimg"] = ZarrNii.from_ome_zarr(str(source), level=args.lowres_level)
    corrected = image.apply_scaled_processing(plugin, **options)
    corrected.to_ome_zarr(str(output))
    return {}


def warm_up(args: argparse.Namespace, params: dict[str, Any]) -> None:
    """One untimed run on a small image, so modules zarrnii imports lazily load before the clock."""
    from zarrnii import ZarrNii

    root = args.scratch.with_name(args.scratch.name + ".warm-up")
    shutil.rmtree(root, ignore_errors=True)
    corner = ZarrNii.from_ome_zarr(str(args.input)).crop((0, 0, 0), (WARM_UP, WARM_UP, WARM_UP))
    corner.to_ome_zarr(str(root / "in.ome.zarr"))
    try:
        correct(args, make_plugin(args.plugin, params), root / "in.ome.zarr",
                root / "out.ome.zarr", root / "scratch")  # fmt: skip
    finally:
        shutil.rmtree(root, ignore_errors=True)


def describe_output(path: Path) -> dict[str, Any]:
    """Levels, dtype, chunks and codecs of what zarrnii wrote (from its metadata)."""
    group = json.loads((path / "zarr.json").read_text())
    datasets = group["attributes"]["ome"]["multiscales"][0]["datasets"]
    first = json.loads((path / datasets[0]["path"] / "zarr.json").read_text())
    return {
        "levels": [d["path"] for d in datasets],
        "dtype": first["data_type"],
        "chunks": first["chunk_grid"]["configuration"]["chunk_shape"],
        "codecs": [c["name"] for c in first["codecs"]],
        "stored_bytes": stored_bytes(path),
    }


def versions() -> dict[str, str]:
    """Versions of zarrnii and the packages that do its work, in this environment."""
    return package_versions(PACKAGES)


def run(args: argparse.Namespace) -> dict[str, Any]:
    import numpy as np
    import zarrnii  # noqa: F401  (imports load before the clock)

    params = json.loads(args.params)
    plugin = make_plugin(args.plugin, params)
    warm_up(args, params)
    start_rss = peak_rss_mib()

    def prepare() -> None:
        plugin.field = None
        shutil.rmtree(args.output, ignore_errors=True)
        shutil.rmtree(args.scratch, ignore_errors=True)

    def work() -> dict[str, Any]:
        return correct(args, plugin, args.input, args.output, args.scratch)

    best, dropped = best_of(work, prepare, args.repeat)
    if args.field is not None and plugin.field is not None:
        np.save(args.field, np.asarray(plugin.field, dtype=np.float32))
    shutil.rmtree(args.scratch, ignore_errors=True)
    return {
        "seconds": best["seconds"],
        "start_rss_mib": start_rss,
        "cache_dropped": dropped,
        "info": {
            **best["info"],
            "cpu_seconds": best["cpu_seconds"],
            "other_cpu_seconds": best["other_cpu_seconds"],
            "call": call_text(args, params),
            "field_shape": None if plugin.field is None else list(np.shape(plugin.field)),
            "output": describe_output(args.output),
            "versions": versions(),
        },
    }


def call_text(args: argparse.Namespace, params: dict[str, Any]) -> str:
    """The zarrnii call being timed, as text for the report."""
    cls = {"gaussian": "GaussianBiasFieldCorrection", "n4": "N4BiasFieldCorrection"}[args.plugin]
    kwargs = ", ".join(f"{k}={v!r}" for k, v in params.items())
    extra = ""
    if args.method == "map_blocks" and args.lowres_level is not None:
        extra = f", lowres_znimg=<level {args.lowres_level}>"
    return (
        f"ZarrNii.from_ome_zarr(input).apply_scaled_processing({cls}({kwargs}), "
        f"downsample_factor={args.factor}, method={args.method!r}{extra}).to_ome_zarr(output)"
    )


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add = parser.add_argument
    add("--input", type=Path, required=True, help="the OME-Zarr to correct")
    add("--output", type=Path, required=True, help="where the corrected OME-Zarr goes")
    add("--plugin", choices=("gaussian", "n4"), required=True, help="zarrnii's built-in plugin")
    add("--method", choices=("default", "map_blocks"), default="default", help="zarrnii method")
    add("--factor", type=int, default=4, help="downsample_factor (a power of two)")
    add("--params", default="{}", help="plugin keyword arguments as JSON")
    add("--repeat", type=int, default=1, help="timed runs; the fastest counts")
    add("--lowres-level", type=int, help="map_blocks: reuse this input level as low resolution")
    add(
        "--scratch",
        type=Path,
        help="scratch directory (the default method's upsampled field); OUTPUT.scratch if unset",
    )
    add("--field", type=Path, help="save the low-resolution field here (.npy)")
    add("--_result", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.factor < 1 or 2 ** round(math.log2(args.factor)) != args.factor:
        parser.error(f"--factor must be a power of two (zarrnii's levels), got {args.factor}")
    if args.scratch is None:
        args.scratch = args.output.with_name(args.output.name + ".scratch")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    doc = run(args)
    if args._result:
        write_result(args._result, doc["seconds"], doc["start_rss_mib"], doc["cache_dropped"],
                     **doc["info"])  # fmt: skip
    else:
        print(json.dumps(doc, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
