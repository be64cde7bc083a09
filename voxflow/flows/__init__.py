"""Prefect flows: straight-line composition of tasks over one config model each."""

from __future__ import annotations

import importlib
from typing import Any

# A flow module is imported when one of its names is first used, so using one flow (or the
# synthetic defaults the command's help shows) does not load every stage's dependencies.
_MODULES = {
    "pyramid": ("PyramidConfig", "pyramid_flow", "run_pyramid", "validate_pyramid"),
    "register": ("RegistrationConfig", "WarpConfig", "registration_flow", "run_registration",
                 "run_warp", "validate_registration", "validate_warp", "warp_flow"),
    "scaled": ("ScaledConfig", "field_path", "run_scaled", "scaled_processing_flow",
               "validate_scaled"),
    "segment": ("CountingConfig", "SegmentationConfig", "counting_flow", "run_counting",
                "run_segmentation", "segmentation_flow", "validate_segmentation"),
    "synth": ("SYNTH_DEFAULTS", "synthesize"),
}  # fmt: skip
_HOME = {name: module for module, names in _MODULES.items() for name in names}


def __getattr__(name: str) -> Any:
    if name not in _HOME:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_HOME[name]}"), name)


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


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
