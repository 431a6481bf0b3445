"""The plugin manager and the registry of the components plugins provide.

Plugins are found through the ``cellscribe`` entry-point group. The built-in ones declare the same group
in cellscribe's own ``pyproject.toml``, so they load exactly like third-party plugins.

Environment variables (read when the manager is first created):

``CELLSCRIBE_LOAD_PLUGINS``
    Comma-separated names of the *external* plugins to load (entry-point names or distribution names).
    When set, other external plugins are not loaded; set it to an empty string to load none.
``CELLSCRIBE_DISABLE_PLUGINS``
    Comma-separated plugin names never to load (external or built-in).
"""

from __future__ import annotations

import functools
import importlib
import importlib.metadata
import logging
import os
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import attrs
import pluggy

from . import hookspecs
from .components import KINDS, with_defaults

log = logging.getLogger(__name__)

GROUP = "cellscribe"
BUILTIN_DIST = "cellscribe"
ENV_LOAD = "CELLSCRIBE_LOAD_PLUGINS"
ENV_DISABLE = "CELLSCRIBE_DISABLE_PLUGINS"


class PluginError(RuntimeError):
    """A plugin registered something invalid, or a requested component does not exist."""


@attrs.frozen
class Entry:
    """A registered component and where it came from."""

    kind: str
    name: str
    component: Any
    plugin: str


@attrs.frozen
class PluginInfo:
    """What ``cellscribe plugins`` shows for one plugin."""

    name: str
    module: str
    version: str
    origin: str  # "built-in" or the distribution that provides it
    provides: tuple[str, ...]


@attrs.define
class Registry:
    """Components by kind and name, filled by the registration hooks."""

    entries: dict[str, dict[str, Entry]] = attrs.field(factory=lambda: {k[0]: {} for k in KINDS.values()})

    def add(self, kind: str, component: Any, plugin: str, protocol: type, methods: Iterable[str]) -> None:
        name = getattr(component, "name", None)
        if not isinstance(name, str) or not name:
            raise PluginError(f"plugin {plugin!r} registered a {kind} without a 'name' string")
        missing = [m for m in methods if not callable(getattr(component, m, None))]
        if missing:
            raise PluginError(
                f"plugin {plugin!r} registered {kind} {name!r} without method(s) {', '.join(missing)} "
                f"(see cellscribe.core.components.{protocol.__name__})"
            )
        existing = self.entries[kind].get(name)
        if existing is not None:
            raise PluginError(
                f"{kind} {name!r} is registered twice: by plugin {existing.plugin!r} and by {plugin!r}; "
                f"block one with {ENV_DISABLE}={plugin}"
            )
        # The registry hands out the component with its protocol's optional members filled in.
        self.entries[kind][name] = Entry(kind, name, with_defaults(component, protocol), plugin)

    def get(self, kind: str, name: str) -> Any:
        """The component ``name`` of ``kind``; a clear error listing the choices otherwise."""
        try:
            return self.entries[kind][name].component
        except KeyError:
            choices = ", ".join(sorted(self.entries[kind])) or "none"
            raise PluginError(
                f"unknown {kind} {name!r}; available: {choices}. "
                "Run `cellscribe plugins` to see what each installed plugin provides."
            ) from None

    def names(self, kind: str) -> list[str]:
        return list(self.entries[kind])

    def all(self, kind: str) -> dict[str, Any]:
        return {name: e.component for name, e in self.entries[kind].items()}

    def backend_for(self, spec: str) -> Any:
        """The backend for a ``model=`` string: exact name, then ``name:`` prefix, then ``handles``."""
        backends = self.entries["backend"]
        if spec in backends:
            return backends[spec].component
        prefix = spec.split(":", 1)[0]
        if ":" in spec and prefix in backends:
            return backends[prefix].component
        for entry in backends.values():
            if entry.component.handles(spec):
                return entry.component
        raise PluginError(
            f"no backend can load model {spec!r}. Give a registered backend name "
            f"({', '.join(backends) or 'none installed'}), a local model directory, or a hub id "
            "like 'org/name'."
        )


def _split_env(name: str) -> set[str] | None:
    value = os.environ.get(name)
    if value is None:
        return None
    return {v.strip() for v in value.split(",") if v.strip()}


def _pyproject_entry_points() -> list[tuple[str, str]]:
    """The built-in entry points declared in our own pyproject.toml.

    Used only when cellscribe runs from a source tree that was not installed (no distribution metadata,
    e.g. a copied checkout on a GPU machine); the declaration is the same one an install would use.
    """
    path = Path(__file__).resolve().parents[1] / "pyproject.toml"
    if not path.exists():
        return []
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        try:
            import tomli as tomllib  # type: ignore[no-redef]
        except ModuleNotFoundError:
            return []
    with path.open("rb") as fh:
        table = tomllib.load(fh)
    return list(table.get("project", {}).get("entry-points", {}).get(GROUP, {}).items())


