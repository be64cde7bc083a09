"""Where an image lives: local paths, ``file://``, ``gs://`` and an in-memory store.

A :class:`Location` gives the two views every store needs: small documents (the JSON metadata,
through the filesystem library of the scheme: the local disk, gcsfs, or TensorStore's memory
key-value store) and a TensorStore ``kvstore`` spec for the array data.
"""

from __future__ import annotations

import json
import os
import posixpath
import threading
import urllib.parse
import uuid
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import tensorstore as ts

from voxflow.io.heap import heap_arenas, limit_heap_arenas

__all__ = ["INCOMPLETE_MARKER", "Location", "tensorstore_context"]

INCOMPLETE_MARKER = "voxflow-incomplete.json"
"""Written into an output while it is being made; its presence lets a rerun resume there."""

_SCHEMES = ("file", "gs", "memory")


def dumps_readable(doc: Any, indent: int = 2) -> str:
    """`doc` as JSON, indented down to objects of plain values, shapes and matrices.

    Each of those stays on one line, so it reads better than ``json.dumps(doc, indent=2)``
    (a line per number), and is encoded by the C encoder: ``indent`` makes :mod:`json` fall
    back to its pure-Python one, slow on transforms documents of thousands of slices.
    """
    parts: list[str] = []
    _dump(doc, 0, indent, parts)
    return "".join(parts)


def _has_objects(value: Any) -> bool:
    """Whether `value` is a list of objects or of matrices: one item per line (the first tells)."""
    if not isinstance(value, (list, tuple)) or not value:
        return False
    first = value[0]
    return isinstance(first, dict) or (
        isinstance(first, (list, tuple)) and bool(first) and isinstance(first[0], (list, tuple))
    )


def _dump(value: Any, depth: int, indent: int, parts: list[str]) -> None:
    """Append `value`: the top object, objects holding objects and lists of objects indented."""
    inner = "\n" + " " * (indent * (depth + 1))
    if isinstance(value, dict) and value and (depth == 0 or any(
        (isinstance(v, dict) and v) or _has_objects(v) for v in value.values()
    )):  # fmt: skip
        parts.append("{")
        for i, (key, item) in enumerate(value.items()):
            name = key if isinstance(key, str) else json.dumps(key)  # as json names keys
            parts.append(("," if i else "") + inner + json.dumps(name) + ": ")
            _dump(item, depth + 1, indent, parts)
        parts.append("\n" + " " * (indent * depth) + "}")
    elif _has_objects(value):
        parts.append("[")
        for i, item in enumerate(value):
            parts.append(("," if i else "") + inner)
            _dump(item, depth + 1, indent, parts)
        parts.append("\n" + " " * (indent * depth) + "]")
    else:
        parts.append(json.dumps(value))


@cache
def tensorstore_context() -> ts.Context:
    """The one TensorStore context of this process.

    Sharing it is what makes ``memory://`` locations visible to every reader and writer of the
    process (the memory key-value store belongs to a context). Made before TensorStore's
    threads start, so it first limits the C heaps they will share (:mod:`voxflow.io.heap`),
    for as many threads as voxflow computes on locally (twice the cores).
    """
    limit_heap_arenas(heap_arenas(2 * (os.cpu_count() or 1)))
    return ts.Context()


def _file_url_path(text: str, host: str, path: str) -> str:
    """The local path of a ``file:`` URL: percent-escapes decoded, on this machine only."""
    if host not in ("", "localhost"):
        raise ValueError(
            f"{text!r} names the host {host!r}; a file URL reaches this machine's files only: "
            "file:///absolute/path (or a plain path)"
        )
    if path and not path.startswith("/"):
        raise ValueError(f"{text!r} has no absolute path; write file:///absolute/path")
    return urllib.parse.unquote(path)


