"""Settings of voxflow: defaults, a TOML file, ``VOXFLOW_*`` environment variables.

Sources, highest precedence first:

1. keyword arguments to :class:`VoxflowSettings`;
2. environment variables with the prefix ``VOXFLOW_`` and ``__`` between nested names, e.g.
   ``VOXFLOW_CLUSTER__MODE=address``, ``VOXFLOW_STORAGE__CHUNKS='[32, 64, 64]'``;
3. a TOML file, named by :meth:`VoxflowSettings.from_file` or by ``VOXFLOW_CONFIG``;
4. the defaults below.

Example TOML file::

    log_level = "DEBUG"

    [cluster]
    mode = "kubernetes"

    [cluster.kubernetes]
    image = "ghcr.io/example/voxflow:0.1"
    max_workers = 32
    gpu_workers = 4

    [storage]
    ngff_version = "0.5"
    chunks = [64, 64, 64]
"""

from __future__ import annotations

import difflib
import os
import tomllib
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from pathlib import Path
from typing import Annotated, Any, Literal, Self

from pydantic import BaseModel, ConfigDict, Field, PositiveInt, field_validator, model_validator
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

# voxflow.io.DEFAULT_CLEVEL, repeated so the settings import nothing heavier (a test keeps the
# two equal): blosc level 2, zstd's own default level.
DEFAULT_CLEVEL = 2

__all__ = [
    "CONFIG_ENV_VAR",
    "ClusterSettings",
    "KubernetesSettings",
    "PrefectSettings",
    "ProcessingSettings",
    "StorageSettings",
    "VoxflowSettings",
]

CONFIG_ENV_VAR = "VOXFLOW_CONFIG"
"""Environment variable naming a TOML settings file."""

# Set by ``VoxflowSettings.from_file`` for the duration of one construction.
_CONFIG_FILE: ContextVar[Path | None] = ContextVar("voxflow_config_file", default=None)

# A Kubernetes resource quantity: "4", "500m", "16Gi", "1.5G".
_K8S_QUANTITY = r"^[0-9]+(\.[0-9]+)?(m|k|M|G|T|P|E|Ki|Mi|Gi|Ti|Pi|Ei)?$"
# RFC 1123 label, short enough for the "-scheduler" suffix dask-kubernetes appends (63 chars).
_K8S_NAME = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"
_K8S_NAME_MAX = 53

_FROZEN = ConfigDict(frozen=True, extra="forbid")


class KubernetesSettings(BaseModel):
    """A Dask cluster on Kubernetes, run by the dask-kubernetes operator."""

    model_config = _FROZEN

    name: str = Field(
        "voxflow",
        min_length=1,
        max_length=_K8S_NAME_MAX,
        pattern=_K8S_NAME,
        description="Name of the DaskCluster resource (lowercase RFC 1123 label).",
    )
    namespace: str | None = Field(
        None,
        description="Kubernetes namespace; None uses the namespace of the current kube context.",
    )
    image: str = Field(
        "ghcr.io/dask/dask:latest",
        min_length=1,
        description="Container image of the scheduler and the workers; it must hold voxflow.",
    )
    worker_cpu: PositiveInt = Field(
        4, description="Cores requested per worker; also the worker's thread count."
    )
    worker_memory: str = Field(
        "16Gi",
        pattern=_K8S_QUANTITY,
        description="Memory requested and limited per worker (Kubernetes quantity, e.g. 16Gi).",
    )
    scheduler_cpu: PositiveInt = Field(1, description="Cores requested for the scheduler.")
    scheduler_memory: str = Field(
        "4Gi",
        pattern=_K8S_QUANTITY,
        description="Memory requested and limited for the scheduler (Kubernetes quantity).",
    )
    min_workers: int = Field(
        1, ge=0, description="Fewest CPU workers: the start size and the autoscaler's floor."
    )
    max_workers: PositiveInt = Field(16, description="Most CPU workers the autoscaler may run.")
    gpu_workers: int = Field(
        0, ge=0, description="Workers in the GPU worker group; 0 creates no GPU group."
    )
    gpu_resource: str = Field(
        "nvidia.com/gpu",
        min_length=1,
        description="Extended resource name of the GPU in the cluster's device plugin.",
    )
    gpus_per_worker: PositiveInt = Field(1, description="GPUs each GPU worker requests.")
    scheduler_service_type: Literal["ClusterIP", "NodePort", "LoadBalancer"] = Field(
        "ClusterIP", description="Kubernetes Service type exposing the scheduler."
    )

    @model_validator(mode="after")
    def _check_worker_bounds(self) -> Self:
        if self.max_workers < self.min_workers:
            raise ValueError(
                f"`max_workers` must be at least `min_workers` ({self.min_workers}), "
                f"got {self.max_workers}"
            )
        return self


