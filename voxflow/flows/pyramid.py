"""The pyramid flow: level 0 in, a validated multiscale OME-Zarr out."""

from __future__ import annotations

from prefect import flow
from pydantic import BaseModel, ConfigDict, Field, model_validator

from voxflow.flows._run import run_flow, submit_stage
from voxflow.runtime import make_task_runner
from voxflow.settings import VoxflowSettings
from voxflow.tasks import (
    ImageRef,
    LevelPlan,
    PyramidParams,
    build_pyramid,
    check_pyramid,
    open_input,
    resolve_target,
)

__all__ = ["PyramidConfig", "pyramid_flow", "run_pyramid", "validate_pyramid"]


class PyramidConfig(BaseModel):
    """Everything a pyramid run needs; the form the Prefect UI shows."""

    model_config = ConfigDict(frozen=True)

    input: str = Field(description="Level-0 OME-Zarr image or plain zarr array (path or URL).")
    output: str | None = Field(
        None,
        description=(
            "New OME-Zarr to write; None: '<input>.pyramid.ome.zarr' beside the input, or for "
            "an image inside another (a label image '<image>/labels/<name>'), "
            "'<image>.labels.<name>.pyramid.ome.zarr' beside that one."
        ),
    )
    in_place: bool = Field(False, description="Add levels to the input itself (never level 0).")
    overwrite: bool = Field(False, description="Replace an existing output.")
    pyramid: PyramidParams = Field(default_factory=PyramidParams, description="Levels, storage.")

    @model_validator(mode="after")
    def _one_target(self) -> PyramidConfig:
        if self.in_place and self.output is not None:
            raise ValueError(
                "in place, the levels go into the input itself: give no output (-o), or drop "
                "--in-place to write a new OME-Zarr"
            )
        return self

    @property
    def target(self) -> str:
        """Where the result goes: the input in place, else the (default) output."""
        return resolve_target(self.input, self.output, in_place=self.in_place)


def validate_pyramid(config: PyramidConfig) -> tuple[ImageRef, list[LevelPlan]]:
    """Check `config` before a run; see :func:`voxflow.tasks.check_pyramid`."""
    return check_pyramid(
        config.input, config.target, config.pyramid, in_place=config.in_place,
        overwrite=config.overwrite,
    )  # fmt: skip


@flow(
    name="pyramid",
    task_runner=make_task_runner(VoxflowSettings()),
    validate_parameters=True,
    log_prints=True,
)
def pyramid_flow(config: PyramidConfig, progress_key: str | None = None) -> ImageRef:
    """Build a multiscale pyramid from level 0 of `config.input`."""
    # The input is described here, in the flow's process, where its warnings reach the user
    # (once); a Dask worker process would print them again on its own.
    source = open_input(config.input)
    return submit_stage(build_pyramid, source, config.target, config.pyramid, config.in_place,
                        config.overwrite, progress_key)  # fmt: skip


def run_pyramid(
    config: PyramidConfig,
    settings: VoxflowSettings | None = None,
    *,
    progress_key: str | None = None,
) -> ImageRef:
    """Run :func:`pyramid_flow` with the cluster and Prefect settings of `settings`."""
    return run_flow(pyramid_flow, settings, config, progress_key)
