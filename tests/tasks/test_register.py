import json

import numpy as np
import pytest
import zarr
from scipy import ndimage

from voxflow.core import synth
from voxflow.core.pyramid import downsample_array
from voxflow.core.stack import pixel_rms, solve_stack
from voxflow.core.warp import warp_slices
from voxflow.io import Location, open_image, read_level, write_image
from voxflow.tasks.pyramid import PyramidParams
from voxflow.tasks.register import (
    INCOMPLETE_MARKER,
    TRANSFORMS_FILE,
    PairResult,
    RegistrationParams,
    align_stack,
    apply_transforms,
    check_registration,
    check_transforms,
    compose_stack,
    pair_batches,
    read_transforms,
    register_pairs_of,
    stack_geometry,
    transforms_document,
    warp_stack,
)

SPACING = (0.05, 0.004, 0.004)
FAST = {"levels": (4, 2, 1), "batch_size": 4}


@pytest.fixture(scope="module")
def em():
    return synth.em_stack((6, 96, 112), seed=3, max_rotation_deg=2.0, max_shift_px=4.0)


def _write(path, data, dims="zyx", scale=SPACING, translation=None):
    write_image(str(path), data, dims, scale, translation=translation, chunks=32, shards=64)
    return open_image(str(path))


def _reference_warp(image, composed, box):
    (y0, y1), (x0, x1) = box
    out = []
    for sl, t in zip(image, composed, strict=True):
        inv = np.linalg.inv(t)
        shift = np.array([[1, 0, y0], [0, 1, x0], [0, 0, 1.0]])
        got = ndimage.affine_transform(sl.astype(float), inv @ shift, order=1, mode="constant",
                                       output_shape=(y1 - y0, x1 - x0))  # fmt: skip
        out.append(np.clip(np.rint(got), 0, 255))
    return np.stack(out)


# -- geometry and validation --------------------------------------------------------------------


def test_stack_geometry_of_zyx_and_czyx(tmp_path, em):
    ref = _write(tmp_path / "a.ome.zarr", em.image, translation=(0, 1.0, 2.0))
    geo = stack_geometry(ref)
    assert (geo.z, geo.c, geo.n_slices, geo.n_channels) == (0, None, 6, 1)
    assert geo.frame == (96, 112) and geo.spacing == SPACING[1:] and geo.origin == (1.0, 2.0)
    both = np.stack([em.image, 255 - em.image])
    ref = _write(tmp_path / "b.ome.zarr", both, "czyx", (1.0, *SPACING))
    geo = stack_geometry(ref)
    assert (geo.z, geo.c, geo.n_channels) == (1, 0, 2)


@pytest.mark.parametrize(
    ("data", "dims", "match"),
    [
        (np.zeros((32, 32), np.uint8), "yx", "2D image"),
        (np.zeros((1, 32, 32), np.uint8), "zyx", "one slice"),
        (np.zeros((2, 3, 32, 32), np.uint8), "tzyx", "one time point"),
        (np.zeros((3, 16, 16), np.uint8), "cyx", "no z axis"),
    ],
)
def test_not_a_stack_is_refused(tmp_path, data, dims, match):
    scale = (1.0,) * len(dims)
    write_image(str(tmp_path / "x.ome.zarr"), data, dims, scale)
    ref = open_image(str(tmp_path / "x.ome.zarr"))
    with pytest.raises(ValueError, match=match):
        check_registration(ref, str(tmp_path / "out.ome.zarr"), RegistrationParams())
    assert not (tmp_path / "out.ome.zarr").exists()


def test_bad_channel_reference_and_existing_output(tmp_path, em):
    ref = _write(tmp_path / "a.ome.zarr", em.image)
    out = str(tmp_path / "out.ome.zarr")
    with pytest.raises(ValueError, match="`channel` 1 is out of range"):
        check_registration(ref, out, RegistrationParams(channel=1))
    with pytest.raises(ValueError, match="`reference` 6 is out of range"):
        check_registration(ref, out, RegistrationParams(reference=6))
    (tmp_path / "out.ome.zarr").mkdir()
    (tmp_path / "out.ome.zarr" / "something").write_text("x")
    with pytest.raises(FileExistsError):
        check_registration(ref, out, RegistrationParams())
    with pytest.raises(ValueError, match=r"is the input|inside|contains"):
        check_registration(ref, ref.url, RegistrationParams(), overwrite=True)


