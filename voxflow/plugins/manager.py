"""Finding, resolving and checking scaled-processing plugins: built-ins and installed ones."""

from __future__ import annotations

import functools
import importlib.metadata
import inspect
import json
import types
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import pluggy

from voxflow.plugins._spec import HOOK_NAMES, PROJECT_NAME, PluginError, ScaledProcessingSpec
from voxflow.plugins.background import BackgroundSubtraction
from voxflow.plugins.base import ScaledProcessingPlugin, jsonable
from voxflow.plugins.gaussian import GaussianBiasFieldCorrection
from voxflow.plugins.n4 import N4BiasFieldCorrection
from voxflow.plugins.normalize import IntensityNormalization

__all__ = [
    "BUILTINS",
    "ENTRY_POINT_GROUP",
    "ModulePlugin",
    "check_plugin",
    "describe_plugins",
    "get_plugin_manager",
    "parse_params",
    "plugin_names",
    "plugin_provenance",
    "reset_plugin_manager",
    "resolve_plugin",
]

ENTRY_POINT_GROUP = "voxflow.plugins"
"""Entry-point group under which installed packages declare their plugins."""

BUILTINS: dict[str, type[ScaledProcessingPlugin]] = {
    "gaussian": GaussianBiasFieldCorrection,
    "n4": N4BiasFieldCorrection,
    "background": BackgroundSubtraction,
    "normalize": IntensityNormalization,
}
"""The built-in plugins by registered name."""


class ModulePlugin:
    """A plugin given as a module of hook functions, seen as a plugin instance.

    The framework copies a plugin and sets ``context`` on the copy; a module can be neither
    copied nor given attributes safely, so the module's hooks are called through this.

    Parameters
    ----------
    module : module
        A module defining the four hooks as functions.

    Attributes
    ----------
    module : module
        The wrapped module.
    params : dict
        Always empty: a module takes no parameters.
    context : ScaleContext or None
        Set by the framework; the module's hooks do not see it.
    """

    def __init__(self, module: types.ModuleType) -> None:
        self.module = module
        self.params: dict[str, Any] = {}
        self.context = None
        for hook in HOOK_NAMES:
            if hasattr(module, hook):
                setattr(self, hook, getattr(module, hook))

    def __repr__(self) -> str:
        return f"ModulePlugin({self.module.__name__})"

    @property
    def name(self) -> str:
        """The registered name, from the ``scaled_processing_plugin_name`` hook."""
        return str(self.scaled_processing_plugin_name())

    @property
    def description(self) -> str:
        """The description, from the ``scaled_processing_plugin_description`` hook."""
        return str(self.scaled_processing_plugin_description())


# --------------------------------------------------------------------------- checking


def _label(plugin: Any) -> str:
    """How errors name a plugin: its registered name when the hook answers, else its type."""
    kind = plugin.__name__ if isinstance(plugin, type | types.ModuleType) else type(plugin).__name__
    try:
        return f"{plugin.scaled_processing_plugin_name()!r} ({kind})"
    except Exception:  # a broken or missing name hook must not hide the real error
        return kind


def check_plugin(plugin: Any) -> None:
    """Check that `plugin` implements the four hooks of the scaled-processing specification.

    Parameters
    ----------
    plugin : object
        A plugin instance (or :class:`ModulePlugin`).

    Raises
    ------
    PluginError
        Naming the plugin and the hook, when a hook is missing or not callable, or the name
        hook raises or does not return a non-empty str.
    """
    if isinstance(plugin, type):
        raise PluginError(
            f"plugin {plugin.__name__} is a class; give an instance, or resolve it with "
            "resolve_plugin(cls, params)"
        )
    for hook in HOOK_NAMES:
        if not callable(getattr(plugin, hook, None)):
            raise PluginError(
                f"plugin {_label(plugin)} does not implement the {hook!r} hook; a plugin "
                f"implements {', '.join(HOOK_NAMES)}"
            )
    try:
        name = plugin.scaled_processing_plugin_name()
    except Exception as exc:
        raise PluginError(
            f"plugin {type(plugin).__name__}: the 'scaled_processing_plugin_name' hook failed: "
            f"{type(exc).__name__}: {exc}"
        ) from exc
    if not isinstance(name, str) or not name:
        raise PluginError(
            f"plugin {type(plugin).__name__}: the 'scaled_processing_plugin_name' hook must "
            f"return a non-empty str, got {name!r}"
        )


