"""The architecture rules, checked: import direction, plugin registration, CLI coverage, lazy imports."""

from __future__ import annotations

import ast
import inspect
import os
import subprocess
import sys
from pathlib import Path

import attrs
import pluggy
import pytest

import cellscribe
from cellscribe import hookimpl
from cellscribe.core import hookspecs, plugins
from cellscribe.core.components import KINDS

ROOT = Path(cellscribe.__file__).parent
PLUGIN_DIRS = sorted(p for p in (ROOT / "plugins").iterdir() if (p / "__init__.py").exists())


def _imports(path: Path) -> list[tuple[int, str]]:
    """(relative level, absolute-or-relative module) for every import in a file."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(0, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            found.append((node.level, node.module or ""))
    return found


def _resolve(path: Path, level: int, module: str) -> str:
    """The absolute ``cellscribe.…`` name of an import in ``path``."""
    if level == 0:
        return module
    parts = ["cellscribe", *path.relative_to(ROOT).with_suffix("").parts]
    if path.name == "__init__.py":
        parts = parts[:-1]
    else:
        parts = parts[:-1]
    base = parts[: len(parts) - (level - 1)]
    return ".".join(base + ([module] if module else []))


@pytest.mark.parametrize("plugin_dir", PLUGIN_DIRS, ids=lambda p: p.name)
def test_plugins_never_import_each_other(plugin_dir):
    own = f"cellscribe.plugins.{plugin_dir.name}"
    for path in plugin_dir.rglob("*.py"):
        for level, module in _imports(path):
            name = _resolve(path, level, module)
            if name.startswith("cellscribe.plugins"):
                assert name == own or name.startswith(own + "."), f"{path} imports {name}"
            if name.startswith("cellscribe.") and not name.startswith("cellscribe.plugins"):
                assert name.startswith("cellscribe.core"), f"{path} imports {name}: plugins use core only"


def test_core_imports_no_plugin_and_no_top_layer():
    for path in (ROOT / "core").rglob("*.py"):
        for level, module in _imports(path):
            name = _resolve(path, level, module)
            assert not name.startswith("cellscribe.plugins"), f"{path} imports plugin {name}"
            for top in ("cellscribe.cli", "cellscribe.tl", "cellscribe.pl", "cellscribe.cli_eval"):
                assert not name.startswith(top), f"{path} imports {top}: core sits below the CLI and tl"


def test_every_builtin_plugin_is_an_entry_point(host):
    declared = dict(plugins._pyproject_entry_points())
    assert set(declared.values()) == {f"cellscribe.plugins.{p.name}" for p in PLUGIN_DIRS}
    infos = {i.name: i for i in host.plugins()}
    for name in declared:
        assert infos[name].origin == "built-in"
        assert infos[name].provides, f"plugin {name} registers nothing"


def test_hookspecs_are_documented():
    import importlib

    modules = [hookspecs] + [
        importlib.import_module(f"cellscribe.plugins.{p.name}.hookspecs") for p in PLUGIN_DIRS
        if (p / "hookspecs.py").exists()
    ]
    specs = [f for m in modules for n, f in vars(m).items() if n.startswith("cellscribe_") and callable(f)]
    assert len(specs) >= 10
    for spec in specs:
        doc = inspect.getdoc(spec)
        assert doc and len(doc) > 80, f"{spec.__name__} needs a real docstring"
        assert ":param" in doc or ":return" in doc
        sig = inspect.signature(spec)
        assert all(p.annotation is not inspect.Parameter.empty for p in sig.parameters.values())


def test_a_plugin_adds_its_own_hooks(host):
    """markers owns cellscribe_marker_knowledge (cellscribe_addhooks); core declares no hook only one
    plugin uses."""
    from cellscribe.plugins.markers import hookspecs as marker_specs

    assert not hasattr(hookspecs, "cellscribe_marker_knowledge")
    assert host.hook.cellscribe_marker_knowledge.spec.namespace is marker_specs

    class Knows:
        @hookimpl
        def cellscribe_marker_knowledge(self, tissue):
            return None

    with_markers = plugins.make_host(extra=[("knows", Knows())])
    assert "hook:cellscribe_marker_knowledge" in {i.name: i for i in with_markers.plugins()}["knows"].provides
    os.environ["CELLSCRIBE_DISABLE_PLUGINS"] = "markers"
    try:  # without the plugin that owns the hook, implementing it is an unknown hook
        with pytest.raises(pluggy.PluginValidationError, match="unknown hook"):
            plugins.make_host(extra=[("knows", Knows())])
    finally:
        del os.environ["CELLSCRIBE_DISABLE_PLUGINS"]


def test_misspelled_hook_is_caught():
    class Typo:
        @hookimpl
        def cellscribe_register_modalitys(self, register):  # missing "ie"
            pass

    with pytest.raises(pluggy.PluginValidationError, match="unknown hook"):
        plugins.make_host(extra=[("typo", Typo())])


def test_register_validates_components():
    class NoName:
        @hookimpl
        def cellscribe_register_modalities(self, register):
            register(object())

    with pytest.raises(plugins.PluginError, match="without a 'name'"):
        plugins.make_host(extra=[("bad", NoName())])

    class Duplicate:
        @hookimpl
        def cellscribe_register_prompt_strategies(self, register):
            class P:
                name = "zero-shot"
                description = "clash"
                default_decoder = "cellreasoner"

                def build(self, sentences, **kw):
                    return []

            register(P())

    with pytest.raises(plugins.PluginError, match="registered twice"):
        plugins.make_host(extra=[("dup", Duplicate())])


def test_disable_env_blocks_a_builtin(monkeypatch):
    monkeypatch.setenv("CELLSCRIBE_DISABLE_PLUGINS", "rna")
    host = plugins.make_host()
    assert "rna" not in host.registry.names("modality")
    with pytest.raises(plugins.PluginError, match="unknown modality 'rna'"):
        host.registry.get("modality", "rna")


def test_run_parameters_are_declared_once_and_everything_is_made_from_them():
    """core/spec.py declares each run parameter (default, check, doc, flag); tl.annotate's signature
    and docstring, the CLI's flags and help, and the load options are derived from it."""
    from click.testing import CliRunner

    from cellscribe import cli, tl
    from cellscribe.core import models, spec

    declared = [a for _, a in spec.parameters()]
    names = [a.name for a in declared]
    assert list(inspect.signature(tl.annotate).parameters) == ["data", *names, "copy"]
    for a in declared:
        assert f"\n    {a.name}\n" in tl.annotate.__doc__, f"tl.annotate's docstring lacks {a.name}"
        assert inspect.signature(tl.annotate).parameters[a.name].default == a.default
    help_text = CliRunner().invoke(cli.main, ["annotate", "--help"], terminal_width=200).output
    for a in declared:
        flag = a.metadata["flag"]
        for name in flag.decls[0].split("/"):
            assert name in help_text, f"tl.annotate({a.name}=...) has no CLI flag {name}"
        assert " ".join(flag.help.split()[:4]) in " ".join(help_text.split()), f"{flag.decls[0]} lost its help"
    assert list(models.LOAD_OPTIONS) == [a.name for a in attrs.fields(spec.ModelSpec) if a.name != "model"]
    assert set(cli._run.NOT_FLAGS) == {"data", "copy"}


