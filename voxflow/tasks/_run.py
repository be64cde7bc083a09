"""The run folder: where a segmentation's intermediates live, each keyed by its content.

A step's outputs are complete when ``steps/<step>.json`` holds the step's key; that record is
written after every output of the step and deleted before any of them is replaced, so an
interrupted step is recomputed, never reused. A step's key chains its parameters to its
upstream step's key, so changing a parameter recomputes that step and the ones after it only.
"""

from __future__ import annotations

import datetime as _dt
import io as _io
from collections.abc import Callable, Iterable
from typing import Any

import pandas as pd

from voxflow.io import ImageRef, Location, check_output, clear_output
from voxflow.tasks._cache import code_version, content_key

__all__ = [
    "MANIFEST",
    "RunFolder",
]

MANIFEST = "run.json"
"""The run's description: input image, channel and geometry."""


class RunFolder:
    """Reading and writing the steps of one run folder.

    Parameters
    ----------
    url : str or Location
        The run folder.
    """

    def __init__(self, url: str | Location):
        self.loc = Location.parse(url)

    @property
    def url(self) -> str:
        """URL of the folder."""
        return self.loc.url

    def child(self, key: str) -> Location:
        """A location inside the folder."""
        return self.loc.child(key)

    # -- the manifest ---------------------------------------------------------------------

    def manifest(self) -> dict[str, Any]:
        """The run's manifest.

        Raises
        ------
        FileNotFoundError
            When the folder holds no run (run ``voxflow segment`` first).
        """
        doc = self.loc.read_json(MANIFEST)
        if doc is None:
            raise FileNotFoundError(
                f"{self.url} is not a voxflow run (no {MANIFEST}); make it with voxflow segment"
            )
        return doc

    def start(self, source: ImageRef, channel: int | None, *, overwrite: bool) -> None:
        """Claim the folder for a segmentation of `source`, before any work.

        An existing run of the same input is reused step by step; anything else there needs
        `overwrite` and is cleared first.

        Raises
        ------
        FileExistsError
            When the folder holds something else and `overwrite` is false.
        ValueError
            When the folder is, lies inside or contains the input.
        """
        check_output(self.loc, [source.url], overwrite=True, markers=(MANIFEST,))
        doc = self.loc.read_json(MANIFEST) if self.loc.exists() else None
        old_input = (doc or {}).get("input", {})
        same = old_input.get("fingerprint") == source.fingerprint
        if self.loc.exists() and not same:
            if not overwrite:
                what = "a run of another input" if doc is not None else "data that is not a run"
                raise FileExistsError(
                    f"{self.url} holds {what}; pass --overwrite to replace it or choose another "
                    "run folder"
                )
            self.loc.delete()
        if same and old_input.get("channel") != channel:
            # Another channel of the same image: nothing of the old run applies.
            self.discard_all_but(())
        manifest = {
            "input": {"url": source.url, "fingerprint": source.fingerprint, "channel": channel},
            "code_version": code_version(),
        }
        if manifest != doc:
            self.loc.write_json(MANIFEST, manifest)

    def input_fingerprint(self) -> str | None:
        """Fingerprint of the image the run was made from, None when there is no run."""
        doc = self.loc.read_json(MANIFEST) if self.loc.exists() else None
        return (doc or {}).get("input", {}).get("fingerprint")

    # -- steps ----------------------------------------------------------------------------

    def key(self, step: str, upstream: str, params: Any) -> str:
        """The content key of `step` given its upstream key and its parameters."""
        return content_key(step, upstream, params)

    def done(self, step: str, key: str) -> dict[str, Any] | None:
        """The step's record when it was completed with `key`, else None."""
        record = self.loc.read_json(f"steps/{step}.json")
        if record is None or record.get("key") != key:
            return None
        return record

    def invalidate(self, step: str) -> None:
        """Mark `step` as not done (before its outputs are replaced)."""
        self.loc.delete(f"steps/{step}.json")

    def discard(self, step: str) -> None:
        """Remove `step`: its record first, then the outputs the record lists.

        In that order an interrupted removal leaves a step that is not done, never a record of
        outputs that are gone. A zarr output loses its group metadata before its arrays, and a
        folder the removal empties goes too.
        """
        record = self.loc.read_json(f"steps/{step}.json") or {}
        self.invalidate(step)
        for key in record.get("outputs", ()):
            clear_output(self.loc.child(key))
            parent = key.rpartition("/")[0]
            if parent and not self.loc.holds_objects(parent):
                self.loc.delete(parent)

    def discard_all_but(self, keep: Iterable[str]) -> None:
        """:meth:`discard` every recorded step but those in `keep`."""
        kept = set(keep)
        for step in list_steps(self):
            if step not in kept:
                self.discard(step)

    def finish(self, step: str, key: str, outputs: Iterable[str], **extra: Any) -> dict[str, Any]:
        """Record `step` as complete with `key`; call it after every output is written."""
        record = {
            "step": step,
            "key": key,
            "outputs": sorted(outputs),
            "finished": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
            **extra,
        }
        self.loc.write_json(f"steps/{step}.json", record)
        return record

    def run_step(
        self, step: str, key: str, compute: Callable[[], dict[str, Any]], outputs: Iterable[str]
    ) -> tuple[dict[str, Any], bool]:
        """Run `compute` unless `step` is already done with `key`.

        `compute` writes the outputs and returns extra fields for the record. Returns the
        record and whether it was computed now.
        """
        record = self.done(step, key)
        if record is not None:
            return record, False
        self.invalidate(step)
        extra = compute()
        return self.finish(step, key, outputs, **extra), True

    # -- tables ---------------------------------------------------------------------------

    def write_table(self, key: str, table: pd.DataFrame) -> None:
        """Write `table` as Parquet (``.parquet``) or CSV (``.csv``) at `key`."""
        buf = _io.BytesIO()
        if key.endswith(".parquet"):
            table.to_parquet(buf, index=False)
        else:
            table.to_csv(buf, index=False)
        self.loc.write_bytes(key, buf.getvalue())

    def read_table(self, key: str) -> pd.DataFrame:
        """The Parquet or CSV table at `key`.

        Raises
        ------
        FileNotFoundError
            When there is none.
        """
        raw = self.loc.read_bytes(key)
        if raw is None:
            raise FileNotFoundError(f"no table {self.child(key).url}")
        if key.endswith(".parquet"):
            return pd.read_parquet(_io.BytesIO(raw))
        return pd.read_csv(_io.BytesIO(raw))


def list_steps(run: RunFolder) -> list[str]:
    """Names of the steps recorded in `run`."""
    return sorted(k[: -len(".json")] for k in run.loc.list_sizes("steps") if k.endswith(".json"))
