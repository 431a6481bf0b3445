"""The plugin manager and the registry of the components plugins provide.

Plugins are found through the ``cellscribe`` entry-point group. The built-in ones declare the same group
in cellscribe's own ``pyproject.toml``, so they load exactly like third-party plugins.

Plugins imported on demand: a plugin may declare what it provides in the ``cellscribe.provides``
entry-point group, under its own entry-point name, as a reference to a plain mapping in a module that is
cheap to import (never the plugin's own package, whose import is what is saved)::

    [project.entry-points."cellscribe.provides"]
    adt = "cellscribe_adt_meta:PROVIDES"

    PROVIDES = {"modality": ["adt"], "hooks": ["cellscribe_cli_options"], "cli_options": ["annotate"]}

Keys: a component kind (``reader``, ``modality``, ``sentence``, ``prompt``, ``backend``, ``decoder``,
``format``, ``trainer``, ``executor``) with the names it registers; ``reader_suffixes``, the file
endings of its readers; ``hooks``, the other hooks it implements; ``cli_options``, the commands it adds
options to. Such a plugin is imported the first time a run asks for one of its components or hooks (the
registry, :attr:`Host.hook`); a run that uses none of them never imports it. A plugin without a
declaration, or with one the host cannot read, is imported when the manager is made, as before; so is
one that implements ``cellscribe_addhooks`` (other plugins' hooks are checked against the hooks it
adds). ``cellscribe plugins`` imports every plugin.

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
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import attrs
import pluggy

from . import hookspecs
from .components import KINDS, with_defaults

log = logging.getLogger(__name__)

GROUP = "cellscribe"
PROVIDES_GROUP = "cellscribe.provides"
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


@attrs.frozen
class Deferred:
    """A discovered plugin not imported yet, and what it declares it provides (see the module
    docstring): component names by kind, reader file endings, other hooks, commands it adds options to."""

    name: str
    value: str
    origin: str
    version: str
    components: dict[str, tuple[str, ...]]
    reader_suffixes: tuple[str, ...] = ()
    hooks: tuple[str, ...] = ()
    cli_options: tuple[str, ...] = ()

    def provides(self, kind: str, name: str | None = None) -> bool:
        names = self.components.get(kind, ())
        return bool(names) if name is None else name in names


@attrs.define
class Registry:
    """Components by kind and name, filled by the registration hooks. Components of plugins not
    imported yet (``deferred``) are imported through ``load`` when first asked for."""

    entries: dict[str, dict[str, Entry]] = attrs.field(factory=lambda: {k[0]: {} for k in KINDS.values()})
    deferred: dict[str, Deferred] = attrs.field(factory=dict)
    load: Callable[[str], None] | None = None

    def require(self, kind: str, name: str | None = None) -> None:
        """Import the deferred plugins that provide ``kind`` components (the one named ``name``)."""
        for plugin in [d.name for d in self.deferred.values() if d.provides(kind, name)]:
            if plugin in self.deferred and self.load is not None:
                self.load(plugin)

    def readers_for(self, path: str) -> dict[str, Any]:
        """Every reader, after importing the deferred plugins whose readers may read ``path`` (those
        that declare a matching file ending, or none)."""
        name = str(path).lower()
        for d in list(self.deferred.values()):
            may = not d.reader_suffixes or any(name.endswith(x) for x in d.reader_suffixes)
            if d.provides("reader") and may and self.load is not None:
                self.load(d.name)
        return {n: e.component for n, e in self.entries["reader"].items()}

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
        if name not in self.entries[kind]:
            self.require(kind, name)
        try:
            return self.entries[kind][name].component
        except KeyError:
            choices = ", ".join(sorted(self.names(kind))) or "none"
            raise PluginError(
                f"unknown {kind} {name!r}; available: {choices}. "
                "Run `cellscribe plugins` to see what each installed plugin provides."
            ) from None

    def names(self, kind: str) -> list[str]:
        """The names of the ``kind`` components, those of plugins not imported yet included."""
        later = [n for d in self.deferred.values() for n in d.components.get(kind, ()) if n not in self.entries[kind]]
        return list(self.entries[kind]) + list(dict.fromkeys(later))

    def all(self, kind: str) -> dict[str, Any]:
        self.require(kind)
        return {name: e.component for name, e in self.entries[kind].items()}

    def backend_for(self, spec: str) -> Any:
        """The backend for a ``model=`` string: exact name, then ``name:`` prefix, then ``handles``."""
        prefix = spec.split(":", 1)[0]
        for name in (spec, prefix) if ":" in spec else (spec,):
            if name not in self.entries["backend"]:
                self.require("backend", name)
        backends = self.entries["backend"]
        if spec in backends:
            return backends[spec].component
        if ":" in spec and prefix in backends:
            return backends[prefix].component
        self.require("backend")
        backends = self.entries["backend"]
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


def _pyproject_entry_points(group: str = GROUP) -> list[tuple[str, str]]:
    """The built-in entry points of ``group`` declared in our own pyproject.toml.

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
    return list(table.get("project", {}).get("entry-points", {}).get(group, {}).items())


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