def test_run_modules_do_not_repeat_the_run_parameters():
    """No function outside core/spec.py spells out the run's keyword list again (a tool that shares a
    few, such as tl.transfer_labels's data keywords, is not a run)."""
    from cellscribe.core import spec

    names = {a.name for _, a in spec.parameters()}
    for path in [*ROOT.glob("*.py"), *(ROOT / "core").rglob("*.py"), *(ROOT / "cli").rglob("*.py")]:
        if path.name == "spec.py":
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                args = {a.arg for a in node.args.args + node.args.kwonlyargs}
                assert len(args & names) <= 11, f"{path.name}:{node.lineno} {node.name}() lists run parameters"


def test_core_has_at_most_12_modules_at_its_top_level():
    modules = sorted(p.name for p in (ROOT / "core").glob("*.py"))
    assert len(modules) <= 12, modules
    folders = sorted(p.name for p in (ROOT / "core").iterdir() if (p / "__init__.py").exists())
    assert folders == ["domain", "evaluation", "run"]


def test_capabilities_are_declared_not_probed():
    """Optional members are declared, with defaults, on the component protocols (core/components.py);
    nothing else asks a component whether it has one."""
    import re

    from cellscribe.core import components

    optional = {name for protocol in components._REQUIRED for name in components.optional_members(protocol)}
    assert {"mudata_keys", "decode_modes", "use_assay", "sentence_preferences", "needs_labels"} <= optional
    probe = re.compile(r"(?:getattr|hasattr)\([^)]*[\"']({})[\"']".format("|".join(sorted(optional))))
    for path in [*ROOT.glob("*.py"), *(ROOT / "core").rglob("*.py"), *(ROOT / "cli").rglob("*.py")]:
        if path.name == "components.py":
            continue
        found = probe.search(path.read_text(encoding="utf-8"))
        assert found is None, f"{path.relative_to(ROOT)} probes {found.group(1)!r}: read the attribute"