class ClusterSettings(BaseModel):
    """Where the Dask work of a flow runs."""

    model_config = _FROZEN

    mode: Literal["local", "address", "kubernetes"] = Field(
        "local",
        description=(
            "local: a LocalCluster on this machine; address: an existing scheduler at "
            "`address`; kubernetes: an autoscaling cluster from `kubernetes`."
        ),
    )
    address: str | None = Field(
        None,
        min_length=1,
        description="Scheduler address, e.g. tcp://scheduler:8786; required when mode is address.",
    )
    n_workers: PositiveInt | None = Field(
        None,
        description=(
            "Local worker processes; None: one, or cores // threads_per_worker when that is set."
        ),
    )
    threads_per_worker: PositiveInt | None = Field(
        None, description="Threads per local worker; None: the usable cores divided by n_workers."
    )
    memory_limit: str | None = Field(
        None,
        min_length=1,
        description=(
            "Memory limit per local worker, e.g. '8GiB' or 'auto'; None: 80% of the "
            "machine's memory divided by n_workers."
        ),
    )
    processes: bool = Field(
        True, description="Run local workers as processes (True) or as threads of this process."
    )
    dashboard: bool = Field(False, description="Serve the Dask dashboard of a local cluster.")
    kubernetes: KubernetesSettings = Field(
        default_factory=KubernetesSettings,
        description="The Kubernetes cluster, used when mode is kubernetes.",
    )

    @field_validator("memory_limit")
    @classmethod
    def _check_memory_limit(cls, value: str | None) -> str | None:
        if value is None or value == "auto":
            return value
        from dask.utils import parse_bytes

        try:
            parse_bytes(value)
        except ValueError as err:
            raise ValueError(
                f"`memory_limit` needs a byte size such as '8GiB' or 'auto', got {value!r}"
            ) from err
        return value

    @model_validator(mode="after")
    def _check_address(self) -> Self:
        if self.mode == "address" and self.address is None:
            raise ValueError("`address` is required when `mode` is 'address', got None")
        return self


ChunkShape = tuple[PositiveInt, ...]


class StorageSettings(BaseModel):
    """How voxflow writes OME-Zarr."""

    model_config = _FROZEN

    ngff_version: Literal["0.4", "0.5"] = Field(
        "0.5", description="OME-NGFF version written: 0.5 is zarr v3 (sharded), 0.4 is zarr v2."
    )
    chunks: Annotated[ChunkShape, Field(min_length=1)] | None = Field(
        None,
        description=(
            "Chunk shape (the inner chunk of a shard for zarr v3); None: 64 per spatial axis "
            "for 0.5, 128 per spatial axis for 0.4, capped to the shape."
        ),
    )
    shards: Annotated[ChunkShape, Field(min_length=1)] | None = Field(
        None,
        description=(
            "Shard shape (zarr v3 only), a multiple of `chunks` per axis; None: 4 chunks per "
            "spatial axis, capped to the shape."
        ),
    )
    compressor: Literal["zstd", "lz4", "gzip", "none"] = Field(
        "zstd", description="Compression codec of the chunks."
    )
    clevel: int = Field(
        DEFAULT_CLEVEL, ge=0, le=9, description="Compression level, 0 (fastest) to 9."
    )

    @model_validator(mode="after")
    def _check_shards(self) -> Self:
        if self.shards is None:
            return self
        if self.ngff_version == "0.4":
            raise ValueError("`shards` needs ngff_version 0.5 (zarr v3), got ngff_version 0.4")
        if self.chunks is None:
            return self
        if len(self.shards) != len(self.chunks):
            raise ValueError(
                f"`shards` needs one edge per chunk axis ({len(self.chunks)}), got {self.shards}"
            )
        if any(s % c for s, c in zip(self.shards, self.chunks, strict=True)):
            raise ValueError(
                f"`shards` must be a multiple of `chunks` {self.chunks} per axis, got {self.shards}"
            )
        return self


class ProcessingSettings(BaseModel):
    """Limits of the processing stages."""

    model_config = _FROZEN

    max_lowres_mib: PositiveInt = Field(
        4096,
        description=(
            "Largest low-resolution image (float32, all processed channels) that multi-"
            "resolution processing holds in memory, in MiB; a larger one is refused with a "
            "suggested downsample factor."
        ),
    )


class PrefectSettings(BaseModel):
    """How Prefect persists the results of voxflow tasks and which API it talks to."""

    model_config = _FROZEN

    result_storage: Path = Field(
        Path("~/.voxflow/results"),
        validate_default=True,
        description="Directory of persisted task results (~ is expanded, made absolute).",
    )
    persist_results: bool = Field(
        True, description="Persist task results, so a rerun reuses finished stages."
    )
    result_serializer: Literal["json", "pickle"] = Field(
        "json", description="Serializer of persisted results; voxflow results are JSON-able."
    )
    api_url: str | None = Field(
        None,
        min_length=1,
        description=(
            "Prefect API URL; None: PREFECT_API_URL if set, else Prefect's ephemeral API."
        ),
    )

    @field_validator("result_storage")
    @classmethod
    def _expand_result_storage(cls, value: Path) -> Path:
        # Absolute, so that workers with another working directory find the same place.
        return value.expanduser().absolute()


