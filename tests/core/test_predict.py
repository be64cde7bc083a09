import dask
import dask.array as da
import numpy as np
import pytest
import torch
from dask._task_spec import DataNode

import tests.core._models as models
from voxflow.core import predict as predict_module
from voxflow.core.predict import gpu_resource, load_model, predict, resolve_device

SHAPE = (20, 23, 17)
HALO = 3  # the tiny net reaches 2 voxels; one more than needed
CHUNKINGS = {
    "regular": (8, 8, 8),
    "not-dividing": (5, 7, 6),
    "one-voxel-edges": ((1, 18, 1), (1, 21, 1), (16, 1)),
}
TILES = {"small": 9, "per-axis": (16, 12, 10)}
FACTORY = "tests.core._models:tiny_net"

# TorchScript is the exchange format for models; torch marks its functions deprecated.
pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.*deprecated:DeprecationWarning")


def _image(dtype=np.float32, seed=0):
    rng = np.random.default_rng(seed)
    return (rng.random(SHAPE) * 4 - 2).astype(dtype)


def _reference(image, net, halo=HALO):
    """The model once on the whole volume padded with zeros, cropped back."""
    padded = np.pad(np.asarray(image, np.float32), halo)
    with torch.no_grad():
        out = net(torch.from_numpy(padded)[None, None])
    crop = tuple(slice(halo, halo + n) for n in image.shape)
    return out.reshape(padded.shape).numpy()[crop]


@pytest.fixture
def net():
    return models.tiny_net().eval()


@pytest.fixture
def script_path(tmp_path, net):
    path = tmp_path / "tiny.pt"
    torch.jit.save(torch.jit.script(net), str(path))
    return path


@pytest.fixture
def fresh_cache():
    predict_module._SPEC_MODELS.clear()
    models.CALLS["tiny_net"] = 0
    yield
    predict_module._SPEC_MODELS.clear()


# --------------------------------------------------------------------------- results


@pytest.mark.parametrize("tile", TILES.values(), ids=TILES.keys())
@pytest.mark.parametrize("chunks", CHUNKINGS.values(), ids=CHUNKINGS.keys())
def test_result_does_not_depend_on_chunks_nor_tiles(script_path, net, chunks, tile):
    image = _image()
    dask_image = da.from_array(image, chunks=chunks)
    out = predict(dask_image, script_path, halo=HALO, tile=tile, device="cpu")
    assert out.dtype == np.float32 and out.chunks == dask_image.chunks
    got = out.compute()
    assert got.dtype == np.float32
    np.testing.assert_allclose(got, _reference(image, net), atol=1e-5)


@pytest.mark.parametrize("chunks", [(1, 7, 9), (1, 30, 30)])
def test_axes_shorter_than_the_halo(net, chunks):
    image = _image()[:1, :30, :17]
    out = predict(da.from_array(image, chunks=chunks), net, halo=HALO, tile=8)
    assert out.chunks == da.from_array(image, chunks=chunks).chunks
    np.testing.assert_allclose(out.compute(), _reference(image, net), atol=1e-5)


def test_a_halo_smaller_than_the_reach_shows_seams(net):
    # The independence above rests on the halo: one voxel short, the chunk edges show.
    image = _image()
    out = predict(da.from_array(image, chunks=(5, 7, 6)), net, halo=1, tile=9, device="cpu")
    assert not np.allclose(out.compute(), _reference(image, net, halo=1), atol=1e-5)


@pytest.mark.parametrize("batch_size", [1, 3])
def test_batch_size_does_not_change_the_result(net, batch_size):
    image = _image(seed=1)
    out = predict(
        da.from_array(image, chunks=(10, 12, 9)), net, halo=HALO, tile=8, batch_size=batch_size
    )
    np.testing.assert_allclose(out.compute(), _reference(image, net), atol=1e-5)


@pytest.mark.parametrize("dtype", [np.uint16, np.int8, np.float64])
def test_any_numeric_input_is_cast_to_float32(net, dtype):
    # Small values: large logits would make float32 rounding the larger effect.
    image = (np.random.default_rng(2).random(SHAPE) * 6 - 2).astype(dtype)
    out = predict(da.from_array(image, chunks=(8, 8, 8)), net, halo=HALO, tile=12)
    assert out.dtype == np.float32
    np.testing.assert_allclose(out.compute(), _reference(image, net), atol=1e-5)


def test_default_tile_and_numpy_input(net):
    image = _image(seed=3)
    out = predict(image, net, halo=HALO)
    assert isinstance(out, da.Array) and out.shape == SHAPE
    np.testing.assert_allclose(out.compute(), _reference(image, net), atol=1e-5)


