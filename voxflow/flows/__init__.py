"""Prefect flows: straight-line composition of tasks over one config model each."""

from voxflow.flows.pyramid import PyramidConfig, pyramid_flow, run_pyramid, validate_pyramid
from voxflow.flows.scaled import (
    ScaledConfig,
    field_path,
    run_scaled,
    scaled_processing_flow,
    validate_scaled,
)
from voxflow.flows.synth import SYNTH_DEFAULTS, synthesize

__all__ = [
    "SYNTH_DEFAULTS",
    "PyramidConfig",
    "ScaledConfig",
    "field_path",
    "pyramid_flow",
    "run_pyramid",
    "run_scaled",
    "scaled_processing_flow",
    "synthesize",
    "validate_pyramid",
    "validate_scaled",
]