def _declarations() -> dict[tuple[str, str], str]:
    """``(distribution, entry-point name) -> reference`` of every ``cellscribe.provides`` entry point."""
    found = {}
    for ep in importlib.metadata.entry_points(group=PROVIDES_GROUP):
        found[(ep.dist.name if ep.dist is not None else "unknown", ep.name)] = ep.value
    if not any(d == BUILTIN_DIST for d, _ in found):
        found.update({(BUILTIN_DIST, n): v for n, v in _pyproject_entry_points(PROVIDES_GROUP)})
    return found


_KIND_NAMES = {kind for kind, _, _ in KINDS.values()}
_DECLARED = _KIND_NAMES | {"reader_suffixes", "hooks", "cli_options"}


def _deferred(name: str, value: str, origin: str, version: str, reference: str | None) -> Deferred | None:
    """The plugin's declaration read (its module imported, not the plugin's), or ``None`` when it has
    none, it cannot be read, or the plugin must be imported now (it adds hooks)."""
    if reference is None:
        return None
    try:
        module_name, _, attr = reference.partition(":")
        declared = importlib.import_module(module_name)
        if attr:
            declared = functools.reduce(getattr, attr.split("."), declared)
        unknown = set(declared) - _DECLARED
        if unknown:
            raise ValueError(f"unknown key(s) {sorted(unknown)}")
        if any(isinstance(v, str) or not all(isinstance(x, str) for x in v) for v in declared.values()):
            raise ValueError("every value must be a list of strings")
        listed = {k: tuple(v) for k, v in declared.items()}
    except Exception as exc:  # noqa: BLE001 - a bad declaration only costs the import it would save
        log.warning("plugin %s: cannot read what it provides from %s (%s); it is imported now", name, reference, exc)
        return None
    hooks = listed.get("hooks", ())
    if "cellscribe_addhooks" in hooks:
        return None
    return Deferred(name, value, origin, version, {k: v for k, v in listed.items() if k in _KIND_NAMES},
                    listed.get("reader_suffixes", ()), hooks, listed.get("cli_options", ()))


def _import_plugin(value: str) -> Any:
    module_name, _, attr = value.partition(":")
    obj = importlib.import_module(module_name)
    if attr:
        obj = functools.reduce(getattr, attr.split("."), obj)
    return obj


def create_plugin_manager(extra: Iterable[tuple[str, Any]] = ()) -> pluggy.PluginManager:
    """A new plugin manager with the built-in and allowed external plugins loaded and checked; those
    that declare what they provide are kept in ``pm._cellscribe_deferred``, imported when needed
    (:class:`Host`).

    ``extra``: ``(name, plugin)`` pairs registered after discovery (tests, notebooks).
    """
    pm = pluggy.PluginManager(GROUP)
    pm.add_hookspecs(hookspecs)
    # Plugins registered from now on may add hook specifications of their own.
    pm.hook.cellscribe_addhooks.call_historic(kwargs={"pluginmanager": pm})
    allowed = _split_env(ENV_LOAD)
    blocked = _split_env(ENV_DISABLE) or set()
    pm._cellscribe_meta = {}  # type: ignore[attr-defined]
    deferred: dict[str, Deferred] = {}
    pm._cellscribe_deferred = deferred  # type: ignore[attr-defined]
    order: list[str] = []  # plugins in the order found (``cellscribe plugins`` lists them so)
    pm._cellscribe_order = order  # type: ignore[attr-defined]
    declarations = _declarations()
    for name, value, dist, version in _discover():
        if name in blocked or dist in blocked:
            log.info("plugin %s blocked by %s", name, ENV_DISABLE)
            continue
        builtin = dist == BUILTIN_DIST
        if not builtin and allowed is not None and name not in allowed and dist not in allowed:
            log.info("external plugin %s not loaded (%s is set)", name, ENV_LOAD)
            continue
        if pm.has_plugin(name) or name in deferred:
            continue
        order.append(name)
        origin = "built-in" if builtin else dist
        later = _deferred(name, value, origin, version, declarations.get((dist, name)))
        if later is not None:
            deferred[name] = later
            continue
        pm.register(_import_plugin(value), name=name)
        pm._cellscribe_meta[name] = (origin, version)  # type: ignore[attr-defined]
    for name, plugin in extra:
        deferred.pop(name, None)  # a plugin given under a discovered plugin's name replaces it
        pm.register(plugin, name=name)
        pm._cellscribe_meta[name] = ("given", "")  # type: ignore[attr-defined]
    pm.check_pending()
    return pm


