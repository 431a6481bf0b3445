"""The manifest a fine-tuned adapter folder carries (``cellscribe finetune`` writes it).

A LoRA adapter only works on inputs made exactly as its training records were: the same base model, the
same modality, sentence strategy (with its gene list), prompt strategy and label vocabulary. The
adapter folder therefore holds, beside PEFT's ``adapter_config.json`` and ``adapter_model.safetensors``,
``cellscribe_adapter.json``::

    {"format": 1, "base_model": "...", "base_fingerprint": "sha256:...", "modality": "rna",
     "sentence": "top-expressed", "n_genes": 20, "sentence_state": {...}, "prompt": "zero-shot",
     "mode": "direct", "prompt_options": {...}, "labels": [...], "label_key": "bulk_labels",
     "training": {"fingerprint": "sha256:...", "n_train": 490, ...}, "trainer": {...},
     "validation": {"accuracy": ..., ...}, "cellscribe_version": "0.1.0", ...}

A run that uses the adapter (``annotate --adapter M=DIR``, ``load_model(adapters=...)``) takes its
sentence and prompt settings and its candidates from it where the user kept the defaults, refuses a
different base model or another sentence or prompt strategy with an error naming the fix, and records
:meth:`AdapterManifest.summary` in ``uns[key_added]["params"]["adapter_manifests"]``.

Only data handling here (json, hashlib): no model library is imported.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import attrs

__all__ = ["ADAPTER_MANIFEST", "AdapterManifest", "read_adapter_manifest", "base_fingerprint", "same_base"]

#: The manifest's file name inside an adapter folder.
ADAPTER_MANIFEST = "cellscribe_adapter.json"
FORMAT = 1
#: Bytes read from each end of a weight file for the base fingerprint.
_EDGE_BYTES = 1 << 20


def base_fingerprint(base: str) -> str | None:
    """A digest identifying a local model folder's weights, or ``None`` for anything else (a hub id).

    SHA-256 over ``config.json``, and for each ``*.safetensors`` file its name, size, header (tensor
    names, dtypes, shapes, offsets) and first and last MiB of data: two folders holding the same weights
    agree, a fine-tune of the same architecture does not, and a 15 GB model is fingerprinted in
    milliseconds (reading every byte would take a minute).
    """
    folder = Path(base).expanduser()
    if not (folder / "config.json").is_file():
        return None
    digest = hashlib.sha256((folder / "config.json").read_bytes())
    for path in sorted(folder.glob("*.safetensors")):
        size = path.stat().st_size
        digest.update(f"{path.name}:{size}".encode())
        with path.open("rb") as fh:
            head_len = int.from_bytes(fh.read(8), "little")
            digest.update(fh.read(min(head_len, size)))
            digest.update(fh.read(_EDGE_BYTES))
            fh.seek(max(0, size - _EDGE_BYTES))
            digest.update(fh.read(_EDGE_BYTES))
    return "sha256:" + digest.hexdigest()


def same_base(recorded: str, fingerprint: str | None, model: str) -> bool:
    """Whether ``model`` (a ``model=`` string) is the base an adapter recorded as ``recorded`` with
    ``fingerprint``: equal fingerprints of local folders, else the same name (case-insensitively) or
    the same final folder or repository name when no fingerprint can be compared."""
    theirs = base_fingerprint(model)
    if fingerprint and theirs:
        return fingerprint == theirs
    a, b = str(recorded).rstrip("/"), str(model).rstrip("/")
    if a.casefold() == b.casefold():
        return True
    return Path(a).name.casefold() == Path(b).name.casefold()


def _plain(value: Any) -> Any:
    if hasattr(value, "tolist") and not isinstance(value, (str, bytes)):
        value = value.tolist()
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    return str(value)


@attrs.frozen(kw_only=True)
class AdapterManifest:
    """What an adapter was trained on and with (see the module docstring).

    ``labels`` is the label vocabulary (sorted); ``sentence`` the resolved sentence strategy and
    ``sentence_state`` what it learned (a data-hvg gene list; the strategy's shipped list is named in
    ``sentence_params``); ``training`` the data (fingerprint of every rendered record, cell counts, the
    split), ``trainer`` its settings and outcome, ``validation`` cellscribe's metrics on the held-out
    cells. ``path`` is the folder it was read from.
    """

    base_model: str
    base_fingerprint: str | None = None
    base_revision: str | None = None
    modality: str
    mod: str | None = None
    sentence: str
    n_genes: int | None = None
    sentence_options: Mapping[str, Any] = attrs.field(factory=dict, converter=dict)
    sentence_params: Mapping[str, Any] = attrs.field(factory=dict, converter=dict)
    sentence_state: Mapping[str, Any] = attrs.field(factory=dict, converter=dict)
    prompt: str
    mode: str = "direct"
    prompt_options: Mapping[str, Any] = attrs.field(factory=dict, converter=dict)
    k: int | None = None
    seed: int = 0
    max_prompt_tokens: int | None = None
    labels: tuple[str, ...] = attrs.field(converter=tuple)
    label_key: str
    decode: str = "score"
    #: How ``decode="score"`` compares its labels: ``"sum"``, the label's log-likelihood after the prompt,
    #: which is what the adapter was trained to maximise; ``"pmi"`` (the default for untrained models)
    #: would divide out the label frequencies the adapter learned (pbmc adapter: 0.215 exact against 0.660).
    calibration: str = "sum"
    training: Mapping[str, Any] = attrs.field(factory=dict, converter=dict)
    trainer: Mapping[str, Any] = attrs.field(factory=dict, converter=dict)
    validation: Mapping[str, Any] = attrs.field(factory=dict, converter=dict)
    cellscribe_version: str = ""
    created: str = attrs.field(factory=lambda: _dt.datetime.now().isoformat(timespec="seconds"))
    path: Path | None = attrs.field(default=None, eq=False)

    # ---------------------------------------------------------------------------------- files

    def to_dict(self) -> dict[str, Any]:
        """The manifest as JSON-able values (``path`` left out)."""
        out = {"format": FORMAT}
        out.update({a.name: _plain(getattr(self, a.name)) for a in attrs.fields(type(self)) if a.name != "path"})
        return out

    def write(self, folder: str | Path) -> Path:
        """Write ``folder/cellscribe_adapter.json`` (through a temporary file, then a rename); return it."""
        path = Path(folder) / ADAPTER_MANIFEST
        tmp = path.with_name(path.name + ".partial")
        tmp.write_text(json.dumps(self.to_dict(), indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        tmp.replace(path)
        return path

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], path: Path | None = None) -> AdapterManifest:
        """A manifest from its JSON; ``ValueError`` naming the file for a newer format or missing keys."""
        where = f"adapter manifest {str(path)!r}" if path is not None else "adapter manifest"
        values = dict(data)
        version = values.pop("format", None)
        if version != FORMAT:
            raise ValueError(f"{where} has format {version!r}; this cellscribe reads format {FORMAT}: "
                             "upgrade cellscribe or re-train the adapter")
        known = {a.name for a in attrs.fields(cls)} - {"path"}
        unknown = sorted(set(values) - known)
        if unknown:
            warnings.warn(f"{where}: ignoring unknown key(s) {', '.join(unknown)} (written by a newer cellscribe?)",
                          UserWarning, stacklevel=3)
        try:
            return cls(**{k: v for k, v in values.items() if k in known}, path=path)
        except TypeError as exc:
            raise ValueError(f"invalid {where}: {exc}") from None

    # ---------------------------------------------------------------------------------- runs

    def run_defaults(self) -> dict[str, Any]:
        """The run parameters its training records were made with (``tl.annotate`` keyword names)."""
        out: dict[str, Any] = {
            "sentence": self.sentence, "n_genes": self.n_genes, "sentence_options": dict(self.sentence_options),
            "prompt": self.prompt, "mode": self.mode, "prompt_options": dict(self.prompt_options),
            "candidates": list(self.labels),
        }
        if self.max_prompt_tokens is not None:
            out["max_prompt_tokens"] = self.max_prompt_tokens
        if self.k is not None:
            out["k"] = self.k
        return out

    def check(self, given: Mapping[str, Any], defaults: Mapping[str, Any], *, modality: str, model: str) -> None:
        """Refuse a run this adapter cannot serve: another base model, modality, or sentence or prompt
        strategy or mode chosen by the user (``given`` against cellscribe's ``defaults``). A
        ``ValueError`` names the difference and the fix."""
        where = f"adapter {str(self.path) if self.path else '?'}"
        if modality != self.modality and "+" not in modality:
            raise ValueError(f"{where} was trained for modality {self.modality!r}, not {modality!r}; pass it as "
                             f"--adapter {self.modality}=... (adapters={{{self.modality!r}: ...}})")
        if not same_base(self.base_model, self.base_fingerprint, model):
            raise ValueError(f"{where} was trained on base model {self.base_model!r}"
                             f"{' (' + self.base_fingerprint[:19] + '...)' if self.base_fingerprint else ''}, "
                             f"but the run's model is {model!r}, whose weights differ. Load the adapter onto "
                             f"its own base: model={self.base_model!r}")
        for key, trained in (("sentence", self.sentence), ("prompt", self.prompt), ("mode", self.mode)):
            value = given.get(key, defaults[key])
            if value != defaults[key] and value != trained and not (key == "sentence" and value == "auto"):
                raise ValueError(f"{where} was trained on {key}={trained!r} records, but the run asks for "
                                 f"{key}={value!r}: its answers would not match its training. Leave {key} "
                                 f"out (the adapter sets it) or train an adapter for {value!r}")

    def summary(self) -> dict[str, Any]:
        """What a run records of the adapter (``uns[key_added]["params"]["adapter_manifests"]``)."""
        return {
            "path": str(self.path) if self.path else None,
            "base_model": self.base_model, "base_fingerprint": self.base_fingerprint, "modality": self.modality,
            "sentence": self.sentence, "n_genes": self.n_genes, "prompt": self.prompt, "mode": self.mode,
            "n_labels": len(self.labels), "label_key": self.label_key,
            "training_fingerprint": self.training.get("fingerprint"),
            # Per-label figures stay in the manifest: label names (with "/") are no h5ad group names.
            "n_train": self.training.get("n_train"),
            "validation": {k: v for k, v in self.validation.items() if not isinstance(v, Mapping)},
            "cellscribe_version": self.cellscribe_version, "created": self.created,
        }


def read_adapter_manifest(adapter: str | Path) -> AdapterManifest | None:
    """The manifest of the adapter folder ``adapter``, or ``None`` when it has none (an adapter made
    elsewhere, or a hub id). A broken manifest raises ``ValueError`` naming the file."""
    folder = Path(str(adapter)).expanduser()
    path = folder / ADAPTER_MANIFEST
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ValueError(f"adapter manifest {str(path)!r} is not valid JSON: {exc}") from None
    return AdapterManifest.from_dict(data, path=folder.resolve())
