"""Codec benchmark: what each compression level costs to write and read, and what it saves.

Run ``python benchmarks/codec.py [--json OUT]``; see ``benchmarks/README.md`` ("Codec"). The
samples are the synthetic data of the other benchmarks, each with its 2x2x2 block mean (what
a pyramid level holds, smoother than level 0): every codec encodes and decodes them through
TensorStore with the codecs voxflow writes, on one thread, in memory (no disk in the figures).
"""

from __future__ import annotations

import argparse
import json
import time
import uuid
from typing import Any

import numpy as np
import tensorstore as ts
from _measure import format_table

SETTINGS = [("zstd", 1), ("zstd", 2), ("zstd", 3), ("zstd", 5), ("lz4", 5)]
EDGE = 128  # samples of 128 x 256 x 256 (16 MiB of uint16), 2x2x2 means of twice that


def _pyramid_sample(shape: tuple[int, ...]) -> np.ndarray:
    from pyramid import _phantom_block

    info = {None: {"array-location": [(0, n) for n in shape], "chunk-shape": shape,
                   "chunk-location": (0, 0, 0)}}  # fmt: skip
    return _phantom_block(info)


def _lightsheet_sample(shape: tuple[int, ...]) -> np.ndarray:
    from scaled import phantom_region

    # The middle of the phantom: tissue, cells and the edge of the ellipsoid.
    full = (2 * shape[0], 2 * shape[1], 2 * shape[2])
    lo = tuple(n // 4 for n in full)
    return phantom_region(full, lo, tuple(a + n for a, n in zip(lo, shape, strict=True)), (0,))


def _em_sample(shape: tuple[int, ...]) -> np.ndarray:
    from voxflow.core.synth import em_stack

    return em_stack(shape, seed=0, noise=0.05, contrast=0.1).image


SAMPLES = {
    "pyramid.py blobs (uint16)": _pyramid_sample,
    "scaled.py lightsheet (uint16)": _lightsheet_sample,
    "register.py EM stack (uint8)": _em_sample,
}


def measure(data: np.ndarray, cname: str, clevel: int, repeat: int) -> dict[str, float]:
    """Best-of-`repeat` CPU ms per MiB to encode and to decode, and the compression ratio.

    The array metadata is what voxflow's own ``create_array`` writes (64³ chunks in one
    shard), so the codecs are exactly voxflow's; the timed store is a copy of it in a memory
    store of its own, with TensorStore on one thread.
    """
    from voxflow.io import ArrayLayout, Location, create_array

    where = Location.parse(f"memory://codec-{uuid.uuid4().hex}/sample.zarr")
    layout = ArrayLayout(tuple(min(64, n) for n in data.shape), data.shape)
    create_array(where, "0", shape=data.shape, dtype=data.dtype, dims="zyx", layout=layout,
                 compressor=cname, clevel=clevel)  # fmt: skip
    meta = {k: v for k, v in where.read_json("0/zarr.json").items()
            if k not in ("attributes", "node_type", "zarr_format")}  # fmt: skip
    spec = {"driver": "zarr3", "kvstore": {"driver": "memory"}, "metadata": meta, "create": True}
    mib = data.nbytes / 2**20
    encode, decode = [], []
    for _ in range(repeat):
        ctx = ts.Context({"data_copy_concurrency": {"limit": 1}})  # a fresh memory store
        store = ts.open(spec, context=ctx).result()
        c0 = time.process_time()
        store.write(data).result()
        encode.append(time.process_time() - c0)
        c0 = time.process_time()
        back = store.read().result()
        decode.append(time.process_time() - c0)
    assert np.array_equal(back, data)
    kv = store.kvstore
    stored = sum(len(kv.read(key).result().value) for key in kv.list().result())
    return {
        "encode_ms_per_mib": 1e3 * min(encode) / mib,
        "decode_ms_per_mib": 1e3 * min(decode) / mib,
        "ratio": data.nbytes / stored,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=3, help="runs per figure; the best counts")
    parser.add_argument("--json", help="write every figure here as JSON")
    args = parser.parse_args()

    from voxflow.core.pyramid import downsample_array
    from voxflow.io import DEFAULT_CLEVEL

    results: dict[str, Any] = {}
    rows = []
    for name, make in SAMPLES.items():
        big = make((2 * EDGE, 4 * EDGE, 4 * EDGE))
        for level, data in (("level 0", big[:EDGE, : 2 * EDGE, : 2 * EDGE]),
                            ("2x2x2 mean", downsample_array(big, (2, 2, 2), "mean"))):  # fmt: skip
            data = np.ascontiguousarray(data)
            for cname, clevel in SETTINGS:
                fig = measure(data, cname, clevel, args.repeat)
                results.setdefault(name, {}).setdefault(level, {})[f"{cname} {clevel}"] = fig
                mark = " (default)" if (cname, clevel) == ("zstd", DEFAULT_CLEVEL) else ""
                rows.append([name, level, f"blosc {cname} {clevel}{mark}",
                             f"{fig['encode_ms_per_mib']:.2f}", f"{fig['decode_ms_per_mib']:.2f}",
                             f"{fig['ratio']:.3f}"])  # fmt: skip
    print(format_table(["data", "level", "codec (+ shuffle)", "encode ms/MiB", "decode ms/MiB",
                        "ratio"], rows))  # fmt: skip
    print(
        f"\nCPU milliseconds per MiB of raw voxels on one thread, best of {args.repeat}; "
        "ratio = raw bytes / stored bytes (64^3 chunks in one shard)."
    )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