def test_params_per_level_lengths_are_checked():
    with pytest.raises(ValueError, match="`epochs` needs one value or one per level"):
        RegistrationParams(levels=(4, 2, 1), epochs=(10, 20))
    assert RegistrationParams(levels=(4, 2, 1), epochs=(10,), lr=(0.1, 0.2, 0.3)).lr[2] == 0.3


def test_samples_default_and_bounds_are_the_cores():
    from voxflow.core.register import DEFAULT_SAMPLES

    assert RegistrationParams().samples == DEFAULT_SAMPLES
    assert RegistrationParams(samples=None).registration_json()["samples"] is None
    # The samples decide the pairwise results: they are part of the batch cache key.
    assert (
        RegistrationParams(samples=64).registration_json()
        != RegistrationParams().registration_json()
    )
    with pytest.raises(ValueError, match="greater than or equal to 64"):
        RegistrationParams(samples=63)


@pytest.mark.parametrize(("n", "k", "size"), [(6, 1, 4), (6, 3, 4), (2, 1, 16), (9, 2, 5)])
def test_pair_batches(n, k, size):
    batches = pair_batches(n, k, size)
    pairs = [p for b in batches for p in b]
    want = {(i, j) for i in range(n) for j in range(max(0, i - k), i)}
    assert set(pairs) == want and len(pairs) == len(want)
    assert all(len(b) <= size for b in batches)
    assert pairs[: n - 1] == [(i, i - 1) for i in range(1, n)], "the chain comes first"


# -- composition ---------------------------------------------------------------------------------


def _result(moving, fixed, matrix, converged=True):
    return PairResult(moving=moving, fixed=fixed, matrix=tuple(map(tuple, matrix)), loss=0.1,
                      steps=5, converged=converged)  # fmt: skip


def test_compose_chain_and_a_pair_that_did_not_converge(em):
    results = [_result(k, k - 1, em.pairwise[k]) for k in range(1, 6)]
    composed, rejected = compose_stack(6, results, em.image.shape[1:])
    np.testing.assert_allclose(composed, em.transforms, atol=1e-9)
    assert rejected == []
    results[2] = _result(3, 2, np.full((3, 3), 7.0), converged=False)
    composed, _ = compose_stack(6, results, em.image.shape[1:])
    np.testing.assert_allclose(composed[3], composed[2], atol=1e-12)
    assert np.isfinite(composed).all()


def test_compose_with_neighbours_uses_every_pair(em):
    truth = em.transforms
    results = [
        _result(i, j, np.linalg.inv(truth[j]) @ truth[i]) for i in range(1, 6)
        for j in range(max(0, i - 2), i)
    ]  # fmt: skip
    # The chain link 3→2 failed; 3→1 still ties slice 3 to the stack.
    results = [_result(3, 2, np.eye(3), False) if (r.moving, r.fixed) == (3, 2) else r
               for r in results]  # fmt: skip
    composed, rejected = compose_stack(6, results, em.image.shape[1:])
    assert pixel_rms(composed, truth, em.image.shape[1:]).max() < 1e-3
    assert rejected == []


def test_a_failed_far_pair_is_dropped_from_the_drift_solve():
    em = synth.em_stack((12, 96, 112), seed=3)
    truth, frame = em.transforms, em.image.shape[1:]
    rng = np.random.default_rng(0)

    def measured(i, j):
        noise = np.eye(3)
        noise[:2, 2] = rng.normal(0, 0.05, 2)  # a registration error of ~0.05 px
        return noise @ np.linalg.inv(truth[j]) @ truth[i]

    results = [_result(i, j, measured(i, j)) for i in range(1, 12)
               for j in range(max(0, i - 3), i)]  # fmt: skip
    wrong = np.linalg.inv(truth[5]) @ truth[8]
    wrong[:2, 2] += (15.0, -9.0)  # converged, but on the wrong structure
    results = [_result(8, 5, wrong) if (r.moving, r.fixed) == (8, 5) else r for r in results]
    plain = solve_stack(12, np.array([(r.moving, r.fixed) for r in results]),
                        np.array([r.matrix for r in results]), frame)  # fmt: skip
    composed, rejected = compose_stack(12, results, frame)
    assert pixel_rms(plain, truth, frame).max() > 1.0, "the outlier matters to a plain solve"
    assert rejected == [(8, 5)]
    assert pixel_rms(composed, truth, frame).max() < 0.2


