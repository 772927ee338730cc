"""Fixtures of the fault-injection suite: shared tiny data, shared uninterrupted reference runs, and the report.

Report: with ``RECTRAIN_FAULTS_REPORT=path`` every test appends one JSON line to ``path``: its case and fault
(``@pytest.mark.fault``), what it measured (``outcome(...)``: repetitions, runs finished, checkpoints lost,
samples lost or duplicated, hangs, seconds to stop, exit code) and the pytest result (passed, failed,
xfailed with the known defect). ``benchmarks/reliability_report.py`` renders docs/reliability.md from it.

Long variants (``soak``) run only with ``RECTRAIN_FAULTS_SOAK=1`` (``make faults``).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from rectrain.data.synth import make_synthetic

from . import harness as h

REPORT = os.environ.get("RECTRAIN_FAULTS_REPORT")

def pytest_configure(config):
    config.addinivalue_line("markers", "fault(case, fault): the report row of a fault-injection test")
    config.addinivalue_line("markers", "soak: a long variant, run only with RECTRAIN_FAULTS_SOAK=1")


def pytest_collection_modifyitems(config, items):
    if h.SOAK:
        return
    skip = pytest.mark.skip(reason="soak variant: set RECTRAIN_FAULTS_SOAK=1 (make faults)")
    for item in items:
        if "soak" in item.keywords:
            item.add_marker(skip)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    rep = outcome.get_result()
    setattr(item, f"rep_{rep.when}", rep)


def _result(item) -> str:
    for when in ("setup", "call"):
        rep = getattr(item, f"rep_{when}", None)
        if rep is None:
            continue
        if hasattr(rep, "wasxfail"):
            return "xfailed" if rep.skipped else "xpassed"
        if rep.failed:
            return "failed" if when == "call" else "error"
        if rep.skipped:
            return "skipped"
    return "passed"


@pytest.fixture(autouse=True)
def outcome(request):
    """``outcome(runs_finished=..., exit_code=..., ...)`` records what the test measured for the report."""
    row: dict = {}
    exit_hangs = len(h.EXIT_HANGS)

    def record(**measured):
        row.update(measured)

    yield record
    if len(h.EXIT_HANGS) > exit_hangs:
        row["note"] = "a run hung in the interpreter's exit after its work was done (case 12)"
    marker = request.node.get_closest_marker("fault")
    if not REPORT or marker is None:
        return
    xfail = request.node.get_closest_marker("xfail")
    line = {"test": request.node.nodeid, "case": marker.kwargs.get("case"), "fault": marker.kwargs.get("fault"),
            "soak": request.node.get_closest_marker("soak") is not None, "result": _result(request.node),
            "defect": xfail.kwargs.get("reason") if xfail is not None else None, **row}
    with open(REPORT, "a") as f:
        f.write(json.dumps(line, default=str) + "\n")


# -- data and reference runs ----------------------------------------------------------------------

@pytest.fixture(scope="session")
def data_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("data")
    make_synthetic(str(root), classes=3, train_per_class=16, val_per_class=5, kind="tiny", seed=0)
    return root


@pytest.fixture
def own_data(data_dir, tmp_path) -> Path:
    """A private copy of the tiny data set, for tests that change or break files."""
    dst = tmp_path / "data"
    shutil.copytree(data_dir, dst, ignore=shutil.ignore_patterns("sorted_idxar_*"))
    return dst


def _reference(tmp_path_factory, data_dir, name: str, extra: list[str]) -> Path:
    out = tmp_path_factory.mktemp(f"ref_{name}")
    res = h.run(h.train_args(data_dir, out, name, *extra), out / "work")
    assert res.code == 0, f"reference run {name} failed:\n{res.stderr[-3000:]}"
    return out


@pytest.fixture(scope="session")
def ref1(tmp_path_factory, data_dir) -> Path:
    """Output folder of the uninterrupted 1-process run, named ``ref1``."""
    return _reference(tmp_path_factory, data_dir, "ref1", h.REF1)


@pytest.fixture(scope="session")
def ref2(tmp_path_factory, data_dir) -> Path:
    """Output folder of the uninterrupted 2-process run, named ``ref2``."""
    return _reference(tmp_path_factory, data_dir, "ref2", [*h.REF2, *h.ddp()])
