"""Every `ferry` command builds the whole parser: building it must not import the heavy
libraries only some commands need (cryptography, pyroute2, the player, matplotlib,
rich, asyncio),
or each local command, `ferry migrate` included, pays for them before it starts."""

from __future__ import annotations

import subprocess
import sys

# rich and asyncio: about 60 ms of every command's start between them (measured
# here: 195-200 ms per parse before they were left out, 125-145 ms after).
HEAVY = (
    "cryptography", "pyroute2", "matplotlib", "ferry.stream.player", "ferry.lab.lab",
    "rich", "asyncio",
)  # fmt: skip


def test_building_the_parser_imports_nothing_heavy() -> None:
    code = (
        "import sys\n"
        "from ferry.cli.main import build_parser\n"
        "build_parser()\n"
        "print('\\n'.join(sorted(sys.modules)))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    ).stdout.split()
    loaded = sorted({m for m in out for h in HEAVY if m == h or m.startswith(h + ".")})
    assert loaded == []
