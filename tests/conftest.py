"""Shared fixtures. Third-party plugins installed in the environment are kept out of the test run."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest

# Before any host exists: load only cellscribe's own plugins (entry-point group, built-ins only).
os.environ["CELLSCRIBE_LOAD_PLUGINS"] = ""
os.environ.pop("CELLSCRIBE_DISABLE_PLUGINS", None)

ROOT = Path(__file__).resolve().parents[1]
DATA = Path(__file__).parent / "data"
SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"

#: Fragment files are read by snapatac2, installed by the ``atac`` extra (README, "Set-up"); CI installs it.
HAS_SNAPATAC2 = importlib.util.find_spec("snapatac2") is not None
#: What the fragments reader says without it (plugins/atac/fragments.py).
NEEDS_ATAC_EXTRA = "the atac extra installs"


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """Without the atac extra, a test that reaches a fragment file is skipped, saying why, wherever it
    reads one (a fixture, the test, a command it runs). With the extra nothing changes."""
    outcome = yield
    report = outcome.get_result()
    if HAS_SNAPATAC2 or call.excinfo is None or report.skipped:
        return
    if NEEDS_ATAC_EXTRA in str(call.excinfo.value):
        report.outcome = "skipped"
        report.longrepr = (str(item.path), item.location[1] or 0, "Skipped: reads a fragment file, which needs the "
                           "atac extra: pip install -e '.[atac]'")


#: PBSmall (ArchR's small scATAC set, tests/data/PROVENANCE.md): fragments on chr5/chr11 and their annotation.
PBSMALL_FRAGMENTS = DATA / "atac" / "PBSmall_fragments.tsv.gz"
PBSMALL_GTF = DATA / "atac" / "hg19_chr5_chr11_genes.gtf.gz"
PBSMALL_SIZES = DATA / "atac" / "hg19.chrom.sizes"


def atac_host_with(*extra):
    """A host with the built-in plugins, the atac plugin (its entry point, or registered here when the
    package is not installed with it) and the ``(name, plugin)`` pairs of ``extra``."""
    from cellscribe.core import plugins
    from cellscribe.plugins import atac

    host = plugins.make_host(extra=extra)
    if "atac" not in host.registry.names("modality"):
        host = plugins.make_host(extra=[("atac", atac), *extra])
    return host


@pytest.fixture(scope="module")
def atac_host():
    """:func:`atac_host_with` as the current host for a test module (the previous one restored after)."""
    from cellscribe.core import plugins

    host = atac_host_with()
    previous = plugins.set_host(host)
    try:
        yield host
    finally:
        plugins.set_host(previous)


@pytest.fixture(scope="module")
def pbsmall():
    """PBSmall's gene activity read from its fragments with default settings (do not modify: copy first)."""
    pytest.importorskip("snapatac2", reason="needs the atac extra: pip install -e '.[atac]'")
    from cellscribe.plugins import atac

    return atac.FragmentsReader().read(PBSMALL_FRAGMENTS, gtf=PBSMALL_GTF, chrom_sizes=PBSMALL_SIZES)


#: The environment variables through which the openai backend would find a server or key of the machine.
OPENAI_ENV = ("OPENAI_API_KEY", "CELLSCRIBE_OPENAI_BASE_URL", "OPENAI_BASE_URL")


@pytest.fixture
def no_openai_env(monkeypatch):
    """No OpenAI key or server of the machine reaches the test (the tests name their own)."""
    for name in OPENAI_ENV:
        monkeypatch.delenv(name, raising=False)


def _writable(folder: Path) -> bool:
    try:
        (folder / ".probe").touch()
    except OSError:
        return False
    (folder / ".probe").unlink()
    return True


@pytest.fixture
def readonly_folder(tmp_path):
    """A folder this process cannot write to (as root chmod does not stop writes: /sys then)."""
    folder = tmp_path / "readonly"
    folder.mkdir()
    folder.chmod(0o555)
    if _writable(folder):
        folder = Path("/sys")
        if not folder.is_dir() or _writable(folder):
            pytest.skip("no folder here refuses writes to this user")
    yield folder
    (tmp_path / "readonly").chmod(0o755)


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


@pytest.fixture(scope="session")
def load_script():
    """``load_script(name)`` imports ``scripts/{name}.py`` (the table builders are scripts, not modules
    of the package)."""
    import importlib.util

    def load(name: str):
        spec = importlib.util.spec_from_file_location(f"_script_{name}", ROOT / "scripts" / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module

    return load


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models gain nothing from threads, and on a busy 2-core machine two threads contend (use
    with ``pytest.mark.usefixtures("one_thread")``)."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


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