def plugin_provenance(plugin: Any) -> dict:
    """What identifies a plugin run in provenance.

    Parameters
    ----------
    plugin : object
        A plugin instance (or :class:`ModulePlugin`).

    Returns
    -------
    dict
        ``name`` (registered name), ``class`` (``module:qualname``, or the module's name for a
        module plugin) and ``params`` (JSON types).
    """
    if isinstance(plugin, ModulePlugin):
        origin = plugin.module.__name__
    else:
        origin = f"{type(plugin).__module__}:{type(plugin).__qualname__}"
    return {
        "name": str(plugin.scaled_processing_plugin_name()),
        "class": origin,
        "params": jsonable(dict(getattr(plugin, "params", {}) or {})),
    }


# --------------------------------------------------------------------------- the manager


def _as_plugin(obj: Any) -> Any:
    """An entry point's object as a registrable plugin instance (or module)."""
    if isinstance(obj, type):
        return obj()
    return obj


def _register_entry_point(manager: pluggy.PluginManager, entry_point: Any) -> None:
    """Load and register one entry point; warn and skip it when it is broken."""
    where = f"{entry_point.name!r} ({entry_point.value})"
    if manager.has_plugin(entry_point.name):
        warnings.warn(
            f"voxflow plugin entry point {where} is skipped: the name is taken by another plugin",
            RuntimeWarning,
            stacklevel=3,
        )
        return
    try:
        plugin = _as_plugin(entry_point.load())
        check_plugin(ModulePlugin(plugin) if isinstance(plugin, types.ModuleType) else plugin)
        manager.register(plugin, name=entry_point.name)
    except Exception as exc:  # any failure of third-party code must leave the rest usable
        warnings.warn(
            f"voxflow plugin entry point {where} failed to load and is skipped: "
            f"{type(exc).__name__}: {exc}",
            RuntimeWarning,
            stacklevel=3,
        )


@functools.cache
def get_plugin_manager() -> pluggy.PluginManager:
    """The plugin manager: hook specifications, built-ins and installed plugins.

    Built-ins are registered as default instances under their names (``gaussian``, ``n4``,
    ``background``, ``normalize``), then every entry point of the group ``voxflow.plugins``
    under its entry-point name: a plugin class (instantiated with its defaults), an instance
    or a module of hook functions. An entry point that fails to load, is not a plugin, or
    takes a name already registered is skipped with a ``RuntimeWarning``.

    The manager is made once per process; :func:`reset_plugin_manager` (or
    ``get_plugin_manager.cache_clear()``) makes the next call look again, e.g. after a
    package was installed.

    Returns
    -------
    pluggy.PluginManager
        The manager of project ``"voxflow"``.
    """
    manager = pluggy.PluginManager(PROJECT_NAME)
    manager.add_hookspecs(ScaledProcessingSpec)
    for name, cls in BUILTINS.items():
        manager.register(cls(), name=name)
    for entry_point in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
        _register_entry_point(manager, entry_point)
    return manager


def reset_plugin_manager() -> None:
    """Forget the cached plugin manager, so that the next call discovers plugins again."""
    get_plugin_manager.cache_clear()


def _registered() -> dict[str, Any]:
    manager = get_plugin_manager()
    return {name: plugin for name, plugin in manager.list_name_plugin() if plugin is not None}


def plugin_names() -> list[str]:
    """Registered plugin names: the built-ins first, then installed plugins.

    Returns
    -------
    list of str
        Names accepted by :func:`resolve_plugin`.
    """
    return list(_registered())


def describe_plugins() -> list[tuple[str, str]]:
    """Name and description of every registered plugin.

    Returns
    -------
    list of (str, str)
        ``(name, description)``, in :func:`plugin_names` order; a description hook that
        raises is reported in place of its description.
    """
    out = []
    for name, plugin in _registered().items():
        wrapped = ModulePlugin(plugin) if isinstance(plugin, types.ModuleType) else plugin
        try:
            description = str(wrapped.scaled_processing_plugin_description())
        except Exception as exc:  # one broken installed plugin must not break the listing
            description = f"(its description hook failed: {type(exc).__name__}: {exc})"
        out.append((name, description))
    return out


# --------------------------------------------------------------------------- resolving


def _validate_params(params: Any) -> dict:
    if params is None:
        return {}
    if not isinstance(params, Mapping):
        raise TypeError(f"`params` must be a dict or None, got {type(params).__name__}")
    for key in params:
        if not isinstance(key, str):
            raise TypeError(f"`params` keys must be str, got {key!r}")
    return dict(params)


