import copy
import dataclasses
import importlib.metadata
import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import dask.array as da
import numpy as np
import pluggy
import pytest

from voxflow.core.scaled import ScaleContext
from voxflow.plugins import (
    BackgroundSubtraction,
    GaussianBiasFieldCorrection,
    IntensityNormalization,
    ModulePlugin,
    N4BiasFieldCorrection,
    PluginError,
    ScaledProcessingPlugin,
    check_plugin,
    describe_plugins,
    get_plugin_manager,
    hookimpl,
    parse_params,
    plugin_names,
    plugin_provenance,
    reset_plugin_manager,
    resolve_plugin,
)
from voxflow.plugins import manager as manager_module
from voxflow.plugins.base import jsonable

BUILTINS = {
    "gaussian": GaussianBiasFieldCorrection,
    "n4": N4BiasFieldCorrection,
    "background": BackgroundSubtraction,
    "normalize": IntensityNormalization,
}
HOOKS = (
    "lowres_func",
    "highres_func",
    "scaled_processing_plugin_name",
    "scaled_processing_plugin_description",
)


class Complete(ScaledProcessingPlugin):
    """A plugin with every hook and a parameter; its field is `gain` everywhere."""

    def __init__(self, gain=2.0):
        self.gain = gain

    @hookimpl
    def scaled_processing_plugin_name(self):
        return "complete"

    @hookimpl
    def scaled_processing_plugin_description(self):
        return "a complete test plugin"

    @hookimpl
    def lowres_func(self, lowres_array):
        return np.full(lowres_array.shape, self.gain, np.float32)

    @hookimpl
    def highres_func(self, fullres_array, upsampled_output):
        return fullres_array * upsampled_output


def _without(hook):
    """A subclass of Complete in which `hook` is missing."""
    return type(f"No_{hook}", (Complete,), {hook: None})


@pytest.fixture
def fresh_manager():
    reset_plugin_manager()
    yield
    reset_plugin_manager()


# --------------------------------------------------------------------------- the manager


def test_builtins_are_registered_with_descriptions(fresh_manager):
    described = dict(describe_plugins())
    assert list(described)[:4] == list(BUILTINS)
    assert plugin_names()[:4] == list(BUILTINS)
    for name, cls in BUILTINS.items():
        assert described[name] == cls().description and len(described[name]) > 20
        registered = get_plugin_manager().get_plugin(name)
        assert type(registered) is cls and registered.name == name


def test_manager_has_the_hook_specs_and_is_cached(fresh_manager):
    manager = get_plugin_manager()
    assert isinstance(manager, pluggy.PluginManager) and manager.project_name == "voxflow"
    for hook in HOOKS:
        assert getattr(manager.hook, hook).spec is not None
    assert get_plugin_manager() is manager
    reset_plugin_manager()
    assert get_plugin_manager() is not manager


def test_hooks_are_callable_through_pluggy(fresh_manager):
    manager = pluggy.PluginManager("voxflow")
    manager.add_hookspecs(manager_module.ScaledProcessingSpec)
    manager.register(Complete(gain=3.0))
    field = manager.hook.lowres_func(lowres_array=np.zeros((2, 3), np.float32))
    np.testing.assert_array_equal(field, np.full((2, 3), 3.0, np.float32))
    assert manager.hook.scaled_processing_plugin_name() == "complete"


# --------------------------------------------------------------------------- resolving


def test_resolve_an_instance_returns_it():
    plugin = Complete(gain=5.0)
    assert resolve_plugin(plugin) is plugin
    assert resolve_plugin(plugin, {}) is plugin
    with pytest.raises(ValueError, match=r"'complete'.*instance.*\['gain'\]"):
        resolve_plugin(plugin, {"gain": 1.0})


def test_resolve_a_class_with_params():
    plugin = resolve_plugin(GaussianBiasFieldCorrection, {"sigma": 3})
    assert isinstance(plugin, GaussianBiasFieldCorrection)
    assert plugin.params == {
        "sigma": 3,
        "units": "um",
        "mode": "linear",
        "mask": "otsu",
        "offset": None,
    }
    assert plugin.sigma == 3.0


@pytest.mark.parametrize("name", list(BUILTINS))
def test_resolve_a_name_makes_a_fresh_instance(fresh_manager, name):
    first, second = resolve_plugin(name), resolve_plugin(name, None)
    assert type(first) is BUILTINS[name]
    assert first is not second and first is not get_plugin_manager().get_plugin(name)
    assert first.params == BUILTINS[name]().params