def test_compose_needs_every_chain_pair(em):
    results = [_result(k, k - 1, em.pairwise[k]) for k in (1, 2, 4, 5)]
    with pytest.raises(ValueError, match=r"no registration result.*\[3\]"):
        compose_stack(6, results, em.image.shape[1:])


# -- the whole stage -----------------------------------------------------------------------------


def test_register_and_align_matches_truth_and_reference_warp(tmp_path, em):
    ref = _write(tmp_path / "a.ome.zarr", em.image, translation=(0.0, 10.0, 20.0))
    params = RegistrationParams(transform="affine", **FAST)
    pairs = [p for b in pair_batches(6, 1, 4) for p in b]
    results = register_pairs_of(ref, pairs, params)
    assert [(r.moving, r.fixed) for r in results] == pairs
    assert all(r.converged and r.steps > 0 for r in results)
    out = str(tmp_path / "out.ome.zarr")
    aligned = align_stack(ref, results, out, params)
    doc = json.loads((tmp_path / "out.ome.zarr" / TRANSFORMS_FILE).read_text())
    composed = np.array(doc["composed"])
    frame = em.image.shape[1:]
    assert pixel_rms(composed, em.transforms, frame).max() < 0.5
    box = tuple(tuple(b) for b in doc["crop"]["box"])
    assert np.abs(np.array(box) - np.array(em.valid_box)).max() <= 2
    (y0, y1), (x0, x1) = box
    assert aligned.shape == (6, y1 - y0, x1 - x0)
    assert aligned.translation == pytest.approx((0.0, 10.0 + y0 * 0.004, 20.0 + x0 * 0.004))
    got = read_level(aligned, 0).compute()
    want = _reference_warp(em.image, composed, box)
    assert np.abs(got.astype(int) - want).max() <= 1
    assert aligned.provenance["transforms"]["composed"] == doc["composed"]
    phys = np.array(doc["composed_physical"])
    h = np.array([[0.004, 0, 10.0], [0, 0.004, 20.0], [0, 0, 1]])
    np.testing.assert_allclose(phys, h @ composed @ np.linalg.inv(h), atol=1e-9)
    for pair in doc["pairs"]:
        m = np.array(pair["matrix"])
        np.testing.assert_allclose(pair["matrix_physical"], h @ m @ np.linalg.inv(h), atol=1e-9)
        assert pair["outlier"] is False
    assert not Location.parse(out).exists(INCOMPLETE_MARKER)
    from ome_zarr_models.v05.image import Image

    Image.from_zarr(zarr.open_group(out, mode="r"))
    assert np.array_equal(zarr.open_array(f"{out}/0", mode="r")[:], got)


def test_an_earlier_output_passes_only_for_the_same_request(tmp_path, em):
    """Rerunning the same registration into its output is allowed (the cache serves it, or
    the same image is written again); any other request into it is refused before a pair is
    registered, not after every pair."""
    ref = _write(tmp_path / "a.ome.zarr", em.image)
    params = RegistrationParams(**FAST)
    pairs = [p for b in pair_batches(6, 1, 4) for p in b]
    results = register_pairs_of(ref, pairs, params)
    out = str(tmp_path / "out.ome.zarr")
    first = align_stack(ref, results, out, params)
    before = read_level(first, 0).compute()

    check_registration(ref, out, params)  # the same request
    again = align_stack(ref, results, out, params)  # the same image, written again
    np.testing.assert_array_equal(read_level(again, 0).compute(), before)

    for other in (params.model_copy(update={"margin": 2}), RegistrationParams(levels=(2, 1))):
        with pytest.raises(FileExistsError, match="already exists"):
            check_registration(ref, out, other)
    # Other transforms with the same parameters: never written over silently.
    shifted = [
        r.model_copy(update={"matrix": ((1.0, 0.0, 1.0), (0.0, 1.0, 0.0), (0.0, 0.0, 1.0))})
        for r in results
    ]
    with pytest.raises(FileExistsError, match="already exists"):
        align_stack(ref, shifted, out, params)
    np.testing.assert_array_equal(read_level(open_image(out), 0).compute(), before)


