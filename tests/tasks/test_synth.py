import csv
import json

import numpy as np
import pytest
import zarr

from voxflow.core import synth
from voxflow.io import open_image, read_level
from voxflow.tasks import write_em_stack, write_lightsheet


@pytest.mark.parametrize("ngff_version", ["0.5", "0.4"])
def test_lightsheet_dataset_on_disk(tmp_path, ngff_version):
    out = tmp_path / "ls"
    written = write_lightsheet(str(out), shape=(2, 24, 80, 80), seed=1, ngff_version=ngff_version)
    expected = synth.lightsheet((2, 24, 80, 80), seed=1)
    image = open_image(written["image"])
    assert image.dims == ("c", "z", "y", "x") and image.ngff_version == ngff_version
    assert image.scale == (1.0, *expected.spacing)
    assert [c["label"] for c in image.omero["channels"]] == list(expected.channel_names)
    for channel, data in zip(image.omero["channels"], expected.image, strict=True):
        lo, hi = np.percentile(data, (0.5, 99.8))
        assert channel["window"] == {"min": 0.0, "max": 65535.0, "start": lo, "end": hi}
    np.testing.assert_array_equal(read_level(image).compute(), expected.image)
    np.testing.assert_array_equal(read_level(open_image(written["cells"])).compute(),
                                  expected.cell_labels)  # fmt: skip
    np.testing.assert_array_equal(read_level(open_image(written["atlas"])).compute(),
                                  expected.atlas)  # fmt: skip
    if ngff_version == "0.5":
        from ome_zarr_models.v05.image import Image
    else:
        from ome_zarr_models.v04.image import Image
    Image.from_zarr(zarr.open_group(written["image"], mode="r"))
    Image.from_zarr(zarr.open_group(written["atlas"], mode="r"))
    truth = json.loads((out / "ground_truth.json").read_text())
    assert truth["n_cells"] == expected.n_cells
    rows = list(csv.DictReader((out / "regions.csv").open()))
    assert {int(r["id"]) for r in rows} == {r.id for r in expected.regions}


def test_em_dataset_on_disk(tmp_path):
    written = write_em_stack(str(tmp_path / "em"), shape=(3, 64, 64), seed=2)
    expected = synth.em_stack((3, 64, 64), seed=2)
    np.testing.assert_array_equal(read_level(open_image(written["image"])).compute(),
                                  expected.image)  # fmt: skip
    np.testing.assert_array_equal(read_level(open_image(written["aligned"])).compute(),
                                  expected.aligned)  # fmt: skip
    truth = json.loads((tmp_path / "em" / "ground_truth.json").read_text())
    np.testing.assert_allclose(truth["transforms"], expected.transforms)


def test_existing_dataset_needs_overwrite(tmp_path):
    out = tmp_path / "em"
    write_em_stack(str(out), shape=(2, 32, 32))
    with pytest.raises(FileExistsError, match="--overwrite"):
        write_em_stack(str(out), shape=(2, 32, 32))
    write_em_stack(str(out), shape=(2, 32, 32), overwrite=True, seed=5)
    with pytest.raises(ValueError, match="ngff_version"):
        write_em_stack(str(tmp_path / "x"), ngff_version="0.3")


def test_em_dataset_options_reach_images_and_ground_truth(tmp_path):
    options = {"transform": "rigid", "noise": 0.02, "contrast": 0.1}
    written = write_em_stack(str(tmp_path / "em"), shape=(3, 64, 64), seed=2, **options)
    expected = synth.em_stack((3, 64, 64), seed=2, **options)
    image = open_image(written["image"])
    np.testing.assert_array_equal(read_level(image).compute(), expected.image)
    np.testing.assert_array_equal(read_level(open_image(written["aligned"])).compute(),
                                  expected.aligned)  # fmt: skip
    truth = json.loads((tmp_path / "em" / "ground_truth.json").read_text())
    assert truth["transform"] == "rigid"
    assert truth["noise"] == 0.02 and truth["contrast"] == 0.1
    np.testing.assert_array_equal(truth["gain"], expected.gain)
    np.testing.assert_allclose(truth["transforms"], expected.transforms)
    assert {k: image.provenance["parameters"][k] for k in options} == options
    # The defaults write the stack the generator gives without options.
    plain = write_em_stack(str(tmp_path / "plain"), shape=(3, 64, 64), seed=2)
    np.testing.assert_array_equal(read_level(open_image(plain["image"])).compute(),
                                  synth.em_stack((3, 64, 64), seed=2).image)  # fmt: skip
    assert not (tmp_path / "bad").exists()
    with pytest.raises(ValueError, match="`transform` must be one of"):
        write_em_stack(str(tmp_path / "bad"), shape=(3, 64, 64), transform="shear")
    assert not (tmp_path / "bad").exists()
