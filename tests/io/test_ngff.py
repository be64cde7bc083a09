import copy

import numpy as np
import pytest
from ome_zarr_models.v04.image import ImageAttrs as ImageAttrsV04
from ome_zarr_models.v05.image import ImageAttrs as ImageAttrsV05

from voxflow.core.axes import Axis, AxisType
from voxflow.io import NGFF_VERSIONS, Dataset, Location, Multiscale
from voxflow.io.ngff import (
    group_attributes,
    parse_group_attributes,
    parse_image_label,
    relocate_image_label,
)

# Written by hand after the examples of the OME-NGFF 0.4 and 0.5 specifications.
MULTISCALE_04 = {
    "version": "0.4",
    "name": "example",
    "axes": [
        {"name": "t", "type": "time", "unit": "millisecond"},
        {"name": "c", "type": "channel"},
        {"name": "z", "type": "space", "unit": "micrometer"},
        {"name": "y", "type": "space", "unit": "micrometer"},
        {"name": "x", "type": "space", "unit": "micrometer"},
    ],
    "datasets": [
        {
            "path": "0",
            "coordinateTransformations": [{"type": "scale", "scale": [1.0, 1.0, 0.5, 0.5, 0.5]}],
        },
        {
            "path": "1",
            "coordinateTransformations": [
                {"type": "scale", "scale": [1.0, 1.0, 1.0, 1.0, 1.0]},
                {"type": "translation", "translation": [0.0, 0.0, 0.25, 0.25, 0.25]},
            ],
        },
        {
            "path": "2",
            "coordinateTransformations": [
                {"type": "scale", "scale": [1.0, 1.0, 2.0, 2.0, 2.0]},
                {"type": "translation", "translation": [0.0, 0.0, 0.75, 0.75, 0.75]},
            ],
        },
    ],
    "coordinateTransformations": [{"type": "scale", "scale": [0.1, 1.0, 1.0, 1.0, 1.0]}],
    "type": "gaussian",
    "metadata": {
        "description": "the fields in metadata depend on the downscaling implementation",
        "method": "skimage.transform.pyramid_gaussian",
        "version": "0.16.1",
        "args": "[true]",
        "kwargs": {"multichannel": True},
    },
}

OMERO = {
    "id": 1,
    "name": "example.tif",
    "version": "0.4",
    "channels": [
        {
            "active": True,
            "coefficient": 1,
            "color": "0000FF",
            "family": "linear",
            "inverted": False,
            "label": "LaminB1",
            "window": {"end": 1500, "max": 65535, "min": 0, "start": 0},
        }
    ],
    "rdefs": {"defaultT": 0, "defaultZ": 118, "model": "color"},
}


def attrs_04():
    return {"multiscales": [copy.deepcopy(MULTISCALE_04)], "omero": copy.deepcopy(OMERO)}


def attrs_05():
    ms = copy.deepcopy(MULTISCALE_04)
    del ms["version"]
    return {"ome": {"version": "0.5", "multiscales": [ms], "omero": copy.deepcopy(OMERO)}}


def _apply(transforms, index):
    """Physical position of voxel `index` by the specification: each transform in list order."""
    point = np.asarray(index, dtype=float)
    for t in transforms:
        if t["type"] == "scale":
            point = point * np.asarray(t["scale"])
        elif t["type"] == "translation":
            point = point + np.asarray(t["translation"])
    return point


def _parse(version, attrs):
    return parse_group_attributes(attrs, zarr_format=3 if version == "0.5" else 2)


# -- parse -------------------------------------------------------------------------------------


