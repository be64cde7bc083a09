import numpy as np
import pytest
import zarr

from tests.conftest import snapshot
from voxflow.core import lowres_geometry, upsample_array
from voxflow.flows import ScaledConfig, run_scaled
from voxflow.io import open_image, read_level, write_image
from voxflow.tasks import ScaledParams

pytestmark = pytest.mark.usefixtures("prefect_harness")


def _input(path, seed=0):
    rng = np.random.default_rng(seed)
    z, _, x = np.meshgrid(np.arange(16), np.arange(40), np.arange(36), indexing="ij")
    bias = np.exp(-x / 60.0) * np.exp(-z / 40.0)
    data = (bias * rng.integers(900, 1100, z.shape)).astype(np.uint16)
    write_image(str(path), data, "zyx", (2.0, 1.0, 1.0), chunks=8, shards=16)
    return str(path), data


def test_flow_corrects_and_reruns_from_cache(tmp_path, settings):
    src, data = _input(tmp_path / "in.ome.zarr")
    out = str(tmp_path / "out.ome.zarr")
    # A volume filled with tissue: no background offset, the whole volume is foreground.
    params = ScaledParams(plugin="gaussian", params={"offset": 0, "mask": "all"}, factor=4)
    config = ScaledConfig(input=src, output=out, processing=params)
    ref = run_scaled(config, settings)
    assert ref.url == out and ref.provenance["stage"] == "scaled"
    assert ref.provenance["parameters"]["plugin"]["name"] == "gaussian"
    field_ref = open_image(f"{out}/fields/gaussian")
    field = read_level(field_ref, 0).compute()
    assert field.shape == (4, 10, 9)
    # The corrected image is the input divided by the upsampled field, rounded.
    scale, trans = lowres_geometry((2.0, 1.0, 1.0), (0, 0, 0), (4, 4, 4))
    up = upsample_array(field, data.shape, scale=(2.0, 1.0, 1.0), translation=(0, 0, 0),
                        low_scale=scale, low_translation=trans)  # fmt: skip
    want = np.clip(np.rint(data / up.astype(np.float64)), 0, 65535).astype(np.uint16)
    got = read_level(ref, 0).compute()
    assert np.abs(got.astype(int) - want).max() <= 1
    # the fall-off along x is gone: column means agree within noise after, not before
    before_cv = data.mean(axis=(0, 1)).std() / data.mean()
    after_cv = got.mean(axis=(0, 1)).std() / got.mean()
    assert after_cv < before_cv / 3

    files = snapshot(out)
    again = run_scaled(config, settings)
    assert again == ref
    assert snapshot(out) == files, "a cache hit must not write anything"


def test_changed_parameter_recomputes_and_removed_output_is_rebuilt(tmp_path, settings):
    import shutil

    src, _ = _input(tmp_path / "in.ome.zarr", seed=1)
    out = str(tmp_path / "out.ome.zarr")
    first = run_scaled(ScaledConfig(input=src, output=out), settings)
    second = run_scaled(
        ScaledConfig(
            input=src, output=out, overwrite=True, processing=ScaledParams(dtype="float32")
        ),
        settings,
    )
    assert first.dtype == "uint16" and second.dtype == "float32"
    shutil.rmtree(out)
    third = run_scaled(
        ScaledConfig(
            input=src, output=out, overwrite=True, processing=ScaledParams(dtype="float32")
        ),
        settings,
    )
    assert open_image(out).dtype == "float32" and third.url == out


def test_normalized_output_gets_display_windows_of_its_own(tmp_path, settings):
    from ome_zarr_models.v05.image import Image

    _, data = _input(tmp_path / "plain.ome.zarr", seed=2)
    src = str(tmp_path / "in.ome.zarr")
    omero = {
        "channels": [{"label": "dapi", "color": "0000FF", "active": True,
                      "window": {"min": 0.0, "max": 65535.0, "start": 700.0, "end": 1100.0}}],
        "rdefs": {"model": "color"},
    }  # fmt: skip
    write_image(src, data, "zyx", (2.0, 1.0, 1.0), omero=omero, chunks=8, shards=16)
    out = str(tmp_path / "out.ome.zarr")
    params = ScaledParams(plugin="normalize", params={"low": 2, "high": 98}, factor=2)
    ref = run_scaled(ScaledConfig(input=src, output=out, processing=params), settings)

    # uint16 stretched to its full range: the input's window (700 to 1100) would saturate it.
    coarsest = read_level(ref, len(ref.levels) - 1).compute()
    start, end = np.percentile(coarsest, (0.5, 99.8))
    (channel,) = ref.omero["channels"]
    assert channel["window"] == pytest.approx({"min": 0, "max": 65535, "start": start, "end": end})
    assert end - start > 30000
    assert {k: channel[k] for k in ("label", "color", "active")} == {
        "label": "dapi", "color": "0000FF", "active": True
    }  # fmt: skip
    Image.from_zarr(zarr.open_group(out, mode="r"))