def test_no_crop_keeps_frame_and_translation(tmp_path, em):
    ref = _write(tmp_path / "a.ome.zarr", em.image, translation=(0.0, 1.0, 2.0))
    params = RegistrationParams(crop=False, **FAST)
    results = [_result(k, k - 1, em.pairwise[k]) for k in range(1, 6)]
    aligned = align_stack(ref, results, str(tmp_path / "o.ome.zarr"), params)
    assert aligned.shape == em.image.shape and aligned.translation == (0.0, 1.0, 2.0)
    got = read_level(aligned, 0).compute()
    want = _reference_warp(em.image, em.transforms, ((0, 96), (0, 112)))
    assert np.abs(got.astype(int) - want).max() <= 1
    # Where the slice covers the frame, the aligned slices are the true ones.
    inside = em.valid_mask & ndimage.binary_erosion(em.valid_mask, iterations=2)
    assert np.abs(got.astype(int) - em.aligned)[inside].mean() < 3


def test_small_warp_blocks_give_the_same_stack(tmp_path, em, monkeypatch):
    import voxflow.tasks.register as task

    ref = _write(tmp_path / "a.ome.zarr", em.image)
    params = RegistrationParams(crop=False, **FAST)
    results = [_result(k, k - 1, em.pairwise[k]) for k in range(1, 6)]
    whole = read_level(align_stack(ref, results, str(tmp_path / "w.ome.zarr"), params), 0)
    geo = stack_geometry(ref)
    # Room for 4 slices per block; 4 does not divide the 6 slices fed to level 1, so 3 do.
    # (The stored chunks, 6 deep, are too large to be read whole here.)
    monkeypatch.setattr(task, "_SLAB_BYTES", 4 * 96 * 112)
    monkeypatch.setattr(task, "_SLAB_MAX_BYTES", 4 * 96 * 112)
    plan = task._plan_pyramid(task._output_like(ref, geo, ((0, 96), (0, 112))), params.pyramid)[1]
    assert task._slab_depth(plan, ref, geo) == 3
    blocks = read_level(align_stack(ref, results, str(tmp_path / "b.ome.zarr"), params), 0)
    np.testing.assert_array_equal(blocks.compute(), whole.compute())


def test_warp_blocks_span_whole_stored_chunks(tmp_path, monkeypatch):
    import voxflow.tasks.register as task

    rng = np.random.default_rng(3)
    image = rng.integers(0, 255, (12, 40, 48), dtype=np.uint8)
    write_image(str(tmp_path / "a.ome.zarr"), image, "zyx", SPACING, chunks=(4, 16, 16),
                shards=(12, 32, 32))  # fmt: skip
    ref = open_image(str(tmp_path / "a.ome.zarr"))
    geo = stack_geometry(ref)
    params = RegistrationParams(crop=False, pyramid=PyramidParams(levels=1), **FAST)
    plan = task._plan_pyramid(task._output_like(ref, geo, ((0, 40), (0, 48))), params.pyramid)[1]
    per_slice = 40 * 48
    depths = {}
    for room, limit in ((2, 12), (5, 12), (9, 12), (2, 3)):
        monkeypatch.setattr(task, "_SLAB_BYTES", room * per_slice)
        monkeypatch.setattr(task, "_SLAB_MAX_BYTES", limit * per_slice)
        depths[room, limit] = task._slab_depth(plan, ref, geo)
    # Room for 2 or 5 slices: one 4-deep stored chunk per block rather than cutting it; for
    # 9, two chunks would not divide the 12 slices, so one; stored chunks too large to read
    # whole: the room decides (2 slices).
    assert depths == {(2, 12): 4, (5, 12): 4, (9, 12): 4, (2, 3): 2}
    monkeypatch.setattr(task, "_SLAB_BYTES", 12 * per_slice)
    composed = np.tile(np.eye(3), (12, 1, 1))
    composed[:, :2, 2] = rng.uniform(-3, 3, (12, 2))
    composed[:, 0, 1], composed[:, 1, 0] = 0.02, -0.02
    box = ((0, 40), (0, 48))
    outputs = []
    for room in (12, 2):
        monkeypatch.setattr(task, "_SLAB_BYTES", room * per_slice)
        doc = transforms_document(ref, geo, params, [], composed, box)
        out = warp_stack(ref, doc, composed, box, str(tmp_path / f"w{room}.ome.zarr"), params)
        outputs.append(read_level(out, 0).compute())
    np.testing.assert_array_equal(outputs[1], outputs[0])
    np.testing.assert_array_equal(outputs[0], warp_slices(image, composed, box=box, device="cpu"))


