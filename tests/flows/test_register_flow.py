import json

import numpy as np
import pytest
import torch
from pydantic import ValidationError

from tests.conftest import snapshot
from voxflow.core import synth
from voxflow.core.register import register_pairs
from voxflow.core.stack import pixel_rms
from voxflow.flows import RegistrationConfig, WarpConfig, run_registration, run_warp
from voxflow.flows.register import validate_registration
from voxflow.io import open_image, read_level, write_image
from voxflow.settings import VoxflowSettings
from voxflow.tasks.register import RegistrationParams

pytestmark = pytest.mark.usefixtures("prefect_harness")


@pytest.fixture(scope="module")
def em():
    return synth.em_stack((7, 80, 96), seed=5, max_rotation_deg=2.0, max_shift_px=4.0)


def test_flow_registers_in_batches_and_reruns_from_cache(tmp_path, settings, em):
    src = str(tmp_path / "in.ome.zarr")
    write_image(src, em.image, "zyx", em.spacing, chunks=32, shards=64)
    out = str(tmp_path / "out.ome.zarr")
    params = RegistrationParams(transform="affine", levels=(4, 2, 1), batch_size=2, neighbours=2)
    config = RegistrationConfig(input=src, output=out, registration=params)
    ref = run_registration(config, settings)
    doc = json.loads((tmp_path / "out.ome.zarr" / "transforms.json").read_text())
    assert len(doc["pairs"]) == 6 + 5
    assert pixel_rms(np.array(doc["composed"]), em.transforms, (80, 96)).max() < 0.5
    (y0, y1), (x0, x1) = doc["crop"]["box"]
    assert ref.shape == (7, y1 - y0, x1 - x0) and len(ref.levels) >= 1
    files = snapshot(out)
    again = run_registration(config, settings)
    assert again == ref
    assert snapshot(out) == files, "a cache hit must not write anything"

    # Re-applying the transforms to the same stack gives the same aligned image.
    warped = run_warp(
        WarpConfig(input=src, transforms=out, output=str(tmp_path / "w.ome.zarr")), settings
    )
    assert np.array_equal(read_level(warped, 0).compute(), read_level(ref, 0).compute())
    assert open_image(warped.url).translation == ref.translation


def test_flow_on_multiprocess_cluster(tmp_path, results_dir, em):
    """Two single-threaded worker processes: batches, the warp and torch travel pickled."""
    from voxflow.settings import VoxflowSettings

    procs = VoxflowSettings(
        cluster={"mode": "local", "n_workers": 2, "threads_per_worker": 1, "processes": True},
        prefect={"result_storage": str(results_dir)},
    )
    src = str(tmp_path / "in.ome.zarr")
    write_image(src, em.image, "zyx", em.spacing, chunks=32, shards=64)
    params = RegistrationParams(transform="affine", levels=(4, 2, 1), batch_size=3, neighbours=2)
    ref = run_registration(
        RegistrationConfig(input=src, output=str(tmp_path / "o.ome.zarr"), registration=params),
        procs,
    )
    doc = ref.provenance["transforms"]
    assert pixel_rms(np.array(doc["composed"]), em.transforms, (80, 96)).max() < 0.5
    (y0, y1), (x0, x1) = doc["crop"]["box"]
    assert read_level(ref, 0).compute().shape == (7, y1 - y0, x1 - x0)


@pytest.mark.skipif(torch.cuda.is_available(), reason="the refusal needs a machine without CUDA")
def test_flow_refuses_a_device_its_workers_lack_before_writing(tmp_path, settings, em):
    src = str(tmp_path / "in.ome.zarr")
    write_image(src, em.image[:4], "zyx", em.spacing)
    cpu = RegistrationParams(levels=(2, 1), epochs=10, batch_size=3)
    run_registration(
        RegistrationConfig(input=src, output=str(tmp_path / "cpu.ome.zarr"), registration=cpu),
        settings,
    )
    # Same batches (the device is not part of their cache key), so only the warp would fail.
    out = tmp_path / "cuda.ome.zarr"
    config = RegistrationConfig(
        input=src, output=str(out), registration=cpu.model_copy(update={"device": "cuda"})
    )
    with pytest.raises(ValueError, match=r"`device` 'cuda': CUDA is not available on 1 of 1 "):
        run_registration(config, settings)
    assert not out.exists()

    with pytest.raises(ValueError, match="`device` 'cuda': CUDA is not available on this machine"):
        validate_registration(config, settings)
    # Workers elsewhere may have CUDA: the flow asks them when it runs.
    remote = VoxflowSettings(cluster={"mode": "address", "address": "tcp://scheduler:8786"})
    assert validate_registration(config, remote).url == open_image(src).url
    assert not out.exists()


@pytest.mark.parametrize(("samples", "valid"), [(63, False), (0, False), (64, True), (None, True)])
def test_samples_bound_is_the_same_for_the_config_and_the_core(samples, valid):
    from voxflow.core.register import MIN_SAMPLES as CORE
    from voxflow.flows.register import MIN_SAMPLES

    assert MIN_SAMPLES == CORE == 64
    pair = np.random.default_rng(0).random((2, 16, 16))
    if valid:
        assert RegistrationParams(samples=samples).samples == samples
        register_pairs(pair[0], pair[1], levels=None, samples=samples, transform="translation")
        return
    with pytest.raises(ValidationError, match="greater than or equal to 64"):
        RegistrationParams(samples=samples)
    with pytest.raises(ValueError, match="`samples` must be >= 64, or None to read every pixel"):
        register_pairs(pair[0], pair[1], samples=samples)


def test_batches_ask_gpu_workers_and_report_progress_from_the_flow(tmp_path, results_dir, em):
    """On a cluster whose workers offer a GPU, the flow's batches ask for it, and the flow's
    own body posts the batch progress the command draws; both need the task runner's client,
    which prefect-dask does not make the default one."""
    from distributed import Client, LocalCluster
    from distributed.diagnostics.plugin import SchedulerPlugin

    class Restrictions(SchedulerPlugin):
        def __init__(self):
            self.seen = {}

        def transition(self, key, start, finish, *args, **kwargs):
            if finish == "processing":
                self.seen[key] = self.scheduler.tasks[key].resource_restrictions

    one = {"n_workers": 1, "threads_per_worker": 2, "processes": False, "dashboard_address": None}
    src = str(tmp_path / "in.ome.zarr")
    write_image(src, em.image, "zyx", em.spacing, chunks=32, shards=64)
    params = RegistrationParams(levels=(2, 1), epochs=20, batch_size=2, device="auto")
    config = RegistrationConfig(input=src, output=str(tmp_path / "o.ome.zarr"), registration=params)
    with LocalCluster(**one, resources={"GPU": 1}) as cluster:
        plugin = Restrictions()
        plugin.scheduler = cluster.scheduler
        cluster.scheduler.add_plugin(plugin)
        posted = []

        address = VoxflowSettings(
            cluster={"mode": "address", "address": cluster.scheduler_address},
            prefect={"result_storage": str(results_dir)},
        )
        original = Client.set_metadata

        def record(self, keys, value):
            posted.append((tuple(keys), tuple(value)))
            return original(self, keys, value)

        Client.set_metadata = record
        try:
            run_registration(config, address, progress_key="reg")
        finally:
            Client.set_metadata = original
    gpu = [k for k, r in plugin.seen.items() if r == {"GPU": 1}]
    assert len(gpu) >= 3, f"3 batches of pairs must ask for the GPU, saw {plugin.seen}"
    batches = [v for k, v in posted if k == ("voxflow-progress", "reg") and v[1] == 3]
    assert batches[-1] == (3, 3), posted
