"""The NoCloud seed drive: a small FAT image labelled CIDATA holding the seed files.

Made byte for byte the same from the same files (mkfs.fat --invariant, fixed
file times), so that a migration's target, which makes its own copy from the
domain's config, presents the guest the very drive it had; prepare compares
the digests. (cloud-localds makes the same kind of image, but stamps it with
the time of its making.)
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path

from ferry.util.commands import run_tool

SEED_KIB = 256
FIXED_TIME = 946684800  # 2000-01-01T00:00:00Z: the files' times, the same everywhere


def build_seed(files: Mapping[str, bytes], out: Path, label: str = "CIDATA") -> str:
    """Write the seed image to ``out`` (replacing it); its sha256."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    tmp.unlink(missing_ok=True)
    with tempfile.TemporaryDirectory(prefix="ferry-seed-") as work:
        names = []
        for name, data in sorted(files.items()):
            path = Path(work) / name
            path.write_bytes(data)
            os.utime(path, (FIXED_TIME, FIXED_TIME))
            names.append(str(path))
        _run(["mkfs.fat", "--invariant", "-n", label, "-C", str(tmp), str(SEED_KIB)])
        _run(["mcopy", "-m", "-i", str(tmp), *names, "::/"])
    tmp.replace(out)
    return hashlib.sha256(out.read_bytes()).hexdigest()


def seed_digest(files: Mapping[str, bytes]) -> str:
    with tempfile.TemporaryDirectory(prefix="ferry-seed-") as work:
        return build_seed(files, Path(work) / "seed.img")


def _run(argv: list[str]) -> None:
    env = {**os.environ, "MTOOLS_SKIP_CHECK": "1", "TZ": "UTC"}
    run_tool(argv, "cloud-init seed", env=env)