@dataclass(frozen=True)
class Location:
    """A directory-like location of a zarr hierarchy.

    Parameters
    ----------
    scheme : {"file", "gs", "memory"}
        Storage kind.
    path : str
        Absolute path (``file``), ``bucket/key`` (``gs``) or a name (``memory``), without a
        trailing slash.
    """

    scheme: str
    path: str

    @classmethod
    def parse(cls, url: str | os.PathLike[str] | Location) -> Location:
        """Parse a path or URL.

        Parameters
        ----------
        url : str, path-like or Location
            ``/data/brain.zarr``, ``brain.zarr`` (relative to the working directory),
            ``file:///data/brain.zarr``, ``gs://bucket/brain.zarr`` or ``memory://name``.

        Returns
        -------
        Location
            The normalised location.

        Raises
        ------
        TypeError
            When `url` is not a string or path.
        ValueError
            When the scheme is not one of file, gs, memory, or the path is empty.
        """
        if isinstance(url, Location):
            return url
        if not isinstance(url, str | os.PathLike):
            raise TypeError(f"a location must be a path or URL string, got {type(url).__name__}")
        text = os.fspath(url)
        scheme, sep, rest = text.partition("://")
        if not sep:
            scheme, rest = "file", text
            if text.startswith("file:/"):  # file:/path, the one-slash form of RFC 8089
                rest = _file_url_path(text, "", text[len("file:") :])
        elif scheme == "file":
            host, slash, path = rest.partition("/")
            rest = _file_url_path(text, host, slash + path)
        if scheme not in _SCHEMES:
            raise ValueError(
                f"unsupported location scheme {scheme!r} in {text!r}; use a local path, file://, "
                "gs:// or memory://"
            )
        if scheme == "file" and rest:
            rest = str(Path(rest).expanduser().resolve())
        else:
            rest = posixpath.normpath(rest).strip("/")
            rest = "" if rest == "." else rest
        if not rest:
            raise ValueError(f"location {text!r} has an empty path")
        return cls(scheme, rest)

    @property
    def url(self) -> str:
        """The canonical text of the location (a plain absolute path for local files)."""
        return self.path if self.scheme == "file" else f"{self.scheme}://{self.path}"

    def __str__(self) -> str:
        return self.url

    def child(self, key: str) -> Location:
        """The location of `key` below this one."""
        key = key.strip("/")
        return self if not key else Location(self.scheme, posixpath.join(self.path, key))

    def contains(self, other: Location) -> bool:
        """Whether `other` is this location or lies below it."""
        if self.scheme != other.scheme:
            return False
        return other.path == self.path or other.path.startswith(self.path.rstrip("/") + "/")

    def _root(self) -> str:
        """What a relative reference cannot leave: the file system, the bucket, the store."""
        return "" if self.scheme == "file" else self.path.split("/", 1)[0]

    def resolve(self, reference: str) -> Location | None:
        """The location a relative reference (``"../../"``, ``"raw"``) names from this one.

        Parameters
        ----------
        reference : str
            A relative path, resolved as from inside this location (``".."`` is its parent).

        Returns
        -------
        Location or None
            The location named, or None when `reference` leaves the store (the bucket, or
            the root of the file system).
        """
        path = posixpath.normpath(posixpath.join(self.path, reference))
        target = Location(self.scheme, path)
        if path.startswith("..") or not path.strip("/") or target._root() != self._root():
            return None
        return target

    def reference_to(self, target: Location) -> str:
        """A reference that names `target` from this location: the inverse of :meth:`resolve`.

        Parameters
        ----------
        target : Location
            The location to name.

        Returns
        -------
        str
            A relative path when both lie in one store (the local file system, one bucket),
            else the URL of `target`.
        """
        if target.scheme != self.scheme or target._root() != self._root():
            return target.url
        return posixpath.relpath(target.path, self.path)

    # -- array data ----------------------------------------------------------------------------

    def kvstore_spec(self, key: str = "") -> dict[str, Any]:
        """TensorStore ``kvstore`` spec of `key` below this location."""
        path = self.child(key).path
        if self.scheme == "file":
            return {"driver": "file", "path": path + "/"}
        if self.scheme == "gs":
            bucket, _, prefix = path.partition("/")
            return {"driver": "gcs", "bucket": bucket, "path": f"{prefix}/" if prefix else ""}
        return {"driver": "memory", "path": path + "/"}

    # -- documents -----------------------------------------------------------------------------

    def read_bytes(self, key: str) -> bytes | None:
        """Bytes of the object `key`, or None when it does not exist."""
        return _backend(self).read(self.child(key).path)

    def read_ends(self, key: str, n: int) -> bytes | None:
        """The first and last `n` bytes of `key` (all of it when shorter), None when absent."""
        return _backend(self).read_ends(self.child(key).path, n)

    def read_json(self, key: str) -> dict[str, Any] | None:
        """The JSON document `key`, or None when it does not exist.

        Raises
        ------
        ValueError
            When the object exists but is not a JSON object.
        """
        raw = self.read_bytes(key)
        if raw is None:
            return None
        try:
            doc = json.loads(raw)
        except ValueError as err:
            raise ValueError(f"{self.child(key).url} is not valid JSON: {err}") from None
        if not isinstance(doc, dict):
            raise ValueError(f"{self.child(key).url} holds JSON that is not an object")
        return doc

    def write_json(self, key: str, doc: dict[str, Any]) -> None:
        """Write `doc` as the JSON object `key`, replacing it atomically where the store can."""
        self.write_bytes(key, dumps_readable(doc).encode())

    def write_bytes(self, key: str, data: bytes) -> None:
        """Write the object `key`, replacing it atomically where the store can."""
        _backend(self).write(self.child(key).path, data)

    def delete(self, key: str = "") -> None:
        """Delete the object `key` and everything below it (nothing happens when absent)."""
        _backend(self).delete_tree(self.child(key).path)

    def exists(self, key: str = "") -> bool:
        """Whether an object or any object below `key` exists."""
        return _backend(self).exists(self.child(key).path)

    def holds_objects(self, key: str = "") -> bool:
        """Whether any object lies at or below `key`: an empty local folder holds none.

        Stops at the first object found, however large the tree.
        """
        return _backend(self).holds_objects(self.child(key).path)

    def list_sizes(self, key: str = "") -> dict[str, int]:
        """Every object below `key`, as relative key → size in bytes."""
        base = self.child(key).path
        found = _backend(self).list_sizes(base)
        return {name[len(base) :].lstrip("/"): size for name, size in found.items()}


