import itertools
import json
import os

import numpy as np
import pytest
import zarr

from tests.conftest import block_mean_reference, last_centres_reference, snapshot
from voxflow.core.scaled import PluginHookError, lowres_geometry
from voxflow.core.upsample import upsample_array
from voxflow.io import NotAnImageError, open_image, read_level, write_image
from voxflow.io import writer as io_writer
from voxflow.plugins import ScaledProcessingPlugin, hookimpl
from voxflow.tasks import PyramidParams, ScaledParams, make_pyramid, scaled_processing
from voxflow.tasks.scaled import INCOMPLETE_MARKER, find_lowres_level


class RelativeField(ScaledProcessingPlugin):
    """Field = low-res image / its mean; applied by division (an exact, checkable contract)."""

    def __init__(self, gain: float = 1.0):
        super().__init__(gain=gain)
        self.gain = gain

    @hookimpl
    def scaled_processing_plugin_name(self):
        return "relative"

    @hookimpl
    def scaled_processing_plugin_description(self):
        return "divide by the low-resolution image relative to its mean"

    @hookimpl
    def lowres_func(self, lowres_array):
        return (lowres_array / lowres_array.mean()).astype(np.float32)

    @hookimpl
    def highres_func(self, fullres_array, upsampled_output):
        return self.gain * fullres_array / upsampled_output


class Failing(RelativeField):
    @hookimpl
    def scaled_processing_plugin_name(self):
        return "failing"

    @hookimpl
    def lowres_func(self, lowres_array):
        raise RuntimeError("the estimate diverged")


@pytest.fixture
def relative_plugin(monkeypatch):
    """Make the test plugins resolvable by name, as an installed plugin would be."""
    from voxflow.plugins import manager

    real = manager.resolve_plugin

    def resolve(plugin, params=None):
        table = {"relative": RelativeField, "failing": Failing}
        if plugin in table:
            return table[plugin](**(params or {}))
        return real(plugin, params)

    monkeypatch.setattr("voxflow.tasks.scaled.resolve_plugin", resolve)


def _input(path, shape=(2, 20, 45, 38), scale=(1.0, 3.0, 1.5, 1.5), seed=0, dtype=np.uint16):
    rng = np.random.default_rng(seed)
    data = rng.integers(500, 3000, size=shape).astype(dtype)
    omero = {"channels": [{"label": "nuclei"}, {"label": "autofluo"}]}
    write_image(str(path), data, "czyx", scale, translation=(0, 1.0, -2.0, 0.5), chunks=8,
                shards=16, omero=omero)  # fmt: skip
    return str(path), data


def _expected(data, factors, scale, translation, gain=1.0, dtype=np.uint16):
    """The contract, on whole NumPy arrays: block mean, field, upsample, divide, round, clip."""
    low = block_mean_reference(data, factors).astype(np.float32)
    field = (low / low.mean()).astype(np.float32)
    lscale, ltrans = lowres_geometry(scale, translation, factors)
    last = last_centres_reference(data.shape, factors, scale, translation)
    up = upsample_array(field, data.shape, scale=scale, translation=translation,
                        low_scale=lscale, low_translation=ltrans, low_last_centre=last)  # fmt: skip
    values = gain * data / up
    if np.dtype(dtype).kind == "f":
        return values.astype(dtype), field
    info = np.iinfo(dtype)
    return np.clip(np.rint(values), info.min, info.max).astype(dtype), field


