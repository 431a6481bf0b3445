"""A model loaded once and reused by several runs: :func:`load_model` and :class:`Model`.

``tl.annotate(..., model="cellreasoner-7b")`` loads the model, answers and lets it go. An analysis that
annotates several modalities of one MuData, or the same data with several prompt strategies, loads it
once instead::

    model = cellscribe.load_model("my-multiome-manifest", adapters={"rna": "lora/rna", "atac": "lora/atac"})
    for mod in ("rna", "atac"):
        cellscribe.tl.annotate(mdata, modality=mod, model=model)

Each run switches the model to its modality's adapter (``use_modality``); the base stays loaded once.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from typing import Any

import attrs

from .components import LoadedModel, with_defaults
from .plugins import Host, get_host
from .spec import ModelSpec

log = logging.getLogger(__name__)

#: ``model=None`` resolves to this backend name (the offline default model).
DEFAULT_MODEL = "markers"

#: The load options of a run (``tl.annotate``'s names, value when not given; declared in
#: :class:`cellscribe.core.spec.ModelSpec`); with a :class:`Model` they are fixed and ``annotate`` refuses them.
LOAD_OPTIONS: dict[str, Any] = {a.name: a.default for a in attrs.fields(ModelSpec) if a.name != "model"}


def resolve_model_name(model: str | None) -> str:
    """The ``model=`` string, with ``None`` meaning the offline default model."""
    return DEFAULT_MODEL if model is None else str(model)


@attrs.define(eq=False, repr=False)
class Model:
    """A model loaded by its backend plugin; pass it as ``model=`` to any number of runs.

    Attributes
    ----------
    name
        The ``model=`` string it was loaded from (backend name, manifest name, local folder, hub id).
    backend
        Name of the backend plugin that loads it.
    options
        The load options (``adapters``, ``device``, ``dtype``, ...), recorded in each run's
        ``uns[key_added]["params"]``.
    loaded
        The backend's loaded model (:class:`~cellscribe.core.components.LoadedModel`, with the
        protocol's defaults for the optional members it lacks); a model made with ``lazy=True`` is
        loaded when this is first read.
    """

    name: str
    backend: str
    options: Mapping[str, Any] = attrs.field(factory=dict, converter=dict)
    _load: Callable[[], Any] | None = attrs.field(default=None, alias="load")
    _loaded: Any = attrs.field(default=None, alias="loaded",
                               converter=lambda v: None if v is None else with_defaults(v, LoadedModel))

    @property
    def loaded(self) -> Any:
        if self._loaded is None:
            t0 = time.perf_counter()
            self._loaded = with_defaults(self._load(), LoadedModel)
            log.info("model %s loaded by backend %s in %.1f s", self.name, self.backend, time.perf_counter() - t0)
        return self._loaded

    @property
    def is_loaded(self) -> bool:
        return self._loaded is not None

    def replica(self, *, modality: str, assay: Any, surveyed: Any = None) -> Replica:
        """How another process makes a copy of this model that answers as it does in a run of
        ``modality`` on ``assay`` (after surveying ``surveyed``, the prompts the run's model surveyed
        when that changed what it answers; ``None`` when it did not)."""
        return Replica(self.name, self.options, modality, assay, tuple(surveyed) if surveyed else None)

    def __repr__(self) -> str:
        adapters = self.options.get("adapters") or {}
        extra = f", adapters for {sorted(adapters)}" if adapters else ""
        state = "" if self.is_loaded else ", not loaded yet"
        return f"<cellscribe.Model {self.name!r} ({self.backend} backend{extra}{state})>"


@attrs.frozen(eq=False)
class Replica:
    """A recipe for a copy of a run's model in another process (an executor's worker): the model's name
    and load options, and what the run did to it before it answered (its modality, its assay, the
    prompts it surveyed). A value: it pickles, and :meth:`load` works wherever cellscribe and the
    model's backend are installed."""

    name: str
    options: Mapping[str, Any] = attrs.field(converter=dict)
    modality: str
    assay: Any
    surveyed: tuple[Any, ...] | None = None

    def load(self, *, model_options: Mapping[str, Any] | None = None) -> Any:
        """Load the model (with ``model_options`` over the run's own: another server's ``base_url``)
        and prepare it as the run prepared its own: ``use_modality``, ``use_assay``, ``survey``.
        Returns the :class:`~cellscribe.core.components.LoadedModel`. Writes nothing."""
        o = self.options
        model = load_model(
            self.name, adapters=o.get("adapters") or None, device=o.get("device"), dtype=o.get("dtype"),
            trust_remote_code=bool(o.get("trust_remote_code")), batch_size=o.get("batch_size"),
            model_options={**dict(o.get("model_options") or {}), **dict(model_options or {})},
        )
        loaded = model.loaded
        loaded.use_modality(self.modality)
        loaded.use_assay(self.assay)
        if self.surveyed:
            loaded.survey(list(self.surveyed))
        return loaded


def load_model(
    model: str | None = None,
    *,
    adapters: Mapping[str, str] | None = None,
    device: str | None = None,
    dtype: str | None = None,
    trust_remote_code: bool = False,
    batch_size: int | None = None,
    model_options: Mapping[str, Any] | None = None,
    lazy: bool = False,
    host: Host | None = None,
) -> Model:
    """Load ``model`` once, to pass as ``model=`` to several :func:`cellscribe.tl.annotate` calls.

    Parameters
    ----------
    model
        What ``tl.annotate(model=...)`` takes: ``None`` (the offline ``markers`` model), a manifest name
        (``"cell-o1"``), a local folder, a hub id or ``"openai:<name>"``.
    adapters
        Modality -> LoRA adapter (path or hub id), all loaded onto one base; each run answers with its
        modality's adapter (the base model for a modality without one).
    device, dtype, trust_remote_code, batch_size, model_options
        As in :func:`cellscribe.tl.annotate`; fixed for every run of the returned model. (The tissue is
        not one of them: it belongs to the data, and each run gives its own, ``tissue=``.)
    lazy
        Load when the first run needs the model (after that run has checked its input), not now.
    host
        The plugin host (default: the process-wide one).

    Returns
    -------
    A :class:`Model`. Nothing is written; the model holds its memory (GPU memory too) until the object
    is dropped.
    """
    host = host or get_host()
    name = resolve_model_name(model)
    backend_c = host.registry.backend_for(name)
    options = {
        "adapters": dict(adapters or {}),
        "device": device,
        "dtype": dtype,
        "trust_remote_code": trust_remote_code,
        "batch_size": batch_size,
        "model_options": dict(model_options or {}),
    }

    def load() -> Any:
        return backend_c.load(
            name, adapters=options["adapters"] or None, hook=host.hook, device=device, dtype=dtype,
            trust_remote_code=trust_remote_code, batch_size=batch_size, **options["model_options"],
        )

    handle = Model(name=name, backend=backend_c.name, options=options, load=load)
    if not lazy:
        handle.loaded  # noqa: B018 (loads now)
    return handle


def check_run_options(model: Model, given: Mapping[str, Any]) -> None:
    """Refuse load options passed to a run of an already loaded ``model`` (they would be ignored)."""
    clashing = [name for name, default in LOAD_OPTIONS.items() if given.get(name, default) not in (default, None, {})]
    if clashing:
        listed = ", ".join(f"{name}=" for name in clashing)
        hint = "adapters={modality: path}" if "adapter" in clashing else listed
        raise ValueError(
            f"model= is an already loaded {model!r}, so {listed} cannot change it; pass {hint} to "
            "cellscribe.load_model() instead, or pass the model's name to load it for this run."
        )
