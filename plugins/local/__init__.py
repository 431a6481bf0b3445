"""Built-in executor ``local``: the run's prompts are answered in this process (the default).

The batches run one after another through :func:`~cellscribe.core.run.checkpoint.run_batches` with the
run's own loaded model: each finished batch saved to the checkpoint, a failing batch retried in halves.
Other executors (``ray``) run the same batches elsewhere.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from cellscribe import hookimpl
from cellscribe.core.run.checkpoint import BatchOutcome, run_batches

__all__ = ["LocalExecutor", "cellscribe_register_executors"]


class LocalExecutor:
    """Executor ``local``: the run's batches in this process, with the run's model."""

    name = "local"
    description = "in this process, one checkpointed batch after another (the default)"

    def check(self, *, address: str | None = None, options: Mapping[str, Any] | None = None, **_: Any) -> None:
        """Refuse a cluster address or executor options: they would be silently ignored here."""
        if address is not None or options:
            given = "executor_address" if address is not None else f"executor_options {sorted(options or {})}"
            raise ValueError(
                f"{given} is for a cluster executor, but executor='local' runs in this process; pass "
                "executor='ray' (--executor ray) to use it, or leave it out"
            )

    def run(self, loaded: Any, prompts: Sequence[Any], *, replica: Any = None, address: str | None = None,
            options: Mapping[str, Any] | None = None, **batches: Any) -> BatchOutcome:
        """:func:`run_batches` with the run's loaded model (``replica`` is not needed in-process)."""
        self.check(address=address, options=options)
        return run_batches(loaded, prompts, **batches)


@hookimpl(trylast=True)
def cellscribe_register_executors(register) -> None:
    register(LocalExecutor())