def test_resolve_a_name_with_params(fresh_manager):
    plugin = resolve_plugin("gaussian", {"sigma": 20, "mode": "mean"})
    assert (plugin.sigma, plugin.mode) == (20.0, "mean")
    assert plugin.params["sigma"] == 20 and plugin.params["mode"] == "mean"


def test_unknown_name_lists_the_known_ones(fresh_manager):
    with pytest.raises(ValueError, match=r"unknown plugin 'nope'.*'gaussian', 'n4'"):
        resolve_plugin("nope")


@pytest.mark.parametrize(
    ("plugin", "params", "error", "match"),
    [
        ("gaussian", {"sigmaa": 3}, TypeError, r"'gaussian' \(Gauss.*no parameter 'sigmaa'"),
        ("gaussian", {"sigma": -1}, ValueError, r"'gaussian'.*`sigma`.*-1"),
        ("gaussian", {"sigma": "wide"}, TypeError, r"'gaussian'.*`sigma`.*'wide'"),
        ("n4", {"shrink_factor": 0}, ValueError, r"'n4'.*`shrink_factor`"),
        (Complete, {"bogus": 1}, TypeError, r"Complete has no parameter 'bogus'.*gain"),
        ("gaussian", [("sigma", 3)], TypeError, r"`params` must be a dict"),
        ("gaussian", {3: 1}, TypeError, r"`params` keys must be str"),
    ],
)
def test_bad_params_name_the_plugin_and_parameter(fresh_manager, plugin, params, error, match):
    with pytest.raises(error, match=match):
        resolve_plugin(plugin, params)


@pytest.mark.parametrize("bad", [None, 3, 2.5, ["gaussian"], {"name": "gaussian"}, b"n4"])
def test_resolve_rejects_other_types(bad):
    with pytest.raises(TypeError, match="`plugin` must be a plugin instance"):
        resolve_plugin(bad)


# --------------------------------------------------------------------------- parameters


def test_params_are_recorded_with_defaults():
    class Smooth(ScaledProcessingPlugin):
        def __init__(self, sigma=2.0, mode="nearest"):
            super().__init__()
            self.sigma = sigma

    class NoSuper(ScaledProcessingPlugin):
        def __init__(self, sigma=2.0, mode="nearest"):
            self.sigma = sigma

    for cls in (Smooth, NoSuper):
        assert cls().params == {"sigma": 2.0, "mode": "nearest"}
        assert cls(3.0, mode="reflect").params == {"sigma": 3.0, "mode": "reflect"}
        assert cls().context is None
        assert repr(cls(sigma=1.5)) == f"{cls.__name__}(sigma=1.5, mode='nearest')"


def test_params_of_a_child_constructor_win_over_its_parent():
    class Parent(ScaledProcessingPlugin):
        def __init__(self, sigma=2.0):
            super().__init__(sigma=sigma)

    class Child(Parent):
        def __init__(self, width=4.0, **extra):
            super().__init__(sigma=width / 2)

    class Inherits(Parent):
        pass

    assert Child(width=6.0, note="x").params == {"width": 6.0, "note": "x"}
    assert Inherits().params == {"sigma": 2.0}
    assert ScaledProcessingPlugin(a=1).params == {"a": 1}
    assert ScaledProcessingPlugin().params == {}


def test_params_of_a_dataclass_plugin_are_recorded():
    @dataclasses.dataclass
    class Shift(Complete):
        amount: float = 1.0
        axes: tuple = (0, 1)

    assert Shift(amount=2.5).params == {"amount": 2.5, "axes": [0, 1]}
    assert copy.copy(Shift()).params == {"amount": 1.0, "axes": [0, 1]}


def test_params_are_json_types():
    class Odd(ScaledProcessingPlugin):
        def __init__(self, size=(1, 2), gain=None, count=None, mask=None):
            pass

    params = Odd(gain=np.float32(0.5), count=np.int64(3), mask=np.ones((2, 2), bool)).params
    assert params["size"] == [1, 2] and params["gain"] == 0.5 and params["count"] == 3
    assert type(params["gain"]) is float and type(params["count"]) is int
    assert params["mask"]["shape"] == [2, 2] and params["mask"]["dtype"] == "bool"
    json.dumps(params)
    assert jsonable({"a": (np.bool_(True), float("nan"), object)}) == {
        "a": [True, "nan", repr(object)]
    }


def test_copies_keep_params_and_carry_their_own_context():
    plugin = Complete(gain=4.0)
    run = copy.copy(plugin)
    run.context = ScaleContext(("y", "x"), (2.0, 2.0), (1.0, 1.0), (2, 2))
    assert run.params == {"gain": 4.0} and plugin.context is None
    again = pickle.loads(pickle.dumps(run))
    assert again.params == {"gain": 4.0} and again.context == run.context


