"""The ``ray`` executor: its options, the cluster, and the run's batches answered on it.

A run goes through :func:`~cellscribe.core.run.checkpoint.run_batches` twice, so that the batches, their
seeds, the checkpoint files and what a re-run resumes are exactly a local run's:

1. with a stand-in model that answers nothing, which writes down the calls the run still needs (the
   prompts of each unfinished batch, or only the failed ones of a saved batch, with the batch's
   settings); finished batches are read from the checkpoint and sent nowhere;
2. with a model fed by the cluster: those calls become a Ray Data dataset, answered in parallel by
   replicas of the model; ``run_batches`` takes the answers in batch order as they arrive and saves each
   batch to the checkpoint, while the cluster answers the next ones.

If the replicas cannot answer (a server down, a replica that cannot load the model, the cluster lost),
the run stops as a local run does (:class:`~cellscribe.core.types.ModelUnavailableError`): the finished
batches are saved, the rest reported as failed, and the same call again resumes.
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import os
import pickle
import time
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import attrs

from cellscribe.core.run.checkpoint import BatchOutcome, run_batches
from cellscribe.core.types import Generation, ModelUnavailableError, Prompt

log = logging.getLogger(__name__)

NEEDS_EXTRA = "executor='ray' needs Ray, which the ray extra installs: pip install 'cellscribe[ray]'"
ENGINES = ("actors", "vllm")
#: Object store of a local cluster: it holds the prompts and answers in flight, not the model.
LOCAL_OBJECT_STORE = 1 << 30
#: Environment variables that reach the replicas of a remote cluster (which plugins they load).
FORWARDED_ENV = ("CELLSCRIBE_LOAD_PLUGINS", "CELLSCRIBE_DISABLE_PLUGINS")


def _urls(value: Any) -> tuple[str, ...]:
    if value is None:
        return ()
    items = value.split(",") if isinstance(value, str) else list(value)
    return tuple(str(u).strip() for u in items if str(u).strip())


def _positive(inst: Any, attribute: attrs.Attribute, value: Any) -> None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0):
        raise ValueError(f"executor option {attribute.name} must be a positive number, got {value!r}")


def _count(inst: Any, attribute: attrs.Attribute, value: Any) -> None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
        raise ValueError(f"executor option {attribute.name} must be a positive integer, got {value!r}")


def _gpus(inst: Any, attribute: attrs.Attribute, value: Any) -> None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0):
        raise ValueError(f"executor option {attribute.name} must be a number >= 0, got {value!r}")


@attrs.frozen(kw_only=True)
class RayOptions:
    """``executor_options`` of ``executor="ray"`` (``--executor-option KEY=VALUE``).

    Attributes
    ----------
    workers
        Model replicas (Ray actors or vLLM engines). Default: one per server of ``base_urls``, else as
        many as the cluster's GPUs (replicas on GPUs, vLLM engines) or CPUs hold, never more than the
        batches to answer.
    cpus_per_worker, gpus_per_worker
        Ray resources of each replica. ``gpus_per_worker`` defaults to 1 when the run's model is on a
        CUDA device, else 0.
    block_prompts
        Prompts per batch (the unit sent to a replica, checkpointed, resumed). Default: the run's own
        batch, so that a Ray run and a local run share checkpoint files and answers.
    base_urls
        OpenAI-compatible servers to spread the replicas over (a list, or URLs separated by commas):
        replica *i* sends its requests to server *i* mod n. They must serve the same model as the run's
        ``base_url`` (the checkpoint's identity is the run's).
    engine
        ``"actors"`` (the run's backend in each replica) or ``"vllm"`` (Ray Data's vLLM processor on the
        run's transformers model; greedy answers as the transformers backend's, up to numerics).
    num_cpus, object_store_memory
        CPUs and object-store bytes of the local cluster started when no address is given (default:
        ``workers * cpus_per_worker``, else the machine's CPUs; 1 GiB).
    vllm_batch_size, engine_kwargs
        Rows per vLLM call and the ``vllm.LLM`` arguments (``tensor_parallel_size``,
        ``max_num_batched_tokens``, ...), with ``engine="vllm"``.
    """

    workers: int | None = attrs.field(default=None, validator=_count)
    cpus_per_worker: float = attrs.field(default=1.0, validator=_positive)
    gpus_per_worker: float | None = attrs.field(default=None, validator=_gpus)
    block_prompts: int | None = attrs.field(default=None, validator=_count)
    base_urls: tuple[str, ...] = attrs.field(default=(), converter=_urls)
    engine: str = attrs.field(default="actors")
    num_cpus: int | None = attrs.field(default=None, validator=_count)
    object_store_memory: int = attrs.field(default=LOCAL_OBJECT_STORE, validator=_count)
    vllm_batch_size: int = attrs.field(default=64, validator=_count)
    engine_kwargs: Mapping[str, Any] = attrs.field(factory=dict, converter=dict)

    @engine.validator
    def _engine(self, attribute: attrs.Attribute, value: Any) -> None:
        if value not in ENGINES:
            raise ValueError(f"executor option engine must be one of {', '.join(ENGINES)}, got {value!r}")

    @classmethod
    def from_mapping(cls, options: Mapping[str, Any] | None) -> RayOptions:
        """Options from ``executor_options``; an unknown key is a ``ValueError`` listing the known ones."""
        options = dict(options or {})
        known = [a.name for a in attrs.fields(cls)]
        unknown = sorted(set(options) - set(known))
        if unknown:
            raise ValueError(f"unknown executor option(s) {', '.join(map(repr, unknown))} for executor 'ray'; "
                             f"known: {', '.join(known)}")
        return cls(**options)


@attrs.define
class _Recorder:
    """Pass 1: stands in for the model in ``run_batches`` and writes down every call it gets."""

    calls: list[tuple[list[Prompt], dict[str, Any]]] = attrs.field(factory=list)

    def generate(self, prompts: Sequence[Prompt], *, settings: Mapping[str, Any] | None = None,
                 **_: Any) -> list[Generation]:
        self.calls.append((list(prompts), dict(settings or {})))
        return [Generation(text="", error="not sent")] * len(prompts)


@attrs.define
class _Feeder:
    """Pass 2: answers ``run_batches``'s calls, in order, with what the cluster returns (in any order).

    A cluster that fails, or a replica whose model cannot answer, raises
    :class:`ModelUnavailableError`, which stops the run with the finished batches saved."""

    calls: list[tuple[list[Prompt], dict[str, Any]]]
    answers: Iterator[tuple[int, Any]]
    done: dict[int, Any] = attrs.field(factory=dict)
    position: int = 0
    first_answer: float | None = None

    def generate(self, prompts: Sequence[Prompt], *, progress: Any = None, **_: Any) -> list[Generation]:
        from ._workers import Unavailable

        k, self.position = self.position, self.position + 1
        if k >= len(self.calls) or [p.unit_ids for p in prompts] != [p.unit_ids for p in self.calls[k][0]]:
            raise ModelUnavailableError(f"the Ray executor lost track of the batches at call {k}; run again to resume")
        while k not in self.done:
            try:
                j, result = next(self.answers)
            except StopIteration:
                raise ModelUnavailableError("the Ray dataset ended before every batch was answered") from None
            except Exception as exc:  # noqa: BLE001 - a failed replica or cluster stops the run, resumable
                first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
                raise ModelUnavailableError(f"the Ray replicas failed ({type(exc).__name__}: {first})") from exc
            if self.first_answer is None:
                self.first_answer = time.perf_counter()
            self.done[j] = result
        result = self.done.pop(k)
        if isinstance(result, Unavailable):
            raise ModelUnavailableError(result.message, result.generations)
        if progress is not None:
            progress(len(result))
        return result


@contextlib.contextmanager
def _cluster(address: str | None, opts: RayOptions) -> Iterator[bool]:
    """Connect to ``address``, or start a local cluster, for the block; yields whether it was started
    here (then it is shut down after the block). A Ray already initialised in this process is used as is."""
    import ray

    if ray.is_initialized():
        if address is not None:
            log.info("Ray is already initialised in this process: using that cluster, not %s", address)
        yield False
        return
    if address is None:
        cpus = opts.num_cpus or (int(-(-opts.workers * opts.cpus_per_worker // 1)) if opts.workers else os.cpu_count())
        ray.init(num_cpus=cpus, include_dashboard=False, object_store_memory=opts.object_store_memory,
                 logging_level=logging.WARNING, log_to_driver=True)
    else:
        env = {k: os.environ[k] for k in FORWARDED_ENV if k in os.environ}
        ray.init(address=address, runtime_env={"env_vars": env} if env else None, logging_level=logging.WARNING)
    try:
        yield True
    finally:
        ray.shutdown()


def _replica_resources(loaded: Any, opts: RayOptions, n_calls: int) -> tuple[int, float]:
    """(replicas, GPUs per replica) on the current cluster."""
    import ray

    resources = ray.cluster_resources()
    if opts.engine == "vllm":  # one engine per tensor-parallel group of GPUs; vLLM places them itself
        per_engine = int(opts.engine_kwargs.get("tensor_parallel_size", 1)) * int(
            opts.engine_kwargs.get("pipeline_parallel_size", 1))
        workers = opts.workers or max(1, int(resources.get("GPU", 0) // per_engine))
        return workers, float(per_engine)  # rows are prompts here, not batches: no cap by the batches
    gpus = opts.gpus_per_worker
    if gpus is None:
        gpus = 1.0 if str(loaded.info().get("device") or "").startswith("cuda") else 0.0
    if gpus and resources.get("GPU", 0) < gpus:
        raise ValueError(f"each replica asks for {gpus:g} GPU but the Ray cluster has {resources.get('GPU', 0):g}; "
                         "pass --executor-option gpus_per_worker=0 to answer on CPUs")
    workers = opts.workers or (len(opts.base_urls) if opts.base_urls else None)
    if workers is None:
        workers = int(resources.get("GPU", 0) // gpus) if gpus else int(resources.get("CPU", 1) // opts.cpus_per_worker)
    return max(1, min(workers, n_calls)), float(gpus)


def _actor_answers(calls: list, replica: Any, opts: RayOptions, workers: int, gpus: float) -> Iterator[tuple[int, Any]]:
    """The calls as a Ray Data dataset (one row, and one block, per call) answered by ``workers``
    replica actors; yields ``(call, generations or Unavailable)`` as they finish."""
    import ray

    from ._workers import Answerer, server_counter

    rows = [{"call": k, "work": pickle.dumps(call)} for k, call in enumerate(calls)]
    # The replica (with the prompts it surveys) goes to the object store once; actors fetch it by reference.
    kwargs: dict[str, Any] = {"replica": (ray.put(replica),)}
    if opts.base_urls:
        kwargs.update(servers=opts.base_urls, counter=server_counter())
    ds = ray.data.from_items(rows, override_num_blocks=len(rows)).map_batches(
        Answerer, batch_size=1, fn_constructor_kwargs=kwargs, compute=ray.data.ActorPoolStrategy(size=workers),
        num_cpus=opts.cpus_per_worker, num_gpus=gpus or None,
    )
    with _quiet():
        for row in ds.iter_rows():
            yield int(row["call"]), pickle.loads(row["answer"])


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Ray Data without its progress bars and execution logs (the run has its own bar) while a
    dataset runs; what it set before is restored."""
    import ray.data

    context = ray.data.DataContext.get_current()
    logger = logging.getLogger("ray.data")
    saved = (context.enable_progress_bars, context.print_on_execution_start, logger.level)
    context.enable_progress_bars, context.print_on_execution_start = False, False
    if not log.isEnabledFor(logging.DEBUG):
        logger.setLevel(logging.WARNING)
    try:
        yield
    finally:
        context.enable_progress_bars, context.print_on_execution_start = saved[:2]
        logger.setLevel(saved[2])


def _vllm_answers(calls: list, loaded: Any, replica: Any, opts: RayOptions, workers: int) -> Iterator[tuple[int, Any]]:
    """The calls' prompts as a Ray Data dataset (one row per prompt, token ids made here) through Ray
    Data's vLLM processor with ``workers`` engines; yields each call's generations once all are in."""
    import ray

    try:
        from ray.data.llm import build_processor, vLLMEngineProcessorConfig
    except ImportError as exc:
        raise ValueError(f"engine='vllm' needs Ray Data's LLM processors and vLLM: pip install 'ray[llm]' "
                         f"({exc})") from None

    from ._workers import vllm_generation, vllm_output, vllm_rows

    rows = vllm_rows(calls, loaded)
    engine_kwargs = dict(opts.engine_kwargs)
    if replica.options.get("dtype") and "dtype" not in engine_kwargs:
        engine_kwargs["dtype"] = replica.options["dtype"]
    config = vLLMEngineProcessorConfig(
        model_source=replica.name, engine_kwargs=engine_kwargs, concurrency=workers, batch_size=opts.vllm_batch_size,
        chat_template_stage=False, tokenize_stage=False, detokenize_stage=False, should_continue_on_error=True,
    )
    processor = build_processor(config, postprocess=vllm_output)
    sizes = [len(prompts) for prompts, _ in calls]
    pending: dict[int, list[Generation | None]] = {}
    with _quiet():
        for row in processor(ray.data.from_items(rows)).iter_rows():
            k = int(row["call"])
            generations = pending.setdefault(k, [None] * sizes[k])
            generations[int(row["pos"])] = vllm_generation(row)
            if all(g is not None for g in generations):
                yield k, pending.pop(k)


class RayExecutor:
    """Executor ``ray`` (see the package docstring). ``last_run`` holds what the last run measured:
    replicas, calls sent, seconds to start or join the cluster, seconds until the first answer (replicas
    loading their model), seconds in all."""

    name = "ray"
    description = "model replicas on a Ray cluster (Ray Data; vLLM with engine=vllm); needs the ray extra"

    def __init__(self) -> None:
        self.last_run: dict[str, Any] = {}

    def check(self, *, address: str | None = None, options: Mapping[str, Any] | None = None, **_: Any) -> None:
        """Refuse, in one line naming the fix, a missing Ray (the ``ray`` extra), bad options, or
        ``engine="vllm"`` without vLLM."""
        if importlib.util.find_spec("ray") is None:
            raise ValueError(NEEDS_EXTRA)
        opts = RayOptions.from_mapping(options)
        if opts.engine == "vllm" and importlib.util.find_spec("vllm") is None:
            raise ValueError("engine='vllm' needs vLLM and Ray Data's LLM processors: pip install 'ray[llm]' "
                             "(or leave engine out: the run's backend answers in Ray actors)")

    def run(self, loaded: Any, prompts: Sequence[Prompt], *, replica: Any, address: str | None = None,
            options: Mapping[str, Any] | None = None, **batches: Any) -> BatchOutcome:
        """Answer ``prompts`` on the cluster (see the module docstring); ``batches`` are
        :func:`run_batches`'s keywords, passed on unchanged (``block_prompts`` replaces the batch size)."""
        self.check(address=address, options=options)
        opts = RayOptions.from_mapping(options)
        if opts.block_prompts:
            batches["batch_prompts"] = opts.block_prompts
        started = time.perf_counter()
        recorder = _Recorder()
        run_batches(recorder, prompts, **{**batches, "progress": None})
        calls = recorder.calls
        self.last_run = {"calls": len(calls), "prompts": sum(len(p) for p, _ in calls)}
        if not calls:  # every batch was finished: read them back, send nothing
            return run_batches(_Feeder([], iter(())), prompts, **batches)
        if opts.engine == "vllm":
            if batches.get("settings", {}).get("decode", "generate") != "generate":
                raise ValueError("engine='vllm' answers decode='generate' only; use engine='actors' for "
                                 "constrained decoding or scoring")
            if replica.options.get("adapters"):
                raise ValueError("engine='vllm' does not load adapters here; merge the adapter into the model, "
                                 "or use engine='actors'")
        with _cluster(address, opts) as local:
            joined = time.perf_counter()
            workers, gpus = _replica_resources(loaded, opts, len(calls))
            log.info("Ray cluster %s in %.1f s; %d replica(s), %g GPU each, %d batch(es) to answer",
                     "started" if local else "joined", joined - started, workers, gpus, len(calls))
            if opts.engine == "vllm":
                answers = _vllm_answers(calls, loaded, replica, opts, workers)
            else:
                answers = _actor_answers(calls, replica, opts, workers, gpus)
            feeder = _Feeder(calls, answers)
            try:
                outcome = run_batches(feeder, prompts, **batches)
            finally:
                answers.close()  # stops the dataset when the run stopped early
        end = time.perf_counter()
        self.last_run.update(workers=workers, gpus_per_worker=gpus, cluster_started=local,
                             cluster_seconds=round(joined - started, 3),
                             first_answer_seconds=round((feeder.first_answer or end) - joined, 3),
                             seconds=round(end - started, 3))
        log.info("Ray executor: %s", self.last_run)
        return outcome
