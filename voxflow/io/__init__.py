"""The only code that opens stores: OME-NGFF metadata, readers and the TensorStore writer."""

from voxflow.io.heap import heap_arenas, limit_heap_arenas
from voxflow.io.location import INCOMPLETE_MARKER, Location, tensorstore_context
from voxflow.io.ngff import NGFF_VERSIONS, Dataset, Multiscale, relocate_image_label
from voxflow.io.reader import (
    SUPPORTED_DTYPES,
    NotAnImageError,
    PlainArrayWarning,
    fingerprint,
    open_image,
    read_level,
)
from voxflow.io.ref import ImageRef, LevelRef
from voxflow.io.writer import (
    COMPRESSORS,
    DEFAULT_CLEVEL,
    ArrayLayout,
    check_output,
    clear_output,
    copy_stored_chunks,
    create_array,
    derive_layout,
    package_version,
    provenance,
    replaceable,
    writable,
    write_blocks,
    write_group,
    write_image,
    write_image_metadata,
)

__all__ = [
    "COMPRESSORS",
    "DEFAULT_CLEVEL",
    "INCOMPLETE_MARKER",
    "NGFF_VERSIONS",
    "SUPPORTED_DTYPES",
    "ArrayLayout",
    "Dataset",
    "ImageRef",
    "LevelRef",
    "Location",
    "Multiscale",
    "NotAnImageError",
    "PlainArrayWarning",
    "check_output",
    "clear_output",
    "copy_stored_chunks",
    "create_array",
    "derive_layout",
    "fingerprint",
    "heap_arenas",
    "limit_heap_arenas",
    "open_image",
    "package_version",
    "provenance",
    "read_level",
    "relocate_image_label",
    "replaceable",
    "tensorstore_context",
    "writable",
    "write_blocks",
    "write_group",
    "write_image",
    "write_image_metadata",
]