def test_heavy_libraries_load_lazily():
    code = (
        "import sys, cellscribe, cellscribe.cli\n"
        "from cellscribe.core.plugins import get_host\n"
        "get_host()\n"
        "heavy = [m for m in ('torch', 'transformers', 'scanpy', 'snapatac2', 'peft') if m in sys.modules]\n"
        "print(','.join(heavy))\n"
    )
    env = {**os.environ, "CELLSCRIBE_LOAD_PLUGINS": ""}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    assert out.stdout.strip() == "", f"imported at start-up: {out.stdout}"


def test_plugins_imported_on_demand_provide_what_they_declare():
    """Every built-in declaration (cellscribe.provides) names exactly the components, reader file
    endings, hooks and option-taking commands its plugin registers once imported."""
    import importlib

    declared = dict(plugins._pyproject_entry_points(plugins.PROVIDES_GROUP))
    assert {"atac", "transformers", "openai", "finetune", "ray"} <= set(declared)
    host = plugins.make_host()
    assert set(declared) <= set(host.registry.deferred), "declared plugins are not imported at start-up"
    host.load_all()
    for name, reference in declared.items():
        module, _, attr = reference.partition(":")
        declaration = getattr(importlib.import_module(module), attr)
        for kind in host.registry.entries:
            registered = sorted(n for n, e in host.registry.entries[kind].items() if e.plugin == name)
            assert registered == sorted(declaration.get(kind, [])), f"{name} registers {kind}s {registered}"
        suffixes = sorted(s for r in host.registry.entries["reader"].values() if r.plugin == name
                          for s in r.component.suffixes)
        assert suffixes == sorted(declaration.get("reader_suffixes", []))
        implemented = {h for h, caller in vars(host.pm.hook).items() if h.startswith("cellscribe_")
                       and h not in KINDS and any(i.plugin_name == name for i in caller.get_hookimpls())}
        assert implemented == set(declaration.get("hooks", [])), f"{name} implements {implemented}"
        options = [i.function for i in host.pm.hook.cellscribe_cli_options.get_hookimpls() if i.plugin_name == name]
        commands = {c for c in ("annotate", "sentences", "activity", "transfer", "finetune", "export", "plugins")
                    if any(f(command=c) for f in options)}
        assert commands == set(declaration.get("cli_options", [])), f"{name} adds options to {commands}"