def _stored_layout(image, level=0):
    doc = Location.parse(image.url).child(image.levels[level].path).read_json("zarr.json")
    shard = doc["chunk_grid"]["configuration"]["chunk_shape"]
    return doc["codecs"][0]["configuration"]["chunk_shape"], shard


@pytest.mark.parametrize(
    ("room", "depth"),
    [
        (256, 12),  # room for the default 256-deep shards (capped to the 12 slices): kept
        (5, 4),  # room for 5 slices: 4-deep units, chunks wider in-plane (capped to the frame)
        (0.5, 1),  # not even one slice fits: one-slice units
    ],
)
def test_output_units_are_as_shallow_as_memory_needs(tmp_path, monkeypatch, room, depth):
    import voxflow.tasks.register as task

    rng = np.random.default_rng(5)
    image = rng.integers(0, 255, (12, 40, 48), dtype=np.uint8)
    ref = _write(tmp_path / "a.ome.zarr", image)
    geo = stack_geometry(ref)
    params = RegistrationParams(crop=False, pyramid=PyramidParams(levels=2), **FAST)
    composed = np.tile(np.eye(3), (12, 1, 1))
    composed[:, :2, 2] = rng.uniform(-3, 3, (12, 2))
    composed[:, 0, 1], composed[:, 1, 0] = 0.03, -0.03
    box = ((2, 37), (1, 46))
    per_slice = 35 * 45
    monkeypatch.setattr(task, "_UNIT_DEPTH_BYTES", int(room * per_slice))
    doc = transforms_document(ref, geo, params, [], composed, box)
    out = warp_stack(ref, doc, composed, box, str(tmp_path / "w.ome.zarr"), params)
    assert _stored_layout(out) == ([depth, 35, 45], [depth, 35, 45])
    # Every level of the output takes the same depth; the voxels do not depend on it.
    assert _stored_layout(out, 1)[1][0] == depth
    np.testing.assert_array_equal(
        read_level(out, 0).compute(), warp_slices(image, composed, box=box, device="cpu")
    )


def test_output_units_grow_in_plane_and_a_chosen_layout_is_kept(tmp_path, monkeypatch):
    import voxflow.tasks.register as task

    ref = _write(tmp_path / "a.ome.zarr", np.zeros((3, 5, 4, 4), np.uint16), "czyx",
                 (1.0, *SPACING))  # fmt: skip
    geo = stack_geometry(ref)
    big = ref.levels[0].model_copy(update={"shape": (3, 300, 8192, 8192)})
    huge = ref.model_copy(update={"levels": (big,)})
    # 8192² slices of 3 uint16 channels: 384 MiB a slice, so one-slice units; a chunk keeps
    # the 64³ voxels of the default as 1 × 512 × 512, and a shard holds 4 × 4 of them.
    got = task._bounded_layout(PyramidParams(), huge, geo)
    assert (got.chunks, got.shards) == ((1, 512, 512), (1, 2048, 2048))
    monkeypatch.setattr(task, "_UNIT_DEPTH_BYTES", 8 * 2**30)
    got = task._bounded_layout(PyramidParams(), huge, geo)  # 21 slices fit: 16-deep units
    assert (got.chunks, got.shards) == ((16, 128, 128), (16, 512, 512))
    got = task._bounded_layout(PyramidParams(ngff_version="0.4"), huge, geo)
    assert (got.chunks, got.shards) == ((16, 512, 512), None)
    chosen = PyramidParams(shards=(256, 256, 256))
    assert task._bounded_layout(chosen, huge, geo) is chosen
    chosen = PyramidParams(chunks=(8, 64, 64))
    assert task._bounded_layout(chosen, huge, geo) is chosen


