"""Running an outside tool (mkfs, qemu-img, sfdisk...) whose failure is one line."""

from __future__ import annotations

import subprocess
from collections.abc import Mapping
from pathlib import Path

from ferry.errors import ImageError


def run_tool(
    argv: list[str], what: str, cwd: Path | None = None, env: Mapping[str, str] | None = None
) -> str:
    """Its stdout; a failure becomes a one-line ImageError with stderr's last line."""
    try:
        proc = subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True, check=False)
    except OSError as err:
        raise ImageError(f"{what}: cannot run {argv[0]}: {err.strerror}") from err
    if proc.returncode != 0:
        lines = (proc.stderr or proc.stdout).strip().splitlines()
        detail = lines[-1] if lines else f"exit status {proc.returncode}"
        raise ImageError(f"{what}: {argv[0]} failed: {detail}")
    return proc.stdout