def test_spacing_helpers():
    plugin = Complete()
    assert plugin.lowres_spacing(3) == (1.0, 1.0, 1.0)
    assert plugin.lowres_spacing_um(2) == (1.0, 1.0)
    plugin.context = ScaleContext(
        ("z", "y", "x"), (0.008, 0.0064, 6.4), (0.002, 0.0016, 1.6), (4, 4, 4),
        units=("millimeter", "millimeter", None),
    )  # fmt: skip
    assert plugin.lowres_spacing(3) == (0.008, 0.0064, 6.4)
    assert plugin.lowres_spacing_um(3) == pytest.approx((8.0, 6.4, 6.4))
    with pytest.raises(ValueError, match=r"`context.spacing` needs one value per axis .*\(2\)"):
        plugin.lowres_spacing(2)


# --------------------------------------------------------------------------- checking


def test_a_complete_plugin_passes_the_check():
    check_plugin(Complete())
    for cls in BUILTINS.values():
        check_plugin(cls())


@pytest.mark.parametrize("hook", HOOKS)
def test_a_missing_hook_is_named(hook):
    plugin = _without(hook)()
    with pytest.raises(PluginError, match=rf"No_{hook}.*does not implement the '{hook}' hook"):
        check_plugin(plugin)
    assert isinstance(PluginError("x"), TypeError)


def test_a_missing_name_hook_is_reported_by_the_name_property():
    with pytest.raises(PluginError, match="'scaled_processing_plugin_name' hook"):
        _ = _without("scaled_processing_plugin_name")().name


def test_check_rejects_a_class_and_a_bad_name():
    with pytest.raises(PluginError, match="Complete is a class"):
        check_plugin(Complete)

    class Unnamed(Complete):
        @hookimpl
        def scaled_processing_plugin_name(self):
            return ""

    with pytest.raises(PluginError, match=r"Unnamed.*non-empty str, got ''"):
        check_plugin(Unnamed())

    class Raising(Complete):
        @hookimpl
        def scaled_processing_plugin_name(self):
            raise KeyError("name")

    with pytest.raises(PluginError, match=r"Raising: .*name' hook failed: KeyError: 'name'"):
        check_plugin(Raising())


def test_provenance():
    record = plugin_provenance(resolve_plugin(GaussianBiasFieldCorrection, {"sigma": 50.0}))
    assert record == {
        "name": "gaussian",
        "class": "voxflow.plugins.gaussian:GaussianBiasFieldCorrection",
        "params": {"sigma": 50.0, "units": "um", "mode": "linear", "mask": "otsu", "offset": None},
    }
    assert json.loads(json.dumps(record)) == record
    assert plugin_provenance(Complete())["class"] == f"{__name__}:Complete"


# --------------------------------------------------------------------------- entry points


def _entry_points(*triples):
    return [importlib.metadata.EntryPoint(n, v, "voxflow.plugins") for n, v in triples]


def test_a_broken_entry_point_warns_and_the_others_load(fresh_manager, monkeypatch):
    found = _entry_points(
        ("broken", "voxflow_no_such_package_xyz:Plugin"),
        ("good", f"{__name__}:Complete"),
        ("not-a-plugin", "json:dumps"),
        ("gaussian", f"{__name__}:Complete"),
        ("missing-hook", f"{__name__}:Incomplete"),
        ("mute", f"{__name__}:Mute"),
    )

    def entry_points(group=None):
        return [ep for ep in found if ep.group == group]

    monkeypatch.setattr(manager_module.importlib.metadata, "entry_points", entry_points)
    with pytest.warns(RuntimeWarning) as caught:
        names = plugin_names()
    messages = "\n".join(str(w.message) for w in caught)
    assert "'broken'" in messages and "ModuleNotFoundError" in messages
    assert "'not-a-plugin'" in messages and "'gaussian'" in messages and "name is taken" in messages
    assert "'missing-hook'" in messages and "'highres_func' hook" in messages
    assert names == [*BUILTINS, "good", "mute"]
    assert type(get_plugin_manager().get_plugin("gaussian")) is GaussianBiasFieldCorrection
    assert resolve_plugin("good", {"gain": 7.0}).gain == 7.0
    described = dict(describe_plugins())
    assert described["mute"] == "(its description hook failed: RuntimeError: no words)"
    assert described["good"] == "a complete test plugin"


Incomplete = _without("highres_func")


class Mute(Complete):
    @hookimpl
    def scaled_processing_plugin_description(self):
        raise RuntimeError("no words")


# --------------------------------------------------------------------------- the example package