@pytest.mark.usefixtures("relative_plugin")
@pytest.mark.parametrize("factor", [4, (3, 4, 5)])
def test_output_equals_the_whole_array_contract_per_channel(tmp_path, factor):
    src, data = _input(tmp_path / "in.ome.zarr")
    out = str(tmp_path / "out.ome.zarr")
    storage = PyramidParams(chunks=(8, 8, 8), shards=(16, 16, 16), min_size=8)
    params = ScaledParams(plugin="relative", params={"gain": 1.5}, factor=factor, pyramid=storage)
    before = snapshot(src)
    ref = scaled_processing(open_image(src), out, params)

    f = (factor,) * 3 if isinstance(factor, int) else factor
    factors = (1, *f)
    src_ref = open_image(src)
    for c in range(2):
        want, field = _expected(data[c], f, src_ref.scale[1:], src_ref.translation[1:], gain=1.5)
        np.testing.assert_array_equal(read_level(ref, 0)[c].compute(), want)
        got_field = zarr.open_group(out, mode="r")["fields/relative/0"][c]
        np.testing.assert_allclose(got_field, field, rtol=1e-6)
    assert snapshot(src) == before, "the input must not change"
    assert len(ref.levels) > 1 and ref.dtype == "uint16"
    assert ref.omero["channels"][1]["label"] == "autofluo"
    assert ref.provenance["stage"] == "scaled"
    assert ref.provenance["parameters"]["factors"] == list(factors)
    assert ref.provenance["parameters"]["plugin"]["params"] == {"gain": 1.5}
    field_ref = open_image(f"{out}/fields/relative")
    want_scale, want_trans = lowres_geometry(src_ref.scale, src_ref.translation, factors)
    assert field_ref.scale == pytest.approx(want_scale)
    assert field_ref.translation == pytest.approx(want_trans)
    last = last_centres_reference(data.shape, factors, src_ref.scale, src_ref.translation)
    assert field_ref.provenance["field_last_centre"] == pytest.approx(last, abs=1e-12)
    assert not os.path.exists(os.path.join(out, INCOMPLETE_MARKER))
    from ome_zarr_models.v05.image import Image

    Image.from_zarr(zarr.open_group(out, mode="r"))
    Image.from_zarr(zarr.open_group(f"{out}/fields/relative", mode="r"))


@pytest.mark.usefixtures("relative_plugin")
def test_channel_selection_float32_and_no_field(tmp_path):
    src, data = _input(tmp_path / "in.ome.zarr")
    out = str(tmp_path / "out.ome.zarr")
    params = ScaledParams(plugin="relative", factor=4, channels=(1,), dtype="float32",
                          keep_field=False)  # fmt: skip
    ref = scaled_processing(open_image(src), out, params)
    src_ref = open_image(src)
    want, _ = _expected(data[1], (4, 4, 4), src_ref.scale[1:], src_ref.translation[1:],
                        dtype=np.float32)  # fmt: skip
    assert ref.shape == (1, *data.shape[1:]) and ref.dtype == "float32"
    np.testing.assert_allclose(read_level(ref, 0)[0].compute(), want, rtol=1e-6)
    assert [c["label"] for c in ref.omero["channels"]] == ["autofluo"]
    assert not os.path.exists(os.path.join(out, "fields"))


@pytest.mark.usefixtures("relative_plugin")
def test_an_existing_mean_level_is_reused_as_the_low_resolution_image(tmp_path):
    src, _ = _input(tmp_path / "in.ome.zarr", shape=(1, 32, 64, 64), scale=(1, 2, 2, 2))
    pyr = str(tmp_path / "pyr.ome.zarr")
    ref_in = make_pyramid(open_image(src), pyr, PyramidParams(factors=(2, 2, 2), levels=3))
    assert find_lowres_level(ref_in, (1, 4, 4, 4)) == 2
    assert find_lowres_level(ref_in, (1, 3, 3, 3)) is None
    ref = scaled_processing(ref_in, str(tmp_path / "out.ome.zarr"), ScaledParams(
        plugin="relative", factor=4))  # fmt: skip
    assert ref.provenance["parameters"]["lowres"] == "2"
    low = read_level(ref_in, 2).compute()[0].astype(np.float32)
    field = np.asarray(zarr.open_group(ref.url, mode="r")["fields/relative/0"])[0]
    np.testing.assert_allclose(field, low / low.mean(), rtol=1e-6)


