import json

import numpy as np
import pytest

from tests.conftest import snapshot
from voxflow.core import synth
from voxflow.core.stack import pixel_rms
from voxflow.flows import RegistrationConfig, WarpConfig, run_registration, run_warp
from voxflow.io import open_image, read_level, write_image
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