@pytest.mark.parametrize(("version", "make"), [("0.4", attrs_04), ("0.5", attrs_05)])
def test_parse_spec_example(version, make):
    meta, omero = _parse(version, make())
    assert meta.dims == ("t", "c", "z", "y", "x")
    assert meta.axes == (
        Axis("t", AxisType.TIME, "millisecond"),
        Axis("c", AxisType.CHANNEL, None),
        Axis("z", AxisType.SPACE, "micrometer"),
        Axis("y", AxisType.SPACE, "micrometer"),
        Axis("x", AxisType.SPACE, "micrometer"),
    )
    assert meta.name == "example"
    assert meta.type == "gaussian"
    assert meta.metadata == MULTISCALE_04["metadata"]
    assert omero == OMERO
    assert [d.path for d in meta.datasets] == ["0", "1", "2"]
    # The multiscale-wide scale (0.1 on t) is folded into every level.
    assert meta.datasets[0] == Dataset("0", (0.1, 1.0, 0.5, 0.5, 0.5), (0.0,) * 5)
    assert meta.datasets[1] == Dataset("1", (0.1, 1.0, 1.0, 1.0, 1.0), (0, 0, 0.25, 0.25, 0.25))
    assert meta.datasets[2] == Dataset("2", (0.1, 1.0, 2.0, 2.0, 2.0), (0, 0, 0.75, 0.75, 0.75))


@pytest.mark.parametrize("version", NGFF_VERSIONS)
def test_parse_folds_multiscale_transforms_like_the_specification(version):
    dataset_t = [
        {"type": "scale", "scale": [2.0, 0.5, 0.25]},
        {"type": "translation", "translation": [1.0, 3.0, -2.0]},
    ]
    global_t = [
        {"type": "scale", "scale": [3.0, 2.0, 4.0]},
        {"type": "translation", "translation": [10.0, -1.0, 0.5]},
    ]
    ms = {
        "axes": [{"name": n, "type": "space"} for n in "zyx"],
        "datasets": [{"path": "s0", "coordinateTransformations": dataset_t}],
        "coordinateTransformations": global_t,
    }
    attrs = (
        {"ome": {"version": "0.5", "multiscales": [ms]}}
        if version == "0.5"
        else {"multiscales": [{"version": "0.4", **ms}]}
    )
    meta, omero = _parse(version, attrs)
    assert omero == {}
    ds = meta.datasets[0]
    rng = np.random.default_rng(0)
    for index in [(0, 0, 0), (1, 1, 1), *rng.integers(0, 100, (5, 3))]:
        expected = _apply(dataset_t + global_t, index)
        got = np.asarray(index) * np.asarray(ds.scale) + np.asarray(ds.translation)
        np.testing.assert_allclose(got, expected)


def test_parse_identity_and_missing_transforms_mean_unit_scale():
    attrs = {
        "multiscales": [
            {
                "axes": [{"name": "y", "type": "space"}, {"name": "x", "type": "space"}],
                "datasets": [
                    {"path": "0", "coordinateTransformations": [{"type": "identity"}]},
                    {"path": "1"},
                ],
            }
        ]
    }
    meta, _ = parse_group_attributes(attrs, zarr_format=2)
    assert meta.datasets == (Dataset("0", (1.0, 1.0), (0.0, 0.0)), Dataset("1", (1, 1), (0, 0)))
    assert meta.name is None
    assert meta.type is None
    assert meta.metadata == {}


def test_parse_axis_types_from_names_and_string_axes():
    attrs = {
        "multiscales": [
            {
                "axes": ["t", "c", "y", "x"],
                "datasets": [{"path": "0"}],
            }
        ]
    }
    meta, _ = parse_group_attributes(attrs, zarr_format=2)
    assert [a.type for a in meta.axes] == ["time", "channel", "space", "space"]
    assert all(a.unit is None for a in meta.axes)
    attrs["multiscales"][0]["axes"] = [{"name": "c"}, {"name": "z"}, {"name": "y"}, {"name": "x"}]
    meta, _ = parse_group_attributes(attrs, zarr_format=2)
    assert [a.type for a in meta.axes] == ["channel", "space", "space", "space"]


def test_parse_reads_only_the_first_multiscale():
    attrs = attrs_04()
    other = copy.deepcopy(MULTISCALE_04)
    other["name"] = "second"
    attrs["multiscales"].append(other)
    assert parse_group_attributes(attrs, zarr_format=2)[0].name == "example"


