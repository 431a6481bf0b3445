"""Hook specifications: the contract between cellscribe's core and its plugins.

Everything cellscribe does is done by a plugin: reading a file, turning a modality into a cells x genes
matrix, ranking genes into cell sentences, building prompts, running a model, loading an adapter and
decoding the answer. The built-in plugins (``cellscribe.plugins.*``) use these hooks exactly as a
third-party package does, through the ``cellscribe`` entry-point group.

Implement a hook with the :data:`cellscribe.hookimpl` marker and a function of the same name; accept
only the arguments you need (pluggy passes them by keyword)::

    from cellscribe import hookimpl

    @hookimpl
    def cellscribe_register_modalities(register):
        register(MyModality())

Hooks are grouped by the phase in which they are called. Registration hooks are called once, when the
plugin manager is first used (for a plugin imported on demand, when it is imported: see
:mod:`cellscribe.core.plugins`); the ``register`` callback validates the component, rejects duplicate
names and records which plugin provided it (``cellscribe plugins`` lists them).

Component interfaces (the objects passed to ``register``) are documented in
:mod:`cellscribe.core.components`. A plugin can add hooks of its own with :func:`cellscribe_addhooks`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable

import pluggy

if TYPE_CHECKING:
    import click

    from .components import (
        Backend,
        Decoder,
        Executor,
        Modality,
        PromptStrategy,
        Reader,
        SentenceFormat,
        SentenceStrategy,
        Trainer,
    )

hookspec = pluggy.HookspecMarker("cellscribe")
hookimpl = pluggy.HookimplMarker("cellscribe")


# -------------------------------------------------------------------------------------------------
# Plugin set-up: called as each plugin is registered.
# -------------------------------------------------------------------------------------------------


@hookspec(historic=True)
def cellscribe_addhooks(pluginmanager: pluggy.PluginManager) -> None:
    """Add hook specifications a plugin owns (as pytest's ``pytest_addhooks``).

    Called once for every plugin that implements it, as soon as that plugin is registered (a historic
    hook: plugins registered later are called too). Implement it to call
    ``pluginmanager.add_hookspecs(module)`` with a module of ``@hookspec`` functions; other plugins can
    then implement those hooks, and the owning plugin calls them through the ``hook`` relay it is given.
    The ``markers`` plugin adds ``cellscribe_marker_knowledge`` this way
    (:mod:`cellscribe.plugins.markers.hookspecs`).

    :param pluginmanager: the plugin manager being set up.
    """


# -------------------------------------------------------------------------------------------------
# Registration hooks: "add a named thing". Called once per plugin manager.
# -------------------------------------------------------------------------------------------------


@hookspec
def cellscribe_register_readers(register: Callable[[Reader], None]) -> None:
    """Register input readers: objects that turn a path into an AnnData or MuData.

    :param register: call ``register(reader)`` once per reader. A reader declares the file name
        ``suffixes`` it reads (``(".h5ad",)``); the first registered reader whose suffix matches a path
        reads it. See :class:`cellscribe.core.components.Reader`.
    """


@hookspec
def cellscribe_register_modalities(register: Callable[[Modality], None]) -> None:
    """Register modalities: tokenizing step 1, the user's data to a cells x genes
    :class:`~cellscribe.core.types.FeatureMatrix` with gene symbols.

    :param register: call ``register(modality)`` once per modality. The modality's ``name`` is what
        users pass as ``modality=`` (``"rna"``, ``"atac"``, ``"adt"``). It owns every check and choice
        specific to its data (which layer, scaled data, gene identifiers) and must never drop a cell.
        See :class:`cellscribe.core.components.Modality`.
    """


@hookspec
def cellscribe_register_sentence_strategies(register: Callable[[SentenceStrategy], None]) -> None:
    """Register sentence strategies: tokenizing step 2, a FeatureMatrix to ranked gene lists.

    A strategy must work for any modality: it sees only the FeatureMatrix.

    :param register: call ``register(strategy)`` once per strategy (``"ranked-hvg"``,
        ``"top-expressed"``, ...). See :class:`cellscribe.core.components.SentenceStrategy`.
    """


@hookspec
def cellscribe_register_prompt_strategies(register: Callable[[PromptStrategy], None]) -> None:
    """Register prompt strategies: cell sentences to :class:`~cellscribe.core.types.Prompt` objects.

    :param register: call ``register(strategy)`` once per strategy (``"zero-shot"``, ``"k-shot"``,
        ``"puzzle"``). See :class:`cellscribe.core.components.PromptStrategy`.
    """


@hookspec
def cellscribe_register_backends(register: Callable[[Backend], None]) -> None:
    """Register model backends: objects that load a model and generate text for prompts.

    :param register: call ``register(backend)`` once per backend. When the user passes ``model=SPEC``,
        a backend whose ``name`` equals SPEC, or whose name is SPEC's prefix before ``":"``, is chosen;
        otherwise the backends are asked in registration order (built-ins last) with
        ``backend.handles(SPEC)``. Heavy imports (torch, transformers) belong in ``load``, never at
        module import. See :class:`cellscribe.core.components.Backend`.
    """


@hookspec
def cellscribe_register_decoders(register: Callable[[Decoder], None]) -> None:
    """Register decoders: raw model text to one :class:`~cellscribe.core.types.Annotation` per unit.

    A decoder never raises on bad model output: it returns ``Annotation.unresolved`` with the raw text.

    :param register: call ``register(decoder)`` once per decoder; prompts name their decoder in
        ``Prompt.decoder``. See :class:`cellscribe.core.components.Decoder`.
    """


@hookspec
def cellscribe_register_formats(register: Callable[[SentenceFormat], None]) -> None:
    """Register sentence file formats for ``cellscribe sentences --format NAME``.

    :param register: call ``register(fmt)`` once per format (``"cellreasoner"``, ``"cellpuzzles"``,
        ``"jsonl"``). A format writes cell sentences (streamed chunk by chunk) with their labels as the
        training/inference records of some model. See
        :class:`cellscribe.core.components.SentenceFormat`.
    """


@hookspec
def cellscribe_register_trainers(register: Callable[[Trainer], None]) -> None:
    """Register trainers: objects that fine-tune a loaded model on training examples and write an
    adapter (``cellscribe finetune --trainer NAME``).

    :param register: call ``register(trainer)`` once per trainer (``"lora"``: peft LoRA with
        transformers' Trainer). Heavy imports belong in ``train``. See
        :class:`cellscribe.core.components.Trainer`.
    """


@hookspec
def cellscribe_register_executors(register: Callable[[Executor], None]) -> None:
    """Register executors: where a run's prompts are answered (``executor=NAME``, ``--executor NAME``).

    :param register: call ``register(executor)`` once per executor (``"local"``: in this process;
        ``"ray"``: model replicas on a Ray cluster). Heavy imports (a cluster framework) belong in
        ``run``, never at module import. See :class:`cellscribe.core.components.Executor`.
    """


# -------------------------------------------------------------------------------------------------
# Run-time hooks
# -------------------------------------------------------------------------------------------------


@hookspec(firstresult=True)
def cellscribe_load_adapter(model: Any, adapter: str, modality: str, backend: str) -> Any | None:
    """Load the adapter ``adapter`` (a path or hub id) for ``modality`` onto a loaded ``model``.

    Called by a backend after it has loaded its base model, once per modality of the run that has an
    adapter.

    :param model: the backend's loaded model object (for the transformers backend a
        ``PreTrainedModel`` or ``PeftModel``).
    :param adapter: where the adapter lives.
    :param modality: the modality the adapter is for (used as the adapter's name, so several can
        live on one base and be switched).
    :param backend: the calling backend's name; return ``None`` for backends you do not support.
    :return: the model with the adapter loaded and active.

    Stops at the first non-None result.
    """


# -------------------------------------------------------------------------------------------------
# Command line
# -------------------------------------------------------------------------------------------------


@hookspec
def cellscribe_cli_options(command: str) -> list[click.Option] | None:
    """Options a plugin adds to a ``cellscribe`` command (e.g. ``--gtf`` for ATAC).

    :param command: the command being built (``"annotate"``, ``"sentences"``).
    :return: a list of ``click.Option``. Their values reach the plugin's reader and modality as
        keyword arguments (``options`` in :class:`~cellscribe.core.components.Reader` and
        :class:`~cellscribe.core.components.Modality`) when they are not ``None``.

    All results are combined; option names must not clash with core options or each other.
    """
