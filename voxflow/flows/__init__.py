"""Prefect flows: straight-line composition of tasks over one config model each."""

from voxflow.flows.pyramid import PyramidConfig, pyramid_flow, run_pyramid, validate_pyramid
from voxflow.flows.synth import SYNTH_DEFAULTS, synthesize

__all__ = [
    "SYNTH_DEFAULTS",
    "PyramidConfig",
    "pyramid_flow",
    "run_pyramid",
    "synthesize",
    "validate_pyramid",
]
