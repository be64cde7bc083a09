"""Outputs written in several steps: marked incomplete until their metadata lands."""

from __future__ import annotations

from typing import Any

from voxflow.io import INCOMPLETE_MARKER, Location, clear_output

__all__ = ["INCOMPLETE_MARKER", "begin_output", "resumable"]


def resumable(out: Location) -> bool:
    """An output a stage left incomplete: the marker, and no image metadata yet."""
    return out.exists(INCOMPLETE_MARKER) and not any(
        out.exists(k) for k in ("zarr.json", ".zattrs", ".zgroup")
    )


def begin_output(out: Location, record: dict[str, Any]) -> None:
    """Clear `out` and mark it incomplete (with `record`) before anything is written."""
    clear_output(out)
    out.write_json(INCOMPLETE_MARKER, record)