def test_output_without_channel_axis_is_accepted(net):
    image = _image(seed=4)
    out = predict(da.from_array(image, chunks=8), "tests.core._models:squeezed_net", halo=HALO)
    np.testing.assert_allclose(out.compute(), _reference(image, net), atol=1e-5)


def test_bfloat16_runs_under_autocast(net):
    image = _image(seed=5)
    out = predict(da.from_array(image, chunks=8), net, halo=HALO, tile=12, dtype="bfloat16")
    got = out.compute()
    assert got.dtype == np.float32
    reference = _reference(image, net)
    np.testing.assert_allclose(got, reference, atol=0.05)
    # Half precision did run: the float32 result is not reproduced to the last digits.
    assert not np.allclose(got, reference, atol=1e-6, rtol=0)


def test_wrong_output_shape_is_refused_at_compute():
    out = predict(da.zeros(SHAPE, chunks=8), "tests.core._models:cropping_net", halo=1)
    with pytest.raises(ValueError, match=r"model returned shape \(\d+, 1, 10, 10, 8\), expected"):
        out.compute()


# --------------------------------------------------------------------------- model delivery


def test_a_spec_is_loaded_once_per_process(fresh_cache):
    image = _image(seed=6)
    out = predict(da.from_array(image, chunks=(5, 7, 6)), FACTORY, halo=HALO, device="cpu")
    assert out.numblocks == (4, 4, 3)
    got = out.compute(scheduler="threads")
    assert models.CALLS["tiny_net"] == 1
    np.testing.assert_allclose(got, _reference(image, models.tiny_net().eval()), atol=1e-5)


def test_a_path_spec_travels_as_an_absolute_path(script_path, monkeypatch, fresh_cache):
    monkeypatch.chdir(script_path.parent)
    out = predict(da.zeros(SHAPE, chunks=10), script_path.name, halo=HALO)
    assert list(predict_module._SPEC_MODELS) == [(str(script_path), "cpu")]
    monkeypatch.chdir(script_path.parent.parent)
    predict_module._SPEC_MODELS.clear()
    assert out.compute().shape == SHAPE


def test_a_module_is_one_entry_of_the_graph(net):
    out = predict(da.from_array(_image(), chunks=(5, 7, 6)), net, halo=HALO)
    graph = dict(out.__dask_graph__())
    holding = [k for k, v in graph.items() if isinstance(v, DataNode) and v.value is net]
    assert len(holding) == 1
    # No task carries a copy of its own.
    assert (
        sum(
            isinstance(v, DataNode) and isinstance(v.value, torch.nn.Module) for v in graph.values()
        )
        == 1
    )
    users = [v for v in graph.values() if holding[0] in getattr(v, "dependencies", ())]
    assert len(users) == np.prod(out.numblocks)


def test_a_module_on_the_device_is_used_as_is(net):
    assert predict_module._module_on(net, torch.device("cpu")) is net


def test_a_module_elsewhere_is_copied_to_the_device_once(net):
    # The meta device stands in for a GPU: the user's module must stay where it is.
    model = net
    meta = torch.device("meta")
    copy = predict_module._module_on(model, meta)
    assert copy is not model and not copy.training
    assert all(p.device == meta for p in copy.parameters())
    assert all(p.device.type == "cpu" for p in model.parameters())
    assert predict_module._module_on(model, meta) is copy


# --------------------------------------------------------------------------- loading


def test_load_model_from_script_file(script_path, net):
    x = torch.from_numpy(_image()[None, None])
    for spec in (script_path, str(script_path)):
        model = load_model(spec)
        assert isinstance(model, torch.jit.ScriptModule) and not model.training
        torch.testing.assert_close(model(x), net(x))


def test_load_model_from_factory_and_module():
    model = load_model(FACTORY)
    assert isinstance(model, torch.nn.Sequential) and not model.training
    module = torch.nn.Conv3d(1, 1, 3).train()
    assert load_model(module) is module and not module.training


@pytest.mark.parametrize(
    ("spec", "match"),
    [
        ("missing.pt", "'missing.pt': no such TorchScript file"),
        ("nonexistent_package.models:net", "nonexistent_package.models:net.*cannot import"),
        ("tests.core._models:missing", "tests.core._models:missing.*cannot import"),
        ("tests.core._models:NOT_CALLABLE", "names int, not a factory"),
        ("tests.core._models:not_a_model", "must return a torch.nn.Module, got str"),
    ],
)
def test_load_errors_name_the_spec(spec, match):
    with pytest.raises(ValueError, match=match):
        load_model(spec)


