"""Finding (or building once) the real small model for tests/test_real_model.py and tests/test_vllm_engine.py."""

from __future__ import annotations

import contextlib
import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def builder():
    """``scripts/build_real_model.py`` as a module."""
    spec = importlib.util.spec_from_file_location("_script_build_real_model", ROOT / "scripts" / "build_real_model.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def real_model_dir() -> Path:
    """The built model folder (built by the script when ``gguf`` and ``accelerate`` are installed), or
    ``pytest.skip`` with the reason."""
    script = builder()
    out = script.default_output()
    if script.is_built(out):
        return out
    missing = script.missing_packages()
    if missing:
        pytest.skip(f"the real model is not built at {out} and building it needs {', '.join(missing)} "
                    '(pip install -e ".[real-model]", or run scripts/build_real_model.py)')
    try:
        return script.build(out, log=lambda message: None)
    except script.BuildError as exc:
        pytest.skip(f"the real model could not be built: {exc}")


@contextlib.contextmanager
def recording(loaded):
    """Within the block, the prompts ``loaded`` (a loaded model) is asked to answer, in order.

    Its ``generate`` is wrapped through plain attribute writes (a loaded model may be a view that
    forwards writes to the backend's object, and refuses deletes) and restored afterwards.
    """
    prompts = []
    generate = loaded.generate

    def record(batch, **options):
        prompts.extend(batch)
        return generate(batch, **options)

    loaded.generate = record
    try:
        yield prompts
    finally:
        loaded.generate = generate