@pytest.mark.parametrize("dims", ["zyx", "czyx"])
def test_large_slices_of_deep_stored_chunks_warp_in_bands_to_the_same_stack(
    tmp_path, monkeypatch, dims
):
    import voxflow.tasks.register as task

    rng = np.random.default_rng(8)
    image = rng.integers(0, 255, (2, 12, 70, 48) if dims == "czyx" else (12, 70, 48), np.uint8)
    scale = (1.0, *SPACING) if dims == "czyx" else SPACING
    write_image(str(tmp_path / "a.ome.zarr"), image, dims, scale, chunks=(4, 16, 16),
                shards=(12, 32, 32))  # fmt: skip
    ref = open_image(str(tmp_path / "a.ome.zarr"))
    geo = stack_geometry(ref)
    composed = np.tile(np.eye(3), (12, 1, 1))
    composed[:, :2, 2] = rng.uniform(-3, 3, (12, 2))
    composed[:, 0, 1], composed[:, 1, 0] = 0.1, -0.1
    composed[3, :2, :2], composed[3, :2, 2] = np.eye(2), (2, -1)  # a whole-pixel shift
    box = ((3, 66), (2, 45))
    params = RegistrationParams(crop=False, device="cpu", pyramid=PyramidParams(levels=2))
    # A stored chunk (4 slices) is more than a block may hold, and a block 16 rows × 48.
    monkeypatch.setattr(task, "_SLAB_MAX_BYTES", 2 * 70 * 48)
    monkeypatch.setattr(task, "_SLAB_BYTES", 4 * 16 * 48)
    assert task._bands_needed(ref, geo, params, {})
    cubic = params.model_copy(update={"interpolation": "cubic"})
    assert not task._bands_needed(ref, geo, cubic, {})  # cubic warps keep whole slices
    plan = task._plan_pyramid(task._output_like(ref, geo, box), params.pyramid)[1]
    bands = task._warp_in_bands(ref, geo, composed, box, plan)
    assert bands.chunks[-3:] == ((4, 4, 4), (16, 16, 16, 15), (43,))
    doc = transforms_document(ref, geo, params, [], composed, box)
    out = warp_stack(ref, doc, composed, box, str(tmp_path / "w.ome.zarr"), params)
    got = read_level(out, 0).compute()
    channels = image if dims == "czyx" else image[None]
    want = np.stack([warp_slices(c, composed, box=box, device="cpu") for c in channels])
    np.testing.assert_array_equal(got, want if dims == "czyx" else want[0])
    # Level 1 is level 0 averaged over 2 × 2 in-plane (z keeps its anisotropic spacing).
    factors = (1,) * (got.ndim - 2) + (2, 2)
    np.testing.assert_array_equal(read_level(out, 1).compute(), downsample_array(got, factors))