@pytest.mark.parametrize(
    ("attrs", "fmt"),
    [
        ({}, 2),
        ({"multiscales": []}, 2),
        ({"omero": OMERO}, 2),
        ({"ome": {"version": "0.5"}}, 3),
        ({"ome": {"version": "0.5", "multiscales": []}}, 3),
        ({}, 3),
    ],
)
def test_parse_without_multiscales(attrs, fmt):
    with pytest.raises(ValueError, match="no OME-NGFF `multiscales` metadata"):
        parse_group_attributes(attrs, zarr_format=fmt)


@pytest.mark.parametrize("datasets", [[], None])
def test_parse_without_datasets(datasets):
    attrs = attrs_04()
    attrs["multiscales"][0]["datasets"] = datasets
    with pytest.raises(ValueError, match="lists no datasets"):
        parse_group_attributes(attrs, zarr_format=2)


@pytest.mark.parametrize(
    "transform",
    [
        {"type": "scale", "scale": [1.0, 1.0, 0.5]},
        {"type": "translation", "translation": [0.0] * 6},
        {"type": "scale", "path": "scale.bin"},
        {"type": "scale"},
        {"type": "affine", "affine": [[1.0]]},
    ],
)
@pytest.mark.parametrize("where", ["dataset", "multiscales"])
def test_parse_rejects_bad_transforms(transform, where):
    attrs = attrs_04()
    ms = attrs["multiscales"][0]
    target = ms["datasets"][1] if where == "dataset" else ms
    target["coordinateTransformations"] = [transform]
    label = "dataset '1'" if where == "dataset" else "multiscales"
    with pytest.raises(ValueError, match=f"{label}: coordinate transformation .* needs 5 inline"):
        parse_group_attributes(attrs, zarr_format=2)


@pytest.mark.parametrize(
    ("names", "match"),
    [
        ("xyz", "must follow the OME-NGFF order"),
        ("zcyx", "must follow the OME-NGFF order"),
        ("ctyx", "must follow the OME-NGFF order"),
        ("zyy", "repeats an axis"),
        ("qyx", "may only hold t, c, z, y, x"),
        ("cx", "needs 2 or 3 spatial axes"),
    ],
)
def test_parse_rejects_bad_axes(names, match):
    attrs = {"multiscales": [{"axes": [{"name": n} for n in names], "datasets": [{"path": "0"}]}]}
    with pytest.raises(ValueError, match=match):
        parse_group_attributes(attrs, zarr_format=2)


def test_parse_rejects_unknown_axis_type():
    attrs = {
        "multiscales": [
            {
                "axes": [{"name": "y", "type": "space"}, {"name": "x", "type": "spatial"}],
                "datasets": [{"path": "0"}],
            }
        ]
    }
    with pytest.raises(ValueError, match="spatial"):
        parse_group_attributes(attrs, zarr_format=2)


# -- build -------------------------------------------------------------------------------------


def _multiscale(dims="czyx", name="brain", kind="mean", metadata=None):
    units = {"c": None, "t": "second"}
    axes = tuple(
        Axis(n, {"c": AxisType.CHANNEL, "t": AxisType.TIME}.get(n, AxisType.SPACE),
             units.get(n, "micrometer"))
        for n in dims
    )  # fmt: skip
    nd = len(dims)
    datasets = tuple(
        Dataset(
            str(i),
            tuple(2.0**i * 0.75 if n in "zyx" else 1.0 for n in dims),
            tuple((2.0**i - 1) * 0.375 if n in "zyx" else 0.0 for n in dims),
        )
        for i in range(3)
    )
    assert all(len(d.scale) == nd for d in datasets)
    return Multiscale(axes, datasets, name, kind, metadata or {})


