"""The registration flow: a slice stack in, an aligned (cropped) OME-Zarr and its transforms out."""

from __future__ import annotations

from typing import Any

import dask
from prefect import flow
from prefect.futures import as_completed
from pydantic import BaseModel, ConfigDict, Field

from voxflow.flows._run import run_flow, submit_stage
from voxflow.runtime import make_task_runner
from voxflow.settings import VoxflowSettings
from voxflow.tasks import ImageRef, open_input
from voxflow.tasks._compute import cluster_client, publish_progress
from voxflow.tasks.register import (
    MIN_SAMPLES,
    TRANSFORMS_FILE,
    PairResult,
    RegistrationParams,
    align_image,
    check_registration,
    check_transforms,
    gpu_request,
    pair_batches,
    read_transforms,
    register_batch,
    stack_geometry,
    warp_image,
)

__all__ = [
    "MIN_SAMPLES",
    "TRANSFORMS_FILE",
    "RegistrationConfig",
    "WarpConfig",
    "registration_flow",
    "run_registration",
    "run_warp",
    "validate_registration",
    "validate_warp",
    "warp_flow",
]


class RegistrationConfig(BaseModel):
    """Everything a registration run needs; the form the Prefect UI shows."""

    model_config = ConfigDict(frozen=True)

    input: str = Field(description="Slice stack: OME-Zarr image (or zarr array), axes (c)zyx.")
    output: str = Field(description="New OME-Zarr for the aligned stack.")
    overwrite: bool = Field(False, description="Replace an existing output.")
    registration: RegistrationParams = Field(
        default_factory=RegistrationParams,
        description="Transform, loss, levels, batching, drift control, crop and storage.",
    )


class WarpConfig(BaseModel):
    """Re-applying a transforms document to another copy of a stack."""

    model_config = ConfigDict(frozen=True)

    input: str = Field(description="Slice stack to warp (another channel, a full-size copy).")
    transforms: str = Field(description="transforms.json, or the aligned image holding one.")
    output: str = Field(description="New OME-Zarr for the warped stack.")
    overwrite: bool = Field(False, description="Replace an existing output.")
    registration: RegistrationParams = Field(
        default_factory=RegistrationParams,
        description="Interpolation, device and storage (the registration fields are unused).",
    )


_DEVICE_KINDS = {"cuda": "CUDA", "mps": "MPS"}


def _device_available(device: str) -> bool:
    """Whether torch can use `device` ('auto', 'cpu', 'cuda' or 'mps') in this process."""
    if device not in _DEVICE_KINDS:
        return True  # 'auto' falls back to the CPU
    import torch

    if device == "cuda":
        return torch.cuda.is_available()
    mps = getattr(torch.backends, "mps", None)
    return bool(mps is not None and mps.is_available())


def _check_device(device: str, client: Any = None) -> None:
    """Refuse a torch device that the workers cannot use, before anything is written.

    Parameters
    ----------
    device : {'auto', 'cpu', 'cuda', 'mps'}
        The registration's device.
    client : distributed.Client, optional
        The flow's cluster: its workers are asked, unless the device is 'cuda' and some of
        them offer a ``GPU`` resource (the work asks for it). None checks this machine.

    Raises
    ------
    ValueError
        When `device` is 'cuda' or 'mps' and this machine, or a worker, lacks it.
    """
    if device not in _DEVICE_KINDS:
        return
    kind = _DEVICE_KINDS[device]
    if client is None:
        if not _device_available(device):
            raise ValueError(f"`device` {device!r}: {kind} is not available on this machine")
        return
    workers = client.scheduler_info().get("workers", {}).values()
    if device == "cuda" and any(w.get("resources", {}).get("GPU") for w in workers):
        return
    found = client.run(_device_available, device)
    lacking = sorted(w for w, ok in found.items() if not ok)
    if lacking:
        raise ValueError(
            f"`device` {device!r}: {kind} is not available on {len(lacking)} of "
            f"{len(found)} Dask workers ({', '.join(lacking[:3])})"
        )