def test_a_file_that_is_not_torchscript(tmp_path):
    path = tmp_path / "weights.pt"
    path.write_bytes(b"not a model")
    with pytest.raises(ValueError, match=r"weights\.pt' is not a TorchScript file"):
        load_model(path)
    torch.save({"w": torch.zeros(2)}, path)
    with pytest.raises(ValueError, match="is not a TorchScript file"):
        load_model(str(path))


def test_load_model_refuses_other_types():
    with pytest.raises(TypeError, match="`model` must be a TorchScript path"):
        load_model(3)


def test_predict_fails_early_on_a_bad_spec():
    with pytest.raises(ValueError, match="no such TorchScript file"):
        predict(da.zeros(SHAPE, chunks=8), "missing.pt")


# --------------------------------------------------------------------------- devices


@pytest.fixture
def no_accelerator(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(predict_module, "_mps_available", lambda: False)


def test_auto_falls_back_to_cpu(no_accelerator):
    assert resolve_device() == torch.device("cpu")
    assert resolve_device("auto") == torch.device("cpu")
    assert resolve_device("cpu") == torch.device("cpu")
    assert gpu_resource(None) == {}
    assert gpu_resource("cpu") == {}


def test_auto_prefers_cuda_then_mps(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(predict_module, "_mps_available", lambda: True)
    assert resolve_device(None) == torch.device("cuda")
    assert resolve_device("cuda:1") == torch.device("cuda:1")
    assert gpu_resource("auto") == {"GPU": 1}
    assert gpu_resource("cpu") == {}
    with pytest.raises(ValueError, match="has 2 CUDA devices"):
        resolve_device("cuda:2")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device(None) == torch.device("mps")


@pytest.mark.parametrize("device", ["cuda", "cuda:0"])
def test_cuda_without_cuda_is_refused(no_accelerator, device):
    with pytest.raises(ValueError, match=f"`device` '{device}': CUDA is not available"):
        resolve_device(device)
    with pytest.raises(ValueError, match="CUDA is not available"):
        gpu_resource(device)


def test_mps_without_mps_is_refused(no_accelerator):
    with pytest.raises(ValueError, match="MPS is not available"):
        resolve_device("mps")


@pytest.mark.parametrize("device", ["gpu", "tpu", "cuda:x", ""])
def test_unknown_devices_are_refused(device):
    with pytest.raises(ValueError, match="`device` must be 'auto', 'cpu', 'cuda'"):
        resolve_device(device)
    with pytest.raises(ValueError, match="`device` must be"):
        predict(da.zeros(SHAPE, chunks=8), models.tiny_net(), device=device)


def test_device_must_be_a_string():
    with pytest.raises(TypeError, match="`device` must be a string or None"):
        resolve_device(0)


# --------------------------------------------------------------------------- validation


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"image": np.zeros((4, 4))}, ValueError, r"must be 3-D \(z, y, x\), got shape \(4, 4\)"),
        ({"image": np.zeros(SHAPE, bool)}, TypeError, "integers or floats, got dtype bool"),
        ({"image": [[[1.0]]]}, TypeError, "NumPy or Dask array, got list"),
        ({"halo": -1}, ValueError, "`halo` must be >= 0"),
        ({"halo": 1.5}, TypeError, "`halo` must be an integer"),
        ({"halo": 3, "tile": 6}, ValueError, r"`tile` must exceed 2 \* halo \(6\)"),
        ({"tile": (8, 8)}, ValueError, r"`tile` needs one size per axis \(3\)"),
        ({"tile": 0}, ValueError, "`tile` must be >= 1"),
        ({"batch_size": 0}, ValueError, "`batch_size` must be >= 1"),
        ({"dtype": "int8"}, ValueError, "`dtype` must be one of 'float32', 'float16', 'bfloat16'"),
        ({"dtype": 3}, TypeError, "`dtype` must be a string"),
    ],
)
def test_bad_arguments(kwargs, error, match):
    arguments = {"image": da.zeros(SHAPE, chunks=8), "model": models.tiny_net(), **kwargs}
    with pytest.raises(error, match=match):
        predict(**arguments)


def test_dtype_accepts_numpy_and_torch_float32(net):
    image = _image(seed=7)
    for dtype in (np.float32, torch.float32):
        out = predict(da.from_array(image, chunks=10), net, halo=HALO, dtype=dtype)
        np.testing.assert_allclose(out.compute(), _reference(image, net), atol=1e-5)


def test_predict_runs_on_the_default_scheduler(net):
    # Whatever scheduler dask.compute picks: the sync one here, a client in production.
    image = _image(seed=8)
    with dask.config.set(scheduler="sync"):
        out = predict(da.from_array(image, chunks=10), net, halo=HALO).compute()
    np.testing.assert_allclose(out, _reference(image, net), atol=1e-5)