@pytest.mark.usefixtures("relative_plugin")
def test_a_reused_level_has_its_last_voxels_where_the_pyramid_put_them(tmp_path):
    # 35 voxels along z, halved twice: level 1 ends with voxel 34 alone, level 2 with the mean
    # of level-1 voxels 16 (32, 33) and 17 (34), which sits at 33.25 (a block of 4 would sit
    # at 33, a whole one at 33.5). A ramp in z divided by its upsampled field is then flat.
    shape, scale = (1, 35, 34, 33), (1.0, 2.0, 1.0, 1.0)
    z = np.arange(shape[1], dtype=np.float32)[None, :, None, None]
    data = np.broadcast_to(100 + 10 * z, shape).astype(np.float32)
    src = str(tmp_path / "in.ome.zarr")
    write_image(src, data, "czyx", scale, chunks=8, shards=16)
    pyr = str(tmp_path / "pyr.ome.zarr")
    ref_in = make_pyramid(open_image(src), pyr, PyramidParams(factors=(2, 2, 2), levels=3))
    assert find_lowres_level(ref_in, (1, 4, 4, 4)) == 2
    params = ScaledParams(plugin="relative", factor=4, dtype="float32")
    ref = scaled_processing(ref_in, str(tmp_path / "out.ome.zarr"), params)
    assert ref.provenance["parameters"]["lowres"] == "2"
    low = read_level(ref_in, 2).compute()[0, :, 0, 0].astype(np.float64)
    centres = 2.0 * np.array([1.5 + 4 * k for k in range(8)] + [33.25])  # physical z
    assert low == pytest.approx(100 + 10 * centres / 2.0, rel=1e-6)
    up = np.interp(2.0 * np.arange(shape[1]), centres, low / low.mean())
    got = read_level(ref, 0).compute()[0]
    want = data[0, :, 0, 0] / up
    np.testing.assert_allclose(got, np.broadcast_to(want[:, None, None], got.shape), rtol=1e-5)
    # Flat between the outermost centres, the far edge included.
    np.testing.assert_allclose(got[2:34], low.mean(), rtol=1e-5)


@pytest.mark.usefixtures("relative_plugin")
@pytest.mark.parametrize("factor", [4, (3, 4, 5)])
def test_integer_and_float_inputs_of_the_same_data_give_the_same_output(tmp_path, factor):
    data = np.random.default_rng(3).integers(10, 13, (2, 20, 45, 38))
    outputs = []
    for dtype in (np.uint8, np.uint16, np.float32):
        src = str(tmp_path / f"in-{np.dtype(dtype).name}.ome.zarr")
        write_image(src, data.astype(dtype), "czyx", (1.0, 3.0, 1.5, 1.5), chunks=8, shards=16)
        out = str(tmp_path / f"out-{np.dtype(dtype).name}.ome.zarr")
        params = ScaledParams(plugin="relative", factor=factor, dtype="float32")
        ref = scaled_processing(open_image(src), out, params)
        assert ref.provenance["parameters"]["lowres"] == "block mean of level 0"
        field = np.asarray(zarr.open_group(out, mode="r")["fields/relative/0"])
        outputs.append((field, read_level(ref, 0).compute()))
    for field, image in outputs[1:]:
        np.testing.assert_array_equal(field, outputs[0][0])
        np.testing.assert_array_equal(image, outputs[0][1])
    f = (factor,) * 3 if isinstance(factor, int) else factor
    low = block_mean_reference(data[0], f).astype(np.float32)
    np.testing.assert_allclose(outputs[0][0][0], low / low.mean(), rtol=1e-6)


def _bad(tmp_path, params, exc, match, output=None, data_dtype=np.uint16, nan=False):
    src, data = _input(tmp_path / "in.ome.zarr", dtype=data_dtype)
    if nan:
        data = data.astype(np.float32)
        data[1, 3, 4, 5] = np.nan
        write_image(src, data, "czyx", (1, 1, 1, 1), chunks=8, shards=16)
    out = output or str(tmp_path / "out.ome.zarr")
    before = snapshot(tmp_path)
    with pytest.raises(exc, match=match):
        scaled_processing(open_image(src), out, params)
    assert snapshot(tmp_path) == before, "nothing may be written, the input stays as it was"


@pytest.mark.usefixtures("relative_plugin")
@pytest.mark.parametrize(
    ("params", "exc", "match"),
    [
        (ScaledParams(plugin="relative", factor=32), ValueError, "fewer than 2 voxels"),
        (ScaledParams(plugin="relative", factor=(1, 2)), ValueError, "one per spatial axis"),
        (ScaledParams(plugin="no-such-plugin"), ValueError, "no-such-plugin"),
        (ScaledParams(plugin="failing"), PluginHookError, "'failing'.*lowres_func.*diverged"),
        (ScaledParams(plugin="relative", channels=(2,)), ValueError, "channels"),
    ],
)
def test_bad_input_writes_nothing(tmp_path, params, exc, match):
    _bad(tmp_path, params, exc, match)


