"""Cache keys made of content: input fingerprint + configuration JSON + code version."""

from __future__ import annotations

import functools
import hashlib
import json
from pathlib import Path
from typing import Any

from voxflow.io import package_version

_PACKAGE = Path(__file__).resolve().parent.parent


@functools.cache
def code_version() -> str:
    """Version of the code that computes results: release plus a digest of its sources.

    Any edit to ``voxflow/core``, ``voxflow/io`` or ``voxflow/tasks`` changes it, so cached
    results of older code are never reused.
    """
    h = hashlib.blake2b(package_version().encode(), digest_size=8)
    for sub in ("core", "io", "tasks"):
        for path in sorted((_PACKAGE / sub).glob("*.py")):
            h.update(path.name.encode())
            h.update(path.read_bytes())
    return f"{package_version()}+{h.hexdigest()}"


def content_key(stage: str, fingerprint: str, config: Any) -> str:
    """A cache key for `stage` from the input `fingerprint`, the `config` and the code version.

    `config` is a pydantic model or a JSON-serialisable value.
    """
    body = config.model_dump(mode="json") if hasattr(config, "model_dump") else config
    blob = json.dumps(body, sort_keys=True, default=str)
    digest = hashlib.blake2b(f"{fingerprint}|{blob}|{code_version()}".encode(), digest_size=16)
    return f"voxflow-{stage}-{digest.hexdigest()}"