def _construct(cls: type, params: dict, label: str) -> Any:
    """``cls(**params)``, with errors that name the plugin and the parameter."""
    signature = inspect.signature(cls)
    accepted = signature.parameters
    if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in accepted.values()):
        for key in params:
            if key not in accepted or accepted[key].kind is inspect.Parameter.POSITIONAL_ONLY:
                known = ", ".join(accepted) or "none"
                raise TypeError(f"plugin {label} has no parameter {key!r}; its parameters: {known}")
    try:
        return cls(**params)
    except (TypeError, ValueError) as exc:
        raise type(exc)(f"plugin {label}: {exc}") from exc


def resolve_plugin(plugin: Any, params: Mapping[str, Any] | None = None) -> Any:
    """A plugin instance from an instance, a class and parameters, or a registered name.

    Parameters
    ----------
    plugin : object, type or str
        A plugin instance (returned as is), a plugin class (constructed with `params`), or
        a registered name (see :func:`plugin_names`; the registered plugin's class is
        constructed with `params`, a fresh instance every call).
    params : dict or None, optional
        Keyword parameters of the plugin's constructor. Must be empty for an instance and
        for a plugin registered as a module.

    Returns
    -------
    object
        A fresh plugin instance (a :class:`ModulePlugin` for a module plugin), not yet
        checked: see :func:`check_plugin`.

    Raises
    ------
    ValueError
        For an unknown name (the message lists the known ones), parameters given with an
        instance or a module plugin, or a parameter value the plugin rejects.
    TypeError
        For `plugin` of another type, `params` not a dict, or a parameter the plugin does
        not take or of the wrong type; the message names the plugin and the parameter.
    """
    params = _validate_params(params)
    label = None
    if isinstance(plugin, str):
        registered = _registered()
        if plugin not in registered:
            known = ", ".join(repr(n) for n in registered)
            raise ValueError(f"unknown plugin {plugin!r}; registered plugins: {known}")
        label, plugin = repr(plugin), registered[plugin]
        if not isinstance(plugin, types.ModuleType):
            plugin = type(plugin)
            label = f"{label} ({plugin.__qualname__})"
    if isinstance(plugin, types.ModuleType):
        if params:
            raise ValueError(
                f"plugin {_label(plugin)} is a module and takes no parameters, got {sorted(params)}"
            )
        return ModulePlugin(plugin)
    if isinstance(plugin, type):
        return _construct(plugin, params, label or plugin.__qualname__)
    if isinstance(plugin, bool | int | float | bytes | Sequence | Mapping) or plugin is None:
        raise TypeError(
            "`plugin` must be a plugin instance, a plugin class or a registered name, "
            f"got {plugin!r} ({type(plugin).__name__})"
        )
    if params:
        raise ValueError(
            f"plugin {_label(plugin)} is an instance: give its parameters to its constructor, "
            f"not as `params` (got {sorted(params)})"
        )
    return plugin


# --------------------------------------------------------------------------- the command line


def parse_params(items: Sequence[str] | None) -> dict:
    """Plugin parameters from ``KEY=VALUE`` strings (``--param sigma=20``).

    Parameters
    ----------
    items : sequence of str or None
        Each ``KEY=VALUE``; the value is parsed as JSON where it parses (``20`` → 20,
        ``1.5e2`` → 150.0, ``true`` → True, ``null`` → None, ``[1,2]`` → a list,
        ``{"iters": [50], "tol": 1e-7}`` → a dict) and kept as the raw string otherwise
        (``mode=linear`` → ``"linear"``).

    Returns
    -------
    dict
        Parameters by name.

    Raises
    ------
    TypeError
        When `items` is not a sequence of str.
    ValueError
        When an item has no ``=`` or an empty key, or a key repeats.
    """
    if items is None:
        return {}
    if isinstance(items, str | bytes) or not isinstance(items, Sequence):
        raise TypeError(f"`items` must be a list of 'KEY=VALUE' str, got {type(items).__name__}")
    params: dict[str, Any] = {}
    for item in items:
        if not isinstance(item, str):
            raise TypeError(f"`items` must hold str, got {item!r} ({type(item).__name__})")
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ValueError(f"a plugin parameter must look like KEY=VALUE, got {item!r}")
        if key in params:
            raise ValueError(f"plugin parameter {key!r} is given twice")
        try:
            params[key] = json.loads(raw)
        except json.JSONDecodeError:
            params[key] = raw
    return params