def validate_registration(
    config: RegistrationConfig, settings: VoxflowSettings | None = None
) -> ImageRef:
    """Check `config` before a run (nothing is written); return the input's description.

    Parameters
    ----------
    config : RegistrationConfig
        The run.
    settings : VoxflowSettings, optional
        Where the run's workers are; default ``VoxflowSettings()``. The device is checked here
        when they are on this machine (a local cluster), and by the flow otherwise.

    Returns
    -------
    ImageRef
        The input.

    Raises
    ------
    ValueError, FileExistsError, FileNotFoundError
        For a device the workers lack, an input that is not a stack of slices, a channel or
        reference out of range, or an output that exists or is the input.
    """
    settings = settings or VoxflowSettings()
    source = open_input.fn(config.input)
    check_registration(source, config.output, config.registration, overwrite=config.overwrite)
    if settings.cluster.mode == "local":
        _check_device(config.registration.device)
    return source


def validate_warp(
    config: WarpConfig, settings: VoxflowSettings | None = None
) -> tuple[ImageRef, dict[str, Any]]:
    """Check a warp before it runs: the stack, the document, the output and the device.

    `settings` says where the workers are, as for :func:`validate_registration`.
    """
    settings = settings or VoxflowSettings()
    source = open_input.fn(config.input)
    document = read_transforms(config.transforms)
    check_transforms(source, document)
    params = config.registration.model_copy(update={"channel": 0, "reference": 0})
    check_registration(source, config.output, params, overwrite=config.overwrite)
    if settings.cluster.mode == "local":
        _check_device(params.device)
    return source, document


@flow(
    name="registration",
    task_runner=make_task_runner(VoxflowSettings()),
    validate_parameters=True,
    log_prints=True,
)
def registration_flow(config: RegistrationConfig, progress_key: str | None = None) -> ImageRef:
    """Register consecutive (and neighbouring) slices in batches, compose, crop, warp, write."""
    params = config.registration
    # Described in the flow's process, where its warnings reach the user (once).
    source = open_input(config.input)
    check_registration(source, config.output, params, overwrite=config.overwrite)
    # Batches cached by an earlier run on another device would otherwise let the run reach
    # the warp, which writes, before the device fails.
    _check_device(params.device, cluster_client())
    geo = stack_geometry(source)
    batches = pair_batches(geo.n_slices, params.neighbours, params.batch_size)
    with dask.annotate(resources=gpu_request(params.device)):
        futures = [register_batch.submit(source, batch, params) for batch in batches]
    post = publish_progress(progress_key)
    if post is not None:
        # The command's bar counts batches of pairs first, then the warp's blocks.
        for done, _ in enumerate(as_completed(futures), start=1):
            post(done, len(futures))
    results: list[PairResult] = [r for f in futures for r in f.result()]
    return submit_stage(align_image, source, results, config.output, params, config.overwrite,
                        progress_key)  # fmt: skip


@flow(
    name="warp",
    task_runner=make_task_runner(VoxflowSettings()),
    validate_parameters=True,
    log_prints=True,
)
def warp_flow(config: WarpConfig, progress_key: str | None = None) -> ImageRef:
    """Warp a stack with the transforms of an earlier registration."""
    # Described in the flow's process, where its warnings reach the user (once).
    source = open_input(config.input)
    document = read_transforms(config.transforms)
    _check_device(config.registration.device, cluster_client())
    return warp_image.submit(source, document, config.output, config.registration,
                             config.overwrite, progress_key).result()  # fmt: skip


def run_registration(
    config: RegistrationConfig,
    settings: VoxflowSettings | None = None,
    *,
    progress_key: str | None = None,
) -> ImageRef:
    """Run :func:`registration_flow` with the cluster and Prefect settings of `settings`."""
    return run_flow(registration_flow, settings, config, progress_key)


def run_warp(
    config: WarpConfig, settings: VoxflowSettings | None = None, *, progress_key: str | None = None
) -> ImageRef:
    """Run :func:`warp_flow` with the cluster and Prefect settings of `settings`."""
    return run_flow(warp_flow, settings, config, progress_key)
