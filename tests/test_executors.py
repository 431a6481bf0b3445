"""Executors without a cluster: the default ``local`` executor, and what ``executor="ray"`` says where Ray
is not installed (these tests run with or without the ray extra)."""

from __future__ import annotations

import sys

import pytest
from click.testing import CliRunner

import cellscribe as cs
from cellscribe.cli import main
from cellscribe.core.spec import RunSpec

PANCREAS = "tests/data/pancreas_baron_human_mouse_350.h5ad"


def test_executors_are_registered_plugins(host):
    assert {"local", "ray"} <= set(host.registry.names("executor"))
    provided = {i.name: i.provides for i in host.plugins()}
    assert "executor:local" in provided["local"] and "executor:ray" in provided["ray"]
    assert RunSpec().execution.executor == "local"


def test_ray_is_imported_only_when_the_ray_executor_runs(host):
    import subprocess

    code = ("import sys, cellscribe.core.plugins as p; p.get_host(); import cellscribe.plugins.ray; "
            "print('ray' in sys.modules)")
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip() == "False"


def test_without_ray_the_ray_executor_stops_in_one_line_naming_the_extra(host, pancreas, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # as if Ray were not installed
    before = pancreas.copy()
    with pytest.raises(ValueError, match=r"^executor='ray' needs Ray, which the ray extra installs: "
                                         r"pip install 'cellscribe\[ray\]'$"):
        cs.tl.annotate(pancreas, executor="ray", progress=False)
    assert list(pancreas.obs.columns) == list(before.obs.columns) and not pancreas.uns  # nothing written


def test_without_ray_the_command_line_exits_1_in_one_line_before_reading_the_data(host, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)
    out = tmp_path / "out.h5ad"
    result = CliRunner().invoke(main, ["annotate", PANCREAS, "-o", str(out), "--executor", "ray",
                                       "--ray-address", "auto", "--no-progress"])
    assert result.exit_code == 1, result.output  # README, "Exit status": an error before the run
    assert result.output.strip() == "Error: executor='ray' needs Ray, which the ray extra installs: pip install 'cellscribe[ray]'"
    assert not out.exists() and not (tmp_path / "out.h5ad.cellscribe.ckpt").exists()


def test_the_local_executor_refuses_cluster_settings(host, pancreas):
    with pytest.raises(ValueError, match="executor_address is for a cluster executor.*executor='ray'"):
        cs.tl.annotate(pancreas, executor_address="auto", progress=False)
    with pytest.raises(ValueError, match=r"executor_options \['workers'\] is for a cluster executor"):
        cs.tl.annotate(pancreas, executor_options={"workers": 2}, progress=False)


def test_an_unknown_executor_lists_the_installed_ones(host, pancreas):
    with pytest.raises(Exception, match="unknown executor 'dask'; available: local, ray"):
        cs.tl.annotate(pancreas, executor="dask", progress=False)


def test_bad_ray_options_are_refused_before_any_work(host, pancreas):
    pytest.importorskip("ray", reason="option checks follow the check for Ray itself (the ray extra)")
    with pytest.raises(ValueError, match="unknown executor option.*'worker'.*known: workers"):
        cs.tl.annotate(pancreas, executor="ray", executor_options={"worker": 2}, progress=False)
    with pytest.raises(ValueError, match="engine must be one of actors, vllm"):
        cs.tl.annotate(pancreas, executor="ray", executor_options={"engine": "dask"}, progress=False)


def test_the_executor_is_recorded_and_a_run_re_created_from_it(host, pancreas):
    small = pancreas[:20].copy()
    cs.tl.annotate(small, progress=False, sidecar=False)
    params = small.uns["cellscribe"]["params"]
    assert params["executor"] == "local" and RunSpec.from_params(params).execution.executor == "local"
