"""Model manifests: named, validated descriptions of a released model or fine-tune.

A manifest says which base model to load, which modality it serves, which prompt strategy, sentence
strategy and decoder its inputs and outputs follow, which generation settings it was published with,
and optionally which LoRA adapter (a PEFT folder or hub id) goes on top of the base. With one, a user
writes ``model="cell-o1"`` instead of a hub id plus half a dozen matching settings.

Manifests are TOML (or JSON) files named ``<name>.toml`` (``<name>.json``)::

    name = "cell-o1"
    base_model = "ncbi/Cell-o1"
    modality = "rna"
    prompt = "puzzle"
    sentence = "top-expressed"
    n_genes = 50
    decoder = "cellpuzzles"
    description = "Cell-o1 (7B): CellPuzzles batch-level annotation with reasoning"
    source = "https://huggingface.co/ncbi/Cell-o1"

    [generation]
    do_sample = false
    max_new_tokens = 3500

Where they are found (:func:`manifest_dirs`): the manifests shipped with cellscribe
(``cellscribe/adapters/manifests``), then every folder listed in the environment variable
``CELLSCRIBE_MANIFESTS`` (separated by ``os.pathsep``). A later folder's manifest replaces an earlier
one of the same name, so a user can pin a shipped model to a local copy.

This module holds only data handling (attrs, tomllib, json): no model library is imported, so a backend
can resolve names in ``handles()`` cheaply.
"""

from __future__ import annotations

import json
import logging
import os
import re
import warnings
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import attrs

log = logging.getLogger(__name__)

__all__ = [
    "Manifest",
    "ENV_MANIFESTS",
    "SHIPPED_DIR",
    "manifest_dirs",
    "load_manifest",
    "list_manifests",
    "find_manifest",
]

#: Environment variable listing extra manifest folders (``os.pathsep``-separated).
ENV_MANIFESTS = "CELLSCRIBE_MANIFESTS"
#: The manifests shipped with cellscribe (package data of ``cellscribe.adapters``).
SHIPPED_DIR = Path(__file__).resolve().parents[2] / "adapters" / "manifests"
SUFFIXES = (".toml", ".json")
MODES = ("direct", "reasoning")

_NAME = re.compile(r"[a-z0-9][a-z0-9._-]*")
_SCALAR = (str, int, float, bool)
_HUB_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*")


# -- validators (messages name the field and what would be accepted) -------------------------------


def _check_name(inst: Any, attribute: attrs.Attribute, value: Any) -> None:
    if not isinstance(value, str) or not _NAME.fullmatch(value):
        raise ValueError(
            f"'name' must be lower-case letters, digits, '.', '_' or '-' (starting with a letter or "
            f"digit), like 'cell-o1'; got {value!r}"
        )


def _text(inst: Any, attribute: attrs.Attribute, value: Any) -> None:
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"{attribute.name!r} must be a non-empty string; got {value!r}")


def _optional_text(inst: Any, attribute: attrs.Attribute, value: Any) -> None:
    if value is not None:
        _text(inst, attribute, value)


def _string(inst: Any, attribute: attrs.Attribute, value: Any) -> None:
    if not isinstance(value, str):
        raise ValueError(f"{attribute.name!r} must be a string; got {type(value).__name__} {value!r}")


def _positive_int(inst: Any, attribute: attrs.Attribute, value: Any) -> None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
        raise ValueError(f"{attribute.name!r} must be a positive integer; got {value!r}")


def _mode(inst: Any, attribute: attrs.Attribute, value: Any) -> None:
    if value is not None and value not in MODES:
        raise ValueError(f"'mode' must be one of {', '.join(MODES)}; got {value!r}")


def _settings_table(inst: Any, attribute: attrs.Attribute, value: Any) -> None:
    """A flat table of settings: string keys, scalar values or lists of scalars."""
    for key, item in value.items():
        if not isinstance(key, str):
            raise ValueError(f"{attribute.name!r} keys must be strings; got {key!r}")
        items = item if isinstance(item, list) else [item]
        if not all(isinstance(v, _SCALAR) for v in items):
            raise ValueError(
                f"{attribute.name}.{key} must be a string, number, boolean or a list of them; got {item!r}"
            )


def _as_dict(value: Any) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise ValueError(f"expected a table (key = value pairs); got {type(value).__name__} {value!r}")
    return dict(value)


