"""Shared fixtures. Third-party plugins installed in the environment are kept out of the test run."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# Before any host exists: load only cellscribe's own plugins (entry-point group, built-ins only).
os.environ["CELLSCRIBE_LOAD_PLUGINS"] = ""
os.environ.pop("CELLSCRIBE_DISABLE_PLUGINS", None)

DATA = Path(__file__).parent / "data"
SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.fixture
def data_dir() -> Path:
    """The vendored test data folder (see tests/data/PROVENANCE.md)."""
    return DATA


@pytest.fixture(scope="session")
def pancreas_path() -> Path:
    return DATA / "pancreas_baron_human_mouse_350.h5ad"


@pytest.fixture
def pancreas(pancreas_path):
    """350 pancreas cells, raw counts, labels in obs['Group'] (a fresh copy per test)."""
    import anndata as ad

    return ad.read_h5ad(pancreas_path)


@pytest.fixture
def host():
    """A fresh plugin host (built-ins only) installed as the process-wide host for the test."""
    from cellscribe.core import plugins

    new = plugins.make_host()
    previous = plugins.set_host(new)
    try:
        yield new
    finally:
        plugins.set_host(previous)


@pytest.fixture
def with_plugin():
    """``with_plugin(obj, name)`` installs a host with an extra ad-hoc plugin for the test."""
    from cellscribe.core import plugins

    previous = plugins.set_host(None)
    try:

        def install(obj, name="test-plugin"):
            new = plugins.make_host(extra=[(name, obj)])
            plugins.set_host(new)
            return new

        yield install
    finally:
        plugins.set_host(previous)
