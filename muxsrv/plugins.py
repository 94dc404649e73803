"""Handler plugins: find, then load, then validate, and always name the culprit.

A handler name given to ``--handler`` is one of:

* a name in the ``muxsrv.handlers`` entry-point group (the built-ins are
  registered there too, in muxsrv's own ``pyproject.toml``);
* ``package.module:attribute``, imported directly.

The built-ins are also known without installation (``BUILTINS``), so
``python -m muxsrv`` works from a fresh checkout.  Finding yields a
:class:`Plugin` (a name and where it comes from); loading yields a
:class:`LoadedPlugin` (the object and its form) or raises
:class:`PluginError`, whose message names the plugin, where it was looked
for and what went wrong.
"""

from __future__ import annotations

import importlib
import inspect
from dataclasses import dataclass
from importlib.metadata import entry_points
from typing import Final

from .handler import Handler

__all__ = ["BUILTINS", "ENTRY_POINT_GROUP", "LoadedPlugin", "Plugin", "PluginError", "find", "load"]

ENTRY_POINT_GROUP: Final = "muxsrv.handlers"
#: Same targets as the entry points in pyproject.toml (a test keeps them equal).
BUILTINS: Final = {
    "echo": "muxsrv.handlers.builtin:echo",
    "upper": "muxsrv.handlers.builtin:upper",
    "exec": "muxsrv.handlers.exec:ExecHandler",
}


class PluginError(Exception):
    """A handler could not be found, loaded or validated; the message says which and why."""


class UnknownHandler(PluginError):
    def __init__(self, name: str, available: list[str]) -> None:
        self.name = name
        self.available = available
        super().__init__(
            f"unknown handler {name!r}; available: {', '.join(available)}"
            " (or give package.module:attribute)"
        )


@dataclass(frozen=True)
class Plugin:
    name: str
    target: str  # "package.module:attribute"
    source: str  # where it was found: "built-in", "entry point of <dist>", "import path"


@dataclass(frozen=True)
class LoadedPlugin:
    plugin: Plugin
    obj: object
    #: "function": called as fn(payload) -> reply; "class": a Handler subclass.
    form: str

    @property
    def handler_class(self) -> type[Handler]:
        assert isinstance(self.obj, type) and issubclass(self.obj, Handler)
        return self.obj


def available() -> dict[str, Plugin]:
    """Every named handler: the built-ins, then the entry points (which may override)."""
    found = {name: Plugin(name, target, "built-in") for name, target in BUILTINS.items()}
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        dist = ep.dist.name if ep.dist is not None else "an unknown distribution"
        if ep.name in BUILTINS and ep.value == BUILTINS[ep.name]:
            continue  # muxsrv's own registration of a built-in
        found[ep.name] = Plugin(ep.name, ep.value, f"entry point of {dist}")
    return found


def find(name: str) -> Plugin:
    if ":" in name:
        return Plugin(name, name, "import path")
    plugins = available()
    if name not in plugins:
        raise UnknownHandler(name, sorted(plugins))
    return plugins[name]


def load(plugin: Plugin) -> LoadedPlugin:
    """Import the plugin's object and check it has a handler's shape."""
    culprit = f"handler {plugin.name!r} ({plugin.target}, {plugin.source})"
    module_name, _, attr_path = plugin.target.partition(":")
    if not module_name or not attr_path:
        raise PluginError(f"{culprit}: expected the form package.module:attribute")
    try:
        obj: object = importlib.import_module(module_name)
    except Exception as exc:
        raise PluginError(
            f"{culprit}: importing module {module_name!r} failed: {type(exc).__name__}: {exc}"
        ) from exc
    for part in attr_path.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise PluginError(f"{culprit}: module {module_name!r} has no {attr_path!r}") from None
    return LoadedPlugin(plugin, obj, _validate(obj, culprit))


def _validate(obj: object, culprit: str) -> str:
    if isinstance(obj, type):
        if issubclass(obj, Handler):
            return "class"
        raise PluginError(
            f"{culprit}: class {obj.__name__} is not a subclass of muxsrv.Handler"
        )
    if not callable(obj):
        raise PluginError(
            f"{culprit}: is a {type(obj).__name__}; expected a function taking the payload"
            " or a muxsrv.Handler subclass"
        )
    try:
        inspect.signature(obj).bind(b"")
    except TypeError:
        raise PluginError(
            f"{culprit}: a function handler must take exactly one argument (the payload)"
        ) from None
    except ValueError:
        pass  # no signature available (some builtins): trust it
    return "function"
