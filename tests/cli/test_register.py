import json

import numpy as np
from typer.testing import CliRunner

from voxflow.cli import app
from voxflow.core import synth
from voxflow.core.stack import pixel_rms
from voxflow.io import open_image, write_image

runner = CliRunner()


def test_register_and_warp_commands(cli_env, tmp_path):
    em = synth.em_stack((5, 72, 80), seed=2, max_rotation_deg=2.0, max_shift_px=3.0)
    both = np.stack([em.image, 255 - em.image])
    src = str(tmp_path / "in.ome.zarr")
    write_image(src, both, "czyx", (1.0, *em.spacing), chunks=32, shards=64)
    out = str(tmp_path / "out.ome.zarr")
    result = runner.invoke(
        app, ["register", src, "-o", out, "--transform", "affine", "--levels", "4,2,1",
              "--channel", "1", "--batch-size", "2", "--margin", "2", "--interpolation", "cubic",
              "--samples", "1000"],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    words = " ".join(result.output.split())
    assert "4 pairs" in words and "blocks" in words
    assert f"{out}/transforms.json" in result.output.replace("\n", "")
    doc = json.loads((tmp_path / "out.ome.zarr" / "transforms.json").read_text())
    assert doc["registration"]["channel"] == 1 and doc["crop"]["margin"] == 2
    assert doc["registration"]["samples"] == 1000
    assert pixel_rms(np.array(doc["composed"]), em.transforms, (72, 80)).max() < 0.5
    ref = open_image(out)
    (y0, y1), (x0, x1) = doc["crop"]["box"]
    assert ref.shape == (2, 5, y1 - y0, x1 - x0)

    warped = str(tmp_path / "w.ome.zarr")
    result = runner.invoke(app, ["warp", src, "--transforms", out, "-o", warped])
    assert result.exit_code == 0, result.output
    assert open_image(warped).shape == ref.shape


def test_register_refuses_a_2d_image(cli_env, tmp_path):
    src = str(tmp_path / "flat.ome.zarr")
    write_image(src, np.zeros((40, 40), np.uint8), "yx", (1.0, 1.0))
    out = tmp_path / "out.ome.zarr"
    result = runner.invoke(app, ["register", src, "-o", str(out)])
    assert result.exit_code == 2
    assert "2D image" in result.output
    assert not out.exists()


def test_register_rejects_bad_options(cli_env, tmp_path):
    em = synth.em_stack((3, 48, 48), seed=1)
    src = str(tmp_path / "in.ome.zarr")
    write_image(src, em.image, "zyx", em.spacing)
    out = tmp_path / "out.ome.zarr"
    for args, message in [
        (["--transform", "warp"], "transform"),
        (["--levels", "4,a"], "`levels` needs comma-separated integers"),
        (["--levels", "8,x"], "`levels` needs comma-separated integers, got '8,x'"),
        (["--epochs", "5,"], "`epochs` needs comma-separated integers, got '5,'"),
        (["--lr", "0.1,,0.2"], "`lr` needs comma-separated numbers"),
        (["--levels", "4,2", "--epochs", "1,2,3"], "`epochs` needs one value or one per level"),
        (["--samples", "10"], "samples"),
    ]:
        result = runner.invoke(app, ["register", src, "-o", str(out), *args])
        assert result.exit_code == 2, result.output
        assert message in result.output
        assert not out.exists()
    result = runner.invoke(app, ["warp", src, "--transforms", str(tmp_path / "no.json"),
                                 "-o", str(out)])  # fmt: skip
    assert result.exit_code == 2 and "no transforms document" in result.output
