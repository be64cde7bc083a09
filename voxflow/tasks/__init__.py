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
from voxflow.tasks.synth import write_em_stack, write_lightsheet

__all__ = [
    "ImageRef",
    "LevelPlan",
    "PyramidParams",
    "build_pyramid",
    "check_pyramid",
    "default_output",
    "is_complete",
    "make_pyramid",
    "open_input",
    "plan_pyramid",
    "resolve_target",
    "write_em_stack",
    "write_lightsheet",
]
