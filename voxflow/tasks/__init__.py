"""Thin Prefect tasks: open via io, call one core function, write via io."""

from voxflow.tasks.pyramid import (
    ImageRef,
    LevelPlan,
    PyramidParams,
    build_pyramid,
    check_pyramid,
    default_output,
    is_complete,
    make_pyramid,
    open_input,
    plan_pyramid,
    resolve_target,
)
from voxflow.tasks.scaled import (
    ScaledParams,
    check_scaled,
    correct_image,
    field_path,
    scaled_processing,
)
from voxflow.tasks.synth import write_em_stack, write_lightsheet

__all__ = [
    "ImageRef",
    "LevelPlan",
    "PyramidParams",
    "ScaledParams",
    "build_pyramid",
    "check_pyramid",
    "check_scaled",
    "correct_image",
    "default_output",
    "field_path",
    "is_complete",
    "make_pyramid",
    "open_input",
    "plan_pyramid",
    "resolve_target",
    "scaled_processing",
    "write_em_stack",
    "write_lightsheet",
]
