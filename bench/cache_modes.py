"""What each disk cache mode costs on each of the lab's storage kinds.

Run as root from the repository (the lab needs network namespaces)::

    .venv/bin/python bench/cache_modes.py [--reps 3] [--out bench/cache_modes.json]

For each storage kind (nfs: QEMU's libnfs driver to nfs-ganesha; nbd:
qemu-storage-daemon; dir: a local directory, the stand-in for a kernel NFS
mount, which this machine's kernel lacks) a lab is brought up, unshaped, and
``qemu-img bench`` runs in xen_host_1's namespace against the lab's 64 MiB
scratch image, with each cache mode. That is QEMU's own block layer, the
code a guest's writes go through, without a guest's noise:

- ``sync4k``: 4 KiB writes at queue depth 1 with a flush after every 8 (a
  database or the witness ledger committing), 2000 writes;
- ``seq1m``: 1 MiB sequential writes at queue depth 4, 64 MiB in all, flushed
  at the end.

The figure is the median over ``--reps`` runs, in MiB/s. Compare the rows of
one run, never runs on different days.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from ferry.lab import lab as lab_mod

KINDS = ("nfs", "nbd", "dir")
MODES = ("none", "directsync", "writethrough", "writeback")
PATTERNS = {
    "sync4k": ["-c", "2000", "-d", "1", "-s", "4096", "--flush-interval=8"],
    "seq1m": ["-c", "64", "-d", "4", "-s", "1048576", "--flush-interval=64"],
}
BYTES = {"sync4k": 2000 * 4096, "seq1m": 64 << 20}
COMPLETED = re.compile(r"Run completed in ([0-9.]+) seconds")


def bench(lab: lab_mod.Lab, target: str, mode: str, pattern: str) -> float:
    argv = ["qemu-img", "bench", "-w", "-f", "raw", "-t", mode, *PATTERNS[pattern], target]
    result = lab.run("xen_host_1", argv, timeout=600)
    match = COMPLETED.search(result.stdout)
    if result.returncode != 0 or match is None:
        raise RuntimeError(f"{' '.join(argv)}: {result.stderr.strip() or result.stdout}")
    return BYTES[pattern] / float(match[1]) / (1 << 20)


def run(reps: int) -> dict[str, Any]:
    rows: list[dict[str, Any]] = []
    for kind in KINDS:
        workdir = Path(tempfile.mkdtemp(prefix="ferrylab-cache", dir="/tmp"))
        try:
            lab = lab_mod.up(kind, rate=None, workdir=workdir, log=lambda _l: None)
            for mode in MODES:
                row: dict[str, Any] = {"storage": kind, "cache": mode}
                for pattern in PATTERNS:
                    runs = [bench(lab, lab.scratch_disk, mode, pattern) for _ in range(reps)]
                    row[pattern] = round(statistics.median(runs), 2)
                print(json.dumps(row), flush=True)
                rows.append(row)
        finally:
            lab_mod.down(workdir, log=lambda _l: None)
            shutil.rmtree(workdir, ignore_errors=True)
    return {"date": time.strftime("%Y-%m-%d"), "reps": reps, "unit": "MiB/s", "rows": rows}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--out", type=Path, default=Path("bench/cache_modes.json"))
    args = parser.parse_args()
    result = run(args.reps)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