@pytest.mark.slow
def test_an_rna_run_imports_no_plugin_it_does_not_use(pancreas_path, tmp_path):
    """cellscribe annotate on an .h5ad with the markers model imports neither the ATAC plugin nor the model
    backends it does not use; an ATAC option on the command line imports the ATAC plugin for it."""
    code = (
        "import sys\n"
        "from cellscribe.cli import main\n"
        "try:\n"
        "    main(sys.argv[1:])\n"
        "except SystemExit as exit:\n"
        "    assert not exit.code, exit.code\n"
        "names = ('atac', 'transformers', 'openai', 'finetune', 'ray')\n"
        "print('imported:' + ','.join(n for n in names if f'cellscribe.plugins.{n}' in sys.modules))\n"
    )
    env = {**os.environ, "CELLSCRIBE_LOAD_PLUGINS": ""}
    run = ["annotate", str(pancreas_path), "-o", str(tmp_path / "out.h5ad"), "--limit", "20", "--no-progress"]
    out = subprocess.run([sys.executable, "-c", code, *run], capture_output=True, text=True, env=env)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == "imported:"
    out = subprocess.run([sys.executable, "-c", code, *run, "--force", "--promoter", "1000"], capture_output=True,
                         text=True, env=env)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == "imported:atac"


ANSWER_TAGS = ("<think>", "</think>", "<answer>", "</answer>")


def _code_strings(path: Path) -> list[tuple[int, str]]:
    """String constants of a module that are not docstrings."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    docstrings = {
        id(node.body[0].value)
        for node in ast.walk(tree)
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))
        and node.body and isinstance(node.body[0], ast.Expr) and isinstance(node.body[0].value, ast.Constant)
    }
    return [
        (node.lineno, node.value)
        for node in ast.walk(tree)
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings
    ]


def test_the_answer_grammar_has_one_owner():
    """Only core/answers.py spells the answer tags in code. Prose that names a tag (published prompt
    texts, descriptions: several words beside the tags) is not grammar."""
    for path in [*(ROOT / "core").rglob("*.py"), *(ROOT / "plugins").rglob("*.py")]:
        if path == ROOT / "core" / "answers.py":
            continue
        for line, text in _code_strings(path):
            words = text
            for tag in ANSWER_TAGS:
                words = words.replace(tag, " ")
            if any(tag in text for tag in ANSWER_TAGS) and len(words.split()) < 4:
                pytest.fail(f"{path.relative_to(ROOT)}:{line} spells an answer tag ({text!r}); use cellscribe.core.answers")


def test_no_component_is_chosen_by_comparing_its_name():
    for path in [*(ROOT / "core").rglob("*.py"), *(ROOT / "plugins").rglob("*.py")]:
        source = path.read_text(encoding="utf-8")
        for needle in ('.decoder == "', ".decoder == '", '.strategy == "'):
            assert needle not in source, f"{path.relative_to(ROOT)} compares a component's name ({needle}...)"


def test_tools_have_scanpy_signatures():
    """scanpy's rule (its tests/test_package_structure.py): at most two positional arguments, then
    keyword-only ones; key_added and copy, where present, are keyword-only and copy defaults to False."""
    from cellscribe import tl

    for name in tl.__all__:
        params = inspect.signature(getattr(tl, name)).parameters.values()
        positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
        assert len(positional) <= 2, f"tl.{name} takes {len(positional)} positional arguments"
        for p in params:
            if p.name in ("key_added", "copy"):
                assert p.kind is p.KEYWORD_ONLY, f"tl.{name}({p.name}) must be keyword-only"
            if p.name == "copy":
                assert p.default is False


def test_nothing_imports_the_old_pipeline_module():
    """core/pipeline.py only re-exports core.run for code written before the move."""
    for path in [*ROOT.glob("*.py"), *(ROOT / "core").rglob("*.py"), *(ROOT / "plugins").rglob("*.py"),
                 *(ROOT / "cli").rglob("*.py"), *(ROOT / "tests").glob("*.py"), *(ROOT / "benchmarks").glob("*.py"),
                 *(ROOT / "examples").rglob("*.py")]:
        if path.name == "pipeline.py":
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom):
                names = [(node.module or "") + "." + alias.name for alias in node.names]
            elif isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            else:
                continue
            assert not any(n.endswith("core.pipeline") or ".core.pipeline." in n for n in names), (
                f"{path.relative_to(ROOT)}:{node.lineno} imports core.pipeline; use cellscribe.core.run"
            )