class VoxflowSettings(BaseSettings):
    """All settings of voxflow.

    Read from keyword arguments, ``VOXFLOW_*`` environment variables (``__`` separates nested
    names), a TOML file (``VOXFLOW_CONFIG`` or :meth:`from_file`) and defaults, in that order
    of precedence.
    """

    model_config = SettingsConfigDict(
        env_prefix="VOXFLOW_",
        env_nested_delimiter="__",
        extra="forbid",
        frozen=True,
    )

    cluster: ClusterSettings = Field(
        default_factory=ClusterSettings, description="The Dask cluster flows run on."
    )
    storage: StorageSettings = Field(
        default_factory=StorageSettings, description="How OME-Zarr output is written."
    )
    prefect: PrefectSettings = Field(
        default_factory=PrefectSettings, description="Prefect result persistence and API."
    )
    processing: ProcessingSettings = Field(
        default_factory=ProcessingSettings, description="Limits of the processing stages."
    )
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"] = Field(
        "INFO", description="Level of voxflow's log messages."
    )

    @field_validator("log_level", mode="before")
    @classmethod
    def _upper_log_level(cls, value: Any) -> Any:
        return value.upper() if isinstance(value, str) else value

    @classmethod
    def from_file(cls, path: str | os.PathLike[str], **overrides: Any) -> VoxflowSettings:
        """Read settings from a TOML file, under the environment and `overrides`.

        Parameters
        ----------
        path : str or os.PathLike
            TOML file whose tables mirror the settings (``[cluster]``, ``[storage]``, ...).
            It replaces any file named by ``VOXFLOW_CONFIG``.
        **overrides
            Values that win over the environment and the file, as for the constructor.

        Returns
        -------
        VoxflowSettings
            The settings.

        Raises
        ------
        FileNotFoundError
            If `path` is not a file.
        pydantic.ValidationError
            If a value is invalid or a key is unknown.
        """
        with _config_file(_validate_config_path(path, "`path`")):
            return cls(**overrides)

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        """Order the sources: keyword arguments, environment, TOML file (no .env, no secrets)."""
        _check_env_names(settings_cls)
        path = _CONFIG_FILE.get()
        if path is None and os.environ.get(CONFIG_ENV_VAR):
            path = _validate_config_path(os.environ[CONFIG_ENV_VAR], CONFIG_ENV_VAR)
        sources: tuple[PydanticBaseSettingsSource, ...] = (init_settings, env_settings)
        if path is not None:
            try:
                sources += (TomlConfigSettingsSource(settings_cls, toml_file=path),)
            except tomllib.TOMLDecodeError as err:
                raise ValueError(f"settings file {str(path)!r} is not valid TOML: {err}") from err
        return sources


def _check_env_names(settings_cls: type[BaseSettings]) -> None:
    """Refuse a ``VOXFLOW_*`` variable that names no setting, rather than ignore it.

    Nested names (``VOXFLOW_CLUSTER__MODEE``) are checked by the models themselves, which
    forbid extra keys; this catches the top-level name (``VOXFLOW_CLUSTR__MODE``,
    ``VOXFLOW_CLUSTER_MODE``), which the environment source would silently skip.
    """
    prefix = settings_cls.model_config["env_prefix"].upper()
    delimiter = settings_cls.model_config["env_nested_delimiter"]
    known = {name.upper() for name in settings_cls.model_fields}
    for var in sorted(os.environ):
        upper = var.upper()
        if not upper.startswith(prefix) or upper == CONFIG_ENV_VAR:
            continue
        top = upper[len(prefix) :].split(delimiter, 1)[0]
        if top in known:
            continue
        close = difflib.get_close_matches(top, sorted(known), n=1)
        names = ", ".join(f"{prefix}{k}" for k in sorted(known))
        hint = f"did you mean {prefix}{close[0]}?" if close else f"the settings are {names}"
        raise ValueError(f"environment variable {var} names no voxflow setting; {hint}")


def _validate_config_path(path: str | os.PathLike[str], name: str) -> Path:
    resolved = Path(path).expanduser()
    if not resolved.is_file():
        raise FileNotFoundError(f"{name} needs an existing TOML file, got {str(path)!r}")
    return resolved


@contextmanager
def _config_file(path: Path) -> Iterator[None]:
    token = _CONFIG_FILE.set(path)
    try:
        yield
    finally:
        _CONFIG_FILE.reset(token)
