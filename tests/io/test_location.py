import json
import os
import uuid
from pathlib import Path

import pytest
import tensorstore as ts

from voxflow.io import Location, tensorstore_context
from voxflow.io.location import dumps_readable

# -- parse -------------------------------------------------------------------------------------


def test_parse_relative_path_resolves_against_working_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    loc = Location.parse("data/brain.zarr/")
    assert loc == Location("file", str(tmp_path.resolve() / "data" / "brain.zarr"))
    assert loc.url == loc.path == str(loc)
    assert os.path.isabs(loc.path)


def test_parse_absolute_path_and_pathlike(tmp_path):
    target = tmp_path / "a" / "b.zarr"
    expected = Location("file", str(target.resolve()))
    assert Location.parse(str(target)) == expected
    assert Location.parse(target) == expected
    assert Location.parse(str(target) + "/") == expected
    assert Location.parse(str(tmp_path / "a" / "x" / ".." / "b.zarr")) == expected


def test_parse_expands_home(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    assert Location.parse("~/img.zarr").path == str(tmp_path.resolve() / "img.zarr")


def test_parse_file_url(tmp_path):
    loc = Location.parse(f"file://{tmp_path}/img.zarr/")
    assert loc == Location("file", str(tmp_path.resolve() / "img.zarr"))
    assert loc.url == str(tmp_path.resolve() / "img.zarr")


def test_parse_location_is_returned_unchanged():
    loc = Location("memory", "x")
    assert Location.parse(loc) is loc


@pytest.mark.parametrize(
    ("url", "path"),
    [
        ("gs://bucket/brains/b1.zarr", "bucket/brains/b1.zarr"),
        ("gs://bucket/brains/b1.zarr/", "bucket/brains/b1.zarr"),
        ("gs://bucket//brains/./b1.zarr", "bucket/brains/b1.zarr"),
        ("gs://bucket", "bucket"),
    ],
)
def test_parse_gs(url, path):
    loc = Location.parse(url)
    assert loc == Location("gs", path)
    assert loc.url == f"gs://{path}"
    assert str(loc) == loc.url


@pytest.mark.parametrize(
    ("url", "path"),
    [("memory://scratch", "scratch"), ("memory://a/b.zarr/", "a/b.zarr"), ("memory:///a", "a")],
)
def test_parse_memory(url, path):
    loc = Location.parse(url)
    assert loc == Location("memory", path)
    assert loc.url == f"memory://{path}"


@pytest.mark.parametrize("url", ["s3://bucket/x.zarr", "http://host/x.zarr", "gcs://b/x"])
def test_parse_rejects_unknown_scheme(url):
    scheme = url.partition("://")[0]
    with pytest.raises(ValueError, match=f"unsupported location scheme '{scheme}'"):
        Location.parse(url)


@pytest.mark.parametrize("url", ["memory://", "memory:///", "memory://.", "gs://", "gs:///"])
def test_parse_rejects_empty_path(url):
    with pytest.raises(ValueError, match="has an empty path"):
        Location.parse(url)


@pytest.mark.parametrize("url", ["", "file://"])
def test_parse_rejects_empty_local_path(url):
    # An empty path must not silently become the working directory: outputs are deleted
    # and replaced at parsed locations.
    with pytest.raises(ValueError, match="has an empty path"):
        Location.parse(url)


@pytest.mark.parametrize("url", [3, None, b"/data/x.zarr", ["a"]])
def test_parse_rejects_wrong_type(url):
    with pytest.raises(TypeError, match=f"must be a path or URL string, got {type(url).__name__}"):
        Location.parse(url)


# -- child / contains ----------------------------------------------------------------------------


def test_child():
    loc = Location("gs", "bucket/img.zarr")
    assert loc.child("0") == Location("gs", "bucket/img.zarr/0")
    assert loc.child("/0/zarr.json/") == Location("gs", "bucket/img.zarr/0/zarr.json")
    assert loc.child("") is loc
    assert loc.child("/") is loc


@pytest.mark.parametrize(
    ("outer", "inner", "expected"),
    [
        ("/d/img.zarr", "/d/img.zarr", True),
        ("/d/img.zarr", "/d/img.zarr/0", True),
        ("/d", "/d/img.zarr/0/c/0", True),
        ("/d/img.zarr", "/d/img.zarr2", False),
        ("/d/img.zarr/0", "/d/img.zarr", False),
        ("/d/img.zarr", "/e/img.zarr", False),
        ("/", "/d", True),
        ("memory://a", "memory://a/b", True),
        ("memory://a", "memory://ab", False),
        ("memory://a", "gs://a/b", False),
        ("gs://bucket/a", "gs://bucket/a/b", True),
    ],
)
def test_contains(outer, inner, expected):
    assert Location.parse(outer).contains(Location.parse(inner)) is expected


@pytest.mark.parametrize(
    ("url", "reference", "expected"),
    [
        ("/d/brain.ome.zarr/labels/cells", "../../", "/d/brain.ome.zarr"),
        ("/d/brain.ome.zarr/labels/cells", "../../../other.zarr", "/d/other.zarr"),
        ("/d/x.zarr", "0", "/d/x.zarr/0"),
        ("gs://b/brain.ome.zarr/labels/cells", "../..", "gs://b/brain.ome.zarr"),
        ("memory://m/a.zarr/labels/c", "../../", "memory://m/a.zarr"),
        # leaving the file system, the bucket or the memory store names nothing
        ("/d/x.zarr", "../../..", None),
        ("gs://b/x.zarr", "../..", None),
        ("gs://b/x.zarr", "../../other/y.zarr", None),
        ("memory://m/x.zarr", "../../n/y.zarr", None),
    ],
)
def test_resolve_a_relative_reference(url, reference, expected):
    got = Location.parse(url).resolve(reference)
    assert got == (None if expected is None else Location.parse(expected))


@pytest.mark.parametrize(
    ("url", "target", "expected"),
    [
        ("/d/brain.labels.cells.pyramid.ome.zarr", "/d/brain.ome.zarr", "../brain.ome.zarr"),
        ("/d/brain.ome.zarr/labels/cells", "/d/brain.ome.zarr", "../.."),
        ("gs://b/x/cells.zarr", "gs://b/brain.zarr", "../../brain.zarr"),
        ("gs://b/cells.zarr", "gs://c/brain.zarr", "gs://c/brain.zarr"),
        ("/d/cells.zarr", "gs://b/brain.zarr", "gs://b/brain.zarr"),
        ("memory://m/cells.zarr", "memory://n/brain.zarr", "memory://n/brain.zarr"),
    ],
)
def test_reference_to_is_the_inverse_of_resolve(url, target, expected):
    here = Location.parse(url)
    reference = here.reference_to(Location.parse(target))
    assert reference == expected
    if "://" not in reference:
        assert here.resolve(reference) == Location.parse(target)


def test_contains_across_schemes_with_same_path():
    assert not Location("memory", "d/x").contains(Location("gs", "d/x"))


# -- kvstore specs ----------------------------------------------------------------------------


def test_kvstore_spec_file(tmp_path):
    loc = Location.parse(tmp_path / "img.zarr")
    base = str(tmp_path.resolve() / "img.zarr")
    assert loc.kvstore_spec() == {"driver": "file", "path": base + "/"}
    assert loc.kvstore_spec("0") == {"driver": "file", "path": base + "/0/"}


def test_kvstore_spec_memory():
    loc = Location.parse("memory://a/b.zarr")
    assert loc.kvstore_spec() == {"driver": "memory", "path": "a/b.zarr/"}
    assert loc.kvstore_spec("1") == {"driver": "memory", "path": "a/b.zarr/1/"}


def test_kvstore_spec_gs():
    loc = Location.parse("gs://my-bucket/brains/b1.zarr")
    assert loc.kvstore_spec() == {"driver": "gcs", "bucket": "my-bucket", "path": "brains/b1.zarr/"}
    assert loc.kvstore_spec("0") == {
        "driver": "gcs",
        "bucket": "my-bucket",
        "path": "brains/b1.zarr/0/",
    }


@pytest.mark.parametrize(
    "url", ["gs://my-bucket", "gs://my-bucket/img.zarr", "gs://my-bucket/a/img.zarr"]
)
@pytest.mark.parametrize("key", ["", "0"])
def test_kvstore_spec_gs_addresses_the_same_objects_as_the_documents(url, key):
    # The array data (TensorStore) and the documents (gcsfs, "bucket/object") must name the
    # same GCS objects, including for an image at the root of a bucket.
    loc = Location.parse(url)
    spec = ts.KvStore.Spec(loc.kvstore_spec(key))
    object_name = loc.child(key).child("zarr.json").path.partition("/")[2]
    assert (spec / "zarr.json").path == object_name


def test_tensorstore_context_is_shared():
    assert tensorstore_context() is tensorstore_context()


# -- documents on local disk and in memory -----------------------------------------------------


@pytest.fixture(params=["file", "memory"])
def store(request, tmp_path):
    if request.param == "file":
        return Location.parse(tmp_path / f"store-{uuid.uuid4().hex}")
    return Location.parse(f"memory://store-{uuid.uuid4().hex}")


def _put(loc: Location, key: str, data: bytes) -> None:
    """Write an object through TensorStore's view of the location (the array-data side)."""
    kv = ts.KvStore.open(loc.kvstore_spec(), context=tensorstore_context()).result()
    kv.write(key, data).result()


def test_missing_objects(store):
    assert not store.exists()
    assert not store.exists("a")
    assert store.read_bytes("zarr.json") is None
    assert store.read_json("zarr.json") is None
    assert store.list_sizes() == {}
    store.delete()  # nothing to delete is fine
    store.delete("a/b")
    assert not store.exists()


def test_write_read_json(store):
    doc = {"zarr_format": 3, "node_type": "group", "attributes": {"µ": [1, 2.5, None]}}
    store.write_json("a/zarr.json", doc)
    assert store.read_json("a/zarr.json") == doc
    assert json.loads(store.read_bytes("a/zarr.json")) == doc
    assert store.exists()
    assert store.exists("a")
    assert store.exists("a/zarr.json")
    assert not store.exists("b")
    assert store.child("a").read_json("zarr.json") == doc


def test_json_documents_read_back_as_the_json_module_writes_them():
    doc = {
        "schema": 1,
        "frame": (512, 480),
        "composed": [[[1.0, 0.0, -2.5], [0.0, 1.0, 3.25], [0.0, 0.0, 1.0]]] * 3,
        "pairs": [{"fixed": 0, "moving": 1, "loss": float("nan"), "steps": [3, 4]}, {}],
        "empty": {"a": {}, "b": [], "c": [[]]},
        "odd keys": {3: "int", 1.5: "float", True: "bool", None: "none", 's"q': "quote"},
        "text": "µm\nnext line",
    }
    text = dumps_readable(doc)
    reference = json.dumps(doc)
    assert json.dumps(json.loads(text)) == reference  # same keys, values and order
    lines = text.splitlines()
    # Objects are indented; a matrix, a shape and a record of plain values keep one line each.
    assert '  "frame": [512, 480],' in lines
    assert "    [[1.0, 0.0, -2.5], [0.0, 1.0, 3.25], [0.0, 0.0, 1.0]]," in lines
    assert '    {"fixed": 0, "moving": 1, "loss": NaN, "steps": [3, 4]},' in lines
    assert lines[0] == "{" and lines[-1] == "}"


def test_write_json_replaces_and_leaves_no_temporary_objects(store):
    store.write_json("zarr.json", {"v": 1})
    store.write_json("zarr.json", {"v": 2})
    assert store.read_json("zarr.json") == {"v": 2}
    assert list(store.list_sizes()) == ["zarr.json"]


def test_documents_and_tensorstore_see_the_same_objects(store):
    _put(store, "0/c/0/0", b"12345")
    assert store.read_bytes("0/c/0/0") == b"12345"
    store.write_json("zarr.json", {"a": 1})
    kv = ts.KvStore.open(store.kvstore_spec(), context=tensorstore_context()).result()
    assert json.loads(kv.read("zarr.json").result().value) == {"a": 1}
    kv0 = ts.KvStore.open(store.kvstore_spec("0"), context=tensorstore_context()).result()
    assert bytes(kv0.read("c/0/0").result().value) == b"12345"


def test_list_sizes(store):
    _put(store, "0/c/0/0", b"x" * 7)
    _put(store, "0/c/0/1", b"x" * 3)
    store.write_json("zarr.json", {"a": 1})
    meta_size = len(store.read_bytes("zarr.json"))
    assert store.list_sizes() == {"0/c/0/0": 7, "0/c/0/1": 3, "zarr.json": meta_size}
    assert store.list_sizes("0") == {"c/0/0": 7, "c/0/1": 3}
    assert store.list_sizes("0/c/0/1") == {"": 3}
    assert store.list_sizes("missing") == {}


def test_delete_tree_and_single_object(store):
    _put(store, "0/c/0", b"a")
    _put(store, "0/c/1", b"b")
    _put(store, "1/c/0", b"c")
    store.delete("0/c/1")
    assert store.list_sizes() == {"0/c/0": 1, "1/c/0": 1}
    store.delete("0")
    assert store.list_sizes() == {"1/c/0": 1}
    store.delete()
    assert not store.exists()


def test_delete_spares_siblings_with_a_common_prefix(store):
    sibling = Location(store.scheme, store.path + "2")
    store.write_json("zarr.json", {"a": 1})
    sibling.write_json("zarr.json", {"b": 2})
    _put(store, "0/x", b"1")
    _put(store, "0x/y", b"2")
    store.delete("0")
    assert store.read_bytes("0x/y") == b"2"
    store.delete()
    assert not store.exists()
    assert sibling.read_json("zarr.json") == {"b": 2}
    sibling.delete()


@pytest.mark.parametrize(
    ("raw", "match"), [(b"{not json", "is not valid JSON"), (b"[1, 2]", "is not an object")]
)
def test_read_json_rejects_bad_documents(store, raw, match):
    _put(store, "zarr.json", raw)
    with pytest.raises(ValueError, match=match):
        store.read_json("zarr.json")


def test_local_read_of_a_directory_is_none(tmp_path):
    (tmp_path / "d" / "zarr.json").mkdir(parents=True)
    assert Location.parse(tmp_path / "d").read_bytes("zarr.json") is None


def test_local_delete_of_a_file_and_a_symlink(tmp_path):
    target = tmp_path / "target"
    target.mkdir()
    (target / "keep.txt").write_text("keep")
    (tmp_path / "link").symlink_to(target)
    Path(tmp_path / "file.txt").write_text("x")
    root = Location.parse(tmp_path)
    root.delete("file.txt")
    root.delete("link")
    assert not (tmp_path / "file.txt").exists()
    assert not (tmp_path / "link").is_symlink()
    assert (target / "keep.txt").read_text() == "keep"


@pytest.mark.parametrize(
    ("url", "path"),
    [
        ("file:///data/a%20b/%C3%A9.zarr", "/data/a b/é.zarr"),
        ("file://localhost/data/x.zarr", "/data/x.zarr"),
        ("file:/data/y.zarr", "/data/y.zarr"),
    ],
)
def test_file_urls_are_decoded_as_rfc_8089_says(url, path):
    assert Location.parse(url) == Location("file", path)


@pytest.mark.parametrize("url", ["file://server/data/x.zarr", "file://ls/image.ome.zarr"])
def test_a_file_url_with_a_host_is_refused(url):
    with pytest.raises(ValueError, match="names the host"):
        Location.parse(url)
