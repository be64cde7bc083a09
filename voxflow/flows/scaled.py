"""The scaled-processing flow: an image in, a corrected OME-Zarr (with its field) out."""

from __future__ import annotations

from prefect import flow
from pydantic import BaseModel, ConfigDict, Field

from voxflow.flows._run import run_flow, submit_stage
from voxflow.runtime import make_task_runner
from voxflow.settings import VoxflowSettings
from voxflow.tasks import (
    ImageRef,
    ScaledParams,
    check_scaled,
    correct_image,
    field_path,
    open_input,
)

__all__ = [
    "ScaledConfig",
    "field_path",
    "run_scaled",
    "scaled_processing_flow",
    "validate_scaled",
]


class ScaledConfig(BaseModel):
    """Everything a scaled-processing run needs; the form the Prefect UI shows."""

    model_config = ConfigDict(frozen=True)

    input: str = Field(description="OME-Zarr image (or plain zarr array) to process.")
    output: str = Field(description="New OME-Zarr for the result.")
    overwrite: bool = Field(False, description="Replace an existing output.")
    processing: ScaledParams = Field(
        default_factory=ScaledParams, description="Plugin, factor, channels, dtype, storage."
    )


def validate_scaled(config: ScaledConfig) -> ImageRef:
    """Check `config` before a run (nothing is written); return the input's description."""
    source = open_input.fn(config.input)
    check_scaled(source, config.output, config.processing, overwrite=config.overwrite)
    return source


@flow(
    name="scaled-processing",
    task_runner=make_task_runner(VoxflowSettings()),
    validate_parameters=True,
    log_prints=True,
)
def scaled_processing_flow(config: ScaledConfig, progress_key: str | None = None) -> ImageRef:
    """Estimate a field at low resolution and apply it to `config.input` at full resolution."""
    # Described in the flow's process, where its warnings reach the user (once).
    source = open_input(config.input)
    return submit_stage(correct_image, source, config.output, config.processing,
                        config.overwrite, progress_key)  # fmt: skip


def run_scaled(
    config: ScaledConfig,
    settings: VoxflowSettings | None = None,
    *,
    progress_key: str | None = None,
) -> ImageRef:
    """Run :func:`scaled_processing_flow` with the cluster and Prefect settings of `settings`."""
    return run_flow(scaled_processing_flow, settings, config, progress_key)
