"""Apply each planted bug of ``mutants.py`` in a copy of the tree; the unit tests must fail.

    .venv/bin/python -m tests.mutation.run_mutants [--only SUBSTRING] [--json FILE]

Prints one line per mutant (killed or SURVIVED, and by which test) and the
score; exits non-zero if any mutant survived.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from ferry.hypervisor import process
from tests.mutation.mutants import MUTANTS, Mutant

REPO = Path(__file__).resolve().parents[2]
TESTS = [
    "tests/unit/test_migration_protocol.py",
    "tests/unit/test_migration_prepare.py",
    "tests/unit/test_migration_state.py",
    "tests/unit/test_relocation_tls.py",
    "tests/unit/test_cluster_ownership.py",
    "tests/unit/test_cluster_hosts.py",
    "tests/unit/test_disk_images.py",
    "tests/unit/test_cloud_init.py",
]
TIMEOUT_S = 600


def run_one(mutant: Mutant, tree: Path) -> dict[str, object]:
    target = tree / "src/ferry" / mutant.path
    original = target.read_text()
    if original.count(mutant.old) != 1:
        raise SystemExit(f"mutant '{mutant.name}': its text is not found once in {mutant.path}")
    target.write_text(original.replace(mutant.old, mutant.new))
    start = time.monotonic()
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *TESTS],
            cwd=tree, env=os.environ | {"PYTHONPATH": str(tree / "src")},
            capture_output=True, text=True, timeout=TIMEOUT_S,
        )  # fmt: skip
        killed = proc.returncode != 0
        failed = [
            line for line in proc.stdout.splitlines() if line.startswith(("FAILED ", "ERROR tests"))
        ]
    except subprocess.TimeoutExpired:
        killed, failed = True, [f"timed out after {TIMEOUT_S} s"]
    finally:
        target.write_text(original)
        end_leftovers(tree)
    return {
        "mutant": mutant.name,
        "killed": killed,
        "by": failed[:1],
        "seconds": round(time.monotonic() - start, 1),
    }


def end_leftovers(tree: Path) -> None:
    """A mutant may leave fake QEMUs behind (a run cut by the timeout): end them."""
    for pid in process.processes(b"fake_qemu.py", str(tree).encode()):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    # Fencers and etcd members of the cluster tests, in pytest's directories.
    for marker in (b"ferry.daemon.fencer", b"etcd"):
        for pid in process.processes(marker, b"/pytest-of-"):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", help="run the mutants whose name contains this")
    parser.add_argument("--json", type=Path, help="write the results here")
    args = parser.parse_args()
    chosen = [m for m in MUTANTS if not args.only or args.only in m.name]
    with tempfile.TemporaryDirectory(prefix="ferry-mutants-") as tmp:
        tree = Path(tmp)
        shutil.copytree(REPO / "src", tree / "src")
        shutil.copytree(
            REPO / "tests", tree / "tests", ignore=shutil.ignore_patterns("__pycache__")
        )
        shutil.copy(REPO / "pyproject.toml", tree)
        results = []
        for mutant in chosen:
            result = run_one(mutant, tree)
            results.append(result)
            verdict = "killed  " if result["killed"] else "SURVIVED"
            print(f"{verdict} {mutant.name} ({result['seconds']} s) {result['by']}", flush=True)
    killed = sum(1 for r in results if r["killed"])
    print(f"mutation score: {killed}/{len(results)} planted bugs caught")
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    return 0 if killed == len(results) else 1


if __name__ == "__main__":
    sys.exit(main())