def build_registry(pm: pluggy.PluginManager, registry: Registry | None = None, *,
                   plugins: Iterable[str] | None = None) -> Registry:
    """Call every registration hook, one implementation at a time so each entry records its plugin
    (only the implementations of ``plugins``, into ``registry``, when given: a plugin imported later)."""
    registry = Registry(deferred=dict(getattr(pm, "_cellscribe_deferred", {}))) if registry is None else registry
    only = None if plugins is None else set(plugins)
    for hook_name, (kind, protocol, methods) in KINDS.items():
        caller = getattr(pm.hook, hook_name)
        # pluggy lists implementations in call order reversed; register in call order (built-ins with
        # trylast end up last, so third-party components are asked first by ``backend_for``).
        impls = list(reversed(caller.get_hookimpls()))
        for impl in impls:
            if only is not None and impl.plugin_name not in only:
                continue

            def register(component: Any, _plugin: str = impl.plugin_name) -> None:
                registry.add(kind, component, _plugin, protocol, methods)

            impl.function(register=register)
        if only is not None and only & {impl.plugin_name for impl in impls}:
            # A plugin imported later takes the place pluggy's call order gives it.
            order = {impl.plugin_name: i for i, impl in enumerate(impls)}
            entries = registry.entries[kind]
            ordered = sorted(entries.items(), key=lambda item: order.get(item[1].plugin, -1))
            entries.clear()
            entries.update(ordered)
    return registry


class _Hooks:
    """The plugin manager's hook relay that first imports the deferred plugins implementing a hook."""

    def __init__(self, host: Host) -> None:
        self._host = host

    def __getattr__(self, name: str) -> Any:
        host = self._host
        for plugin in [d.name for d in host.registry.deferred.values() if name in d.hooks]:
            host.load(plugin)
        return getattr(host.pm.hook, name)


@attrs.define
class Host:
    """A plugin manager together with its registry (which imports deferred plugins through
    :meth:`load`)."""

    pm: pluggy.PluginManager
    registry: Registry

    def __attrs_post_init__(self) -> None:
        self.registry.load = self.load

    @property
    def hook(self) -> Any:
        """The hook relay (``host.hook.cellscribe_...(...)``); the plugins that declare the hook are
        imported first."""
        return _Hooks(self)

    def load(self, name: str) -> None:
        """Import the deferred plugin ``name``, register it and add its components to the registry."""
        deferred = self.registry.deferred.pop(name, None)
        if deferred is None or self.pm.has_plugin(name):
            return
        started = time.perf_counter()
        self.pm.register(_import_plugin(deferred.value), name=name)
        self.pm._cellscribe_meta[name] = (deferred.origin, deferred.version)  # type: ignore[attr-defined]
        self.pm.check_pending()
        build_registry(self.pm, self.registry, plugins=[name])
        log.debug("plugin %s imported on demand in %.3f s", name, time.perf_counter() - started)
        registered = {kind: {n for n, e in self.registry.entries[kind].items() if e.plugin == name}
                      for kind in self.registry.entries}
        undeclared = [f"{kind}:{n}" for kind, names in registered.items() for n in sorted(names)
                      if n not in deferred.components.get(kind, ())]
        if undeclared:
            log.warning("plugin %s registered %s, which it does not declare in %s: declare it, or a run may not "
                        "find it", name, ", ".join(undeclared), PROVIDES_GROUP)

    def load_all(self) -> None:
        """Import every deferred plugin."""
        for name in list(self.registry.deferred):
            self.load(name)

    def cli_options(self, command: str, *, deferred: bool) -> list[Any]:
        """The options plugins add to ``command`` (``cellscribe_cli_options``): those of the imported
        plugins, and with ``deferred`` also of those that declare options for it (imported now)."""
        if deferred:
            for plugin in [d.name for d in self.registry.deferred.values() if command in d.cli_options]:
                self.load(plugin)
        options: list[Any] = []
        for result in self.pm.hook.cellscribe_cli_options(command=command):
            options.extend(result or [])
        return options

    def has_deferred_options(self, command: str) -> bool:
        """Whether a plugin not imported yet declares options for ``command``."""
        return any(command in d.cli_options for d in self.registry.deferred.values())

    def plugins(self) -> list[PluginInfo]:
        """Every plugin (each deferred one imported now) with what it provides, its version and origin."""
        self.load_all()
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
        found = {name: i for i, name in enumerate(getattr(self.pm, "_cellscribe_order", []))}
        named = sorted(self.pm.list_name_plugin(), key=lambda item: found.get(item[0], len(found)))
        for name, plugin in named:
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
