"""Handler plugins: find, then load, then validate, and always name the culprit.

A handler name given to ``--handler`` is one of:

* a name in the ``muxsrv.handlers`` entry-point group (the built-ins are
  registered there too, in muxsrv's own ``pyproject.toml``);
* ``package.module:attribute``, imported directly.

The built-ins are also known without installation (``BUILTINS``), so
``python -m muxsrv`` works from a fresh checkout.  No plugin shadows another
silently: a name that two distributions provide (an installed package
registering ``echo``, say) is an error naming both, raised when that name is
asked for; ``package.module:attribute`` picks one.  An import path is looked
for on ``sys.path`` and then in the current folder, so the ``muxsrv`` script
finds ``reverse.py`` beside the user as ``python -m muxsrv`` does (the folder
is appended, so it never shadows an installed module).  Finding yields a
:class:`Plugin` (a name and where it comes from); loading yields a
:class:`LoadedPlugin` (the object and its form) or raises
:class:`PluginError`, whose message names the plugin, where it was looked
for and what went wrong.
"""

from __future__ import annotations

import importlib
import inspect
import os
import sys
from dataclasses import dataclass
from importlib.metadata import EntryPoint, entry_points
from pathlib import Path
from types import ModuleType
from typing import Final

from .handler import Handler

__all__ = [
    "BUILTINS",
    "ENTRY_POINT_GROUP",
    "AmbiguousHandler",
    "LoadedPlugin",
    "Plugin",
    "PluginError",
    "culprit",
    "find",
    "load",
    "providers",
]

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


class AmbiguousHandler(PluginError):
    def __init__(self, name: str, providers: list[Plugin]) -> None:
        self.name = name
        self.providers = providers
        listed = " and ".join(f"{p.origin} ({p.target})" for p in providers)
        super().__init__(
            f"handler {name!r} is provided by more than one distribution: {listed};"
            " give package.module:attribute to pick one"
        )


@dataclass(frozen=True)
class Plugin:
    name: str
    target: str  # "package.module:attribute"
    source: str  # where it was found: "built-in", "entry point of <dist>", "import path"
    #: Who provides it, for the start-up line: "built-in", "<dist> <version>", "import path".
    origin: str = "built-in"


@dataclass(frozen=True)
class LoadedPlugin:
    plugin: Plugin
    obj: object
    #: "function": called as fn(payload) -> reply; "class": a Handler subclass.
    form: str

    @property
    def describe(self) -> str:
        """The handler as the start-up line names it: ``reverse (myhandlers 1.0)``."""
        if self.plugin.source != "import path":
            return f"{self.plugin.name} ({self.plugin.origin})"
        module = sys.modules.get(self.plugin.target.partition(":")[0])
        return f"{self.plugin.name} ({_where(module)})"

    @property
    def handler_class(self) -> type[Handler]:
        assert isinstance(self.obj, type) and issubclass(self.obj, Handler)
        return self.obj


def available() -> dict[str, Plugin]:
    """Every named handler: the built-ins and the entry points.

    Raises AmbiguousHandler only from :func:`find`; here a name that several
    distributions provide maps to the first, and :func:`providers` has them all.
    """
    return {name: found[0] for name, found in providers().items()}


def providers() -> dict[str, list[Plugin]]:
    """Every named handler with each distinct target that provides it, built-ins first."""
    found = {name: [Plugin(name, target, "built-in")] for name, target in BUILTINS.items()}
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        plugin = _from_entry_point(ep)
        others = found.setdefault(ep.name, [])
        if all(other.target != plugin.target for other in others):
            others.append(plugin)  # the same target twice (muxsrv's own built-ins) is one
    return found


def _from_entry_point(ep: EntryPoint) -> Plugin:
    if ep.dist is None:
        return Plugin(ep.name, ep.value, "entry point", "an unknown distribution")
    dist = ep.dist.name
    return Plugin(ep.name, ep.value, f"entry point of {dist}", f"{dist} {ep.dist.version}")


def find(name: str) -> Plugin:
    if ":" in name:
        return Plugin(name, name, "import path")
    plugins = providers()
    if name not in plugins:
        raise UnknownHandler(name, sorted(plugins))
    if len(plugins[name]) > 1:
        raise AmbiguousHandler(name, plugins[name])
    return plugins[name][0]


def culprit(plugin: Plugin) -> str:
    """How every error about this plugin starts: ``handler 'x' (mod:attr, import path)``."""
    return f"handler {plugin.name!r} ({plugin.target}, {plugin.source})"


def load(plugin: Plugin) -> LoadedPlugin:
    """Import the plugin's object and check it has a handler's shape."""
    who = culprit(plugin)
    module_name, _, attr_path = plugin.target.partition(":")
    if not module_name or not attr_path:
        raise PluginError(f"{who}: expected the form package.module:attribute")
    try:
        obj: object = _import(module_name, plugin.source == "import path")
    except Exception as exc:
        hint = ""
        if isinstance(exc, ModuleNotFoundError) and exc.name == module_name.split(".")[0]:
            hint = " (looked on sys.path and in the current folder; set PYTHONPATH to its folder)"
        raise PluginError(
            f"{who}: importing module {module_name!r} failed: {type(exc).__name__}: {exc}{hint}"
        ) from exc
    for part in attr_path.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise PluginError(f"{who}: module {module_name!r} has no {attr_path!r}") from None
    return LoadedPlugin(plugin, obj, _validate(obj, who))


def _import(module_name: str, from_cwd: bool) -> ModuleType:
    """Import a module; an import path not found on sys.path is looked for in the cwd too."""
    try:
        return importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        cwd = os.getcwd()
        top = module_name.split(".")[0]
        if not from_cwd or exc.name != top or _on_path(cwd):
            raise
    sys.path.append(cwd)  # after everything else: it never shadows an installed module
    importlib.invalidate_caches()
    return importlib.import_module(module_name)


def _on_path(folder: str) -> bool:
    return any(os.path.abspath(entry or os.curdir) == folder for entry in sys.path)


def _where(module: ModuleType | None) -> str:
    """A module's file, relative to the current folder when it is inside it."""
    file = getattr(module, "__file__", None)
    if file is None:
        return "import path"
    path = Path(file)
    try:
        return str(path.relative_to(Path.cwd()))
    except ValueError:
        return str(path)


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
