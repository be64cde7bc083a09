"""Prefect flows: straight-line composition of tasks over one config model each."""

from voxflow.flows.pyramid import PyramidConfig, pyramid_flow, run_pyramid, validate_pyramid
from voxflow.flows.register import (
    RegistrationConfig,
    WarpConfig,
    registration_flow,
    run_registration,
    run_warp,
    validate_registration,
    validate_warp,
    warp_flow,
)
from voxflow.flows.scaled import (
    ScaledConfig,
    field_path,
    run_scaled,
    scaled_processing_flow,
    validate_scaled,
)
from voxflow.flows.segment import (
    CountingConfig,
    SegmentationConfig,
    counting_flow,
    run_counting,
    run_segmentation,
    segmentation_flow,
    validate_segmentation,
)
from voxflow.flows.synth import SYNTH_DEFAULTS, synthesize

__all__ = [
    "SYNTH_DEFAULTS",
    "CountingConfig",
    "PyramidConfig",
    "RegistrationConfig",
    "ScaledConfig",
    "SegmentationConfig",
    "WarpConfig",
    "counting_flow",
    "field_path",
    "pyramid_flow",
    "registration_flow",
    "run_counting",
    "run_pyramid",
    "run_registration",
    "run_scaled",
    "run_segmentation",
    "run_warp",
    "scaled_processing_flow",
    "segmentation_flow",
    "synthesize",
    "validate_pyramid",
    "validate_registration",
    "validate_scaled",
    "validate_segmentation",
    "validate_warp",
    "warp_flow",
]