@attrs.frozen
class Manifest:
    """A named model: base model, optional LoRA adapter, and the settings its inputs must follow.

    Attributes
    ----------
    name
        What users pass as ``model=`` (lower case, ``[a-z0-9._-]``); the file must be ``<name>.toml``.
    base_model
        Hub id or local folder of the (full) model weights.
    modality
        The modality the model (or its adapter) was trained for (``"rna"``).
    prompt, sentence, decoder
        Registered prompt strategy, sentence strategy and decoder names its format uses (``None``:
        leave the run's choice).
    n_genes
        Genes per cell sentence the model was trained with (``None``: the strategy's default).
    mode
        ``"direct"`` or ``"reasoning"`` when the model has a preferred prompt mode.
    generation
        Generation settings it was published with (``GenerationConfig`` fields, ``max_prompt_tokens``);
        a user's settings override them.
    prompt_options, sentence_options
        Extra options for the prompt and sentence strategies.
    adapter
        Optional LoRA adapter (PEFT folder or hub id) loaded onto ``base_model`` for ``modality``. A
        relative folder is resolved against the manifest's own folder.
    revision
        Hub revision (branch, tag, commit) to pin ``base_model`` to.
    backend
        Registered backend that loads it (``"transformers"``).
    description, source
        One line for listings; where the model comes from (URL, paper).
    path
        The file it was read from (``None`` when built in code). Not compared.
    """

    name: str = attrs.field(validator=_check_name)
    base_model: str = attrs.field(validator=_text)
    modality: str = attrs.field(default="rna", validator=_text)
    prompt: str | None = attrs.field(default=None, validator=_optional_text)
    sentence: str | None = attrs.field(default=None, validator=_optional_text)
    n_genes: int | None = attrs.field(default=None, validator=_positive_int)
    mode: str | None = attrs.field(default=None, validator=_mode)
    decoder: str | None = attrs.field(default=None, validator=_optional_text)
    generation: Mapping[str, Any] = attrs.field(factory=dict, converter=_as_dict, validator=_settings_table)
    prompt_options: Mapping[str, Any] = attrs.field(
        factory=dict, converter=_as_dict, validator=_settings_table
    )
    sentence_options: Mapping[str, Any] = attrs.field(
        factory=dict, converter=_as_dict, validator=_settings_table
    )
    adapter: str | None = attrs.field(default=None, validator=_optional_text)
    revision: str | None = attrs.field(default=None, validator=_optional_text)
    backend: str = attrs.field(default="transformers", validator=_text)
    description: str = attrs.field(default="", validator=_string)
    source: str = attrs.field(default="", validator=_string)
    path: Path | None = attrs.field(default=None, eq=False, repr=False)

    @classmethod
    def fields_allowed(cls) -> list[str]:
        """The keys a manifest file may contain."""
        return [f.name for f in attrs.fields(cls) if f.name != "path"]

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any], path: str | Path | None = None) -> Manifest:
        """Build and validate a manifest from parsed TOML/JSON.

        A relative ``adapter`` folder is resolved against ``path``'s folder when it exists there.
        Raises ``ValueError`` naming the file, the problem and the accepted keys or values.
        """
        where = f"manifest {str(path)!r}" if path is not None else "manifest"
        if not isinstance(data, Mapping):
            raise ValueError(f"{where} must be a table of key = value pairs, got {type(data).__name__}")
        allowed = cls.fields_allowed()
        unknown = sorted(set(data) - set(allowed))
        if unknown:
            raise ValueError(
                f"{where} has unknown key(s) {', '.join(unknown)}; allowed keys: {', '.join(allowed)}"
            )
        missing = [k for k in ("name", "base_model") if k not in data]
        if missing:
            raise ValueError(f"{where} is missing required key(s) {', '.join(missing)}")
        values = dict(data)
        for key in ("generation", "prompt_options", "sentence_options"):
            if key in values and not isinstance(values[key], Mapping):
                raise ValueError(
                    f"invalid {where}: {key!r} must be a table of settings ([{key}] with key = value "
                    f"lines); got {values[key]!r}"
                )
        if path is not None:
            path = Path(path)
            adapter = values.get("adapter")
            if isinstance(adapter, str) and adapter.strip():
                values["adapter"] = _resolve_adapter(adapter, path.parent)
        try:
            manifest = cls(**values, path=path)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"invalid {where}: {exc}") from None
        if path is not None and path.stem != manifest.name:
            raise ValueError(
                f"{where} is named {manifest.name!r} but its file is {path.name!r}; rename the file to "
                f"{manifest.name}{path.suffix} (manifests are looked up by file name)"
            )
        return manifest

    def annotate_defaults(self) -> dict[str, Any]:
        """The ``tl.annotate`` keyword arguments this manifest sets (only those it names)."""
        out: dict[str, Any] = {}
        for key in ("prompt", "sentence", "n_genes", "mode"):
            value = getattr(self, key)
            if value is not None:
                out[key] = value
        for key in ("generation", "prompt_options", "sentence_options"):
            value = getattr(self, key)
            if value:
                out[key] = dict(value)
        return out

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable view (run parameters, ``cellscribe adapters --json``)."""
        out = attrs.asdict(self, filter=lambda a, v: a.name != "path")
        out["path"] = str(self.path) if self.path is not None else None
        return out

    def check_components(self, registry: Any) -> None:
        """Raise the registry's error when a named backend, strategy or decoder is not installed.

        ``registry`` is a plugin host's registry (``get_host().registry``).
        """
        for kind, value in (
            ("backend", self.backend),
            ("modality", self.modality),
            ("prompt", self.prompt),
            ("sentence", self.sentence),
            ("decoder", self.decoder),
        ):
            if value is not None:
                registry.get(kind, value)


def _resolve_adapter(adapter: str, folder: Path) -> str:
    """A folder relative to the manifest's folder when it exists there; else the text as given
    (an absolute path, a ``~`` path or a hub id)."""
    expanded = Path(adapter).expanduser()
    if expanded.is_absolute():
        return str(expanded)
    local = folder / expanded
    if local.exists() or not _HUB_ID.fullmatch(adapter):
        return str(local.resolve())
    return adapter


def _parse(path: Path) -> Any:
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".json":
        try:
            return json.loads(text)
        except json.JSONDecodeError as exc:
            raise ValueError(f"manifest {str(path)!r} is not valid JSON: {exc}") from None
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        try:
            import tomli as tomllib  # type: ignore[no-redef]
        except ModuleNotFoundError:
            raise ValueError(
                f"reading the TOML manifest {str(path)!r} needs Python 3.11+ or the 'tomli' package; "
                "install tomli or write the manifest as JSON"
            ) from None
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ValueError(f"manifest {str(path)!r} is not valid TOML: {exc}") from None


def load_manifest(path: str | Path) -> Manifest:
    """Read and validate one manifest file (``.toml`` or ``.json``).

    Raises ``ValueError`` for a missing file, a parse error or invalid content.
    """
    path = Path(path).expanduser()
    if path.suffix not in SUFFIXES:
        raise ValueError(f"manifest {str(path)!r} must be a .toml or .json file")
    if not path.is_file():
        raise ValueError(f"manifest file {str(path)!r} does not exist")
    return Manifest.from_mapping(_parse(path), path)


def manifest_dirs() -> list[Path]:
    """The folders searched for manifests, in order: the shipped ones, then ``$CELLSCRIBE_MANIFESTS``."""
    dirs = [SHIPPED_DIR]
    extra = os.environ.get(ENV_MANIFESTS, "")
    dirs += [Path(p).expanduser() for p in extra.split(os.pathsep) if p.strip()]
    return dirs


def _files(dirs: list[Path]) -> Iterator[Path]:
    for folder in dirs:
        if not folder.is_dir():
            if folder != SHIPPED_DIR:
                log.warning("manifest folder %s (from %s) does not exist", folder, ENV_MANIFESTS)
            continue
        for path in sorted(folder.iterdir()):
            if path.suffix in SUFFIXES and path.is_file():
                yield path


def list_manifests(dirs: list[str | Path] | None = None, *, errors: str = "raise") -> list[Manifest]:
    """Every manifest found (see :func:`manifest_dirs`), sorted by name.

    A later folder's manifest replaces an earlier one of the same name. An invalid manifest file, or
    two files with the same name in one folder, raise ``ValueError`` (``errors="raise"``) or are
    skipped with a ``UserWarning`` (``errors="warn"``, for listings that should show the rest).
    """
    if errors not in ("raise", "warn"):
        raise ValueError(f"errors must be 'raise' or 'warn', got {errors!r}")
    folders = manifest_dirs() if dirs is None else [Path(d).expanduser() for d in dirs]
    found: dict[str, Manifest] = {}
    for path in _files(folders):
        try:
            manifest = load_manifest(path)
            previous = found.get(manifest.name)
            if previous is not None and previous.path is not None and previous.path.parent == path.parent:
                raise ValueError(
                    f"two manifests named {manifest.name!r} in {str(path.parent)!r} "
                    f"({previous.path.name}, {path.name}); keep one"
                )
        except ValueError as exc:
            if errors == "raise":
                raise
            warnings.warn(f"skipped: {exc}", UserWarning, stacklevel=2)
            continue
        if previous is not None:
            log.info("manifest %s from %s replaces %s", manifest.name, path, previous.path)
        found[manifest.name] = manifest
    return [found[name] for name in sorted(found)]


def find_manifest(name: str, dirs: list[str | Path] | None = None) -> Manifest | None:
    """The manifest called ``name`` (the last folder that has ``name.toml``/``name.json``), or ``None``.

    Names are matched case-insensitively. Only that manifest's file is read, so one broken manifest
    does not break the others. A name that cannot be a manifest name (a path, a hub id) returns
    ``None`` without touching the disk.
    """
    if not isinstance(name, str):
        return None
    name = name.casefold()
    if not _NAME.fullmatch(name):
        return None
    folders = manifest_dirs() if dirs is None else [Path(d).expanduser() for d in dirs]
    for folder in reversed(folders):
        for suffix in SUFFIXES:
            path = folder / f"{name}{suffix}"
            if path.is_file():
                return load_manifest(path)
    return None