def _discover() -> list[tuple[str, str, str, str]]:
    """(entry-point name, module path, distribution name, version) for every plugin in the group."""
    found = []
    for ep in importlib.metadata.entry_points(group=GROUP):
        dist = ep.dist.name if ep.dist is not None else "unknown"
        version = ep.dist.version if ep.dist is not None else ""
        found.append((ep.name, ep.value, dist, version))
    if not any(d == BUILTIN_DIST for _, _, d, _ in found):
        from .. import __version__

        found.extend((n, v, BUILTIN_DIST, __version__) for n, v in _pyproject_entry_points())
    return found


def create_plugin_manager(extra: Iterable[tuple[str, Any]] = ()) -> pluggy.PluginManager:
    """A new plugin manager with the built-in and allowed external plugins loaded and checked.

    ``extra``: ``(name, plugin)`` pairs registered after discovery (tests, notebooks).
    """
    pm = pluggy.PluginManager(GROUP)
    pm.add_hookspecs(hookspecs)
    # Plugins registered from now on may add hook specifications of their own.
    pm.hook.cellscribe_addhooks.call_historic(kwargs={"pluginmanager": pm})
    allowed = _split_env(ENV_LOAD)
    blocked = _split_env(ENV_DISABLE) or set()
    pm._cellscribe_meta = {}  # type: ignore[attr-defined]
    for name, value, dist, version in _discover():
        if name in blocked or dist in blocked:
            log.info("plugin %s blocked by %s", name, ENV_DISABLE)
            continue
        builtin = dist == BUILTIN_DIST
        if not builtin and allowed is not None and name not in allowed and dist not in allowed:
            log.info("external plugin %s not loaded (%s is set)", name, ENV_LOAD)
            continue
        if pm.has_plugin(name):
            continue
        module_name, _, attr = value.partition(":")
        obj = importlib.import_module(module_name)
        if attr:
            obj = functools.reduce(getattr, attr.split("."), obj)
        pm.register(obj, name=name)
        pm._cellscribe_meta[name] = ("built-in" if builtin else dist, version)  # type: ignore[attr-defined]
    for name, plugin in extra:
        pm.register(plugin, name=name)
        pm._cellscribe_meta[name] = ("given", "")  # type: ignore[attr-defined]
    pm.check_pending()
    return pm


def build_registry(pm: pluggy.PluginManager) -> Registry:
    """Call every registration hook, one implementation at a time so each entry records its plugin."""
    registry = Registry()
    for hook_name, (kind, protocol, methods) in KINDS.items():
        caller = getattr(pm.hook, hook_name)
        # pluggy lists implementations in call order reversed; register in call order (built-ins with
        # trylast end up last, so third-party components are asked first by ``backend_for``).
        for impl in reversed(caller.get_hookimpls()):

            def register(component: Any, _plugin: str = impl.plugin_name) -> None:
                registry.add(kind, component, _plugin, protocol, methods)

            impl.function(register=register)
    return registry


@attrs.define
class Host:
    """A plugin manager together with its registry."""

    pm: pluggy.PluginManager
    registry: Registry

    @property
    def hook(self) -> Any:
        return self.pm.hook

    def plugins(self) -> list[PluginInfo]:
        """Every loaded plugin with what it provides, its version and origin."""
        meta = getattr(self.pm, "_cellscribe_meta", {})
        provides: dict[str, list[str]] = {}
        for by_name in self.registry.entries.values():
            for entry in by_name.values():
                provides.setdefault(entry.plugin, []).append(f"{entry.kind}:{entry.name}")
        for hook_name, caller in vars(self.pm.hook).items():  # every run-time hook, plugin-added ones too
            if hook_name in KINDS or hook_name == "cellscribe_addhooks" or not hook_name.startswith("cellscribe_"):
                continue
            for impl in caller.get_hookimpls():
                provides.setdefault(impl.plugin_name, []).append(f"hook:{hook_name}")
        infos = []
        for name, plugin in self.pm.list_name_plugin():
            origin, version = meta.get(name, ("given", ""))
            module = getattr(plugin, "__name__", type(plugin).__module__)
            infos.append(PluginInfo(name, module, version, origin, tuple(provides.get(name, ()))))
        return infos


_HOST: Host | None = None


def get_host() -> Host:
    """The process-wide host, created on first use."""
    global _HOST
    if _HOST is None:
        pm = create_plugin_manager()
        _HOST = Host(pm, build_registry(pm))
    return _HOST


def set_host(host: Host | None) -> Host | None:
    """Replace the process-wide host (tests); returns the previous one."""
    global _HOST
    previous, _HOST = _HOST, host
    return previous


def make_host(extra: Iterable[tuple[str, Any]] = ()) -> Host:
    """A fresh host with discovered plugins plus ``extra`` ``(name, plugin)`` pairs."""
    pm = create_plugin_manager(extra)
    return Host(pm, build_registry(pm))


Registrar = Callable[[Any], None]
