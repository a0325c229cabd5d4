"""The benchmark's results file stays readable by what reads it: the bench itself and its README.

``bench/results.json`` is a real run; its summaries and verdicts are derived
from its runs, and bench/README.md shows its tables. Recomputing both from the
stored runs checks the benchmark's code and the file's format against each other.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from migbench.report import MODES
from migbench.summary import summarize, verdicts

BENCH = Path(__file__).resolve().parents[2] / "bench"


@pytest.fixture(scope="module")
def results() -> dict[str, Any]:
    data: dict[str, Any] = json.loads((BENCH / "results.json").read_text())
    return data


def test_summaries_and_verdicts_follow_from_the_stored_runs(results: dict[str, Any]) -> None:
    assert results["scenarios"]
    for name, scenario in results["scenarios"].items():
        modes = [m for m in MODES if m in scenario]
        assert {"ferry", "bare", "bare_zstd"} <= set(modes), name
        for mode in modes:
            assert summarize(scenario[mode]["runs"]) == scenario[mode]["summary"], (name, mode)
        libvirt = {m: scenario[m]["summary"] for m in modes if m.startswith("libvirt")}
        assert bool(libvirt) == (scenario.get("libvirt_skipped") is None), name
        ferry, bare = scenario["ferry"]["summary"], scenario["bare"]["summary"]
        postcopy = scenario.get("ferry_postcopy", {}).get("summary")
        targets = verdicts(name, scenario["rate"], ferry, bare, libvirt, postcopy)
        assert targets == scenario["targets"]


def test_the_script_prints_the_tables_the_readme_shows() -> None:
    # Run as the README says: the script, by path, not as an installed module.
    result = subprocess.run(
        [
            sys.executable,
            str(BENCH / "migration_bench.py"),
            "--markdown",
            str(BENCH / "results.json"),
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    readme = (BENCH / "README.md").read_text().splitlines()
    tables = [line for line in result.stdout.splitlines() if line.strip()]
    assert tables
    assert [line for line in tables if line not in readme] == []