# -- backends ----------------------------------------------------------------------------------


class _LocalBackend:
    def read(self, path: str) -> bytes | None:
        try:
            return Path(path).read_bytes()
        except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
            return None

    def read_ends(self, path: str, n: int) -> bytes | None:
        try:
            with open(path, "rb") as fh:
                size = os.fstat(fh.fileno()).st_size
                if size <= 2 * n:
                    return fh.read()
                head = fh.read(n)
                fh.seek(-n, os.SEEK_END)
                return head + fh.read(n)
        except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
            return None

    def write(self, path: str, data: bytes) -> None:
        target = Path(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        # Rename into place, so a reader never sees half a document.
        tmp = target.with_name(f".{target.name}.{uuid.uuid4().hex}.tmp")
        tmp.write_bytes(data)
        os.replace(tmp, target)

    def delete_tree(self, path: str) -> None:
        import shutil

        target = Path(path)
        if target.is_dir() and not target.is_symlink():
            shutil.rmtree(target)
        elif target.exists() or target.is_symlink():
            target.unlink()

    def exists(self, path: str) -> bool:
        return Path(path).exists()

    def holds_objects(self, path: str) -> bool:
        root = Path(path)
        return root.is_file() or any(files for _, _, files in os.walk(root))

    def list_sizes(self, path: str) -> dict[str, int]:
        root = Path(path)
        if root.is_file():
            return {path: root.stat().st_size}
        out = {}
        for dirpath, _, files in os.walk(root):
            for name in files:
                full = os.path.join(dirpath, name)
                out[full] = os.path.getsize(full)
        return out


class _FsspecBackend:
    """gcsfs (or any fsspec filesystem) for the documents of a remote location."""

    def __init__(self, protocol: str):
        import fsspec

        self.fs = fsspec.filesystem("gcs" if protocol == "gs" else protocol)

    def read(self, path: str) -> bytes | None:
        try:
            return self.fs.cat_file(path)
        except FileNotFoundError:
            return None

    def read_ends(self, path: str, n: int) -> bytes | None:
        try:
            size = self.fs.size(path)
            if size <= 2 * n:
                return self.fs.cat_file(path)
            return self.fs.cat_file(path, 0, n) + self.fs.cat_file(path, size - n, size)
        except FileNotFoundError:
            return None

    def write(self, path: str, data: bytes) -> None:
        self.fs.pipe_file(path, data)

    def delete_tree(self, path: str) -> None:
        if self.fs.exists(path):
            self.fs.rm(path, recursive=True)

    def exists(self, path: str) -> bool:
        return self.fs.exists(path)

    def holds_objects(self, path: str) -> bool:
        # A bucket has no empty folders: a prefix exists only with objects under it.
        return self.exists(path)

    def list_sizes(self, path: str) -> dict[str, int]:
        found = self.fs.find(path, detail=True)
        return {name: int(info.get("size", 0)) for name, info in found.items()}


class _MemoryBackend:
    """TensorStore's memory key-value store, shared by the process's readers and writers."""

    def __init__(self):
        self.kv = ts.KvStore.open({"driver": "memory"}, context=tensorstore_context()).result()

    def read(self, path: str) -> bytes | None:
        got = self.kv.read(path).result()
        return bytes(got.value) if got.state == "value" else None

    def read_ends(self, path: str, n: int) -> bytes | None:
        data = self.read(path)
        return data if data is None or len(data) <= 2 * n else data[:n] + data[-n:]

    def write(self, path: str, data: bytes) -> None:
        self.kv.write(path, data).result()

    def _keys(self, path: str) -> list[str]:
        prefix = path.rstrip("/") + "/"
        keys = [k.decode() for k in self.kv.list().result()]
        return [k for k in keys if k == path or k.startswith(prefix)]

    def delete_tree(self, path: str) -> None:
        for key in self._keys(path):
            self.kv.delete_range(ts.KvStore.KeyRange(key, key + "\0")).result()

    def exists(self, path: str) -> bool:
        return bool(self._keys(path))

    def holds_objects(self, path: str) -> bool:
        return self.exists(path)

    def list_sizes(self, path: str) -> dict[str, int]:
        return {k: len(self.kv.read(k).result().value) for k in self._keys(path)}


_BACKENDS: dict[str, Any] = {}
_LOCK = threading.Lock()


def _backend(location: Location) -> Any:
    with _LOCK:
        if location.scheme not in _BACKENDS:
            factory = {"file": _LocalBackend, "memory": _MemoryBackend}.get(location.scheme)
            _BACKENDS[location.scheme] = factory() if factory else _FsspecBackend(location.scheme)
        return _BACKENDS[location.scheme]