def test_group_attributes_05_layout():
    ms = _multiscale(metadata={"function": "block_reduce", "parameters": {"factor": 2}})
    attrs = group_attributes(ms, ngff_version="0.5", omero=OMERO, extra={"voxflow": {"a": 1}})
    assert set(attrs) == {"ome", "voxflow"}
    assert attrs["voxflow"] == {"a": 1}
    ome = attrs["ome"]
    assert ome["version"] == "0.5"
    assert ome["omero"] == OMERO
    (entry,) = ome["multiscales"]
    assert "version" not in entry
    assert entry["name"] == "brain"
    assert entry["type"] == "mean"
    assert entry["metadata"] == {"function": "block_reduce", "parameters": {"factor": 2}}
    assert entry["axes"][0] == {"name": "c", "type": "channel"}
    assert entry["axes"][1] == {"name": "z", "type": "space", "unit": "micrometer"}
    assert entry["datasets"][1] == {
        "path": "1",
        "coordinateTransformations": [
            {"type": "scale", "scale": [1.0, 1.5, 1.5, 1.5]},
            {"type": "translation", "translation": [0.0, 0.375, 0.375, 0.375]},
        ],
    }
    ImageAttrsV05.model_validate(ome)


def test_group_attributes_04_layout():
    ms = _multiscale(dims="tczyx", name=None, kind=None)
    attrs = group_attributes(ms, ngff_version="0.4", omero=OMERO)
    assert set(attrs) == {"multiscales", "omero"}
    (entry,) = attrs["multiscales"]
    assert entry["version"] == "0.4"
    assert "name" not in entry
    assert "type" not in entry
    assert "metadata" not in entry
    assert entry["axes"][0] == {"name": "t", "type": "time", "unit": "second"}
    assert [d["path"] for d in entry["datasets"]] == ["0", "1", "2"]
    ImageAttrsV04.model_validate(attrs)


def test_group_attributes_without_omero_or_extra():
    attrs = group_attributes(_multiscale(dims="yx"), ngff_version="0.4")
    assert set(attrs) == {"multiscales"}
    attrs = group_attributes(_multiscale(dims="yx"), ngff_version="0.5", omero={}, extra={})
    assert set(attrs) == {"ome"}
    assert set(attrs["ome"]) == {"version", "multiscales"}


@pytest.mark.parametrize("version", ["0.3", "0.6", 0.5, None])
def test_group_attributes_rejects_unknown_version(version):
    with pytest.raises(ValueError, match="`ngff_version` must be one of"):
        group_attributes(_multiscale(), ngff_version=version)


@pytest.mark.parametrize("version", NGFF_VERSIONS)
@pytest.mark.parametrize("dims", ["yx", "zyx", "czyx", "tczyx", "tyx", "cyx"])
def test_group_attributes_round_trip_and_validate(version, dims):
    ms = _multiscale(dims=dims, metadata={"k": [1, 2]})
    attrs = group_attributes(ms, ngff_version=version, omero=OMERO)
    if version == "0.5":
        ImageAttrsV05.model_validate(attrs["ome"])
    else:
        ImageAttrsV04.model_validate(attrs)
    parsed, omero = _parse(version, attrs)
    assert parsed == ms
    assert parsed.metadata == {"k": [1, 2]}
    assert omero == OMERO


@pytest.mark.parametrize(("version", "make"), [("0.4", attrs_04), ("0.5", attrs_05)])
def test_rewriting_a_parsed_image_keeps_every_position(version, make):
    original = make()
    meta, omero = _parse(version, original)
    rewritten = group_attributes(meta, ngff_version=version, omero=omero)
    reparsed, _ = _parse(version, rewritten)
    assert reparsed == meta
    ms = original["ome"]["multiscales"][0] if version == "0.5" else original["multiscales"][0]
    for ds, folded in zip(ms["datasets"], reparsed.datasets, strict=True):
        index = np.array([1, 0, 3, 5, 7])
        expected = _apply(ds["coordinateTransformations"] + ms["coordinateTransformations"], index)
        np.testing.assert_allclose(index * folded.scale + np.asarray(folded.translation), expected)


def test_multiscale_metadata_does_not_affect_equality_or_hash():
    a = _multiscale(metadata={"a": 1})
    b = _multiscale(metadata={"b": 2})
    assert a == b
    assert hash(a) == hash(b)


# -- image-label -------------------------------------------------------------------------------

# After the label example of the OME-NGFF 0.4 and 0.5 specifications.
IMAGE_LABEL = {
    "colors": [
        {"label-value": 1, "rgba": [255, 255, 255, 255]},
        {"label-value": 4, "rgba": [0, 255, 255, 128]},
    ],
    "properties": [
        {"label-value": 1, "area (pixels)": 1200, "class": "foo"},
        {"label-value": 4, "area (pixels)": 1650},
    ],
    "source": {"image": "../../"},
}


