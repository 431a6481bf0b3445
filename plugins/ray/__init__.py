"""Built-in executor ``ray``: a run's prompts answered by replicas of the model on a Ray cluster.

``executor="ray"`` (``--executor ray [--ray-address ADDRESS]``). The run's prompts are cut into the
batches a local run makes (the same partition, per-batch seeds, fingerprints and checkpoint files:
:func:`~cellscribe.core.run.checkpoint.run_batches`); the batches still to answer become a Ray Data
dataset, answered by

- **actors** (the default, ``engine="actors"``): ``map_batches`` with a callable class that loads a
  replica of the run's model once (:class:`~cellscribe.core.models.Replica`: the transformers backend,
  the markers model, an OpenAI-compatible server, any backend) and answers one batch per call exactly as
  the local executor would; with ``base_urls`` each replica talks to its own server;
- **vLLM** (``engine="vllm"``): Ray Data's LLM processor (``ray.data.llm``) on the prompts tokenised
  here exactly as the transformers backend feeds them, vLLM replicas for data parallelism.

Answers stream back as batches finish; each finished batch is saved to the run's checkpoint while the
others run, so a killed run resumes batch by batch, and the results come back in cell order. Without
``executor_address`` a local cluster is started for the run (``num_cpus`` limited, no dashboard) and
stopped after it. Ray is imported only when the executor runs: without the ``ray`` extra nothing
changes, and ``executor="ray"`` stops with an error naming it.
"""

from __future__ import annotations

from cellscribe import hookimpl

from ._executor import RayExecutor, RayOptions

__all__ = ["RayExecutor", "RayOptions", "cellscribe_register_executors"]


@hookimpl
def cellscribe_register_executors(register) -> None:
    register(RayExecutor())
