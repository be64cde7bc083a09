import os
import re
from pathlib import Path

import pytest
from pydantic import BaseModel, ValidationError

from voxflow.settings import (
    CONFIG_ENV_VAR,
    ClusterSettings,
    KubernetesSettings,
    PrefectSettings,
    StorageSettings,
    VoxflowSettings,
)

TOML = """
log_level = "debug"

[cluster]
mode = "kubernetes"

[cluster.kubernetes]
image = "registry.example/voxflow:1"
max_workers = 32
gpu_workers = 2

[storage]
ngff_version = "0.5"
chunks = [32, 64, 64]
shards = [64, 256, 256]
clevel = 5

[prefect]
result_storage = "/data/results"
persist_results = false
"""


@pytest.fixture(autouse=True)
def clean_env(monkeypatch, tmp_path):
    for name in list(os.environ):
        if name.startswith("VOXFLOW_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))


@pytest.fixture
def toml_file(tmp_path):
    path = tmp_path / "voxflow.toml"
    path.write_text(TOML)
    return path


def test_defaults(tmp_path):
    settings = VoxflowSettings()
    assert settings.cluster == ClusterSettings()
    assert settings.cluster.mode == "local"
    assert settings.cluster.address is None
    assert settings.cluster.n_workers is None
    assert settings.cluster.threads_per_worker is None
    assert settings.cluster.memory_limit is None
    assert settings.cluster.processes is True
    assert settings.cluster.dashboard is False
    assert settings.cluster.kubernetes.min_workers <= settings.cluster.kubernetes.max_workers
    assert settings.cluster.kubernetes.gpu_workers == 0
    assert settings.cluster.kubernetes.gpu_resource == "nvidia.com/gpu"
    assert settings.storage.ngff_version == "0.5"
    assert settings.storage.chunks is None
    assert settings.storage.shards is None
    assert settings.storage.compressor == "zstd"
    assert settings.storage.clevel == 2
    assert settings.prefect.result_storage == tmp_path / "home" / ".voxflow" / "results"
    assert settings.prefect.persist_results is True
    assert settings.prefect.api_url is None
    assert settings.log_level == "INFO"


def test_default_clevel_is_the_writers():
    # The settings repeat the writer's default (they import nothing heavier); one value.
    from voxflow.io import DEFAULT_CLEVEL
    from voxflow.tasks.pyramid import PyramidParams

    assert StorageSettings().clevel == DEFAULT_CLEVEL == PyramidParams().clevel


def test_relative_result_storage_is_made_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    settings = PrefectSettings(result_storage="results")
    assert settings.result_storage == tmp_path / "results"


def test_env_overrides_nested_values(monkeypatch):
    monkeypatch.setenv("VOXFLOW_CLUSTER__MODE", "address")
    monkeypatch.setenv("VOXFLOW_CLUSTER__ADDRESS", "tcp://scheduler:8786")
    monkeypatch.setenv("VOXFLOW_CLUSTER__KUBERNETES__GPU_WORKERS", "3")
    monkeypatch.setenv("VOXFLOW_STORAGE__CHUNKS", "[16, 32, 32]")
    monkeypatch.setenv("VOXFLOW_STORAGE__COMPRESSOR", "lz4")
    monkeypatch.setenv("VOXFLOW_PREFECT__PERSIST_RESULTS", "false")
    monkeypatch.setenv("VOXFLOW_LOG_LEVEL", "warning")
    settings = VoxflowSettings()
    assert settings.cluster.mode == "address"
    assert settings.cluster.address == "tcp://scheduler:8786"
    assert settings.cluster.kubernetes.gpu_workers == 3
    assert settings.storage.chunks == (16, 32, 32)
    assert settings.storage.compressor == "lz4"
    assert settings.prefect.persist_results is False
    assert settings.log_level == "WARNING"


def test_toml_file(toml_file):
    settings = VoxflowSettings.from_file(toml_file)
    assert settings.log_level == "DEBUG"
    assert settings.cluster.mode == "kubernetes"
    assert settings.cluster.kubernetes.image == "registry.example/voxflow:1"
    assert settings.cluster.kubernetes.max_workers == 32
    assert settings.cluster.kubernetes.gpu_workers == 2
    # Keys the file leaves out keep their defaults.
    assert settings.cluster.kubernetes.min_workers == KubernetesSettings().min_workers
    assert settings.cluster.processes is True
    assert settings.storage.chunks == (32, 64, 64)
    assert settings.storage.shards == (64, 256, 256)
    assert settings.storage.clevel == 5
    assert settings.prefect.result_storage == Path("/data/results")
    assert settings.prefect.persist_results is False


def test_toml_file_from_env(monkeypatch, toml_file):
    monkeypatch.setenv(CONFIG_ENV_VAR, str(toml_file))
    assert VoxflowSettings() == VoxflowSettings.from_file(toml_file)
    assert VoxflowSettings().cluster.mode == "kubernetes"


def test_from_file_replaces_env_file(monkeypatch, tmp_path, toml_file):
    other = tmp_path / "other.toml"
    other.write_text('[cluster]\nmode = "address"\naddress = "tcp://a:1"\n')
    monkeypatch.setenv(CONFIG_ENV_VAR, str(other))
    assert VoxflowSettings().cluster.mode == "address"
    assert VoxflowSettings.from_file(toml_file).cluster.mode == "kubernetes"
    # The file given to from_file applies to that one construction only.
    assert VoxflowSettings().cluster.mode == "address"


def test_precedence_init_over_env_over_file_over_defaults(monkeypatch, toml_file):
    monkeypatch.setenv("VOXFLOW_CLUSTER__KUBERNETES__MAX_WORKERS", "8")
    monkeypatch.setenv("VOXFLOW_STORAGE__CLEVEL", "7")
    monkeypatch.setenv("VOXFLOW_LOG_LEVEL", "ERROR")
    settings = VoxflowSettings.from_file(toml_file, log_level="CRITICAL")
    assert settings.log_level == "CRITICAL"  # init > env > file
    assert settings.storage.clevel == 7  # env > file
    assert settings.cluster.kubernetes.max_workers == 8  # env > file
    assert settings.cluster.kubernetes.gpu_workers == 2  # file > defaults
    # Sibling values from other sources merge into one section.
    assert settings.cluster.kubernetes.image == "registry.example/voxflow:1"
    assert settings.storage.compressor == "zstd"  # defaults


def test_init_kwargs_merge_with_env(monkeypatch):
    monkeypatch.setenv("VOXFLOW_CLUSTER__ADDRESS", "tcp://scheduler:8786")
    settings = VoxflowSettings(cluster={"mode": "address"})
    assert settings.cluster.address == "tcp://scheduler:8786"


@pytest.mark.parametrize("use_env", [False, True])
def test_missing_config_file(monkeypatch, tmp_path, use_env):
    missing = tmp_path / "missing.toml"
    if use_env:
        monkeypatch.setenv(CONFIG_ENV_VAR, str(missing))
        with pytest.raises(FileNotFoundError, match="VOXFLOW_CONFIG needs an existing TOML"):
            VoxflowSettings()
    else:
        with pytest.raises(FileNotFoundError, match="`path` needs an existing TOML file"):
            VoxflowSettings.from_file(missing)


def test_unknown_key_in_file_raises(tmp_path):
    path = tmp_path / "bad.toml"
    path.write_text("[storage]\nchunk = [64, 64, 64]\n")
    with pytest.raises(ValidationError, match=r"storage\.chunk\n  Extra inputs are not permitted"):
        VoxflowSettings.from_file(path)


@pytest.mark.parametrize("use_env", [False, True])
def test_toml_syntax_error_names_the_file(monkeypatch, tmp_path, use_env):
    path = tmp_path / "broken.toml"
    path.write_text('log_level = "DEBUG\n')
    match = rf"^settings file '{path}' is not valid TOML: Illegal character"
    if use_env:
        monkeypatch.setenv(CONFIG_ENV_VAR, str(path))
        with pytest.raises(ValueError, match=match):
            VoxflowSettings()
    else:
        with pytest.raises(ValueError, match=match):
            VoxflowSettings.from_file(path)


@pytest.mark.parametrize(
    ("name", "hint"),
    [
        ("VOXFLOW_CLUSTR__MODE", "did you mean VOXFLOW_CLUSTER?"),
        ("VOXFLOW_CLUSTER_MODE", "did you mean VOXFLOW_CLUSTER?"),
        ("VOXFLOW_LOGLEVEL", "did you mean VOXFLOW_LOG_LEVEL?"),
        ("voxflow_storag__clevel", "did you mean VOXFLOW_STORAGE?"),
        (
            "VOXFLOW_XYZ",
            "the settings are VOXFLOW_CLUSTER, VOXFLOW_LOG_LEVEL, VOXFLOW_PREFECT, "
            "VOXFLOW_PROCESSING, VOXFLOW_STORAGE",
        ),
    ],
)
def test_env_name_of_no_setting_raises(monkeypatch, name, hint):
    # Such a variable would otherwise be skipped, and the run would use the default silently.
    monkeypatch.setenv(name, "1")
    expected = f"environment variable {name} names no voxflow setting; {hint}"
    with pytest.raises(ValueError, match=f"^{re.escape(expected)}$"):
        VoxflowSettings()


def test_env_names_are_case_insensitive(monkeypatch):
    monkeypatch.setenv("voxflow_log_level", "warning")
    monkeypatch.setenv("Voxflow_Storage__Clevel", "7")
    settings = VoxflowSettings()
    assert (settings.log_level, settings.storage.clevel) == ("WARNING", 7)


def test_invalid_env_value_raises(monkeypatch):
    monkeypatch.setenv("VOXFLOW_STORAGE__CLEVEL", "12")
    with pytest.raises(ValidationError, match=r"storage\.clevel\n  Input should be less than"):
        VoxflowSettings()


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"cluster": {"mode": "slurm"}}, "cluster.mode\n  Input should be 'local', 'address'"),
        ({"cluster": {"mode": "address"}}, "`address` is required when `mode` is 'address'"),
        ({"cluster": {"n_workers": 0}}, "cluster.n_workers\n  Input should be greater than 0"),
        ({"cluster": {"threads_per_worker": -1}}, "cluster.threads_per_worker\n"),
        ({"cluster": {"memory_limit": "lots"}}, "`memory_limit` needs a byte size"),
        ({"cluster": {"kubernetes": {"name": "Vox_flow"}}}, "kubernetes.name\n  String should"),
        ({"cluster": {"kubernetes": {"name": "a" * 54}}}, "at most 53 characters"),
        ({"cluster": {"kubernetes": {"worker_memory": "16 GB"}}}, "worker_memory\n  String"),
        ({"cluster": {"kubernetes": {"worker_cpu": 0}}}, "worker_cpu\n  Input should be greater"),
        ({"cluster": {"kubernetes": {"gpu_workers": -1}}}, "gpu_workers\n  Input should be"),
        (
            {"cluster": {"kubernetes": {"min_workers": 4, "max_workers": 2}}},
            r"`max_workers` must be at least `min_workers` \(4\), got 2",
        ),
        (
            {"cluster": {"kubernetes": {"scheduler_service_type": "Ingress"}}},
            "scheduler_service_type\n  Input should be 'ClusterIP'",
        ),
        ({"storage": {"ngff_version": "0.3"}}, "ngff_version\n  Input should be '0.4' or '0.5'"),
        ({"storage": {"compressor": "blosc"}}, "compressor\n  Input should be 'zstd'"),
        ({"storage": {"clevel": 10}}, "clevel\n  Input should be less than or equal to 9"),
        ({"storage": {"clevel": -1}}, "clevel\n  Input should be greater than or equal to 0"),
        ({"storage": {"chunks": (64, 0, 64)}}, r"storage.chunks.1\n  Input should be greater"),
        ({"storage": {"chunks": ()}}, "storage.chunks\n  Tuple should have at least 1 item"),
        (
            {"storage": {"chunks": (64, 64), "shards": (256, 256, 256)}},
            r"`shards` needs one edge per chunk axis \(2\), got \(256, 256, 256\)",
        ),
        (
            {"storage": {"chunks": (64, 64), "shards": (256, 100)}},
            r"`shards` must be a multiple of `chunks` \(64, 64\) per axis, got \(256, 100\)",
        ),
        (
            {"storage": {"ngff_version": "0.4", "shards": (256, 256)}},
            "`shards` needs ngff_version 0.5",
        ),
        ({"prefect": {"api_url": ""}}, "prefect.api_url\n  String should have at least 1"),
        ({"log_level": "LOUD"}, "log_level\n  Input should be 'DEBUG'"),
        ({"log_level": 10}, "log_level\n  Input should be 'DEBUG'"),
        ({"colour": "blue"}, "colour\n  Extra inputs are not permitted"),
    ],
)
def test_invalid_values_raise(kwargs, match):
    with pytest.raises(ValidationError, match=match):
        VoxflowSettings(**kwargs)


@pytest.mark.parametrize("limit", ["auto", "8GiB", "512MB", "1000000"])
def test_memory_limit_accepts_byte_sizes(limit):
    assert ClusterSettings(memory_limit=limit).memory_limit == limit


def test_shards_without_chunks_are_accepted():
    assert StorageSettings(shards=(256, 256, 256)).shards == (256, 256, 256)


def test_settings_are_frozen():
    settings = VoxflowSettings()
    with pytest.raises(ValidationError, match="frozen"):
        settings.log_level = "DEBUG"
    with pytest.raises(ValidationError, match="frozen"):
        settings.cluster.mode = "address"


def _models(model: type[BaseModel]):
    yield model
    for field in model.model_fields.values():
        annotation = field.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            yield from _models(annotation)


def test_every_field_has_a_description():
    models = list(_models(VoxflowSettings))
    assert {m.__name__ for m in models} == {
        "VoxflowSettings",
        "ClusterSettings",
        "KubernetesSettings",
        "StorageSettings",
        "PrefectSettings",
        "ProcessingSettings",
    }
    for model in models:
        for name, field in model.model_fields.items():
            assert field.description, f"{model.__name__}.{name} has no description"
