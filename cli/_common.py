"""What the commands share: errors as one line, ``KEY=VALUE`` options, plugin-added options, and the
run parameters' flags made from the run specification (:mod:`cellscribe.core.spec`)."""

from __future__ import annotations

import functools
import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import click

from ..core.spec import Flag, parameters


def friendly_errors(func):
    """Show expected errors (bad input, a file that cannot be read or written, a checkpoint folder in
    use) as one clear message instead of a traceback (exit status 1)."""
    from ..core.plugins import PluginError
    from ..core.run.checkpoint import CheckpointInUse
    from ..core.types import ModelUnavailableError

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except (ValueError, KeyError, TypeError, OSError, PluginError, CheckpointInUse, ModelUnavailableError) as exc:
            message = exc.args[0] if isinstance(exc, KeyError) and exc.args else str(exc)
            raise click.ClickException(" ".join(str(message).split())) from exc

    return wrapper


def parse_pairs(pairs: Iterable[str], flag: str) -> dict[str, Any]:
    """``KEY=VALUE`` strings to a dict; values parsed as JSON when they are (numbers, true/false)."""
    out: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise click.BadParameter(f"expected KEY=VALUE, got {pair!r}", param_hint=flag)
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


class PluginOptions(list):
    """The options plugins add to a command (``cellscribe_cli_options`` of ``command``): those of the
    imported plugins; :class:`PluginCommand` adds those of plugins imported on demand when needed."""

    def __init__(self, command: str, options: Iterable[click.Option]) -> None:
        super().__init__(options)
        self.command = command


def plugin_options(command: str) -> PluginOptions:
    """The options the imported plugins add to ``command`` (``cellscribe_cli_options``)."""
    from ..core.plugins import get_host

    return PluginOptions(command, get_host().cli_options(command, deferred=False))


class PluginCommand(click.Command):
    """A command with plugin-added options (``plugin_params``, also among ``params``). A plugin not
    imported yet that declares options for the command is imported, and its options added, only when
    the command line holds an option the command does not know or asks for help: a run that names none
    of its options never imports it."""

    def __init__(self, *args: Any, plugin_params: PluginOptions, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.plugin_params = plugin_params

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        from ..core.plugins import get_host

        host = get_host()
        if host.has_deferred_options(self.plugin_params.command) and self._names_unknown_option(ctx, args):
            known = {p.name for p in self.params}
            added = [o for o in host.cli_options(self.plugin_params.command, deferred=True) if o.name not in known]
            self.plugin_params.extend(added)
            self.params.extend(added)
        return super().parse_args(ctx, args)

    def _names_unknown_option(self, ctx: click.Context, args: list[str]) -> bool:
        names = {n for p in self.get_params(ctx) for n in (*p.opts, *p.secondary_opts)}
        for arg in args:
            if arg == "--":
                break
            if arg in ctx.help_option_names or (arg.startswith("-") and arg != "-" and arg.split("=", 1)[0] not in names):
                return True
        return False


def split_plugin_values(kwargs: dict[str, Any], plugin_params: list[click.Option]) -> dict[str, Any]:
    """Remove the plugin-added options from ``kwargs``; return those that were set (not ``None``)."""
    values = {p.name: kwargs.pop(p.name, None) for p in plugin_params}
    return {name: value for name, value in values.items() if value is not None}


_TYPES = {
    "str": None,
    "int": int,
    "float": float,
    "file": click.Path(exists=True, dir_okay=False),
    "path": click.Path(dir_okay=False),
    "dir": click.Path(file_okay=False),
}


def flag_option(name: str, flag: Flag, default: Any) -> click.Option:
    """The ``click.Option`` of one run parameter, as its :class:`~cellscribe.core.spec.Flag` declares."""
    kwargs: dict[str, Any] = {"help": flag.help, "show_default": flag.show_default}
    if flag.kind == "flag":
        kwargs.update(is_flag=True, default=bool(default))
    elif flag.kind == "switch":
        kwargs.update(default=default)
    elif flag.kind in ("pairs", "multiple"):
        kwargs.update(multiple=True, default=() if default is None else (default,),
                      metavar=flag.metavar or ("KEY=VALUE" if flag.kind == "pairs" else None))
    else:
        kind = click.Choice(list(flag.choices)) if flag.type == "choice" else _TYPES[flag.type]
        kwargs.update(type=kind, default=default, metavar=flag.metavar)
    return click.Option([*flag.decls, name], **kwargs)


def run_options(names: Iterable[str] | None = None) -> list[click.Option]:
    """The flags of the run parameters ``names`` (default: all), made from their declarations."""
    wanted = None if names is None else set(names)
    return [flag_option(a.name, a.metadata["flag"], a.default) for _, a in parameters()
            if wanted is None or a.name in wanted]


def run_values(kw: dict[str, Any], names: Iterable[str] | None = None) -> dict[str, Any]:
    """Take the run parameters' values out of a command's keywords: ``KEY=VALUE`` pairs become dicts,
    repeated values tuples, unset values their default."""
    wanted = None if names is None else set(names)
    out = {}
    for _, a in parameters():
        if (wanted is not None and a.name not in wanted) or a.name not in kw:
            continue
        flag, value = a.metadata["flag"], kw.pop(a.name)
        out[a.name] = parse_pairs(value, flag.decls[0]) if flag.kind == "pairs" else value
    return out


def read_candidates(values: Iterable[str], path: str | None) -> list[str] | None:
    """The labels of ``--candidate`` and of ``--candidates-file`` (one per line); duplicates refused."""
    labels = list(values)
    if path:
        try:
            text = Path(path).read_text(encoding="utf-8")
        except UnicodeDecodeError:
            raise click.BadParameter(f"{path} is not a UTF-8 text file (one label per line)",
                                     param_hint="--candidates-file") from None
        found = [line.strip() for line in text.splitlines() if line.strip()]
        if not found:
            raise click.BadParameter(f"{path} holds no label; write one label per line",
                                     param_hint="--candidates-file")
        labels += found
    if len(set(labels)) != len(labels):
        dupes = sorted({x for x in labels if labels.count(x) > 1})
        raise click.BadParameter(f"duplicate candidate labels: {dupes}", param_hint="--candidate")
    return labels or None


def parse_adapters(values: Iterable[str], modalities: list[str]) -> dict[str, str]:
    """``--adapter`` values to ``{modality: path}``: ``MODALITY=PATH``, or a bare PATH for one modality."""
    from ..core.plugins import get_host

    adapters: dict[str, str] = {}
    for value in values:
        name, sep, path = value.partition("=")
        if sep and name in modalities:
            adapters[name] = path
        elif sep and name in get_host().registry.names("modality"):
            raise click.BadParameter(
                f"{value!r} is an adapter for modality {name!r}, which is not annotated here; add "
                f"--modality {name} or drop the adapter",
                param_hint="--adapter",
            )
        elif len(modalities) == 1:
            adapters[modalities[0]] = value
        else:
            raise click.BadParameter(
                f"{value!r}: with several --modality, write MODALITY=PATH (one of {', '.join(modalities)})",
                param_hint="--adapter",
            )
    return adapters
