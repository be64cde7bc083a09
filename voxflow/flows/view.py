"""What `voxflow view` shows: the layers of a run folder, and the napari window."""

from voxflow.tasks.view import Layer, run_layers, show_layers

__all__ = ["Layer", "run_layers", "show_layers"]