@pytest.mark.parametrize("slab", [12, 4])
def test_level0_alone_is_written_from_whole_unit_blocks_without_a_split(
    tmp_path, monkeypatch, slab
):
    import voxflow.tasks._compute as compute
    import voxflow.tasks.register as task

    rng = np.random.default_rng(9)
    image = rng.integers(0, 255, (12, 70, 48), np.uint8)
    write_image(str(tmp_path / "a.ome.zarr"), image, "zyx", SPACING, chunks=(4, 16, 16),
                shards=(12, 32, 32))  # fmt: skip
    ref = open_image(str(tmp_path / "a.ome.zarr"))
    composed = np.tile(np.eye(3), (12, 1, 1))
    composed[:, :2, 2] = rng.uniform(-3, 3, (12, 2))
    composed[:, 0, 1], composed[:, 1, 0] = 0.05, -0.05
    box = ((3, 66), (2, 45))
    layout = PyramidParams(levels=1, chunks=(12, 16, 16), shards=(12, 32, 32))
    params = RegistrationParams(crop=False, device="cpu", pyramid=layout)
    monkeypatch.setattr(task, "_SLAB_BYTES", slab * 70 * 48)  # blocks of `slab` whole slices
    tasks = []
    real = compute.compute_blocks

    def counted(writes, *args, **kwargs):
        tasks.append(sum(w.npartitions for w in writes))
        return real(writes, *args, **kwargs)

    monkeypatch.setattr(task, "compute_blocks", counted)
    doc = transforms_document(ref, stack_geometry(ref), params, [], composed, box)
    out = warp_stack(ref, doc, composed, box, str(tmp_path / "w.ome.zarr"), params)
    np.testing.assert_array_equal(
        read_level(out, 0).compute(), warp_slices(image, composed, box=box, device="cpu")
    )
    # The output (12 × 63 × 43) holds 1 × 2 × 2 stored units. One block of all 12 slices
    # covers them whole and is written in one piece; blocks of 4 slices lie inside them, so
    # they are gathered into one write per unit.
    assert tasks == [1 if slab == 12 else 4]


def test_channels_share_the_transforms_of_the_registered_channel(tmp_path, em):
    both = np.stack([255 - em.image, em.image])
    ref = _write(tmp_path / "c.ome.zarr", both, "czyx", (1.0, *SPACING))
    params = RegistrationParams(channel=1, transform="affine", **FAST)
    results = register_pairs_of(ref, [(k, k - 1) for k in range(1, 6)], params)
    aligned = align_stack(ref, results, str(tmp_path / "o.ome.zarr"), params)
    doc = aligned.provenance["transforms"]
    got = read_level(aligned, 0).compute()
    for c in range(2):
        want = _reference_warp(both[c], np.array(doc["composed"]), doc["crop"]["box"])
        assert np.abs(got[c].astype(int) - want).max() <= 1


def test_blank_slice_carries_its_neighbour(tmp_path, em):
    image = em.image.copy()
    image[3] = 0
    ref = _write(tmp_path / "a.ome.zarr", image)
    params = RegistrationParams(transform="rigid", crop=False, **FAST)
    results = register_pairs_of(ref, [(k, k - 1) for k in range(1, 6)], params)
    bad = {(r.moving, r.fixed) for r in results if not r.converged}
    assert bad == {(3, 2), (4, 3)}
    assert all(np.isfinite(r.matrix).all() for r in results)
    aligned = align_stack(ref, results, str(tmp_path / "o.ome.zarr"), params)
    composed = np.array(aligned.provenance["transforms"]["composed"])
    assert np.isfinite(composed).all()
    np.testing.assert_allclose(composed[3], composed[2])
    np.testing.assert_allclose(composed[4], composed[3])


# -- re-applying transforms ----------------------------------------------------------------------


