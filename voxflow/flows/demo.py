"""`voxflow demo`: synthesize a small dataset, run every stage as a flow, compare with truth.

Stages: the image pyramid (mean), the atlas pyramid (mode), a cached rerun, bias correction
(Gaussian plugin, factor 4) scored against the known bias field, segmentation of the
corrected image (Otsu, watershed split) counted per atlas region and scored against the known
cells and region counts, and the alignment of a synthetic EM stack scored against its known
transforms.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from voxflow.flows.pyramid import PyramidConfig, run_pyramid
from voxflow.flows.register import RegistrationConfig, run_registration
from voxflow.flows.scaled import ScaledConfig, run_scaled
from voxflow.flows.segment import SegmentationConfig, run_segmentation
from voxflow.flows.synth import synthesize
from voxflow.runtime import open_client
from voxflow.settings import VoxflowSettings
from voxflow.tasks import PyramidParams, ScaledParams, field_path, open_input
from voxflow.tasks.register import RegistrationParams
from voxflow.tasks.report import (
    correction_figures,
    label_volumes,
    level_means,
    physical_extents,
    read_json,
    registration_figures,
    segmentation_figures,
)

__all__ = ["run_demo"]

Runner = Callable[[Callable[[VoxflowSettings, str], Any], VoxflowSettings, str], Any]


def _plain_runner(run: Callable[[VoxflowSettings, str | None], Any], settings, _description):
    return run(settings, None)


def _pyramid(runner: Runner, settings: VoxflowSettings, config: PyramidConfig, label: str):
    start = time.perf_counter()
    ref = runner(lambda s, key: run_pyramid(config, s, progress_key=key), settings, label)
    return ref, time.perf_counter() - start


def run_demo(
    workdir: str | Path = "voxflow-demo",
    *,
    overwrite: bool = True,
    console: Console | None = None,
    runner: Runner | None = None,
    settings: VoxflowSettings | None = None,
) -> dict[str, Any]:
    """Run the demo and print what was made, where, how long it took and how it compares.

    Parameters
    ----------
    workdir : str or Path, optional
        Directory of the demo's data (made or replaced).
    overwrite : bool, optional
        Replace an earlier demo's data.
    console : rich.console.Console, optional
        Where the summary goes.
    runner : callable, optional
        ``runner(run, settings, description)`` runs a flow (the CLI passes one that draws a
        progress bar); by default the flow simply runs.
    settings : VoxflowSettings, optional
        Cluster and Prefect settings.

    Returns
    -------
    dict
        The figures of the summary.
    """
    console = console or Console()
    runner = runner or _plain_runner
    settings = settings or VoxflowSettings()
    root = Path(workdir).resolve()
    start = time.perf_counter()
    written = synthesize("lightsheet", str(root / "lightsheet"), overwrite=overwrite)
    t_synth = time.perf_counter() - start
    console.print(f"synthesized a lightsheet volume in {t_synth:.1f} s: {written['image']}")
    with open_client(settings) as client:
        cluster = settings.cluster.model_copy(
            update={"mode": "address", "address": client.scheduler.address}
        )
        shared = settings.model_copy(update={"cluster": cluster})
        image_cfg = PyramidConfig(input=written["image"], overwrite=True)
        atlas_cfg = PyramidConfig(
            input=written["atlas"], output=str(root / "lightsheet" / "atlas.pyramid.ome.zarr"),
            overwrite=True, pyramid=PyramidParams(method="mode", min_size=16),
        )  # fmt: skip
        image, t_image = _pyramid(runner, shared, image_cfg, "pyramid (mean) of the image")
        atlas, t_atlas = _pyramid(runner, shared, atlas_cfg, "pyramid (mode) of the atlas")
        _, t_rerun = _pyramid(runner, shared, image_cfg, "rerun (cached)")
        scaled_cfg = ScaledConfig(
            input=written["image"], output=str(root / "lightsheet" / "corrected.ome.zarr"),
            overwrite=True, processing=ScaledParams(plugin="gaussian", factor=4),
        )  # fmt: skip
        t0 = time.perf_counter()
        corrected = runner(lambda s, key: run_scaled(scaled_cfg, s, progress_key=key), shared,
                           "bias correction (gaussian)")  # fmt: skip
        t_correct = time.perf_counter() - t0
        seg_cfg = SegmentationConfig.model_validate({
            "input": corrected.url, "run": str(root / "lightsheet" / "segmentation"),
            "overwrite": True,
            "segment": {"instances": {"split": "watershed", "min_distance_um": 5.0}},
            "count": {"atlas": written["atlas"], "regions": written["regions"]},
        })  # fmt: skip
        t0 = time.perf_counter()
        segmented = runner(lambda s, key: run_segmentation(seg_cfg, s, progress_key=key),
                           shared, "segment, count, regions")  # fmt: skip
        t_segment = time.perf_counter() - t0
        em, aligned, t_register = _register_em(runner, shared, root, overwrite)
    truth = read_json(written["ground truth"])
    figures = _summarise(console, image, atlas, truth)
    figures.update(_summarise_correction(console, written["image"], corrected, truth))
    figures.update(_summarise_segmentation(console, segmented, truth))
    figures.update(_summarise_registration(console, aligned, read_json(em["ground truth"])))
    figures.update(seconds_image=t_image, seconds_atlas=t_atlas, seconds_rerun=t_rerun,
                   seconds_correct=t_correct, seconds_segment=t_segment,
                   seconds_register=t_register,
                   seconds_total=time.perf_counter() - start)  # fmt: skip
    console.print(
        f"pyramid of the image {t_image:.1f} s, of the atlas {t_atlas:.1f} s; the rerun with "
        f"the same inputs took {t_rerun:.1f} s (cached: no array work); bias correction "
        f"{t_correct:.1f} s; segmentation and counting {t_segment:.1f} s; registration "
        f"{t_register:.1f} s. "
        f"Total {figures['seconds_total']:.1f} s."
    )
    return figures


def _register_em(runner: Runner, settings: VoxflowSettings, root: Path, overwrite: bool):
    """Synthesize a misaligned EM stack (noise, contrast changes) and align it."""
    em = synthesize("em-stack", str(root / "em"), overwrite=overwrite, transform="affine",
                    noise=0.05, contrast=0.1)  # fmt: skip
    config = RegistrationConfig(
        input=em["image"], output=str(root / "em" / "registered.ome.zarr"), overwrite=True,
        registration=RegistrationParams(transform="affine"),
    )  # fmt: skip
    t0 = time.perf_counter()
    aligned = runner(lambda s, key: run_registration(config, s, progress_key=key), settings,
                     "register the EM stack (affine)")  # fmt: skip
    return em, aligned, time.perf_counter() - t0


def _summarise_registration(console: Console, aligned, truth: dict) -> dict:
    f = registration_figures(aligned, truth)
    console.print(
        f"registration (affine, {int(f['pairs'])} pairs, {int(f['converged'])} converged): "
        f"{aligned.url}\n"
        f"  residual misalignment vs the true transforms: worst slice {f['rms_max']:.2f} px "
        f"RMS, mean {f['rms_mean']:.2f} px, last slice {f['rms_last']:.2f} px\n"
        f"  crop box {' × '.join(map(str, aligned.shape[-2:]))} px, within "
        f"{f['box_error']:.0f} px of the true largest valid box"
    )
    return {f"register_{k}": v for k, v in f.items()}


def _summarise(console: Console, image, atlas, truth: dict) -> dict[str, Any]:
    extents = physical_extents(image)
    means = level_means(image)
    table = Table(title=f"image pyramid: {image.url}", title_justify="left")
    for column in ("level", "shape", "voxel (µm)", "extent (µm)", "mean"):
        table.add_column(column)
    for i, lv in enumerate(image.levels):
        table.add_row(
            str(i), " × ".join(map(str, lv.shape)), " × ".join(f"{s:g}" for s in lv.scale[1:]),
            " × ".join(f"{e:.1f}" for e in extents[i][1:]), f"{means[i]:.2f}",
        )  # fmt: skip
    console.print(table)
    regions = {r["id"]: r for r in truth["regions"] if r.get("is_leaf")}
    last = len(atlas.levels) - 1
    volumes = label_volumes(atlas, last)
    kept = sum(1 for rid in regions if rid in volumes)
    errors = [
        abs(volumes.get(rid, 0.0) - r["volume_um3"]) / r["volume_um3"] for rid, r in regions.items()
    ]
    console.print(
        f"atlas pyramid: {atlas.url}, {len(atlas.levels)} levels; at the coarsest level "
        f"{kept}/{len(regions)} atlas regions survive (mode), region volumes within "
        f"{100 * errors[-1]:.1f} % of the ground truth (median "
        f"{100 * errors[len(errors) // 2]:.1f} %)"
    )
    drift = max(abs(m - means[0]) for m in means) / means[0]
    console.print(f"image means across levels agree within {100 * drift:.2f} % of level 0")
    return {"levels": len(image.levels), "regions_kept": kept, "regions": len(regions),
            "max_volume_error": max(errors), "mean_drift": drift}  # fmt: skip


def _summarise_correction(console: Console, original_url: str, corrected, truth: dict) -> dict:
    original = open_input.fn(original_url)
    field = open_input.fn(f"{corrected.url}/{field_path('gaussian')}")
    f = correction_figures(original, corrected, field, truth)
    console.print(
        f"bias correction (gaussian, factor 4): {corrected.url}; field: {field.url}\n"
        f"  recovered field vs true bias over the tissue: r = {f['field_r']:.3f}\n"
        f"  cell brightness / truth, coefficient of variation: {f['cell_cv_before']:.3f} → "
        f"{f['cell_cv_after']:.3f}\n"
        f"  tissue background / truth, coefficient of variation: "
        f"{f['background_cv_before']:.3f} → {f['background_cv_after']:.3f}"
    )
    return f


def _summarise_segmentation(console: Console, result, truth: dict) -> dict:
    run = result.segment.run
    f = segmentation_figures(run, truth)
    worst = f.get("max_region_error", float("nan"))
    console.print(
        f"segmentation (otsu, watershed): {run}\n"
        f"  {int(f['detected'])} objects for {int(f['cells'])} true cells: precision "
        f"{f['precision']:.3f}, recall {f['recall']:.3f}, F1 {f['f1']:.3f}; on the "
        f"{int(f['touching_cells'])} touching cells F1 {f['f1_touching']:.3f}\n"
        f"  per-region counts vs truth ({int(f.get('regions_compared', 0))} regions with ≥ 50 "
        f"cells): worst error {100 * worst:.1f} %\n"
        f"  region table: {result.count.regions if result.count else None}; QC picture: "
        f"{run.rstrip('/')}/qc/overview.png"
    )
    return {k: v for k, v in f.items() if k != "region_errors"}
