"""The segmentation flow: image → mask → labels → objects → counts → region table."""

from __future__ import annotations

import warnings

from prefect import flow
from prefect.artifacts import create_table_artifact
from pydantic import BaseModel, ConfigDict, Field

from voxflow.flows._run import run_flow
from voxflow.runtime import make_task_runner
from voxflow.settings import VoxflowSettings
from voxflow.tasks.count import (
    CountParams,
    CountResult,
    check_count,
    count_run,
)
from voxflow.tasks.segment import SegmentParams, SegmentResult, open_volume, segment_image

__all__ = [
    "CountingConfig",
    "SegmentationConfig",
    "SegmentationResult",
    "counting_flow",
    "run_counting",
    "run_segmentation",
    "segmentation_flow",
    "validate_segmentation",
]


class SegmentationConfig(BaseModel):
    """Everything a segmentation run needs; the form the Prefect UI shows."""

    model_config = ConfigDict(frozen=True)

    input: str = Field(description="Intensity image (OME-Zarr or zarr array) or binary mask.")
    run: str = Field(description="Run folder: every intermediate lands here.")
    overwrite: bool = Field(False, description="Replace a folder that holds something else.")
    segment: SegmentParams = Field(
        default_factory=SegmentParams, description="Mask, instance and object steps."
    )
    count: CountParams | None = Field(
        default_factory=CountParams,
        description="Counting and atlas steps; None: skip them (and remove the counts of "
        "earlier objects when the objects change).",
    )


class SegmentationResult(BaseModel):
    """What a segmentation run produced."""

    model_config = ConfigDict(frozen=True)

    segment: SegmentResult
    count: CountResult | None


class CountingConfig(BaseModel):
    """Counting an existing run again (another atlas, map resolution or split)."""

    model_config = ConfigDict(frozen=True)

    run: str = Field(description="Run folder made by the segmentation flow.")
    count: CountParams = Field(default_factory=CountParams, description="Counting and atlas.")


def validate_segmentation(config: SegmentationConfig) -> None:
    """Check the input, the channel, the atlas and the region table before a run.

    Nothing is written; see :func:`voxflow.tasks.count.check_count`.
    """
    vol = open_volume(config.input, config.segment.channel)
    if config.count is not None:
        check_count(vol, config.count)


@flow(
    name="segmentation",
    task_runner=make_task_runner(VoxflowSettings()),
    validate_parameters=True,
    log_prints=True,
)
def segmentation_flow(
    config: SegmentationConfig, progress_key: str | None = None
) -> SegmentationResult:
    """Segment `config.input`, count its objects and quantify them per atlas region."""
    seg = segment_image.submit(
        config.input, config.run, config.segment, config.overwrite, progress_key
    ).result()
    counted = None
    if config.count is not None:
        counted = _count(seg.run, config.count, progress_key)
    return SegmentationResult(segment=seg, count=counted)


def _count(run: str, params: CountParams, progress_key: str | None) -> CountResult:
    counted = count_run.submit(run, params, progress_key).result()
    # The task may have run in a worker process: its notes reach the user from here.
    for note in counted.notes:
        warnings.warn(note, UserWarning, stacklevel=2)
    if counted.rows:
        create_table_artifact(
            table=[dict(r) for r in counted.rows], key="voxflow-regions",
            description=f"Cells per atlas region: {counted.regions}",
        )  # fmt: skip
    return counted


@flow(
    name="counting",
    task_runner=make_task_runner(VoxflowSettings()),
    validate_parameters=True,
    log_prints=True,
)
def counting_flow(config: CountingConfig, progress_key: str | None = None) -> CountResult:
    """Count the objects of an existing run per block and per atlas region."""
    return _count(config.run, config.count, progress_key)


def run_counting(
    config: CountingConfig,
    settings: VoxflowSettings | None = None,
    *,
    progress_key: str | None = None,
) -> CountResult:
    """Run :func:`counting_flow` with the cluster and Prefect settings of `settings`."""
    return run_flow(counting_flow, settings, config, progress_key)


def run_segmentation(
    config: SegmentationConfig,
    settings: VoxflowSettings | None = None,
    *,
    progress_key: str | None = None,
) -> SegmentationResult:
    """Run :func:`segmentation_flow` with the cluster and Prefect settings of `settings`."""
    return run_flow(segmentation_flow, settings, config, progress_key)