def test_transforms_reapply_to_a_full_resolution_copy(tmp_path, em):
    # Register a 2 × 2 block mean, apply to level 0: the physical transforms carry over.
    y, x = em.image.shape[1:]
    coarse = em.image.reshape(6, y // 2, 2, x // 2, 2).mean(axis=(2, 4)).round().astype(np.uint8)
    half = (SPACING[0], SPACING[1] * 2, SPACING[2] * 2)
    low = _write(tmp_path / "low.ome.zarr", coarse, scale=half,
                 translation=(0.0, SPACING[1] / 2, SPACING[2] / 2))  # fmt: skip
    params = RegistrationParams(transform="affine", levels=(2, 1), batch_size=8)
    results = register_pairs_of(low, [(k, k - 1) for k in range(1, 6)], params)
    align_stack(low, results, str(tmp_path / "low.aligned.ome.zarr"), params)
    doc = read_transforms(str(tmp_path / "low.aligned.ome.zarr"))
    assert doc == read_transforms(str(tmp_path / "low.aligned.ome.zarr" / TRANSFORMS_FILE))
    full = _write(tmp_path / "full.ome.zarr", em.image)
    composed, box = check_transforms(full, doc)
    assert pixel_rms(composed, em.transforms, (y, x)).max() < 1.0
    aligned = apply_transforms(full, doc, str(tmp_path / "full.aligned.ome.zarr"), params)
    assert aligned.shape == (6, box[0][1] - box[0][0], box[1][1] - box[1][0])
    low_box = np.array(doc["crop"]["box"])
    assert np.abs(np.array(box) - 2 * low_box).max() <= 2
    # Same physical place: the aligned copies start within a coarse pixel of each other.
    low_ref = open_image(str(tmp_path / "low.aligned.ome.zarr"))
    assert np.allclose(aligned.translation[1:], low_ref.translation[1:], atol=half[1])
    got = read_level(aligned, 0).compute()
    want = _reference_warp(em.image, composed, box)
    assert np.abs(got.astype(int) - want).max() <= 1


def test_transforms_that_do_not_match_are_refused(tmp_path, em):
    ref = _write(tmp_path / "a.ome.zarr", em.image)
    results = [_result(k, k - 1, em.pairwise[k]) for k in range(1, 6)]
    align_stack(ref, results, str(tmp_path / "o.ome.zarr"), RegistrationParams(**FAST))
    doc = read_transforms(str(tmp_path / "o.ome.zarr"))
    fewer = _write(tmp_path / "b.ome.zarr", em.image[:4])
    with pytest.raises(ValueError, match="for 6 slices; the stack has 4"):
        check_transforms(fewer, doc)
    other = _write(tmp_path / "c.ome.zarr", em.image[:, :64, :])
    with pytest.raises(ValueError, match="frame"):
        check_transforms(other, doc)
    with pytest.raises(ValueError, match="not a voxflow transforms document"):
        check_transforms(ref, {"schema": 99})
    with pytest.raises(FileNotFoundError, match="no transforms document"):
        read_transforms(str(tmp_path / "nothing.json"))
    out = tmp_path / "never.ome.zarr"
    with pytest.raises(ValueError):
        apply_transforms(fewer, doc, str(out), RegistrationParams())
    assert not out.exists()


def test_gpu_resource_is_asked_for_only_where_workers_offer_one():
    from distributed import Client, LocalCluster

    from voxflow.tasks.register import gpu_request

    assert gpu_request("auto") == {}  # no cluster
    one = {"n_workers": 1, "threads_per_worker": 1, "processes": False, "dashboard_address": None}
    with LocalCluster(**one, resources={"GPU": 1}) as cluster, Client(cluster):
        assert gpu_request("auto") == {"GPU": 1}
        assert gpu_request("cuda") == {"GPU": 1}
        assert gpu_request("cpu") == {}
    with LocalCluster(**one) as cluster, Client(cluster):
        assert gpu_request("auto") == {}


def test_an_interrupted_write_never_looks_complete_and_a_rerun_finishes_it(
    tmp_path, em, monkeypatch
):
    import voxflow.tasks.register as reg

    ref = _write(tmp_path / "a.ome.zarr", em.image)
    results = [_result(k, k - 1, em.pairwise[k]) for k in range(1, 6)]
    out = tmp_path / "o.ome.zarr"

    def fail(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(reg, "compute_blocks", fail)
    with pytest.raises(OSError, match="disk full"):
        align_stack(ref, results, str(out), RegistrationParams(**FAST))
    assert (out / INCOMPLETE_MARKER).exists()
    assert not (out / "zarr.json").exists() and not (out / TRANSFORMS_FILE).exists()
    with pytest.raises(ValueError):
        open_image(str(out))
    monkeypatch.undo()
    # The same output is taken up again without --overwrite, and completed.
    check_registration(ref, str(out), RegistrationParams(**FAST))
    aligned = align_stack(ref, results, str(out), RegistrationParams(**FAST))
    assert not (out / INCOMPLETE_MARKER).exists() and (out / TRANSFORMS_FILE).exists()
    assert aligned.shape[0] == 6
