import json

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from tests.conftest import snapshot
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
        (["--samples", "10"], "`--samples` must be >= 64, or 0 to read every pixel; got 10"),
        (["--samples", "63"], "`--samples` must be >= 64, or 0 to read every pixel; got 63"),
        (["--samples", "-5"], "`--samples` must be >= 64, or 0 to read every pixel; got -5"),
    ]:
        result = runner.invoke(app, ["register", src, "-o", str(out), *args])
        assert result.exit_code == 2, result.output
        assert message in result.output
        assert not out.exists()
    result = runner.invoke(app, ["warp", src, "--transforms", str(tmp_path / "no.json"),
                                 "-o", str(out)])  # fmt: skip
    assert result.exit_code == 2 and "no transforms document" in result.output


def _mps_available():
    mps = getattr(torch.backends, "mps", None)
    return bool(mps is not None and mps.is_available())


@pytest.mark.parametrize(
    ("device", "kind", "available"),
    [("cuda", "CUDA", torch.cuda.is_available), ("mps", "MPS", _mps_available)],
)
def test_register_refuses_a_device_this_machine_lacks(cli_env, tmp_path, device, kind, available):
    if available():
        pytest.skip(f"this machine has {kind}")
    em = synth.em_stack((3, 48, 48), seed=1)
    src = str(tmp_path / "in.ome.zarr")
    write_image(src, em.image, "zyx", em.spacing)
    out = tmp_path / "out.ome.zarr"
    result = runner.invoke(app, ["register", src, "-o", str(out), "--device", device])
    assert result.exit_code == 2, result.output
    # One line, before any cluster or progress bar starts.
    assert result.output.strip().splitlines() == [
        f"error: `device` '{device}': {kind} is not available on this machine"
    ]
    assert not out.exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="the refusal needs a machine without CUDA")
def test_warp_refuses_a_device_this_machine_lacks(cli_env, tmp_path):
    em = synth.em_stack((3, 48, 48), seed=1)
    src = str(tmp_path / "in.ome.zarr")
    write_image(src, em.image, "zyx", em.spacing)
    aligned = tmp_path / "aligned.ome.zarr"
    args = ["register", src, "-o", str(aligned), "--levels", "2,1", "--epochs", "10"]
    assert runner.invoke(app, args).exit_code == 0
    out = tmp_path / "warped.ome.zarr"
    args = ["warp", src, "--transforms", str(aligned), "-o", str(out), "--device", "cuda"]
    result = runner.invoke(app, args)
    assert result.exit_code == 2, result.output
    assert result.output.strip().splitlines() == [
        "error: `device` 'cuda': CUDA is not available on this machine"
    ]
    assert not out.exists()


def test_register_rerun_says_it_reused_the_output(cli_env, tmp_path):
    em = synth.em_stack((4, 48, 56), seed=3, max_rotation_deg=1.0, max_shift_px=2.0)
    src = str(tmp_path / "in.ome.zarr")
    write_image(src, em.image, "zyx", em.spacing)
    out = tmp_path / "out.ome.zarr"
    args = ["register", src, "-o", str(out), "--levels", "2,1", "--epochs", "30",
            "--samples", "0"]  # fmt: skip
    first = runner.invoke(app, args)
    assert first.exit_code == 0, first.output
    words = " ".join(first.output.split())
    assert f"wrote {out} in" in words and "reused" not in words
    doc = json.loads((out / "transforms.json").read_text())
    assert doc["registration"]["samples"] is None, "--samples 0 reads every pixel"
    files = snapshot(out)

    again = runner.invoke(app, args)
    assert again.exit_code == 0, again.output
    words = " ".join(again.output.split())
    assert f"reused {out} (already up to date, nothing recomputed) in" in words
    assert "wrote" not in words and "3 pairs" in words
    assert snapshot(out) == files

    # A changed option writes again (its batches are reused, the warp is not).
    changed = runner.invoke(app, [*args, "--margin", "1", "--overwrite"])
    assert changed.exit_code == 0, changed.output
    words = " ".join(changed.output.split())
    assert f"wrote {out} in" in words and "reused" not in words

    if not torch.cuda.is_available():
        # The batches are cached (the device is not part of their key): without the check up
        # front the run would reach the warp, which writes, before CUDA failed.
        moved = tmp_path / "cuda.ome.zarr"
        refused = runner.invoke(app, [*args[:3], str(moved), *args[4:], "--device", "cuda"])
        assert refused.exit_code == 2, refused.output
        assert refused.output.strip().splitlines() == [
            "error: `device` 'cuda': CUDA is not available on this machine"
        ]
        assert not moved.exists()


def test_register_help_states_every_default():
    from voxflow.core.register import make_levels

    result = runner.invoke(app, ["register", "--help"], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    assert "Most steps per level (N or N,N,…); default 200." in result.output
    assert "Learning rate per level (x or x,x,…); default 0.1 × its factor." in result.output
    assert ">= 64 (0: all)" in result.output
    # The defaults the help states are the ones the registration uses.
    levels = make_levels((8, 4, 2, 1))
    assert [lv.epochs for lv in levels] == [200] * 4
    assert [lv.lr for lv in levels] == pytest.approx([0.1 * lv.factor for lv in levels])