@pytest.mark.parametrize("version", NGFF_VERSIONS)
def test_image_label_round_trips_and_validates(version):
    from ome_zarr_models.v04.image_label import ImageLabelAttrs as LabelAttrsV04
    from ome_zarr_models.v05.image_label import ImageLabelAttrs as LabelAttrsV05

    attrs = group_attributes(_multiscale(dims="zyx"), ngff_version=version,
                             image_label=IMAGE_LABEL)  # fmt: skip
    if version == "0.5":
        assert "image-label" in attrs["ome"] and "image-label" not in attrs
        LabelAttrsV05.model_validate(attrs["ome"])
    else:
        assert attrs["image-label"]["version"] == "0.4"
        LabelAttrsV04.model_validate(attrs)
    fmt = 3 if version == "0.5" else 2
    assert parse_image_label(attrs, zarr_format=fmt) == IMAGE_LABEL


@pytest.mark.parametrize("version", NGFF_VERSIONS)
def test_image_without_image_label_parses_to_none(version):
    attrs = group_attributes(_multiscale(dims="zyx"), ngff_version=version, omero=OMERO)
    assert parse_image_label(attrs, zarr_format=3 if version == "0.5" else 2) is None


def test_malformed_image_label_is_refused():
    with pytest.raises(ValueError, match="`image-label` must be a JSON object"):
        parse_image_label({"image-label": ["colors"]}, zarr_format=2)


@pytest.mark.parametrize(
    ("source", "target", "image"),
    [
        # beside the image it labels: the default output of a label pyramid
        ("/d/brain.ome.zarr/labels/cells", "/d/brain.labels.cells.pyramid.ome.zarr",
         "../brain.ome.zarr"),
        # into the labels group of another image
        ("/d/brain.ome.zarr/labels/cells", "/e/copy.ome.zarr/labels/cells",
         "../../../../d/brain.ome.zarr"),
        ("gs://bucket/a/brain.ome.zarr/labels/cells", "gs://bucket/b/cells.ome.zarr",
         "../../a/brain.ome.zarr"),
        # another bucket or store: no relative path reaches it
        ("gs://bucket/brain.ome.zarr/labels/cells", "gs://other/cells.ome.zarr",
         "gs://bucket/brain.ome.zarr"),
        ("gs://bucket/brain.ome.zarr/labels/cells", "/d/cells.ome.zarr",
         "gs://bucket/brain.ome.zarr"),
    ],
)  # fmt: skip
def test_relocated_image_label_names_the_same_image(source, target, image):
    moved = relocate_image_label(IMAGE_LABEL, source, target)
    assert moved["source"] == {"image": image}
    assert moved["colors"] == IMAGE_LABEL["colors"]
    assert moved["properties"] == IMAGE_LABEL["properties"]
    named = Location.parse(image) if "://" in image else Location.parse(target).resolve(image)
    assert named == Location.parse(source).resolve("../../")


@pytest.mark.parametrize(
    "label",
    [
        None,
        {"colors": IMAGE_LABEL["colors"]},  # no source: nothing to re-point
        {"source": {"image": "gs://bucket/brain.ome.zarr"}},  # a URL holds anywhere
        {"source": {"image": "../../../../../../.."}},  # leaves the file system
    ],
)
def test_relocating_keeps_what_names_no_reachable_image(label):
    moved = relocate_image_label(label, "/d/brain.ome.zarr/labels/cells", "/d/x.ome.zarr")
    assert moved == label


def test_relocating_in_place_keeps_the_reference_and_a_missing_one_is_the_default():
    url = "/d/brain.ome.zarr/labels/cells"
    assert relocate_image_label(IMAGE_LABEL, url, url) == IMAGE_LABEL
    # NGFF: without `image`, the source is the image whose labels group holds the label image.
    moved = relocate_image_label({"source": {}}, url, "/d/cells.ome.zarr")
    assert moved == {"source": {"image": "../brain.ome.zarr"}}