def test_the_installed_example_package_is_discovered(example_plugin_installed):
    names = plugin_names()
    assert names[:4] == list(BUILTINS)
    assert {"example-scale", "example-offset"} <= set(names)
    described = dict(describe_plugins())
    assert described["example-scale"] == "example: multiply by a constant factor"
    assert described["example-offset"] == "example: add a constant (a module plugin)"


def test_the_example_plugin_resolves_by_name_and_runs(example_plugin_installed):
    plugin = resolve_plugin("example-scale", {"factor": 3.0})
    check_plugin(plugin)
    assert type(plugin).__module__ == "voxflow_example_plugin"
    assert plugin_provenance(plugin) == {
        "name": "example-scale",
        "class": "voxflow_example_plugin:ConstantScale",
        "params": {"factor": 3.0},
    }
    run = copy.copy(plugin)
    low = np.arange(12, dtype=np.float32).reshape(3, 4)
    field = run.lowres_func(lowres_array=low)
    np.testing.assert_array_equal(field, np.full((3, 4), 3.0, np.float32))
    full = da.from_array(np.arange(48, dtype=np.uint16).reshape(6, 8), chunks=(4, 5))
    up = da.full((6, 8), 3.0, dtype=np.float32, chunks=(3, 3))
    out = run.highres_func(fullres_array=full, upsampled_output=up).compute()
    np.testing.assert_array_equal(out, 3.0 * np.arange(48).reshape(6, 8))
    with pytest.raises(ValueError, match=r"'example-scale'.*`factor` must be > 0"):
        resolve_plugin("example-scale", {"factor": -1.0})


def test_a_module_plugin_resolves_to_a_copyable_wrapper(example_plugin_installed):
    plugin = resolve_plugin("example-offset")
    assert isinstance(plugin, ModulePlugin) and plugin.params == {}
    check_plugin(plugin)
    run = copy.copy(plugin)
    run.context = ScaleContext(("y", "x"), (2.0, 2.0), (1.0, 1.0), (2, 2))
    assert plugin.context is None and run.name == "example-offset"
    field = run.lowres_func(lowres_array=np.zeros((2, 2), np.float32))
    out = run.highres_func(
        fullres_array=da.ones((3, 3), chunks=2), upsampled_output=da.ones((3, 3))
    )
    assert field.tolist() == [[10.0, 10.0], [10.0, 10.0]] and out.sum().compute() == 18.0
    assert plugin_provenance(plugin)["class"] == "voxflow_example_plugin.offset"
    with pytest.raises(ValueError, match=r"'example-offset'.*module and takes no parameters"):
        resolve_plugin("example-offset", {"value": 1})


def test_a_fresh_process_discovers_the_example_package(example_plugin_installed):
    paths = [str(example_plugin_installed), str(Path(__file__).resolve().parents[2])]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(paths)}
    code = "from voxflow.plugins import plugin_names; print(','.join(plugin_names()))"
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True
    )
    names = done.stdout.strip().split(",")
    assert names[:4] == list(BUILTINS) and {"example-scale", "example-offset"} <= set(names)


# --------------------------------------------------------------------------- parse_params


def test_parse_params_values():
    items = [
        "sigma=20",
        "ratio=1.5e2",
        "mode=linear",
        'convergence={"iters": [10, 5], "tol": 0}',
        "clip=true",
        "offset=null",
        "label=a=b",
        "empty=",
        " spaced =3",
    ]
    assert parse_params(items) == {
        "sigma": 20,
        "ratio": 150.0,
        "mode": "linear",
        "convergence": {"iters": [10, 5], "tol": 0},
        "clip": True,
        "offset": None,
        "label": "a=b",
        "empty": "",
        "spaced": 3,
    }
    assert parse_params([]) == {} and parse_params(None) == {}


@pytest.mark.parametrize(
    ("items", "error", "match"),
    [
        (["sigma"], ValueError, r"KEY=VALUE, got 'sigma'"),
        (["=3"], ValueError, r"KEY=VALUE, got '=3'"),
        (["a=1", "a=2"], ValueError, r"'a' is given twice"),
        ("sigma=3", TypeError, r"`items` must be a list"),
        ([3], TypeError, r"`items` must hold str, got 3"),
    ],
)
def test_parse_params_errors(items, error, match):
    with pytest.raises(error, match=match):
        parse_params(items)


def test_parsed_params_resolve_a_plugin(fresh_manager):
    params = parse_params(["sigma=150", "mode=mean", "mask=all"])
    plugin = resolve_plugin("gaussian", params)
    assert (plugin.sigma, plugin.mode, plugin.mask) == (150.0, "mean", "all")