@pytest.mark.usefixtures("relative_plugin")
def test_a_low_resolution_image_over_the_limit_is_refused_with_a_suggestion(tmp_path):
    src, _ = _input(tmp_path / "in.ome.zarr", shape=(1, 64, 128, 128))
    before = snapshot(tmp_path)
    with pytest.raises(
        ValueError,
        match=r"4 MiB, over the limit of 1 MiB \(processing\.max_lowres_mib\).*e\.g\. 2,2,2",
    ):
        scaled_processing(open_image(src), str(tmp_path / "out.ome.zarr"),
                          ScaledParams(plugin="relative", factor=1, max_lowres_mib=1))  # fmt: skip
    assert snapshot(tmp_path) == before


def test_factor_zero_is_refused_by_the_model():
    with pytest.raises(ValueError, match="factor"):
        ScaledParams(factor=0)


@pytest.mark.usefixtures("relative_plugin")
def test_nan_input_and_output_inside_input_write_nothing(tmp_path):
    _bad(tmp_path, ScaledParams(plugin="relative"), ValueError, "NaN", nan=True)
    inside = str(tmp_path / "in.ome.zarr" / "out")
    _bad(tmp_path, ScaledParams(plugin="relative"), ValueError, "inside", output=inside)


@pytest.mark.usefixtures("relative_plugin")
def test_a_failed_write_looks_incomplete_and_a_rerun_completes_it(tmp_path, monkeypatch):
    src, data = _input(tmp_path / "in.ome.zarr")
    out = str(tmp_path / "out.ome.zarr")
    storage = PyramidParams(chunks=(8, 8, 8), shards=(16, 16, 16), min_size=8)
    params = ScaledParams(plugin="relative", factor=4, pyramid=storage)
    real = io_writer._write_unit
    calls = itertools.count()

    def flaky(spec, origins, *blocks):
        # itertools.count is atomic: writes run on several threads.
        if next(calls) == 4:
            raise OSError("disk went away")
        return real(spec, origins, *blocks)

    monkeypatch.setattr(io_writer, "_write_unit", flaky)
    with pytest.raises(OSError, match="disk went away"):
        scaled_processing(open_image(src), out, params)
    assert os.path.exists(os.path.join(out, INCOMPLETE_MARKER))
    with pytest.raises(NotAnImageError):
        open_image(out)
    marker = json.loads(open(os.path.join(out, INCOMPLETE_MARKER)).read())
    assert marker["plugin"] == "relative"

    monkeypatch.setattr(io_writer, "_write_unit", real)
    ref = scaled_processing(open_image(src), out, params)  # no overwrite needed
    src_ref = open_image(src)
    want, _ = _expected(data[0], (4, 4, 4), src_ref.scale[1:], src_ref.translation[1:])
    np.testing.assert_array_equal(read_level(ref, 0)[0].compute(), want)
    assert not os.path.exists(os.path.join(out, INCOMPLETE_MARKER))
    with pytest.raises(FileExistsError):
        scaled_processing(open_image(src), out, params)  # complete now: needs overwrite


@pytest.mark.usefixtures("relative_plugin")
def test_only_the_selected_channels_are_read(tmp_path, monkeypatch):
    from voxflow.io import reader

    src, data = _input(tmp_path / "in.ome.zarr")
    read = []
    original = reader.TensorStoreSource.__getitem__

    def counting(self, index):
        read.append(int(np.prod([s.stop - s.start for s in index])))
        return original(self, index)

    monkeypatch.setattr(reader.TensorStoreSource, "__getitem__", counting)
    params = ScaledParams(plugin="relative", factor=4, channels=(1,),
                          pyramid=PyramidParams(levels=1))  # fmt: skip
    scaled_processing(open_image(src), str(tmp_path / "out.ome.zarr"), params)
    # once for the low-resolution image, once for the correction: channel 1 only
    assert sum(read) == 2 * data[1].size
