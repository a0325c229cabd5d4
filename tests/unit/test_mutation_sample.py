"""A sample of the mutation run on every test run: two planted bugs must be caught.

The whole run (``python -m tests.mutation.run_mutants``) takes minutes; these
two take seconds and prove the runner itself still applies and detects.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_two_planted_bugs_are_caught() -> None:
    for only in ("outcomes are kept in memory only", "the target resumes without writing"):
        proc = subprocess.run(
            [sys.executable, "-m", "tests.mutation.run_mutants", "--only", only],
            cwd=REPO, capture_output=True, text=True, timeout=600,
        )  # fmt: skip
        assert proc.returncode == 0, proc.stdout + proc.stderr
        assert "mutation score: 1/1" in proc.stdout, proc.stdout
